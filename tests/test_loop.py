"""The training loop both commands share (train/run/loop.py): the lr schedule, the data helpers it
steps over, and an effective batch that trains the same however it is split."""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess

import pytest
from click.testing import CliRunner
from conftest import launch_two

from mrmae.cli import cli
from mrmae.demo import write_demo_shards
from mrmae.train.run.loader import epoch_passes, grouped
from mrmae.train.run.loop import lr_at
from mrmae.train.stream import rank_slots


def test_lr_warms_up_linearly_then_follows_a_half_cosine_to_the_floor():
    base, floor, warm, total = 1e-3, 1e-5, 4, 14
    assert [lr_at(s, base, floor, warm, total) for s in range(4)] == [0.0, 2.5e-4, 5e-4, 7.5e-4]
    assert lr_at(4, base, floor, warm, total) == base  # the peak, where the cosine starts
    assert lr_at(9, base, floor, warm, total) == pytest.approx((base + floor) / 2)  # half-way down
    assert lr_at(14, base, floor, warm, total) == pytest.approx(floor)
    assert lr_at(20, base, floor, warm, total) == pytest.approx(floor)  # held after the end
    lrs = [lr_at(s, base, floor, warm, total) for s in range(4, 15)]
    assert all(a > b for a, b in zip(lrs, lrs[1:]))
    assert lr_at(0, base, floor, 0, 10) == base  # no warm-up: the first step at the peak
    assert lr_at(5, base, 0.0, 0, 10) == pytest.approx(base * 0.5 * (1 + math.cos(math.pi / 2)))


def test_rank_slots_give_every_split_of_a_step_the_same_samples_at_the_same_positions():
    samples = list(range(35))  # 4 effective batches of 8, and 3 left over
    for world, batch, accum in ((1, 8, 1), (1, 4, 2), (2, 2, 2), (2, 4, 1), (4, 1, 2), (1, 1, 8)):
        per_rank = [list(rank_slots(iter(samples), r, world, batch, accum)) for r in range(world)]
        assert {len(p) for p in per_rank} == {4 * 8 // world}  # the 3 left over dropped on every rank
        for step in range(4):
            rows = {}  # position in the step's effective batch -> sample
            for rank, taken in enumerate(per_rank):
                mine = taken[step * batch * accum:(step + 1) * batch * accum]
                for a in range(accum):
                    slot = a * world + rank  # micro_batch.MicroBatch.slot
                    rows.update({slot * batch + i: s for i, s in enumerate(mine[a * batch:(a + 1) * batch])})
            assert [rows[p] for p in range(8)] == list(range(step * 8, step * 8 + 8)), (world, batch, accum)


def test_epoch_passes_repeat_a_ranks_shards_and_refuse_an_empty_one():
    class Stream:
        def __init__(self, items):
            self.items, self.calls = items, []

        def set_epoch(self, epoch, repeat=0):
            self.calls.append((epoch, repeat))

        def __iter__(self):
            return iter(self.items)

    stream = Stream(["a", "b"])
    got = list(itertools.islice(grouped(epoch_passes(stream, stream, 3, RuntimeError("none")), 2), 3))
    assert got == [["a", "b"]] * 3 and stream.calls == [(3, 0), (3, 1), (3, 2)]
    with pytest.raises(RuntimeError, match="none"):
        next(epoch_passes(Stream([]), Stream([]), 0, RuntimeError("none")))
    # a batch may be a list ([x, y]: fine-tuning's); a short tail is no step
    assert list(grouped([["x1", "y1"], ["x2", "y2"], ["x3", "y3"]], 2)) == [[["x1", "y1"], ["x2", "y2"]]]


TINY = ["--model", "mrmae_vit_tiny_patch16", "--decoder-depth", "1", "--decoder-dim", "64", "--workers", "0",
        "--no-progress", "--seed", "3", "--lr", "1e-3", "--data-split", "samples", "--epochs", "1"]


def test_an_effective_batch_trains_the_same_however_it_is_split(tmp_path):
    """8 images a step as 8 x 1, 4 x 2 accumulation steps and 2 processes x 2 x 2 (gloo on
    the CPU): the same samples, views and masks each step, so the same losses, one line per
    optimiser step with the mean over its micro-batches."""
    shards = write_demo_shards(tmp_path / "shards", num_images=16, shard_size=8, seed=0)
    base = ["pretrain", "--shards", "::".join(map(str, shards)), *TINY]
    runs = {"8x1": ["--batch-size", "8"], "4x2": ["--batch-size", "4", "--accum-steps", "2"]}
    for name, split in runs.items():
        r = CliRunner().invoke(cli, [*base, *split, "--out", str(tmp_path / name)])
        assert r.exit_code == 0, r.output + repr(r.exception)
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    cmd = [*launch_two("torchrun"), *base, "--batch-size", "2", "--accum-steps", "2", "--out", str(tmp_path / "2x2x2")]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    logs = {name: [json.loads(ln) for ln in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
            for name in ("8x1", "4x2", "2x2x2")}
    for name, log in logs.items():
        assert [m["step"] for m in log] == [1, 2], name  # 16 images, 8 a step
        config = json.loads((tmp_path / name / "config.json").read_text())
        assert config["effective_batch"] == 8 and config["mask_seeding"] == 2
    for a, b, c in zip(logs["8x1"], logs["4x2"], logs["2x2x2"]):
        assert a["lr"] == b["lr"] == c["lr"]
        for k in ("loss", "loss_recon"):
            assert b[k] == pytest.approx(a[k], rel=1e-5) and c[k] == pytest.approx(a[k], rel=1e-5), (a["step"], k)
    assert logs["8x1"][0]["loss"] != logs["8x1"][1]["loss"]

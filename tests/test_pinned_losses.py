"""The losses of a cached (Zarr and wds, focused masking), a live and a plain pretraining run,
three steps each from a fixed seed, pinned to the numbers main gave before issue 25's
refactor (computed at c477ea0 on the 2-core CPU machine): every move of code since must
train the very same steps. Tiny student, real tars, real caches (the shared `tiny_caches`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import DINO_TINY

from mrmae.cli import cli

TINY = ["--model", "mrmae_vit_tiny_patch16", "--decoder-depth", "1", "--decoder-dim", "64", "--batch-size", "2",
        "--workers", "0", "--no-progress", "--seed", "5", "--lr", "1e-3", "--epochs", "1"]
KEYS = ("loss", "loss_recon", "loss_mimic", "lr")

# (loss, loss_recon, loss_mimic, lr) of steps 0, 1, 2 of each run
PINNED = {
    "cached-zarr-focused": [(1.562896966934204, 1.135658621788025, 1.9901351928710938, 0.001),
                            (1.2308639287948608, 1.0815978050231934, 1.3801300525665283, 0.00075),
                            (1.2093555927276611, 1.0513129234313965, 1.3673982620239258, 0.00025)],
    "cached-wds": [(1.5644400119781494, 1.1369335651397705, 1.9919464588165283, 0.001),
                   (1.2789069414138794, 1.0825594663619995, 1.4752544164657593, 0.00075),
                   (1.1715282201766968, 1.0496257543563843, 1.2934306859970093, 0.00025)],
    "live": [(1.5716513395309448, 1.1335432529449463, 2.0097594261169434, 0.001),
             (1.2831482887268066, 1.080741047859192, 1.4855554103851318, 0.00075),
             (1.198195219039917, 1.0489201545715332, 1.3474702835083008, 0.00025)],
    "plain": [(1.133150577545166, 1.133150577545166, 0.0, 0.001),
              (1.0699386596679688, 1.0699386596679688, 0.0, 0.00075),
              (1.0438132286071777, 1.0438132286071777, 0.0, 0.00025)],
}


def run(shards: Path, source: list[str], out: Path) -> list[tuple[float, ...]]:
    r = CliRunner().invoke(cli, ["pretrain", "--shards", str(shards), *source, "--out", str(out), *TINY])
    assert r.exit_code == 0, r.output + repr(r.exception)
    lines = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    return [tuple(m[k] for k in KEYS) for m in lines]


def sources(tiny_caches) -> dict[str, list[str]]:
    return {"cached-zarr-focused": ["--feature-cache", str(tiny_caches["zarr"]), "--mask", "focused",
                                    "--focus-temperature", "0.5", "--focus-uniform-mix", "0.1"],
            "cached-wds": ["--feature-cache", str(tiny_caches["wds"]), "--target-norm", "layernorm"],
            "live": ["--teacher", DINO_TINY],
            "plain": []}


@pytest.mark.parametrize("mode", ["cached-zarr-focused", "cached-wds", "live", "plain"])
def test_losses_stay_what_main_trained(demo_shards, tiny_caches, tmp_path, mode):
    got = run(demo_shards[0], sources(tiny_caches)[mode], tmp_path / mode)
    assert len(got) == 3  # 6 images of the first demo shard, 2 a step
    for step, (g, want) in enumerate(zip(got, PINNED[mode])):
        assert g == pytest.approx(want, rel=1e-6, abs=1e-9), (mode, step)
    assert (got[0][2] == 0) == (mode == "plain")

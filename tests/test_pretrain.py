"""Pretraining end to end: cached, live and plain modes, ablations from one cache, resume."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import DINO_TINY, launch_two, url_list

from mrmae.cli import cli, main
from mrmae.extract.config import ExtractConfig
from mrmae.extract.runner import run_extraction
from mrmae.shared.views import ViewConfig

TINY = ["--model", "mrmae_vit_tiny_patch16", "--decoder-depth", "1", "--decoder-dim", "64",
        "--batch-size", "6", "--workers", "0", "--no-progress", "--seed", "3", "--lr", "1e-3"]


@pytest.fixture
def cache(demo_cache) -> Path:
    """The demo cache (conftest), which these tests only read."""
    return demo_cache


def metrics(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]


def pretrain(args: list[str]) -> None:
    r = CliRunner().invoke(cli, ["pretrain", *args])
    assert r.exit_code == 0, r.output + repr(r.exception)


def test_cached_and_live_modes_give_the_same_losses(demo_shards, cache, tmp_path):
    shards = url_list(demo_shards)
    pretrain(["--shards", shards, "--feature-cache", str(cache), "--out", str(tmp_path / "cached"), *TINY])
    pretrain(["--shards", shards, "--teacher", DINO_TINY, "--out", str(tmp_path / "live"), *TINY])
    c, lv = metrics(tmp_path / "cached"), metrics(tmp_path / "live")
    assert len(c) == len(lv) == 3  # 18 samples / batch 6
    # same views, masks and initial weights: the first reconstruction loss is identical
    assert c[0]["loss_recon"] == pytest.approx(lv[0]["loss_recon"], rel=1e-6)
    for a, b in zip(c, lv):  # int8 targets vs the live teacher's float ones
        assert a["loss_mimic"] == pytest.approx(b["loss_mimic"], rel=2e-3)
        assert a["loss"] == pytest.approx(b["loss"], rel=2e-3)
    cfg = json.loads((tmp_path / "cached" / "config.json").read_text())
    assert cfg["cache_fingerprint"] and cfg["teacher_weights_sha256"] and cfg["feature_cache"] == str(cache)
    for key in ("epoch", "step", "loss", "loss_recon", "loss_mimic", "lr", "images_per_s"):
        assert key in c[0]


@pytest.mark.parametrize("mode", ["cached", "live", "plain"])
def test_render_on_device_trains_the_same_losses_step_for_step(demo_shards, cache, tmp_path, mode):
    """The CPU as the device: the step renders the views the workers rendered before, so
    the same seed gives the very same losses (focused masking: the attention rides along)."""
    source = {"cached": ["--feature-cache", str(cache), "--mask", "focused"], "live": ["--teacher", DINO_TINY],
              "plain": []}[mode]
    # plain: without a flag, the CPU's default (workers render) is the reference
    reference = [] if mode == "plain" else ["--no-render-on-device"]
    runs = {}
    for name, flag in (("device", ["--render-on-device"]), ("workers", reference)):
        out = tmp_path / name
        pretrain(["--shards", url_list(demo_shards), *source, "--out", str(out), *TINY, *flag])
        runs[name] = metrics(out)
        assert json.loads((out / "config.json").read_text())["render_on_device"] == (name == "device")
    assert len(runs["device"]) == len(runs["workers"]) == 3
    for a, b in zip(runs["device"], runs["workers"]):
        assert [a[k] for k in ("step", "loss", "loss_recon", "loss_mimic", "lr")] == \
            [b[k] for k in ("step", "loss", "loss_recon", "loss_mimic", "lr")]
    assert (runs["device"][0]["loss_mimic"] > 0) == (mode != "plain")


def test_plain_mae_and_three_ablations_from_one_cache(demo_shards, cache, tmp_path):
    shards = url_list(demo_shards)
    before = sorted(p.stat().st_mtime_ns for p in cache.rglob("*") if p.is_file())
    runs = {
        "focused": ["--mask", "focused", "--focus-temperature", "0.5"],
        "fusion": ["--fuse-layers", "4,8,12", "--target-norm", "layernorm"],
        "l2": ["--target-norm", "l2", "--mimic-weight", "1.0", "--recon-weight", "0.0"],
    }
    results = {}
    for name, extra in runs.items():
        pretrain(["--shards", shards, "--feature-cache", str(cache), "--out", str(tmp_path / name), *TINY, *extra])
        results[name] = metrics(tmp_path / name)
    assert sorted(p.stat().st_mtime_ns for p in cache.rglob("*") if p.is_file()) == before  # no re-extraction
    assert results["l2"][0]["loss"] == pytest.approx(results["l2"][0]["loss_mimic"])  # recon weight 0
    firsts = {name: r[0]["loss_mimic"] for name, r in results.items()}
    assert len(set(firsts.values())) == 3  # each option changed what was trained
    main_argv = ["pretrain", "--shards", shards, "--out", str(tmp_path / "plain"), *TINY]
    with pytest.raises(SystemExit) as e:
        main(main_argv)
    assert e.value.code == 0
    plain = metrics(tmp_path / "plain")
    assert all(m["loss_mimic"] == 0 and m["loss"] == m["loss_recon"] for m in plain)


def test_killed_run_resumes_to_the_uninterrupted_losses(demo_shards, cache, tmp_path):
    shards = url_list(demo_shards)
    args = ["--shards", shards, "--feature-cache", str(cache), *TINY, "--batch-size", "6", "--epochs", "2",
            "--save-every-steps", "2"]  # 3 steps an epoch: a checkpoint at step 2 lies inside epoch 0
    pretrain([*args, "--out", str(tmp_path / "whole")])
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen([sys.executable, "-m", "mrmae", "pretrain", *args, "--out", str(out)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while time.time() < deadline:  # kill once a mid-epoch checkpoint exists and training went on
        if (out / "metrics.jsonl").exists() and len(metrics(out)) >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 3 <= len(metrics(out)) < 6, "the kill should land mid-run"
    pretrain([*args, "--out", str(out), "--resume"])
    whole, resumed = metrics(tmp_path / "whole"), metrics(out)
    assert [m["step"] for m in resumed] == list(range(1, 7))
    for a, b in zip(whole, resumed):
        for k in ("epoch", "loss", "loss_recon", "loss_mimic", "lr"):
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-7), (a["step"], k)


def test_a_resume_with_other_workers_says_its_batches_differ(demo_shards, cache, tmp_path):
    """--workers defaults to the machine's cores and each worker reads its own shards in
    its own order: a run resumed elsewhere is told, in one line, how to replay it exactly."""
    args = ["pretrain", "--shards", url_list(demo_shards), "--feature-cache", str(cache), *TINY,
            "--out", str(tmp_path / "r")]
    pretrain(args[1:])
    r = CliRunner().invoke(cli, [*args, "--epochs", "2", "--resume", "--workers", "1"])
    assert r.exit_code == 0, r.output
    warned = [ln for ln in r.stderr.splitlines() if "--workers" in ln]
    assert warned == [f"mrmae: warning: --workers 1, but {tmp_path / 'r'} ran with 0: the rest of this epoch is read "
                      "in another order than an uninterrupted run's (samples may repeat or be left out until the "
                      "epoch ends); give --workers 0 to replay it exactly"], r.stderr
    r = CliRunner().invoke(cli, [*args, "--epochs", "3", "--resume", "--workers", "1"])  # the run now has 1
    assert r.exit_code == 0 and "--workers" not in r.stderr, r.stderr


def test_mismatched_cache_is_refused_in_one_line(demo_shards, cache, tmp_path):
    r = CliRunner().invoke(cli, ["pretrain", "--shards", str(tmp_path / "elsewhere-000.tar"), "--feature-cache",
                                 str(cache), "--out", str(tmp_path / "o"), *TINY])
    lines = [ln for ln in r.output.splitlines() if ln.startswith("mrmae: error")]
    assert r.exit_code == 1 and len(lines) == 1 and "elsewhere-000.tar is not in the cache" in lines[0]


def test_target_norms():
    import torch

    from mrmae.train.engine import normalize_targets

    t = torch.randn(2, 49, 32) * 5 + 3
    assert torch.equal(normalize_targets(t, "none"), t)
    ln = normalize_targets(t, "layernorm")
    torch.testing.assert_close(ln.mean(-1), torch.zeros(2, 49), atol=1e-5, rtol=0)
    torch.testing.assert_close(ln.var(-1, unbiased=False), torch.ones(2, 49), atol=1e-3, rtol=0)
    torch.testing.assert_close(normalize_targets(t, "l2").norm(dim=-1), torch.ones(2, 49))
    with pytest.raises(ValueError):
        normalize_targets(t, "zscore")


def test_int8_targets_are_gathered_then_dequantised_to_the_full_dequantisation():
    import torch

    from mrmae.shared.cache_format import dequantize, quantize_int8
    from mrmae.train.engine import visible_float_targets
    from mrmae.train.masks.random import random_masking
    from mrmae.train.student import gather_visible

    x = torch.randn(3, 196, 24).numpy() * 4
    q, scale = quantize_int8(x)
    ids_keep, _, _ = random_masking(3, 196, 0.75, generator=torch.Generator().manual_seed(0))
    full = gather_visible(torch.from_numpy(dequantize(q, scale)), ids_keep)
    got = visible_float_targets(torch.from_numpy(q), torch.from_numpy(scale), ids_keep, torch.device("cpu"))
    assert got.shape == (3, 49, 24) and got.dtype == torch.float32 and torch.equal(got, full)
    half = torch.from_numpy(x.astype("float16"))
    assert torch.equal(visible_float_targets(half, None, ids_keep, torch.device("cpu")),
                       gather_visible(half.float(), ids_keep))


def test_non_finite_loss_stops_with_one_line_and_keeps_the_last_checkpoint(demo_shards, cache, tmp_path):
    from mrmae.train.run.checkpoint import latest_checkpoint

    args = ["--shards", str(demo_shards[0]), "--feature-cache", str(cache), "--out", str(tmp_path / "o"), *TINY,
            "--batch-size", "3"]
    pretrain([*args, "--epochs", "1"])
    good = latest_checkpoint(tmp_path / "o")
    # an absurd learning rate sends the weights to inf in one step: the next loss is NaN
    r = CliRunner().invoke(cli, ["pretrain", *args, "--epochs", "2", "--resume", "--lr", "1e38"])
    lines = [ln for ln in r.output.splitlines() if ln.startswith("mrmae: error")]
    assert r.exit_code == 1 and len(lines) == 1, r.output
    assert re.search(r"epoch 1 step 3: loss is (nan|inf) .*; the last good checkpoint is .*step00000002", lines[0])
    assert latest_checkpoint(tmp_path / "o") == good


def test_non_finite_or_unreadable_cached_targets_name_group_and_key(demo_shards, tmp_path):
    import dataclasses

    import numpy as np
    import zarr

    from mrmae.shared import cache_format as cf

    cache = tmp_path / "c"
    run_extraction(ExtractConfig(shards=str(demo_shards[0]), out=str(cache), teacher=DINO_TINY,
                                 views=ViewConfig(per_image=2, seed=3), progress=False))
    group = cache / cf.read_manifest(cache).shards[0].group
    args = ["pretrain", "--shards", str(demo_shards[0]), "--feature-cache", str(cache), *TINY]
    scale = zarr.open_array(str(group / "features_scale"), mode="r+")
    s = scale[:]
    s[:, 0] = np.inf  # a non-finite target, written as the writer would (its entry lists these bytes)
    scale[:] = s
    entry = cf.read_manifest(cache).shards[0]
    digest, size, files = cf.group_files(group)
    cf.record_shard(cache, dataclasses.replace(entry, sha256=digest, bytes=size, files=files))
    r = CliRunner().invoke(cli, [*args, "--out", str(tmp_path / "o1")])
    lines = [ln for ln in r.output.splitlines() if ln.startswith("mrmae: error")]
    assert r.exit_code == 1 and len(lines) == 1 and str(group) in lines[0], r.output
    assert re.search(r"key demo_\d+ row \d+: non-finite values in the cached targets", lines[0])
    chunk = next(f for f in sorted((group / "features").rglob("*")) if f.is_file())
    chunk.write_bytes(chunk.read_bytes()[:100])  # a truncated chunk
    r = CliRunner().invoke(cli, [*args, "--out", str(tmp_path / "o2")])
    lines = [ln for ln in r.output.splitlines() if ln.startswith("mrmae: error")]
    assert r.exit_code == 1 and len(lines) == 1 and str(group) in lines[0], r.output
    assert "unreadable targets" in lines[0] and "mrmae cache verify" in lines[0]


def _launch(args: list[str], out: Path, wait: bool = True, launcher: str = "torchrun"):
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    cmd = [*launch_two(launcher), "pretrain", *args, "--out", str(out)]
    if not wait:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.parametrize("launcher,remote", [("torchrun", False), ("accelerate", True)])
def test_ddp_on_two_processes_gives_the_losses_of_one(demo_shards, cache, tmp_path, launcher, remote):
    """torchrun reading the cache from its directory; accelerate launch reading it through
    fsspec (a file:// URL), as from an object store."""
    base = ["--shards", url_list(demo_shards), *TINY, "--data-split", "samples", "--mask", "focused", "--epochs", "2"]
    pretrain([*base, "--feature-cache", str(cache), "--batch-size", "8", "--out", str(tmp_path / "one")])
    where = f"file://{cache}" if remote else str(cache)
    _launch([*base, "--feature-cache", where, "--batch-size", "4"], tmp_path / "two", launcher=launcher)
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert len(one) == len(two) == 4  # 18 samples -> 2 global batches of 8 per epoch
    for a, b in zip(one, two):
        assert a["lr"] == b["lr"]
        for k in ("loss", "loss_recon", "loss_mimic"):
            assert a[k] == pytest.approx(b[k], rel=1e-4), (a["step"], k)
    assert json.loads((tmp_path / "two" / "config.json").read_text())["num_processes"] == 2


def test_ddp_run_killed_and_resumed_continues_from_its_checkpoint(demo_shards, cache, tmp_path):
    args = ["--shards", url_list(demo_shards), "--feature-cache", str(cache), *TINY, "--data-split", "samples",
            "--batch-size", "2", "--epochs", "2", "--save-every-steps", "1"]
    pretrain([*args, "--batch-size", "4", "--out", str(tmp_path / "whole")])
    out = tmp_path / "killed"
    proc = _launch(args, out, wait=False)
    deadline = time.time() + 180
    while time.time() < deadline:
        if (out / "metrics.jsonl").exists() and len(metrics(out)) >= 3:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both workers
    proc.wait()
    assert 3 <= len(metrics(out)) < 8, "the kill should land mid-run"
    _launch([*args, "--resume"], out)
    whole, resumed = metrics(tmp_path / "whole"), metrics(out)
    assert [m["step"] for m in resumed] == list(range(1, 9))
    for a, b in zip(whole, resumed):
        for k in ("loss", "loss_recon", "loss_mimic"):
            assert a[k] == pytest.approx(b[k], rel=1e-4), (a["step"], k)


def test_compiled_student_trains_like_the_eager_one_and_saves_the_same_names(demo_shards, cache, tmp_path):
    # dynamo's "eager" backend captures the same graphs as inductor without compiling C++,
    # so this checks the plumbing (in-place compile, DDP/accelerate wrapping, checkpoint
    # names) at test speed; the speed itself belongs to benchmarks/gpu_bench.py.
    from safetensors.torch import load_file

    args = ["--shards", url_list(demo_shards), "--feature-cache", str(cache), *TINY, "--mask", "focused"]
    pretrain([*args, "--out", str(tmp_path / "eager")])
    pretrain([*args, "--compile", "eager", "--out", str(tmp_path / "compiled")])
    for a, b in zip(metrics(tmp_path / "eager"), metrics(tmp_path / "compiled"), strict=True):
        for k in ("loss", "loss_recon", "loss_mimic"):
            assert a[k] == pytest.approx(b[k], rel=1e-5), (a["step"], k)
    names = [sorted(load_file(str(p)).keys()) for p in
             (next((tmp_path / run / "checkpoints").glob("step*/model.safetensors")) for run in ("eager", "compiled"))]
    assert names[0] == names[1] and not any("_orig_mod" in n for n in names[1])

"""A run never starts over, and never writes where it must not (issue 23, causes 6 and 8).

`--resume` with `checkpoints/latest` missing, a link to itself or a FIFO, while the run has
checkpoints, stops in one line naming the newest complete one and how to continue from it
(before: a silent fresh start that overwrote step00000004 and metrics.jsonl);
`--resume-from auto|PATH` continues from it. `--out` inside the cache, or holding it, is
refused; an output where a link was planted (metrics.jsonl, config.json, an export's
model.safetensors) is one line, and the link's target is left as it was.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from mrmae.cli import cli

TINY = ["--model", "mrmae_vit_tiny_patch16", "--decoder-depth", "1", "--decoder-dim", "32", "--batch-size", "6",
        "--workers", "0", "--no-progress", "--seed", "3", "--save-every-steps", "1"]


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
            and not p.is_symlink()}


def _pretrain(demo_shards, cache: Path, out: Path, *extra: str):
    """`mrmae pretrain` in this process -> (exit code, error lines, result)."""
    r = CliRunner().invoke(cli, ["pretrain", "--shards", str(demo_shards[0]), "--feature-cache", str(cache),
                                 "--out", str(out), *TINY, *extra])
    errors = [ln for ln in r.output.splitlines() if ln.startswith("mrmae: error")]
    return r.exit_code, errors, r


@pytest.fixture(scope="module")
def trained(demo_shards, tiny_caches, tmp_path_factory) -> Path:
    """One epoch of the tiny student on the tiny Zarr cache (24 views -> 6 samples a step... 1
    step an epoch at batch 6), two epochs, a checkpoint every step: step 1 and 2 kept."""
    out = tmp_path_factory.mktemp("resume") / "run"
    code, errors, r = _pretrain(demo_shards, tiny_caches["zarr"], out, "--epochs", "2")
    assert code == 0, r.output + repr(r.exception)
    return out


def _copy_run(trained: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(trained, run, symlinks=True)
    return run


def _steps(run: Path) -> list[int]:
    return [json.loads(ln)["step"] for ln in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("latest", ["missing", "link to itself", "fifo", "directory"])
def test_a_broken_latest_with_checkpoints_is_one_line_naming_the_newest_never_a_fresh_start(
        demo_shards, tiny_caches, trained, tmp_path, latest):
    run = _copy_run(trained, tmp_path)
    pointer = run / "checkpoints" / "latest"
    newest = run / "checkpoints" / pointer.read_text().strip()
    pointer.unlink()
    if latest == "link to itself":
        pointer.symlink_to("latest")
    elif latest == "fifo":
        os.mkfifo(pointer)
    elif latest == "directory":
        pointer.mkdir()
    before = _files(run)
    args = ["pretrain", "--shards", str(demo_shards[0]), "--feature-cache", str(tiny_caches["zarr"]), "--out", str(run),
            *TINY, "--epochs", "3", "--resume"]
    r = subprocess.run([sys.executable, "-m", "mrmae", *args], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONWARNINGS": "ignore"})
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("mrmae: error")]
    assert r.returncode == 1 and len(errors) == 1, r.stderr
    assert errors[0].startswith(f"mrmae: error: {pointer}: "), errors
    assert f"the newest complete checkpoint is {newest}: continue from it with --resume-from auto" in errors[0]
    assert _files(run) == before  # nothing restarted, nothing overwritten


def test_resume_from_auto_continues_from_the_newest_complete_checkpoint(demo_shards, tiny_caches, trained, tmp_path):
    run = _copy_run(trained, tmp_path)
    (run / "checkpoints" / "latest").unlink()
    code, errors, r = _pretrain(demo_shards, tiny_caches["zarr"], run, "--epochs", "3", "--resume-from", "auto")
    assert code == 0, r.output + repr(r.exception)
    assert _steps(run) == [1, 2, 3]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step00000003"


def test_resume_from_a_checkpoint_path_continues_from_it_and_cuts_the_metrics(demo_shards, tiny_caches, trained,
                                                                              tmp_path):
    run = _copy_run(trained, tmp_path)
    older = run / "checkpoints" / "step00000001"
    assert older.is_dir() and _steps(run) == [1, 2]
    code, errors, r = _pretrain(demo_shards, tiny_caches["zarr"], run, "--epochs", "2", "--resume-from", str(older))
    assert code == 0, r.output + repr(r.exception)
    assert _steps(run) == [1, 2]
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[0]) == json.loads((trained / "metrics.jsonl").read_text().splitlines()[0])


@pytest.mark.parametrize("given", ["elsewhere", "step00000009", ""])
def test_resume_from_what_is_no_checkpoint_of_the_run_is_refused(demo_shards, tiny_caches, trained, tmp_path, given):
    run = _copy_run(trained, tmp_path)
    path = {"elsewhere": str(tmp_path), "step00000009": str(run / "checkpoints" / "step00000009"), "": " "}[given]
    before = _files(run)
    code, errors, r = _pretrain(demo_shards, tiny_caches["zarr"], run, "--epochs", "3", "--resume-from", path)
    assert code in (1, 2) and len(errors) == 1 and "--resume-from" in errors[0], r.output
    assert _files(run) == before


@pytest.mark.parametrize("where", ["inside the cache", "holding the cache", "the cache itself"])
def test_an_out_inside_the_cache_or_holding_it_is_refused(demo_shards, tiny_caches, tmp_path, where):
    cache = tmp_path / "parent" / "c"
    shutil.copytree(tiny_caches["zarr"], cache)
    out = {"inside the cache": cache / "run", "holding the cache": tmp_path / "parent", "the cache itself": cache}[where]
    before = _files(tmp_path / "parent")
    code, errors, r = _pretrain(demo_shards, cache, out, "--epochs", "1")
    assert code == 2 and len(errors) == 1 and errors[0].startswith(f"mrmae: error: --out {out}: "), r.output
    assert _files(tmp_path / "parent") == before


@pytest.mark.parametrize("name", ["metrics.jsonl", "config.json"])
def test_a_link_planted_where_a_run_writes_is_one_line_and_its_target_untouched(demo_shards, tiny_caches, tmp_path,
                                                                                name):
    out = tmp_path / "run"
    out.mkdir()
    target = tmp_path / "precious.txt"
    target.write_text("keep me\n")
    (out / name).symlink_to(target)
    code, errors, r = _pretrain(demo_shards, tiny_caches["zarr"], out, "--epochs", "1")
    assert code == 1 and len(errors) == 1, r.output + repr(r.exception)
    assert errors[0].startswith(f"mrmae: error: {out / name}: a symbolic link"), errors
    assert target.read_text() == "keep me\n"


def test_export_never_writes_through_a_planted_link(trained, tmp_path):
    out = tmp_path / "e"
    out.mkdir()
    target = tmp_path / "precious.bin"
    target.write_bytes(b"keep me")
    (out / "model.safetensors").symlink_to(target)
    r = CliRunner().invoke(cli, ["export", "--checkpoint", str(trained), "--out", str(out)])
    lines = [ln for ln in r.output.splitlines() if ln.startswith("mrmae: error")]
    assert r.exit_code == 1 and len(lines) == 1, r.output
    assert lines[0].startswith(f"mrmae: error: {out}/model.safetensors: a symbolic link"), lines
    assert target.read_bytes() == b"keep me" and (out / "model.safetensors").is_symlink()


@pytest.mark.parametrize("field, value", [("model", 5), ("model", "no_such_model"), ("fuse_layers", "6,12")])
def test_a_config_json_field_of_another_type_is_one_line_naming_file_and_key(trained, tmp_path, field, value):
    run = _copy_run(trained, tmp_path)
    config = json.loads((run / "config.json").read_text())
    config[field] = value
    (run / "config.json").write_text(json.dumps(config))
    r = CliRunner().invoke(cli, ["export", "--checkpoint", str(run), "--out", str(tmp_path / "e")])
    lines = [ln for ln in r.output.splitlines() if ln.startswith("mrmae: error")]
    assert r.exit_code == 1 and lines == [lines[0]] and lines[0].startswith(
        f"mrmae: error: {run}/config.json: key {field} is "), r.output
    assert not (tmp_path / "e" / "model.safetensors").exists()

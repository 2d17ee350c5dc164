"""One line for every user error and environment fault: bad options refused before
anything is written, worker errors, full disks, checkpoints that are not one.

"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import DINO_TINY, TINY_RUN, file_bytes, one_line_error, run_cli, url_list

from mrmae.cli import cli


def _mrmae_process(args: list[str], sandbox: str = "", timeout: int = 300) -> tuple[int, list[str], str]:
    """`python -m mrmae ARGS` as a real process (in a private mount namespace running `sandbox`
    first, when given) -> (exit code, stderr lines that are not warnings, stderr)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "mrmae", *args]
    if sandbox:
        script = f"{sandbox} && exec " + " ".join(f"'{c}'" for c in cmd)
        cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    errors = [ln for ln in p.stderr.splitlines() if ln.strip() and not ln.startswith("mrmae: warning")]
    return p.returncode, errors, p.stderr


def _can_mount() -> bool:
    """Root in a kernel that lets it make a private mount namespace (to mount a full or read-only tmpfs)."""
    if os.geteuid() != 0 or not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                            "mount -t tmpfs -o size=64k tmpfs /mnt"], capture_output=True)
    return probe.returncode == 0


needs_mount = pytest.mark.skipif(not _can_mount(), reason="needs root and mount namespaces for a full/read-only fs")


@pytest.mark.parametrize("bad, option", [
    (["--views", "0"], "--views"), (["--batch-size", "0"], "--batch-size"), (["--workers", "-1"], "--workers"),
    (["--device", "gpu"], "--device"), (["--layers", "4"], "--layers")])  # --layers: removed (stored unread blocks)
def test_extract_options_are_refused_before_anything_is_written(demo_shards, tmp_path, bad, option):
    out = tmp_path / "cache"
    code, errors, r = run_cli(["extract-features", "--shards", str(demo_shards[0]), "--feature-cache", str(out),
                              "--teacher", DINO_TINY, "--no-progress", *bad])
    assert code != 0 and len(errors) == 1 and errors[0].startswith("mrmae: error: "), r.output
    assert option in errors[0] and "Traceback" not in r.output
    assert not out.exists()  # no manifest.json: the corrected rerun is not refused


def test_int8_group_not_dividing_the_teacher_then_corrected_rerun_succeeds(demo_shards, tmp_path):
    out = tmp_path / "cache"
    args = ["extract-features", "--shards", str(demo_shards[0]), "--feature-cache", str(out), "--teacher", DINO_TINY,
            "--no-progress", "--batch-size", "12"]
    code, errors, _ = run_cli([*args, "--int8-group", "7"])  # the teacher is known only once built
    assert code == 1 and len(errors) == 1 and errors[0].startswith("mrmae: error: --int8-group 7 does not divide "
                                                                   f"the 192 channels of {DINO_TINY}")
    assert not out.exists()
    code, errors, r = run_cli([*args, "--int8-group", "64"])
    assert code == 0 and not errors, r.output
    assert json.loads((out / "manifest.json").read_text())["teacher"]["layers"] == []


@pytest.mark.parametrize("bad, option", [
    (["--batch-size", "0"], "--batch-size"), (["--epochs", "0"], "--epochs"), (["--accum-steps", "0"], "--accum-steps"),
    (["--mask-ratio", "1.5"], "--mask-ratio"), (["--fuse-layers", "0"], "--fuse-layers"),
    (["--fuse-layers", "4,13"], "--fuse-layers"), (["--fuse-layers", "4,x"], "--fuse-layers"),
    (["--workers", "-1"], "--workers"), (["--model", "mrmae_vit_nope"], "--model")])
def test_pretrain_options_are_refused_before_anything_is_written(demo_shards, tmp_path, bad, option):
    out = tmp_path / "run"
    code, errors, r = run_cli(["pretrain", "--shards", str(demo_shards[0]), "--out", str(out), *TINY_RUN, *bad])
    assert code != 0 and len(errors) == 1 and errors[0].startswith("mrmae: error: "), r.output
    assert option in errors[0]
    assert not out.exists()


def _rename_one_key(src: Path, dst: Path) -> str:
    """A copy of tar `src` with one sample's key changed (same length: the same size), as a
    shard replaced since extraction would be; returns the new key."""
    with tarfile.open(src) as tin, tarfile.open(dst, "w", format=tarfile.USTAR_FORMAT) as tout:
        members = tin.getmembers()
        old = members[0].name.split(".", 1)[0]
        new = ("x" if old[0] != "x" else "y") + old[1:]  # a key no shard has
        for m in members:
            data = tin.extractfile(m).read()
            if m.name.split(".", 1)[0] == old:
                m.name = new + "." + m.name.split(".", 1)[1]
            tout.addfile(m, io.BytesIO(data))
    assert dst.stat().st_size == src.stat().st_size
    return new


def test_an_error_in_a_dataloader_worker_is_one_line(demo_shards, two_shard_caches, tmp_path):
    _, a, _, _ = two_shard_caches
    (tmp_path / "moved").mkdir()
    damaged = tmp_path / "moved" / demo_shards[1].name
    shutil.copy(demo_shards[0], tmp_path / "moved" / demo_shards[0].name)
    _rename_one_key(demo_shards[1], damaged)
    shards = url_list([tmp_path / "moved" / demo_shards[0].name, damaged])
    out = tmp_path / "run"
    code, errors, stderr = _mrmae_process(["pretrain", "--shards", shards, "--feature-cache", str(a), "--out", str(out),
                                           *TINY_RUN[:TINY_RUN.index("--workers")], "--workers", "2", "--no-progress"])
    assert code == 1 and len(errors) == 1, stderr
    assert errors[0].startswith("mrmae: error: ") and demo_shards[1].name in errors[0], errors
    assert "Traceback" not in stderr and "DataLoader worker" not in stderr


@needs_mount
def test_full_disk_and_read_only_out_are_one_line_naming_the_path(demo_shards, tmp_path):
    from _tiny_student import save_tiny_student

    save_tiny_student(tmp_path / "student")
    full, ro = tmp_path / "full", tmp_path / "ro"
    full.mkdir(), ro.mkdir()
    encoder = full / "model.safetensors"  # 22 MB of tensors on a 1 MB file system
    code, errors, stderr = _mrmae_process(["export", "--checkpoint", str(tmp_path / "student"), "--out", str(full)],
                                          sandbox=f"mount -t tmpfs -o size=1m tmpfs {full}")
    assert code == 1 and errors == [f"mrmae: error: {encoder}: No space left on device"], stderr
    run = ro / "run"
    code, errors, stderr = _mrmae_process(["pretrain", "--shards", str(demo_shards[0]), "--out", str(run),
                                           *TINY_RUN], sandbox=f"mount -t tmpfs -o ro tmpfs {ro}")
    assert code == 1 and errors == [f"mrmae: error: {run}: Read-only file system"], stderr


@needs_mount
def test_a_full_disk_during_pretraining_is_one_line_naming_the_checkpoint(demo_shards, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    code, errors, stderr = _mrmae_process(["pretrain", "--shards", str(demo_shards[0]), "--out", str(out),
                                           *TINY_RUN], sandbox=f"mount -t tmpfs -o size=2m tmpfs {out}")
    assert code == 1 and len(errors) == 1, stderr
    assert errors[0] == f"mrmae: error: {out}/checkpoints/step00000001/model.safetensors: No space left on device"


@pytest.mark.parametrize("kind", ["random file", "empty dir", "truncated", "another model"])
def test_a_checkpoint_that_is_not_one_is_one_line_naming_it(demo_shards, two_shard_caches, tmp_path, kind):
    import torch
    from _tiny_student import save_tiny_student
    from safetensors.torch import save_file

    if kind == "random file":
        bad = tmp_path / "notes.txt"
        bad.write_bytes(os.urandom(5000))
    elif kind == "empty dir":
        bad = tmp_path / "empty"
        bad.mkdir()
    elif kind == "truncated":
        save_tiny_student(tmp_path / "student")
        bad = tmp_path / "cut.safetensors"
        whole = next((tmp_path / "student" / "checkpoints").glob("step*/model.safetensors")).read_bytes()
        bad.write_bytes(whole[: len(whole) // 2])
    else:
        bad = tmp_path / "other.safetensors"
        save_file({"conv.weight": torch.zeros(4, 3, 3, 3), "fc.weight": torch.zeros(10, 4)}, str(bad))
    shards, a, _, _ = two_shard_caches
    commands = {
        "export": ["export", "--checkpoint", str(bad), "--out", str(tmp_path / "e")],
        "eval": ["eval", "knn", "--checkpoint", str(bad), "--shards", str(demo_shards[0]), "--val-shards",
                 str(demo_shards[0]), "--results", str(tmp_path / "eval.jsonl")],
        "visualize": ["visualize", "--feature-cache", str(a), "--shards", shards, "--out", str(tmp_path / "v"),
                      "--checkpoint", str(bad)],
        "finetune": ["finetune", "--checkpoint", str(bad), "--shards", str(demo_shards[0]), "--val-shards",
                     str(demo_shards[0]), "--out", str(tmp_path / "ft"), "--no-progress"],
    }
    for name, args in commands.items():
        code, errors, r = run_cli(args)
        assert code == 1 and len(errors) == 1 and errors[0].startswith(f"mrmae: error: {bad}"), (name, r.output,
                                                                                                 r.exception)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in [bad, *tmp_path.glob("student")])



# hostile2: float options (NaN passes click's ranges), shard lists, eval and finetune options

@pytest.mark.parametrize("bad, option", [
    (["--lr", "nan"], "--lr nan"), (["--lr", "-1"], "--lr -1.0"), (["--blr", "inf"], "--blr inf"),
    (["--min-lr", "nan"], "--min-lr nan"), (["--weight-decay", "nan"], "--weight-decay nan"),
    (["--warmup-epochs", "nan"], "--warmup-epochs nan"), (["--warmup-epochs", "10"], "--warmup-epochs 10: must be below --epochs 1"),
    (["--mask-ratio", "0"], "--mask-ratio 0.0: masks none of"), (["--mask-ratio", "nan"], "--mask-ratio nan"),
    (["--focus-temperature", "0"], "--focus-temperature 0.0"), (["--focus-uniform-mix", "2"], "--focus-uniform-mix 2.0"),
    (["--recon-weight", "-1"], "--recon-weight -1.0"), (["--recon-weight", "0", "--mimic-weight", "0"], "loss would be zero"),
    (["--recon-weight", "0"], "--recon-weight 0 without a teacher: the loss would be zero"),
    (["--shards", "::"], "--shards '::': names no shard"), (["--shards", "TWICE"], "is listed twice")])
def test_8_pretrain_numbers_and_shard_lists_are_refused_before_anything_is_written(demo_shards, tmp_path, bad, option):
    out = tmp_path / "run"
    bad = [url_list([demo_shards[0], demo_shards[1], demo_shards[0]]) if b == "TWICE" else b for b in bad]
    code, errors, r = run_cli(["pretrain", "--shards", str(demo_shards[0]), "--out", str(out), *TINY_RUN, *bad])
    assert code == 2 and len(errors) == 1 and errors[0].startswith("mrmae: error: ") and option in errors[0], r.output
    assert not out.exists()


@pytest.mark.parametrize("bad, option", [
    (["--lr", "nan"], "--lr nan"), (["--drop-path", "1.5"], "--drop-path 1.5"), (["--layer-decay", "-1"], "--layer-decay"),
    (["--smoothing", "nan"], "--smoothing nan"), (["--re-prob", "2"], "--re-prob 2.0"), (["--mixup", "nan"], "--mixup nan"),
    (["--rand-augment", "garbage"], "--rand-augment garbage: not a timm RandAugment policy")])
def test_8_finetune_numbers_are_refused_before_anything_is_written(demo_shards, tmp_path, bad, option):
    from _tiny_student import save_tiny_student

    save_tiny_student(tmp_path / "student")
    out = tmp_path / "ft"
    code, errors, r = run_cli(["finetune", "--checkpoint", str(tmp_path / "student"), "--shards", str(demo_shards[0]),
                              "--val-shards", str(demo_shards[1]), "--out", str(out), "--no-progress", *bad])
    assert code == 2 and len(errors) == 1 and errors[0].startswith("mrmae: error: ") and option in errors[0], r.output
    assert not out.exists()


@pytest.mark.parametrize("protocol, bad, option", [
    ("knn", ["--k", "0"], "'--k'"), ("knn", ["--temperature", "nan"], "'--temperature'"),
    ("knn", ["--temperature", "0"], "'--temperature'"), ("linear-probe", ["--epochs", "0"], "'--epochs'"),
    ("linear-probe", ["--lr", "nan"], "'--lr'"), ("linear-probe", ["--probe-batch-size", "0"], "'--probe-batch-size'")])
def test_8_eval_options_that_would_record_a_meaningless_result_are_refused(demo_shards, tmp_path, protocol, bad, option):
    from _tiny_student import save_tiny_student

    save_tiny_student(tmp_path / "student")
    results = tmp_path / "eval.jsonl"
    code, errors, r = run_cli(["eval", protocol, "--checkpoint", str(tmp_path / "student"), "--shards",
                              str(demo_shards[0]), "--val-shards", str(demo_shards[1]), "--results", str(results), *bad])
    assert code == 2 and len(errors) == 1 and errors[0].startswith("mrmae: error: ") and option in errors[0], r.output
    assert not results.exists()


# hostile1: extract-features options

def test_add_teacher_name_main_and_name_without_add_teacher_are_refused(small_cache, tmp_path):
    """`--target main` is the teacher that drew the views, so targets added under the name
    main could never be trained on; and --name without --add-teacher would be ignored.
    Both are one line naming the option, before anything is written."""
    root = tmp_path / "c"
    shutil.copytree(small_cache, root)
    runner = CliRunner()
    r = runner.invoke(cli, ["extract-features", "--feature-cache", str(root), "--add-teacher", DINO_TINY, "--name", "main",
                            "--no-progress"])
    assert r.exit_code == 2 and "--name main" in r.output and not (root / "targets").exists(), r.output
    r = runner.invoke(cli, ["extract-features", "--shards", "x.tar", "--feature-cache", str(tmp_path / "new"), "--teacher",
                            DINO_TINY, "--name", "t", "--no-progress"])
    assert r.exit_code == 2 and "--name goes with --add-teacher" in r.output and not (tmp_path / "new").exists()


@pytest.mark.parametrize("shards, what", [("TWICE", "is listed twice"), ("::", "names no shard"),
                                          ("WIDE", "more than 1,000,000 shards")])
def test_extract_shard_lists_listed_twice_empty_or_too_wide_are_refused(demo_shards, tmp_path, shards, what):
    """A shard listed twice was extracted twice and counted twice; `::` names nothing; a
    brace range of 10^8 (a typo) made braceexpand build 10^8 strings (~10 GB, minutes)
    before anything was said: each is one line, before anything is written."""
    given = {"TWICE": f"{demo_shards[0]}::{demo_shards[0]}",
             "WIDE": str(demo_shards[0]).replace("000000.tar", "{0000000000..0099999999}.tar")}.get(shards, shards)
    for args in (["extract-features", "--shards", given, "--feature-cache", str(tmp_path / "c"), "--teacher", DINO_TINY,
                  "--no-progress"], ["pretrain", "--shards", given, "--out", str(tmp_path / "r"), "--model",
                                     "mrmae_vit_tiny_patch16", "--no-progress"]):
        r = CliRunner().invoke(cli, args)
        one_line_error(r, what)
    assert not (tmp_path / "c").exists() and not (tmp_path / "r").exists()


def test_a_cache_url_of_an_unknown_or_uninstalled_scheme_is_one_line(demo_shards, tmp_path):
    """`--out s3://...` without s3fs (or a scheme fsspec does not know) was a traceback from
    fsspec; it is one line naming the URL, for extraction, info and pretraining."""
    url = "nosuchscheme://bucket/cache"
    for args in (["extract-features", "--shards", str(demo_shards[0]), "--feature-cache", url, "--teacher", DINO_TINY,
                  "--no-progress"], ["cache", "info", "--feature-cache", url],
                 ["pretrain", "--shards", str(demo_shards[0]), "--feature-cache", url, "--out", str(tmp_path / "r"),
                  "--model", "mrmae_vit_tiny_patch16", "--no-progress"]):
        one_line_error(CliRunner().invoke(cli, args), url, "cannot open this URL")
    assert not (tmp_path / "r").exists()


def test_8_export_and_visualize_never_write_over_the_checkpoint_or_the_cache(two_shard_caches, trained_on_a, tmp_path):
    """`export --out` onto the checkpoint's own model.safetensors replaced the run's weights
    with the encoder, and `visualize --out CACHE/manifest.json` the manifest with a PNG,
    both exiting 0; each is one line naming --out now (a directory since: the checkpoint's,
    the cache), and nothing is written."""
    shards, a, _, _ = two_shard_caches
    run = tmp_path / "run"
    shutil.copytree(trained_on_a, run)
    cache = tmp_path / "cache"
    shutil.copytree(a, cache)
    before = {**file_bytes(run), **file_bytes(cache)}
    weights = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip() / "model.safetensors"
    code, errors, r = run_cli(["export", "--checkpoint", str(run), "--out", str(weights.parent)])
    assert code == 1 and errors == [f"mrmae: error: --out {weights.parent}: the checkpoint {weights.parent}, whose "
                                    "files it would replace; write the encoder elsewhere"], r.output
    code, errors, r = run_cli(["visualize", "--feature-cache", str(cache), "--shards", shards, "--out", str(cache)])
    assert code == 2 and errors == [f"mrmae: error: --out {cache}: inside the cache {cache}, whose "
                                    "files it would replace; write the picture elsewhere"], r.output
    assert {**file_bytes(run), **file_bytes(cache)} == before


def test_8_a_fresh_run_over_older_checkpoints_keeps_its_own_and_finetune_keeps_off_the_pretrain_run(
        two_shard_caches, trained_on_a, tmp_path):
    """A run started without --resume on an --out holding a longer run's checkpoints saves
    lower step numbers; pruning by name deleted the one `latest` had just been pointed
    at. And `finetune --out` the pretrain run it reads would replace that run's config and
    checkpoints: one line naming --out."""
    shards, a, _, _ = two_shard_caches
    run = tmp_path / "run"
    shutil.copytree(trained_on_a, run)
    for step in (7, 9):  # an older run's later checkpoints
        shutil.copytree(run / "checkpoints" / "step00000002", run / "checkpoints" / f"step{step:08d}")
    older = file_bytes(run)
    code, errors, r = run_cli(["pretrain", "--shards", shards, "--feature-cache", str(a), "--out", str(run), *TINY_RUN,
                              "--save-every-steps", "1"])  # a fresh run on it: refused, the older run untouched
    assert code == 2 and errors == [f"mrmae: error: --out {run}: holds a run already; give --resume to continue it or "
                                    "--overwrite to set it aside (renamed, never deleted) and start anew"], r.output
    assert file_bytes(run) == older
    code, errors, r = run_cli(["pretrain", "--shards", shards, "--feature-cache", str(a), "--out", str(run), *TINY_RUN,
                              "--save-every-steps", "1", "--overwrite"])
    assert code == 0 and not errors, r.output + repr(r.exception)
    assert (run / "checkpoints" / "latest").read_text() == "step00000002"
    assert (run / "checkpoints" / "step00000002" / "state.json").is_file()
    aside = list(tmp_path.glob("run.old-*"))  # the older run, whole, beside the new one
    assert len(aside) == 1 and file_bytes(aside[0]) == older
    before = file_bytes(run)
    code, errors, r = run_cli(["finetune", "--checkpoint", str(run), "--shards", str(shards),
                              "--val-shards", str(shards), "--out", str(run), "--no-progress"])
    assert code == 2 and errors == [f"mrmae: error: --out {run}: holds the --checkpoint {run} (its config.json, metrics "
                                    "and checkpoints would be replaced); give the fine-tuning its own --out"], r.output
    assert file_bytes(run) == before

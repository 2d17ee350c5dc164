"""`mrmae report`: real tiny runs from one cache, read back as a table, a csv and a picture."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import url_list
from PIL import Image

from mrmae.cli import cli
from mrmae.train.run.records import LINE_LIMIT

TINY = ["--decoder-depth", "1", "--decoder-dim", "64", "--batch-size", "6", "--workers", "0", "--no-progress",
        "--seed", "3", "--lr", "1e-3"]
VIT = ["--model", "mrmae_vit_tiny_patch16"]


def invoke(args: list[str]):
    return CliRunner().invoke(cli, args)


def ok(args: list[str]) -> str:
    r = invoke(args)
    assert r.exit_code == 0, r.output + repr(r.exception)
    return r.output


@pytest.fixture(scope="module")
def runs(demo_shards, demo_cache, tmp_path_factory) -> dict[str, Path]:
    """An ablation from one cache (the demo cache): plain MAE, focused + fused mimicking (2
    epochs each, kNN evaluated twice), a ConvViT (1 epoch) and a fine-tuning run from the MAE."""
    root, shards, cache = tmp_path_factory.mktemp("ablation"), url_list(demo_shards), demo_cache
    r = {name: root / "r" / name for name in ("mae", "focused", "conv", "ft")}
    ok(["pretrain", "--shards", shards, "--out", str(r["mae"]), *VIT, *TINY, "--epochs", "2"])
    ok(["pretrain", "--shards", shards, "--out", str(r["focused"]), "--feature-cache", str(cache), *VIT, *TINY,
        "--epochs", "2", "--mask", "focused", "--fuse-layers", "4,8,12"])
    ok(["pretrain", "--shards", shards, "--out", str(r["conv"]), "--feature-cache", str(cache), *TINY,
        "--model", "mrmae_convvit_tiny", "--fuse-layers", "4,8,11", "--recon-weight", "0.25", "--mimic-weight", "1"])
    ok(["eval", "knn", "--checkpoint", str(r["focused"]), "--shards", shards, "--val-shards", shards, "--k", "1"])
    ok(["eval", "knn", "--checkpoint", str(r["focused"]), "--shards", url_list(demo_shards[:2]),
        "--val-shards", str(demo_shards[2])])  # the later result of the same protocol and feature wins
    ok(["finetune", "--checkpoint", str(r["mae"]), "--shards", url_list(demo_shards[:2]),
        "--val-shards", str(demo_shards[2]), "--out", str(r["ft"]), "--num-classes", "16", "--batch-size", "4",
        "--epochs", "1", "--lr", "1e-3", "--warmup-epochs", "0", "--workers", "0", "--eval-batch-size", "8",
        "--augment", "light", "--no-progress"])
    return r


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def last_epoch_means(run: Path) -> tuple[float, float]:
    """The report's final losses, computed here from metrics.jsonl on their own."""
    steps = [r for r in records(run / "metrics.jsonl") if "loss_recon" in r]
    last = [r for r in steps if r["epoch"] == max(s["epoch"] for s in steps)]
    return (sum(r["loss_recon"] for r in last) / len(last), sum(r["loss_mimic"] for r in last) / len(last))


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def md_rows(path: Path) -> list[dict]:
    lines = [ln for ln in path.read_text().splitlines() if ln.startswith("|")]
    cells = [[c.strip() for c in ln.strip("|").split(" | ")] for ln in lines]
    assert set(lines[1]) <= set("|-")  # the separator row
    return [dict(zip(cells[0], row)) for row in cells[2:]]


def test_report_rows_losses_evals_and_curves(runs, demo_cache, tmp_path):
    out = tmp_path / "report"
    ok(["report", *(str(runs[n]) for n in ("mae", "focused", "conv", "ft")), "--out", str(out)])
    assert sorted(p.name for p in out.iterdir()) == ["curves.png", "report.csv", "report.md"]  # no temporaries
    rows, md = read_csv(out / "report.csv"), md_rows(out / "report.md")
    assert [r["run"] for r in rows] == [r["run"] for r in md] == ["mae", "focused", "conv", "ft"]
    assert list(rows[0]) == list(md[0])  # the same columns
    by = {r["run"]: r for r in rows}
    assert [by["mae"][k] for k in ("task", "model", "mask", "fusion", "targets", "loss weights (recon/mimic)")] == \
        ["pretrain", "mrmae_vit_tiny_patch16", "random 0.75", "last", "none (MAE)", "1/0"]
    cache = str(demo_cache)
    assert [by["focused"][k] for k in ("mask", "fusion", "targets", "loss weights (recon/mimic)")] == \
        ["focused 0.75", "4,8,12", f"main @ {cache}", "0.5/0.5"]
    assert [by["conv"][k] for k in ("model", "fusion", "loss weights (recon/mimic)")] == \
        ["mrmae_convvit_tiny", "stages+4,8,11", "0.25/1"]
    assert [(by[n]["epochs"], by[n]["steps"]) for n in ("mae", "focused", "conv", "ft")] == \
        [("2", "6"), ("2", "6"), ("1", "3"), ("1", "3")]
    for name in ("mae", "focused", "conv"):
        recon, mimic = last_epoch_means(runs[name])
        assert float(by[name]["final L_R"]) == pytest.approx(recon, rel=1e-12)
        assert float(next(r for r in md if r["run"] == name)["final L_R"]) == pytest.approx(recon, rel=1e-3)
        if name != "mae":
            assert float(by[name]["final L_M"]) == pytest.approx(mimic, rel=1e-12)
    assert by["mae"]["final L_M"] == "" and by["ft"]["final L_R"] == ""  # not measured: blank, not 0
    knn = records(runs["focused"] / "eval.jsonl")
    assert knn[0]["top1"] == 100.0 and knn[-1]["top1"] != 100.0
    assert float(by["focused"]["knn cls top1"]) == pytest.approx(knn[-1]["top1"])  # the last line wins
    assert by["focused"]["knn cls images"] == f"6, {knn[-1]['classes_val']} classes"  # what the top-1 is over
    assert by["mae"]["knn cls top1"] == by["mae"]["knn cls images"] == ""
    ft = [r for r in records(runs["ft"] / "metrics.jsonl") if "top1" in r][-1]
    assert (float(by["ft"]["finetune top1"]), float(by["ft"]["finetune top5"])) == \
        pytest.approx((ft["top1"], ft["top5"]))
    assert by["ft"]["finetune images"] == f"6, {ft['classes_val']} classes"
    assert by["ft"]["task"] == "finetune" and by["ft"]["model"].startswith("mrmae_vit_tiny_patch16 from ")
    assert "last epoch" in (out / "report.md").read_text().splitlines()[2]  # the header says how losses are taken
    check_curves(out / "curves.png")


def check_curves(png: Path) -> None:
    """Two panels: L_R has the lines of the three pretraining runs (colours C0, C1, C2), L_M
    those of the two that mimic (C1, C2), not the plain MAE's (C0)."""
    image = Image.open(png)
    assert image.format == "PNG" and image.size == (1300, 500)
    rgb = np.asarray(image.convert("RGB")).astype(int)
    assert rgb.std() > 10  # not blank

    def has(panel: np.ndarray, colour: str) -> bool:
        target = np.array([int(colour[i:i + 2], 16) for i in (1, 3, 5)])
        return int((np.abs(panel - target).sum(-1) < 30).sum()) > 50

    left, right = rgb[:, :650], rgb[:, 650:]
    c0, c1, c2 = "#1f77b4", "#ff7f0e", "#2ca02c"  # matplotlib's C0, C1, C2
    assert has(left, c0) and has(left, c1) and has(left, c2)
    assert not has(right, c0) and has(right, c1) and has(right, c2)


def test_short_names_tell_same_named_runs_apart(runs, tmp_path):
    for side in ("a", "b"):
        (tmp_path / side / "run").mkdir(parents=True)
        for f in ("config.json", "metrics.jsonl"):
            shutil.copy(runs["focused"] / f, tmp_path / side / "run" / f)
    ok(["report", str(tmp_path / "a" / "run"), str(tmp_path / "b" / "run"), "--out", str(tmp_path / "rep")])
    assert [r["run"] for r in read_csv(tmp_path / "rep" / "report.csv")] == ["a/run", "b/run"]


def test_truncated_last_metrics_line_is_skipped_with_a_warning(runs, tmp_path):
    run = tmp_path / "killed"
    run.mkdir()
    shutil.copy(runs["focused"] / "config.json", run / "config.json")
    lines = (runs["focused"] / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join(lines[:5]) + "\n" + lines[5][:30])  # killed mid-append
    with pytest.warns(UserWarning, match=f"{run / 'metrics.jsonl'} line 6: truncated last line"):
        ok(["report", str(run), "--out", str(tmp_path / "rep")])
    row = read_csv(tmp_path / "rep" / "report.csv")[0]
    epoch1 = [json.loads(ln) for ln in lines[3:5]]  # steps 4, 5 of epoch 1 (3 steps an epoch)
    assert float(row["final L_R"]) == pytest.approx(sum(r["loss_recon"] for r in epoch1) / 2, rel=1e-12)
    assert row["steps"] == "5"


def _copy(runs: dict[str, Path], tmp_path: Path) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    for f in ("config.json", "metrics.jsonl", "eval.jsonl"):
        shutil.copy(runs["focused"] / f, run / f)
    return run


def _spoil(run: Path, case: str) -> tuple[list[str], str]:
    """Make `run` hostile as `case` says; (the report's arguments, what the error must name)."""
    rep = ["--out", str(run.parent / "rep")]
    metrics = run / "metrics.jsonl"
    if case == "no config.json":
        (run / "config.json").unlink()
        return [str(run), *rep], f"{run}: not a run directory (no config.json)"
    if case == "no such directory":
        return [str(run / "gone"), *rep], f"{run / 'gone'}: not a run directory (no such directory)"
    if case == "config not JSON":
        (run / "config.json").write_text('{"model": "mrmae_vit_tin')
        return [str(run), *rep], f"{run / 'config.json'}: not a run config"
    if case == "config not an object":
        (run / "config.json").write_text("[1, 2]")
        return [str(run), *rep], f"{run / 'config.json'}: not a run config (a JSON object)"
    if case == "config nested too deeply":
        (run / "config.json").write_text("[" * 100_000)
        return [str(run), *rep], f"{run / 'config.json'}: not a run config"
    if case == "a file for a run":
        return [str(run / "config.json"), *rep], f"{run / 'config.json'}: not a run directory (a file)"
    if case == "config key of a wrong type":
        cfg = json.loads((run / "config.json").read_text())
        (run / "config.json").write_text(json.dumps({**cfg, "fuse_layers": "4,8,12"}))
        return [str(run), *rep], f"{run / 'config.json'}: key fuse_layers is '4,8,12'"
    if case == "garbage metrics line":
        lines = metrics.read_text().splitlines()
        metrics.write_text("\n".join([lines[0], lines[1][:20], *lines[2:]]) + "\n")
        return [str(run), *rep], f"{metrics} line 2: not a JSON object"
    if case == "metrics loss not a number":
        lines = metrics.read_text().splitlines()
        metrics.write_text("\n".join([json.dumps({**json.loads(lines[0]), "loss_recon": "1.2"}), *lines[1:]]) + "\n")
        return [str(run), *rep], f"{metrics} line 1: key loss_recon is '1.2', not a finite number"
    if case == "metrics line nested too deeply":
        metrics.write_text(metrics.read_text() + "[" * 100_000 + "\n")
        return [str(run), *rep], f"{metrics} line 7: not a JSON object"
    if case == "huge metrics line":
        with open(metrics, "a") as f:
            f.write("x" * (LINE_LIMIT + 10) + "\n")
        return [str(run), *rep], f"{metrics} line 7: longer than {LINE_LIMIT} bytes"
    if case == "garbage eval line":
        (run / "eval.jsonl").write_text('{"protocol": "knn"}\n{"top1": 1}\n')
        return [str(run), *rep], f"{run / 'eval.jsonl'} line 1: no protocol and feature"
    if case == "the same run twice":
        return [str(run), f"{run}/", *rep], f"{run}/: the same run as {run}, given twice"
    if case == "--out inside its checkpoints":
        out = run / "checkpoints" / "step00000006"
        return [str(run), "--out", str(out)], f"--out {out}: inside the checkpoints of run {run}"
    raise AssertionError(case)


HOSTILE = ["no config.json", "no such directory", "a file for a run", "config not JSON", "config not an object",
           "config nested too deeply", "config key of a wrong type", "garbage metrics line",
           "metrics loss not a number", "metrics line nested too deeply", "huge metrics line", "garbage eval line",
           "the same run twice", "--out inside its checkpoints"]


@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_input_is_one_line_naming_the_path(runs, tmp_path, case):
    args, message = _spoil(_copy(runs, tmp_path), case)
    r = invoke(["report", *args])
    errors = [ln for ln in r.output.splitlines() if ln.startswith("mrmae: error: ")]
    usage = case in ("the same run twice", "--out inside its checkpoints")  # exit 2; a run file that is wrong: 1
    assert r.exit_code == (2 if usage else 1) and len(errors) == 1, r.output
    assert message in errors[0], errors[0]
    assert "Traceback" not in r.output
    out = Path(args[args.index("--out") + 1])
    assert not (out / "report.md").exists()  # refused before anything is written


def test_help_does_not_import_matplotlib():
    import subprocess
    import sys

    code = ("import sys; from click.testing import CliRunner; from mrmae.cli import cli; "
            "r = CliRunner().invoke(cli, ['report', '--help']); "
            "assert r.exit_code == 0 and 'RUNS' in r.output, r.output; print('matplotlib' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stdout + r.stderr


def test_mask_column_reads_both_config_layouts():
    """step_options.mask_options (since the masking registry) and, for older runs, focused
    masking's options in step_options itself: the same column."""
    from mrmae.train.run.records import RecordError, StepOptionsRecord
    from mrmae.train.downstream.report import describe_mask

    def describe(opts: dict) -> str | None:
        return describe_mask(StepOptionsRecord.from_json(opts, "w"))

    old = {"mask": "focused", "mask_ratio": 0.75, "focus_temperature": 0.5, "focus_uniform_mix": 0.0}
    new = {"mask": "focused", "mask_ratio": 0.75, "mask_options": {"focus_temperature": 0.5, "focus_uniform_mix": 0.0}}
    assert describe(old) == describe(new) == "focused 0.75 T=0.5"
    assert describe({"mask": "random", "mask_ratio": 0.6, "mask_options": {"focus_temperature": 2}}) == "random 0.6"
    assert describe({"mask": "since-removed", "mask_ratio": 0.5}) == "since-removed 0.5"
    with pytest.raises(RecordError, match="w step_options: key mask_options is 3, not an object"):
        describe({"mask": "focused", "mask_options": 3})
    with pytest.raises(RecordError, match="w step_options: key focus_temperature is 'hot', not a finite number"):
        describe({"mask": "focused", "mask_options": {"focus_temperature": "hot"}})

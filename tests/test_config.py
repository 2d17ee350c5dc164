"""`--config FILE.yaml`, `--effective-batch` and the start checks of pretrain and finetune;
every recipe in recipes/ parses as a command line, and the paper's pretraining recipe trains."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from click.core import ParameterSource
from click.testing import CliRunner
from conftest import DINO_TINY

from mrmae.cli import cli
from mrmae.train.config import pretrain_config
from mrmae.extract.config import ExtractConfig
from mrmae.extract.runner import run_extraction
from mrmae.shared.errors import OptionError
from mrmae.shared.options import config_from
from mrmae.shared.views import ViewConfig
from mrmae.train.downstream.config import FinetuneConfig
from mrmae.train.downstream.finetune import check_numbers as check_finetune_numbers
from mrmae.train.pretrain import check_options
from mrmae.train.run.loop import resolve_accum_steps

RECIPES = Path(__file__).parents[1] / "recipes"
TINY = ["--model", "mrmae_vit_tiny_patch16", "--decoder-depth", "1", "--decoder-dim", "32", "--workers", "0",
        "--no-progress", "--seed", "3"]


def mrmae(args: list[str]):
    """The real CLI in this process -> (exit code, stderr lines that are not warnings or notes, result)."""
    r = CliRunner().invoke(cli, args)
    return r.exit_code, [ln for ln in r.stderr.splitlines()
                         if ln.strip() and not ln.startswith(("mrmae: warning", "mrmae: note"))], r


@pytest.fixture(scope="module")
def cache(demo_shards, tmp_path_factory) -> Path:
    """DINO-tiny targets for the 6 images of the first demo shard, one view each."""
    out = tmp_path_factory.mktemp("cache") / "c"
    run_extraction(ExtractConfig(shards=str(demo_shards[0]), out=str(out), teacher=DINO_TINY,
                                 views=ViewConfig(per_image=1, seed=3), batch_size=6, progress=False))
    return out


@pytest.fixture(scope="module")
def student(tmp_path_factory) -> Path:
    from test_finetune import save_small_student

    out = tmp_path_factory.mktemp("student")
    save_small_student(out)
    return out


# --- hostile config files: one line naming the file, exit 2, nothing written ---

HOSTILE = {
    "missing": (None, "no such file"),
    "directory": ("DIR", "is a directory"),
    "not-yaml": ("epochs: 2\nmask: [focused\n", "line 3: not YAML: while parsing a flow sequence"),
    "not-utf8": (b"epochs: \xff\n", "not UTF-8 text (byte 8)"),
    "a-list": ("- epochs\n- 2\n", "is a list, not a mapping of options"),
    "a-scalar": ("epochs\n", "is a str, not a mapping of options"),
    "empty": ("# only a comment\n", "is empty, not a mapping of options"),
    "nested": ("epochs: 2\nmodel:\n  name: mrmae_vit_tiny_patch16\n", "line 2: model: a nested mapping"),
    "nested-list": ("fuse-layers: [[4, 8], 12]\n", "line 1: fuse-layers: a list; give a number"),
    "no-value": ("lr:\n", "line 1: lr: has no value"),
    "unknown": ("epochs: 2\nepoch: 3\n", "line 2: epoch: not an option of mrmae pretrain (did you mean epochs?)"),
    "other-command": ("layer-decay: 0.6\n", "line 1: layer-decay: not an option of mrmae pretrain"),
    "twice": ("fuse-layers: 4,8,12\nepochs: 1\nfuse_layers: [4, 8, 12]\n",
              "line 3: fuse_layers: given twice (also as fuse-layers on line 1)"),
    "twice-verbatim": ("epochs: 1\nepochs: 2\n", "line 2: epochs: given twice (also on line 1)"),
    "bad-value": ("epochs: many\n", "line 1: Invalid value for '--epochs': 'many' is not a valid integer"),
    "bad-choice": ("mask: circle\n", "line 1: Invalid value for '--mask': circle: unknown (known: block, focused, random)"),
    "bad-list": ("fuse-layers: [4, x]\n", "line 1: Invalid value for '--fuse-layers': '4,x'"),
    "include": ("config: other.yaml\n", "line 1: config: a config file cannot name another (no includes)"),
    "too-big": ("#" * (1 << 20) + "\n", "over 1 MiB"),
    "python-object": ("model: !!python/object/apply:os.system ['touch PWNED']\n",
                      "line 1: not YAML: could not determine a constructor for the tag "
                      "'tag:yaml.org,2002:python/object/apply:os.system'"),
    "python-name": ("model: !!python/name:os.system\n", "could not determine a constructor"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_config_file_is_one_line_and_nothing_is_written(demo_shards, tmp_path, monkeypatch, case):
    content, expected = HOSTILE[case]
    monkeypatch.chdir(tmp_path)  # where the os.system payload would have touched PWNED
    path = tmp_path / "run.yaml"
    if content == "DIR":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    out = tmp_path / "run"
    code, errors, r = mrmae(["pretrain", "--config", str(path), "--shards", str(demo_shards[0]), "--out", str(out),
                             *TINY])
    assert code == 2 and len(errors) == 1, r.output
    assert errors[0].startswith(f"mrmae: error: {path}: ") and expected in errors[0], errors[0]
    assert not out.exists() and not (tmp_path / "PWNED").exists()


def test_unknown_key_names_the_command(student, demo_shards, tmp_path):
    path = tmp_path / "ft.yaml"
    path.write_text("mask: focused\n")  # a pretrain option
    out = tmp_path / "ft"
    code, errors, r = mrmae(["finetune", "--config", str(path), "--checkpoint", str(student), "--shards",
                             str(demo_shards[0]), "--val-shards", str(demo_shards[1]), "--out", str(out)])
    assert code == 2 and errors == [f"mrmae: error: {path}: line 1: mask: not an option of mrmae finetune"], r.output
    assert not out.exists()


# --- precedence and list values (click's parser alone) ---

def parse(command: str, args: list[str]):
    return cli.commands[command].make_context(command, args)


def test_command_line_overrides_the_file_and_lists_become_comma_lists(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("epochs: 400\nwarmup_epochs: 80\nfuse-layers: [4, 8, 11]\ntarget: [main, dino-b16]\n"
                    "mask: focused\nresume: true\nblr: 1.5e-4\nlr: 1e-3\n")
    ctx = parse("pretrain", ["--config", str(path), "--shards", "s.tar", "--out", "o", "--epochs", "7"])
    p = ctx.params
    assert p["epochs"] == 7 and ctx.get_parameter_source("epochs") == ParameterSource.COMMANDLINE
    assert p["warmup_epochs"] == 80 and ctx.get_parameter_source("warmup_epochs") == ParameterSource.DEFAULT_MAP
    assert p["fuse_layers"] == (4, 8, 11) and p["target"] == "main,dino-b16"  # through --fuse-layers' callback
    assert p["mask"] == "focused" and p["resume"] is True and p["blr"] == 1.5e-4 and p["lr"] == 1e-3
    assert p["decoder_depth"] == 8 and ctx.get_parameter_source("decoder_depth") == ParameterSource.DEFAULT
    assert p["config_file"].path == str(path.resolve())
    assert p["config_file"].sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    ctx = parse("pretrain", ["--shards", "s.tar", "--out", "o", "--fuse-layers", "4,8,12", "--config", str(path)])
    assert ctx.params["fuse_layers"] == (4, 8, 12)  # the command line wins wherever --config stands


# --- every recipe is a command line that passes the start checks ---

@pytest.mark.parametrize("recipe", sorted(p.name for p in RECIPES.glob("*.yaml")))
def test_recipe_parses_and_passes_the_start_checks(recipe, tmp_path):
    path = RECIPES / recipe
    command = "finetune" if "finetune" in recipe else "pretrain"
    head = path.read_text().split("\n\n")[0]  # the leading comments: table row, command line, cache
    assert head.startswith("# ") and ("Table" in head.splitlines()[0] or "paper" in head.splitlines()[0]), head
    assert f"mrmae {command} --config {Path(recipe).stem}" in head and "Cache it needs" in head, head
    if command == "pretrain":
        cached = ["--feature-cache", "CACHE"] if "--feature-cache CACHE" in head else []  # as its comment says
        ctx = parse(command, ["--config", str(path), "--shards", "s.tar", *cached, "--out", str(tmp_path / "o")])
        cfg = pretrain_config(ctx.params)
        check_options(cfg)  # the model exists, --fuse-layers fit its depth, the numbers are in range
    else:
        ctx = parse(command, ["--config", str(path), "--checkpoint", str(tmp_path), "--shards", "t.tar",
                              "--val-shards", "v.tar", "--out", str(tmp_path / "o")])
        cfg = config_from(FinetuneConfig, ctx.params)
        check_finetune_numbers(cfg)
    assert cfg.effective_batch == 1024 and cfg.accum_steps is None
    assert [resolve_accum_steps(cfg.batch_size, None, 1024, n) for n in (1, 2, 4, 8)] == [8, 4, 2, 1]


def test_paper_pretrain_recipe_trains_one_step_with_tiny_overrides(demo_shards, cache, tmp_path):
    recipe = RECIPES / "paper-pretrain-convvit-base.yaml"
    out = tmp_path / "run"
    code, errors, r = mrmae(["pretrain", "--config", str(recipe), "--shards", str(demo_shards[0]),
                             "--feature-cache", str(cache), "--out", str(out), "--model", "mrmae_convvit_tiny",
                             "--decoder-dim", "64", "--decoder-depth", "1", "--epochs", "1", "--warmup-epochs", "0",
                             "--effective-batch", "6", "--batch-size", "3", "--workers", "0", "--no-progress"])
    assert code == 0 and not errors, r.output + repr(r.exception)
    steps = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in steps] == [1] and steps[0]["loss_mimic"] > 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["config_file"] == {"path": str(recipe.resolve()),
                                  "sha256": hashlib.sha256(recipe.read_bytes()).hexdigest()}
    # the command line's values ...
    assert (cfg["model"], cfg["epochs"], cfg["warmup_epochs"], cfg["batch_size"]) == ("mrmae_convvit_tiny", 1, 0, 3)
    assert (cfg["effective_batch"], cfg["accum_steps"], cfg["decoder_dim"]) == (6, 2, 64)
    # ... and the recipe's, resolved
    assert cfg["fuse_layers"] == [4, 8, 11] and cfg["blr"] == 1.5e-4 and cfg["weight_decay"] == 0.05
    assert cfg["step_options"]["mask"] == "focused" and cfg["step_options"]["mask_ratio"] == 0.75
    assert cfg["target"] == "main" and cfg["lr"] == pytest.approx(1.5e-4 * 6 / 256)  # the lr as resolved
    assert cfg["lr_rule"] == "--blr 0.00015 x 6 / 256" and cfg["provenance"]["argv"][1:3] == ["pretrain", "--config"]


def test_finetune_reads_a_config_file_and_derives_accumulation(student, demo_shards, tmp_path):
    path = tmp_path / "ft.yaml"
    path.write_text("num-classes: 16\nepochs: 3\nwarmup-epochs: 0.5\neffective-batch: 8\nbatch-size: 4\n"
                    "lr: 1.0e-3\naugment: light\neval-batch-size: 8\nworkers: 0\nseed: 3\n")
    out = tmp_path / "ft"
    code, errors, r = mrmae(["finetune", "--config", str(path), "--checkpoint", str(student), "--shards",
                             f"{demo_shards[0]}::{demo_shards[1]}", "--val-shards", str(demo_shards[2]),
                             "--out", str(out), "--epochs", "1", "--no-progress"])
    assert code == 0 and not errors, r.output + repr(r.exception)
    steps = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in steps if "loss" in m] == [1]  # 12 images, 8 per step, full steps only
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["epochs"], cfg["num_classes"], cfg["accum_steps"], cfg["effective_batch"]) == (1, 16, 2, 8)
    assert cfg["augment"] == "light" and cfg["config_file"]["path"] == str(path.resolve())


# --- --effective-batch ---

def test_effective_batch_gives_the_accumulation_steps_or_is_refused():
    assert resolve_accum_steps(128, None, 1024, 8) == 1 and resolve_accum_steps(128, None, 1024, 1) == 8
    assert resolve_accum_steps(128, 8, 1024, 1) == 8  # --accum-steps agreeing with it is fine
    assert resolve_accum_steps(64, None, None, 4) == 1 and resolve_accum_steps(64, 3, None, 4) == 3
    with pytest.raises(OptionError, match=r"^--effective-batch 1024: not a multiple of --batch-size 128 x 3 "
                                          r"processes = 384"):
        resolve_accum_steps(128, None, 1024, 3)
    with pytest.raises(OptionError, match=r"^--accum-steps 2: --effective-batch 1024 at --batch-size 128 x 1 "
                                          r"processes needs --accum-steps 8"):
        resolve_accum_steps(128, 2, 1024, 1)


# --- start checks: one line naming the option, the --out directory never created ---

@pytest.mark.parametrize("bad, expected", [
    (["--epochs", "2", "--warmup-epochs", "2"], "--warmup-epochs 2: must be below --epochs 2"),
    (["--warmup-epochs", "3"], "--warmup-epochs 3: must be below --epochs 1"),
    (["--lr", "0"], "--lr 0.0: must be a finite number above 0"),
    (["--blr", "0"], "--blr 0.0: must be a finite number above 0"),
    (["--batch-size", "8"], "--batch-size 8: 8 images per step (--batch-size 8 x --accum-steps 1 x 1 processes) "
                            "is more than the 6 samples of an epoch (counted in --shards)"),
    (["--effective-batch", "12", "--batch-size", "6"], "--effective-batch 12: 12 images per step (--batch-size 6 "
                                                       "x --accum-steps 2 x 1 processes) is more than the 6 samples"),
    (["CACHE", "--batch-size", "7"], "--batch-size 7: 7 images per step (--batch-size 7 x --accum-steps 1 x 1 "
                                     "processes) is more than the 6 samples of an epoch (counted in --feature-cache)"),
    (["--effective-batch", "10", "--batch-size", "4"], "--effective-batch 10: not a multiple of --batch-size 4"),
    (["--effective-batch", "8", "--batch-size", "4", "--accum-steps", "3"],
     "--accum-steps 3: --effective-batch 8 at --batch-size 4 x 1 processes needs --accum-steps 2"),
    (["--model", "mrmae_convvit_tiny", "--fuse-layers", "4,8,12"],
     "--fuse-layers 4,8,12: mrmae_convvit_tiny has 11 transformer blocks (stage 3)"),
    (["--fuse-layers", "4,8,11"], "--fuse-layers 4,8,11: mrmae_vit_tiny_patch16 has 12 blocks")])
def test_pretrain_start_checks(demo_shards, cache, tmp_path, bad, expected):
    bad = [a for b in bad for a in (["--feature-cache", str(cache)] if b == "CACHE" else [b])]
    out = tmp_path / "run"
    code, errors, r = mrmae(["pretrain", "--shards", str(demo_shards[0]), "--out", str(out), *TINY, *bad])
    assert code == 2 and len(errors) == 1 and errors[0].startswith(f"mrmae: error: {expected}"), r.output
    assert not out.exists()


def test_every_bad_option_of_a_command_is_reported_at_once(demo_shards, tmp_path):
    """click's own checks (types, ranges) together, then mrmae's (values, combinations)
    together: a line each, exit 2, nothing written."""
    out = tmp_path / "run"
    code, errors, r = mrmae(["pretrain", "--shards", str(demo_shards[0]), "--out", str(out), *TINY,
                             "--batch-size", "0", "--epochs", "0", "--mask", "focsed"])
    assert code == 2 and errors == [
        "mrmae: error: Invalid value for '--batch-size': 0 is not in the range x>=1.",
        "mrmae: error: Invalid value for '--epochs': 0 is not in the range x>=1.",
        "mrmae: error: Invalid value for '--mask': focsed: unknown; did you mean focused? (known: block, focused, "
        "random)"], r.output
    code, errors, r = mrmae(["pretrain", "--shards", str(demo_shards[0]), "--out", str(out), *TINY, "--lr", "nan",
                             "--warmup-epochs", "3", "--model", "mrmae_vit_tiny_patc16", "--mask", "focused"])
    assert code == 2 and errors == [
        "mrmae: error: --lr nan: must be a finite number above 0",
        "mrmae: error: --warmup-epochs 3: must be below --epochs 1 (a warm-up of the whole run or longer never "
        "reaches the peak lr)",
        "mrmae: error: --model mrmae_vit_tiny_patc16: unknown; did you mean mrmae_vit_tiny_patch16? (known: "
        "mrmae_vit_tiny_patch16, mrmae_vit_small_patch16, mrmae_vit_base_patch16, mrmae_vit_large_patch16, "
        "mrmae_vit_huge_patch16, mrmae_convvit_tiny, mrmae_convvit_small, mrmae_convvit_base, mrmae_convvit_large, "
        "mrmae_convvit_huge)",
        "mrmae: error: --mask focused needs teacher attention: give --feature-cache or --teacher"], r.output
    assert not out.exists()


def test_a_default_warmup_longer_than_the_run_is_shortened_with_a_note(student, demo_shards, tmp_path):
    """finetune's 5 warm-up epochs (MAE's 5 of 100) in a 2-epoch run: 5% of it, with one note;
    the same 5 given on the command line is refused (below)."""
    out = tmp_path / "ft"
    code, errors, r = mrmae(["finetune", "--checkpoint", str(student), "--shards", f"{demo_shards[0]}::{demo_shards[1]}",
                             "--val-shards", str(demo_shards[2]), "--out", str(out), "--num-classes", "16",
                             "--epochs", "2", "--batch-size", "4", "--augment", "light", "--no-progress",
                             "--workers", "0"])
    notes = [ln for ln in r.stderr.splitlines() if ln.startswith("mrmae: note: --warmup-epochs")]
    assert code == 0 and notes == ["mrmae: note: --warmup-epochs 5 (not given on the command line) is as long as this "
                                   "2-epoch run; warming up for 0.1 epochs instead, its share of the 100 epochs it "
                                   "was set for"], r.output
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["warmup_epochs"] == pytest.approx(0.1) and cfg["warmup_steps"] == int(0.1 * cfg["steps_per_epoch"])


@pytest.mark.parametrize("bad, expected", [
    (["--epochs", "5", "--warmup-epochs", "5"], "--warmup-epochs 5: must be below --epochs 5"),
    (["--lr", "0"], "--lr 0.0: must be a finite number above 0"),
    (["--batch-size", "8"], "--batch-size 8: 8 images per step (--batch-size 8 x --accum-steps 1 x 1 processes) "
                            "is more than the 6 samples of an epoch (usable labelled samples in --shards)"),
    (["--effective-batch", "10", "--batch-size", "4"], "--effective-batch 10: not a multiple of --batch-size 4"),
    (["--effective-batch", "8", "--batch-size", "4", "--accum-steps", "1"], "--accum-steps 1: --effective-batch 8")])
def test_finetune_start_checks(student, demo_shards, tmp_path, bad, expected):
    out = tmp_path / "ft"
    code, errors, r = mrmae(["finetune", "--checkpoint", str(student), "--shards", str(demo_shards[0]),
                             "--val-shards", str(demo_shards[1]), "--out", str(out), "--num-classes", "16",
                             "--no-progress", "--workers", "0", *bad])
    assert code == 2 and len(errors) == 1 and errors[0].startswith(f"mrmae: error: {expected}"), r.output
    assert not out.exists()

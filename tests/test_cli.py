"""The command line: one vocabulary, --help in sections with an example for every command,
the old spellings still accepted with one warning line, `python -m mrmae` runs."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import warnings
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from mrmae import __version__
from mrmae.cli import cli
from mrmae.cli_help import SECTIONS
from mrmae.shared.options import default_workers

ROOT = Path(__file__).resolve().parents[1]


def _commands(command: click.Command = cli, path: tuple[str, ...] = ()):
    """(path, command) of the group and every command and subcommand under it."""
    yield path, command
    if isinstance(command, click.Group):
        for name, sub in command.commands.items():
            yield from _commands(sub, (*path, name))


COMMANDS = dict(_commands())


@pytest.mark.parametrize("path", list(COMMANDS), ids=lambda p: " ".join(p) or "mrmae")
def test_help_describes_every_option_under_a_section_and_ends_with_an_example(path):
    command = COMMANDS[path]
    r = CliRunner().invoke(cli, [*path, "--help"])
    assert r.exit_code == 0 and r.output.startswith("Usage:"), r.output
    ctx = click.Context(command, info_name=path[-1] if path else "mrmae", help_option_names=["-h", "--help"])
    for param in command.get_params(ctx):
        if isinstance(param, click.Option):
            assert (param.help or "").strip(), f"mrmae {' '.join(path)} {param.opts[0]}: no help text"
            assert command.section_of(ctx, param) in SECTIONS, f"{param.opts[0]}: no section"
            shown = command.help_record(ctx, param)[0]
            assert not any(re.search(rf"{re.escape(old)}\b", shown) for old in command.renamed), shown
    heading = None
    for line in r.output.splitlines():
        if re.fullmatch(r"[A-Z][A-Za-z ]*:", line):
            heading = line[:-1]
        elif heading is not None and line.startswith("  -"):  # an option's first line (after the description)
            assert heading in SECTIONS, f"{line.strip()} is under {heading!r}"
    assert heading is not None, r.output
    examples = r.output.split("Example", 1)[-1].splitlines()[1:]
    assert any(ln.strip().startswith(" ".join(("mrmae", *path))) for ln in examples), r.output


def test_version_and_module_entry_point():
    """The version, and in this checkout (the package's folder is the repository's root) the
    revision `git describe` gives; an installed wheel prints no revision (tests/test_wheel.py)."""
    top = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty", "--abbrev=12"],
                         capture_output=True, text=True)
    rev = f" (git {top.stdout.strip()})" if top.returncode == 0 else ""
    assert CliRunner().invoke(cli, ["--version"]).output.strip() == f"mrmae {__version__}{rev}"
    r = subprocess.run([sys.executable, "-m", "mrmae", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "extract-features" in r.stdout


# --- the README, the Makefile's demo and the recipes speak the current vocabulary ---


def _shell_lines(text: str) -> list[str]:
    """Logical lines (backslash continuations joined) of the text."""
    return re.sub(r"\\\n", " ", text).splitlines()


def _documented_commands() -> list[tuple[str, list[str]]]:
    """(where, tokens after `mrmae`) of every mrmae command line in README.md's shell blocks,
    the Makefile's demo target and the recipes' comments."""
    found = []
    readme = (ROOT / "README.md").read_text()
    for lang, block in re.findall(r"^```(\w*)\n(.*?)^```", readme, re.S | re.M):
        if lang in ("", "sh", "bash", "console"):
            found += [("README.md", line) for line in _shell_lines(block)]
    make = (ROOT / "Makefile").read_text().split("\ndemo:", 1)[1].split("\n\n", 1)[0]
    found += [("Makefile", line.replace("$(MRMAE)", "mrmae").replace("$(DEMO)", "demo"))
              for line in _shell_lines(make)]
    for recipe in sorted((ROOT / "recipes").glob("*.yaml")):
        comments = "\n".join(ln[1:].strip() if ln.startswith("#") else "" for ln in recipe.read_text().splitlines())
        found += [(recipe.name, line) for line in _shell_lines(comments)]
    commands = []
    for where, line in found:
        if not re.match(r"\s*(mrmae|torchrun|accelerate) ", line):  # (prose, variables, other tools)
            continue
        tokens = shlex.split(line, comments=True)
        if "mrmae" in tokens and tokens.index("mrmae") + 1 < len(tokens):
            commands.append((where, tokens[tokens.index("mrmae") + 1:]))
    return commands


def test_documented_commands_use_current_option_names():
    commands = _documented_commands()
    assert len(commands) > 40 and {w for w, _ in commands} >= {"README.md", "Makefile", "table4-joint.yaml"}
    for where, tokens in commands:
        command, i = cli, 0
        while isinstance(command, click.Group) and i < len(tokens) and tokens[i] in command.commands:
            command, i = command.commands[tokens[i]], i + 1
        name = " ".join(tokens[:i])
        assert not isinstance(command, click.Group), f"{where}: mrmae {' '.join(tokens)}: no such command"
        known = {o for p in command.params for o in (*p.opts, *getattr(p, "secondary_opts", ()))}
        for flag in (t.split("=", 1)[0] for t in tokens[i:] if t.startswith("--")):
            assert flag in known, f"{where}: mrmae {name} has no option {flag}"
            assert flag not in command.renamed, f"{where}: mrmae {name} {flag} is the old spelling of " \
                                                f"{command.renamed[flag]}"


# --- old spellings, --out as a directory, the machine's worker count ---


def test_unknown_teacher_is_one_line(tmp_path, demo_shards):
    r = CliRunner().invoke(cli, ["extract-features", "--shards", str(demo_shards[0]), "--feature-cache",
                                 str(tmp_path / "c"), "--teacher", "sam:vit_b"])
    assert r.exit_code == 1 and r.output.strip().splitlines() == [
        "mrmae: error: unknown teacher spec 'sam:vit_b': expected clip:ARCH[@WEIGHTS] or dino:TIMM_NAME[@WEIGHTS]"]


def test_cache_info_on_a_directory_that_is_no_cache(tmp_path):
    r = CliRunner().invoke(cli, ["cache", "info", "--feature-cache", str(tmp_path)])
    assert r.exit_code == 1 and "not a feature cache" in r.output and str(tmp_path) in r.output


def test_old_spellings_still_work_with_one_warning_line(tmp_path, demo_shards):
    r = CliRunner().invoke(cli, ["extract-features", "--shards", str(demo_shards[0]), "--out", str(tmp_path / "c"),
                                 "--teacher", "sam:vit_b"])
    assert r.exit_code == 1 and r.stderr.splitlines() == [
        "mrmae: warning: --out is now --feature-cache",
        "mrmae: error: unknown teacher spec 'sam:vit_b': expected clip:ARCH[@WEIGHTS] or dino:TIMM_NAME[@WEIGHTS]"]
    r = CliRunner().invoke(cli, ["cache", "info", str(tmp_path)])  # the positional cache of old
    assert r.exit_code == 1 and r.stderr.splitlines()[0] == "mrmae: warning: a positional CACHE is now " \
                                                            "--feature-cache CACHE", r.output
    assert len(r.stderr.splitlines()) == 2 and "not a feature cache" in r.stderr
    r = CliRunner().invoke(cli, ["cache", "info", str(tmp_path), "--feature-cache", str(tmp_path)])
    assert r.exit_code == 2 and r.stderr.splitlines()[-1] == "mrmae: error: give --feature-cache once (the " \
                                                             "positional CACHE is its old spelling)"
    for command in (["eval", "knn"], ["finetune", "--out", str(tmp_path / "ft")]):
        r = CliRunner().invoke(cli, [*command, "--checkpoint", str(tmp_path / "none"), "--train-shards", "a.tar",
                                     "--val-shards", "b.tar"])
        assert r.exit_code == 2 and r.stderr.splitlines()[0] == "mrmae: warning: --train-shards is now --shards"
        assert len(r.stderr.splitlines()) == 2 and "'--checkpoint'" in r.stderr
    r = CliRunner().invoke(cli, ["make-demo-shards", str(tmp_path / "s"), "--num-images", "2", "--shard-size", "2"])
    assert r.exit_code == 0 and (tmp_path / "s" / "demo-000000.tar").is_file()
    assert r.stderr.splitlines() == ["mrmae: warning: a positional OUT_DIR is now --out OUT_DIR"]
    r = CliRunner().invoke(cli, ["make-demo-shards", "--out", "s3://bucket/shards"])  # tars are written locally
    assert r.exit_code == 2 and r.stderr.splitlines() == [
        "mrmae: error: --out s3://bucket/shards: a local directory (write there, then upload, e.g. "
        "`aws s3 cp --recursive DIR s3://bucket/shards/`)"]


def test_an_old_config_key_is_its_option_with_a_warning(tmp_path, capsys):
    finetune = cli.commands["finetune"]
    args = ["--checkpoint", str(tmp_path), "--val-shards", "v.tar", "--out", str(tmp_path / "o")]
    (tmp_path / "old.yaml").write_text("train-shards: t.tar\n")
    ctx = finetune.make_context("finetune", ["--config", str(tmp_path / "old.yaml"), *args])
    assert ctx.params["train_shards"] == "t.tar"
    assert capsys.readouterr().err == "mrmae: warning: the config key train-shards is now shards\n"
    (tmp_path / "both.yaml").write_text("shards: t.tar\ntrain_shards: u.tar\n")
    with pytest.raises(click.UsageError, match="line 2: train_shards: given twice"):
        finetune.make_context("finetune", ["--config", str(tmp_path / "both.yaml"), *args])


def test_export_out_is_a_directory_and_a_file_path_is_one_line(tmp_path):
    r = CliRunner().invoke(cli, ["export", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "e.safetensors")])
    assert r.exit_code == 2 and r.stderr.splitlines() == [
        f"mrmae: error: Invalid value for '--out': {tmp_path / 'e.safetensors'}: --out is a directory, into which "
        f"this command writes model.safetensors (e.g. --out {tmp_path} writes {tmp_path / 'model.safetensors'})"]


def test_workers_default_to_the_cores_each_local_process_may_use(monkeypatch):
    cores = len(os.sched_getaffinity(0))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert default_workers() == min(8, cores)
    shown = " ".join(CliRunner().invoke(cli, ["pretrain", "--help"]).output.split())
    assert f"[default: (cores per process, here {min(8, cores)}); x>=0]" in shown
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # torchrun / accelerate: two processes on this machine
    assert default_workers() == max(1, min(8, cores // 2))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(4 * cores))
    assert default_workers() == 1


def test_the_default_worker_count_draws_no_pytorch_warning():
    import torch

    def warnings_of(workers: int) -> list[str]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert list(torch.utils.data.DataLoader(list(range(4)), num_workers=workers)) != []
        return [str(w.message) for w in caught if "worker" in str(w.message)]

    assert warnings_of(default_workers()) == []
    assert warnings_of(len(os.sched_getaffinity(0)) + 1)  # (one more than the cores: the warning this avoids)

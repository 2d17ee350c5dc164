"""What a new user runs, as written: `make demo`, then the README's ```sh blocks in order in a
new shell, and every command's `--help` example. Each in a workspace of its own (a copy of
what `make demo` made), with `.venv` pointing at this environment, from the empty PATH of a
new shell: the README has to say how `mrmae` gets on it."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import click
import pytest

from mrmae.cli import cli
from mrmae.train.run.recipe import list_recipes, recipes_folder

ROOT = Path(__file__).resolve().parents[1]
BIN = str(Path(sys.prefix) / "bin")


def sh_blocks(text: str) -> list[tuple[int, str]]:
    """(line, body) of each ```sh block of a markdown text, indented ones (in lists) dedented."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        m = re.match(r"^(\s*)```sh\s*$", lines[i])
        if m:
            indent, start, body = len(m.group(1)), i + 1, []
            i += 1
            while not lines[i].strip().startswith("```"):
                body.append(lines[i][indent:])
                i += 1
            blocks.append((start, "\n".join(body)))
        i += 1
    return blocks


def demo_commands() -> list[str]:
    """The commands of the Makefile's `demo` target, as `make demo` runs them (mrmae on PATH)."""
    text = (ROOT / "Makefile").read_text()
    recipe = re.search(r"^demo:.*\n((?:\t.*\n)+)", text, re.M).group(1)
    joined = re.sub(r"\\\n\t\s*", " ", recipe)
    commands = []
    for line in joined.splitlines():
        line = line.strip()
        if line.startswith(("rm ", "@")):
            continue
        commands.append(line.replace("$(MRMAE)", "mrmae").replace("$(DEMO)", "demo"))
    return commands


def new_shell_env() -> dict:
    """The environment of a new shell: no virtualenv active, its bin folder not on PATH."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p and p != BIN)
    return env


def bash(script: str, cwd: Path, env: dict, timeout: int) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", "set -euo pipefail\n" + script], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def made_demo(tmp_path_factory) -> Path:
    """A folder as `make demo` leaves the repository: demo/ (shards, cache, run) and .venv."""
    ws = tmp_path_factory.mktemp("made-demo")
    (ws / ".venv").symlink_to(sys.prefix, target_is_directory=True)
    env = {**new_shell_env(), "PATH": f"{BIN}{os.pathsep}{new_shell_env()['PATH']}"}
    r = bash("\n".join(demo_commands()), ws, env, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return ws


def workspace(made_demo: Path, to: Path) -> Path:
    shutil.copytree(made_demo / "demo", to / "demo", symlinks=True)
    (to / ".venv").symlink_to(sys.prefix, target_is_directory=True)
    return to


def test_the_readme_sh_blocks_run_in_order_in_a_new_shell(made_demo, tmp_path):
    blocks = sh_blocks((ROOT / "README.md").read_text())
    assert len(blocks) >= 6
    ws = workspace(made_demo, tmp_path)
    script = "\n".join(f"echo '>>> README.md block at line {line}' >&2\n{body}" for line, body in blocks)
    r = bash(script, ws, new_shell_env(), timeout=1800)
    block = ([ln for ln in r.stderr.splitlines() if ln.startswith(">>> README.md")] or ["(none)"])[-1]
    assert r.returncode == 0, f"{block} failed:\n" + r.stdout[-2000:] + r.stderr[-4000:]
    # the splits block prints the same losses three times
    splits = [ln for ln in r.stdout.splitlines() if ln.startswith(("8x1 [", "4x2 [", "2x2x2 ["))]
    assert len(splits) == 3 and len({ln.split(" ", 1)[1] for ln in splits}) == 1, splits  # to the 4 decimals shown
    # the ablations on demo data: every recipe ran, and the report has a row per run
    report = (ws / "demo/t/report/report.md").read_text()
    assert len([ln for ln in report.splitlines() if ln.startswith("| ") and "demo/t/" in ln]) == 12, report
    assert "warming up for" in r.stderr  # the recipes' warm-ups shrank to one epoch, each with a note


def test_every_recipe_documents_a_demo_command_the_readme_runs():
    """Each recipe's header gives its command at demo scale, and the README's runnable blocks
    hold that command verbatim (so tests/test_readme.py runs every recipe)."""
    commands = {ln.strip() for _, body in sh_blocks((ROOT / "README.md").read_text()) for ln in body.splitlines()}
    for name, _ in list_recipes():
        text = (recipes_folder() / f"{name}.yaml").read_text().splitlines()
        i = next(i for i, ln in enumerate(text) if ln.startswith("# On demo data"))
        command = text[i + 1].removeprefix("#").strip()
        assert f"--config {name} " in command and command in commands, (name, command)


def examples() -> list[tuple[str, str]]:
    """(command path, example) of every command and group's --help, continuation lines joined."""
    found = []

    def walk(command: click.Command, path: str) -> None:
        epilog = command.epilog or ""
        if "Example" in epilog:
            body = epilog.split(":", 1)[1]
            for example in re.sub(r"\\\n\s*", " ", body).strip().splitlines():
                found.append((path, example.strip()))
        for name, sub in sorted(getattr(command, "commands", {}).items()):
            walk(sub, f"{path} {name}".strip())

    walk(cli, "")
    return found


# The order the examples run in (each may use what an earlier one wrote); every command with
# an example is in it, so a new command's example runs too.
ORDER = ["", "make-demo-shards", "shards", "shards index", "extract-features", "cache", "cache info", "cache verify", "cache clean", "models",
         "recipes", "save-teacher", "pretrain", "export", "finetune", "eval", "eval knn", "eval linear-probe",
         "eval ensemble", "visualize", "report"]


def test_every_help_example_runs_on_the_demo(made_demo, tmp_path):
    found = examples()
    assert {path for path, _ in found} == set(ORDER), {path for path, _ in found} ^ set(ORDER)
    ws = workspace(made_demo, tmp_path)
    env = {**new_shell_env(), "PATH": f"{BIN}{os.pathsep}{new_shell_env()['PATH']}"}
    ordered = sorted(found, key=lambda e: ORDER.index(e[0]))
    script = "\n".join(f"echo '>>> example of mrmae {path}' >&2\n{example}" for path, example in ordered)
    r = bash(script, ws, env, timeout=1500)
    where = ([ln for ln in r.stderr.splitlines() if ln.startswith(">>> example")] or ["(none)"])[-1]
    assert r.returncode == 0, f"{where} failed:\n" + r.stdout[-2000:] + r.stderr[-4000:]
    assert json.loads((ws / "demo/run-focused/config.json").read_text())["step_options"]["mask"] == "focused"
    assert (ws / "demo/report/report.md").is_file() and (ws / "demo/encoder/model.safetensors").is_file()

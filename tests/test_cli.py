"""The command line: every command has --help, --version works, `python -m mrmae` runs."""

from __future__ import annotations

import subprocess
import sys

import pytest
from click.testing import CliRunner

from mrmae import __version__
from mrmae.cli import cli

COMMANDS = [[], ["make-demo-shards"], ["extract-features"], ["cache"], ["cache", "info"], ["cache", "verify"]]


@pytest.mark.parametrize("cmd", COMMANDS, ids=lambda c: " ".join(c) or "mrmae")
def test_help(cmd):
    r = CliRunner().invoke(cli, cmd + ["--help"])
    assert r.exit_code == 0 and "Usage:" in r.output


def test_version_and_module_entry_point():
    assert CliRunner().invoke(cli, ["--version"]).output.strip() == f"mrmae, version {__version__}"
    r = subprocess.run([sys.executable, "-m", "mrmae", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "extract-features" in r.stdout


def test_unknown_teacher_is_one_line(tmp_path, demo_shards):
    r = CliRunner().invoke(cli, ["extract-features", "--shards", str(demo_shards[0]), "--out", str(tmp_path / "c"),
                                 "--teacher", "sam:vit_b"])
    assert r.exit_code == 1 and r.output.strip().splitlines() == [
        "mrmae: error: unknown teacher spec 'sam:vit_b': expected clip:ARCH[@WEIGHTS] or dino:TIMM_NAME[@WEIGHTS]"]


def test_cache_info_on_a_directory_that_is_no_cache(tmp_path):
    r = CliRunner().invoke(cli, ["cache", "info", str(tmp_path)])
    assert r.exit_code == 1 and "not a feature cache" in r.output and str(tmp_path) in r.output

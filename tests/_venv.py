"""Virtual environments for tests that run mrmae as users install it: made in a second,
reusing the packages of the environment running the tests (torch, timm, ... are gigabytes),
but not its mrmae.

The new environment's site-packages gets a .pth file naming this environment's
site-packages. Python appends that folder to sys.path but does not process the .pth files
inside it, and the editable install of mrmae is one of those (`__editable__.mrmae-*.pth`,
which activates its finder): so `import mrmae` fails in the new environment until a wheel
is installed there, while its dependencies import as here.
"""

from __future__ import annotations

import subprocess
import sys
import sysconfig
from pathlib import Path


def bare_venv(where: Path) -> Path:
    """A venv at `where` seeing this environment's packages but not mrmae -> its python."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(where)], check=True)
    python = where / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    Path(purelib, "_mrmae_test_base.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


def pip_install(python: Path, *args: str) -> None:
    """`pip install --no-deps --no-index ARGS` into the venv of `python`, with this
    environment's pip (the venv has none): nothing is downloaded, nothing else changes."""
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index",
                    *args], check=True, capture_output=True, text=True)

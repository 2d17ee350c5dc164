"""Virtual environments for tests that run what users run without this checkout: the wheel
installed (tests/test_wheel.py), or timm alone loading an export (tests/test_export.py).
Made in a second with `python -m venv --without-pip` (nothing is downloaded), they reuse the
packages of the environment running the tests (torch, timm, ...: gigabytes) but not its mrmae.

One .pth file in the new site-packages lists every site-packages directory this interpreter
imports from (its own, and any a .pth of its own added). Python adds each line of a .pth to
sys.path but reads no .pth file inside a directory so added, and the editable install of
mrmae is activated by one (`__editable__.mrmae-*.pth`, its finder): so `import mrmae` fails
in the new environment, which `venv_without_mrmae` checks before handing it over.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def site_dirs() -> list[str]:
    """The site-packages directories on this interpreter's sys.path, in order."""
    return [p for p in sys.path if os.path.basename(p.rstrip(os.sep)) == "site-packages" and os.path.isdir(p)]


def venv_without_mrmae(root: Path, env: dict | None = None) -> Path:
    """A venv at `root` that imports this environment's packages but not mrmae -> its
    python (AssertionError if mrmae imports there)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True, timeout=120)
    python = root / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True, timeout=60).stdout.strip()
    Path(site, "_mrmae_test_packages.pth").write_text("".join(f"{d}\n" for d in site_dirs()))
    probe = subprocess.run([str(python), "-c", "import timm, torch\ntry:\n import mrmae\nexcept ImportError:\n"
                            " print('no mrmae')\nelse:\n print(mrmae.__file__)"],
                           capture_output=True, text=True, timeout=300, cwd=root, env=env)
    assert probe.returncode == 0 and probe.stdout.strip() == "no mrmae", probe.stdout + probe.stderr
    return python


def pip_install(python: Path, *args: str) -> None:
    """`pip install --no-deps --no-index ARGS` into the venv of `python`, with this
    environment's pip (the venv has none): nothing is downloaded, nothing else changes."""
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index",
                    *args], check=True, capture_output=True, text=True)

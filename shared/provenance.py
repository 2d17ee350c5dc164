"""What made a run or a cache: the package version and, in a git checkout, its revision;
the versions of the libraries whose code computes the numbers; the command line, host and
devices. `mrmae --version` prints the first two; `config.json` records all of it.
"""

from __future__ import annotations

import platform
import socket
import subprocess
import sys
import time
from functools import lru_cache
from importlib import metadata
from pathlib import Path

_COMMAND: list[str] = []  # the command line as the CLI parsed it (`record_command`)
LIBRARIES = ("torch", "torchvision", "timm", "open_clip_torch", "accelerate", "webdataset", "zarr", "numpy")


@lru_cache(maxsize=1)
def revision() -> str | None:
    """`git describe --always --dirty` of the package's folder when that folder is the root
    of a git checkout (an editable install or `python -m mrmae` from a clone); None for an
    installed wheel, even one inside another project's repository."""
    root = Path(__file__).resolve().parents[1]
    try:
        top = subprocess.run(["git", "-C", str(root), "rev-parse", "--show-toplevel"], capture_output=True,
                             text=True, timeout=5)
        if top.returncode or Path(top.stdout.strip()).resolve() != root:
            return None
        described = subprocess.run(["git", "-C", str(root), "describe", "--always", "--dirty", "--abbrev=12"],
                                   capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return described.stdout.strip() or None if described.returncode == 0 else None


def version_line() -> str:
    """`mrmae --version`: 'mrmae 0.1.0' and, in a checkout, '(git 1a2b3c4d5e6f-dirty)'."""
    from mrmae import __version__

    rev = revision()
    return f"mrmae {__version__}" + (f" (git {rev})" if rev else "")


def record_command(args: list[str]) -> None:
    """Keep the arguments the `mrmae` command line is parsing (called by the CLI's group)."""
    _COMMAND[:] = ["mrmae", *args]


def library_versions() -> dict[str, str | None]:
    """The installed version of each of LIBRARIES (None where one is not installed)."""
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def provenance(devices: list[str]) -> dict:
    """The `provenance` block of a run's config.json: mrmae version and revision, python and
    library versions, the command line, host, devices (e.g. ['cuda:0 NVIDIA H200', ...] or
    ['cpu']) and the start time (UTC)."""
    from mrmae import __version__

    return {"mrmae": __version__, "revision": revision(), "python": platform.python_version(),
            "libraries": library_versions(), "argv": list(_COMMAND or sys.argv), "executable": sys.executable,
            "host": socket.gethostname(),
            "platform": platform.platform(), "devices": devices,
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}

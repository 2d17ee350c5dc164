"""A virtualenv without mrmae that still has the installed torch, timm and their dependencies:
for tests of what a user of timm alone sees (e.g. loading an `mrmae export` folder).

`python -m venv --without-pip` (a second or two; nothing is downloaded), then one `.pth` file in
its site-packages listing the directories the running interpreter imports torch, timm,
huggingface_hub, safetensors, numpy, yaml and PIL from. Python adds each line of a `.pth` to
sys.path but reads no `.pth` file inside a directory so added, so mrmae's editable install
(activated by its own `.pth` in the main environment) stays out: `import mrmae` fails there,
which `venv_without_mrmae` checks before handing the interpreter over.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

PACKAGES = ("torch", "torchvision", "timm", "huggingface_hub", "safetensors", "numpy", "yaml", "PIL")


def package_dirs(names: tuple[str, ...] = PACKAGES) -> list[Path]:
    """The site directories this interpreter imports `names` from (each once, in that order)."""
    import importlib

    dirs: list[Path] = []
    for name in names:
        module = importlib.import_module(name)
        site = Path(module.__file__).resolve().parents[1]
        if site not in dirs:
            dirs.append(site)
    return dirs


def venv_without_mrmae(root: Path, env: dict | None = None) -> Path:
    """Create the virtualenv at `root`; its python (AssertionError if mrmae imports there)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True, timeout=120)
    python = root / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True, timeout=60).stdout.strip()
    Path(site, "installed-packages.pth").write_text("".join(f"{d}\n" for d in package_dirs()))
    probe = subprocess.run([str(python), "-c", "import timm, torch\ntry:\n import mrmae\nexcept ImportError:\n"
                            " print('no mrmae')\nelse:\n print(mrmae.__file__)"],
                           capture_output=True, text=True, timeout=300, cwd=root, env=env)
    assert probe.returncode == 0 and probe.stdout.strip() == "no mrmae", probe.stdout + probe.stderr
    return python

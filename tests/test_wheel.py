"""mrmae as `pip install` gives it: the wheel built from this tree, installed (not editable)
into a fresh virtualenv, run from an empty directory outside the repository. A module or
data file the wheel leaves out (once: every masking strategy, `train/masks/`) fails here,
which `make test`'s editable install never shows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from _venv import pip_install, venv_without_mrmae

from mrmae.train.masking import mask_names
from mrmae.train.run.recipe import list_recipes
from mrmae.train.students.registry import families

ROOT = Path(__file__).resolve().parents[1]


def _source_tree(to: Path) -> Path:
    """The files a clone of this tree holds (tracked, and untracked ones git does not ignore:
    what `pip install .` of this checkout would build from), copied to `to`."""
    listed = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        src = ROOT / name
        if src.is_file():
            (to / name).parent.mkdir(parents=True, exist_ok=True)
            (to / name).write_bytes(src.read_bytes())
    return to


@pytest.fixture(scope="module")
def wheel_env(tmp_path_factory) -> dict:
    """{python, bin, wheel, cwd}: the wheel built from this tree, installed in a bare venv,
    and an empty working directory outside the repository."""
    base = tmp_path_factory.mktemp("wheel")
    src = _source_tree(base / "src")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(base / "dist"), str(src)], check=True, capture_output=True, text=True)
    wheel = next((base / "dist").glob("mrmae-*.whl"))
    python = venv_without_mrmae(base / "venv")
    pip_install(python, str(wheel))
    (base / "empty").mkdir()
    return {"python": python, "bin": python.parent, "wheel": wheel, "cwd": base / "empty"}


def _run(env: dict, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    path = {**os.environ, "PATH": f"{env['bin']}{os.pathsep}{os.environ['PATH']}"}
    path.pop("PYTHONPATH", None)
    return subprocess.run(list(args), cwd=env["cwd"], env=path, capture_output=True, text=True, timeout=timeout)


def test_the_wheel_holds_every_package_and_recipe(wheel_env):
    """Every folder with an __init__.py and every recipe, found without a hand-written list;
    the package imports from the venv, not from the repository."""
    import zipfile

    names = set(zipfile.ZipFile(wheel_env["wheel"]).namelist())
    packages = {str(p.parent.relative_to(ROOT)) for p in ROOT.rglob("__init__.py")
                if not ({"tests", "benchmarks", "build"} & set(p.relative_to(ROOT).parts))
                and not any(part.startswith(".") for part in p.relative_to(ROOT).parts)}
    assert "train/masks" in packages and "shared/cache_format" in packages
    for package in packages:
        assert f"mrmae/{package}/__init__.py".replace("/./", "/") in names, package
    assert {f"mrmae/recipes/{name}.yaml" for name, _ in list_recipes()} <= names
    assert "mrmae/setup.py" not in names and not any(n.startswith(("mrmae/tests/", "mrmae/benchmarks/")) for n in names)
    r = _run(wheel_env, str(wheel_env["python"]), "-c", "import mrmae; print(mrmae.__file__)")
    assert r.stdout.strip().startswith(str(wheel_env["bin"].parent)), r.stdout + r.stderr


def test_the_console_script_lists_models_recipes_and_its_version(wheel_env):
    r = _run(wheel_env, "mrmae", "--version")
    assert r.returncode == 0 and r.stdout.strip() == "mrmae 0.1.0", r.stdout + r.stderr  # no revision: not a checkout
    r = _run(wheel_env, "mrmae", "models")
    assert r.returncode == 0 and "mrmae_convvit_base" in r.stdout and "mrmae_vit_tiny_patch16" in r.stdout, r.stderr
    r = _run(wheel_env, "mrmae", "recipes")
    assert r.returncode == 0 and [ln.split()[0] for ln in r.stdout.splitlines()[:-1]] == \
        [name for name, _ in list_recipes()], r.stdout


# Runs in the wheel's venv, in the empty directory: the commands a new user types, through
# the installed package's own `main(argv)`, one process for all of them (each `mrmae`
# process would spend seconds importing torch).
DRIVER = textwrap.dedent('''
    import json, sys
    from mrmae.cli import main
    from mrmae.train.masking import mask_names
    from mrmae.train.students.registry import families

    def mrmae(*args):
        try:
            main(list(args))
        except SystemExit as e:
            if e.code:
                raise SystemExit(f"mrmae {' '.join(args)}: exit {e.code}")

    shards, cache = "data/demo-000000.tar", "cache"
    mrmae("make-demo-shards", "--out", "data", "--num-images", "8", "--shard-size", "8")
    mrmae("extract-features", "--shards", shards, "--feature-cache", cache, "--teacher", "dino:vit_tiny_patch16_224",
          "--views", "1", "--batch-size", "8", "--workers", "0", "--no-progress")
    tiny = {family: next(n for n in f.archs if "tiny" in n) for family, f in families().items()}
    runs = [(mask, tiny["vit"]) for mask in mask_names()] + [("focused", m) for f, m in tiny.items() if f != "vit"]
    for mask, model in runs:
        mrmae("pretrain", "--shards", shards, "--feature-cache", cache, "--model", model, "--mask", mask,
              "--decoder-depth", "1", "--decoder-dim", "32", "--batch-size", "8", "--workers", "0", "--no-progress",
              *(["--mask-option", "block_min_patches=4"] if mask == "block" else []), "--out", f"runs/{mask}-{model}")
    mrmae("export", "--checkpoint", f"runs/random-{tiny['vit']}", "--out", "encoder")
    mrmae("eval", "knn", "--checkpoint", "encoder", "--shards", shards, "--val-shards", shards, "--k", "3",
          "--workers", "0", "--no-progress", "--results", "eval.jsonl")
    print(json.dumps({"masks": mask_names(), "families": list(families()), "runs": runs}))
''')


def test_the_installed_wheel_extracts_pretrains_with_every_mask_and_family_exports_and_evaluates(wheel_env):
    """From the empty directory: demo shards, a tiny extraction, one pretraining step per
    registered mask and per student family, an export and a kNN eval, all by the installed
    wheel; its registries hold what this tree's do."""
    (wheel_env["cwd"] / "driver.py").write_text(DRIVER)
    r = _run(wheel_env, str(wheel_env["python"]), "driver.py", timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    done = json.loads(r.stdout.splitlines()[-1])
    assert done["masks"] == mask_names() and done["families"] == list(families())
    cwd = wheel_env["cwd"]
    for mask, model in done["runs"]:
        metrics = [json.loads(ln) for ln in (cwd / "runs" / f"{mask}-{model}" / "metrics.jsonl").read_text().splitlines()]
        assert [m["step"] for m in metrics] == [1] and metrics[0]["loss_mimic"] > 0, (mask, model)
    assert (cwd / "encoder" / "model.safetensors").is_file()
    result = json.loads((cwd / "eval.jsonl").read_text().splitlines()[-1])
    assert 0 <= result["top1"] <= 100

"""A plug-in installed outside mrmae (a distribution with entry points, its dist-info on the
path as pip leaves it) adds a third mask, a teacher kind and a student family, each one
file, and every command reaches them: `mrmae models`, `pretrain --help` (the mask's own flag
from its registration), extraction with the plug-in teacher, `cache info` (which imports no
teacher), and pretraining with all three."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from test_teachers import TOY_KIND

PACKAGE = "mrmae_toyplug"
FILES = {
    "__init__.py": "",
    "teacher.py": TOY_KIND,  # the kind test_teachers.py adds by hand: "toy"
    "mask.py": '''
        import torch

        from mrmae.train.masking import MaskOption, masks_from_keep, num_visible, register_mask


        @register_mask("stripes", options=(MaskOption("stripe_width", 1.0, "Stripes masking: width of a stripe.",
                                                      low=1.0, label="w", flag="--stripe-width"),))
        def draw(noise, mask_ratio, attention, stripe_width=1.0):
            """Visible tokens: whole columns of `stripe_width` tokens, drawn by the noise."""
            b, n = noise.shape
            side = int(n ** 0.5)
            column = (torch.arange(n, device=noise.device) % side) // int(stripe_width)
            score = noise.gather(1, column.expand(b, -1)) + 1e-3 * noise
            keep = score.topk(num_visible(n, mask_ratio), dim=1).indices
            return masks_from_keep(keep, n)
        ''',
    "student.py": '''
        from mrmae.train.students.registry import register_family
        from mrmae.train.students.vit import ViTFamily

        ARCHS = {"mrmae_toyvit_tiny": dict(embed_dim=64, depth=2, num_heads=2)}


        @register_family
        class ToyViTFamily(ViTFamily):
            """A two-block ViT student under a name of its own."""

            name, rank, old_encoder_names = "toyvit", 50, ()
            archs = {n: dict(patch_size=16, **a) for n, a in ARCHS.items()}

            def stock_name(self, name):
                return None

            def encoder_defaults(self, name):
                return dict(img_size=224, patch_size=16, mlp_ratio=4.0, qkv_bias=True, class_token=True,
                            global_pool="token", **ARCHS[name])
        ''',
}
ENTRY_POINTS = """[mrmae.teachers]
toy = mrmae_toyplug.teacher

[mrmae.masks]
stripes = mrmae_toyplug.mask

[mrmae.students]
toyvit = mrmae_toyplug.student
"""


@pytest.fixture(scope="module")
def plugin_path(tmp_path_factory) -> Path:
    """A folder holding the plug-in and its dist-info, as `pip install --target` leaves them."""
    site = tmp_path_factory.mktemp("site")
    (site / PACKAGE).mkdir()
    for name, text in FILES.items():
        (site / PACKAGE / name).write_text(textwrap.dedent(text))
    info = site / f"{PACKAGE}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {PACKAGE}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(ENTRY_POINTS)
    return site


def mrmae(plugin_path: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(plugin_path), os.environ.get("PYTHONPATH", "")]),
           "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "mrmae", *args], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0 or not check, r.stdout + r.stderr
    return r


def test_an_installed_plugin_reaches_every_command(plugin_path, demo_shards, tmp_path):
    assert "mrmae_toyvit_tiny: ViT 64-d, 2 blocks" in mrmae(plugin_path, "models").stdout
    help_text = " ".join(mrmae(plugin_path, "pretrain", "--help").stdout.split())
    assert "--mask [block|focused|random|stripes]" in help_text
    assert "--stripe-width FLOAT Stripes masking: width of a stripe. [default: 1.0]" in help_text
    cache = tmp_path / "cache"
    mrmae(plugin_path, "extract-features", "--shards", str(demo_shards[0]), "--feature-cache", str(cache),
          "--teacher", "toy:vit_tiny_patch16_224", "--views", "1", "--batch-size", "6", "--workers", "0",
          "--no-progress")
    info = json.loads(mrmae(plugin_path, "cache", "info", "--feature-cache", str(cache), "--json").stdout)
    assert info["teacher"].startswith("toy:vit_tiny_patch16_224"), info
    out = tmp_path / "run"
    mrmae(plugin_path, "pretrain", "--shards", str(demo_shards[0]), "--feature-cache", str(cache), "--out", str(out),
          "--model", "mrmae_toyvit_tiny", "--decoder-depth", "1", "--decoder-dim", "32", "--mask", "stripes",
          "--stripe-width", "2", "--batch-size", "3", "--workers", "0", "--no-progress")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model"] == "mrmae_toyvit_tiny" and cfg["step_options"]["mask_options"]["stripe_width"] == 2.0
    steps = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(steps) == 2 and all(s["loss_mimic"] > 0 for s in steps)
    # without the plug-in on the path, its names are unknown, said in one line
    bare = subprocess.run([sys.executable, "-m", "mrmae", "pretrain", "--shards", str(demo_shards[0]), "--out",
                           str(tmp_path / "bare"), "--mask", "stripes"], capture_output=True, text=True, timeout=300)
    assert bare.returncode == 2 and "--mask" in bare.stderr and "stripes" in bare.stderr, bare.stderr

"""A plug-in installed outside mrmae (a distribution with entry points, its dist-info on the
path as pip leaves it) adds a third mask, a teacher kind, a student family and a cache
backend, each one file, and every command reaches them: `mrmae models`, `pretrain --help`
(the mask's own flag from its registration), extraction with the plug-in teacher, `cache
info` (which imports no teacher), pretraining with all three, and extraction, pretraining
and `cache verify` on a cache stored by the plug-in backend."""

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
    "backend.py": """        '''A cache backend in one file: each shard a folder `<name>.<sha>.npyd` of one .npy file per
        column, every file read whole at open and held to its entry's listed size and sha256.'''
        import io
        import os
        from pathlib import Path

        import numpy as np

        from mrmae.shared.cache_format import Backend, CacheError, group_files, register_backend
        from mrmae.shared.cache_format.common import (DigestColumn, check_rows, content_group, dequantize, int8_groups,
                                                      remove_path, stored_features, view_targets, writer_temp)
        from mrmae.shared.cache_format.listing import file_digest, read_regular
        from mrmae.shared.cache_format.location import publish_local
        from mrmae.shared.cache_format.manifest import check_row_count, group_name

        SUFFIX = ".npyd"


        class NpyWriter:
            def __init__(self, root, source, max_rows, dim, grid_len, dtype, layers=(), pixels=None, feature_dim=None,
                         int8_group=None):
                if layers or pixels:
                    raise CacheError(f"{source}: the npy backend stores neither layers nor views")
                self.root, self.source, self.dtype, self.int8_group = Path(root), source, dtype, int8_group
                self.name, self.rows = group_name(source), 0
                self.tmp = writer_temp(self.root / "shards", self.name, SUFFIX)
                self.digest = self.group_path = self.final = self.files = None
                width, groups = feature_dim or dim, int8_groups(feature_dim or dim, int8_group)
                int8 = dtype == "int8"
                self.cols = {"keys": [np.zeros(0, "U1")], "view": [np.zeros(0, np.int16)],
                             "crop": [np.zeros((0, 4), np.int32)], "flip": [np.zeros(0, bool)],
                             "attention": [np.zeros((0, grid_len), np.float16)], "cls": [np.zeros((0, dim), np.float16)],
                             "features": [np.zeros((0, grid_len, width), np.int8 if int8 else np.float16)]}
                if int8:
                    self.cols["features_scale"] = [np.zeros((0, grid_len) + ((groups,) if groups else ()), np.float16)]
                self.written, self.digests = [], DigestColumn(source)

            def append(self, keys, view, crop, flip, features, attention, cls, layers=None, pixels=None,
                       image_sha256=None):
                values, scale = stored_features(features, self.dtype, self.int8_group)
                row = {"keys": np.asarray(keys, dtype=str), "view": view.astype(np.int16), "crop": crop.astype(np.int32),
                       "flip": flip.astype(bool), "attention": attention.astype(np.float16),
                       "cls": cls.astype(np.float16), "features": values, "features_scale": scale}
                for name in self.cols:
                    self.cols[name].append(row[name])
                self.digests.add(image_sha256, len(keys))
                self.written += [(str(k), int(v)) for k, v in zip(keys, view)]
                self.rows += len(keys)

            def finish(self, attrs, expected=None):
                self.tmp.mkdir(parents=True)
                columns = {name: np.concatenate(parts) for name, parts in self.cols.items()}
                if self.digests.column() is not None:
                    columns["image_sha256"] = self.digests.column()
                for name, column in columns.items():
                    np.save(self.tmp / f"{name}.npy", column, allow_pickle=False)
                back = NpyShard(self.tmp, None)  # read back as a reader will
                check_rows(self.source, str(self.tmp), list(zip(back.keys.tolist(), back.views.tolist())),
                           self.written if expected is None else expected)
                digest, size, self.files = group_files(self.tmp)
                self.digest, self.group_path = (digest, size), content_group(self.name, digest, SUFFIX)
                self.final = self.root / self.group_path
                return self.digest

            def publish(self):
                return publish_local(self.tmp, self.final, self.digest[0])

            def abort(self):
                remove_path(self.tmp)


        class NpyShard:
            read_ahead = False

            def __init__(self, path, entry, shapes=None):
                self.path, self.entry = str(path), entry
                if not os.path.isdir(self.path):
                    raise CacheError(f"{self.path}: shard folder is missing")
                listed = entry.files if entry is not None and entry.files is not None else None
                names = listed.paths if listed is not None else sorted(os.listdir(self.path))
                self.cols = {}
                for name in names:
                    data = read_regular(os.path.join(self.path, name), limit=1 << 32)
                    if listed is not None and (len(data), file_digest(data)) != tuple(listed.get(name)):
                        raise CacheError(f"{self.path}: file {name}: size or sha256 differs from its entry's; "
                                         "run `mrmae cache verify --repair`")
                    self.cols[name.removesuffix(".npy")] = np.load(io.BytesIO(data), allow_pickle=False)
                self.keys, self.views = self.cols["keys"], self.cols["view"]
                check_row_count(self.path, entry, len(self.keys))
                for name, want in (shapes or {}).items():
                    if self.cols[name].shape[1:] != want:
                        raise CacheError(f"{self.path}: {name} rows of shape {list(self.cols[name].shape[1:])}, "
                                         f"the manifest gives {list(want)}")
                self.quantized = "features_scale" in self.cols
                self.index = {(str(k), int(v)): i for i, (k, v) in enumerate(zip(self.keys, self.views))}

            def __len__(self):
                return len(self.keys)

            def row(self, key, view):
                if (key, view) not in self.index:
                    raise CacheError(f"{self.path}: no row for key {key!r} view {view}")
                return self.index[(key, view)]

            def stored_row(self, i, layer="features"):
                return self.cols[layer][i], self.cols[f"{layer}_scale"][i] if self.quantized else None

            def read(self, rows, layer="features"):
                c = self.cols
                return {"keys": self.keys[rows], "view": self.views[rows], "crop": c["crop"][rows],
                        "flip": c["flip"][rows], "attention": c["attention"][rows].astype(np.float32),
                        "cls": c["cls"][rows].astype(np.float32),
                        "features": dequantize(c[layer][rows], c[f"{layer}_scale"][rows] if self.quantized else None)}

            def geometry(self):
                return self.cols["crop"], self.cols["flip"], self.cols["attention"].astype(np.float32)

            def image_digests(self):
                return self.cols.get("image_sha256")

            def image_digest(self, i):
                digests = self.image_digests()
                return None if digests is None else digests[i].tobytes()

            def stored_pixels(self, i):
                raise CacheError(f"{self.path}: the npy backend stores no views")

            def get(self, key, view):
                return view_targets(self, key, view)


        @register_backend
        class NpyBackend(Backend):
            '''One folder of .npy files per shard.'''

            name, suffix = "npy", SUFFIX
            help = "a folder of .npy files per shard"
            checksums = "sha256 of every file, from its entry's list"

            def codec(self, dtype):
                return "none (.npy)"

            def writer(self, root, source, max_rows, dim, grid_len, dtype, layers=(), pixels=None, feature_dim=None,
                       int8_group=None):
                return NpyWriter(root, source, max_rows, dim, grid_len, dtype, layers, pixels, feature_dim, int8_group)

            def open(self, path, entry, manifest, checked):
                return NpyShard(path, entry, manifest.row_shapes())

            def check(self, path, entry, manifest, checked):
                if not os.path.isdir(path):
                    raise CacheError(f"{path}: shard folder is missing")

            def verify(self, reader):
                extra = sorted(set(os.listdir(reader.path)) - set(reader.entry.files.paths))
                if extra:
                    raise CacheError(f"{reader.path}: file {extra[0]}: not in its entry's file list")

            def logical_bytes(self, manifest, entries):
                t, int8 = manifest.teacher, manifest.storage.dtype == "int8"
                tokens, width = t.grid[0] * t.grid[1], manifest.row_shapes()["features"][1]
                per_row = tokens * width * (1 if int8 else 2) + 2 * (tokens + t.dim) + 19 + (2 * tokens if int8 else 0)
                return sum(e.num_views for e in entries) * per_row
        """,
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

[mrmae.backends]
npy = mrmae_toyplug.backend
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


def test_a_plugin_backend_stores_a_cache_that_every_command_reads(plugin_path, demo_shards, tmp_path):
    assert "[zarr|npy|wds]" in " ".join(mrmae(plugin_path, "extract-features", "--help").stdout.split())
    cache = tmp_path / "cache"
    mrmae(plugin_path, "extract-features", "--shards", str(demo_shards[0]), "--feature-cache", str(cache),
          "--teacher", "dino:vit_tiny_patch16_224", "--format", "npy", "--views", "1", "--batch-size", "6",
          "--workers", "0", "--no-progress")
    (group,) = [p for p in (cache / "shards").iterdir() if p.is_dir()]
    assert group.name.endswith(".npyd") and (group / "features.npy").is_file(), sorted((cache / "shards").iterdir())
    assert (cache / "shards" / (group.name.split(".")[0] + ".json")).is_file()  # its entry, beside it
    info = json.loads(mrmae(plugin_path, "cache", "info", "--feature-cache", str(cache), "--json").stdout)
    assert (info["views"], info["checksums"], info["codec"]) == (6, "sha256 of every file, from its entry's list",
                                                                 "none (.npy)"), info
    mrmae(plugin_path, "cache", "verify", "--feature-cache", str(cache), "--recompute", "2", "--no-progress")
    out = tmp_path / "run"
    mrmae(plugin_path, "pretrain", "--shards", str(demo_shards[0]), "--feature-cache", str(cache), "--out", str(out),
          "--model", "mrmae_toyvit_tiny", "--decoder-depth", "1", "--decoder-dim", "32", "--batch-size", "6",
          "--workers", "0", "--no-progress")
    steps = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(steps) == 1 and steps[0]["loss_mimic"] > 0, steps
    # the backend's checks are the cache's: a changed byte is named by verify, which exits 1
    data = bytearray((group / "attention.npy").read_bytes())
    data[-1] ^= 0x40
    (group / "attention.npy").write_bytes(bytes(data))
    bad = mrmae(plugin_path, "cache", "verify", "--feature-cache", str(cache), "--recompute", "0", check=False)
    assert bad.returncode == 1 and "attention.npy: size or sha256 differs" in bad.stderr, bad.stderr
    # without the plug-in, its cache is refused in one line naming the field, and --format names the known ones
    bare = subprocess.run([sys.executable, "-m", "mrmae", "cache", "info", "--feature-cache", str(cache)],
                          capture_output=True, text=True, timeout=300)
    assert bare.returncode == 1 and "storage.backend" in bare.stderr and "npy" in bare.stderr, bare.stderr

"""WebDataset cache backend: per-member zstd against whole-shard compression (issue 4).

Data: a random-weight teacher (default clip:ViT-S-16; no model hub here) run on demo views
rendered by the extraction mapper (default 32 images x 2 views = 64 views, one shard);
its features, attention and [CLS] are stored as one shard by each layout below, for int8
and float16:

- zarr:            the default backend (`cf.ShardWriter`), for reference;
- tar:             the wds layout with plain `.npy` members (no compression);
- tar, member zstd: the wds layout, every `.npy` member zstd level 3 alone (`.npy.zst`);
- tar.zst:         the plain tar compressed whole with zstd level 3 (numcodecs; `zstandard`
                   is not installed here, so no streaming frames: reading decompresses it all).

Measured (median of --reps; one process, 2 torch threads idle):
- bytes per view: the stored file(s) / views;
- write views/s: float32 teacher outputs -> the shard under its final name (quantise,
  serialise, compress, write, hash for the manifest as extraction does);
- sequential read views/s: what a training worker does with one shard: open it (the wds
  reader reads the tar's index), `geometry()`, then `features_row(i)` for every row in tar
  order (float32). For tar.zst: decompress, walk the tar, decode every row's features,
  scale and attention;
- random read views/s: `get(key, view)` of 16 random rows on an opened shard (for tar.zst,
  each access decompresses the shard: the price of not being seekable);
- open ms: opening a shard and reading its index (the wds reader reads every tar header
  and meta.json, at first use).

Run (about a minute on 2 cores):

    .venv/bin/python benchmarks/wds_codec.py [--teacher clip:ViT-S-16] [--images 32 --views 2]

Writes benchmarks/results/wds_codec.json (or --name).
"""

from __future__ import annotations

import io
import json
import tarfile
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from numcodecs import Zstd

from _common import (RANDOM_WEIGHTS_NOTE, ForeignCpu, codec_parser, median_seconds, machine_facts, make_shards, render_views, table, warn_if_busy,
                     write_json)
from mrmae.shared import cache_format as cf
from mrmae.shared.teachers.base import build_teacher
from mrmae.shared.views import ViewConfig, normalize

SOURCE = "/bench/wds-000000.tar"
LAYOUTS = ("zarr", "tar", "tar, member zstd", "tar.zst")


def teacher_outputs(spec: str, images: int, views: int) -> dict[str, np.ndarray]:
    """features [N, L, C], attention [N, L], cls [N, C] float32 of a random-weight teacher."""
    with tempfile.TemporaryDirectory(prefix="mrmae-wds-codec-") as tmp:
        teacher = build_teacher(spec)
        pixels = render_views(make_shards(tmp, images, images), ViewConfig(per_image=views), teacher.input_size)
    x = normalize(pixels, teacher.mean, teacher.std)
    with torch.no_grad():
        outs = [teacher(b) for b in x.split(32)]
    return {k: torch.cat([getattr(o, k) for o in outs]).float().numpy() for k in ("features", "attention", "cls")}


def write_shard(layout: str, root: Path, rows: dict, dtype: str) -> Path:
    """One shard of `rows` in `layout` under `root`; returns its final path."""
    n = len(rows["keys"])
    L, C = rows["features"].shape[1:]
    if layout == "zarr":
        w = cf.ShardWriter(root, SOURCE, n, C, L, dtype)
    else:
        w = cf.WdsShardWriter(root, SOURCE, n, C, L, dtype, codec="zstd" if layout == "tar, member zstd" else "none")
    for a in range(0, n, 32):  # extraction appends teacher batches
        s = slice(a, a + 32)
        w.append(rows["keys"][s], rows["view"][s], rows["crop"][s], rows["flip"][s], rows["features"][s],
                 rows["attention"][s], rows["cls"][s])
    path, _, _ = w.close({"source": SOURCE})  # close hashes the shard, as for the manifest
    if layout == "tar.zst":
        zst = path.with_name(path.name + ".zst")
        zst.write_bytes(Zstd(level=3).encode(path.read_bytes()))
        path.unlink()
        cf.group_digest(zst)
        return zst
    return path


def open_shard(layout: str, path: Path):
    return cf.ShardGroup(path, {}) if layout == "zarr" else cf.WdsShard(path, {})


def read_sequential(layout: str, path: Path) -> int:
    """Every row's features (float32) and attention, in order; returns the rows read."""
    if layout == "tar.zst":
        return _read_tar_zst(path)
    g = open_shard(layout, path)
    g.geometry()
    for i in range(len(g)):
        g.features_row(i)
    return len(g)


def _read_tar_zst(path: Path) -> int:
    """A streaming reader of a whole-shard .tar.zst: decompress, walk the members in order."""
    data = Zstd().decode(path.read_bytes())
    rows, sample, arrays = 0, None, {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
        for info in tf:
            name, member, ext = info.name.split(".", 2)
            if name != sample:
                rows += _finish(arrays)
                sample, arrays = name, {}
            raw = tf.extractfile(info).read()
            arrays[member] = json.loads(raw) if ext == "json" else np.load(io.BytesIO(raw), allow_pickle=False)
    return rows + _finish(arrays)


def _finish(arrays: dict) -> int:
    if not arrays:
        return 0
    cf.dequantize(arrays["features"], arrays.get("scale"))
    arrays["attention"].astype(np.float32)
    return 1


def read_random(layout: str, path: Path, picks: list[tuple[str, int]]) -> None:
    if layout == "tar.zst":
        for _ in picks:
            _read_tar_zst(path)  # no index into a compressed stream: read through it
        return
    g = open_shard(layout, path)
    for key, view in picks:
        g.get(key, view)


def main() -> None:
    args = codec_parser(__doc__, "wds_codec").parse_args()
    warnings.filterwarnings("ignore", message=".*HAS RANDOM WEIGHTS.*")
    warn_if_busy()
    facts = machine_facts()
    other = ForeignCpu()
    t_start = time.perf_counter()

    out = teacher_outputs(args.teacher, args.images, args.views)
    n, L, C = out["features"].shape
    rng = np.random.default_rng(0)
    rows = {**out, "keys": [f"sample_{i // args.views:06d}" for i in range(n)],
            "view": np.arange(n) % args.views, "crop": rng.integers(1, 500, size=(n, 4)), "flip": rng.random(n) < 0.5}
    picks = [(rows["keys"][i], int(rows["view"][i])) for i in rng.choice(n, size=min(16, n), replace=False)]

    results = []
    with tempfile.TemporaryDirectory(prefix="mrmae-wds-codec-") as tmp:
        for dtype in ("int8", "float16"):
            for layout in LAYOUTS:
                root = Path(tmp) / f"{dtype}-{layout.replace(' ', '_').replace(',', '')}"
                paths: list[Path] = []
                write_s = median_seconds(lambda: paths.append(write_shard(layout, root, rows, dtype)), args.reps)
                path = paths[-1]
                assert read_sequential(layout, path) == n
                seq_s = median_seconds(lambda: read_sequential(layout, path), args.reps)
                rand_s = median_seconds(lambda: read_random(layout, path, picks), args.reps)
                open_s = median_seconds(lambda: len(open_shard(layout, path)), args.reps) if layout != "tar.zst" else None
                stored = cf.dir_bytes(path)
                results.append({"dtype": dtype, "layout": layout, "bytes": stored, "bytes_per_view": stored / n,
                                "write_views_per_s": n / write_s, "seq_read_views_per_s": n / seq_s,
                                "random_read_views_per_s": len(picks) / rand_s,
                                "open_ms": open_s * 1e3 if open_s is not None else None})
    for r in results:
        zarr_bytes = next(z["bytes"] for z in results if z["dtype"] == r["dtype"] and z["layout"] == "zarr")
        r["bytes_vs_zarr"] = r["bytes"] / zarr_bytes
    total_s = time.perf_counter() - t_start
    foreign_s = other.seconds()
    payload = {"benchmark": "wds_codec", "note": RANDOM_WEIGHTS_NOTE, "machine": facts,
               "params": {**vars(args), "shape": [n, L, C], "zstd_level": 3, "codec_library": "numcodecs.Zstd"},
               "results": results, "foreign_cpu_seconds": foreign_s, "total_seconds": total_s}
    path = write_json(args.name, payload)

    print(f"\n{args.teacher}: {n} views of [{L}, {C}] in one shard; median of {args.reps} reps; "
          f"{facts['cpu_count']} CPUs")
    print(f"note: {RANDOM_WEIGHTS_NOTE}\n")
    print(table(["dtype", "layout", "bytes/view", "vs zarr", "write views/s", "seq read views/s",
                 "random read views/s", "open ms"],
                [[r["dtype"], r["layout"], f"{r['bytes_per_view']:,.0f}",
                  f"{r['bytes_vs_zarr']:.3f}",
                  f"{r['write_views_per_s']:,.0f}", f"{r['seq_read_views_per_s']:,.0f}",
                  f"{r['random_read_views_per_s']:,.0f}", "-" if r["open_ms"] is None else f"{r['open_ms']:.1f}"]
                 for r in results]))
    print(f"\nforeign CPU seconds during the run: {foreign_s:.1f}; total {total_s:.1f} s -> {path}")


if __name__ == "__main__":
    main()

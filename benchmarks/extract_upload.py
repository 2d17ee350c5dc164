"""Extraction into an object store: a group's files uploaded one after another vs concurrently.

A cache at a URL is written shard by shard: each group is assembled in a local staging
directory, then its files are uploaded (one PUT each), then its file list and its entry.
Measured side by side in one process, on `latmem://` (benchmarks/_latency_fs.py: fsspec's
memory filesystem with --latency seconds per request, no bandwidth limit, so what is
measured is the round trips), with `location.UPLOAD_THREADS` 1 (the upload before this
issue: one file after the other) and the default (16 at once), alternating per rep:

- commit: `commit_shard` of one ImageNet-sized shard (1,251 images x --views views, a
  --dim wide teacher at the 14 x 14 grid, random int8 targets; ~200 files), written by the
  real writer, into a fresh cache each time (no yield);
- extraction: `run_extraction` end to end (tar read, decode, render, a real ViT-Tiny teacher
  with random weights, quantise, write, upload) of --images demo images in shards of
  --shard-size into a fresh cache on the store.

    .venv/bin/python benchmarks/extract_upload.py             # ~3 min on 2 busy cores

Writes benchmarks/results/extract_upload.json (or --out PATH).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

from _common import ForeignCpu, machine_facts, table, warn_if_busy, write_json
from _latency_fs import LatencyMemoryFileSystem as Store

IMAGENET_SHARD = 1251


def commit_seconds(workdir: Path, url: str, keys, images, manifest, threads: int) -> tuple[float, int]:
    """(seconds, requests) of `commit_shard` of one shard written afresh, with `threads` uploads at once."""
    import numpy as np

    import startup
    from mrmae.shared import cache_format as cf
    from mrmae.shared.cache_format import location

    Store.clear()
    cf.init_cache("latmem://upload/cache", startup.tiny_manifest(manifest.views.per_image, manifest.teacher.dim))
    staged = workdir / f"staged-{threads}"
    entry = startup.write_shard(staged, url, keys, images, manifest, rng=np.random.default_rng(0))
    writer_tmp = staged / entry.group
    location.UPLOAD_THREADS, default = threads, location.UPLOAD_THREADS
    Store.reset_stats()
    try:
        t0 = time.perf_counter()
        cf.Location("latmem://upload/cache").publish(writer_tmp, entry.group, entry.sha256)
        cf.record_shard("latmem://upload/cache", entry)
        seconds = time.perf_counter() - t0
    finally:
        location.UPLOAD_THREADS = default
    requests = Store.stats()["requests"]
    assert len(cf.read_manifest("latmem://upload/cache").shards) == 1
    Store.clear()
    return seconds, requests


def extraction_seconds(urls: list[str], threads: int, teacher: str, views: int) -> float:
    from mrmae.extract.runner import ExtractConfig, run_extraction
    from mrmae.shared.cache_format import location
    from mrmae.shared.views import ViewConfig

    Store.clear()
    location.UPLOAD_THREADS, default = threads, location.UPLOAD_THREADS
    try:
        t0 = time.perf_counter()
        run_extraction(ExtractConfig(shards=urls, out="latmem://upload/extracted", teacher=teacher,
                                     views=ViewConfig(per_image=views, seed=0), batch_size=32, progress=False))
        return time.perf_counter() - t0
    finally:
        location.UPLOAD_THREADS = default
        Store.clear()


def main() -> None:
    import startup
    from mrmae.demo import write_demo_shards
    from mrmae.shared.cache_format import location

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--latency", type=float, default=0.020)
    p.add_argument("--views", type=int, default=2)
    p.add_argument("--dim", type=int, default=192)
    p.add_argument("--images", type=int, default=64, help="demo images extracted end to end")
    p.add_argument("--shard-size", type=int, default=32)
    p.add_argument("--teacher", default="dino:vit_tiny_patch16_224")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out")
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    warn_if_busy()
    facts, other, t_start = machine_facts(), ForeignCpu(), time.perf_counter()
    parallel = location.UPLOAD_THREADS
    rows: dict[str, list] = {"commit 1": [], f"commit {parallel}": [], "extraction 1": [],
                             f"extraction {parallel}": []}
    with tempfile.TemporaryDirectory(prefix="mrmae-upload-") as tmp:
        tmp = Path(tmp)
        keys, images = startup.write_tar(tmp / "imagenet-shard.tar", IMAGENET_SHARD)
        manifest = startup.tiny_manifest(args.views, args.dim)
        urls = [str(u) for u in write_demo_shards(tmp / "demo", args.images, args.shard_size, seed=0)]
        Store.latency = args.latency
        for rep in range(args.reps):
            for threads in ((1, parallel) if rep % 2 == 0 else (parallel, 1)):
                seconds, requests = commit_seconds(tmp, str(tmp / "imagenet-shard.tar"), keys, images, manifest,
                                                   threads)
                rows[f"commit {threads}"].append({"seconds": seconds, "requests": requests})
                ext = extraction_seconds(urls, threads, args.teacher, args.views)
                rows[f"extraction {threads}"].append({"seconds": ext})
                print(f"  rep {rep}: {threads:>2} uploads at once: commit {seconds:6.2f} s ({requests} requests), "
                      f"extraction {ext:6.2f} s", flush=True)
    result = {name: {"seconds": statistics.median(r["seconds"] for r in rs), "reps": rs} for name, rs in rows.items()}
    for what in ("commit", "extraction"):
        per_rep = [a["seconds"] / b["seconds"] for a, b in zip(rows[f"{what} 1"], rows[f"{what} {parallel}"])]
        result[f"{what}_speedup_per_rep"], result[f"{what}_speedup"] = per_rep, statistics.median(per_rep)
    facts["loadavg_at_end"] = [round(v, 2) for v in os.getloadavg()]
    total, foreign = time.perf_counter() - t_start, other.seconds()
    path = write_json("extract_upload", {"benchmark": "extract_upload", "command": " ".join(
        ["benchmarks/extract_upload.py", *sys.argv[1:]]), "machine": facts, "params": vars(args), "result": result,
        "foreign_cpu_seconds": foreign, "total_seconds": total}, args.out)
    print(f"\nlatmem:// at {args.latency * 1e3:.0f} ms a request; median of {args.reps} reps")
    print(table(["what", "uploads at once", "seconds", "speed-up (per rep)"],
                [[what, n, result[f"{what} {n}"]["seconds"],
                  f"{result[f'{what}_speedup']:.2f} ({', '.join(f'{x:.2f}' for x in result[f'{what}_speedup_per_rep'])})"
                  if n == parallel else "-"] for what in ("commit", "extraction") for n in (1, parallel)]))
    print(f"other processes used {foreign:.1f} CPU-s meanwhile; total {total:.0f} s -> {path}")


if __name__ == "__main__":
    main()

"""The loader's rate per worker on local disk and on an object store with latency, side by side.

One worker's loader (`StudentStream` in the process itself with one torch thread, as a
DataLoader worker runs it) in each mode, on each place, in one process, the order rotating
per rep:

- modes: `plain` (tar read, JPEG decode, view drawn and rendered), `live` (the same and the
  teacher's 224 px view; the teacher itself is not run), `cached` (a Zarr cache's views,
  int8 targets and attention replayed; every check on);
- places: the local disk, and `latmem://` (benchmarks/_latency_fs.py: fsspec's memory
  filesystem with --latencies seconds per request, 20 and 50 ms: each GET, HEAD and listed
  page one round trip, requests from several threads overlapping) holding the same tars,
  sizes.json and cache;
- `cached, no prefetch` on the store: the loader before this issue (each shard opened when
  the worker reaches it, no block read ahead), for the stall prefetch removes.

Shards are demo JPEGs (~40 KB, 200-600 px) in tars of --shard-size, with the sizes.json
make-demo-shards writes; the cache is written by the real writer with the views
extraction draws for those images and random int8 targets (a --dim wide teacher at the
14 x 14 grid, scales per 64 channels, K = --views), as costly to decompress as a
teacher's. A timed window opens at the first batch (a run's first shard opening is left
out) and lasts --budget seconds, less than one pass over the shards, so every shard
opened in it is one the worker meets mid-epoch, as at ImageNet scale. Each place's figure
is images per second of the time one core to itself would take (`rate`: the process's CPU
time, its prefetch threads' included, plus the time the worker's thread was blocked,
waiting on the store or its threads; the time it sat runnable while other processes had
the cores is left out, which on a busy machine moves a wall-clock rate 2-4x between runs)
and, beside it, images/s of wall time; each ratio to local disk is taken per rep, within
the same rotation.

    .venv/bin/python benchmarks/loader_latency.py                   # ~8 min on 2 busy cores
    .venv/bin/python benchmarks/loader_latency.py --images 512 --shard-size 128 --reps 1 --budget 2

Writes benchmarks/results/loader_latency.json (or --out PATH).
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from _common import ForeignCpu, machine_facts, table, warn_if_busy, write_json
from _latency_fs import LatencyMemoryFileSystem as Store

MODES = ("plain", "live", "cached")


def build(workdir: Path, images: int, shard_size: int, dim: int, views: int) -> tuple[list[str], Path]:
    """Demo tars with their sizes.json, and a cache of them by the real writer: (tar paths, cache)."""
    from PIL import Image

    import startup
    from mrmae.demo import write_demo_shards
    from mrmae.shared import cache_format as cf
    from mrmae.shared.shards import read_shard

    tars = write_demo_shards(workdir / "shards", images, shard_size, seed=0, sizes=True)
    root, manifest, rng = workdir / "cache", startup.tiny_manifest(views, dim), np.random.default_rng(0)
    cf.init_cache(root, manifest)
    for tar in tars:
        samples = read_shard(str(tar))
        sides = []
        for s in samples:
            with Image.open(io.BytesIO(s.image)) as im:
                sides.append((im.height, im.width))
        startup.write_shard(root, str(tar), [s.key for s in samples], [s.image for s in samples], manifest,
                            sides=sides, rng=rng)
    return [str(t) for t in tars], root


def stream(mode: str, urls: list[str], cache_root: str | None, batch_size: int, views: int, prefetch: int):
    """The loader of one mode over `urls` (the cache at `cache_root` in cached mode), epoch 0."""
    from mrmae.shared import cache_format as cf
    from mrmae.shared.shard_sizes import read_sizes
    from mrmae.train.stream import DataConfig, StudentStream

    cached = mode == "cached"
    cfg = DataConfig(shards=urls, batch_size=batch_size, views_per_image=views, prefetch=prefetch,
                     teacher_size=224 if mode == "live" else 0, sizes=None if cached else read_sizes(urls))
    out = StudentStream(cfg, cf.FeatureCache(cache_root) if cached else None)
    out.set_epoch(0)
    return out


def thread_times() -> tuple[float, float]:
    """(on-CPU, waiting-for-a-core) seconds of this process's main thread so far (Linux
    schedstat: the time it ran, and the time it was runnable but another process had the core)."""
    with open(f"/proc/self/task/{os.getpid()}/schedstat") as f:
        ran, queued, _ = (int(x) for x in f.read().split())
    return ran / 1e9, queued / 1e9


def rate(dataset, budget: float) -> dict:
    """One pass, timed from its first batch: images/s of wall time, and images per second of
    the time one core to itself would take: the process's CPU (every thread's: the worker's
    own work and what its prefetch threads do) plus the time the worker's thread was blocked
    (waiting on the store, on its threads, on the disk), leaving out only the time it was
    runnable while other processes held the cores; on a machine others keep busy, the wall
    rate moves 2-4x from run to run, this one far less."""
    images, t0 = 0, None
    for batch in dataset:
        if t0 is None:
            t0, cpu0, (ran0, queued0) = time.perf_counter(), time.process_time(), thread_times()
            continue
        images += len(batch)
        if time.perf_counter() - t0 >= budget:
            break
    seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    ran, queued = (b - a for a, b in zip((ran0, queued0), thread_times()))
    blocked = max(0.0, seconds - ran - queued)
    if not images:
        raise RuntimeError("no batch after the first: too few shards for the budget?")
    return {"images": images, "seconds": seconds, "images_per_s": images / seconds,
            "cpu_ms_per_image": 1e3 * cpu / images, "blocked_s": blocked, "queued_s": queued,
            "images_per_core_s": images / (cpu + blocked)}


def configs(latencies: list[float]) -> list[tuple[str, str, float, int]]:
    """(name, mode, latency or 0 for local disk, prefetch) of every loader timed."""
    out = [(f"{m} local", m, 0.0, 2) for m in MODES]
    for lat in latencies:
        out += [(f"{m} {lat * 1e3:.0f} ms", m, lat, 2) for m in MODES]
        out.append((f"cached {lat * 1e3:.0f} ms, no prefetch", "cached", lat, 0))
    return out


def measure(urls: list[str], cache_root: Path, args) -> dict:
    """Every loader, order rotating per rep; medians and per-rep ratios to the same mode on disk."""
    remote = [f"latmem://loader/shards/{Path(u).name}" for u in urls]
    Store.clear()
    Store.upload_tree(Path(urls[0]).parent, "latmem://loader/shards")
    Store.upload_tree(cache_root, "latmem://loader/cache")
    runs = configs(args.latencies)
    got: dict[str, list[dict]] = {name: [] for name, *_ in runs}
    for rep in range(args.reps):
        for name, mode, latency, prefetch in runs[rep % len(runs):] + runs[:rep % len(runs)]:
            Store.latency = latency
            where = (remote, "latmem://loader/cache") if latency else (urls, str(cache_root))
            r = rate(stream(mode, where[0], where[1], args.batch_size, args.views, prefetch), args.budget)
            got[name].append(r)
            print(f"  rep {rep}: {name:<28} {r['images_per_core_s']:7.1f} images/core-s  {r['images_per_s']:7.1f} "
                  f"images/s  {r['cpu_ms_per_image']:.2f} CPU ms/image  blocked {r['blocked_s']:.2f} s  "
                  f"queued {r['queued_s']:.2f} s", flush=True)
    Store.clear()
    out = {name: {key: statistics.median(r[key] for r in rs)
                  for key in ("images_per_core_s", "images_per_s", "cpu_ms_per_image", "blocked_s", "queued_s")}
           | {"reps": rs} for name, rs in got.items()}
    for name, mode, latency, _ in runs:
        if latency:
            for key in ("images_per_core_s", "images_per_s"):
                per_rep = [a[key] / b[key] for a, b in zip(got[name], got[f"{mode} local"])]
                out[name][f"ratio_{key}_per_rep"] = per_rep
                out[name][f"ratio_{key}"] = statistics.median(per_rep)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=2048)
    p.add_argument("--shard-size", type=int, default=256)
    p.add_argument("--views", type=int, default=2)
    p.add_argument("--dim", type=int, default=384, help="the targets' width (ViT-S/16's)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--budget", type=float, default=4.0, help="seconds timed per loader run (less than a pass)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--latencies", type=lambda s: [float(x) for x in s.split(",")], default=[0.020, 0.050],
                   help="seconds per request on latmem://, comma-separated")
    p.add_argument("--out")
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)  # a DataLoader worker's
    warn_if_busy()
    facts, other, t_start = machine_facts(), ForeignCpu(), time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mrmae-loader-latency-") as tmp:
        urls, cache = build(Path(tmp), args.images, args.shard_size, args.dim, args.views)
        print(f"built {len(urls)} shards of {args.shard_size} and their cache [{time.perf_counter() - t_start:.0f} s]",
              flush=True)
        result = measure(urls, cache, args)
    facts["loadavg_at_end"] = [round(v, 2) for v in os.getloadavg()]
    total, foreign = time.perf_counter() - t_start, other.seconds()
    command = " ".join(["benchmarks/loader_latency.py", *sys.argv[1:]])
    path = write_json("loader_latency", {"benchmark": "loader_latency", "command": command, "machine": facts,
                                         "params": vars(args), "loaders": result, "foreign_cpu_seconds": foreign,
                                         "total_seconds": total}, args.out)
    print(f"\n{args.images} demo images in shards of {args.shard_size}, batch {args.batch_size}, cache {args.dim}-d int8 "
          f"x {args.views} views; one worker's loader in process; median of {args.reps} reps of {args.budget:g} s")
    def ratio(r: dict, key: str) -> str:
        if f"ratio_{key}" not in r:
            return "-"
        return f"{r[f'ratio_{key}']:.3f} ({', '.join(f'{x:.2f}' for x in r[f'ratio_{key}_per_rep'])})"

    print(table(["loader", "images/core-s", "ratio to local (per rep)", "images/s (wall)", "ratio to local (per rep)",
                 "CPU ms / image", "blocked s"],
                [[name, r["images_per_core_s"], ratio(r, "images_per_core_s"), r["images_per_s"],
                  ratio(r, "images_per_s"), r["cpu_ms_per_image"], r["blocked_s"]] for name, r in result.items()]))
    print(f"other processes used {foreign:.1f} CPU-s meanwhile; total {total:.0f} s -> {path}")


if __name__ == "__main__":
    main()

"""Worker-side cost per image: today's loader (workers render the views) against the split
of `mrmae pretrain --render-on-device` (workers read, decode and fetch targets; the
training device renders), side by side in one run, for cached, live and plain modes.

Both loaders are `mrmae.train.stream.StudentStream` as run_pretrain builds it, over the same
demo shards (~200-600 px a side JPEGs, `mrmae.demo.write_demo_shards`), each in a
`torch.utils.data.DataLoader` with ONE worker:

- workers: `render_on_device=False`, per image: tar read, PIL decode, [cached: the view's
  geometry, int8 targets, attention], the view rendered (crop + bicubic antialiased
  resize + flip, 224 px) [live: again at the teacher's size], collate, hand-over;
- split: `render_on_device=True`, the same less the render: the view's box is cut from
  the decoded image (a row copy) and the batch's crops handed over packed, for the
  device to render (`Batch.rendered`, not timed here: it runs on the GPU).

The cost is the worker's CPU time per image (`time.process_time()` in the worker, stamped
on each batch, so a busy machine lengthens the wall time but hardly the figure), between
the batch that closes the warm-up and the last one of a window of --budget seconds;
images/s of the same window are reported too. Per rep every loader runs once, the order
rotating; medians over reps. ratio = split / workers CPU ms per image (goal <= 0.6x: the
ceiling a GPU host's loader gains, as each worker then feeds 1 / ratio as many images).

    .venv/bin/python benchmarks/loader_render_split.py                      # ~5 minutes on 2 cores
    .venv/bin/python benchmarks/loader_render_split.py --images 16 --reps 1 --budget 2  # a smoke run

Writes benchmarks/results/loader_render_split.json (or --name, or --out PATH).
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

import torch

from _common import ForeignCpu, machine_facts, make_shards, table, warn_if_busy, write_json
from loader_throughput import Passes
from mrmae.shared import cache_format as cf
from mrmae.train.stream import DataConfig, StudentStream

MODES = ("cached", "live", "plain")
LOADERS = ("workers", "split")


class CpuStamped(torch.utils.data.IterableDataset):
    """`dataset`'s batches, each with the CPU seconds its producing process has used so far:
    (batch, worker_cpu_s); in a DataLoader worker, that worker's own time."""

    def __init__(self, dataset) -> None:
        super().__init__()
        self.dataset = dataset

    def __iter__(self):
        for batch in self.dataset:
            yield batch, time.process_time()


def stream(urls: list[str], cache_root: Path, mode: str, split: bool, args) -> StudentStream:
    """The StudentStream of `mode` as run_pretrain builds it (epoch 0), rendering in the
    workers or (split) handing over crops."""
    cache = cf.FeatureCache(cache_root) if mode == "cached" else None
    cfg = DataConfig(shards=list(urls), batch_size=args.batch_size, views_per_image=args.views,
                     teacher_size=args.teacher_size if mode == "live" else 0, render_on_device=split)
    s = StudentStream(cfg, cache)
    s.set_epoch(0)
    return s


def worker_cost(dataset, warmup_batches: int, budget_s: float) -> dict:
    """One DataLoader worker over `dataset` (again and again): CPU ms per image of the worker
    and images/s, from the arrival of batch `warmup_batches` to the end of the window."""
    loader = torch.utils.data.DataLoader(CpuStamped(Passes(dataset)), batch_size=None, num_workers=1)
    images, batches, start, wall, cpu = 0, 0, None, 0.0, 0.0
    for batch, worker_cpu_s in loader:
        batches += 1
        if batches == warmup_batches:
            start = (time.perf_counter(), worker_cpu_s)
            continue
        if start is not None:
            images += len(batch)
            wall, cpu = time.perf_counter() - start[0], worker_cpu_s - start[1]
            if wall >= budget_s:
                break
    if start is None or images == 0:
        raise RuntimeError(f"the loader gave {batches} batches: no data?")
    return {"images": images, "seconds": wall, "images_per_s": images / wall, "cpu_ms_per_image": 1e3 * cpu / images}


def measure(urls: list[str], cache_root: Path, args) -> dict:
    """Every (mode, loader) once per rep, order rotating; medians and split / workers ratios."""
    names = [(m, lo) for m in args.modes for lo in LOADERS]
    runs: dict[tuple[str, str], list[dict]] = {n: [] for n in names}
    for rep in range(args.reps):
        for mode, loader in names[rep % len(names):] + names[:rep % len(names)]:
            dataset = stream(urls, cache_root, mode, loader == "split", args)
            runs[mode, loader].append(worker_cost(dataset, args.warmup_batches, args.budget))
            print(f"rep {rep} {mode} {loader}: {runs[mode, loader][-1]['cpu_ms_per_image']:.2f} ms/image", flush=True)
    out: dict = {}
    for mode in args.modes:
        row = {lo: {k: statistics.median(r[k] for r in runs[mode, lo]) for k in ("cpu_ms_per_image", "images_per_s")}
               | {"reps": runs[mode, lo]} for lo in LOADERS}
        row["ratio_cpu_split_over_workers"] = row["split"]["cpu_ms_per_image"] / row["workers"]["cpu_ms_per_image"]
        row["ratio_cpu_per_rep"] = [s["cpu_ms_per_image"] / w["cpu_ms_per_image"]
                                    for s, w in zip(runs[mode, "split"], runs[mode, "workers"])]
        row["ratio_rate_workers_over_split"] = row["workers"]["images_per_s"] / row["split"]["images_per_s"]
        out[mode] = row
    return out


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--teacher", default="clip:ViT-S-16", help="the cache's teacher (its width sets the target bytes)")
    p.add_argument("--teacher-size", type=int, default=224, help="live mode: the teacher view's size")
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--shard-size", type=int, default=256,
                   help="samples per tar (a cache opens each shard's group once a pass: ImageNet tars hold ~1,000)")
    p.add_argument("--views", type=int, default=2, help="views per image (the cache's; live and plain draw as many)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--warmup-batches", type=int, default=2)
    p.add_argument("--budget", type=float, default=6.0, help="seconds per timed loader window (at most)")
    p.add_argument("--reps", type=int, default=4)
    p.add_argument("--modes", default=",".join(MODES), type=lambda v: [m for m in v.split(",") if m])
    p.add_argument("--name", default="loader_render_split", help="results/<name>.json")
    p.add_argument("--out", help="write the JSON here instead of results/<name>.json")
    args = p.parse_args()
    if unknown := set(args.modes) - set(MODES):
        p.error(f"--modes: unknown {', '.join(sorted(unknown))}; known: {', '.join(MODES)}")
    return args


def main() -> None:
    args = parse_args()
    warnings.filterwarnings("ignore", message=".*HAS RANDOM WEIGHTS.*")
    from mrmae.extract.config import ExtractConfig
    from mrmae.extract.runner import run_extraction
    from mrmae.shared.views import ViewConfig

    warn_if_busy()
    facts, t_start, other = machine_facts(), time.perf_counter(), ForeignCpu()
    with tempfile.TemporaryDirectory(prefix="mrmae-render-split-") as tmp:
        urls = [str(u) for u in make_shards(Path(tmp) / "shards", args.images, args.shard_size)]
        cache = Path(tmp) / "cache"
        if "cached" in args.modes:
            run_extraction(ExtractConfig(shards=urls, out=str(cache), teacher=args.teacher, batch_size=32,
                                         views=ViewConfig(per_image=args.views, seed=0), progress=False))
        print(f"{args.images} images [{time.perf_counter() - t_start:.0f} s]", flush=True)
        result = measure(urls, cache, args)
    total_s, foreign = time.perf_counter() - t_start, other.seconds()
    facts["loadavg_at_end"] = [round(v, 2) for v in os.getloadavg()]
    command = " ".join(["benchmarks/loader_render_split.py", *sys.argv[1:]])
    payload = {"benchmark": "loader_render_split", "command": command, "machine": facts, "params": vars(args),
               "modes": result, "foreign_cpu_seconds": foreign, "total_seconds": total_s}
    path = write_json(args.name, payload, args.out)
    print(f"\n{args.images} demo images, batch {args.batch_size}, 1 worker per loader, cache {args.teacher} x "
          f"{args.views} views, live teacher view {args.teacher_size} px; median of {args.reps} reps of <= "
          f"{args.budget:g} s; {facts['cpu_count']} CPUs")
    rows = [[mode, r["workers"]["cpu_ms_per_image"], r["split"]["cpu_ms_per_image"], r["ratio_cpu_split_over_workers"],
             " ".join(f"{x:.2f}" for x in r["ratio_cpu_per_rep"]), r["workers"]["images_per_s"],
             r["split"]["images_per_s"]] for mode, r in result.items()]
    print(table(["mode", "workers CPU ms/img", "split CPU ms/img", "ratio (goal <= 0.6)", "ratio per rep",
                 "workers img/s", "split img/s"], rows))
    print(f"other processes used {foreign:.1f} CPU-s meanwhile; total {total_s:.0f} s -> {path}")


if __name__ == "__main__":
    main()

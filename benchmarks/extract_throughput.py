"""Extraction throughput: end-to-end `run_extraction` against the teacher's forward pass alone.

Measured side by side in one process, on the same machine, teacher, batch size and data
(demo shards from `mrmae.demo.write_demo_shards`, written to a temp dir):

- forward-only: views/s of `teacher(x)` on views rendered by the extraction mapper,
  normalised beforehand and batched at --batch-size (two warm-up batches first);
- extraction: views/s of `mrmae.extract.runner.run_extraction` (fresh output dir per rep,
  progress off) for each --workers value with dtype int8, and with workers=0 for float16.
  "loop" uses the runner's own `seconds` (read, decode, render, forward, quantise, write,
  manifest); "wall" also counts building the teacher, built per call and passed to
  run_extraction (`teacher=`) with hooks that time its forward;
- ratio = extraction views/s / forward-only views/s, medians (the project's CPU goal: loop
  >= 0.9); "best" divides the fastest rep by the fastest rep, less sensitive to other load;
- teacher share = seconds inside the teacher's forward (hooks on the runner's teacher) /
  loop seconds, measured within the same run and so free of run-to-run machine noise; with
  workers=0 it is the ratio the pipeline would reach against an equally fast forward;
- bytes per view = FeatureCache(out).stored_bytes() / views, all files of the cache.

Reps are interleaved (forward, then each extraction config, per rep) and printed as they
finish, with the CPU-seconds other processes used meanwhile (from /proc/stat): timings are
only clean on an otherwise idle machine. The table reports medians.
Teachers have random weights (no model hub): fine for timing. torch threads: the default.

Run:

    .venv/bin/python benchmarks/extract_throughput.py
    # ViT-B/16 is much slower on a CPU: fewer images and reps keep the run short
    .venv/bin/python benchmarks/extract_throughput.py --teacher clip:ViT-B-16 --images 32 --reps 2

Writes benchmarks/results/extract_throughput.json (or --name).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch

from _common import (RANDOM_WEIGHTS_NOTE, ForeignCpu, machine_facts, make_shards, render_views, table, warn_if_busy,
                     write_json)
from mrmae.extract.config import ExtractConfig
from mrmae.extract.runner import run_extraction
from mrmae.shared.cache_format import FeatureCache
from mrmae.shared.teachers.base import Teacher, build_teacher
from mrmae.shared.views import ViewConfig, normalize


def forward_only(teacher: Teacher, batches: list[torch.Tensor]) -> float:
    """Seconds to run the teacher over all batches (already normalised)."""
    t0 = time.perf_counter()
    for x in batches:
        teacher(x)
    return time.perf_counter() - t0


class TeacherClock:
    """Builds the teacher for run_extraction with hooks that add up the seconds spent in its forward."""

    def __init__(self) -> None:
        self.seconds, self._t0 = 0.0, 0.0

    def build(self, spec: str) -> Teacher:
        teacher = build_teacher(spec)
        teacher.register_forward_pre_hook(lambda *_: setattr(self, "_t0", time.perf_counter()))
        teacher.register_forward_hook(lambda *_: self._stop())
        return teacher

    def _stop(self) -> None:
        self.seconds += time.perf_counter() - self._t0


def extract_once(shards: list[Path], out: Path, args: argparse.Namespace, workers: int, dtype: str) -> dict:
    cfg = ExtractConfig(shards=[str(p) for p in shards], out=str(out), teacher=args.teacher,
                        views=ViewConfig(per_image=args.views), dtype=dtype, batch_size=args.batch_size,
                        workers=workers, progress=False)
    clock = TeacherClock()
    t0 = time.perf_counter()
    summary = run_extraction(cfg, teacher=clock.build(args.teacher))
    wall = time.perf_counter() - t0
    cache = FeatureCache(out)
    # the local directory: FeatureCache.root is a URL string since caches may live on any fsspec store
    feature_bytes = sum(f.stat().st_size for f in Path(out).glob("shards/*/features*/**/*") if f.is_file())
    return {"views": summary["views"], "loop_s": summary["seconds"], "teacher_s": clock.seconds, "wall_s": wall,
            "stored_bytes": cache.stored_bytes(), "feature_bytes": feature_bytes}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--teacher", default="clip:ViT-S-16", help="e.g. clip:ViT-S-16 or clip:ViT-B-16")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--shard-size", type=int, default=32)
    p.add_argument("--views", type=int, default=2, help="views per image")
    p.add_argument("--workers", default="0,1", help="comma-separated DataLoader worker counts (int8 runs)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--name", default="extract_throughput", help="results/<name>.json")
    args = p.parse_args()
    warnings.filterwarnings("ignore", message=".*HAS RANDOM WEIGHTS.*")
    workers = [int(w) for w in args.workers.split(",")]
    configs = [(w, "int8") for w in workers] + [(0, "float16")]
    warn_if_busy()
    facts = machine_facts()
    t_start = time.perf_counter()

    with tempfile.TemporaryDirectory(prefix="mrmae-bench-") as tmp:
        tmp = Path(tmp)
        shards = make_shards(tmp / "shards", args.images, args.shard_size)
        teacher = build_teacher(args.teacher)
        pixels = render_views(shards, ViewConfig(per_image=args.views), teacher.input_size)
        x = normalize(pixels, teacher.mean, teacher.std)
        batches = list(x.split(args.batch_size))
        n_views = len(x)
        forward_only(teacher, batches[:2])  # warm-up

        fwd_s: list[float] = []
        runs: dict[tuple[int, str], list[dict]] = {c: [] for c in configs}
        foreign: list[float] = []
        for rep in range(args.reps):
            other = ForeignCpu()
            fwd_s.append(forward_only(teacher, batches))
            line = [f"forward {n_views / fwd_s[-1]:.2f}"]
            for w, dtype in configs:
                r = extract_once(shards, tmp / f"cache-{rep}-{w}-{dtype}", args, w, dtype)
                runs[(w, dtype)].append(r)
                line.append(f"w{w} {dtype} {r['views'] / r['loop_s']:.2f}")
            foreign.append(other.seconds())
            print(f"rep {rep + 1}/{args.reps} views/s (loop): {', '.join(line)}; other processes used "
                  f"{foreign[-1]:.1f} CPU-s [{time.perf_counter() - t_start:.0f} s]", flush=True)

    fwd_vps = n_views / statistics.median(fwd_s)
    results = []
    for (w, dtype), reps in runs.items():
        views = reps[0]["views"]
        loop_vps = views / statistics.median(r["loop_s"] for r in reps)
        wall_vps = views / statistics.median(r["wall_s"] for r in reps)
        best_vps = views / min(r["loop_s"] for r in reps)
        results.append({"workers": w, "dtype": dtype, "views": views, "loop_views_per_s": loop_vps,
                        "teacher_share": statistics.median(r["teacher_s"] / r["loop_s"] for r in reps),
                        "ratio_loop_best": best_vps / (n_views / min(fwd_s)),
                        "wall_views_per_s": wall_vps, "ratio_loop": loop_vps / fwd_vps,
                        "ratio_wall": wall_vps / fwd_vps, "bytes_per_view": reps[0]["stored_bytes"] / views,
                        "feature_bytes_per_view": reps[0]["feature_bytes"] / views, "reps": reps})
    total_s = time.perf_counter() - t_start

    facts["loadavg_at_end"] = [round(v, 2) for v in os.getloadavg()]
    payload = {"benchmark": "extract_throughput", "note": RANDOM_WEIGHTS_NOTE, "machine": facts,
               "params": {**vars(args), "views_total": n_views}, "forward_only": {
                   "views_per_s": fwd_vps, "seconds_per_rep": fwd_s, "views": n_views},
               "extraction": results, "foreign_cpu_seconds_per_rep": foreign, "total_seconds": total_s}
    path = write_json(args.name, payload)

    m = payload["machine"]
    print(f"\n{args.teacher}, batch {args.batch_size}, {args.images} images x {args.views} views = {n_views} views, "
          f"shards of {args.shard_size}, median of {args.reps} reps; {m['cpu_count']} CPUs, torch {m['torch']} "
          f"({m['torch_threads']} threads)")
    print(f"note: {RANDOM_WEIGHTS_NOTE}\n")
    rows = [["forward-only", "-", "-", f"{fwd_vps:.2f}", "-", "1.000", "1.000", "-", "-", "-"]]
    for r in results:
        rows.append(["extraction", r["workers"], r["dtype"], f"{r['loop_views_per_s']:.2f}",
                     f"{r['wall_views_per_s']:.2f}", f"{r['ratio_loop']:.3f}", f"{r['ratio_loop_best']:.3f}",
                     f"{r['teacher_share']:.3f}", f"{r['bytes_per_view']:,.0f}", f"{r['feature_bytes_per_view']:,.0f}"])
    print(table(["mode", "workers", "dtype", "views/s loop", "views/s wall", "ratio", "ratio best", "teacher share",
                 "bytes/view", "feat B/view"], rows))
    print("\nratio = extraction loop / forward-only views/s, medians (goal >= 0.9); ratio best = fastest rep / fastest "
          "rep;\nwall also counts building the teacher passed to run_extraction; teacher share = time in the teacher's "
          "forward / loop time,\nwithin each run (median; with workers > 0 the workers also slow the forward down); "
          "bytes/view: all cache files;\nfeat B/view: features (+ scale) arrays only.")
    print(f"other processes used {sum(foreign):.1f} CPU-s meanwhile; total {total_s:.0f} s -> {path}")


if __name__ == "__main__":
    main()

"""Render workers started once per run vs once per shard: the extraction's input side alone.

Same process, same shards, modes alternating per repetition: views/s of the teacher
stage's `teacher_batches` (tar samples -> DataLoader workers rendering views -> teacher batches,
no teacher) when one `render_loader` serves every shard (what `run_extraction` does) and
when a new one is started for each shard (what it did before). The process first builds a
CLIP ViT-B/16 teacher so forking workers costs what it costs beside a real teacher.

    .venv/bin/python benchmarks/render_workers.py
    .venv/bin/python benchmarks/render_workers.py --shard-size 256 --workers 14
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings

from _common import machine_facts, make_shards, table, write_json


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shards", type=int, default=16)
    p.add_argument("--shard-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()
    warnings.filterwarnings("ignore", message=".*HAS RANDOM WEIGHTS.*")
    from mrmae.shared.shards import read_shard
    from mrmae.extract.config import ExtractConfig
    from mrmae.extract.teacher_stage import render_loader, teacher_batches
    from mrmae.shared.teachers.base import build_teacher
    from mrmae.shared.views import ViewConfig

    held = build_teacher("clip:ViT-B-16")  # the workers fork from a process holding a teacher, as in extraction
    cfg = ExtractConfig(shards=[], out="", teacher="", views=ViewConfig(per_image=2, seed=0), batch_size=64,
                        workers=args.workers)
    with tempfile.TemporaryDirectory() as tmp:
        samples = [read_shard(str(u)) for u in make_shards(tmp, args.shards * args.shard_size, args.shard_size)]

    def views_per_s(once: bool) -> float:
        t0, views = time.perf_counter(), 0
        shared = render_loader(cfg, 224) if once else None
        for shard in samples:
            for batch in teacher_batches(shard, shared or render_loader(cfg, 224), cfg, None, lambda k, r: None):
                views += len(batch)
        return views / (time.perf_counter() - t0)

    rates: dict[str, list[float]] = {"per shard": [], "once": []}
    for _ in range(args.reps):
        for mode in rates:
            rates[mode].append(views_per_s(mode == "once"))
    del held
    med = {mode: statistics.median(r) for mode, r in rates.items()}
    ratio = med["once"] / med["per shard"]
    path = write_json("render_workers", {"benchmark": "render_workers", "machine": machine_facts(),
                                         "params": vars(args), "views_per_s": rates, "ratio_once_over_per_shard": ratio})
    print(table(["workers started", "views/s (median)", "reps"],
                [[mode, med[mode], " ".join(f"{v:.0f}" for v in r)] for mode, r in rates.items()]))
    print(f"ratio once / per shard: {ratio:.2f}x ({args.shards} shards of {args.shard_size} images, "
          f"{args.workers} workers) -> {path}")


if __name__ == "__main__":
    main()

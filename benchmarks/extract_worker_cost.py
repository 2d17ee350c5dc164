"""Extraction's worker-side cost per view: decode + render (the default on a CPU) against
decode only (`--render-on-device`, where the teacher's device renders), side by side.

One process, the same tars, the two modes alternating in every repetition, each through
a real DataLoader with one worker doing what extraction's workers do (`RenderTasks`: PIL
decode, view boxes and, in "render" mode, the K views at 224 px) and handing each task to
the main process in shared memory. The cost is the worker's own CPU seconds
(`time.process_time` in the worker: its pickling thread included, other processes on the
machine not; the first task, which pays for the warm-up, left out); wall seconds beside.
The ratio decode / render is the share of the workers' work left when the device renders:
the ceiling on how much faster the same cores can feed a GPU.

    .venv/bin/python benchmarks/extract_worker_cost.py             # ~1 minute on 2 cores
    .venv/bin/python benchmarks/extract_worker_cost.py --views 4 --images 128
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

from _common import machine_facts, make_shards, table, write_json
from torch.utils.data import DataLoader

from mrmae.extract.mapper import RenderTasks, ShardTasks
from mrmae.shared.views import ViewConfig

MODES = ("render", "decode")  # extract/mapper.py WORK: the workers' render, or decode only


class TimedTasks(RenderTasks):
    """RenderTasks that also return the worker's CPU seconds so far, at the end of each task."""

    def __getitem__(self, task):
        chunk = super().__getitem__(task)
        return chunk, time.process_time()


def time_mode(samples: list, work: str, per_image: int) -> dict:
    """One pass over `samples` through a one-worker DataLoader in `work` mode -> the worker's
    CPU seconds and the wall seconds for every task but the first, their views, bytes handed over."""
    tasks = ShardTasks()
    tasks.set(samples, None)
    loader = DataLoader(TimedTasks(ViewConfig(per_image=per_image, seed=0), 224, None, work), batch_size=None,
                        sampler=tasks, num_workers=1, prefetch_factor=4)
    stamps, views, handed = [], 0, 0
    for chunk, cpu in loader:
        stamps.append((cpu, time.perf_counter()))
        if len(stamps) > 1:
            views += sum(len(r.crops) for r in chunk)
            handed += chunk[0].pixels.untyped_storage().nbytes()
    return {"cpu_s": stamps[-1][0] - stamps[0][0], "wall_s": stamps[-1][1] - stamps[0][1], "views": views,
            "bytes_handed_over": handed}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=64, help="demo images (~200-600 px a side, ImageNet-like JPEGs)")
    p.add_argument("--views", default="2,4,10", help="views per image (K), comma-separated")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--name", default="extract_worker_cost", help="results/<name>.json")
    args = p.parse_args()
    from mrmae.shared.shards import read_shard

    with tempfile.TemporaryDirectory() as tmp:
        samples = [s for u in make_shards(tmp, args.images, args.images) for s in read_shard(str(u))]
    results, rows = {}, []
    for k in (int(v) for v in args.views.split(",")):
        runs: dict[str, list[dict]] = {m: [] for m in MODES}
        for _ in range(args.reps):
            for mode in MODES:
                runs[mode].append(time_mode(samples, mode, k))
        us = {m: statistics.median(r["cpu_s"] / r["views"] for r in runs[m]) * 1e6 for m in MODES}
        ratio = us["decode"] / us["render"]
        results[f"K={k}"] = {"runs": runs, "cpu_us_per_view": us, "ratio_decode_over_render": ratio,
                             "bytes_per_view": {m: runs[m][0]["bytes_handed_over"] / runs[m][0]["views"]
                                                for m in MODES}}
        rows.append([k, us["render"], us["decode"], ratio, 1e6 / us["render"], 1e6 / us["decode"]])
    path = write_json(args.name, {"benchmark": "extract_worker_cost", "machine": machine_facts(),
                                  "params": vars(args), "results": results})
    print(table(["K", "render us/view", "decode us/view", "decode / render", "views/s/core render",
                 "views/s/core decode"], rows))
    print(f"a worker's CPU per view, median of {args.reps} alternating reps, {args.images} demo images -> {path}")


if __name__ == "__main__":
    main()

"""Helpers shared by the benchmark scripts: machine facts, demo views, tables, JSON output."""

from __future__ import annotations

import argparse
import time
import statistics

import datetime as dt
import json
import os
import platform
import resource
import sys
from pathlib import Path

import torch

from mrmae.demo import write_demo_shards
from mrmae.extract.mapper import render_sample
from mrmae.extract.reader import read_shard
from mrmae.shared.views import ViewConfig

RESULTS = Path(__file__).resolve().parent / "results"
RANDOM_WEIGHTS_NOTE = ("teachers have RANDOM weights (no model hub here): fine for throughput and "
                       "codec speed; compressibility and int8 error of trained-teacher activations may differ")


def machine_facts() -> dict:
    import numcodecs
    import zarr

    return {
        "date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "processor": _cpu_model(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "loadavg_1_5_15": [round(x, 2) for x in os.getloadavg()],
        "zarr": zarr.__version__,
        "numcodecs": numcodecs.__version__,
    }


def warn_if_busy() -> None:
    """Timings are only meaningful on an otherwise idle machine: say so when it is not."""
    load = os.getloadavg()[0]
    if load > 0.5:
        print(f"warning: 1-min load average is {load:.2f} before starting: other processes may skew timings",
              flush=True)


class ForeignCpu:
    """CPU seconds used by processes other than this one (and its reaped children) since start.

    Linux only (/proc/stat); a non-zero value means other work competed with the timings.
    """

    def __init__(self) -> None:
        self.start = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float]:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        busy = (fields[0] + fields[1] + fields[2] + fields[5] + fields[6]) / os.sysconf("SC_CLK_TCK")
        own = sum(getattr(resource.getrusage(w), a) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
                  for a in ("ru_utime", "ru_stime"))
        return busy, own

    def seconds(self) -> float:
        busy, own = self._sample()
        return max(0.0, (busy - self.start[0]) - (own - self.start[1]))


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def make_shards(out_dir: str | Path, num_images: int, shard_size: int) -> list[Path]:
    return write_demo_shards(out_dir, num_images=num_images, shard_size=shard_size, seed=0)


def render_views(shards: list[Path], views: ViewConfig, input_size: int) -> torch.Tensor:
    """Every view of every sample, rendered by the extraction mapper: uint8 [N, 3, S, S]."""
    pixels = [render_sample(s, views, input_size).pixels for url in shards for s in read_shard(str(url))]
    return torch.cat(pixels)


def table(headers: list[str], rows: list[list]) -> str:
    cells = [headers] + [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(x) -> str:
    if isinstance(x, float):
        return f"{x:.3f}" if abs(x) < 10 else f"{x:.1f}"
    return str(x)


def write_json(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=1) + "\n")
    return path


def codec_parser(doc: str, name: str) -> argparse.ArgumentParser:
    """The options both codec benchmarks take: teacher, views measured, repetitions, output name."""
    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    p.add_argument("--teacher", default="clip:ViT-S-16")
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--views", type=int, default=2, help="views per image (N = images x views)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--name", default=name, help="results/<name>.json")
    return p


def median_seconds(fn, reps: int) -> float:
    """Median wall time of `reps` calls of fn()."""
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)

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
from mrmae.shared.shards import read_shard
from mrmae.shared.views import View, ViewConfig, sample_views

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


def views_per_image(keys: list[str], images: list[torch.Tensor], per_image: int
                    ) -> tuple[list[torch.Tensor], list[View]]:
    """The extraction's views (seed 0) of decoded images [3, H, W], as parallel lists: each
    image repeated once per view, for the device renderers."""
    out_images, views = [], []
    for key, image in zip(keys, images):
        for v in sample_views(key, image.shape[1], image.shape[2], ViewConfig(per_image=per_image, seed=0)):
            out_images.append(image)
            views.append(v)
    return out_images, views


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


def write_json(name: str, payload: dict, out: str | Path | None = None) -> Path:
    """Write results/<name>.json, or `out` when given (tests and dry runs keep recorded results)."""
    path = Path(out) if out else RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
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


class PeakMemory:
    """Peak memory of one measurement, in MiB, per device.

    CUDA: the caching allocator's peak (`torch.cuda.max_memory_allocated`) since `reset()`:
    tensors only, what the modes differ in. CPU: the process's peak RSS (VmHWM) since
    `reset()`, which writes 5 to /proc/self/clear_refs (Linux >= 4.0) to lower the high-water
    mark to the current RSS; it includes everything resident, so only differences between
    modes mean much. Where the reset is refused the peak is the process's since exec.
    """

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")
        self.kind = "cuda max_memory_allocated" if self.cuda else "process VmHWM (RSS peak)"

    def reset(self) -> None:
        import gc

        gc.collect()  # drop the previous measurement's tensors before the new baseline
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass

    def mib(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() / 2**20
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --- pretraining steps, shared by pretrain_throughput.py and gpu_bench.py ---------------------

def base_lr(batch_size: int) -> float:
    """run_pretrain's default lr for one process: blr x batch / 256."""
    from mrmae.train.config import PretrainConfig

    return PretrainConfig.blr * batch_size / 256


def build_student(model_name: str, shards: list[str], batch_size: int, n_batches: int, accelerator, *,
                  cache=None, teacher=None, views: int = 2, decoder_dim: int = 512, decoder_depth: int = 8,
                  pin: bool = False) -> dict:
    """Student, AdamW and `n_batches` pre-loaded batches of the real StudentStream, built as
    run_pretrain builds them. The mode follows from the arguments: `cache` (a FeatureCache)
    -> cached, `teacher` (a Teacher, already on the device) -> live, neither -> plain MAE.

    `pin`: page-lock the batches, as run_pretrain's DataLoader does on CUDA (pin_memory=True),
    so host-to-device copies in the timed steps run at the speed training sees.
    """
    import itertools

    from mrmae.train.stream import DataConfig, StudentStream
    from mrmae.train.models import create_model
    from mrmae.train.pretrain import param_groups

    torch.manual_seed(0)
    teacher_dim = cache.manifest.teacher.dim if cache else (teacher.dim if teacher else 0)
    model = create_model(model_name, teacher_dim=teacher_dim, decoder_embed_dim=decoder_dim,
                         decoder_depth=decoder_depth)
    data_cfg = DataConfig(shards=list(shards), batch_size=batch_size, img_size=model.img_size,
                          views_per_image=views, teacher_size=teacher.input_size if teacher else 0)
    stream = StudentStream(data_cfg, cache)
    stream.set_epoch(0)
    batches = list(itertools.islice(iter(stream), n_batches))
    if len(batches) < n_batches:
        raise RuntimeError(f"the shards gave {len(batches)} batches of {batch_size}, {n_batches} needed")
    if pin:
        batches = [b.pin_memory() for b in batches]
    # fused AdamW on CUDA, as run_pretrain does (`fused=cuda or None`)
    optimizer = torch.optim.AdamW(param_groups(model, 0.05), lr=base_lr(batch_size), betas=(0.9, 0.95),
                                  fused=accelerator.device.type == "cuda" or None)
    model, optimizer = accelerator.prepare(model, optimizer)
    return {"model": model, "optimizer": optimizer, "teacher": teacher, "batches": batches}


def train_steps(setup: dict, accelerator, batches, lr: float, start_step: int = 0) -> list[float]:
    """Run the training loop's optimiser steps (`loop.optimiser_steps`) with pretraining's step
    (`engine.PretrainStep`) over `batches`; returns its per-step images/s.

    The loop's figure is the wall time between consecutive steps (mask, teacher forward in
    live mode, host-to-device copies, forward, backward, AdamW); each step ends in a `.item()`
    of the loss, so on CUDA the figure covers the GPU's work too.
    """
    from mrmae.train.engine import PretrainStep
    from mrmae.train.config import StepOptions
    from mrmae.train.run.loop import optimiser_steps

    step = PretrainStep(setup["model"], accelerator, StepOptions(), setup["teacher"])
    images = len(setup["batches"][0]) * accelerator.num_processes  # (`batches` may be a timed generator)
    records = optimiser_steps(setup["model"], setup["optimizer"], accelerator, ([b] for b in batches), step,
                              lambda _step: lr, 0, start_step, images)
    return [record.images_per_s for record in records]

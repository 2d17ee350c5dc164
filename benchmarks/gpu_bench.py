"""GPU benchmark in one go: teachers, extraction, pretraining modes, loaders, peak memory.

One process, one card, one run, so every ratio compares figures measured side by side:

- teacher_b16 / teacher_l14: images/s of the frozen teacher's forward (`build_teacher`,
  random weights, bf16 autocast, incl. the last block's [CLS] attention the cache stores)
  on device-resident random batches of 256 views (224 px for /16, 196 px for /14);
- render_workers / render_device: the extraction's input side alone (tar reading, view
  rendering in the DataLoader workers; + nvjpeg decode and device rendering), no teacher;
- render_one_by_one / render_exact: the device renderers alone on one batch of decoded
  images (torchvision per view vs shared/batch_render.py's batched exact matmuls);
- extraction: `run_extraction` end to end with --device cuda (read tar, decode, render,
  teacher, int8 quantise, compress, write Zarr) over demo shards of ImageNet-sized JPEGs
  (~200-600 px a side, `mrmae.demo.write_demo_shards`) after one warm-up shard;
  views/s from the runner's loop seconds (the teacher's construction left out);
- pretrain_{plain,cached,live_b16,live_l14}: the engine's step (`PretrainStep`, run by
  `loop.optimiser_steps`: mask, live teacher forward, host-to-device copies of pinned batches, forward, backward, fused
  AdamW) on the ViT-B student, bf16 under accelerate as `mrmae pretrain` runs it; the
  cache is the extraction's (B/16). `_compiled`: the same after `torch.compile` (what
  `accelerate launch --dynamo_backend inductor` does to the prepared model);
- loader_cached / loader_plain: images/s of ONE DataLoader worker: StudentStream joined with
  the cache vs MAE's webdataset + torchvision RandomResizedCrop loader (loader_throughput.py);
- extraction_e2e_{b16,l14}_k{K} and pretrain_e2e_{plain,cached,live_b16}[_compiled]: the
  commands as a user runs them on a GPU host, with the real loader and cores - 2 workers
  (extraction renders on the device, CUDA's default), against the forward-only and
  step-only rows above; their ratio rows carry issue 14's goals (>= 0.8x, >= 0.9x, and
  end-to-end cached >= 1.3x live B/16);
- peak MiB: `torch.cuda.max_memory_allocated` per measurement (reset before each; a live
  mode's teacher weights count, batches waiting in pinned host memory do not).

Each measurement runs a few untimed steps, then up to 10 timed ones within a time budget
(Settings); rates are medians of the timed steps. Modes run one after another, each freeing
the last, so peaks do not mix; a failed measurement is reported and the rest still run.
The table printed last holds every figure, the ratios and, where the project has one, the
H200 anchor (../shared/reference/ANCHORS.md: torch 2.11, the public reference model).
--dry: ViT-tiny student, ViT-S-16 / timm ViT-tiny as the B/16 / L/14 stand-ins, batch 2.

    .venv/bin/python benchmarks/gpu_bench.py        # CUDA (its run time: BENCHMARKS.md)
    .venv/bin/python benchmarks/gpu_bench.py --dry  # CPU smoke run of the same code
    # one part, with a cProfile of the extraction runs' main thread:
    .venv/bin/python benchmarks/gpu_bench.py --only teacher_b16,extraction --profile prof/

Writes benchmarks/results/gpu_bench.json (--dry: a temp file), or --out PATH.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch

from _common import (RANDOM_WEIGHTS_NOTE, PeakMemory, base_lr, build_student, machine_facts, make_shards, table,
                     train_steps, views_per_image, warn_if_busy, write_json)
from loader_throughput import measure_loaders


@dataclass(frozen=True)
class Settings:
    device: str
    student: str
    decoder_dim: int
    decoder_depth: int
    teachers: dict[str, str]  # role -> spec; extraction and the cache use "b16"
    batch: int  # teacher forward, extraction and student batches
    warmup: int  # untimed steps per measurement
    steps: int  # timed steps per measurement, fewer if the budget runs out first
    budget_s: float  # timed seconds per measurement, at most (at least 2 steps)
    views: int  # per image, in the cache
    shard_size: int
    extract_shards: int  # timed; a shard of one teacher batch (batch / views images) warms extraction up
    extract_workers: int
    loader_batch: int
    loader_budget_s: float
    compile_backend: str  # inductor on CUDA; "eager" (dynamo tracing only) keeps --dry cheap
    distinct_batches: int  # pre-loaded per mode and cycled through (extract_shards x shard_size images suffice)
    threads: int = 0  # torch intra-op threads; 0: torch's default
    anchors: dict[str, float] = field(default_factory=dict)
    e2e_workers: int = 0  # DataLoader workers of the end-to-end rows (a GPU host: cores - 2)
    e2e_views: tuple[int, ...] = (2,)  # K of the end-to-end extraction rows
    e2e_epochs: int = 1  # end-to-end pretraining: passes over the timed shards (each restarts the workers)


# The project's H200 figures (ANCHORS.md): images/s, and the ratios they imply.
H200 = {"teacher_b16": 8698, "teacher_l14": 2308, "pretrain_plain": 3400, "pretrain_cached": 3201,
        "pretrain_live_b16": 2370, "pretrain_live_l14": 1378, "pretrain_cached_compiled": 4759, "loader_plain": 400,
        "ratio:cached/plain": 3201 / 3400, "ratio:cached/live_b16": 3201 / 2370, "ratio:cached/live_l14": 3201 / 1378,
        "ratio:compiled/eager_cached": 4759 / 3481}
GPU = Settings("cuda", "mrmae_vit_base_patch16", 512, 8, {"b16": "clip:ViT-B-16", "l14": "clip:ViT-L-14"}, 256,
               warmup=3, steps=20, budget_s=15.0, views=2, shard_size=512, extract_shards=4, extract_workers=14,
               loader_batch=64, loader_budget_s=30.0, compile_backend="inductor", distinct_batches=2, anchors=H200,
               e2e_workers=max(1, (os.cpu_count() or 4) - 2), e2e_views=(4, 10), e2e_epochs=3)
DRY = Settings("cpu", "mrmae_vit_tiny_patch16", 64, 1, {"b16": "clip:ViT-S-16", "l14": "dino:vit_tiny_patch16_224"}, 2,
               warmup=1, steps=2, budget_s=5.0, views=2, shard_size=2, extract_shards=1, extract_workers=0,
               loader_batch=2, loader_budget_s=1.0, compile_backend="eager", distinct_batches=1,
               threads=1)  # one thread: a smoke run beside other jobs, where spinning OpenMP threads crawl
# Goals of issue 14 for the end-to-end rows (ratio rows carry them; goals.py-style "met"/"MISSED").
E2E_GOALS = {"extraction_e2e": 0.8, "pretrain_e2e": 0.9, "e2e_cached/e2e_live_b16": 1.3}
PRETRAIN_MODES = ("plain", "cached", "live_b16", "live_l14")


def timed(step: Callable[[], None], s: Settings) -> list[float]:
    """Seconds of each timed call of step() after s.warmup untimed ones, the device synchronised."""
    sync = torch.cuda.synchronize if s.device.startswith("cuda") else (lambda: None)
    for _ in range(s.warmup):
        step()
    sync()
    times: list[float] = []
    t_begin = time.perf_counter()
    while len(times) < s.steps and (len(times) < 2 or time.perf_counter() - t_begin < s.budget_s):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    return times


def bench_teacher(teacher, s: Settings, mem: PeakMemory) -> dict:
    teacher.to(s.device)
    mem.reset()
    x = torch.randn(s.batch, 3, teacher.input_size, teacher.input_size, device=s.device)
    cuda = s.device.startswith("cuda")

    def step() -> None:
        with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=cuda):
            teacher(x)

    times = timed(step, s)
    peak = mem.mib()
    teacher.to("cpu")  # off the card, so it does not count in the next measurements' peaks
    return {"value": s.batch / statistics.median(times), "unit": "img/s", "peak_mib": peak,
            "what": f"{teacher.spec} forward + [CLS] attn, {teacher.input_size} px, B={s.batch}", "step_s": times}


def bench_extraction(warm: list[Path], shards: list[Path], tmp: Path, s: Settings, mem: PeakMemory,
                     on_device: bool = False, profile: Path | None = None) -> dict:
    """run_extraction end to end; `on_device`: --decode-on-device (nvjpeg) with --store-pixels zstd.
    `profile`: also write the main thread's cProfile of the timed run there (top functions)."""
    from mrmae.extract.config import ExtractConfig
    from mrmae.extract.runner import run_extraction
    from mrmae.shared.views import ViewConfig

    def cfg(urls: list[Path], out: str) -> ExtractConfig:
        return ExtractConfig(shards=[str(u) for u in urls], out=str(tmp / out), teacher=s.teachers["b16"],
                             views=ViewConfig(per_image=s.views, seed=0), batch_size=s.batch, device=s.device,
                             workers=s.extract_workers, progress=False, decode_on_device=on_device,
                             store_pixels="zstd" if on_device else None)

    tag = "-device" if on_device else ""
    run_extraction(cfg(warm, f"cache-warmup{tag}"))  # kernels, allocator, page cache
    mem.reset()
    profiler = cProfile.Profile() if profile else None
    t0 = time.perf_counter()
    if profiler:
        profiler.enable()
    summary = run_extraction(cfg(shards, f"cache{tag}"))
    wall, loop = time.perf_counter() - t0, max(summary["seconds"], 1e-3)
    if profiler:
        profiler.disable()
        text = io.StringIO()
        for order in ("tottime", "cumulative"):
            pstats.Stats(profiler, stream=text).sort_stats(order).print_stats(30)
        profile.mkdir(parents=True, exist_ok=True)
        (profile / f"extraction{tag}.txt").write_text(text.getvalue())
    return {"value": summary["views"] / loop, "unit": "views/s", "peak_mib": mem.mib(),
            "what": f"run_extraction {s.teachers['b16']}, {len(shards)} x {s.shard_size} img x {s.views} views, "
                    f"workers {s.extract_workers}", "images_per_s": summary["views"] / s.views / loop,
            "loop_s": loop, "wall_s_incl_teacher_build": wall, "views": summary["views"]}


def bench_render(shards: list[Path], s: Settings, on_device: bool = False) -> dict:
    """The extraction's input side alone, no teacher: views/s of reading the tars and
    rendering views in the DataLoader workers into teacher batches (the teacher stage's
    `teacher_batches`), plus, `on_device`, nvjpeg decode and device rendering of each batch.
    Extraction cannot run faster than this; compare it with the teacher's forward rate."""
    from mrmae.shared.shards import read_shard
    from mrmae.extract.config import ExtractConfig
    from mrmae.extract.teacher_stage import device_views, render_loader, teacher_batches
    from mrmae.shared.views import ViewConfig

    cfg = ExtractConfig(shards=[], out="", teacher="", views=ViewConfig(per_image=s.views, seed=0),
                        batch_size=s.batch, device=s.device, workers=s.extract_workers, decode_on_device=on_device,
                        render_on_device=None if on_device else False)  # False: the workers render, as measured
    loader = render_loader(cfg, 224)
    sync = torch.cuda.synchronize if s.device.startswith("cuda") else (lambda: None)
    views, t0 = 0, time.perf_counter()
    for url in shards:
        for batch in teacher_batches(read_shard(str(url)), loader, cfg, None, lambda key, reason: None):
            if on_device:
                device_views(batch, (224,), s.device)
            views += len(batch)
    sync()
    seconds = time.perf_counter() - t0
    how = "image headers, nvjpeg decode + device render" if on_device else "PIL decode + render"
    return {"value": views / seconds, "unit": "views/s", "seconds": seconds,
            "what": f"input side only: read + {how}, {len(shards)} shards, workers {s.extract_workers}"}


def bench_extraction_e2e(role: str, views: int, shards: list[Path], tmp: Path, s: Settings, mem: PeakMemory) -> dict:
    """`mrmae extract-features` as a user runs it on a GPU host: the real loader with cores - 2
    workers decoding with PIL, views rendered on the device (--render-on-device, CUDA's
    default), the teacher `role` (b16 | l14), K = `views`, int8 Zarr; views/s of the runner's
    loop after a warm-up run. Compare with teacher_<role>'s forward-only img/s (goal >= 0.8x)."""
    from mrmae.extract.config import ExtractConfig
    from mrmae.extract.runner import run_extraction
    from mrmae.shared.views import ViewConfig

    def cfg(urls: list[Path], out: str) -> ExtractConfig:
        return ExtractConfig(shards=[str(u) for u in urls], out=str(tmp / out), teacher=s.teachers[role],
                             views=ViewConfig(per_image=views, seed=0), batch_size=s.batch, device=s.device,
                             workers=s.e2e_workers, progress=False)

    run_extraction(cfg(shards[:1], f"e2e-warm-{role}-{views}"))
    mem.reset()
    summary = run_extraction(cfg(shards, f"e2e-{role}-{views}"))
    loop = max(summary["seconds"], 1e-3)
    return {"value": summary["views"] / loop, "unit": "views/s", "peak_mib": mem.mib(), "loop_s": loop,
            "what": f"extract-features {s.teachers[role]}, K={views}, workers {s.e2e_workers}, "
                    f"render on device {cfg(shards, '').renders_on_device}, {summary['views']} views"}


def bench_pretrain_e2e(mode: str, s: Settings, urls: list[str], cache_root: Path, tmp: Path,
                       compile_backend: str | None = None) -> dict:
    """`mrmae pretrain` as a user runs it: run_pretrain with its own loader (cores - 2 workers),
    `s.e2e_epochs` passes over the timed shards, images/s per step from its metrics.jsonl
    (median after the warm-up steps; each epoch's first step waits for the workers to start).
    Compare with the step-only row of the same mode (goal >= 0.9x)."""
    import json

    from mrmae.train.config import StepOptions
    from mrmae.train.config import PretrainConfig
    from mrmae.train.pretrain import run_pretrain

    tag = f"{mode}{'_compiled' if compile_backend else ''}"
    cfg = PretrainConfig(shards="::".join(urls), out=str(tmp / f"e2e-run-{tag}"), model=s.student,
                         feature_cache=str(cache_root) if mode == "cached" else None,
                         teacher=s.teachers["b16"] if mode == "live_b16" else None, epochs=s.e2e_epochs,
                         batch_size=s.batch, decoder_dim=s.decoder_dim, decoder_depth=s.decoder_depth,
                         views_per_image=s.views, workers=s.e2e_workers, compile=compile_backend, progress=False,
                         step_options=StepOptions(mask="focused" if mode != "plain" else "random"))
    t0 = time.perf_counter()
    result = run_pretrain(cfg)
    wall = time.perf_counter() - t0
    rates = [json.loads(line)["images_per_s"] for line in Path(result["metrics"]).read_text().splitlines()]
    timed = rates[s.warmup:] or rates
    return {"value": statistics.median(timed), "unit": "img/s", "what": f"mrmae pretrain {tag}, {s.student} "
            f"B={s.batch}, workers {s.e2e_workers}, {result['steps']} steps", "images_per_s_all_steps": rates,
            "wall_s": wall, "images_per_s_wall": result["steps"] * s.batch / wall}


def bench_render_kernels(shards: list[Path], s: Settings) -> dict:
    """The device renderers alone on one teacher batch of views, images decoded on the device
    beforehand: torchvision view by view (the old path) vs shared/batch_render.render_exact
    (batched integer-exact matmuls, the path now), timed on the same views; and the share
    of each one's pixels that differ from the CPU render (exact: 0 by construction)."""
    from mrmae.shared.batch_render import render_exact, render_one_by_one
    from mrmae.extract.device_decode import decode_batch
    from mrmae.shared.shards import read_shard

    samples = read_shard(str(shards[0]))[:max(1, s.batch // s.views)]
    decoded = decode_batch([x.image for x in samples], s.device)
    images, views = views_per_image([x.key for x in samples], decoded, s.views)
    on_cpu = {id(im): im.cpu() for im in decoded}
    reference = render_one_by_one([on_cpu[id(im)] for im in images], views, 224)
    rows = {}
    for name, render in (("one_by_one", render_one_by_one), ("exact", render_exact)):
        rate = len(views) / statistics.median(timed(lambda r=render: r(images, views, 224), s))
        off = (render(images, views, 224).cpu() != reference).float().mean().item()
        rows[f"render_{name}"] = {"value": rate, "unit": "views/s",
                                  "what": f"device render of {len(views)} views, 224 px, decoded beforehand"}
        rows[f"render_{name}_pixels_off"] = {"value": off, "unit": "fraction",
                                             "what": f"share of {name}'s pixels unlike the CPU render's"}
    return rows


def bench_pretrain(mode: str, s: Settings, urls: list[str], cache_root: Path, teachers: dict, accelerator,
                   mem: PeakMemory, compile_backend: str | None = None) -> dict:
    from mrmae.shared import cache_format as cf

    accelerator.free_memory()  # the accelerator holds the previous mode's model and optimiser
    mem.reset()
    teacher = teachers[mode.split("_", 1)[1]].to(s.device) if mode.startswith("live") else None
    cache = cf.FeatureCache(cache_root) if mode == "cached" else None
    setup = build_student(s.student, urls, s.batch, s.distinct_batches, accelerator, cache=cache, teacher=teacher,
                          views=s.views, decoder_dim=s.decoder_dim, decoder_depth=s.decoder_depth,
                          pin=s.device.startswith("cuda"))
    if compile_backend:
        setup["model"] = torch.compile(setup["model"], backend=compile_backend)
    batches, t_timed = setup["batches"], [0.0]

    def feed():
        """warm-up + timed batches, cycling the pre-loaded ones; stops once the budget is spent."""
        for i in range(s.warmup + s.steps):
            if i == s.warmup:
                t_timed[0] = time.perf_counter()
            elif i > s.warmup + 2 and time.perf_counter() - t_timed[0] > s.budget_s:
                return
            yield batches[i % len(batches)]

    t0 = time.perf_counter()
    rates = train_steps(setup, accelerator, feed(), base_lr(s.batch))
    wall = time.perf_counter() - t0
    peak = mem.mib()
    if teacher is not None:
        teacher.to("cpu")  # the next mode starts with accelerator.free_memory() and a fresh peak
    parts = [f"{s.student} B={s.batch}", f"{teacher.spec} live" if teacher is not None else "",
             f"cache of {cache.manifest.teacher.spec}" if cache else "",
             f"torch.compile {compile_backend}" if compile_backend else ""]
    what = ", ".join(part for part in parts if part)
    result = {"value": statistics.median(rates[s.warmup:]), "unit": "img/s", "peak_mib": peak, "what": what,
              "images_per_s_all_steps": rates, "wall_s": wall}
    if compile_backend:  # graph breaks would leave parts in eager: say how many graphs dynamo made
        from torch._dynamo.utils import counters

        result["dynamo"] = {"graph_breaks": sum(counters["graph_break"].values()), **counters["stats"]}
    return result


def ratio_rows(rows: dict, anchors: dict) -> dict:
    """Ratios of rows measured in this run (skipped where a row failed)."""
    def v(key: str) -> float | None:
        return rows.get(key, {}).get("value")

    def m(key: str) -> float | None:
        return rows.get(key, {}).get("peak_mib")

    specs = [("ratio:extraction/teacher_b16", v("extraction"), v("teacher_b16"), "views/s over forward-only img/s"),
             ("ratio:extraction_device_decode/teacher_b16", v("extraction_device_decode"), v("teacher_b16"),
              "nvjpeg + device render + stored views, over forward-only"),
             ("ratio:render_workers/teacher_b16", v("render_workers"), v("teacher_b16"),
              "input side alone (CPU decode), over forward-only"),
             ("ratio:render_device/teacher_b16", v("render_device"), v("teacher_b16"),
              "input side alone (nvjpeg), over forward-only"),
             ("ratio:render_exact/render_one_by_one", v("render_exact"), v("render_one_by_one"),
              "device render alone: batched exact vs torchvision per view"),
             ("ratio:cached/plain", v("pretrain_cached"), v("pretrain_plain"), "step img/s"),
             ("ratio:compiled_cached/compiled_plain", v("pretrain_cached_compiled"), v("pretrain_plain_compiled"),
              "step img/s"),
             ("ratio:cached/live_b16", v("pretrain_cached"), v("pretrain_live_b16"), "step img/s"),
             ("ratio:cached/live_l14", v("pretrain_cached"), v("pretrain_live_l14"), "step img/s"),
             ("ratio:live_b16/plain", v("pretrain_live_b16"), v("pretrain_plain"), "step img/s"),
             ("ratio:live_l14/plain", v("pretrain_live_l14"), v("pretrain_plain"), "step img/s"),
             ("ratio:compiled/eager_cached", v("pretrain_cached_compiled"), v("pretrain_cached"), "step img/s"),
             ("ratio:loader_cached/plain", v("loader_cached"), v("loader_plain"), "img/s per worker"),
             ("workers_to_feed:cached", v("pretrain_cached"), v("loader_cached"), "cached step / cached loader worker"),
             ("workers_to_feed:cached_compiled", v("pretrain_cached_compiled"), v("loader_cached"),
              "compiled step / cached loader worker"),
             ("memory:cached/plain", m("pretrain_cached"), m("pretrain_plain"), "peak"),
             ("memory:live_b16/plain", m("pretrain_live_b16"), m("pretrain_plain"), "peak"),
             ("memory:live_l14/plain", m("pretrain_live_l14"), m("pretrain_plain"), "peak")]
    out = {name: {"value": a / b, "unit": "x", "what": what, "anchor_h200": anchors.get(name)}
           for name, a, b, what in specs if a and b}
    return {**out, **e2e_ratio_rows(rows)}


def e2e_ratio_rows(rows: dict) -> dict:
    """The end-to-end rows over what bounds them, each with its goal and whether it is met."""
    def v(key: str) -> float | None:
        return rows.get(key, {}).get("value")

    specs = [(f"ratio:{k}/teacher_{k.split('_')[2]}", v(k), v(f"teacher_{k.split('_')[2]}"), E2E_GOALS["extraction_e2e"],
              "end-to-end extraction views/s over forward-only img/s") for k in rows if k.startswith("extraction_e2e_")]
    specs += [(f"ratio:{k}/{k.replace('_e2e', '')}", v(k), v(k.replace("_e2e", "")), E2E_GOALS["pretrain_e2e"],
               "end-to-end step img/s (real loader) over step-only img/s") for k in rows if k.startswith("pretrain_e2e_")]
    specs.append(("ratio:e2e_cached/e2e_live_b16", v("pretrain_e2e_cached"), v("pretrain_e2e_live_b16"),
                  E2E_GOALS["e2e_cached/e2e_live_b16"], "end-to-end img/s"))
    return {name: {"value": a / b, "unit": "x", "goal": goal, "met": a / b >= goal,
                   "what": f"{what} (goal >= {goal}: {'met' if a / b >= goal else 'MISSED'})"}
            for name, a, b, goal, what in specs if a and b}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dry", action="store_true", help="CPU, tiny sizes: the same code path in well under a minute")
    p.add_argument("--out", help="JSON path (default results/gpu_bench.json; --dry: a temp file)")
    p.add_argument("--compile", default="cached", help="comma-separated pretrain modes to also run compiled; '' none")
    p.add_argument("--max-seconds", type=float, default=540, help="skip compiled modes that would start later than "
                   "this minus --compile-seconds")
    p.add_argument("--compile-seconds", type=float, default=150, help="time to allow one compiled mode")
    p.add_argument("--only", default="", help="comma-separated measurements to run (e.g. teacher_b16,extraction); "
                   "default all. Cached pretraining reads the cache `extraction` writes")
    p.add_argument("--shard-size", type=int, help="images per demo shard (the timed images stay "
                   "shard size x extract shards of the settings)")
    p.add_argument("--profile", help="folder for cProfile reports of the extraction runs' main thread")
    args = p.parse_args()
    s = DRY if args.dry else GPU
    if args.shard_size:  # per-shard costs (reading, worker start, digests) against the same images
        s = replace(s, shard_size=args.shard_size, extract_shards=max(1, s.shard_size * s.extract_shards
                                                                        // args.shard_size))
    if not args.dry and not torch.cuda.is_available():
        raise SystemExit("gpu_bench: no CUDA device here; --dry runs the same code on the CPU with tiny sizes")
    out = args.out or (Path(tempfile.gettempdir()) / "mrmae_gpu_bench_dry.json" if args.dry else None)
    warnings.filterwarnings("ignore", message=".*HAS RANDOM WEIGHTS.*")
    if s.threads:
        torch.set_num_threads(s.threads)
    from accelerate import Accelerator

    from mrmae.shared.teachers.base import build_teacher

    warn_if_busy()
    t_start = time.perf_counter()
    cuda = s.device.startswith("cuda")
    device_name = torch.cuda.get_device_name(0) if cuda else f"cpu (dry run; {os.cpu_count()} cores)"
    mem, rows, errors, facts = PeakMemory(s.device), {}, {}, machine_facts()

    def save(final: bool = False) -> Path:
        """The JSON so far: a run cut short by its time limit still leaves every finished row."""
        payload = {"benchmark": "gpu_bench", "dry": args.dry, "complete": final, "device": device_name,
                   "torch": torch.__version__, "cuda": torch.version.cuda, "date_utc": facts["date_utc"],
                   "command": " ".join(["benchmarks/gpu_bench.py", *sys.argv[1:]]), "note": RANDOM_WEIGHTS_NOTE,
                   "memory_kind": mem.kind, "settings": asdict(s), "machine": facts,
                   "rows": {**rows, **ratio_rows(rows, s.anchors)}, "errors": errors,
                   "total_seconds": time.perf_counter() - t_start}
        return write_json("gpu_bench", payload, out)

    only = {n for n in args.only.split(",") if n}

    def attempt(name: str, fn: Callable[[], dict | None]) -> None:
        if only and name not in only:
            return
        t0 = time.perf_counter()
        try:
            result = fn()
        except Exception as e:  # one failure must not cost the rest of a scarce GPU slot
            traceback.print_exc()
            errors[name] = f"{type(e).__name__}: {str(e)[:300]}"
            print(f"FAILED {name} [{time.perf_counter() - t_start:.0f} s]", flush=True)
            save()
            return
        for key, row in ({name: result} if "value" in result else result).items():
            rows[key] = {**row, "anchor_h200": s.anchors.get(key)}
            peak = f", peak {row['peak_mib']:.0f} MiB" if "peak_mib" in row else ""
            print(f"{key}: {row['value']:.1f} {row['unit']}{peak} ({time.perf_counter() - t0:.0f} s) "
                  f"[{time.perf_counter() - t_start:.0f} s]", flush=True)
        save()

    with tempfile.TemporaryDirectory(prefix="mrmae-gpu-bench-") as tmp_dir:
        tmp = Path(tmp_dir)
        timed_shards = make_shards(tmp / "shards", s.shard_size * s.extract_shards, s.shard_size)
        warm = make_shards(tmp / "warm", max(1, s.batch // s.views), s.shard_size)[:1]  # one teacher batch
        urls = [str(u) for u in timed_shards]
        print(f"{len(timed_shards)} shards of {s.shard_size} demo JPEGs [{time.perf_counter() - t_start:.0f} s]",
              flush=True)
        teachers = {role: build_teacher(spec) for role, spec in s.teachers.items()}
        for role, teacher in teachers.items():
            attempt(f"teacher_{role}", lambda t=teacher: bench_teacher(t, s, mem))
        attempt("render_workers", lambda: bench_render(timed_shards, s))
        attempt("render_kernels", lambda: bench_render_kernels(timed_shards, s))
        attempt("render_device", lambda: bench_render(timed_shards, s, on_device=True))
        profile = Path(args.profile) if args.profile else None
        attempt("extraction", lambda: bench_extraction(warm, timed_shards, tmp, s, mem, profile=profile))
        attempt("extraction_device_decode", lambda: bench_extraction(warm, timed_shards, tmp, s, mem, on_device=True,
                                                                     profile=profile))

        def loaders() -> dict:
            r = measure_loaders(urls, tmp / "cache", s.loader_batch, s.loader_budget_s, warmup_batches=2)
            return {f"loader_{k}": {"value": r[k]["images_per_s"], "unit": "img/s/worker", "what": what, "detail": r[k]}
                    for k, what in (("cached", "StudentStream + cache, 1 worker"),
                                    ("plain", "webdataset + torchvision RRC (MAE), 1 worker"))}

        attempt("loaders", loaders)
        for role in ("b16", "l14"):
            for k in s.e2e_views:
                attempt(f"extraction_e2e_{role}_k{k}", lambda r=role, k=k: bench_extraction_e2e(r, k, timed_shards, tmp,
                                                                                              s, mem))
        accelerator = Accelerator(mixed_precision="bf16" if cuda else "no", cpu=not cuda)
        for mode in PRETRAIN_MODES:
            attempt(f"pretrain_{mode}", lambda m=mode: bench_pretrain(m, s, urls, tmp / "cache", teachers, accelerator,
                                                                      mem))
        for mode in [m for m in args.compile.split(",") if m]:
            if time.perf_counter() - t_start > args.max_seconds - args.compile_seconds:
                errors[f"pretrain_{mode}_compiled"] = "skipped: out of time (see --max-seconds)"
                continue
            attempt(f"pretrain_{mode}_compiled", lambda m=mode: bench_pretrain(
                m, s, urls, tmp / "cache", teachers, accelerator, mem, compile_backend=s.compile_backend))
        for mode in ("plain", "cached", "live_b16"):
            attempt(f"pretrain_e2e_{mode}", lambda m=mode: bench_pretrain_e2e(m, s, urls, tmp / "cache", tmp))
        for mode in [m for m in args.compile.split(",") if m]:
            if time.perf_counter() - t_start > args.max_seconds - args.compile_seconds:
                errors[f"pretrain_e2e_{mode}_compiled"] = "skipped: out of time (see --max-seconds)"
                continue
            attempt(f"pretrain_e2e_{mode}_compiled", lambda m=mode: bench_pretrain_e2e(
                m, s, urls, tmp / "cache", tmp, compile_backend=s.compile_backend))
    path = save(final=True)
    rows.update(ratio_rows(rows, s.anchors))
    total_s = time.perf_counter() - t_start
    for name, err in errors.items():
        print(f"not measured: {name}: {err}")
    print(f"total {total_s:.0f} s -> {path}\n")
    print(f"{device_name}, torch {torch.__version__}; {s.student} (decoder {s.decoder_dim}-d x {s.decoder_depth}), "
          f"batch {s.batch}; medians of <= {s.steps} steps after {s.warmup} warm-up; peak = {mem.kind}")
    print(table(["row", "value", "unit", "peak MiB", "H200 anchor", "what"],
                [[k, r["value"], r["unit"], f"{r['peak_mib']:.0f}" if r.get("peak_mib") else "-",
                  "-" if r.get("anchor_h200") is None else r["anchor_h200"], r["what"]] for k, r in rows.items()]))


if __name__ == "__main__":
    main()

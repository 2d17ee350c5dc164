"""Pretraining throughput: plain MAE vs cached MR-MAE vs live MR-MAE, images/s and peak memory.

Same machine, student, batch and data for all three modes of `mrmae pretrain`:

- plain:  reconstruction only (no teacher, no cache);
- cached: targets and attention read from a feature cache (made once, below);
- live:   the teacher runs on every batch.

Data: demo shards (`mrmae.demo.write_demo_shards`, temp dir) holding exactly
batch x (warmup + steps) images, so one epoch is warmup + steps optimiser steps; the cache is
made once with `run_extraction` (--teacher, --views). Two measurements per mode:

- end-to-end: `run_pretrain(PretrainConfig(...))` in a fresh subprocess per mode; images/s from
  OUT/metrics.jsonl (the engine's figure: time between steps, so it includes data loading with
  --workers 0), median over the steps after the warm-up; peak RSS = the subprocess's VmHWM
  (/proc/self/status; includes the end-of-epoch checkpoint save). Not ru_maxrss: Linux keeps
  it across exec, so a child's would include the parent's peak (the JSON records it anyway).
  "RSS over imports" subtracts the peak reached after importing everything, before training.
- step-only: one more subprocess builds the three students (and the live teacher), pre-loads
  each mode's batches from the real `StudentStream`, then runs the loop's `optimiser_steps` one batch at
  a time, alternating the modes step by step (rotating which goes first) so drift hits all
  three alike. images/s is the engine's per-step figure: mask, teacher forward (live),
  forward, backward, optimiser step; no data loading. Median of --step-only-steps (4) after
  --step-only-warmup (1): fewer than end-to-end, to keep the default run near 5 minutes.

Goals (project): cached/plain images/s >= 0.93 and cached/plain peak memory <= 1.05.
Teachers have random weights (no model hub): fine for timing. torch threads: the default.

Run (about 5-6 minutes on 2 idle cores with the defaults; a student step is ~5 s there):

    .venv/bin/python benchmarks/pretrain_throughput.py
    .venv/bin/python benchmarks/pretrain_throughput.py --model mrmae_vit_tiny_patch16 --decoder-depth 2 --steps 4

Writes benchmarks/results/pretrain_throughput.json (or --name).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

MODES = ("plain", "cached", "live")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="mrmae_vit_small_patch16")
    p.add_argument("--decoder-depth", type=int, default=8)
    p.add_argument("--decoder-dim", type=int, default=512)
    p.add_argument("--teacher", default="clip:ViT-S-16")
    p.add_argument("--views", type=int, default=2, help="views per image in the cache (and live/plain)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--warmup", type=int, default=2, help="steps per mode not measured")
    p.add_argument("--steps", type=int, default=6, help="measured steps per mode")
    p.add_argument("--step-only-warmup", type=int, default=1, help="step-only steps per mode not measured")
    p.add_argument("--step-only-steps", type=int, default=4, help="step-only measured steps per mode")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers of run_pretrain")
    p.add_argument("--reps", type=int, default=1, help="end-to-end runs per mode (order rotated per rep)")
    p.add_argument("--name", default="pretrain_throughput", help="results/<name>.json")
    # internal: what a child subprocess does
    p.add_argument("--child", choices=("e2e", "steps"), help=argparse.SUPPRESS)
    p.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def peak_rss_mib() -> float:
    """This process's peak RSS since exec: VmHWM (ru_maxrss would carry the parent's peak over exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux: KiB on most systems


def shard_urls(data: Path) -> list[str]:
    return sorted(str(p) for p in (data / "shards").glob("*.tar"))


# --- child: end-to-end run_pretrain for one mode ---------------------------------------------

def child_e2e(args: argparse.Namespace, data: Path) -> dict:
    import accelerate  # noqa: F401  everything run_pretrain imports, before the baseline RSS
    import mrmae.shared.teachers  # noqa: F401
    import mrmae.train.models  # noqa: F401
    from mrmae.train.config import PretrainConfig
    from mrmae.train.pretrain import run_pretrain

    import_rss = peak_rss_mib()
    out = data / f"run-{args.mode}"
    cfg = PretrainConfig(shards="::".join(shard_urls(data)), out=str(out), model=args.model,
                         feature_cache=str(data / "cache") if args.mode == "cached" else None,
                         teacher=args.teacher if args.mode == "live" else None,
                         batch_size=args.batch_size, decoder_dim=args.decoder_dim, decoder_depth=args.decoder_depth,
                         views_per_image=args.views, workers=args.workers, progress=False)
    t0 = time.perf_counter()
    run_pretrain(cfg)
    wall = time.perf_counter() - t0
    rates = [json.loads(line)["images_per_s"] for line in (out / "metrics.jsonl").read_text().splitlines() if line]
    shutil.rmtree(out)
    peak = peak_rss_mib()
    return {"images_per_s_all_steps": rates, "images_per_s": statistics.median(rates[args.warmup:]),
            "peak_rss_mib": peak, "import_rss_mib": import_rss, "rss_over_imports_mib": peak - import_rss,
            "ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "wall_s": wall}


# --- child: step-only, the three modes alternating on pre-loaded batches ----------------------

def setup_mode(mode: str, args: argparse.Namespace, data: Path, accelerator) -> dict:
    """Student, optimiser, teacher and pre-loaded batches, built as run_pretrain builds them."""
    from _common import build_student
    from mrmae.shared import cache_format as cf
    from mrmae.shared.teachers.base import build_teacher

    return build_student(args.model, shard_urls(data), args.batch_size, args.step_only_warmup + args.step_only_steps,
                         accelerator, cache=cf.FeatureCache(data / "cache") if mode == "cached" else None,
                         teacher=build_teacher(args.teacher) if mode == "live" else None, views=args.views,
                         decoder_dim=args.decoder_dim, decoder_depth=args.decoder_depth)


def child_steps(args: argparse.Namespace, data: Path) -> dict:
    from accelerate import Accelerator

    from _common import base_lr, train_steps

    accelerator = Accelerator(mixed_precision="no")
    setups = {m: setup_mode(m, args, data, accelerator) for m in MODES}
    if len({len(s["batches"]) for s in setups.values()}) != 1:
        raise RuntimeError("modes pre-loaded different numbers of batches")
    lr = base_lr(args.batch_size)
    rates: dict[str, list[float]] = {m: [] for m in MODES}
    for i in range(len(setups["plain"]["batches"])):
        for mode in MODES[i % 3:] + MODES[:i % 3]:
            rates[mode] += train_steps(setups[mode], accelerator, [setups[mode]["batches"][i]], lr, start_step=i)
    return {m: {"images_per_s_all_steps": r, "images_per_s": statistics.median(r[args.step_only_warmup:])}
            for m, r in rates.items()}


# --- parent ----------------------------------------------------------------------------------

def run_child(args: argparse.Namespace, data: Path, child: str, mode: str | None = None) -> dict:
    result = data / f"result-{child}-{mode}.json"
    cmd = [sys.executable, __file__, "--child", child, "--data", str(data), "--result", str(result),
           "--model", args.model, "--decoder-depth", str(args.decoder_depth), "--decoder-dim", str(args.decoder_dim),
           "--teacher", args.teacher, "--views", str(args.views), "--batch-size", str(args.batch_size),
           "--warmup", str(args.warmup), "--steps", str(args.steps), "--workers", str(args.workers),
           "--step-only-warmup", str(args.step_only_warmup), "--step-only-steps", str(args.step_only_steps)]
    from _common import ForeignCpu

    other = ForeignCpu()
    subprocess.run(cmd + (["--mode", mode] if mode else []), check=True)
    return {**json.loads(result.read_text()), "foreign_cpu_s": other.seconds()}


def make_data(args: argparse.Namespace, data: Path) -> dict:
    from mrmae.demo import write_demo_shards
    from mrmae.extract.config import ExtractConfig
    from mrmae.extract.runner import run_extraction
    from mrmae.shared.views import ViewConfig

    images = args.batch_size * (args.warmup + args.steps)
    write_demo_shards(data / "shards", num_images=images, shard_size=32, seed=0)
    t0 = time.perf_counter()
    summary = run_extraction(ExtractConfig(shards=shard_urls(data), out=str(data / "cache"), teacher=args.teacher,
                                           views=ViewConfig(per_image=args.views, seed=0), batch_size=32,
                                           progress=False))
    return {"images": images, "cache_views": summary["views"], "extraction_s": time.perf_counter() - t0}


def summarise(reps: list[dict], warmup: int) -> dict:
    """Pool the measured steps of all reps (median); peak memory: the largest of the reps."""
    return {"images_per_s": statistics.median(x for r in reps for x in r["images_per_s_all_steps"][warmup:]),
            "peak_rss_mib": max(r["peak_rss_mib"] for r in reps),
            "rss_over_imports_mib": max(r["rss_over_imports_mib"] for r in reps),
            "wall_s": statistics.median(r["wall_s"] for r in reps), "reps": reps}


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def main() -> None:
    args = parse_args()
    if args.step_only_warmup + args.step_only_steps > args.warmup + args.steps:
        raise SystemExit("--step-only-warmup + --step-only-steps must not exceed --warmup + --steps (the batches made)")
    warnings.filterwarnings("ignore", message=".*HAS RANDOM WEIGHTS.*")
    if args.child:
        fn = child_e2e if args.child == "e2e" else child_steps
        Path(args.result).write_text(json.dumps(fn(args, Path(args.data))))
        return

    from _common import RANDOM_WEIGHTS_NOTE, ForeignCpu, machine_facts, table, warn_if_busy, write_json

    warn_if_busy()
    facts = machine_facts()
    t_start = time.perf_counter()
    other = ForeignCpu()
    elapsed = lambda: f"[{time.perf_counter() - t_start:.0f} s]"  # noqa: E731
    with tempfile.TemporaryDirectory(prefix="mrmae-pretrain-bench-") as tmp:
        data = Path(tmp)
        made = make_data(args, data)
        print(f"{made['images']} images, cache of {made['cache_views']} views in {made['extraction_s']:.0f} s "
              f"{elapsed()}", flush=True)
        runs: dict[str, list[dict]] = {m: [] for m in MODES}
        for rep in range(args.reps):
            for mode in MODES[rep % 3:] + MODES[:rep % 3]:
                r = run_child(args, data, "e2e", mode)
                runs[mode].append(r)
                print(f"rep {rep + 1}/{args.reps} end-to-end {mode}: {r['images_per_s']:.2f} images/s, peak RSS "
                      f"{r['peak_rss_mib']:.0f} MiB; other processes used {r['foreign_cpu_s']:.1f} CPU-s "
                      f"{elapsed()}", flush=True)
        steps = run_child(args, data, "steps")
        print("step-only: " + ", ".join(f"{m} {steps[m]['images_per_s']:.2f}" for m in MODES)
              + f" images/s; other processes used {steps['foreign_cpu_s']:.1f} CPU-s {elapsed()}", flush=True)
    total_s = time.perf_counter() - t_start
    e2e = {m: summarise(rs, args.warmup) for m, rs in runs.items()}
    foreign = other.seconds()

    def mem_over_imports(m: str) -> float:
        return e2e[m]["rss_over_imports_mib"]

    ratios = {}
    for a, b in (("cached", "plain"), ("live", "plain"), ("cached", "live")):
        ratios[f"{a}/{b}"] = {
            "e2e_images_per_s": ratio(e2e[a]["images_per_s"], e2e[b]["images_per_s"]),
            "step_only_images_per_s": ratio(steps[a]["images_per_s"], steps[b]["images_per_s"]),
            "peak_rss": ratio(e2e[a]["peak_rss_mib"], e2e[b]["peak_rss_mib"]),
            "rss_over_imports": ratio(mem_over_imports(a), mem_over_imports(b)),
        }
    command = " ".join([".venv/bin/python", "benchmarks/pretrain_throughput.py", *sys.argv[1:]])
    facts["loadavg_at_end"] = [round(v, 2) for v in __import__("os").getloadavg()]
    payload = {"benchmark": "pretrain_throughput", "command": command, "note": RANDOM_WEIGHTS_NOTE, "machine": facts,
               "params": {k: v for k, v in vars(args).items() if k not in ("child", "mode", "data", "result")},
               "data": made, "end_to_end": e2e, "step_only": steps, "ratios": ratios,
               "goals": {"cached/plain images/s": ">= 0.93", "cached/plain peak memory": "<= 1.05"},
               "foreign_cpu_seconds": foreign, "total_seconds": total_s}
    path = write_json(args.name, payload)

    print(f"\n{args.model} (decoder {args.decoder_dim}-d x {args.decoder_depth}), batch {args.batch_size}, "
          f"teacher {args.teacher}, {made['images']} images; medians of {args.steps} steps after {args.warmup} "
          f"warm-up (step-only: {args.step_only_steps} after {args.step_only_warmup}), workers {args.workers};\n"
          f"{facts['cpu_count']} CPUs, torch {facts['torch']} ({facts['torch_threads']} threads)\n")
    rows = [[m, e2e[m]["images_per_s"], steps[m]["images_per_s"], f"{e2e[m]['peak_rss_mib']:.0f}",
             f"{mem_over_imports(m):.0f}", f"{e2e[m]['wall_s']:.0f}"] for m in MODES]
    print(table(["mode", "e2e img/s", "step-only img/s", "peak RSS MiB", "RSS over imports MiB", "run_pretrain s"],
                rows))
    print()
    print(table(["ratio", "e2e img/s", "step-only img/s", "peak RSS", "RSS over imports"],
                [[k, *(f"{x:.3f}" for x in v.values())] for k, v in ratios.items()]))
    c = ratios["cached/plain"]
    print(f"\ngoals: cached/plain img/s >= 0.93 (e2e {c['e2e_images_per_s']:.3f}, step-only "
          f"{c['step_only_images_per_s']:.3f}); cached/plain peak memory <= 1.05 ({c['peak_rss']:.3f})")
    print(f"e2e includes data loading (workers {args.workers}) and peak RSS the checkpoint save; step-only alternates "
          f"modes per step on pre-loaded batches.\nnote: {RANDOM_WEIGHTS_NOTE}")
    print(f"other processes used {foreign:.1f} CPU-s meanwhile; total {total_s:.0f} s -> {path}")


if __name__ == "__main__":
    main()

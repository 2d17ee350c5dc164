"""Issue 7's goals (and issue 14's loader split) against the figures the benchmarks last
wrote to benchmarks/results/*.json.

Reads what is there (`make bench` writes the CPU files first; gpu_bench.json is whatever
a CUDA run last left) and prints one row per goal: the figure, where and when it was
measured, and met / MISSED. Nothing is measured here, and a goal whose file is absent is
listed as not measured rather than skipped, so a missing figure stays visible.

    .venv/bin/python benchmarks/goals.py            # the last step of `make bench`
"""

from __future__ import annotations

import json
from typing import Callable

from _common import RESULTS, table


def load(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def where(payload: dict) -> str:
    m = payload.get("machine", {})
    device = payload.get("device") or f"{m.get('cpu_count')}-core {m.get('processor', 'cpu')}"
    return f"{payload['benchmark']}.json, {device}, {(payload.get('date_utc') or m.get('date_utc', ''))[:10]}"


# (goal, result file, figure from it, how it is shown, test on the figure)
Figure = Callable[[dict], float]
GOALS: list[tuple[str, str, Figure, str, Callable[[float], bool]]] = [
    ("extraction >= 0.9x teacher forward (CPU, best int8 config)", "extract_throughput",
     lambda p: max(r["ratio_loop"] for r in p["extraction"] if r["dtype"] == "int8"), "{:.3f}x", lambda v: v >= 0.9),
    ("cached loader >= 0.9x plain MAE loader, per worker (CPU)", "loader_throughput",
     lambda p: p["loaders"]["ratio_cached_over_plain"], "{:.2f}x", lambda v: v >= 0.9),
    ("--pixels-from-cache loader >= 2x plain, per worker (CPU)", "loader_throughput",
     lambda p: p["loaders"]["ratio_cached_pixels_over_plain"], "{:.2f}x", lambda v: v >= 2.0),
    ("cached step time <= 1.07x plain MAE step (CPU, step only)", "pretrain_throughput",
     lambda p: 1 / p["ratios"]["cached/plain"]["step_only_images_per_s"], "{:.3f}x", lambda v: v <= 1.07),
    ("cached peak memory <= 1.05x plain (CPU, peak RSS)", "pretrain_throughput",
     lambda p: p["ratios"]["cached/plain"]["peak_rss"], "{:.3f}x", lambda v: v <= 1.05),
    ("int8 + scale <= 0.52x float16 bytes per view, raw", "codecs",
     lambda p: p["bytes_per_view"]["int8"]["raw_bytes_per_view"] / p["bytes_per_view"]["float16"]["raw_bytes_per_view"],
     "{:.3f}x", lambda v: v <= 0.52),
    ("int8 + scale <= 0.52x float16 bytes per view, on disk (each codec's best)", "codecs",
     lambda p: p["bytes_per_view"]["int8"]["disk_bytes_per_view"] / p["bytes_per_view"]["float16"]["disk_bytes_per_view"],
     "{:.3f}x", lambda v: v <= 0.52),
    ("int8 per-token relative L2 error <= 1% (max over tokens)", "codecs",
     lambda p: p["error"]["int8"]["rel_l2_max"], "{:.2e}", lambda v: v <= 0.01),
    ("extraction >= 0.8x teacher forward (GPU, PIL decode in workers)", "gpu_bench",
     lambda p: p["rows"]["ratio:extraction/teacher_b16"]["value"], "{:.3f}x", lambda v: v >= 0.8),
    ("extraction >= 0.8x teacher forward (GPU, --decode-on-device)", "gpu_bench",
     lambda p: p["rows"]["ratio:extraction_device_decode/teacher_b16"]["value"], "{:.3f}x", lambda v: v >= 0.8),
    ("cached step time <= 1.07x plain MAE step (GPU, ViT-B, bf16, eager)", "gpu_bench",
     lambda p: 1 / p["rows"]["ratio:cached/plain"]["value"], "{:.3f}x", lambda v: v <= 1.07),
    ("cached loader >= 0.9x plain per worker (GPU host's CPU)", "gpu_bench",
     lambda p: p["rows"]["ratio:loader_cached/plain"]["value"], "{:.2f}x", lambda v: v >= 0.9),
    ("gpu_bench.py finishes in < 8 min", "gpu_bench",
     lambda p: p["total_seconds"] / 60, "{:.1f} min", lambda v: v < 8),
    *[(f"--render-on-device worker CPU per image <= 0.6x workers rendering, {mode} (CPU; issue 14)",
       "loader_render_split", lambda p, m=mode: p["modes"][m]["ratio_cpu_split_over_workers"], "{:.2f}x",
       lambda v: v <= 0.6) for mode in ("cached", "live", "plain")],
]


def goal_rows() -> list[list[str]]:
    rows, cache = [], {}
    for goal, name, figure, fmt, met in GOALS:
        payload = cache.setdefault(name, load(name))
        if payload is None:
            rows.append([goal, "-", "not measured", f"no results/{name}.json"])
            continue
        try:
            value = figure(payload)
        except (KeyError, ValueError, ZeroDivisionError) as e:
            rows.append([goal, "-", "not measured", f"{name}.json lacks {e}"])
            continue
        rows.append([goal, fmt.format(value), "met" if met(value) else "MISSED", where(payload)])
    return rows


def pca_rows() -> list[list[str]]:
    """Low-rank targets: bytes and held-out error per rank (no goal figure: reported)."""
    payload = load("codecs")
    if not payload or not payload.get("pca"):
        return []
    full = payload["bytes_per_view"]["int8"]["disk_bytes_per_view"]
    fit = payload["pca"]["fit_views"]
    return [[f"PCA K={r['rank']} {r['dtype']} (fit on {fit} views)", f"{r['disk_bytes_per_view'] / full:.3f}x int8",
             "reported", f"held-out rel. error mean {r['error_held_out']['rel_l2_mean']:.3f}"
             if r.get("error_held_out") else "no held-out views"] for r in payload["pca"]["rows"]]


def bound_rows() -> list[list[str]]:
    """What limits int8 on disk: the ratio a perfect byte-at-a-time coder would reach."""
    bound = (load("codecs") or {}).get("entropy_bound")
    if not bound:
        return []
    return [["int8 / float16 on disk at the order-0 entropy bound", f"{bound['int8_over_float16']:.3f}x", "reported",
             f"int8 {bound['int8_bits_per_byte']:.2f} bits/byte: no order-0 coder reaches 0.52x here"]]


def main() -> None:
    print(table(["goal (issue 7)", "figure", "status", "measured"], goal_rows() + bound_rows() + pca_rows()))


if __name__ == "__main__":
    main()

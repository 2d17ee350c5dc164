"""What format 5's checks cost the cached loader, side by side with today's loader in one run.

Today's loader is the code of another git revision (--base, default: this branch's merge
base with main), unpacked from `git archive` into a temporary directory and imported from
there (PYTHONPATH), reading the format 4 cache that revision's own `extract-features`
writes; this branch's loader reads the format 5 cache this branch writes of the same demo
shards (and, a third row, the format 4 cache too: what reading without file lists costs
here). Every loader runs in a process of its own (imports are not timed), `StudentStream`
in cached mode exactly as `benchmarks/loader_throughput.py` measures it (that file's
`cached_loader` and `loader_rate`, each revision's own), in the process itself with one
torch thread (as a DataLoader worker runs), the three in a rotating order per rep. The
figure is images per CPU-second of that process (tar read, targets with every check,
decode, render, batching): what one worker's core delivers, and unlike a wall-clock rate
comparable side by side on a machine other work keeps busy. Medians and per-rep ratios. The same run times the
digests a file list could use over one features chunk's bytes (sha256, chosen; crc32c,
which a Zarr chunk's own trailing crc32c makes useless: see shared/cache_format/listing.py).

    .venv/bin/python benchmarks/loader_file_lists.py                   # ~4 min on 2 cores
    .venv/bin/python benchmarks/loader_file_lists.py --reps 2 --budget 4

Writes benchmarks/results/loader_file_lists.json (or --out PATH).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import ForeignCpu, machine_facts, make_shards, table, warn_if_busy, write_json

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

# One loader's rate, in a fresh process of the revision on sys.path (its own benchmark helpers).
# In the process itself (workers 0, one torch thread, as a DataLoader worker has): its CPU
# seconds per image are what the checks cost, and stay comparable on a machine other work
# keeps busy, where a wall-clock rate does not.
CHILD = """
import json, sys, time, warnings
sys.path.insert(0, {bench!r})
warnings.filterwarnings("ignore")
import torch
torch.set_num_threads(1)
from loader_throughput import cached_loader, loader_rate
from mrmae.shared import cache_format as cf
cache = cf.FeatureCache({cache!r})
cpu0 = time.process_time()
r = loader_rate(cached_loader({urls!r}, cache, {batch}), 0, {warmup}, {budget})
cpu = time.process_time() - cpu0
print("RESULT " + json.dumps({{"images_per_s": r["images_per_s"], "images": r["images"],
                               "images_per_cpu_s": (r["images"] + {warmup} * {batch}) / cpu,
                               "format": cache.manifest.format_version}}))
"""


def unpack(base: str, into: Path) -> Path:
    """The tree of revision `base` as an importable `mrmae` package under `into`."""
    package = into / "mrmae"
    package.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", base], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(package)], input=archive, check=True)
    return package


def extract(python_path: str | None, urls: list[str], out: Path, teacher: str, views: int) -> None:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", **({"PYTHONPATH": python_path} if python_path else {})}
    subprocess.run([sys.executable, "-m", "mrmae", "extract-features", "--shards", "::".join(urls),
                    "--feature-cache", str(out), "--teacher", teacher, "--views", str(views), "--no-progress"],
                   env=env, check=True, capture_output=True, cwd=tempfile.gettempdir())


def rate(python_path: str | None, bench: Path, cache: Path, urls: list[str], args) -> dict:
    env = {**os.environ, **({"PYTHONPATH": python_path} if python_path else {})}
    code = CHILD.format(bench=str(bench), cache=str(cache), urls=urls, batch=args.batch_size, warmup=1,
                        budget=args.budget)
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       cwd=tempfile.gettempdir())
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if r.returncode or line is None:
        raise RuntimeError(f"loader child failed: {r.stderr[-2000:]}")
    return json.loads(line[len("RESULT "):])


def digest_rates(size: int = 2_408_448, reps: int = 20) -> dict:
    """GB/s of each candidate digest over one features chunk's worth of bytes."""
    import google_crc32c

    data = os.urandom(size)
    out = {}
    for name, fn in (("sha256", lambda d: hashlib.sha256(d).digest()), ("crc32c", google_crc32c.value)):
        best = min(_timed(fn, data) for _ in range(reps))
        out[name] = round(size / best / 1e9, 2)
    return out


def _timed(fn, data) -> float:
    t0 = time.perf_counter()
    fn(data)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base", default=None, help="today's revision (default: merge-base HEAD main)")
    p.add_argument("--teacher", default="clip:ViT-S-16")
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--shard-size", type=int, default=32)
    p.add_argument("--views", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--budget", type=float, default=8.0, help="seconds per timed loader run")
    p.add_argument("--reps", type=int, default=4)
    p.add_argument("--out")
    args = p.parse_args()
    base = args.base or subprocess.run(["git", "-C", str(REPO), "merge-base", "HEAD", "main"], capture_output=True,
                                       text=True, check=True).stdout.strip()
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    warn_if_busy()
    facts, other, t_start = machine_facts(), ForeignCpu(), time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mrmae-file-lists-") as tmp:
        tmp = Path(tmp)
        old = unpack(base, tmp / "old")
        urls = [str(u) for u in make_shards(tmp / "shards", args.images, args.shard_size)]
        extract(str(old.parent), urls, tmp / "cache4", args.teacher, args.views)
        extract(None, urls, tmp / "cache5", args.teacher, args.views)
        variants = {"today (base) on its format 4 cache": (str(old.parent), old / "benchmarks", tmp / "cache4"),
                    "this branch on its format 5 cache": (None, HERE, tmp / "cache5"),
                    "this branch on the format 4 cache": (None, HERE, tmp / "cache4")}
        names = list(variants)
        runs: dict[str, list[dict]] = {n: [] for n in names}
        for rep in range(args.reps):
            for name in names[rep % len(names):] + names[:rep % len(names)]:
                runs[name].append(rate(*variants[name], urls, args))
                print(f"rep {rep}: {name}: {runs[name][-1]['images_per_cpu_s']:.1f} images per CPU-s "
                      f"({runs[name][-1]['images_per_s']:.1f} images/s wall)", flush=True)
        listed = sum(sum(s for _, s, _ in e.files.items) for e in _entries(tmp / "cache5"))
    digests = digest_rates()
    med = {n: statistics.median(r["images_per_cpu_s"] for r in rs) for n, rs in runs.items()}
    today, new = names[0], names[1]
    per_rep = [a["images_per_cpu_s"] / b["images_per_cpu_s"] for a, b in zip(runs[new], runs[today])]
    result = {"base": base, "head": head, "medians": med, "runs": runs,
              "ratio_format5_over_today": med[new] / med[today], "ratio_format5_over_today_per_rep": per_rep,
              "ratio_format4_this_branch_over_today": med[names[2]] / med[today],
              "digest_gb_per_s": digests, "listed_bytes": listed, "views": args.images * args.views}
    facts["loadavg_at_end"] = [round(v, 2) for v in os.getloadavg()]
    payload = {"benchmark": "loader_file_lists", "command": " ".join(["benchmarks/loader_file_lists.py", *sys.argv[1:]]),
               "machine": facts, "params": vars(args), "result": result, "foreign_cpu_seconds": other.seconds(),
               "total_seconds": time.perf_counter() - t_start}
    path = write_json("loader_file_lists", payload, args.out)
    print(table(["loader", "images per CPU-second (median)", "ratio to today"],
                [[n, med[n], med[n] / med[today]] for n in names]))
    print(f"per rep, format 5 / today: {', '.join(f'{x:.3f}' for x in per_rep)}; digests (GB/s): {digests}; "
          f"other processes {other.seconds():.0f} CPU-s -> {path}")


def _entries(cache: Path):
    from mrmae.shared import cache_format as cf

    return cf.read_manifest(cache).shards


if __name__ == "__main__":
    main()

"""Start-up at ImageNet scale: opening a cache of 1,024 shards, `mrmae cache info`, and the
first training batch, on local disk and on an object store (simulated); plus the storage
and input-rate arithmetic of README.md's scaling section.

The cache has ImageNet's index: 1,281,167 images over 1,024 shards (1,251 or 1,252 a
shard), K views each, so 1,024 entries and 1,024 Zarr groups holding 5.1M rows (K = 4) in
the real layout (16-row feature chunks: ~390 files a group). Only the payload is tiny: a
16-wide teacher at the 14 x 14 grid, zero features, 16 x 16 px JPEGs in the source tars.
The first group of each size is written by the real writer (`open_shard_writer`, `finish`,
`commit_shard`); the others are its copies under their own sources (the group's `source`
attribute rewritten through zarr, every other file hard-linked: the bytes the writer would
write, which tests/test_startup.py checks at small scale), published under their content
names with entries written by `record_shard`. The source tars are real tars, one per shard
name, hard links of two files (all shards hold the same keys and images).

Timed, each from nothing but the files (no state kept between stages):
- open: `FeatureCache(root)` (manifest.json and every shard entry, checked);
- cache info: `mrmae cache info` in this process (its CLI function, through click);
- first batch: what `run_pretrain` does with the cache before step 1 (open_targets,
  run_fingerprint, check_cache_fits, check_shards, count_samples, then the real loader's
  first batch of --batch-size from the tars), without building the model (whose cost does
  not depend on the cache);
- plain first batch: a plain run's start, the epoch counted from the sizes.json beside the
  tars (written with them, as make-demo-shards and `mrmae shards index` write it), then the
  loader's first batch; and, for comparison, counting the epoch by reading every tar's
  headers as plain and live runs did before (timed on --count-sample tars, scaled);
on local disk, and on `latmem://` (benchmarks/_latency_fs.py): fsspec's memory filesystem
with --latency seconds (20 ms) per request, one request per GET/HEAD/PUT and per listed
page of 1,000 names, requests from several threads overlapping. Each latmem row also
gives the requests it made. Goal: each under --goal seconds (10).

    .venv/bin/python benchmarks/startup.py             # builds in ~1-4 min (busy 2 cores), then ~3 min of timing
    .venv/bin/python benchmarks/startup.py --shards 10240 --store-goal 30   # ImageNet in 10,240 shards of 125
    .venv/bin/python benchmarks/startup.py --storage   # the storage / input-rate tables only (instant)

Writes benchmarks/results/startup.json (or --out PATH). The build lives in --workdir
(default: $TMPDIR/mrmae-startup) and is kept for the next run with the same settings: its
~1.1M files and directories take minutes to write and to remove (--clean removes it).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from _common import ForeignCpu, machine_facts, table, warn_if_busy, write_json
from _latency_fs import LatencyMemoryFileSystem

IMAGENET_IMAGES = 1_281_167
IMAGENET_SHARDS = 1024
TOKENS = 196  # the student's 14 x 14 grid: every teacher runs at 14 x its patch size
IMAGE_SIDE = 16  # px of the tiny source JPEGs


# --- building the cache -----------------------------------------------------------------


def shard_sizes(images: int, shards: int) -> list[int]:
    """Images per shard, as even as possible (ImageNet: 143 shards of 1,252, 881 of 1,251)."""
    base, extra = divmod(images, shards)
    return [base + (i < extra) for i in range(shards)]


def write_tar(path: Path, n: int) -> tuple[list[str], list[bytes]]:
    """A real source tar of `n` samples (`<key>.jpg`, 16 x 16 px noise) -> (keys, images)."""
    import tarfile

    from PIL import Image

    rng = np.random.default_rng(0)
    keys, images = [f"n{i:08d}" for i in range(n)], []
    with tarfile.open(path, "w") as tf:
        for key in keys:
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (IMAGE_SIDE, IMAGE_SIDE, 3), dtype=np.uint8)).save(buf, "JPEG")
            info = tarfile.TarInfo(f"{key}.jpg")
            info.size = len(buf.getvalue())
            tf.addfile(info, io.BytesIO(buf.getvalue()))
            images.append(buf.getvalue())
    return keys, images


def tiny_manifest(views: int, dim: int):
    """A cache's configuration with a `dim`-wide teacher at the student's 14 x 14 grid."""
    from mrmae import __version__
    from mrmae.shared import cache_format as cf
    from mrmae.shared.views import ViewConfig

    teacher = {"spec": f"synthetic:tiny-{dim}", "family": "clip", "arch": "synthetic", "weights": None,
               "weights_sha256": "0" * 64, "input_size": 224, "patch_size": 16, "grid": [14, 14], "dim": dim,
               "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "layers": []}
    return cf.new_manifest(teacher, ViewConfig(per_image=views), cf.storage_section("zarr", "int8", int8_group=64),
                           __version__)


def write_shard(root: Path, url: str, keys: list[str], images: list[bytes], manifest,
                sides: list[tuple[int, int]] | None = None, rng: np.random.Generator | None = None) -> "object":
    """One shard through the real writer: the views extraction would draw for images of
    `sides` ((height, width) each; default IMAGE_SIDE square), zero targets or, with `rng`,
    random ones (as costly to decompress as a teacher's). Returns its ShardEntry."""
    from mrmae.shared import cache_format as cf
    from mrmae.shared.shards import local_file_size, source_digest
    from mrmae.shared.views import sample_views

    k, dim, t0 = manifest.views.per_image, manifest.teacher.dim, time.time()
    rows = len(keys) * k
    sides = sides or [(IMAGE_SIDE, IMAGE_SIDE)] * len(keys)
    views = [v for key, (h, w) in zip(keys, sides) for v in sample_views(key, h, w, manifest.views)]
    groups = cf.int8_groups(dim, 64)
    scale_shape = (rows, TOKENS) if groups is None else (rows, TOKENS, groups)
    features = (rng.integers(-127, 128, (rows, TOKENS, dim), dtype=np.int8) if rng is not None
                else np.zeros((rows, TOKENS, dim), np.int8))
    scales = (rng.uniform(1e-3, 1e-2, scale_shape) if rng is not None else np.ones(scale_shape)).astype(np.float16)
    writer = cf.open_shard_writer("zarr", root, url, rows, dim, TOKENS, "int8", int8_group=64)
    writer.append([key for key in keys for _ in range(k)], np.tile(np.arange(k), len(keys)),
                  np.array([v.box for v in views]), np.array([v.flip for v in views]), (features, scales),
                  np.full((rows, TOKENS), 1 / TOKENS, np.float16), np.zeros((rows, dim), np.float16),
                  image_sha256=[cf.image_sha256(im) for im in images for _ in range(k)])
    expected = [(key, v) for key in keys for v in range(k)]
    digest, size = writer.finish({"source": url, "num_samples": len(keys)}, expected)
    entry = cf.ShardEntry(url, writer.group_path, len(keys), rows, (), "complete", digest, size,
                          local_file_size(url), source_digest(url), round(time.time() - t0, 2), writer.files)
    cf.commit_shard(root, writer, entry)
    return entry


class Template:
    """A shard written by the real writer, to be published again under other sources."""

    def __init__(self, root: Path, entry):
        from mrmae.shared.cache_format.location import Location

        self.root, self.entry, self.path = root, entry, root / entry.group
        # (group_digest's order and framing: every file's relative path, length and bytes)
        self.files = [(rel, (self.path / rel).read_bytes()) for rel, _ in Location(self.path).files("")]

    def digest(self, zarr_json: bytes):
        """`group_files` of a copy whose group zarr.json is `zarr_json` ((sha256, bytes, its
        entry's file list)), without reading the copy back (the smoke test holds it equal
        to `group_digest`)."""
        from mrmae.shared.cache_format.listing import FileList

        h, total = hashlib.sha256(), 0
        listed = {p: (size, digest) for p, size, digest in self.entry.files.items}
        listed["zarr.json"] = (len(zarr_json), hashlib.sha256(zarr_json).hexdigest())
        for rel, data in self.files:
            data = zarr_json if rel == "zarr.json" else data
            h.update(f"{rel}\x00{len(data)}\x00".encode())
            h.update(data)
            total += len(data)
        return h.hexdigest(), total, FileList(tuple((p, *v) for p, v in listed.items()))


def clone_shard(template: Template, url: str) -> None:
    """Publish `template`'s rows as the shard of `url`: the bytes the writer gives for the same
    rows from another source (only the group's `source` attribute differs, written by zarr
    as the writer wrote it; every other file a hard link), under their content name, then
    its entry."""
    import zarr

    from mrmae.shared import cache_format as cf
    from mrmae.shared.cache_format.common import content_group

    root, entry, name = template.root, template.entry, cf.group_name(url)
    tmp = root / "shards" / f".tmp-{name}-clone"
    shutil.copytree(template.path, tmp, copy_function=os.link)
    (tmp / "zarr.json").unlink()  # (a link to the template's: never written through)
    shutil.copyfile(template.path / "zarr.json", tmp / "zarr.json")
    zarr.open_group(str(tmp), mode="r+").attrs["source"] = url
    digest, size, files = template.digest((tmp / "zarr.json").read_bytes())
    group = content_group(name, digest)
    os.rename(tmp, root / group)
    cf.record_shard(root, cf.ShardEntry(url, group, entry.num_samples, entry.num_views, (), "complete", digest, size,
                                        entry.source_bytes, entry.source_sha256, entry.seconds, files))


def build(workdir: Path, images: int, shards: int, views: int, dim: int) -> tuple[Path, list[str]]:
    """The source tars and the cache (reused when `workdir` holds one of these settings)."""
    from mrmae.shared import cache_format as cf

    root, tars = workdir / "cache", workdir / "tars"
    stamp, wanted = workdir / "built.json", {"images": images, "shards": shards, "views": views, "dim": dim}
    sizes = shard_sizes(images, shards)
    urls = [str(tars / f"train-{i:04d}.tar") for i in range(shards)]
    if stamp.exists() and json.loads(stamp.read_text()) == wanted:
        return root, urls
    shutil.rmtree(workdir / "cache", ignore_errors=True)
    shutil.rmtree(tars, ignore_errors=True)
    tars.mkdir(parents=True)
    manifest = tiny_manifest(views, dim)
    cf.init_cache(root, manifest)
    templates: dict[int, tuple] = {}  # images -> (tar, keys, images, entry)
    for n in sorted(set(sizes), reverse=True):
        keys, imgs = write_tar(tars / f"tar-{n}", n)
        templates[n] = (tars / f"tar-{n}", keys, imgs, None)
    for i, (url, n) in enumerate(zip(urls, sizes)):
        tar, keys, imgs, entry = templates[n]
        os.link(tar, url)
        if entry is None:
            templates[n] = (tar, keys, imgs, Template(root, write_shard(root, url, keys, imgs, manifest)))
        else:
            clone_shard(entry, url)
        if i % 128 == 127:
            print(f"  built {i + 1}/{shards} shards", flush=True)
    from mrmae.shared.shard_sizes import write_sizes

    write_sizes(str(tars), {Path(u).name: n for u, n in zip(urls, sizes)})  # (what make-demo-shards writes)
    stamp.write_text(json.dumps(wanted))
    return root, urls


# --- timing -----------------------------------------------------------------------------


def time_open(root: str) -> None:
    from mrmae.shared import cache_format as cf

    cf.FeatureCache(root)


def time_info(root: str) -> None:
    from click.testing import CliRunner

    from mrmae.cli import cli

    r = CliRunner().invoke(cli, ["cache", "info", "--feature-cache", root, "--json"])
    if r.exit_code:
        raise RuntimeError(f"mrmae cache info {root}: {r.output}")


def first_batch(root: str, urls: list[str], batch_size: int, workers: int, out: str) -> dict[str, float]:
    """run_pretrain's work with a cache before step 1, stage by stage (seconds each)."""
    from mrmae.shared import cache_format as cf
    from mrmae.shared.errors import worker_ignores_interrupt
    from mrmae.train.stream import DataConfig, StudentStream, check_cache_fits
    from mrmae.train.run.loader import InterruptibleLoader, epoch_passes
    from mrmae.train.run.loop import check_epoch_fits
    from mrmae.train.config import PretrainConfig
    from mrmae.train.pretrain import count_samples, open_targets, run_fingerprint

    cfg = PretrainConfig(shards=",".join(urls), out=out, feature_cache=root, batch_size=batch_size, workers=workers,
                         accum_steps=1)
    times, t = {}, time.perf_counter()

    def lap(name: str) -> None:
        nonlocal t
        now = time.perf_counter()
        times[name], t = now - t, now

    caches = open_targets(root, None)
    cache = caches[0]
    lap("open_targets")
    run_fingerprint(cfg, urls, caches, None, (cache.manifest.teacher.dim,))
    lap("run_fingerprint")
    grid = cache.manifest.teacher.grid[0]  # the student's grid (check_cache_fits compares them)
    check_cache_fits(cache, urls, grid, cache.manifest.teacher.dim, 0)
    cache.check_shards(urls)
    lap("check_cache_fits_and_shards")
    samples = count_samples(urls, cache)
    check_epoch_fits(cfg, 1, samples, "counted in --feature-cache")
    lap("count_samples")
    data_cfg = DataConfig(shards=urls, batch_size=batch_size, img_size=224, shuffle_buffer=cfg.shuffle_buffer)
    stream = StudentStream(data_cfg, cache)
    loader = InterruptibleLoader(stream, batch_size=None, num_workers=workers, worker_init_fn=worker_ignores_interrupt)
    batch = next(epoch_passes(stream, loader, 0, cf.CacheError("no samples")))
    assert batch.pixels.shape[0] == batch_size and batch.targets
    lap("first_batch_from_loader")
    times["total"] = sum(times.values())
    times["samples"] = samples
    return times


def plain_first_batch(urls: list[str], batch_size: int, workers: int) -> dict[str, float]:
    """A plain run's start: the epoch counted from the sizes.json beside the shards (no tar
    read), then the loader's first batch (seconds each)."""
    from mrmae.shared.shard_sizes import read_sizes
    from mrmae.train.stream import DataConfig, StudentStream
    from mrmae.train.run.loader import InterruptibleLoader, epoch_passes
    from mrmae.train.pretrain import count_samples

    t0 = time.perf_counter()
    sizes = read_sizes(urls)
    samples = count_samples(urls, None, sizes)
    t1 = time.perf_counter()
    stream = StudentStream(DataConfig(shards=urls, batch_size=batch_size, img_size=224, sizes=sizes), None)
    loader = InterruptibleLoader(stream, batch_size=None, num_workers=workers)
    batch = next(epoch_passes(stream, loader, 0, RuntimeError("no samples")))
    assert batch.pixels.shape[0] == batch_size and not sizes.unrecorded
    return {"count_from_sizes": t1 - t0, "first_batch_from_loader": time.perf_counter() - t1, "samples": samples}


def count_by_reading(urls: list[str], sample: int) -> dict[str, float]:
    """What counting an epoch cost before sizes.json: every tar's headers read; timed over
    `sample` of the tars (evenly spread) and scaled to all of them."""
    from mrmae.shared.shards import count_samples

    some = urls[::max(1, len(urls) // sample)][:sample]
    t0 = time.perf_counter()
    for url in some:
        count_samples(url)
    seconds = time.perf_counter() - t0
    return {"tars_read": len(some), "seconds_read": seconds, "scaled_to_all": seconds * len(urls) / len(some)}


def measure(where: str, root: str, urls: list[str], args, out: str) -> list[dict]:
    """The timings at one place (requests counted on latmem://): a cached run's (open,
    cache info, first batch) and a plain run's (first batch, the epoch from sizes.json)."""
    results = []
    for stage, fn in (("open", lambda: time_open(root)), ("cache info", lambda: time_info(root)),
                      ("first batch", lambda: first_batch(root, urls, args.batch_size, args.workers, out)),
                      ("plain first batch", lambda: plain_first_batch(urls, args.batch_size, args.workers)),
                      ("plain: every tar read", lambda: count_by_reading(urls, args.count_sample))):
        LatencyMemoryFileSystem.reset_stats()
        t0 = time.perf_counter()
        detail = fn()
        seconds = time.perf_counter() - t0
        if stage == "plain: every tar read":  # (the before: scaled from a sample of the tars, not a goal)
            seconds = detail["scaled_to_all"]
        s = LatencyMemoryFileSystem.stats()
        row = {"where": where, "stage": stage, "seconds": round(seconds, 3), "goal": None if "every" in stage else True,
               "requests": s["requests"] if root.startswith("latmem://") else None,
               "peak_in_flight": s["peak_in_flight"] if root.startswith("latmem://") else None,
               "by_method": s["by_method"] if root.startswith("latmem://") else None}
        if isinstance(detail, dict):
            row["stages"] = {k: round(v, 3) if isinstance(v, float) else v for k, v in detail.items()}
        results.append(row)
        print(f"  {where:<10} {stage:<12} {seconds:8.2f} s"
              + (f"  {row['requests']} requests" if row["requests"] is not None else ""), flush=True)
    return results


def process_seconds(args: list[str]) -> float:
    """Wall time of `python ARGS` in a fresh process (interpreter and imports included)."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, *args], check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return time.perf_counter() - t0


def cli_rows(root: str) -> list[dict]:
    """`python -m mrmae cache info --feature-cache ROOT` as a user runs it, and the imports it pays for alone
    (the command imports extract/verify.py: torch, torchvision, timm, open_clip)."""
    info = process_seconds(["-m", "mrmae", "cache", "info", "--feature-cache", root])
    imports = process_seconds(["-c", "import mrmae.cli, mrmae.extract.verify"])
    return [{"where": "local", "stage": "cache info (CLI process)", "seconds": round(info, 3)},
            {"where": "local", "stage": "  its imports alone", "seconds": round(imports, 3), "goal": None}]


# --- storage and input rates (README.md, "Scaling out") ---------------------------------
# Step rates on one H200 (BENCHMARKS.md, "GPU: one H200"; ViT-B student, batch 256, bf16).
H200_STEP = {"plain": 3241, "cached": 3203, "live B/16": 2202, "live L/14": 1421,
             "plain, compiled": 4240, "cached, compiled": 4052}
JPEG_BYTES = 110_000  # a mean ImageNet train JPEG (shard_reader.py's default)
VIEWS_PER_CORE = 190  # PIL decode + render a core on the H200 host (BENCHMARKS.md, "GPU: one H200")
# (width C, tokens L): mrmae runs every teacher at 14 x its patch size, so its grid is the
# student's 14 x 14 (L/14 at 196 px); "@224 px" is L/14 at its usual size, 16 x 16 tokens.
TEACHERS = {"CLIP B/16": (768, 196), "CLIP L/14": (1024, 196), "CLIP L/14 @224 px": (1024, 256)}


def view_bytes(dim: int, dtype: str, rank: int | None = None, tokens: int = TOKENS, group: int = 64) -> dict:
    """Bytes one stored view takes before compression, array by array, as a Zarr group holds
    it (CACHE_FORMAT.md): features [L, C] (or [L, K] PCA coefficients) int8 with float16
    scales [L, G] (G = width / group when that splits the width, else [L]) or float16;
    attention [L] float16; cls [C] float16; view int16, crop 4 x int32, flip bool,
    image_sha256 32 bytes (keys, variable, not counted)."""
    from mrmae.shared.cache_format import int8_groups

    width = rank or dim
    if dtype == "int8":
        features = tokens * width + tokens * (int8_groups(width, group) or 1) * 2
    else:
        features = tokens * width * 2
    return {"features": features, "attention": tokens * 2, "cls": dim * 2, "row": 2 + 16 + 1 + 32}


def storage_rows(views: tuple[int, ...] = (1, 4, 10)) -> list[dict]:
    rows = []
    for teacher, (dim, tokens) in TEACHERS.items():
        for label, dtype, rank in (("int8", "int8", None), ("float16", "float16", None),
                                   ("PCA-256 int8", "int8", 256), ("PCA-256 float16", "float16", 256)):
            b = view_bytes(dim, dtype, rank, tokens)
            total = sum(b.values())
            rows.append({"teacher": teacher, "storage": label, "features_bytes": b["features"],
                         "attention_bytes": b["attention"], "other_bytes": b["cls"] + b["row"], "view_bytes": total,
                         **{f"imagenet_x{k}_gb": round(total * IMAGENET_IMAGES * k / 1e9, 1) for k in views}})
    return rows


def input_rows() -> list[dict]:
    """What one H200 needs per second in each mode: images decoded, JPEG and target bytes."""
    targets = {"int8 B/16": sum(view_bytes(768, "int8").values()),
               "int8 L/14": sum(view_bytes(1024, "int8").values()),
               "PCA-256 int8 B/16": sum(view_bytes(768, "int8", 256).values())}
    rows = []
    for mode, rate in H200_STEP.items():
        feature = {"cached": targets, "cached, compiled": targets}.get(mode, {})
        for what, per_view in (feature.items() or [("-", 0)]):
            rows.append({"mode": mode, "targets": what, "images_per_s": rate,
                         "jpeg_mb_s": round(rate * JPEG_BYTES / 1e6), "targets_mb_s": round(rate * per_view / 1e6),
                         "cores_to_decode": round(rate / VIEWS_PER_CORE)})
    return rows


def print_storage() -> dict:
    s, r = storage_rows(), input_rows()
    print("Storage per view (bytes before compression, Zarr layout) and per ImageNet pass (1,281,167 images x K):")
    print(table(["teacher", "storage", "features B", "attention B", "cls+row B", "view B", "K=1 GB", "K=4 GB",
                 "K=10 GB"], [[x["teacher"], x["storage"], x["features_bytes"], x["attention_bytes"], x["other_bytes"],
                               x["view_bytes"], x["imagenet_x1_gb"], x["imagenet_x4_gb"], x["imagenet_x10_gb"]]
                              for x in s]))
    print(f"\nInput per H200 at its step rate (JPEG {JPEG_BYTES // 1000} KB; {VIEWS_PER_CORE} views/s a core):")
    print(table(["mode", "targets", "images/s", "JPEG MB/s", "targets MB/s", "cores"],
                [[x["mode"], x["targets"], x["images_per_s"], x["jpeg_mb_s"], x["targets_mb_s"], x["cores_to_decode"]]
                 for x in r]))
    return {"storage": s, "input": r}


# --- main -------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=IMAGENET_IMAGES)
    p.add_argument("--shards", type=int, default=IMAGENET_SHARDS)
    p.add_argument("--views", type=int, default=4, help="K views per image")
    p.add_argument("--dim", type=int, default=16, help="the tiny teacher's width")
    p.add_argument("--latency", type=float, default=0.020, help="seconds per request on latmem://")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--goal", type=float, default=10.0, help="seconds each stage should stay under (local disk)")
    p.add_argument("--store-goal", type=float, help="the same on latmem:// (default: --goal)")
    p.add_argument("--count-sample", type=int, default=64,
                   help="tars read to time counting an epoch from the tars themselves (scaled to all)")
    p.add_argument("--where", default="local,latmem", help="local, latmem or both")
    p.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "mrmae-startup"),
                   help="where to build (kept for the next run with the same settings)")
    p.add_argument("--clean", action="store_true", help="remove --workdir at the end")
    p.add_argument("--storage", action="store_true", help="print the storage and input-rate tables only")
    p.add_argument("--out")
    return p.parse_args()


def run(args: argparse.Namespace, workdir: Path) -> list[dict]:
    """Build (or reuse) the cache, then every stage at every place asked: result rows."""
    t0 = time.perf_counter()
    root, urls = build(workdir, args.images, args.shards, args.views, args.dim)
    print(f"built in {time.perf_counter() - t0:.0f} s: {args.shards} shards, {args.images} images x {args.views} "
          f"views, in {workdir}", flush=True)
    results, where = [], args.where.split(",")
    if "local" in where:
        results += measure("local", str(root), urls, args, str(workdir / "run"))
        results += cli_rows(str(root))
    if "latmem" in where:
        LatencyMemoryFileSystem.clear()
        files = LatencyMemoryFileSystem.upload_tree(root, "latmem://startup/cache")
        remote = upload_tars(urls, "latmem://startup/tars")
        LatencyMemoryFileSystem.latency = args.latency
        print(f"  latmem://startup/cache: {files} files, the tars in latmem://startup/tars, "
              f"{args.latency * 1000:.0f} ms a request", flush=True)
        results += measure("latmem", "latmem://startup/cache", remote, args, str(workdir / "run"))
        LatencyMemoryFileSystem.clear()
    for r in results:  # (a row with "goal": None is a breakdown, not a goal)
        goal = args.goal if r["where"] == "local" else args.store_goal or args.goal
        r["goal_met"] = r["seconds"] < goal if r.pop("goal", True) is not None else None
    return results


def upload_tars(urls: list[str], url: str) -> list[str]:
    """The source tars (and their sizes.json) on latmem:// under `url`, without requests; the
    tars are hard links of a few files, so each file's bytes are held once."""
    from fsspec.implementations.memory import MemoryFile

    store, fs, held = LatencyMemoryFileSystem.store, LatencyMemoryFileSystem(), {}
    root = LatencyMemoryFileSystem._strip_protocol(url)
    for path in [*urls, str(Path(urls[0]).parent / "sizes.json")]:
        inode = os.stat(path).st_ino
        if inode not in held:
            held[inode] = Path(path).read_bytes()
        name = f"{root}/{Path(path).name}"
        store[name] = MemoryFile(fs, name, held[inode])
    LatencyMemoryFileSystem._dirty = True
    return [f"{url}/{Path(u).name}" for u in urls]


def main() -> None:
    args = parse_args()
    if args.storage:
        print_storage()
        return
    warn_if_busy()
    # imported once before any timing: the stages measure the work, the CLI process row the imports
    import mrmae.cli, mrmae.extract.verify, mrmae.train.pretrain  # noqa: E401, F401
    workdir, foreign = Path(args.workdir), ForeignCpu()
    try:
        results = run(args, workdir)
    finally:
        if args.clean:
            shutil.rmtree(workdir, ignore_errors=True)
    print()
    goals = f"< {args.goal:g} s" + (f" (store {args.store_goal:g} s)" if args.store_goal else "")
    print(table(["where", "stage", "seconds", "requests", goals],
                [[r["where"], r["stage"], r["seconds"], r.get("requests") if r.get("requests") is not None else "-",
                  {True: "met", False: "MISSED", None: "-"}[r["goal_met"]]] for r in results]))
    missed = [f"{r['where']} {r['stage']}" for r in results if r["goal_met"] is False]
    print(f"goal: every stage {goals}: " + ("met" if not missed else "MISSED by " + ", ".join(missed)))
    print()
    arithmetic = print_storage()
    out = write_json("startup", {"machine": machine_facts(), "args": vars(args),
                                 "foreign_cpu_s": round(foreign.seconds(), 1), "results": results, **arithmetic},
                     args.out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

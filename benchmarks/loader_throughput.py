"""Loader throughput per worker: the cache-joined StudentStream vs a plain MAE loader.

Both loaders read the same demo shards (`mrmae.demo.write_demo_shards`, temp dir), each in
a `torch.utils.data.DataLoader` with ONE worker (torch gives a worker one intra-op thread),
so images/s is what one CPU core delivers per loader:

- cached: `mrmae.train.stream.StudentStream` in cached mode, as `mrmae pretrain
  --feature-cache` runs it: tar read, the epoch's cached view geometry and targets
  (int8 -> float32, [196, C]) and [CLS] attention per sample, JPEG decode (PIL), the
  replayed crop + bicubic resize + flip on the tensor, normalisation, batching;
- cached_pixels: the same stream with `--pixels-from-cache` (the cache extracted with
  `--store-pixels`): no tar read, no crop or resize; the stored view's image file is
  decoded and normalised (the issue's goal: >= 2x plain per worker);
- cached_unchecked (--checksums): the cached loader over a copy of the same cache as
  format 3 wrote it (no crc32c codec on any array, no chunk count at open): what the
  checksums of format 4 cost, measured side by side in the same run;
- cached_undigested (--image-digests): the cached loader over a copy of the same cache
  without the per-row `image_sha256` arrays: what checking each sample's image against
  its recorded sha256 (before it is rendered) costs, side by side in the same run;
- plain: MAE's own input pipeline over webdataset: `wds.WebDataset` -> shuffle ->
  `decode("pil")` -> torchvision `RandomResizedCrop(224, scale=(0.2, 1.0), bicubic)`,
  `RandomHorizontalFlip`, `ToTensor`, `Normalize` -> `batched`. No targets.

The cache is made once with `run_extraction` (--teacher, --views). Per rep each loader runs
once, the order alternating between reps; the timed window opens when the first
--warmup-batches have arrived (worker start-up and the shuffle buffer's first fill are
left out) and closes after --budget seconds; the loaders pass over the shards again as
often as needed (the cached one with the next epoch's views). The table reports medians;
ratio = cached / plain. The cached loader's targets scale with the teacher's
width C: clip:ViT-S-16 is 384-d, a CLIP B/16 cache (768-d) moves twice the target bytes.

Run (about 2 minutes on 2 idle cores with the defaults, most of it making the cache):

    .venv/bin/python benchmarks/loader_throughput.py
    .venv/bin/python benchmarks/loader_throughput.py --checksums --pixels none --reps 3  # the checksums' cost
    .venv/bin/python benchmarks/loader_throughput.py --image-digests --pixels none --reps 3  # the image check's
    .venv/bin/python benchmarks/loader_throughput.py --images 32 --views 1 --reps 1 --budget 5  # ~40 s

Writes benchmarks/results/loader_throughput.json (or --name, or --out PATH).
`measure_loaders` is also what benchmarks/gpu_bench.py runs on a GPU machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import random
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import webdataset as wds

from _common import ForeignCpu, machine_facts, make_shards, table, warn_if_busy, write_json
from mrmae.shared import cache_format as cf
from mrmae.shared.views import IMAGENET_MEAN, IMAGENET_STD
from mrmae.train.batch import Batch
from mrmae.train.stream import DataConfig, StudentStream

LOADERS = ("cached", "cached_unchecked", "cached_undigested", "cached_pixels", "plain")


def unchecked_copy(cache_root: str | Path, dst: str | Path) -> Path:
    """A copy of a Zarr cache as format 3 stored it: every array rewritten without its
    crc32c codec (same chunks, same compressors otherwise), manifest format_version 3, so
    the reader neither verifies chunks nor counts them at open."""
    import json
    import shutil

    import zarr
    from zarr.codecs import Crc32cCodec

    dst = Path(shutil.copytree(cache_root, dst))
    for entry in cf.read_manifest(dst).shards:
        group = zarr.open_group(str(dst / entry.group), mode="r+")
        for name, arr in list(group.arrays()):
            data, chunks = arr[:], arr.chunks
            compressors = [c for c in arr.compressors if not isinstance(c, Crc32cCodec)]
            del group[name]
            group.create_array(name, data=data, chunks=chunks, compressors=compressors or None)
    manifest = json.loads((dst / cf.MANIFEST).read_text())
    manifest["format_version"] = 3
    (dst / cf.MANIFEST).write_text(json.dumps(manifest))
    for entry in cf.read_manifest(dst).shards:  # (format 3's entries list no files)
        cf.record_shard(dst, dataclasses.replace(entry, files=None))
    return dst


def undigested_copy(cache_root: str | Path, dst: str | Path) -> Path:
    """A copy of a Zarr cache whose groups lack the `image_sha256` array (as an earlier
    format 4 writer left them): its reader checks only each shard's sha256, no image."""
    import shutil

    dst = Path(shutil.copytree(cache_root, dst))
    for entry in cf.read_manifest(dst).shards:
        shutil.rmtree(dst / entry.group / "image_sha256")
        digest, size, files = cf.group_files(dst / entry.group)  # (its entry lists what is left)
        cf.record_shard(dst, dataclasses.replace(entry, sha256=digest, bytes=size, files=files))
    return dst


def plain_mae_loader(urls: list[str], batch_size: int, img_size: int = 224, seed: int = 0) -> wds.WebDataset:
    """MAE's pretraining input pipeline (main_pretrain.py's transform) over webdataset tars."""
    from torchvision import transforms
    from torchvision.transforms import InterpolationMode

    transform = transforms.Compose([
        transforms.RandomResizedCrop(img_size, scale=(0.2, 1.0), interpolation=InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])
    # the same shuffle buffer as StudentStream's (1000, first fill 100), before decoding as there
    return (wds.WebDataset(urls, shardshuffle=False, empty_check=False)
            .shuffle(1000, initial=100, rng=random.Random(seed))
            .decode("pil").to_tuple("jpg").map_tuple(transform)
            .batched(batch_size, partial=True))


def cached_loader(urls: list[str], cache: cf.FeatureCache, batch_size: int, pixels: bool = False) -> StudentStream:
    """StudentStream in cached mode, as run_pretrain builds it (epoch 0); `pixels`: views
    from the cache (--pixels-from-cache)."""
    stream = StudentStream(DataConfig(shards=list(urls), batch_size=batch_size, pixels_from_cache=pixels), cache)
    stream.set_epoch(0)
    return stream


class Passes(torch.utils.data.IterableDataset):
    """`dataset` again and again (`set_epoch(pass)` first where it has one, as StudentStream
    does), so that a loader's timed window is bounded by the budget and not by the few
    shards a CPU machine can afford to extract a cache for."""

    def __init__(self, dataset, passes: int = 10_000) -> None:
        super().__init__()
        self.dataset, self.passes = dataset, passes

    def __iter__(self):
        for epoch in range(self.passes):
            if hasattr(self.dataset, "set_epoch"):
                self.dataset.set_epoch(epoch)
            yield from self.dataset


def _batch_len(batch) -> int:
    return len(batch) if isinstance(batch, Batch) else len(batch[0])


def loader_rate(dataset: torch.utils.data.IterableDataset, workers: int = 1, warmup_batches: int = 1,
                budget_s: float = 10.0) -> dict:
    """images/s of a DataLoader over `dataset`, timed from the arrival of batch `warmup_batches`.

    The main process only takes batches, so with one worker the figure is that worker's rate
    (including handing the tensors over through shared memory).
    """
    loader = torch.utils.data.DataLoader(Passes(dataset), batch_size=None, num_workers=workers)
    images, batches, t0 = 0, 0, None
    t_start = time.perf_counter()
    for batch in loader:
        batches += 1
        if batches == warmup_batches:
            t0 = time.perf_counter()
        elif t0 is not None:
            images += _batch_len(batch)
            if time.perf_counter() - t0 >= budget_s:
                break
    t_end = time.perf_counter()
    if t0 is None or images == 0:
        raise RuntimeError(f"the loader gave {batches} batches: no data?")
    return {"images": images, "seconds": t_end - t0, "images_per_s": images / (t_end - t0),
            "startup_s": t0 - t_start, "batches": batches}


def measure_loaders(urls: list[str], cache_root: str | Path, batch_size: int, budget_s: float,
                    warmup_batches: int = 1, reps: int = 1, workers: int = 1,
                    unchecked_root: str | Path | None = None, undigested_root: str | Path | None = None) -> dict:
    """The loaders over the same shards, order rotating per rep; medians and ratios to plain.
    `cached_pixels` runs only when the cache stores views (--store-pixels), `cached_unchecked`
    only when `unchecked_root` (an `unchecked_copy` of the cache) is given, `cached_undigested`
    only when `undigested_root` (an `undigested_copy`) is."""
    cache = cf.FeatureCache(cache_root)
    unchecked = None
    if unchecked_root is not None:
        with warnings.catch_warnings():  # its one "no checksums" warning: that is the point here
            warnings.simplefilter("ignore", cf.UncheckedCacheWarning)
            unchecked = cf.FeatureCache(unchecked_root)
    undigested = cf.FeatureCache(undigested_root) if undigested_root is not None else None
    caches = {"cached": cache, "cached_pixels": cache, "cached_unchecked": unchecked, "cached_undigested": undigested}
    names = [n for n in LOADERS if (n != "cached_pixels" or cache.manifest.storage.pixels)
             and (n == "plain" or caches[n] is not None)]
    runs: dict[str, list[dict]] = {name: [] for name in names}
    for rep in range(reps):
        for name in names[rep % len(names):] + names[:rep % len(names)]:
            dataset = (plain_mae_loader(urls, batch_size) if name == "plain"
                       else cached_loader(urls, caches[name], batch_size, pixels=name == "cached_pixels"))
            runs[name].append(loader_rate(dataset, workers, warmup_batches, budget_s))
    out: dict = {name: {"images_per_s": statistics.median(r["images_per_s"] for r in rs), "reps": rs}
                 for name, rs in runs.items()}
    for name in names[:-1]:
        out[f"ratio_{name}_over_plain"] = out[name]["images_per_s"] / out["plain"]["images_per_s"]
    if unchecked is not None:  # per rep, the two ran in the same rotation: their ratio's median too
        out["ratio_cached_over_cached_unchecked"] = out["cached"]["images_per_s"] / out["cached_unchecked"]["images_per_s"]
        out["ratio_cached_over_cached_unchecked_per_rep"] = [
            a["images_per_s"] / b["images_per_s"] for a, b in zip(runs["cached"], runs["cached_unchecked"])]
    if undigested is not None:
        out["ratio_cached_over_cached_undigested"] = \
            out["cached"]["images_per_s"] / out["cached_undigested"]["images_per_s"]
        out["ratio_cached_over_cached_undigested_per_rep"] = [
            a["images_per_s"] / b["images_per_s"] for a, b in zip(runs["cached"], runs["cached_undigested"])]
    out["params"] = {"batch_size": batch_size, "workers": workers, "warmup_batches": warmup_batches,
                     "budget_s": budget_s, "reps": reps, "teacher_dim": cache.manifest.teacher.dim}
    return out


def measure_pixel_codecs(url: str, views: int = 32, size: int = 224) -> dict:
    """Each --store-pixels codec on `views` rendered views of one shard: bytes, encode and
    decode time, and the error of the decoded view against the rendered one."""
    from mrmae.shared.shards import read_shard
    from mrmae.shared.views import (PIXEL_CODECS, ViewConfig, decode_image, decode_view, encode_view,
                                    render_view_uint8, sample_views)

    rendered = []
    for s in read_shard(url):
        image = decode_image(s.image)
        rendered += [render_view_uint8(image, v, size) for v in sample_views(s.key, *image.shape[1:], ViewConfig(4))]
    rendered = rendered[:views]
    out = {}
    for codec in PIXEL_CODECS:
        t0 = time.perf_counter()
        files = [encode_view(v, codec) for v in rendered]
        t1 = time.perf_counter()
        back = [decode_view(f) for f in files]
        t2 = time.perf_counter()
        err = torch.stack([(b.int() - v.int()).abs() for b, v in zip(back, rendered)]).float()
        out[codec] = {"kb_per_view": sum(map(len, files)) / len(files) / 1e3,
                      "encode_ms": 1e3 * (t1 - t0) / len(files), "decode_ms": 1e3 * (t2 - t1) / len(files),
                      "max_abs_error": float(err.max()), "mean_abs_error": float(err.mean())}
    return {"views": len(rendered), "size": size, "codecs": out}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--teacher", default="clip:ViT-S-16", help="the cache's teacher (its width sets the target bytes)")
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--shard-size", type=int, default=32)
    p.add_argument("--views", type=int, default=2, help="views per image in the cache")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--warmup-batches", type=int, default=1)
    p.add_argument("--budget", type=float, default=10.0, help="seconds per timed loader run (at most)")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--pixels", default="zstd", choices=["zstd", "png", "webp", "jpeg", "none"],
                   help="--store-pixels codec of the cache (none: no cached_pixels loader)")
    p.add_argument("--checksums", action="store_true",
                   help="also run cached_unchecked: the same cache without its crc32c codecs (format 3)")
    p.add_argument("--image-digests", action="store_true",
                   help="also run cached_undigested: the same cache without its per-row image_sha256 arrays")
    p.add_argument("--name", default="loader_throughput", help="results/<name>.json")
    p.add_argument("--out", help="write the JSON here instead of results/<name>.json")
    args = p.parse_args()
    warnings.filterwarnings("ignore", message=".*HAS RANDOM WEIGHTS.*")
    from mrmae.extract.config import ExtractConfig
    from mrmae.extract.runner import run_extraction
    from mrmae.shared.views import ViewConfig

    warn_if_busy()
    facts = machine_facts()
    t_start = time.perf_counter()
    other = ForeignCpu()
    with tempfile.TemporaryDirectory(prefix="mrmae-loader-bench-") as tmp:
        urls = [str(u) for u in make_shards(Path(tmp) / "shards", args.images, args.shard_size)]
        cache = Path(tmp) / "cache"
        run_extraction(ExtractConfig(shards=urls, out=str(cache), teacher=args.teacher,
                                     views=ViewConfig(per_image=args.views, seed=0), batch_size=32, progress=False,
                                     store_pixels=None if args.pixels == "none" else args.pixels))
        codecs = measure_pixel_codecs(urls[0])
        unchecked = unchecked_copy(cache, Path(tmp) / "cache-unchecked") if args.checksums else None
        undigested = undigested_copy(cache, Path(tmp) / "cache-undigested") if args.image_digests else None
        print(f"{args.images} images, cache of {args.images * args.views} views ({args.teacher}) "
              f"[{time.perf_counter() - t_start:.0f} s]", flush=True)
        result = measure_loaders(urls, cache, args.batch_size, args.budget, args.warmup_batches, args.reps,
                                 unchecked_root=unchecked, undigested_root=undigested)
    total_s, foreign = time.perf_counter() - t_start, other.seconds()
    facts["loadavg_at_end"] = [round(v, 2) for v in os.getloadavg()]
    command = " ".join(["benchmarks/loader_throughput.py", *sys.argv[1:]])
    payload = {"benchmark": "loader_throughput", "command": command, "machine": facts, "params": vars(args),
               "loaders": result, "pixel_codecs": codecs, "foreign_cpu_seconds": foreign, "total_seconds": total_s}
    path = write_json(args.name, payload, args.out)

    print(f"\n{args.images} demo images in shards of {args.shard_size}, batch {args.batch_size}, 1 worker per loader, "
          f"cache {args.teacher} ({result['params']['teacher_dim']}-d) x {args.views} views; median of {args.reps} "
          f"reps of <= {args.budget:.0f} s; {facts['cpu_count']} CPUs")
    names = [n for n in LOADERS if n in result]
    rows = [[name, result[name]["images_per_s"], f"{statistics.median(r['startup_s'] for r in result[name]['reps']):.2f}",
             sum(r["images"] for r in result[name]["reps"])] for name in names]
    rows += [[f"ratio {name}/plain", result[f"ratio_{name}_over_plain"], "-", "-"] for name in names[:-1]]
    if "cached_unchecked" in result:
        rows.append(["ratio cached/cached_unchecked", result["ratio_cached_over_cached_unchecked"], "-", "-"])
    if "cached_undigested" in result:
        rows.append(["ratio cached/cached_undigested", result["ratio_cached_over_cached_undigested"], "-", "-"])
    print(table(["loader", "images/s per worker", "start-up s", "images timed"], rows))
    print(f"\nstored views ({codecs['views']} views of {codecs['size']} px; error against the rendered view, 0-255)")
    print(table(["codec", "KB/view", "encode ms", "decode ms", "max abs err", "mean abs err"],
                [[c, r["kb_per_view"], r["encode_ms"], r["decode_ms"], r["max_abs_error"], r["mean_abs_error"]]
                 for c, r in codecs["codecs"].items()]))
    print(f"other processes used {foreign:.1f} CPU-s meanwhile; total {total_s:.0f} s -> {path}")


if __name__ == "__main__":
    main()

"""Runner: drive reader -> mapper -> teacher -> writer, one input shard at a time.

The shard is the unit of work and of resumption: a shard whose group the manifest marks
complete is skipped; any other is rewritten whole. Stream shapes through one shard:

    RawSample (bytes)              reader, main process
    RenderedSample (K uint8 views) mapper, DataLoader workers, tar order kept
    [B, 3, S, S] float             teacher batches of exactly `batch_size` views
    rows [B, L, C] ...             shard writer (Zarr: buffered to whole chunks; wds: tar samples)
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from mrmae import __version__
from mrmae.extract.mapper import RenderDataset, RenderedSample
from mrmae.extract.reader import expand_urls, local_file_size, read_shard_with_digest
from mrmae.shared import cache_format as cf
from mrmae.shared.teachers import Teacher, build_teacher
from mrmae.shared.views import PIXEL_CODECS, View, ViewConfig, normalize

log = logging.getLogger("mrmae.extract")


class SkippedSampleError(ValueError):
    """Raised under `strict` for a sample that would otherwise be skipped."""


@dataclass
class ExtractConfig:
    shards: list[str]
    out: str
    teacher: str
    views: ViewConfig = field(default_factory=ViewConfig)
    dtype: str = "int8"
    format: str = "zarr"  # cache backend: "zarr" (Zarr v3 groups) or "wds" (one tar per shard)
    batch_size: int = 64
    device: str = "cpu"
    workers: int = 0
    layers: tuple[int, ...] = ()
    strict: bool = False
    progress: bool = True
    views_from: str | None = None  # add a teacher: replay this cache's views (out = its targets/<name>)
    store_pixels: str | None = None  # also store each view at the student's size, in this codec (views.PIXEL_CODECS)


def wanted_manifest(teacher: Teacher, cfg: ExtractConfig) -> dict:
    teacher_entry = {**teacher.describe(), "layers": list(cfg.layers)}
    storage = cf.storage_section(cfg.format, cfg.dtype, cfg.store_pixels)
    manifest = cf.new_manifest(teacher_entry, cfg.views.to_json(), storage, __version__)
    if cfg.views_from:
        manifest["views_from"] = "../.."  # a target's views are those of the cache two levels up
    return manifest


def check_compatible(out: str, wanted: dict) -> None:
    """Refuse (CacheError, one line) to add to a cache made with another configuration."""
    try:
        existing = cf.read_manifest(out)
    except cf.CacheError:
        return
    diff = cf.config_mismatch(existing, wanted)
    if diff:
        raise cf.CacheError(f"{out}: refusing to add to a cache made with another configuration ({diff})")


class _Batcher:
    """Collects rendered views into teacher batches of exactly `size` views, in order."""

    def __init__(self, size: int):
        self.size = size
        self.items: list[tuple[str, int, np.ndarray, bool, torch.Tensor, bytes | None]] = []

    def add(self, s: RenderedSample) -> None:
        for v in range(len(s.pixels)):
            self.items.append((s.key, v, s.crops[v], bool(s.flips[v]), s.pixels[v],
                               s.encoded[v] if s.encoded is not None else None))

    def take(self, final: bool = False):
        while len(self.items) >= self.size or (final and self.items):
            batch, self.items = self.items[: self.size], self.items[self.size:]
            yield batch


def replayed_views(group: cf.ShardGroup | cf.WdsShard) -> dict[str, list[View]]:
    """A cached shard's views, key -> [view 0, ..., view K-1], to render for another teacher."""
    crop, flip, _ = group.geometry()
    views: dict[str, list[View]] = {}
    for key, v, box, f in zip(group.keys, group.views, crop, flip):
        views.setdefault(str(key), []).append(View(*(int(c) for c in box), flip=bool(f)))
        if len(views[str(key)]) != int(v) + 1:
            raise cf.CacheError(f"{group.path}: key {key}: views are not stored in order 0..K-1")
    return views


def extract_shard(url: str, teacher: Teacher, cfg: ExtractConfig, bar: tqdm | None,
                  geometry: dict[str, list[View]] | None = None) -> dict:
    """Extract one shard into its group and record it complete; returns its manifest entry.

    With `geometry` (another teacher added to a cache) exactly those views are rendered,
    and samples without cached views are skipped, so rows match the cache's one for one.
    """
    t0 = time.time()
    samples, source_sha256 = read_shard_with_digest(url)
    n_views = cfg.views.per_image
    ext = PIXEL_CODECS[cfg.store_pixels][2] if cfg.store_pixels else None
    writer = cf.open_shard_writer(cfg.format, cfg.out, url, len(samples) * n_views, teacher.dim, teacher.grid ** 2,
                                  cfg.dtype, cfg.layers, ext)
    cf.forget_shard(cfg.out, writer.group_path)  # an entry left from an earlier write no longer holds
    skipped: list[dict] = []
    seen: set[str] = set()
    unique = []
    for s in samples:  # a repeated key would make rows ambiguous: keep the first
        if s.key in seen:
            skipped.append({"key": s.key, "reason": "duplicate key in shard"})
        elif geometry is not None and s.key not in geometry:
            seen.add(s.key)
            skipped.append({"key": s.key, "reason": "no views in the cache (skipped at its extraction)"})
        else:
            seen.add(s.key)
            unique.append(s)
    loader = DataLoader(RenderDataset(unique, cfg.views, teacher.input_size, geometry, cfg.store_pixels), batch_size=None,
                        num_workers=cfg.workers, prefetch_factor=4 if cfg.workers else None)
    batcher = _Batcher(cfg.batch_size)
    failed = 0  # samples of `unique` that could not be rendered
    try:
        for rendered in loader:
            if rendered.error:
                if cfg.strict:
                    raise SkippedSampleError(f"{url}: key {rendered.key}: {rendered.error}")
                warnings.warn(f"skipping {url} key {rendered.key}: {rendered.error}", stacklevel=1)
                skipped.append({"key": rendered.key, "reason": rendered.error})
                failed += 1
                continue
            batcher.add(rendered)
            for batch in batcher.take():
                _run_batch(batch, teacher, cfg, writer, bar)
        for batch in batcher.take(final=True):
            _run_batch(batch, teacher, cfg, writer, bar)
        kept = len(unique) - failed
        _, digest, size = writer.close({"source": url, "num_samples": kept})
        if geometry is not None and writer.rows != sum(len(v) for v in geometry.values()):
            raise cf.CacheError(f"{url}: {writer.rows} views rendered where the cache holds "
                                f"{sum(len(v) for v in geometry.values())}: the shard changed since extraction")
        entry = {"source": url, "group": writer.group_path, "num_samples": kept,
                 "num_views": writer.rows, "skipped": skipped, "status": "complete", "sha256": digest,
                 "bytes": size, "source_bytes": local_file_size(url), "source_sha256": source_sha256,
                 "seconds": round(time.time() - t0, 2)}
        cf.commit_shard(cfg.out, writer, entry)
    except BaseException:
        writer.abort()
        raise
    return entry


def _run_batch(batch, teacher: Teacher, cfg: ExtractConfig, writer: cf.ShardWriter | cf.WdsShardWriter,
               bar: tqdm | None) -> None:
    keys, views, crops, flips, pixels, encoded = zip(*batch)
    x = torch.stack(pixels).to(cfg.device, non_blocking=True)
    x = normalize(x, teacher.mean, teacher.std)  # on the device: uint8 crosses the bus, 4x fewer bytes
    with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=x.device.type == "cuda"):
        out = teacher(x, layers=cfg.layers)
    np_ = lambda t: t.float().cpu().numpy()  # noqa: E731
    writer.append(list(keys), np.array(views), np.stack(crops), np.array(flips), np_(out.features),
                  np_(out.attention), np_(out.cls), {i: np_(t) for i, t in out.layers.items()},
                  pixels=list(encoded) if cfg.store_pixels else None)
    if bar is not None:
        bar.update(len(batch))


def process_rank() -> tuple[int, int, int]:
    """(rank, world size, local rank) as torchrun / accelerate launch set them; (0, 1, 0) alone."""
    env = os.environ
    return int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0))


def run_extraction(cfg: ExtractConfig) -> dict:
    """Extract every shard of this process not yet complete in `cfg.out`; returns a summary.

    Under torchrun / accelerate launch, input shard i belongs to rank i % world_size: each
    rank writes whole shards and their entries only, so no file has two writers and no lock
    or process group is needed; the cache is the same whatever the process count.
    """
    rank, world, local_rank = process_rank()
    device = f"cuda:{local_rank}" if cfg.device == "cuda" and world > 1 else cfg.device
    base = cf.FeatureCache(cfg.views_from) if cfg.views_from else None
    if base is not None:  # another teacher for the same views: the cache's geometry, backend and shards
        cfg = replace(cfg, views=ViewConfig.from_json(base.manifest["views"]), format=base.backend)
    urls = expand_urls(cfg.shards) if cfg.shards or base is None else [s["source"] for s in base.complete_shards]
    mine = [u for i, u in enumerate(urls) if i % world == rank]
    teacher = build_teacher(cfg.teacher).to(device)
    wanted = wanted_manifest(teacher, cfg)
    check_compatible(cfg.out, wanted)
    cf.init_cache(cfg.out, wanted)
    manifest = cf.read_manifest(cfg.out)
    todo = [u for u in mine if not _is_complete(cfg.out, manifest, u)]
    summary = {"shards": len(mine), "skipped_complete": len(mine) - len(todo), "extracted": 0, "views": 0,
               "samples_skipped": 0, "rank": rank, "world_size": world}
    bar = tqdm(total=None, unit="view", desc=f"extract[{rank}]" if world > 1 else "extract",
               disable=not cfg.progress, dynamic_ncols=True, position=rank)
    t0 = time.time()
    run_cfg = replace(cfg, device=device)
    try:
        for url in todo:
            entry = extract_shard(url, teacher, run_cfg, bar, replayed_views(base.shard(url)) if base else None)
            summary["extracted"] += 1
            summary["views"] += entry["num_views"]
            summary["samples_skipped"] += len(entry["skipped"])
    finally:
        bar.close()
    summary["seconds"] = round(time.time() - t0, 2)
    return summary


def _is_complete(root: str, manifest: dict, url: str) -> bool:
    entry = cf.shard_entry(manifest, url)
    return bool(entry and entry.get("status") == "complete" and cf.Location(root).exists(entry["group"]))

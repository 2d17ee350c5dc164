"""Runner: drive reader -> mapper -> teacher -> writer, one input shard at a time.

The shard is the unit of work and of resumption: a shard whose group the manifest marks
complete is skipped; any other is rewritten whole. Stream shapes through one shard:

    RawSample (bytes)              reader, on a thread one shard ahead (`_read_ahead`)
    RenderedSample (K uint8 views) mapper, DataLoader workers started once per run
                                   (`RenderLoader`), 8 samples a task, tar order kept;
                                   --render-on-device: the PIL-decoded image [3, H, W] and
                                   K view boxes instead of the views
    [ViewItem] -> TeacherOutput    the teacher stage (teacher_stage.py): batches of exactly
                                   `batch_size` views, rendered on the device where asked,
                                   run under the stage's one precision rule
    int8 [B, L, C] + scales ...    stored form made on the device (--pca K: [B, L, K] first),
                                   copied to the host without blocking (`_device_batch`)
    rows                           shard writer on a write-behind thread (`_WriteBehind`;
                                   Zarr: buffered to whole chunks; wds: tar samples)

With `--pca K` a basis is fitted before any shard is written, on the teacher's tokens of
the first `--pca-fit-views` views in input order (the same render and teacher code, the
same batches), and stored in the cache; every process then projects with the stored one.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import time
import warnings
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Callable, Iterator

import numpy as np
import torch
from tqdm import tqdm

from mrmae import __version__
from mrmae.extract.config import ExtractConfig
from mrmae.extract.mapper import RenderLoader
from mrmae.extract.pca_fit import ensure_pca_basis
from mrmae.extract.teacher_stage import (SkippedSampleError, ViewItem, device_decoder, device_views, render_loader,
                                         teacher_batches, teacher_outputs, unique_samples)
from mrmae.shared.shards import REPEATED_KEY, RawSample, expand_urls, local_file_size, read_shard_with_digest
from mrmae.shared import cache_format as cf
from mrmae.shared.cache_format.pca import measured_fields
from mrmae.shared.errors import OptionError
from mrmae.shared.launch import process_rank
from mrmae.shared.teachers.base import Teacher, TeacherSpec, build_teacher
from mrmae.shared.views import PIXEL_CODECS, View, encode_view

__all__ = ["run_extraction", "extract_shard"]

log = logging.getLogger("mrmae.extract")


def wanted_manifest(teacher: Teacher, cfg: ExtractConfig) -> cf.Manifest:
    teacher_entry = teacher.describe()
    storage = cf.storage_section(cfg.format, cfg.dtype, cfg.store_pixels,
                                 (cfg.pca, cfg.pca_fit_views) if cfg.pca else None, cfg.int8_group)
    # a target's views are those of the cache two levels up
    return cf.new_manifest(teacher_entry, cfg.views, storage, __version__, "../.." if cfg.views_from else None)


def check_compatible(out: str, wanted: cf.Manifest) -> None:
    """Refuse (CacheError, one line) to add to a cache made with another configuration."""
    try:
        existing = cf.read_manifest(out)
    except cf.CacheError:
        return
    diff = cf.config_mismatch(existing, wanted)
    if diff and diff.startswith(("storage.quantisation", "storage.int8_group")):
        diff += "; --int8-group 0 gives one scale per token, as caches of format 2 have"
    if diff:
        raise cf.CacheError(f"{out}: refusing to add to a cache made with another configuration ({diff})")


def replayed_views(group: cf.ShardReader) -> dict[str, list[View]]:
    """A cached shard's views, key -> [view 0, ..., view K-1], to render for another teacher."""
    crop, flip, _ = group.geometry()
    views: dict[str, list[View]] = {}
    for key, v, box, f in zip(group.keys, group.views, crop, flip):
        views.setdefault(str(key), []).append(View(*(int(c) for c in box), flip=bool(f)))
        if len(views[str(key)]) != int(v) + 1:
            raise cf.CacheError(f"{group.path}: key {key}: views are not stored in order 0..K-1")
    return views


def replay_geometry(cache: cf.FeatureCache, url: str, samples: list[RawSample]) -> dict[str, list[View]]:
    """The cached views of shard `url` to replay for another teacher, after proving that
    `samples` (the shard as read now) hold the images they were drawn on: each key's image
    against its rows' recorded sha256, before any view is rendered (one CacheError naming
    the shard and the first key whose image differs)."""
    group = cache.shard(url)
    views = replayed_views(group)
    if group.image_digests() is not None:
        seen: set[str] = set()
        for s in samples:
            if s.key in views and s.key not in seen:  # the first copy of a key is the one extracted
                seen.add(s.key)
                cf.check_image(url, s.key, s.image, group.image_digest(group.row(s.key, 0)), str(cache.root))
    return views


def _report_repeats(url: str, skipped: list[dict], strict: bool) -> None:
    """Later copies of a repeated key: under `strict`, a SkippedSampleError at the first
    (else they are warned with the shard's other skips, `warn_skipped`, and listed in the
    entry's `skipped`)."""
    for s in skipped:
        if s["reason"] == REPEATED_KEY and strict:
            raise SkippedSampleError(f"{url}: key {s['key']}: {REPEATED_KEY}")


SHOWN_KEYS = 3  # keys a grouped skip warning names


def skip_kind(reason: str) -> str:
    """A skip's kind: its reason without details (`undecodable image`, `no image member`)."""
    return re.sub(r" \(.*$", "", reason.split(":")[0])


def warn_skipped(url: str, skipped: list[dict]) -> None:
    """A shard's skipped samples as warnings, one line per kind: a shard of 100,000 members
    that are no images warns once, counting them and naming the first keys (every one is
    listed with its reason in the shard's entry)."""
    kinds: dict[str, list[dict]] = {}
    for s in skipped:
        kinds.setdefault(skip_kind(s["reason"]), []).append(s)
    for kind, items in kinds.items():
        if len(items) == 1:
            warnings.warn(f"skipping {url} key {items[0]['key']}: {items[0]['reason']}", stacklevel=1)
            continue
        more = f" and {len(items) - SHOWN_KEYS:,} more" if len(items) > SHOWN_KEYS else ""
        warnings.warn(f"skipping {url}: {len(items):,} samples: {kind} (keys "
                      f"{', '.join(s['key'] for s in items[:SHOWN_KEYS])}{more}; each listed with its reason "
                      "in the shard's entry)", stacklevel=1)


def extract_shard(url: str, teacher: Teacher, cfg: ExtractConfig, bar: ShardProgress | None,
                  geometry: dict[str, list[View]] | None = None,
                  pca: tuple[torch.Tensor, torch.Tensor] | None = None, loader: RenderLoader | None = None,
                  read: tuple[list[RawSample], str] | None = None) -> cf.ShardEntry:
    """Extract one shard into its group and record it complete; returns its manifest entry.

    With `geometry` (another teacher added to a cache) exactly those views are rendered,
    and samples without cached views are skipped, so rows match the cache's one for one.
    `pca`: (mean [C], basis [K, C]) on the teacher's device: store K coefficients per token.
    `loader`: render workers to reuse (teacher_stage.render_loader); by default started for this shard.
    `read`: the shard's samples and sha256 when already read (`_read_ahead`).
    """
    t0 = time.time()
    samples, source_sha256 = read or read_shard_with_digest(url)
    unique, skipped = unique_samples(samples, geometry)
    _report_repeats(url, skipped, cfg.strict)  # before anything of the shard is written
    # each row records the sha256 of the image file its views are rendered from, so training
    # can prove a sample's image before rendering it (a shard's sha256 is known only at its end)
    digests = {s.key: cf.image_sha256(s.image) for s in unique}
    n_views = cfg.views.per_image
    ext = PIXEL_CODECS[cfg.store_pixels][2] if cfg.store_pixels else None
    writer = cf.open_shard_writer(cfg.format, cfg.out, url, len(samples) * n_views, teacher.dim, teacher.grid ** 2,
                                  cfg.dtype, pixels=ext, feature_dim=cfg.pca, int8_group=cfg.int8_group)
    # (an entry of an earlier write stays: it points to its own whole group until this
    # shard's entry replaces it, so the shard never looks complete with other bytes)
    failed: set[str] = set()  # keys of `unique` that could not be rendered

    def on_error(key: str, reason: str) -> None:
        if cfg.strict:
            raise SkippedSampleError(f"{url}: key {key}: {reason}")
        skipped.append({"key": key, "reason": reason})
        failed.add(key)

    behind = _WriteBehind()
    try:
        try:
            loader = loader or render_loader(cfg, teacher.input_size)
            if bar is not None:
                bar.start_shard(len(unique) * n_views)
            for batch in teacher_batches(unique, loader, cfg, geometry, on_error):
                behind.submit(_write_batch, _device_batch(batch, teacher, cfg, pca), cfg, writer, bar, digests)
            behind.drain()
        except SkippedSampleError as e:
            raise SkippedSampleError(str(e) if str(e).startswith(url) else f"{url}: {e}") from e
        kept = [s.key for s in unique if s.key not in failed]
        entry = _publish(url, cfg, writer, kept, skipped, geometry, source_sha256, t0)
        warn_skipped(url, skipped)
        if bar is not None:
            bar.end_shard()
    except BaseException:
        behind.close()  # nothing may write into the shard being removed
        writer.abort()
        raise
    behind.close()
    return entry


def _publish(url: str, cfg: ExtractConfig, writer: cf.GroupWriter, kept: list[str],
             skipped: list[dict], geometry: dict[str, list[View]] | None, source_sha256: str,
             t0: float) -> cf.ShardEntry:
    """Finish the shard's group and record it complete in the manifest: only if the rows
    written are exactly the `kept` samples x K views, in order (and, replaying a cache's
    views, as many as the cache holds); returns the entry, timed from `t0` (time.time())."""
    n_views = cfg.views.per_image
    if geometry is not None and len(kept) * n_views != sum(len(v) for v in geometry.values()):
        raise cf.CacheError(f"{url}: {len(kept) * n_views} views rendered where the cache holds "
                            f"{sum(len(v) for v in geometry.values())}: the shard changed since extraction")
    digest, size = writer.finish({"source": url, "num_samples": len(kept)},
                                 [(k, v) for k in kept for v in range(n_views)])
    entry = cf.ShardEntry(url, writer.group_path, len(kept), writer.rows,
                          tuple(cf.Skipped(s["key"], s["reason"]) for s in skipped), "complete", digest, size,
                          local_file_size(url), source_sha256, round(time.time() - t0, 2), writer.files)
    cf.commit_shard(cfg.out, writer, entry)
    return entry


def _read_ahead(urls: list[str]) -> Iterator[tuple[str, tuple[list[RawSample], str]]]:
    """(url, (samples, sha256)) for each shard, the next one read and hashed on a thread
    while the current one is extracted, so the device does not wait for each tar. A shard
    that cannot be read raises its ShardReadError when its turn comes, as it would unread."""
    with ThreadPoolExecutor(1, thread_name_prefix="mrmae-read") as pool:
        pending = deque(pool.submit(read_shard_with_digest, u) for u in urls[:1])
        for i, url in enumerate(urls):
            if i + 1 < len(urls):
                pending.append(pool.submit(read_shard_with_digest, urls[i + 1]))
            yield url, pending.popleft().result()


class _WriteBehind:
    """Writes batches on one thread behind the device: while batch i is copied to the host,
    compressed (numcodecs releases the GIL) and written, the teacher already runs batch i+1.
    One thread keeps rows in order; at most `depth` batches wait, so host memory stays bounded.
    A writer's error surfaces at the next `submit` or at `drain`."""

    def __init__(self, depth: int = 2):
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="mrmae-write")
        self.pending: deque[Future] = deque()
        self.depth = depth

    def submit(self, fn: Callable[..., None], *args) -> None:
        self.pending.append(self.pool.submit(fn, *args))
        while len(self.pending) > self.depth:
            self.pending.popleft().result()

    def drain(self) -> None:
        while self.pending:
            self.pending.popleft().result()

    def close(self) -> None:
        """Stop: batches not started are dropped, the one being written finishes."""
        for future in self.pending:
            future.cancel()
        self.pool.shutdown(wait=True)


@dataclass
class _HostBatch:
    """One batch's rows on their way to host memory: tensors copied without blocking (wait
    for `ready` on CUDA), features already quantised on the device when the cache is int8."""

    keys: tuple[str, ...]
    views: tuple[int, ...]
    crops: tuple[np.ndarray, ...]
    flips: tuple[bool, ...]
    features: torch.Tensor | tuple[torch.Tensor, torch.Tensor]
    attention: torch.Tensor
    cls: torch.Tensor
    pixels: list[bytes] | torch.Tensor | None  # encoded views, or uint8 [B, 3, S, S] to encode
    ready: torch.cuda.Event | None


def _device_batch(batch: list[ViewItem], teacher: Teacher, cfg: ExtractConfig,
                  pca: tuple[torch.Tensor, torch.Tensor] | None = None) -> _HostBatch:
    """The teacher's outputs for one batch, brought to what the cache stores on the device
    (PCA projection, int8 quantisation, float16) and sent to the host without waiting."""
    x = student = None
    if batch[0].image is not None and cfg.store_pixels:  # rendered on the device for the teacher and the student
        x, student = device_views(batch, (teacher.input_size, cfg.views.output_size), cfg.device)
    out = teacher_outputs(batch, teacher, cfg.device, x)
    host = lambda t: t.to("cpu", non_blocking=True)  # noqa: E731

    def stored(t: torch.Tensor):
        if cfg.dtype == "int8":
            return tuple(host(a) for a in cf.quantize_int8_torch(t.float(), cfg.int8_group))
        return host(t.float().half())

    features = out.features.float()
    if pca is not None:  # in float32: K instead of C values per token from here on
        mean, basis = pca
        features = (features - mean) @ basis.T
    pixels = [item.encoded for item in batch] if cfg.store_pixels else None
    if student is not None:  # the student-size views, encoded by the write thread
        pixels = host(student)
    b = _HostBatch(tuple(i.key for i in batch), tuple(i.view for i in batch), tuple(i.crop for i in batch),
                   tuple(i.flip for i in batch), stored(features), host(out.attention.float().half()),
                   host(out.cls.float().half()), pixels, None)
    if features.device.type == "cuda":  # after every copy above is queued, on their device's stream
        b.ready = torch.cuda.Event()
        b.ready.record(torch.cuda.current_stream(features.device))
    return b


@functools.cache
def _encoder_pool() -> ThreadPoolExecutor:
    """Threads that encode --store-pixels views on the device path (zstd and PIL's encoders
    release the GIL); `map` keeps the order, so the bytes do not depend on the thread count."""
    return ThreadPoolExecutor(min(8, os.cpu_count() or 1), thread_name_prefix="mrmae-encode")


def _write_batch(b: _HostBatch, cfg: ExtractConfig, writer: cf.GroupWriter,
                 bar: ShardProgress | None, digests: dict[str, bytes]) -> None:
    """Append one batch to the shard (on the write thread); `digests`: key -> sha256 of its image."""
    if b.ready is not None:
        b.ready.synchronize()
    np_ = lambda v: tuple(t.numpy() for t in v) if isinstance(v, tuple) else v.numpy()  # noqa: E731
    pixels = b.pixels
    if isinstance(pixels, torch.Tensor):  # encoding costs about what rendering does: one thread would bound it
        pixels = list(_encoder_pool().map(lambda p: encode_view(p, cfg.store_pixels), pixels))
    writer.append(list(b.keys), np.array(b.views), np.stack(b.crops), np.array(b.flips), np_(b.features),
                  np_(b.attention), np_(b.cls), pixels=pixels,
                  image_sha256=[digests[k] for k in b.keys])
    if bar is not None:
        bar.add_views(len(b.keys))


def _write_errors_in_one_line(run: Callable[..., dict]) -> Callable[..., dict]:
    """A full disk or a read-only `--out` ends the run as one CacheError naming the path."""

    @functools.wraps(run)
    def wrapped(cfg: ExtractConfig, *args, **kwargs) -> dict:
        with cf.writing(cfg.out):
            return run(cfg, *args, **kwargs)

    return wrapped


class ShardProgress:
    """The extraction's bar (stderr): this process's shards to extract, with a total and an
    ETA. Within a shard it moves by the share of the shard's views written, known once the
    shard is read (its unique samples x K); its postfix counts views and views/s. A shard's
    view count is not known before it is read, so no views total is claimed."""

    def __init__(self, shards: int, desc: str, enabled: bool, position: int = 0):
        self.bar = tqdm(total=shards, desc=desc, disable=not enabled, dynamic_ncols=True, position=position,
                        bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.1f}/{total} shards "
                                   "[{elapsed}<{remaining}{postfix}]")
        self.done, self.views, self.in_shard, self.expected = 0, 0, 0, 1
        self.t0 = time.monotonic()

    def start_shard(self, views: int) -> None:
        """The shard now extracted holds at most `views` views (some may not render)."""
        self.in_shard, self.expected = 0, max(views, 1)

    def add_views(self, n: int) -> None:
        """n views written (on the write thread)."""
        self.views += n
        self.in_shard += n
        self.bar.n = self.done + min(self.in_shard / self.expected, 1.0)
        rate = self.views / max(time.monotonic() - self.t0, 1e-9)
        self.bar.set_postfix_str(f"{self.views} views, {rate:.1f} views/s", refresh=False)
        self.bar.refresh()

    def end_shard(self) -> None:
        self.done += 1
        self.bar.n = self.done
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


@_write_errors_in_one_line
def run_extraction(cfg: ExtractConfig, teacher: Teacher | None = None) -> dict:
    """Extract every shard of this process not yet complete in `cfg.out`; returns a summary.

    `teacher`: the teacher `cfg.teacher` names, already built (tests and benchmarks reuse
    one); moved to the device. Under torchrun / accelerate launch, input shard i belongs to
    rank i % world_size: each rank writes whole shards and their entries only (and a writer
    of a shard another run published with the same bytes yields: CACHE_FORMAT.md,
    "concurrent writers"), so no lock or process group is needed; the cache is the same
    whatever the process count.
    """
    rank, world, local_rank = process_rank()
    device = f"cuda:{local_rank}" if cfg.device == "cuda" and world > 1 else cfg.device
    if torch.device(device).type == "cuda":  # streams, events and new tensors default to this rank's GPU
        torch.cuda.set_device(torch.device(device))
    base = cf.FeatureCache(cfg.views_from) if cfg.views_from else None
    if base is not None:  # another teacher for the same views: the cache's geometry, backend and shards
        cfg = replace(cfg, views=base.manifest.views, format=base.manifest.backend)
    urls = (expand_urls(cfg.shards) if cfg.shards or base is None  # a recorded command is never run (--shards)
            else [base.recorded_source(s) for s in base.complete_shards])
    check_options(cfg)  # before the teacher is built and anything is written
    check_shard_list(urls, cfg.shards)
    teacher = _teacher_for(cfg, teacher).to(device)
    check_teacher_options(cfg, teacher)
    if cfg.decode_on_device:  # recorded: training may replay views from the tars only with PIL
        cfg = replace(cfg, views=replace(cfg.views, decoder=device_decoder(device)))
    run_cfg = replace(cfg, device=device)
    manifest, pca = _open_cache(run_cfg, teacher, urls, rank, base)
    mine = [u for i, u in enumerate(urls) if i % world == rank]
    todo = [u for u in mine if not _is_complete(cfg.out, manifest, u)]
    summary = {"shards": len(mine), "skipped_complete": len(mine) - len(todo), "extracted": 0, "views": 0,
               "samples_skipped": 0, "rank": rank, "world_size": world}
    bar = ShardProgress(len(todo), f"extract[{rank}]" if world > 1 else "extract", cfg.progress, rank)
    t0 = time.time()
    loader = render_loader(run_cfg, teacher.input_size)
    try:
        for url, read in _read_ahead(todo):
            geometry = replay_geometry(base, url, read[0]) if base is not None else None
            entry = extract_shard(url, teacher, run_cfg, bar, geometry, pca, loader, read)
            summary["extracted"] += 1
            summary["views"] += entry.num_views
            summary["samples_skipped"] += len(entry.skipped)
    finally:
        bar.close()
        del loader  # its workers end with the DataLoader's iterator
    summary["seconds"] = round(time.time() - t0, 2)
    return summary


def _teacher_for(cfg: ExtractConfig, teacher: Teacher | None) -> Teacher:
    """The teacher given (refused, one line, when it is not the one `cfg.teacher` names:
    the manifest records the teacher that ran), or `cfg.teacher` built."""
    if teacher is None:
        return build_teacher(cfg.teacher)
    if str(teacher.spec) != str(TeacherSpec.parse(cfg.teacher)):
        raise OptionError(f"run_extraction: the teacher given is {teacher.spec}, the configuration names {cfg.teacher}")
    return teacher


def _open_cache(cfg: ExtractConfig, teacher: Teacher, urls: list[str], rank: int, base: cf.FeatureCache | None
                ) -> tuple[cf.Manifest, tuple[torch.Tensor, torch.Tensor] | None]:
    """Create `cfg.out` (or check it is a cache of this configuration), fitting and storing
    its PCA basis first with --pca; returns its manifest and the basis (mean [C], basis
    [K, C]) on `cfg.device`, or None."""
    wanted = wanted_manifest(teacher, cfg)
    check_compatible(cfg.out, wanted)  # before any fit: a cache of another configuration is refused at once
    pca = digest = None
    if cfg.pca:
        geometry_of = (lambda u, samples: replay_geometry(base, u, samples)) if base is not None else \
            (lambda u, samples: None)
        basis, digest = ensure_pca_basis(cfg, teacher, urls, rank, geometry_of)
        fitted = replace(wanted.storage.pca, **measured_fields(basis, digest))
        wanted = replace(wanted, storage=replace(wanted.storage, pca=fitted))
        pca = (torch.from_numpy(basis.mean).to(cfg.device), torch.from_numpy(basis.basis).to(cfg.device))
    cf.init_cache(cfg.out, wanted)
    check_compatible(cfg.out, wanted)  # again: a run started beside this one may have made the cache since
    manifest = cf.read_manifest(cfg.out)
    if cfg.pca and (manifest.storage.pca is None or manifest.storage.pca.sha256 != digest):
        raise cf.CacheError(f"{cf.Location(cfg.out).join(cf.PCA_FILE)}: not the basis the manifest records "
                            "(sha256 differs): replaced or damaged")
    return manifest, pca


def check_options(cfg: ExtractConfig) -> None:
    """Refuse (OptionError naming the option) values that cannot work, before anything is written."""
    for option, value, least in (("--views", cfg.views.per_image, 1), ("--batch-size", cfg.batch_size, 1),
                                 ("--workers", cfg.workers, 0), ("--image-size", cfg.views.output_size, 1)):
        if value < least:
            raise OptionError(f"{option} {value}: must be at least {least}")
    if cfg.decode_on_device and cfg.render_on_device is not None:
        option = "--render-on-device" if cfg.render_on_device else "--no-render-on-device"
        raise OptionError(f"{option}: not with --decode-on-device, which decodes and renders on the device itself")


def check_shard_list(urls: list[str], given: str | list[str]) -> None:
    """--shards names at least one shard, each once: a shard listed twice (overlapping brace
    ranges) would be extracted twice and counted twice in the summary."""
    if given and not urls:
        raise OptionError(f"--shards {given!r}: names no shard")
    if len(set(urls)) != len(urls):
        twice = next(u for u in urls if urls.count(u) > 1)
        raise OptionError(f"--shards: {twice} is listed twice")


def check_teacher_options(cfg: ExtractConfig, teacher: Teacher) -> None:
    """The options that depend on the teacher (its depth, its width), before anything is written."""
    if cfg.dtype == "int8" and cfg.int8_group and teacher.dim % cfg.int8_group:
        raise cf.CacheError(f"--int8-group {cfg.int8_group} does not divide the {teacher.dim} channels of "
                            f"{cfg.teacher}: give a divisor, or 0 for one scale per token")


def _is_complete(root: str, manifest: cf.Manifest, url: str) -> bool:
    entry = cf.shard_entry(manifest, url)
    return bool(entry and entry.complete and cf.Location(root).exists(entry.group))

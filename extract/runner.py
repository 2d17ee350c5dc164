"""Runner: drive reader -> mapper -> teacher -> writer, one input shard at a time.

The shard is the unit of work and of resumption: a shard whose group the manifest marks
complete is skipped; any other is rewritten whole. Stream shapes through one shard:

    RawSample (bytes)              reader, on a thread one shard ahead (`_read_ahead`)
    RenderedSample (K uint8 views) mapper, DataLoader workers started once per run
                                   (`RenderLoader`), 8 samples a task, tar order kept;
                                   --render-on-device: the PIL-decoded image [3, H, W] and
                                   K view boxes instead of the views
    [B, 3, S, S] uint8 -> float    teacher batches of exactly `batch_size` views, on the device
                                   (--render-on-device: rendered there, `_device_views`)
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
import time
import warnings
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Callable, Iterator

import numpy as np
import torch
from tqdm import tqdm

from mrmae import __version__
from mrmae.shared.batch_render import render_batch
from mrmae.extract.device_decode import decode_batch
from mrmae.extract.mapper import RenderedSample, RenderLoader
from mrmae.extract.pca_fit import ensure_pca_basis
from mrmae.shared.shards import REPEATED_KEY, RawSample, expand_urls, local_file_size, read_shard_with_digest
from mrmae.shared import cache_format as cf
from mrmae.shared.cache_format.pca import measured_fields
from mrmae.shared.errors import OptionError
from mrmae.shared.teachers import Teacher, TeacherOutput, build_teacher
from mrmae.shared.views import PIXEL_CODECS, ImageDecodeError, View, ViewConfig, encode_view, normalize

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
    int8_group: int | None = cf.INT8_GROUP  # int8: channels per scale; None: one scale per token
    format: str = "zarr"  # cache backend: "zarr" (Zarr v3 groups) or "wds" (one tar per shard)
    batch_size: int = 64
    device: str = "cpu"
    workers: int = 0
    strict: bool = False
    progress: bool = True
    views_from: str | None = None  # add a teacher: replay this cache's views (out = its targets/<name>)
    decode_on_device: bool = False  # decode (nvjpeg on CUDA) and render on `device` (extract/device_decode.py)
    # workers decode with PIL, `device` renders (batch_render: the same pixels, the same cache);
    # None: on when `device` is CUDA (and not decode_on_device). See `renders_on_device`.
    render_on_device: bool | None = None
    store_pixels: str | None = None  # also store each view at the student's size, in this codec (views.PIXEL_CODECS)
    pca: int | None = None  # store K PCA coefficients per token instead of the C-wide features
    pca_fit_views: int = 2048  # the basis is fitted on the first N views in input order

    @property
    def renders_on_device(self) -> bool:
        """Whether the main process renders PIL-decoded images on `device` (render_on_device,
        by default on CUDA only: on a CPU the workers' render is the same work, in parallel)."""
        if self.render_on_device is None:
            return torch.device(self.device).type == "cuda" and not self.decode_on_device
        return self.render_on_device


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


class _Batcher:
    """Collects rendered views into teacher batches of exactly `size` views, in order."""

    def __init__(self, size: int):
        self.size = size
        self.items: list[tuple[str, int, np.ndarray, bool, torch.Tensor, bytes | None, bytes | None]] = []

    def add(self, s: RenderedSample) -> None:
        # item 6, the image the device renders from: bytes (--decode-on-device), or the
        # decoded uint8 [3, H, W] (--render-on-device); a batch holds <= size / K + 1 of them
        image = s.decoded if s.decoded is not None else s.image
        for v in range(len(s.crops)):
            self.items.append((s.key, v, s.crops[v], bool(s.flips[v]), s.pixels[v],
                               s.encoded[v] if s.encoded is not None else None, image))

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


def _unique_samples(samples: list[RawSample], geometry: dict[str, list[View]] | None
                    ) -> tuple[list[RawSample], list[dict]]:
    """(samples to render, skipped entries): a repeated key would make rows ambiguous, so
    its first copy is kept and later ones (adjacent or not) are skipped; with `geometry`, a
    sample without cached views has nothing to replay."""
    skipped: list[dict] = []
    seen: set[str] = set()
    unique = []
    for s in samples:
        if s.key in seen:
            skipped.append({"key": s.key, "reason": REPEATED_KEY})
        elif geometry is not None and s.key not in geometry:
            seen.add(s.key)
            skipped.append({"key": s.key, "reason": "no views in the cache (skipped at its extraction)"})
        else:
            seen.add(s.key)
            unique.append(s)
    return unique, skipped


def _report_repeats(url: str, skipped: list[dict], strict: bool) -> None:
    """Later copies of a repeated key: one warning each (they are listed in the entry's
    `skipped`), or, under `strict`, a SkippedSampleError at the first."""
    for s in skipped:
        if s["reason"] == REPEATED_KEY:
            if strict:
                raise SkippedSampleError(f"{url}: key {s['key']}: {REPEATED_KEY}")
            warnings.warn(f"skipping {url} key {s['key']}: {REPEATED_KEY}", stacklevel=1)


def render_loader(cfg: ExtractConfig, input_size: int) -> RenderLoader:
    """The workers that render views for `cfg` (or only decode them, or read headers: the
    device renders), for as many shards as the run has."""
    work = "header" if cfg.decode_on_device else "decode" if cfg.renders_on_device else "render"
    codec = cfg.store_pixels if work == "render" else None  # on the device paths _write_batch encodes
    return RenderLoader(cfg.views, input_size, cfg.workers, codec, work)


def _teacher_batches(unique: list[RawSample], loader: RenderLoader, cfg: ExtractConfig,
                     geometry: dict[str, list[View]] | None,
                     on_error: Callable[[str, str], None]) -> Iterator[list]:
    """One shard's views rendered (the loader's workers, tar order) and grouped into teacher
    batches of exactly `cfg.batch_size` views (the last one shorter); a sample that cannot
    be rendered goes to `on_error(key, reason)`. Extraction and the PCA fit both use it, so
    the fit's first shard has exactly the batches (and the bits) extraction gives it."""
    batcher = _Batcher(cfg.batch_size)
    # --decode-on-device: workers only read image headers; the bytes stay here (keys are unique)
    images = {s.key: s.image for s in unique} if cfg.decode_on_device else {}
    for chunk in loader.render(unique, geometry):  # list[RenderedSample], SAMPLES_PER_ITEM at a time
        for rendered in chunk:
            if rendered.error:
                on_error(rendered.key, rendered.error)
                continue
            rendered.image = images.get(rendered.key)
            batcher.add(rendered)
        yield from batcher.take()
    yield from batcher.take(final=True)


def extract_shard(url: str, teacher: Teacher, cfg: ExtractConfig, bar: tqdm | None,
                  geometry: dict[str, list[View]] | None = None,
                  pca: tuple[torch.Tensor, torch.Tensor] | None = None, loader: RenderLoader | None = None,
                  read: tuple[list[RawSample], str] | None = None) -> cf.ShardEntry:
    """Extract one shard into its group and record it complete; returns its manifest entry.

    With `geometry` (another teacher added to a cache) exactly those views are rendered,
    and samples without cached views are skipped, so rows match the cache's one for one.
    `pca`: (mean [C], basis [K, C]) on the teacher's device: store K coefficients per token.
    `loader`: render workers to reuse (`render_loader`); by default started for this shard.
    `read`: the shard's samples and sha256 when already read (`_read_ahead`).
    """
    t0 = time.time()
    samples, source_sha256 = read or read_shard_with_digest(url)
    unique, skipped = _unique_samples(samples, geometry)
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
        warnings.warn(f"skipping {url} key {key}: {reason}", stacklevel=1)
        skipped.append({"key": key, "reason": reason})
        failed.add(key)

    behind = _WriteBehind()
    try:
        try:
            loader = loader or render_loader(cfg, teacher.input_size)
            for batch in _teacher_batches(unique, loader, cfg, geometry, on_error):
                behind.submit(_write_batch, _device_batch(batch, teacher, cfg, pca), cfg, writer, bar, digests)
            behind.drain()
        except SkippedSampleError as e:
            raise SkippedSampleError(str(e) if str(e).startswith(url) else f"{url}: {e}") from e
        kept = [s.key for s in unique if s.key not in failed]
        if geometry is not None and len(kept) * n_views != sum(len(v) for v in geometry.values()):
            raise cf.CacheError(f"{url}: {len(kept) * n_views} views rendered where the cache holds "
                                f"{sum(len(v) for v in geometry.values())}: the shard changed since extraction")
        # published only if the rows on disk are exactly kept samples x views, in order
        digest, size = writer.finish({"source": url, "num_samples": len(kept)},
                                     [(k, v) for k in kept for v in range(n_views)])
        entry = cf.ShardEntry(url, writer.group_path, len(kept), writer.rows,
                              tuple(cf.Skipped(s["key"], s["reason"]) for s in skipped), "complete", digest, size,
                              local_file_size(url), source_sha256, round(time.time() - t0, 2))
        cf.commit_shard(cfg.out, writer, entry)
    except BaseException:
        behind.close()  # nothing may write into the shard being removed
        writer.abort()
        raise
    behind.close()
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


def _device_views(batch: list, sizes: tuple[int, ...], device: str) -> list[torch.Tensor]:
    """The batch's views rendered on `device` at each size -> [uint8 [B, 3, size, size] per
    size], from each key's image once: decoded by the workers with PIL (--render-on-device,
    item 6 a tensor: pixel for pixel the workers' render) or decoded here (--decode-on-device,
    item 6 the bytes). A size asked twice is rendered once."""
    first: dict[str, torch.Tensor | bytes] = {}
    for item in batch:
        first.setdefault(item[0], item[6])
    keys, images = list(first), list(first.values())
    if isinstance(images[0], torch.Tensor):
        on_device = dict(zip(keys, _images_to(images, device)))
    else:
        on_device = _decoded_on_device(keys, images, device)
    views = [View(*(int(c) for c in item[2]), flip=item[3]) for item in batch]
    per_view = [on_device[item[0]] for item in batch]
    rendered = {size: render_batch(per_view, views, size) for size in dict.fromkeys(sizes)}
    return [rendered[size] for size in sizes]


def _images_to(images: list[torch.Tensor], device: str) -> list[torch.Tensor]:
    """Decoded images, uint8 [3, H, W] as decode_image lays them out ([H, W, 3] in memory),
    onto `device` in one copy that does not wait for the teacher running there (a pinned
    staging buffer, non-blocking: from pageable memory CUDA would first wait for the stream);
    on the CPU, the images themselves."""
    device = torch.device(device)
    if device.type == "cpu":
        return images
    hwc = [im.permute(1, 2, 0) for im in images]
    flat = torch.empty(sum(h.numel() for h in hwc), dtype=torch.uint8, pin_memory=device.type == "cuda")
    torch.cat([h.reshape(-1) for h in hwc], out=flat)
    moved, out, start = flat.to(device, non_blocking=True), [], 0
    for h in hwc:
        out.append(moved[start:start + h.numel()].view(h.shape).permute(2, 0, 1))
        start += h.numel()
    return out


def _decoded_on_device(keys: list[str], images: list[bytes], device: str) -> dict[str, torch.Tensor]:
    """--decode-on-device: key -> its image decoded on `device` (nvjpeg on CUDA), uint8 [3, H, W]."""
    try:
        return dict(zip(keys, decode_batch(images, device)))
    except ImageDecodeError as e:
        index = int(str(e).split()[1]) if str(e).startswith("image ") else 0
        raise SkippedSampleError(f"key {keys[index]}: undecodable image on the device path ({e}); extract "
                                 "without --decode-on-device to skip and record such samples") from e


def _forward(batch: list, teacher: Teacher, cfg: ExtractConfig, x: torch.Tensor | None = None) -> TeacherOutput:
    """The teacher's outputs for one batch of rendered views (or `x`, those views already
    rendered on the device), on `cfg.device`."""
    if x is None and (cfg.decode_on_device or cfg.renders_on_device):
        x = _device_views(batch, (teacher.input_size,), cfg.device)[0]
    elif x is None:
        x = torch.stack([item[4] for item in batch]).to(cfg.device, non_blocking=True)
    x = normalize(x, teacher.mean, teacher.std)  # on the device: uint8 crosses the bus, 4x fewer bytes
    with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=x.device.type == "cuda"):
        return teacher(x)


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


def _device_batch(batch: list, teacher: Teacher, cfg: ExtractConfig,
                  pca: tuple[torch.Tensor, torch.Tensor] | None = None) -> _HostBatch:
    """The teacher's outputs for one batch, brought to what the cache stores on the device
    (PCA projection, int8 quantisation, float16) and sent to the host without waiting."""
    keys, views, crops, flips, _, encoded, _ = zip(*batch)
    x = student = None
    if (cfg.decode_on_device or cfg.renders_on_device) and cfg.store_pixels:  # for the teacher and the student
        x, student = _device_views(batch, (teacher.input_size, cfg.views.output_size), cfg.device)
    out = _forward(batch, teacher, cfg, x)
    host = lambda t: t.to("cpu", non_blocking=True)  # noqa: E731

    def stored(t: torch.Tensor):
        if cfg.dtype == "int8":
            return tuple(host(a) for a in cf.quantize_int8_torch(t.float(), cfg.int8_group))
        return host(t.float().half())

    features = out.features.float()
    if pca is not None:  # in float32: K instead of C values per token from here on
        mean, basis = pca
        features = (features - mean) @ basis.T
    pixels = list(encoded) if cfg.store_pixels else None
    if student is not None:  # the student-size views, encoded by the write thread
        pixels = host(student)
    b = _HostBatch(keys, views, crops, flips, stored(features), host(out.attention.float().half()),
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


def _write_batch(b: _HostBatch, cfg: ExtractConfig, writer: cf.ShardWriter | cf.WdsShardWriter,
                 bar: tqdm | None, digests: dict[str, bytes]) -> None:
    """Append one batch to the shard (on the write thread); `digests`: key -> sha256 of its image."""
    if b.ready is not None:
        b.ready.synchronize()
    np_ = lambda v: tuple(t.numpy() for t in v) if isinstance(v, tuple) else v.numpy()  # noqa: E731
    pixels = b.pixels
    if isinstance(pixels, torch.Tensor):  # ~2-20 ms a view: one thread would bound the device path
        pixels = list(_encoder_pool().map(lambda p: encode_view(p, cfg.store_pixels), pixels))
    writer.append(list(b.keys), np.array(b.views), np.stack(b.crops), np.array(b.flips), np_(b.features),
                  np_(b.attention), np_(b.cls), pixels=pixels,
                  image_sha256=[digests[k] for k in b.keys])
    if bar is not None:
        bar.update(len(b.keys))


def process_rank() -> tuple[int, int, int]:
    """(rank, world size, local rank) as torchrun / accelerate launch set them; (0, 1, 0) alone."""
    env = os.environ
    return int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0))


def _write_errors_in_one_line(run: Callable[[ExtractConfig], dict]) -> Callable[[ExtractConfig], dict]:
    """A full disk or a read-only `--out` ends the run as one CacheError naming the path."""

    @functools.wraps(run)
    def wrapped(cfg: ExtractConfig) -> dict:
        with cf.writing(cfg.out):
            return run(cfg)

    return wrapped


@_write_errors_in_one_line
def run_extraction(cfg: ExtractConfig) -> dict:
    """Extract every shard of this process not yet complete in `cfg.out`; returns a summary.

    Under torchrun / accelerate launch, input shard i belongs to rank i % world_size: each
    rank writes whole shards and their entries only (and a writer of a shard another run
    published with the same bytes yields: CACHE_FORMAT.md, "concurrent writers"), so no lock
    or process group is needed; the cache is the same whatever the process count.
    """
    rank, world, local_rank = process_rank()
    device = f"cuda:{local_rank}" if cfg.device == "cuda" and world > 1 else cfg.device
    if torch.device(device).type == "cuda":  # streams, events and new tensors default to this rank's GPU
        torch.cuda.set_device(torch.device(device))
    base = cf.FeatureCache(cfg.views_from) if cfg.views_from else None
    if base is not None:  # another teacher for the same views: the cache's geometry, backend and shards
        cfg = replace(cfg, views=base.manifest.views, format=base.backend)
    urls = (expand_urls(cfg.shards) if cfg.shards or base is None  # a recorded command is never run (--shards)
            else [base.recorded_source(s) for s in base.complete_shards])
    mine = [u for i, u in enumerate(urls) if i % world == rank]
    check_options(cfg)  # before the teacher is built and anything is written
    check_shard_list(urls, cfg.shards)
    teacher = build_teacher(cfg.teacher).to(device)
    check_teacher_options(cfg, teacher)
    if cfg.decode_on_device:  # recorded: training may replay views from the tars only with PIL
        decoder = "nvjpeg" if torch.device(device).type == "cuda" else "torchvision"
        cfg = replace(cfg, views=replace(cfg.views, decoder=decoder))
    wanted = wanted_manifest(teacher, cfg)
    check_compatible(cfg.out, wanted)  # before any fit: a cache of another configuration is refused at once
    run_cfg = replace(cfg, device=device)
    pca = None
    if cfg.pca:
        geometry_of = (lambda u, samples: replay_geometry(base, u, samples)) if base is not None else \
            (lambda u, samples: None)
        basis, digest = ensure_pca_basis(run_cfg, teacher, urls, rank, geometry_of)
        fitted = replace(wanted.storage.pca, **measured_fields(basis, digest))
        wanted = replace(wanted, storage=replace(wanted.storage, pca=fitted))
        pca = (torch.from_numpy(basis.mean).to(device), torch.from_numpy(basis.basis).to(device))
    cf.init_cache(cfg.out, wanted)
    check_compatible(cfg.out, wanted)  # again: a run started beside this one may have made the cache since
    manifest = cf.read_manifest(cfg.out)
    if cfg.pca and (manifest.storage.pca is None or manifest.storage.pca.sha256 != digest):
        raise cf.CacheError(f"{cf.Location(cfg.out).join(cf.PCA_FILE)}: not the basis the manifest records "
                            "(sha256 differs): replaced or damaged")
    todo = [u for u in mine if not _is_complete(cfg.out, manifest, u)]
    summary = {"shards": len(mine), "skipped_complete": len(mine) - len(todo), "extracted": 0, "views": 0,
               "samples_skipped": 0, "rank": rank, "world_size": world}
    bar = tqdm(total=None, unit="view", desc=f"extract[{rank}]" if world > 1 else "extract",
               disable=not cfg.progress, dynamic_ncols=True, position=rank)
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

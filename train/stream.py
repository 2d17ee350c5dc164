"""The student stream: source shards, one view per sample per epoch, joined with cached
targets, rendered, batched, grouped into optimiser steps. Its stages, in order, and what
the stream holds after each (the types: `train/batch.py`):

    in each DataLoader worker (`StudentStream.stages`):
    epoch_shards        shard URLs in an order drawn from (seed, epoch)
    split_by_node       this rank's shards                 (split="shards" only)
    split_by_worker     this DataLoader worker's shards
    join_views          Joined: key, image bytes, view index, [cached view, targets, attention]; tar order
                        (pixels_from_cache: the stored view's bytes from the cache, row order)
    shuffle             Joined, sample order mixed in a seeded buffer
    rank_slots          this rank's slots of each effective batch (split="samples" only)
    render              Sample: pixels uint8 [3,S,S], [teacher_pixels [3,T,T]], crop, flip, targets as stored
                        (render_on_device: crop_pixels [h,w,3] uint8, the view's box of the decoded
                         image, in place of pixels and teacher_pixels)
    batched             Batch of B samples (crop_pixels: the B crops packed flat, [sum 3 h w])
    steps               Step of A Batches, one optimiser step's (split="samples", A > 1 only: a
                        step never mixes two workers' slots)
    in the training process (`StudentLoader.steps`):
    DataLoader          the workers' items in turn, pinned on CUDA
    steps               Step of A Batches (unless the workers made them)

The loop trains each Step; the step (`engine.PretrainStep`) takes a Batch. With
`render_on_device` the workers stop before resizing: the step renders the batch's views on
its device (`Batch.rendered`, `shared.batch_render`), pixel for pixel what
`render_view_uint8` gives in a worker, so batches, masks and losses are the same either way.

Which of the K views a sample shows in an epoch depends on (seed, epoch, key) alone. In
cached mode the view's crop and flip come from the cache; in live and plain modes they
are drawn with the same function extraction used, so the same seed gives the same views
with or without a cache.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch
import webdataset as wds

from mrmae.shared.prefetch import ReadAhead, opened_ahead
from mrmae.shared.shard_sizes import ShardSizes
from mrmae.shared.shards import ShardReader, TarSample, expand_urls, first_copies, local_file_size, open_source
from mrmae.shared import cache_format as cf
from mrmae.shared.errors import worker_ignores_interrupt
from mrmae.shared.seeding import seed_from
from mrmae.shared.views import (View, ViewConfig, ViewError, check_view, decode_crop, decode_image, decode_view,
                                render_view_uint8, sample_view, view_rng)
from mrmae.train.batch import Batch, Joined, Sample, Step, TargetSet
from mrmae.train.run.loader import InterruptibleLoader, epoch_passes, grouped


@dataclass
class DataConfig:
    shards: list[str]
    batch_size: int
    seed: int = 0
    img_size: int = 224
    views_per_image: int = 2  # K: read from the cache's manifest in cached mode
    view_seed: int | None = None  # live/plain view geometry seed (default: seed); cached: the cache's
    shuffle_buffer: int = 1000
    teacher_size: int = 0  # > 0: also render the view for a live teacher at this size
    split: str = "shards"  # "shards" (scalable) | "samples" (global batches identical at any process count)
    pixels_from_cache: bool = False  # read each view's pixels from the cache (--store-pixels), not the tars
    render_on_device: bool = False  # workers hand over the view's crop; the step renders it (`Batch.rendered`)
    accum_steps: int = 1  # A: split "samples" hands out slots of effective batches of world x A x B
    prefetch: int = 2  # shards a worker opens ahead while it reads one (`shared.prefetch`); 0: none
    sizes: ShardSizes | None = None  # plain and live: the shards' recorded counts, checked as each tar is read


def pick_view(seed: int, epoch: int, key: str, k: int) -> int:
    """The view of `key` shown in `epoch`: a function of (seed, epoch, key) only."""
    return seed_from(seed, epoch, key, bits=64) % k


def epoch_shards(urls: list[str], seed: int, epoch: int) -> list[str]:
    """Shard-level shuffle: the same order on every rank and worker for one epoch."""
    order = list(urls)
    random.Random(f"{seed}:{epoch}").shuffle(order)
    return order


@dataclass
class OpenedShard:
    """A shard as `ViewJoiner._open` leaves it: its cached groups (main and joint teachers')
    and, with prefetch, the tar's stream reading ahead."""

    group: object | None
    joint: list
    source: ReadAhead | None

    def close(self) -> None:
        """Stop reading ahead (a shard opened ahead and never read: the epoch ended first)."""
        if self.source is not None:
            self.source.close()


class ViewJoiner:
    """Joins each source sample with its view for the epoch (and cached targets, if any)."""

    def __init__(self, cfg: DataConfig, cache: cf.FeatureCache | None, joint: tuple[cf.FeatureCache, ...] = ()):
        self.cfg, self.cache, self.joint = cfg, cache, joint
        seed = cfg.seed if cfg.view_seed is None else cfg.view_seed
        self.view_cfg = ViewConfig(per_image=cfg.views_per_image, seed=seed)
        if cache is not None:
            self.view_cfg = cache.manifest.views

    def _targets(self, group, row: int, key: str) -> tuple[View, TargetSet, torch.Tensor]:
        """The cached view, targets and attention of one row, as stored (int8 + scale, or
        float16): they stay that small through the loader and are dequantised on the
        device. Damage is one line naming group and key."""
        try:
            crop, flip, attention = group.geometry()
            values, scale = group.stored_row(row)
        except Exception as e:  # a checksum mismatch, a missing or truncated chunk or member
            why = str(e).removeprefix(f"{group.path}: ") if isinstance(e, cf.CacheError) else \
                f"{type(e).__name__}: {str(e)[:200]}; run `mrmae cache verify`"
            raise cf.CacheError(f"{group.path}: key {key} row {row}: unreadable targets ({why})") from e
        finite = np.isfinite(scale).all() if scale is not None else np.isfinite(values).all()
        if not (finite and np.isfinite(attention[row]).all()):
            raise cf.CacheError(f"{group.path}: key {key} row {row}: non-finite values in the cached targets")
        targets = TargetSet(_tensor(values), None if scale is None else _tensor(scale))
        return View(*(int(c) for c in crop[row]), flip=bool(flip[row])), targets, _tensor(attention[row])

    def _joint_targets(self, groups: list, key: str, view: int, url: str) -> list[TargetSet]:
        """Targets of the joint teachers for the same view, in their order."""
        out = []
        for group in groups:
            try:
                row = group.row(key, view)
            except cf.CacheError:
                raise cf.CacheError(f"{url}: key {key} view {view} has no row in {group.path}") from None
            out.append(self._targets(group, row, key)[1])
        return out

    def __call__(self, urls: Iterator[str], epoch: int) -> Iterator[Joined]:
        for url, opening in opened_ahead(urls, self._open, self.cfg.prefetch, close=OpenedShard.close):
            shard = opening.result()  # (an opening's error: raised here, as without prefetch)
            group, joint = shard.group, shard.joint
            if self.cfg.pixels_from_cache:
                yield from self._cached_views(url, group, joint, epoch)
                continue
            skipped = {s.key for s in group.entry.skipped} if group else set()
            # cached: hashed, which proves the bytes are those extracted
            reader = ShardReader(url, hashed=group is not None, source=shard.source)
            yield from self._joined(url, reader, group, joint, skipped, epoch)
            if group is not None:
                for cache, g in zip((self.cache, *self.joint), (group, *joint)):
                    self._check_identity(url, cache, g, reader.sha256)

    def _open(self, url: str) -> OpenedShard:
        """What reading `url` starts with: its cached groups opened (file list, metadata,
        keys) and, with prefetch, their first rows and geometry read and the tar's stream
        reading ahead; run in a thread while the shard before is read (`opened_ahead`)."""
        group = self.cache.shard(url) if self.cache is not None else None
        joint = [c.shard(url) for c in self.joint]
        source = None
        if self.cfg.prefetch:
            for g in [group, *joint] if group is not None else joint:
                self._warm(g)
            if not self.cfg.pixels_from_cache:
                source = ReadAhead(open_source(url))
        return OpenedShard(group, joint, source)

    def _warm(self, group) -> None:
        """Read ahead what a group's first samples need: geometry, image digests, the first
        block of rows (Zarr: each next block then read while one is used). Best effort: a
        damaged group fails again where its rows are read, with the usual message."""
        group.read_ahead = True
        try:
            group.geometry()
            group.image_digests()
            if len(group):
                group.stored_pixels(0) if self.cfg.pixels_from_cache else group.stored_row(0)
        except Exception:  # noqa: BLE001 (met again, and reported, by the reader)
            pass

    def _joined(self, url: str, reader: ShardReader, group, joint: list, skipped: set[str],
                epoch: int) -> Iterator[Joined]:
        """The shard's samples joined with their views (and targets), in tar order; plain and
        live: its count checked against the one its sizes file records (`cfg.sizes`)."""
        sizes, seen = self.cfg.sizes if group is None else None, 0
        for s in first_copies(reader):  # a repeated key: extraction kept (and rendered) the first copy
            seen += 1
            if sizes is not None:
                sizes.check_not_past(url, seen)
            out = self._join(url, s, group, joint, skipped, epoch)
            if out is not None:
                yield out
        if sizes is not None:
            sizes.check_count(url, seen)

    def _join(self, url: str, s: TarSample, group, joint: list, skipped: set[str], epoch: int) -> Joined | None:
        """One source sample with its view for `epoch` (and its cached targets); None: no
        targets exist (recorded as skipped at extraction) or, uncached, no image."""
        v = pick_view(self.cfg.seed, epoch, s.key, self.view_cfg.per_image)
        if group is None:
            return Joined(s.key, url, v, image=s.image) if s.image is not None else None
        try:
            row = group.row(s.key, v)
        except cf.CacheError:
            if s.key in skipped:
                return None  # undecodable or without an image at extraction: no rows
            raise cf.CacheError(f"{url}: key {s.key} has no rows in the cache {self.cache.root} "
                                "(shard changed since extraction?)") from None
        view, targets, attention = self._targets(group, row, s.key)
        joint_targets = self._joint_targets(joint, s.key, v, url)  # (a joint cache's missing row: named there)
        self._check_image(url, s, v, [(self.cache, group, row), *zip(self.joint, joint, [None] * len(joint))])
        return Joined(s.key, url, v, image=s.image, view=view, targets=[targets, *joint_targets],
                      attention=attention, cache_shard=group.path)  # (rendered, shuffled and batched only from here)

    @staticmethod
    def _check_image(url: str, s: TarSample, view: int, rows: list[tuple[cf.FeatureCache, object, int | None]]) -> None:
        """The sample's image must be the file its cached views were rendered from, in every
        cache (row None: look it up by key and view): checked before the sample goes on to be
        rendered and trained on, so other images behind the same shard and key names stop
        training at the first sample (the shard's sha256, `_check_identity`, only at its end)."""
        digest = None
        for cache, group, row in rows:
            recorded = group.image_digest(group.row(s.key, view) if row is None else row)
            if recorded is not None:
                digest = digest or cf.image_sha256(s.image)
                cf.check_image(url, s.key, s.image, recorded, str(cache.root), digest)

    @staticmethod
    def _check_identity(url: str, cache: cf.FeatureCache, group, sha256: str | None) -> None:
        """The bytes just streamed must be the bytes extracted (into the main cache and any
        joint one): the same names with other images behind them (another bucket, a
        rewritten file) would train on other images' targets."""
        recorded = group.entry.source_sha256
        if recorded and sha256 != recorded:
            raise cf.CacheError(f"{url}: not the shard extracted into {cache.root} (sha256 {sha256[:16]}..., "
                                f"{recorded[:16]}... when extracted): same name, other bytes")

    def _cached_views(self, url: str, group, joint: list, epoch: int) -> Iterator[Joined]:
        """`pixels_from_cache`: the shard's samples from the cache alone, in row (= tar) order;
        the shown view's image file comes from the cache, the source tar is never read."""
        keys = group.keys
        for i, key in enumerate(keys):
            if i and keys[i - 1] == key:
                continue  # the rows of a sample's other views
            key = str(key)
            v = pick_view(self.cfg.seed, epoch, key, self.view_cfg.per_image)
            row = group.row(key, v)
            try:
                encoded = group.stored_pixels(row)
            except (OSError, ValueError, IndexError) as e:  # CacheError (a ValueError) says it already
                if isinstance(e, cf.CacheError):
                    raise
                raise cf.CacheError(f"{group.path}: key {key} row {row}: unreadable stored view "
                                    f"({type(e).__name__}: {str(e)[:200]})") from e
            view, targets, attention = self._targets(group, row, key)
            yield Joined(key, url, v, stored_view=encoded, view=view,
                         targets=[targets, *self._joint_targets(joint, key, v, url)], attention=attention,
                         cache_shard=group.path)


def render_sample(sample: Joined, cfg: DataConfig, view_cfg: ViewConfig) -> Sample:
    """Decode and render one joined sample for the student (and a live teacher), uint8, its
    targets as stored (`batch.Sample`). With `cfg.render_on_device`, the view's box of the
    decoded image instead of pixels and teacher_pixels: `Batch.rendered` renders it on the
    device.

    Normalisation waits for the device (engine.PretrainStep): a uint8 batch is a quarter
    of a float32 one through the worker queue, pinned memory and the bus.
    """
    pixels = teacher_pixels = crop_pixels = None
    if sample.stored_view is not None:  # rendered at extraction: decode only (also with render_on_device)
        view = sample.view
        pixels = decode_view(sample.stored_view, view_cfg.output_size)
    elif cfg.render_on_device:
        # The box alone, not the image: fewer bytes to copy and hand over, and the renderer reads only it.
        crop_pixels, view = decoded_view(sample, view_cfg, crop=True)
    else:
        image, view = decoded_view(sample, view_cfg)
        pixels = render_view_uint8(image, view, cfg.img_size)
        if cfg.teacher_size:
            teacher_pixels = render_view_uint8(image, view, cfg.teacher_size)
    # crop and flip as Python values: tensors once per batch (collate), ~0.1 ms each per sample
    return Sample(sample.key, view.box, view.flip, pixels, teacher_pixels, crop_pixels, sample.targets, sample.attention)


def decoded_view(sample: Joined, view_cfg: ViewConfig, crop: bool = False) -> tuple[torch.Tensor | np.ndarray, View]:
    """A joined sample's image, decoded (uint8 [3, H, W]; `crop`: only the view's box, uint8
    [h, w, 3], `decode_crop`), and the view it shows this epoch: the cached one, or drawn
    as extraction draws them. A cached box outside the image is damage (or another
    image): one line naming shard and key."""
    def choose(height: int, width: int) -> View:  # only the shown view is drawn: view_rng costs ~0.1 ms each
        return sample.view or sample_view(height, width, view_rng(view_cfg.seed, sample.key, sample.view_index),
                                          view_cfg)

    try:
        if crop:
            return decode_crop(sample.image, choose)
        image = decode_image(sample.image)
        view = choose(image.shape[1], image.shape[2])
        check_view(view, image.shape[1], image.shape[2])
        return image, view
    except ViewError as e:  # a cached box (drawn ones always fit): damage, or another image
        raise cf.CacheError(f"{sample.cache_shard or sample.url}: key {sample.key}: cached {e}; "
                            "run `mrmae cache verify`") from None


def _tensor(array: np.ndarray) -> torch.Tensor:
    """A cached array as a tensor, sharing its memory where it is contiguous already."""
    return torch.from_numpy(np.ascontiguousarray(array))


def collate(samples: list[Sample]) -> Batch:
    """B samples -> one Batch: keys a list; tensors stacked ([B, ...]); crop [B, 4] int64 and
    flip [B] bool from their Python values; crop_pixels (crops of different sizes) packed
    flat, uint8 [sum of 3 h w], in sample order."""
    first = samples[0]
    out = Batch([s.key for s in samples], torch.tensor([s.crop for s in samples]), torch.tensor([s.flip for s in samples]))
    for name in ("pixels", "teacher_pixels", "attention"):
        if getattr(first, name) is not None:
            setattr(out, name, _stacked([getattr(s, name) for s in samples]))
    if first.crop_pixels is not None:  # one copy of each crop (a worker's may be read-only)
        values = [s.crop_pixels for s in samples]
        out.crop_pixels = _batch_tensor((sum(v.size for v in values),), torch.uint8)
        np.concatenate(values, axis=None, out=out.crop_pixels.numpy())
    out.targets = [TargetSet(_stacked([s.targets[j].values for s in samples]),
                             None if t.scale is None else _stacked([s.targets[j].scale for s in samples]))
                   for j, t in enumerate(first.targets)]
    return out


def _stacked(values: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack(values, out=_batch_tensor((len(values), *values[0].shape), values[0].dtype))


def _batch_tensor(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An empty tensor for a batch: in a DataLoader worker, in shared memory, so handing the
    batch to the main process copies nothing more (torch's default_collate does the same)."""
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    storage = torch.UntypedStorage._new_shared(math.prod(shape) * dtype.itemsize)
    return torch.empty(0, dtype=dtype).set_(storage, 0, shape)


class StudentStream(torch.utils.data.IterableDataset):
    """An epoch of Batches (or, split "samples" with A > 1, Steps) from the stages of the
    module docstring; call `set_epoch` before iterating (views and order depend on it)."""

    def __init__(self, cfg: DataConfig, cache: cf.FeatureCache | None, joint: tuple[cf.FeatureCache, ...] = ()):
        """`joint`: caches of more teachers for the same views (targets added to `cache`)."""
        super().__init__()
        self.cfg, self.cache = cfg, cache
        self.urls = expand_urls(cfg.shards)
        self.joiner = ViewJoiner(cfg, cache, joint)
        self.epoch, self.repeat = 0, 0

    @property
    def steps_in_workers(self) -> bool:
        """Whether the workers hand over whole Steps: split "samples" with A > 1, where
        DataLoader workers take turns per item, so a step never mixes two workers' slots
        (and their order never depends on A)."""
        return self.cfg.split != "shards" and self.cfg.accum_steps > 1

    def set_epoch(self, epoch: int, repeat: int = 0) -> None:
        """Select the epoch (and, in `shards` mode, which pass over a rank's shards)."""
        self.epoch, self.repeat = epoch, repeat

    def stages(self, rank: int, world: int, worker: int) -> list[Callable[[Iterator], Iterator]]:
        """This worker's stages for the epoch set, in order: each takes the stream the one
        before left (the first ignores its input) and returns the next."""
        cfg, epoch, repeat = self.cfg, self.epoch, self.repeat
        if cfg.split == "shards":
            # Scalable: each rank reads its own shards; the order inside a global batch
            # then depends on the process count.
            split, shuffle_seed = [wds.split_by_node, wds.split_by_worker], f"{cfg.seed}:{epoch}:{repeat}:{rank}:{worker}"
            take, partial = [], True
        else:
            # Exact: every rank reads every shard in the same order and keeps its slots of
            # each global batch (before decoding), so a global batch holds the same samples
            # in the same order at any process count. Costs world-size times the reads.
            split, shuffle_seed = [wds.split_by_worker], f"{cfg.seed}:{epoch}:{worker}"
            take, partial = [lambda src: rank_slots(src, rank, world, cfg.batch_size, cfg.accum_steps)], False
        steps = [lambda batches: (Step(tuple(g)) for g in grouped(batches, cfg.accum_steps))]
        return [
            lambda _: iter(epoch_shards(self.urls, cfg.seed, epoch * 1000 + repeat)),  # URL
            *split,                                                                    # URL (mine)
            lambda urls: self.joiner(urls, epoch),                                     # Joined, tar order
            wds.shuffle(cfg.shuffle_buffer, min(cfg.shuffle_buffer, 100), rng=random.Random(shuffle_seed)),
            *take,                                                                     # this rank's slots
            wds.map(lambda s: render_sample(s, cfg, self.joiner.view_cfg)),           # Sample
            wds.batched(cfg.batch_size, collation_fn=collate, partial=partial),       # Batch of B
            *(steps if self.steps_in_workers else []),                                 # Step of A
        ]

    def __iter__(self) -> Iterator[Batch | Step]:
        rank, world, worker, _ = wds.utils.pytorch_worker_info()
        stream: Iterator = iter([None])
        for stage in self.stages(rank, world, worker):
            stream = stage(stream)
        yield from stream


class StudentLoader:
    """The stream's last stages, in the training process: torch's DataLoader over it (its
    workers run `StudentStream.stages`; batches pinned on CUDA), then this rank's Steps."""

    def __init__(self, stream: StudentStream, workers: int, pin: bool):
        self.stream = stream
        # Not accelerator.prepare(loader): accelerate re-shards iterable datasets and would drop
        # or repeat samples; the stream splits shards (or slots) by node and worker itself.
        self.loader = InterruptibleLoader(stream, batch_size=None, num_workers=workers, pin_memory=pin,
                                          worker_init_fn=worker_ignores_interrupt)

    def steps(self, epoch: int) -> Iterator[Step]:
        """This rank's Steps of `epoch`, in order (the loop takes the epoch's share of them);
        a trailing incomplete step is dropped (it would not step the optimiser)."""
        stream, cfg = self.stream, self.stream.cfg
        if cfg.split == "shards":  # every rank runs the same number of steps (DDP needs it): short ranks repeat
            empty = cf.CacheError(f"this process got no samples (shards {stream.urls[:3]}...): "
                                  "fewer shards than processes x workers?")
            items = epoch_passes(stream, self.loader, epoch, empty)
        else:
            stream.set_epoch(epoch)  # every rank reads the same stream: the same number of batches by construction
            items = iter(self.loader)
        if stream.steps_in_workers:
            return items
        return (Step(tuple(g)) for g in grouped(items, cfg.accum_steps))


def rank_slots(samples: Iterator[Joined], rank: int, world: int, batch_size: int,
               accum_steps: int = 1) -> Iterator[Joined]:
    """This rank's samples of every complete effective batch of E = world x accum_steps x B:
    micro-batch a (0..A-1) takes slots [(a world + rank) B, (a world + rank + 1) B).

    So a step's E samples are the same E consecutive ones of the stream at any split of
    E, each at the same position in it (`micro_batch.MicroBatch.slot`: what keys its mask). A
    trailing incomplete effective batch is dropped on every rank alike: otherwise some
    ranks would have one batch more than others (DDP would wait for them forever), or a
    step would end short of its accumulation.
    """
    pending: list[Joined] = []
    per_step = world * accum_steps * batch_size
    for sample in samples:
        pending.append(sample)
        if len(pending) == per_step:
            for a in range(accum_steps):
                first = (a * world + rank) * batch_size
                yield from pending[first:first + batch_size]
            pending = []


def check_cache_fits(cache: cf.FeatureCache, urls: list[str], grid: int, teacher_dim: int,
                     pixels_size: int = 0) -> None:
    """Refuse, in one line, a cache that lacks a shard or does not fit the student
    (`pixels_size` > 0: the stored views must exist, at that size)."""
    m = cache.manifest
    if pixels_size and not m.storage.pixels:
        raise cf.CacheError(f"{cache.root}: stores no views; extract with --store-pixels to train from the cache alone")
    if pixels_size and m.views.output_size != pixels_size:
        raise cf.CacheError(f"{cache.root}: views are stored at {m.views.output_size} px, the student takes "
                            f"{pixels_size}")
    if list(m.teacher.grid) != [grid, grid]:
        raise cf.CacheError(f"{cache.root}: teacher grid {list(m.teacher.grid)} does not match the student's {grid}x{grid}")
    if m.views.decoder != "pil" and not pixels_size:  # stored views need no replay
        raise cf.CacheError(f"{cache.root}: views were decoded with {m.views.decoder!r}; this mrmae replays "
                            "with PIL only, and another decoder does not reproduce them: extract with "
                            "--store-pixels and train with --pixels-from-cache")
    if teacher_dim and m.teacher.dim != teacher_dim:
        raise cf.CacheError(f"{cache.root}: teacher width {m.teacher.dim} does not match the mimic head's {teacher_dim}")
    for url in urls:
        entry = cache.entry(url)  # raises, naming the shard, if it is missing or incomplete
        recorded, now = entry.source_bytes, local_file_size(url)
        if recorded is not None and now is not None and recorded != now:
            raise cf.CacheError(f"{url}: shard changed since extraction ({now} bytes, {recorded} when cached)")

"""Student data: source shards, one view per sample per epoch, joined with cached targets.

Pipeline (webdataset stages; stream shape after each):

    epoch_shards        shard URLs in an order drawn from (seed, epoch)
    split_by_node       this rank's shards                 (split="shards" only)
    split_by_worker     this DataLoader worker's shards
    join_views          {key, image bytes, view, [targets, attention]}   tar order
                        (pixels_from_cache: {key, stored view bytes, ...} from the cache, row order)
    shuffle             same, sample order mixed in a seeded buffer
    rank_slots          this rank's slots of each effective batch (split="samples" only)
    render              {key, pixels [3,S,S] uint8, [teacher_pixels], crop (4 ints), flip, [targets [L,C] int8 +
                         targets_scale [L(,G)] (float16 caches: targets [L,C] float16)], [attention [L]]}
                        (render_on_device: crop_pixels [h,w,3] uint8, the view's box cut from the decoded
                         image, in place of pixels and teacher_pixels)
    batched             dict of stacked tensors, B samples (crop_pixels: the B crops packed flat, [sum 3 h w])
    steps_of            {"micro_batches": A such batches}, one optimiser step's (split="samples", A > 1 only)

With `render_on_device` the workers stop before resizing: the training step renders the
batch's views on its device (`render_views`, `shared.batch_render`), pixel for pixel what
`render_view_uint8` gives in a worker, so batches, masks and losses are the same either way.

Which of the K views a sample shows in an epoch depends on (seed, epoch, key) alone. In
cached mode the view's crop and flip come from the cache; in live and plain modes they
are drawn with the same function extraction used, so the same seed gives the same views
with or without a cache.
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
import webdataset as wds

from mrmae.shared.prefetch import ReadAhead, opened_ahead
from mrmae.shared.shard_sizes import ShardSizes
from mrmae.shared.shards import ShardReader, TarSample, expand_urls, first_copies, local_file_size, open_source
from mrmae.shared import cache_format as cf
from mrmae.shared.batch_render import render_batch
from mrmae.shared.seeding import seed_from
from mrmae.shared.views import (View, ViewConfig, ViewError, check_view, decode_crop, decode_image, decode_view,
                                render_view_uint8, sample_view, view_rng)


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
    render_on_device: bool = False  # workers hand over the view's crop; the step renders it (`render_views`)
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

    def _targets(self, group, row: int, key: str) -> dict:
        """The cached view and targets of one row, as stored (int8 + scale, or float16): they
        stay that small through the loader and are dequantised on the device. Damage is
        one line naming group and key."""
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
        out = {"view": View(*(int(c) for c in crop[row]), flip=bool(flip[row])),
               "attention": attention[row], "targets": values, "cache_shard": group.path}
        if scale is not None:
            out["targets_scale"] = scale
        return out

    def _joint_targets(self, groups: list, key: str, view: int, url: str) -> dict:
        """Targets of the joint teachers for the same view: `targets@j` (+ `targets_scale@j`)."""
        out = {}
        for j, group in enumerate(groups, start=1):
            try:
                row = group.row(key, view)
            except cf.CacheError:
                raise cf.CacheError(f"{url}: key {key} view {view} has no row in {group.path}") from None
            for name, value in self._targets(group, row, key).items():
                if name.startswith("targets"):
                    out[f"{name}@{j}"] = value
        return out

    def __call__(self, urls: Iterator[str], epoch: int) -> Iterator[dict]:
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
                epoch: int) -> Iterator[dict]:
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

    def _join(self, url: str, s: TarSample, group, joint: list, skipped: set[str], epoch: int) -> dict | None:
        """One source sample with its view for `epoch` (and its cached targets); None: no
        targets exist (recorded as skipped at extraction) or, uncached, no image."""
        v = pick_view(self.cfg.seed, epoch, s.key, self.view_cfg.per_image)
        out = {"key": s.key, "image": s.image, "view_index": v, "url": url}
        if group is None:
            return out if s.image is not None else None
        try:
            row = group.row(s.key, v)
        except cf.CacheError:
            if s.key in skipped:
                return None  # undecodable or without an image at extraction: no rows
            raise cf.CacheError(f"{url}: key {s.key} has no rows in the cache {self.cache.root} "
                                "(shard changed since extraction?)") from None
        out.update(self._targets(group, row, s.key))
        out.update(self._joint_targets(joint, s.key, v, url))  # (a joint cache's missing row: named there)
        self._check_image(url, s, v, [(self.cache, group, row), *zip(self.joint, joint, [None] * len(joint))])
        return out  # (rendered, shuffled and batched only from here)

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

    def _cached_views(self, url: str, group, joint: list, epoch: int) -> Iterator[dict]:
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
            yield {"key": key, "stored_view": encoded, "view_index": v, "url": url,
                   **self._targets(group, row, key), **self._joint_targets(joint, key, v, url)}


def render_sample(sample: dict, cfg: DataConfig, view_cfg: ViewConfig) -> dict:
    """Decode and render one joined sample for the student (and a live teacher), uint8:
    pixels [3, S, S] (+ teacher_pixels [3, T, T]), crop (top, left, height, width in source
    pixels) and flip (Python values: `collate` makes one tensor of a batch's), and the
    targets as stored. With `cfg.render_on_device`,
    crop_pixels [h, w, 3] (numpy: the view's box, h x w, of the decoded image) instead of
    pixels and teacher_pixels: `render_views` renders them in the main process.

    Normalisation waits for the device (engine.PretrainStep): a uint8 batch is a quarter
    of a float32 one through the worker queue, pinned memory and the bus.
    """
    if "stored_view" in sample:  # rendered at extraction: decode only (also with render_on_device)
        view = sample["view"]
        out = {"key": sample["key"], "pixels": decode_view(sample["stored_view"], view_cfg.output_size)}
    elif cfg.render_on_device:
        # The box alone, not the image: fewer bytes to copy and hand over, and the renderer reads only it.
        crop, view = decoded_view(sample, view_cfg, crop=True)
        out = {"key": sample["key"], "crop_pixels": crop}
    else:
        image, view = decoded_view(sample, view_cfg)
        out = {"key": sample["key"], "pixels": render_view_uint8(image, view, cfg.img_size)}
        if cfg.teacher_size:
            out["teacher_pixels"] = render_view_uint8(image, view, cfg.teacher_size)
    out["crop"], out["flip"] = view.box, view.flip  # tensors once per batch (collate): ~0.1 ms each per sample
    out.update(stored_targets(sample))
    return out


def decoded_view(sample: dict, view_cfg: ViewConfig, crop: bool = False) -> tuple[torch.Tensor | np.ndarray, View]:
    """A joined sample's image, decoded (uint8 [3, H, W]; `crop`: only the view's box, uint8
    [h, w, 3], `decode_crop`), and the view it shows this epoch: the cached one, or drawn
    as extraction draws them. A cached box outside the image is damage (or another
    image): one line naming shard and key."""
    def choose(height: int, width: int) -> View:  # only the shown view is drawn: view_rng costs ~0.1 ms each
        return sample.get("view") or sample_view(height, width, view_rng(view_cfg.seed, sample["key"],
                                                                         sample["view_index"]), view_cfg)

    try:
        if crop:
            return decode_crop(sample["image"], choose)
        image = decode_image(sample["image"])
        view = choose(image.shape[1], image.shape[2])
        check_view(view, image.shape[1], image.shape[2])
        return image, view
    except ViewError as e:  # a cached box (drawn ones always fit): damage, or another image
        raise cf.CacheError(f"{sample.get('cache_shard', sample['url'])}: key {sample['key']}: cached {e}; "
                            "run `mrmae cache verify`") from None


def stored_targets(sample: dict) -> dict:
    """The cached targets of a joined sample as tensors, as stored: targets int8 [L, C] +
    targets_scale float16 [L] or [L, G] (or float16 [L, C]), attention [L], and the joint
    teachers' targets@j / targets_scale@j; {} without a cache."""
    if "targets" not in sample:
        return {}
    names = [n for n in sample if n in ("targets", "attention") or n.startswith(("targets_scale", "targets@"))]
    return {n: torch.from_numpy(np.ascontiguousarray(sample[n])) for n in names}


def collate(samples: list[dict]) -> dict:
    """B samples -> one batch: keys a list; each tensor stacked ([B, ...]); numbers and tuples
    as one tensor (crop [B, 4] int64, flip [B] bool); crop_pixels (crops of different sizes)
    packed flat, uint8 [sum of 3 h w], in sample order."""
    out = {"keys": [s["key"] for s in samples]}
    for k in samples[0]:
        if k == "key" or k.startswith("__"):  # webdataset's map adds __key__
            continue
        values = [s[k] for s in samples]
        if k == "crop_pixels":  # one copy of each crop (a worker's may be read-only)
            out[k] = _batch_tensor((sum(v.size for v in values),), torch.uint8)
            np.concatenate(values, axis=None, out=out[k].numpy())
        elif torch.is_tensor(values[0]):
            out[k] = torch.stack(values, out=_batch_tensor((len(values), *values[0].shape), values[0].dtype))
        else:
            out[k] = torch.tensor(values)
    return out


def _batch_tensor(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An empty tensor for a batch: in a DataLoader worker, in shared memory, so handing the
    batch to the main process copies nothing more (torch's default_collate does the same)."""
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    storage = torch.UntypedStorage._new_shared(math.prod(shape) * dtype.itemsize)
    return torch.empty(0, dtype=dtype).set_(storage, 0, shape)


def render_views(batch: dict, device: torch.device | str, img_size: int, teacher_size: int = 0) -> dict:
    """A `render_on_device` batch -> the batch the worker-side render gives, its views
    rendered on `device` by `shared.batch_render` (bit for bit `render_view_uint8`).

    In: crop_pixels uint8 [sum of 3 h_i w_i] (the B crops [h_i, w_i, 3], packed), crop
    [B, 4] (top, left, h, w), flip [B]. Out: the same batch less crop_pixels, plus pixels
    uint8 [B, 3, S, S] (S = img_size) and, with teacher_size T > 0, teacher_pixels uint8
    [B, 3, T, T], both on `device`. A batch without crop_pixels is returned as it is.
    """
    if "crop_pixels" not in batch:
        return batch
    sizes = batch["crop"][:, 2:].tolist()
    flat = batch["crop_pixels"].to(device, non_blocking=True)
    crops = [c.view(h, w, 3).permute(2, 0, 1) for c, (h, w) in zip(flat.split([3 * h * w for h, w in sizes]), sizes)]
    views = [View(0, 0, h, w, flip=f) for (h, w), f in zip(sizes, batch["flip"].tolist())]  # boxes: the whole crop
    out = {k: v for k, v in batch.items() if k != "crop_pixels"}
    out["pixels"] = render_batch(crops, views, img_size)
    if teacher_size:
        out["teacher_pixels"] = render_batch(crops, views, teacher_size)
    return out


class StudentStream(torch.utils.data.IterableDataset):
    """An epoch of batches; call `set_epoch` before iterating (views and order depend on it)."""

    def __init__(self, cfg: DataConfig, cache: cf.FeatureCache | None, joint: tuple[cf.FeatureCache, ...] = ()):
        """`joint`: caches of more teachers for the same views (targets added to `cache`)."""
        super().__init__()
        self.cfg, self.cache = cfg, cache
        self.urls = expand_urls(cfg.shards)
        self.joiner = ViewJoiner(cfg, cache, joint)
        self.epoch, self.repeat = 0, 0

    def set_epoch(self, epoch: int, repeat: int = 0) -> None:
        """Select the epoch (and, in `shards` mode, which pass over a rank's shards)."""
        self.epoch, self.repeat = epoch, repeat

    def __iter__(self) -> Iterator[dict]:
        cfg, epoch, repeat = self.cfg, self.epoch, self.repeat
        rank, world, worker, workers = wds.utils.pytorch_worker_info()
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
        stages = [
            lambda _: iter(epoch_shards(self.urls, cfg.seed, epoch * 1000 + repeat)),  # URL
            *split,                                                                    # URL (mine)
            lambda urls: self.joiner(urls, epoch),                                     # joined sample, tar order
            wds.shuffle(cfg.shuffle_buffer, min(cfg.shuffle_buffer, 100), rng=random.Random(shuffle_seed)),
            *take,                                                                     # this rank's slots
            wds.map(lambda s: render_sample(s, cfg, self.joiner.view_cfg)),           # tensors (or crops)
            wds.batched(cfg.batch_size, collation_fn=collate, partial=partial),       # batch of B
        ]
        if cfg.split != "shards" and cfg.accum_steps > 1:
            # A step's A micro-batches as one item: DataLoader workers take turns per item, so
            # a step never mixes two workers' slots (and their order never depends on A).
            stages.append(lambda batches: ({STEP_KEY: g} for g in steps_of(batches, cfg.accum_steps)))
        stream: Iterator = iter([None])
        for stage in stages:
            stream = stage(stream)
        yield from stream


def rank_slots(samples: Iterator[dict], rank: int, world: int, batch_size: int,
               accum_steps: int = 1) -> Iterator[dict]:
    """This rank's samples of every complete effective batch of E = world x accum_steps x B:
    micro-batch a (0..A-1) takes slots [(a world + rank) B, (a world + rank + 1) B).

    So a step's E samples are the same E consecutive ones of the stream at any split of
    E, each at the same position in it (`loop.MicroBatch.slot`: what keys its mask). A
    trailing incomplete effective batch is dropped on every rank alike: otherwise some
    ranks would have one batch more than others (DDP would wait for them forever), or a
    step would end short of its accumulation.
    """
    pending: list[dict] = []
    per_step = world * accum_steps * batch_size
    for sample in samples:
        pending.append(sample)
        if len(pending) == per_step:
            for a in range(accum_steps):
                first = (a * world + rank) * batch_size
                yield from pending[first:first + batch_size]
            pending = []


STEP_KEY = "micro_batches"  # a loader item holding one optimiser step's micro-batches: {STEP_KEY: [batch, ...]}


def steps_of(batches: Iterator, accum_steps: int) -> Iterator[list]:
    """Micro-batches -> lists of `accum_steps` (one optimiser step's, on this rank); a
    trailing incomplete list is dropped."""
    while len(group := list(itertools.islice(batches, accum_steps))) == accum_steps:
        yield group


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

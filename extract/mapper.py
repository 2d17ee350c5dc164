"""Mapper: raw sample -> its K views rendered at the teacher's input size (uint8).

Runs in DataLoader workers; which worker handles a sample never matters, because each
view depends only on (seed, key, view index) and the image bytes. What a worker does with
a sample (`WORK`): "render" decodes it with PIL and renders its views; "decode"
(`--render-on-device`) decodes it with PIL and draws the views, and the main process
renders them on the teacher's device (shared/batch_render.py, the same pixels);
"header" (`--decode-on-device`) reads the image header only and draws the views.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from mrmae.extract.device_decode import image_size
from mrmae.shared.cache_format import CacheError
from mrmae.shared.shards import RawSample
from mrmae.shared.views import (ImageDecodeError, View, ViewConfig, ViewError, check_view, decode_image, encode_view,
                                render_view_uint8, sample_views)


@dataclass
class RenderedSample:
    key: str
    error: str | None  # why the sample is skipped, or None
    pixels: torch.Tensor  # uint8 [K, 3, S, S] (empty when skipped)
    crops: np.ndarray  # int32 [K, 4] top, left, height, width
    flips: np.ndarray  # bool [K]
    encoded: list[bytes] | None = None  # --store-pixels: each view at the student's size, as an image file
    image: bytes | None = None  # --decode-on-device: the undecoded image (attached by the main
    # process, which holds it already: it does not travel back from a worker); pixels is empty [K, 0]
    decoded: torch.Tensor | None = None  # --render-on-device: the image decoded by PIL, uint8 [3, H, W]
    # (decode_image's layout: an [H, W, 3] array permuted); pixels is empty [K, 0]


WORK = ("render", "decode", "header")  # what a worker does with a sample (module docstring)


def render_sample(sample: RawSample, cfg: ViewConfig, input_size: int,
                  views: list[View] | None = None, pixel_codec: str | None = None,
                  work: str = "render") -> RenderedSample:
    """Decode one sample and render its `cfg.per_image` views (uint8, not normalised).

    `views` replays given views (another teacher added to a cache) instead of drawing them.
    `pixel_codec` also encodes each view at the student's size (`cfg.output_size`) for a
    cache that stores them; here, in the workers, because encoding costs as much as rendering.
    `work` (WORK): "decode" stops after decoding and drawing the views (`decoded` holds the
    image, the device renders); "header" reads the image's size from its header only and
    draws the views (extract/device_decode.py decodes and renders on the device).
    """
    empty = RenderedSample(sample.key, None, torch.empty(0, dtype=torch.uint8),
                           np.zeros((0, 4), np.int32), np.zeros(0, bool))
    if sample.image is None:
        empty.error = getattr(sample, "problem", None) or "no image member (.jpg/.jpeg/.png/.webp)"
        return empty
    try:
        if work == "header":
            height, width = image_size(sample.image)
        else:
            image = decode_image(sample.image)
            height, width = image.shape[1], image.shape[2]
    except ImageDecodeError as e:
        empty.error = f"undecodable image: {e}"
        return empty
    views = _views_of(sample.key, height, width, cfg, views)
    crops = np.array([v.box for v in views], dtype=np.int32)
    flips = np.array([v.flip for v in views], dtype=bool)
    if work != "render":  # nothing rendered here: pixels [K, 0]
        return RenderedSample(sample.key, None, torch.empty(len(views), 0, dtype=torch.uint8), crops, flips,
                              decoded=image if work == "decode" else None)
    pixels = torch.stack([render_view_uint8(image, v, input_size) for v in views])
    encoded = None
    if pixel_codec is not None:
        student = pixels if cfg.output_size == input_size else \
            torch.stack([render_view_uint8(image, v, cfg.output_size) for v in views])
        encoded = [encode_view(p, pixel_codec) for p in student]
    return RenderedSample(sample.key, None, pixels, crops, flips, encoded)


def _views_of(key: str, height: int, width: int, cfg: ViewConfig, views: list[View] | None) -> list[View]:
    """The sample's views: drawn, or replayed from a cache (`views`), each box proven to fit
    the image first (one that does not is another image, or a damaged cache)."""
    if views is None:
        return sample_views(key, height, width, cfg)
    for v in views:
        try:
            check_view(v, height, width)
        except ViewError as e:
            raise CacheError(f"key {key}: cached {e}: not the image its views were drawn on, or a "
                             "damaged cache (`mrmae cache verify`)") from None
    return views


SAMPLES_PER_ITEM = 8  # per DataLoader item: one shared-memory hand-over per 8 samples, not per sample

RenderTask = tuple[list[RawSample], list[list[View]] | None]  # samples in tar order, views to replay (or None)


class RenderTasks(Dataset):
    """Renders tasks, not indices: the DataLoader's sampler (ShardTasks) yields each task
    itself, samples and all, so the same persistent workers serve shard after shard.

    A task's RenderedSamples come back with their pixels (and decoded images) views of one
    tensor, handed to the main process through one shared-memory segment (one hand-over a
    task rather than a sample, in the main process, where the whole extraction's stream passes).
    """

    def __init__(self, cfg: ViewConfig, input_size: int, pixel_codec: str | None = None, work: str = "render"):
        if work not in WORK:
            raise ValueError(f"work {work!r}: one of {', '.join(WORK)}")
        self.cfg, self.input_size, self.pixel_codec, self.work = cfg, input_size, pixel_codec, work

    def __getitem__(self, task: RenderTask) -> list[RenderedSample]:
        samples, views = task
        chunk = [render_sample(s, self.cfg, self.input_size, None if views is None else views[i], self.pixel_codec,
                               self.work) for i, s in enumerate(samples)]
        # a decoded image travels as decode_image made it, [H, W, 3] in memory, and comes back
        # a [3, H, W] view of it again: the main process renders exactly the tensor a worker would
        hwc = [r.decoded.permute(1, 2, 0) if r.decoded is not None else None for r in chunk]
        shared = torch.cat([r.pixels.reshape(-1) for r in chunk] + [h.reshape(-1) for h in hwc if h is not None])
        start = 0
        for r in chunk:
            r.pixels, start = shared[start:start + r.pixels.numel()].view(r.pixels.shape), start + r.pixels.numel()
        for r, h in zip(chunk, hwc):
            if h is not None:
                r.decoded, start = shared[start:start + h.numel()].view(h.shape).permute(2, 0, 1), start + h.numel()
        return chunk


class ShardTasks(Sampler):
    """The sampler: each iteration yields the tasks of the shard given last to `set`, in tar
    order, SAMPLES_PER_ITEM samples a task. The DataLoader keeps results in that order."""

    def __init__(self) -> None:
        self.tasks: list[RenderTask] = []

    def set(self, samples: list[RawSample], geometry: dict[str, list[View]] | None) -> None:
        self.tasks = []
        for i in range(0, len(samples), SAMPLES_PER_ITEM):
            chunk = samples[i:i + SAMPLES_PER_ITEM]
            self.tasks.append((chunk, None if geometry is None else [geometry[s.key] for s in chunk]))

    def __iter__(self) -> Iterator[RenderTask]:
        return iter(self.tasks)

    def __len__(self) -> int:
        return len(self.tasks)


class RenderLoader:
    """DataLoader workers that render views (or only decode, `work`, see WORK), started once
    and reused for every shard: forking workers from a process that holds a CUDA context is
    slow (BENCHMARKS.md, "GPU: one H200", measures it). Which worker takes a task never matters (a view
    depends on seed, key and image only). In flight: at most 4 tasks of SAMPLES_PER_ITEM
    samples per worker, rendered views or, with work "decode", decoded images."""

    def __init__(self, cfg: ViewConfig, input_size: int, workers: int, pixel_codec: str | None = None,
                 work: str = "render"):
        self.tasks = ShardTasks()
        self.loader = DataLoader(RenderTasks(cfg, input_size, pixel_codec, work), batch_size=None,
                                 sampler=self.tasks, num_workers=workers, persistent_workers=workers > 0,
                                 prefetch_factor=4 if workers else None)

    def render(self, samples: list[RawSample], geometry: dict[str, list[View]] | None = None
               ) -> Iterator[list[RenderedSample]]:
        """One shard's samples -> their RenderedSamples, SAMPLES_PER_ITEM at a time, tar order."""
        self.tasks.set(samples, geometry)
        yield from self.loader

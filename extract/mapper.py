"""Mapper: raw sample -> its K views rendered at the teacher's input size (uint8).

Runs in DataLoader workers; which worker handles a sample never matters, because each
view depends only on (seed, key, view index) and the image bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from mrmae.extract.device_decode import image_size
from mrmae.extract.reader import RawSample
from mrmae.shared.views import (ImageDecodeError, View, ViewConfig, decode_image, encode_view, render_view_uint8,
                                sample_views)


@dataclass
class RenderedSample:
    key: str
    error: str | None  # why the sample is skipped, or None
    pixels: torch.Tensor  # uint8 [K, 3, S, S] (empty when skipped)
    crops: np.ndarray  # int32 [K, 4] top, left, height, width
    flips: np.ndarray  # bool [K]
    encoded: list[bytes] | None = None  # --store-pixels: each view at the student's size, as an image file
    image: bytes | None = None  # --decode-on-device: the undecoded image; pixels is then empty [K, 0]


def render_sample(sample: RawSample, cfg: ViewConfig, input_size: int,
                  views: list[View] | None = None, pixel_codec: str | None = None,
                  on_device: bool = False) -> RenderedSample:
    """Decode one sample and render its `cfg.per_image` views (uint8, not normalised).

    `views` replays given views (another teacher added to a cache) instead of drawing them.
    `pixel_codec` also encodes each view at the student's size (`cfg.output_size`) for a
    cache that stores them; here, in the workers, because encoding costs as much as rendering.
    `on_device`: read the image's size from its header only and draw the views; decoding
    and rendering wait for the teacher's device (extract/device_decode.py).
    """
    empty = RenderedSample(sample.key, None, torch.empty(0, dtype=torch.uint8),
                           np.zeros((0, 4), np.int32), np.zeros(0, bool))
    if sample.image is None:
        empty.error = "no image member (.jpg/.jpeg/.png/.webp)"
        return empty
    if on_device:
        try:
            height, width = image_size(sample.image)
        except ImageDecodeError as e:
            empty.error = f"undecodable image: {e}"
            return empty
        views = views if views is not None else sample_views(sample.key, height, width, cfg)
        return RenderedSample(sample.key, None, torch.empty(len(views), 0, dtype=torch.uint8),
                              np.array([v.box for v in views], dtype=np.int32), np.array([v.flip for v in views], bool),
                              image=sample.image)
    try:
        image = decode_image(sample.image)
    except ImageDecodeError as e:
        empty.error = f"undecodable image: {e}"
        return empty
    if views is None:
        views = sample_views(sample.key, image.shape[1], image.shape[2], cfg)
    pixels = torch.stack([render_view_uint8(image, v, input_size) for v in views])
    crops = np.array([v.box for v in views], dtype=np.int32)
    flips = np.array([v.flip for v in views], dtype=bool)
    encoded = None
    if pixel_codec is not None:
        student = pixels if cfg.output_size == input_size else \
            torch.stack([render_view_uint8(image, v, cfg.output_size) for v in views])
        encoded = [encode_view(p, pixel_codec) for p in student]
    return RenderedSample(sample.key, None, pixels, crops, flips, encoded)


SAMPLES_PER_ITEM = 8  # per DataLoader item: one shared-memory hand-over per 8 samples, not per sample


class RenderDataset(Dataset):
    """Map-style over one shard's samples in chunks of `SAMPLES_PER_ITEM`, so a DataLoader
    keeps tar order at any worker count. Item i: the RenderedSamples of samples
    [8i, 8i + 8), their pixels views of one tensor, so a worker hands each chunk to the main
    process through one shared-memory segment (~4x less per-sample overhead there, where
    the whole extraction's stream passes).

    `geometry` (key -> its views in view order) replays a cache's views instead of drawing.
    """

    def __init__(self, samples: list[RawSample], cfg: ViewConfig, input_size: int,
                 geometry: dict[str, list[View]] | None = None, pixel_codec: str | None = None,
                 on_device: bool = False):
        self.samples, self.cfg, self.input_size, self.geometry = samples, cfg, input_size, geometry
        self.pixel_codec, self.on_device = pixel_codec, on_device

    def __len__(self) -> int:
        return -(-len(self.samples) // SAMPLES_PER_ITEM)

    def __getitem__(self, i: int) -> list[RenderedSample]:
        chunk = [render_sample(s, self.cfg, self.input_size, None if self.geometry is None else self.geometry[s.key],
                               self.pixel_codec, self.on_device)
                 for s in self.samples[i * SAMPLES_PER_ITEM:(i + 1) * SAMPLES_PER_ITEM]]
        shared = torch.cat([r.pixels.reshape(-1) for r in chunk])
        start = 0
        for r in chunk:
            r.pixels, start = shared[start:start + r.pixels.numel()].view(r.pixels.shape), start + r.pixels.numel()
        return chunk

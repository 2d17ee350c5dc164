"""What the student stream carries, stage by stage (`train/stream.py` makes them, the step
`train/engine.py` takes them): one dataclass per stage, its shapes here.

    Joined    one source sample joined with the view it shows this epoch (and its cached targets)
    Sample    that view rendered (uint8 pixels) or, rendering on the device, its box cut out
    Batch     B samples collated: stacked tensors, the crops packed flat
    Step      one optimiser step's A micro-batches on this rank

Shapes: S the student's img_size, T a live teacher's input size, L the teacher's tokens
(= the student's patches), C its width (K for a PCA cache's coefficients), G groups of
channels sharing one int8 scale.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Iterator

import numpy as np
import torch

from mrmae.shared.batch_render import render_batch
from mrmae.shared.views import View


@dataclass
class TargetSet:
    """One teacher's targets as the cache stores them, dequantised only on the device.

    values: int8 [L, C] with scale float16 [L] (one per token) or [L, G] (per group of
    C / G channels); or float16 [L, C] with scale None. In a Batch: [B, L, C], [B, L] or
    [B, L, G].
    """

    values: torch.Tensor
    scale: torch.Tensor | None = None

    def pin_memory(self) -> TargetSet:
        return TargetSet(self.values.pin_memory(), None if self.scale is None else self.scale.pin_memory())


@dataclass
class Joined:
    """A source sample joined with its view for the epoch (`stream.ViewJoiner`), before render.

    image: the tar's encoded image (None with `pixels_from_cache`, where stored_view holds
    the view as extraction rendered it); view_index: which of the K views (seed, epoch,
    key); view: the cached view's box and flip (None uncached: drawn as extraction draws
    it when the image is decoded); targets: one TargetSet per teacher (the cache's main
    one first, then the joint caches'), [] uncached; attention [L] float16, the main
    cache's [CLS] attention; cache_shard: the main cache's group (named in errors).
    """

    key: str
    url: str
    view_index: int
    image: bytes | None = None
    stored_view: bytes | None = None
    view: View | None = None
    targets: list[TargetSet] = field(default_factory=list)
    attention: torch.Tensor | None = None
    cache_shard: str | None = None


@dataclass
class Sample:
    """One view rendered for the student (`stream.render_sample`), uint8, not yet normalised.

    pixels [3, S, S] and, in live mode, teacher_pixels [3, T, T]; or, rendering on the
    device, crop_pixels [h, w, 3] (numpy: the view's box of the decoded image) and neither.
    crop: (top, left, height, width) in source pixels; flip: mirrored. targets and
    attention as joined.
    """

    key: str
    crop: tuple[int, int, int, int]
    flip: bool
    pixels: torch.Tensor | None = None
    teacher_pixels: torch.Tensor | None = None
    crop_pixels: np.ndarray | None = None
    targets: list[TargetSet] = field(default_factory=list)
    attention: torch.Tensor | None = None


@dataclass
class Batch:
    """B samples (`stream.collate`), what one micro-step trains on.

    keys: the B sample keys; crop int64 [B, 4] (top, left, height, width); flip bool [B];
    pixels uint8 [B, 3, S, S] and, live, teacher_pixels uint8 [B, 3, T, T]; or, rendering
    on the device, crop_pixels uint8 [sum of 3 h_i w_i] (the B crops [h_i, w_i, 3]
    packed in order) until `rendered` gives pixels. targets: one TargetSet per teacher,
    [B, L, C] (main first, then the joint teachers'), [] without a cache; attention
    float16 [B, L] or None.
    """

    keys: list[str]
    crop: torch.Tensor
    flip: torch.Tensor
    pixels: torch.Tensor | None = None
    teacher_pixels: torch.Tensor | None = None
    crop_pixels: torch.Tensor | None = None
    targets: list[TargetSet] = field(default_factory=list)
    attention: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.keys)

    def pin_memory(self) -> Batch:
        """The batch in page-locked memory: torch's DataLoader (pin_memory=True) calls this
        for a type it does not know; copies to the GPU can then run asynchronously."""
        pinned = {f.name: getattr(self, f.name).pin_memory() for f in fields(self)
                  if torch.is_tensor(getattr(self, f.name))}
        return replace(self, **pinned, targets=[t.pin_memory() for t in self.targets])

    def rendered(self, device: torch.device | str, img_size: int, teacher_size: int = 0) -> Batch:
        """A batch of crops -> the batch the worker-side render gives, its views rendered on
        `device` by `shared.batch_render` (bit for bit `views.render_view_uint8`): crop_pixels
        gone, pixels uint8 [B, 3, S, S] (S = img_size) and, with teacher_size T > 0,
        teacher_pixels uint8 [B, 3, T, T], both on `device`. Rendered already: itself."""
        if self.crop_pixels is None:
            return self
        sizes = self.crop[:, 2:].tolist()
        flat = self.crop_pixels.to(device, non_blocking=True)
        crops = [c.view(h, w, 3).permute(2, 0, 1) for c, (h, w) in zip(flat.split([3 * h * w for h, w in sizes]), sizes)]
        views = [View(0, 0, h, w, flip=f) for (h, w), f in zip(sizes, self.flip.tolist())]  # boxes: the whole crop
        return replace(self, crop_pixels=None, pixels=render_batch(crops, views, img_size),
                       teacher_pixels=render_batch(crops, views, teacher_size) if teacher_size else None)


@dataclass(frozen=True)
class Step:
    """One optimiser step's micro-batches on this rank: A Batches of B samples each (the
    step's rows of the effective batch E = B x processes x A, `micro_batch.MicroBatch.slot`)."""

    micro_batches: tuple[Batch, ...]

    def __iter__(self) -> Iterator[Batch]:
        return iter(self.micro_batches)

    def __len__(self) -> int:
        return len(self.micro_batches)

    def __getitem__(self, index: int) -> Batch:
        return self.micro_batches[index]

    def pin_memory(self) -> Step:
        return Step(tuple(b.pin_memory() for b in self.micro_batches))

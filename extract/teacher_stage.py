"""The teacher stage: rendered views -> teacher batches -> the teacher's outputs.

Extraction (extract/runner.py), the PCA fit (extract/pca_fit.py) and `cache verify`
(extract/verify.py) run the teacher through this module alone, so the three compute the
same thing: the same batching, the same pixels, and one precision rule (`precision`).

    RawSample (tar bytes)          unique_samples: a repeated key's later copies left out
    RenderedSample (K views)       render_loader's DataLoader workers, tar order (mapper.py)
    list[ViewItem]                 teacher_batches: exactly `batch_size` views (the last shorter)
    uint8 [B, 3, S, S]             the workers' pixels, or device_views: rendered on the device
                                   from each key's image (decoded by PIL, or decoded there)
    TeacherOutput                  teacher_outputs: normalised on the device, run under `precision`
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch

from mrmae.extract.config import ExtractConfig
from mrmae.extract.device_decode import decode_batch
from mrmae.extract.mapper import RenderedSample, RenderLoader
from mrmae.shared import cache_format as cf
from mrmae.shared.batch_render import render_batch
from mrmae.shared.errors import MrmaeError
from mrmae.shared.shards import REPEATED_KEY, RawSample
from mrmae.shared.teachers.base import Teacher, TeacherOutput
from mrmae.shared.views import ImageDecodeError, View, decode_image, normalize


class SkippedSampleError(MrmaeError, ValueError):
    """Raised under `strict` for a sample that would otherwise be skipped, and on the
    --decode-on-device path for an image found undecodable too late to skip."""


class ReplayError(cf.CacheError):
    """A cache's views cannot be rendered again here as they were extracted (their decoder)."""


@dataclass
class ViewItem:
    """One view of one sample on its way to the teacher.

    key: the sample's key. view: the view's index 0..K-1 among the sample's views.
    crop: int32 [4], the box (top, left, height, width) in source pixels. flip: mirrored.
    pixels: uint8 [3, S, S], the view rendered by a worker at the teacher's input size S;
        None (or empty) where the device renders from `image`.
    encoded: --store-pixels on the workers' path: the view at the student's size as an
        image file (views.PIXEL_CODECS); else None.
    image: what the device renders from, shared by a sample's items: its undecoded bytes
        (decoded on the device: --decode-on-device), or its decoded uint8 [3, H, W]
        (decode_image's layout: PIL's pixels, --render-on-device and `cache verify`);
        None where a worker rendered `pixels`.
    """

    key: str
    view: int
    crop: np.ndarray
    flip: bool
    pixels: torch.Tensor | None = None
    encoded: bytes | None = None
    image: bytes | torch.Tensor | None = None

    @property
    def box(self) -> View:
        return View(*(int(c) for c in self.crop), flip=bool(self.flip))


def view_items(s: RenderedSample) -> list[ViewItem]:
    """A rendered sample's K views as items: the device renders from `s.decoded`
    (--render-on-device) or `s.image` (--decode-on-device) when the workers did not."""
    image = s.decoded if s.decoded is not None else s.image
    return [ViewItem(s.key, v, s.crops[v], bool(s.flips[v]), s.pixels[v],
                     s.encoded[v] if s.encoded is not None else None, image) for v in range(len(s.crops))]


def unique_samples(samples: list[RawSample], geometry: dict[str, list[View]] | None
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


def render_loader(cfg: ExtractConfig, input_size: int) -> RenderLoader:
    """The workers that render views for `cfg` (or only decode them, or read headers: the
    device renders), for as many shards as the run has."""
    work = cfg.worker_work
    codec = cfg.store_pixels if work == "render" else None  # on the device paths the runner encodes
    return RenderLoader(cfg.views, input_size, cfg.workers, codec, work)


def teacher_batches(unique: list[RawSample], loader: RenderLoader, cfg: ExtractConfig,
                    geometry: dict[str, list[View]] | None,
                    on_error: Callable[[str, str], None]) -> Iterator[list[ViewItem]]:
    """One shard's views rendered (the loader's workers, tar order) and grouped into teacher
    batches of exactly `cfg.batch_size` views (the last one shorter); a sample that cannot
    be rendered goes to `on_error(key, reason)`. Extraction and the PCA fit both use it, so
    the fit's first shard has exactly the batches (and the bits) extraction gives it. A
    batch holds at most batch_size / K + 1 images (`ViewItem.image`)."""
    pending: list[ViewItem] = []
    # --decode-on-device: workers only read image headers; the bytes stay here (keys are unique)
    images = {s.key: s.image for s in unique} if cfg.decode_on_device else {}
    for chunk in loader.render(unique, geometry):  # list[RenderedSample], SAMPLES_PER_ITEM at a time
        for rendered in chunk:
            if rendered.error:
                on_error(rendered.key, rendered.error)
                continue
            rendered.image = images.get(rendered.key)
            pending.extend(view_items(rendered))
        while len(pending) >= cfg.batch_size:
            yield pending[:cfg.batch_size]
            pending = pending[cfg.batch_size:]
    if pending:
        yield pending


def precision(device: torch.device | str) -> torch.autocast:
    """The one precision rule of the teacher stage: bfloat16 autocast on CUDA, float32
    elsewhere. Extraction, the PCA fit and `cache verify` all run the teacher under it."""
    kind = torch.device(device).type
    return torch.autocast(device_type=kind, dtype=torch.bfloat16, enabled=kind == "cuda")


def run_teacher(teacher: Teacher, pixels: torch.Tensor) -> TeacherOutput:
    """uint8 views [B, 3, S, S] on the teacher's device -> its outputs: normalised there
    (uint8 crosses the bus, 4x fewer bytes than float32) and run under `precision`."""
    x = normalize(pixels, teacher.mean, teacher.std)
    with torch.no_grad(), precision(x.device):
        return teacher(x)


def teacher_outputs(batch: list[ViewItem], teacher: Teacher, device: str,
                    x: torch.Tensor | None = None) -> TeacherOutput:
    """The teacher's outputs for one batch on `device`: from the workers' pixels, from the
    items' images rendered on the device, or from `x`, the batch already rendered there."""
    if x is None and batch[0].image is not None:
        x = device_views(batch, (teacher.input_size,), device)[0]
    elif x is None:
        x = torch.stack([item.pixels for item in batch]).to(device, non_blocking=True)
    return run_teacher(teacher, x)


def device_views(batch: list[ViewItem], sizes: tuple[int, ...], device: str) -> list[torch.Tensor]:
    """The batch's views rendered on `device` at each size -> [uint8 [B, 3, size, size] per
    size], from each key's image once: decoded with PIL (a tensor: pixel for pixel the
    workers' render) or decoded here (bytes: `device_decoder(device)`). A size asked twice
    is rendered once."""
    first: dict[str, torch.Tensor | bytes] = {}
    for item in batch:
        first.setdefault(item.key, item.image)
    keys, images = list(first), list(first.values())
    if isinstance(images[0], torch.Tensor):
        on_device = dict(zip(keys, _images_to(images, device)))
    else:
        on_device = _decoded_on_device(keys, images, device)
    views = [item.box for item in batch]
    per_view = [on_device[item.key] for item in batch]
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


def device_decoder(device: torch.device | str) -> str:
    """The decoder --decode-on-device uses on `device`, recorded as the manifest's
    views.decoder: nvjpeg on CUDA, torchvision's (libjpeg-turbo) on a CPU."""
    return "nvjpeg" if torch.device(device).type == "cuda" else "torchvision"


def check_replayable(decoder: str, device: torch.device | str) -> None:
    """Refuse (ReplayError, one line) before any work when views decoded by `decoder`
    (views.decoder) cannot be rendered again on `device`: nvjpeg's pixels exist on CUDA only."""
    if decoder not in ("pil", "torchvision", device_decoder(device)):
        raise ReplayError(f"views.decoder is {decoder!r} (extracted with --decode-on-device on CUDA): its pixels "
                          f"differ from PIL's, so only {decoder} on a CUDA device replays them; run with --device "
                          "cuda, or --recompute 0 to check integrity alone")


def replay_image(data: bytes, decoder: str, device: torch.device | str) -> bytes | torch.Tensor:
    """`ViewItem.image` that renders a cached view again from its image file `data` as the
    cache's recorded `decoder` decoded it: PIL's pixels; the bytes, where `device` decodes
    with that decoder itself (as --decode-on-device did); torchvision's CPU decode beside a
    GPU. ReplayError where `check_replayable` refuses."""
    check_replayable(decoder, device)
    if decoder == "pil":
        return decode_image(data)
    if decoder == device_decoder(device):
        return data
    return decode_batch([data], "cpu")[0]

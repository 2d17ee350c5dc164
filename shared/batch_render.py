"""Views rendered a batch at a time on the GPU, bit-identical to `views.render_view_uint8`.

`render_view_uint8` (torchvision's resized_crop, bicubic, antialiased, on a uint8 CPU
tensor) runs PyTorch's Pillow-style integer resampler: a horizontal then a vertical pass,
each with bicubic (a = -0.5) weights stretched by the downscale factor, rounded to int16
at a precision chosen per pass, accumulated exactly in integers, then shifted back and
clamped to 0-255. On CUDA torchvision would resample in float32 instead (a pixel can end a
level apart), one view and several kernels at a time, a host cost per view that
BENCHMARKS.md ("Extraction on the GPU") measures.

Here each pass is one batched matmul of the crops with those integer weights, in float64:
every product and partial sum is an integer below 2**53, so the sums are exact whatever
order the matmul adds them in. The result therefore depends neither on the device (any
with float64) nor on which views share a batch, and equals the CPU render pixel for pixel
(tests/test_batch_render.py).
Flips are folded into the horizontal weights (their rows reversed).
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from mrmae.shared.views import View, render_view_uint8

A = -0.5  # the bicubic kernel's parameter in Pillow and PyTorch's antialiased resampler
MAX_PRECISION = 22  # bits: PyTorch's cap (int16 weights, int32 sums on its CPU path)
CHUNK_ELEMENTS = 1 << 24  # per channel, of a chunk's crops, weights and passes (render_exact)


def _bicubic(x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    near = ((A + 2) * x - (A + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * A
    return np.where(x < 1, near, np.where(x < 2, far, 0.0))


@functools.lru_cache(maxsize=4096)
def pass_weights(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """The non-zero integer weights of one resampling pass n_in -> n_out, as triplets
    (output index, input index, weight as a float64 integer), and their precision p:
    output o = floor((sum of weight * input + 2**(p-1)) / 2**p), clamped to 0-255.
    """
    scale = n_in / n_out
    stretch = max(scale, 1.0)  # downscaling widens the kernel: the antialiasing
    support = 2.0 * stretch
    centers = scale * (np.arange(n_out) + 0.5)
    first = np.maximum((centers - support + 0.5).astype(np.int64), 0)  # C casts truncate toward zero
    last = np.minimum((centers + support + 0.5).astype(np.int64), n_in)
    index = first[:, None] + np.arange(int((last - first).max()))
    w = np.where(index < last[:, None], _bicubic((index - centers[:, None] + 0.5) * (1.0 / stretch)), 0.0)
    total = w.sum(axis=1, keepdims=True)
    w = np.where(total != 0, w / np.where(total != 0, total, 1.0), w)
    # the largest precision whose biggest weight still fits int16 (PyTorch's rule)
    precision = 0
    while precision < MAX_PRECISION and int(0.5 + w.max() * (1 << (precision + 1))) < (1 << 15):
        precision += 1
    scaled = w * (1 << precision)
    ints = np.where(w < 0, np.trunc(scaled - 0.5), np.trunc(scaled + 0.5))  # round half away from zero
    out, tap = np.nonzero(ints)
    return out, index[out, tap], ints[out, tap], precision


def _weight_entries(lengths: list[int], flips: list[bool], width: int,
                    size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One pass's non-zero weights for n views: (flat index into [n, size, width], weight,
    precision [n]), all int64 (the weights are int16 values)."""
    flat, values, precision = [], [], []
    for i, (n_in, flip) in enumerate(zip(lengths, flips)):
        out, col, w, p = pass_weights(n_in, size)
        if flip:  # a horizontal flip reverses the output columns
            out = size - 1 - out
        flat.append((i * size + out) * width + col)
        values.append(w.astype(np.int64))
        precision.append(p)
    return np.concatenate(flat), np.concatenate(values), np.asarray(precision, dtype=np.int64)


def _to_device(parts: list[np.ndarray], device: torch.device) -> list[torch.Tensor]:
    """int64 arrays onto `device` in one copy that does not wait for the work already queued
    there (pinned memory, non-blocking), so rendering overlaps the previous batch's teacher."""
    host = torch.from_numpy(np.concatenate(parts))
    if device.type == "cuda":
        host = host.pin_memory()
    return list(host.to(device, non_blocking=True).split([len(p) for p in parts]))


def _dense(flat: torch.Tensor, values: torch.Tensor, n: int, size: int, width: int) -> torch.Tensor:
    """float64 [n, size, width] weights, zero but for the given entries."""
    dense = torch.zeros(n * size * width, dtype=torch.float64, device=flat.device)
    dense[flat] = values.double()
    return dense.view(n, size, width)


def _shift(acc: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """Integer sums [n, ...] back to pixels: floor((acc + 2**(p-1)) / 2**p) clamped to 0-255,
    in place; dividing by a power of two is exact."""
    unit = torch.exp2(precision.double()).view(-1, *[1] * (acc.dim() - 1))
    return acc.add_(unit / 2).div_(unit).floor_().clamp_(0, 255)


def _render_chunk(images: list[torch.Tensor], views: list[View], size: int) -> torch.Tensor:
    device, n = images[0].device, len(views)
    h, w = max(v.height for v in views), max(v.width for v in views)
    crops = torch.zeros((n, 3, h, w), dtype=torch.uint8, device=device)
    for i, (image, v) in enumerate(zip(images, views)):
        crops[i, :, :v.height, :v.width] = image[:, v.top:v.top + v.height, v.left:v.left + v.width]
    fx, vx, px = _weight_entries([v.width for v in views], [v.flip for v in views], w, size)
    fy, vy, py = _weight_entries([v.height for v in views], [False] * n, h, size)
    fx, vx, px, fy, vy, py = _to_device([fx, vx, px, fy, vy, py], device)
    wx, wy = _dense(fx, vx, n, size, w), _dense(fy, vy, n, size, h)  # [n, size, w], [n, size, h]
    # along rows: [n, 3h, w] @ [n, w, size] -> [n, 3h, size]
    x = _shift(torch.bmm(crops.double().view(n, 3 * h, w), wx.transpose(1, 2)), px)
    # along columns: [n, size, h] @ [n, h, 3 size] -> [n, size (y), 3 size (c, x)]
    x = _shift(torch.bmm(wy, x.view(n, 3, h, size).transpose(1, 2).reshape(n, h, 3 * size)), py)
    return x.view(n, size, 3, size).transpose(1, 2).to(torch.uint8)  # [n, 3, size, size]


def render_batch(images: list[torch.Tensor], views: list[View], size: int) -> torch.Tensor:
    """uint8 [3, H, W] images (one per view; repeats allowed), all on one device, and their
    views -> uint8 [B, 3, size, size], pixel for pixel `render_view_uint8(image, view, size)`.

    On CUDA, `render_exact`; elsewhere torchvision's own integer resampler view by view
    (on a CPU its sparse kernels beat dense float64 matmuls; MPS has no float64).
    """
    if views and images[0].device.type == "cuda":
        return render_exact(images, views, size)
    return render_one_by_one(images, views, size)


def render_one_by_one(images: list[torch.Tensor], views: list[View], size: int) -> torch.Tensor:
    """`render_view_uint8` view by view, stacked (on CUDA torchvision resamples in float32:
    not always the CPU's pixels)."""
    if not views:
        return torch.zeros((0, 3, size, size), dtype=torch.uint8)
    return torch.stack([render_view_uint8(image, v, size) for image, v in zip(images, views)])


def render_exact(images: list[torch.Tensor], views: list[View], size: int) -> torch.Tensor:
    """`render_batch` by batched matmuls on the images' device (any with float64), exact.

    Views are grouped by crop size so padding stays small, in chunks of at most
    CHUNK_ELEMENTS per channel of n (h w + (h + w + size) size), which keeps a chunk's
    float64 buffers under ~0.8 GB (a single larger view forms a chunk of its own); exact
    arithmetic makes the grouping invisible in the output.
    """
    if not views:
        return torch.zeros((0, 3, size, size), dtype=torch.uint8)
    order = sorted(range(len(views)), key=lambda i: (views[i].height, views[i].width))
    chunks, current, h, w = [], [], 0, 0
    for i in order:
        h, w = max(h, views[i].height), max(w, views[i].width)
        if current and (len(current) + 1) * (h * w + (h + w + size) * size) > CHUNK_ELEMENTS:
            chunks.append(current)
            current, h, w = [], views[i].height, views[i].width
        current.append(i)
    chunks.append(current)
    out = torch.cat([_render_chunk([images[i] for i in c], [views[i] for i in c], size) for c in chunks])
    inverse, = _to_device([np.argsort(np.concatenate(chunks))], out.device)
    return out.index_select(0, inverse)


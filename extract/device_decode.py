"""JPEG decoding on the teacher's device (`extract-features --decode-on-device`).

On a GPU the teacher runs views many times faster than a CPU core decodes and crops
ImageNet JPEGs (BENCHMARKS.md, "GPU: one H200"): the CPU is the bottleneck.
With this path the DataLoader workers only read each image's header (its size, to draw
the views) and the main process decodes a whole teacher batch at once with
`torchvision.io.decode_jpeg(..., device="cuda")` (nvjpeg); shared/batch_render.py then
crops, resizes and flips on the device, pixel for pixel as the CPU would.

nvjpeg does not give PIL's pixels (up to 64 levels apart on a pixel; teacher tokens down
to cosine 0.99 after rendering), so such a cache records `views.decoder = "nvjpeg"` and
training refuses to replay it from the tars with PIL: extract it with `--store-pixels`
and train with `--pixels-from-cache`. Images nvjpeg cannot take (PNG, CMYK JPEG, damaged
files) fall back to PIL for that image alone; on a machine without CUDA torchvision's CPU
decoder is used, which is libjpeg-turbo like PIL (identical pixels on the tests' images).
"""

from __future__ import annotations

import io

import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from mrmae.shared.views import MAX_IMAGE_PIXELS, ImageDecodeError, decode_image, decoder_error

DECODERS = ("pil", "nvjpeg")


def image_size(data: bytes) -> tuple[int, int]:
    """(height, width) from the image header alone (no pixel decoded); raises ImageDecodeError."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            width, height = im.size
            kind = im.format
    except Exception as e:  # PIL raises many types
        raise ImageDecodeError(decoder_error(e)) from e
    if width * height > MAX_IMAGE_PIXELS:
        raise ImageDecodeError(f"image of {width}x{height} px exceeds {MAX_IMAGE_PIXELS} px")
    if kind is None:
        raise ImageDecodeError("unknown image format")
    return height, width


def decode_batch(images: list[bytes], device: torch.device | str) -> list[torch.Tensor]:
    """Image bytes -> uint8 [3, H, W] tensors on `device`: one batched device decode for
    the JPEGs, PIL (then a copy to the device) for the others and for any nvjpeg refuses.

    An image neither can decode raises ImageDecodeError naming its index: on this path the
    workers only read headers, so a file damaged past its header is found here, too late to
    skip it quietly; the run stops with one line (without --decode-on-device such a sample
    is skipped and recorded).
    """
    device = torch.device(device)
    out: list[torch.Tensor | None] = [None] * len(images)
    jpegs = [i for i, data in enumerate(images) if data[:3] == b"\xff\xd8\xff"]
    if jpegs:
        raw = [torch.frombuffer(bytearray(images[i]), dtype=torch.uint8) for i in jpegs]
        try:
            decoded = decode_jpeg(raw, mode=ImageReadMode.RGB, device=device)
        except RuntimeError:  # one bad or unsupported file fails the batch: decode one by one
            decoded = []
            for r in raw:
                try:
                    decoded.append(decode_jpeg(r, mode=ImageReadMode.RGB, device=device))
                except RuntimeError:
                    decoded.append(None)
        for i, img in zip(jpegs, decoded):
            out[i] = img
    for i, img in enumerate(out):
        if img is None:
            try:
                out[i] = decode_image(images[i]).to(device)
            except ImageDecodeError as e:
                raise ImageDecodeError(f"image {i} of the batch: {e}") from e
    return out


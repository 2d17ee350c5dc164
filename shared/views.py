"""View geometry and rendering: the one definition both stages replay.

A *view* is a RandomResizedCrop box in source-image pixels plus a horizontal-flip bit.
It is drawn from a generator seeded by (global seed, sample key, view index) alone, so
the same image gets the same views on any rank, worker, batch size or order. Extraction
renders the view for the teacher; pretraining renders it again, from the same source
bytes and with the same function, for the student.
"""

from __future__ import annotations

import contextlib
import functools
import io
import math
import re
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np
from PIL import Image

from mrmae.shared.seeding import numpy_rng_from

if TYPE_CHECKING:  # torch and torchvision are imported by the functions that render: a cache's
    import torch   # manifest (ViewConfig, the codecs) is read without them, e.g. by `cache info`

# Refuse images whose pixel count would exhaust memory when decoded (PIL's own bomb
# guard only warns below 2x its limit). 1e8 px is ~300 MB of RGB, far above ImageNet.
MAX_IMAGE_PIXELS = 100_000_000


@dataclass(frozen=True)
class ViewConfig:
    """How views are drawn and rendered; recorded as the manifest's `views` entry."""

    per_image: int = 2
    seed: int = 0
    scale: tuple[float, float] = (0.2, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    interpolation: str = "bicubic"
    output_size: int = 224
    # JPEG decoders differ by up to tens of levels per pixel, enough to break a 0.999
    # token-cosine replay: the one that rendered the views is recorded and must replay them.
    decoder: str = "pil"

    def to_json(self) -> dict:
        d = asdict(self)
        d["scale"], d["ratio"] = list(self.scale), list(self.ratio)
        return d

    @classmethod
    def from_json(cls, d: dict) -> "ViewConfig":
        return cls(**{**d, "scale": tuple(d["scale"]), "ratio": tuple(d["ratio"])})


@dataclass(frozen=True)
class View:
    """A crop box in source pixels (top, left, height, width) and a flip bit."""

    top: int
    left: int
    height: int
    width: int
    flip: bool

    @property
    def box(self) -> tuple[int, int, int, int]:
        return (self.top, self.left, self.height, self.width)


def view_rng(seed: int, key: str, view_index: int) -> np.random.Generator:
    """A generator that depends on (seed, key, view index) and nothing else (shared/seeding.py)."""
    return numpy_rng_from(seed, key, view_index)


def sample_view(height: int, width: int, rng: np.random.Generator, cfg: ViewConfig) -> View:
    """Draw a RandomResizedCrop box and flip for an image of `height` x `width` pixels.

    Same distribution as torchvision's RandomResizedCrop: ten tries of an area fraction
    uniform in `scale` and a log-uniform aspect ratio in `ratio`; if none fits, a centre
    crop clamped to the ratio range. The flip is drawn last, always, so the number of
    draws before it never depends on the image size.
    """
    area = height * width
    log_lo, log_hi = math.log(cfg.ratio[0]), math.log(cfg.ratio[1])
    box = None
    for _ in range(10):
        target = area * rng.uniform(cfg.scale[0], cfg.scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            box = (top, left, h, w)
            break
    if box is None:
        in_ratio = width / height
        if in_ratio < cfg.ratio[0]:
            w, h = width, int(round(width / cfg.ratio[0]))
        elif in_ratio > cfg.ratio[1]:
            h, w = height, int(round(height * cfg.ratio[1]))
        else:
            w, h = width, height
        box = ((height - h) // 2, (width - w) // 2, h, w)
    flip = bool(rng.uniform() < cfg.flip_p)
    return View(*box, flip=flip)


def sample_views(key: str, height: int, width: int, cfg: ViewConfig) -> list[View]:
    """The `cfg.per_image` views of one sample, in view-index order."""
    return [sample_view(height, width, view_rng(cfg.seed, key, v), cfg) for v in range(cfg.per_image)]


class ImageDecodeError(ValueError):
    """The bytes under an image key are not a decodable image (or too large to decode)."""


def decode_image(data: bytes) -> torch.Tensor:
    """JPEG/PNG/... bytes -> uint8 tensor [3, H, W] (RGB; grayscale, CMYK, 16-bit and
    float images converted and scaled to 8 bits, `_to_rgb8`).

    Decoded fully (`load`) so truncated files fail here, not later in a worker.
    """
    import torch

    with _loaded(data) as im:
        arr = _pil_step(_to_rgb8, im)
    return torch.from_numpy(arr).permute(2, 0, 1)


def decode_crop(data: bytes, choose: Callable[[int, int], View]) -> tuple[np.ndarray, View]:
    """Image bytes and `choose(height, width)` -> (the chosen view's box of the image, uint8
    [h, w, 3], HWC; the view), pixel for pixel `decode_image(data)[:, box].permute(1, 2, 0)`.

    What a loader worker hands over when the views are rendered elsewhere: of an RGB image
    (JPEG's usual mode) only the box is copied out of the decoder's buffer; other modes go
    through `decode_image`'s conversion first (it can depend on the whole image). A box
    outside the image raises ViewError, `choose`'s own errors pass as they are; the
    array may be read-only.
    """
    with _loaded(data) as im:
        view = choose(im.height, im.width)
        check_view(view, im.height, im.width)
        top, left, h, w = view.box
        if im.mode == "RGB":
            raw = _pil_step(lambda i: i.crop((left, top, left + w, top + h)).tobytes(), im)
            return np.frombuffer(raw, dtype=np.uint8).reshape(h, w, 3), view
        whole = _pil_step(_to_rgb8, im)
    return np.ascontiguousarray(whole[top:top + h, left:left + w]), view


@contextlib.contextmanager
def _loaded(data: bytes) -> Iterator[Image.Image]:
    """The image in `data`, its size checked and its pixels decoded (PIL's many error types
    as one ImageDecodeError); errors of the `with` body pass as they are."""
    im = _pil_step(lambda d: Image.open(io.BytesIO(d)), data)
    with im:
        if im.width * im.height > MAX_IMAGE_PIXELS:
            raise ImageDecodeError(f"image of {im.width}x{im.height} px exceeds {MAX_IMAGE_PIXELS} px")
        _pil_step(lambda i: i.load(), im)
        yield im


def _pil_step(fn: Callable, arg):
    """fn(arg), any error but ImageDecodeError raised as one (PIL raises OSError,
    SyntaxError, ValueError...)."""
    try:
        return fn(arg)
    except ImageDecodeError:
        raise
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError...)
        raise ImageDecodeError(decoder_error(e)) from e


def decoder_error(e: Exception) -> str:
    """`Type: message` of a decoder's exception, less the object address PIL puts in some
    (`cannot identify image file <_io.BytesIO object at 0x7f...>`): the reason a sample was
    skipped is recorded in the cache's shard entry, whose bytes must not depend on the run."""
    return f"{type(e).__name__}: {re.sub(r' ?<[^<>]* at 0x[0-9a-fA-F]+>', '', str(e))}"


def _to_rgb8(im: Image.Image) -> np.ndarray:
    """A loaded PIL image of any mode -> uint8 [H, W, 3], each mode's range scaled to 0-255.

    PIL's own convert("RGB") clips the integer modes (a 16-bit PNG opens as I;16 or I, and
    99.6% of a full-range image's pixels would become 255): those are scaled here, 16-bit
    by 255/65535 (a 32-bit `I` image holding only 0-255 is taken as 8-bit), float `F` from
    0-1 (or clipped to 0-255 when its values exceed 1). Alpha (RGBA, LA, P with
    transparency) is dropped, as convert("RGB") drops it; CMYK, YCbCr, L, 1 and P are
    PIL's conversions, unchanged.
    """
    if im.mode.startswith("I") or im.mode == "F":
        a = np.asarray(im, dtype=np.float64)
        if im.mode == "F":
            finite = a[np.isfinite(a)]
            if a.size and not finite.size:  # (nanmax would warn "All-NaN slice", naming nothing, and train on black)
                raise ImageDecodeError(f"a {im.width}x{im.height} float image without one finite pixel (all NaN or "
                                       "infinite)")
            a = a * 255.0 if finite.size and finite.max() <= 1.0 else a
        elif im.mode.startswith("I;16") or (a.size and a.max() > 255):
            a = a * (255.0 / 65535.0)
        gray = np.clip(np.nan_to_num(np.rint(a)), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")  # convert("RGB") would warn about the palette's transparency
    return np.array(im.convert("RGB"), dtype=np.uint8)


class ViewError(ValueError):
    """A crop box that is not inside its image (a damaged cache's, or a changed image's)."""


def check_view(view: View, height: int, width: int) -> None:
    """Refuse a crop box outside a `height` x `width` image: torchvision would pad it, and a
    damaged box asks for gigabytes."""
    if not (view.top >= 0 and view.left >= 0 and view.height >= 1 and view.width >= 1
            and view.top + view.height <= height and view.left + view.width <= width):
        raise ViewError(f"crop {list(view.box)} (top, left, height, width) is not inside the {height}x{width} image")


def render_view_uint8(image: torch.Tensor, view: View, output_size: int) -> torch.Tensor:
    """uint8 [3, H, W] source -> uint8 [3, S, S] view: crop, bicubic antialiased resize, flip."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    check_view(view, image.shape[-2], image.shape[-1])
    out = TF.resized_crop(
        image, view.top, view.left, view.height, view.width, [output_size, output_size],
        interpolation=InterpolationMode.BICUBIC, antialias=True,
    )
    return TF.horizontal_flip(out) if view.flip else out


# What the students see (pretraining, fine-tuning, evaluation, exports' pretrained configs):
# ImageNet's mean and std, in 0-1 units. Teachers normalise with their own (teachers/).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize(pixels: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 [..., 3, S, S] -> float32 normalised with the consumer's mean/std (in 0-1 units)."""
    import torch

    x = pixels.float().div_(255.0)
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(3, 1, 1)
    return (x - m) / s


def render_view(
    image: torch.Tensor, view: View, output_size: int, mean: tuple[float, ...], std: tuple[float, ...]
) -> torch.Tensor:
    """The render both stages use: uint8 source -> normalised float32 [3, S, S]."""
    return normalize(render_view_uint8(image, view, output_size), mean, std)


# --- stored views (`extract-features --store-pixels`) --------------------------------------

# Codec -> (PIL format, save options, file extension). zstd (the raw uint8 array as .npy,
# zstd level 3), PNG and WebP are lossless: the training loader then decodes exactly the
# pixels a replay from the source would render; zstd is the largest but decodes fastest,
# which is what lets a loader worker outrun JPEG decoding. JPEG at quality 95 is smaller
# and lossy (BENCHMARKS.md, "Loaders and stored views", gives sizes, speeds and errors).
PIXEL_CODECS: dict[str, tuple[str | None, dict, str]] = {
    "zstd": (None, {"level": 3}, "npy.zst"),
    "png": ("PNG", {"compress_level": 1}, "png"),
    "webp": ("WEBP", {"lossless": True, "quality": 0, "method": 0}, "webp"),  # fastest lossless setting
    "jpeg": ("JPEG", {"quality": 95, "subsampling": 0}, "jpg"),
}


_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def encode_view(pixels: torch.Tensor, codec: str) -> bytes:
    """A rendered view, uint8 [3, S, S], -> file bytes in `codec` (PIXEL_CODECS)."""
    fmt, options, _ = PIXEL_CODECS[codec]
    hwc = pixels.permute(1, 2, 0).contiguous().numpy()
    buf = io.BytesIO()
    if fmt is None:  # zstd: the array as .npy (never a pickle), one zstd frame
        from numcodecs import Zstd

        np.save(buf, hwc, allow_pickle=False)
        return bytes(Zstd(level=options["level"]).encode(buf.getvalue()))
    Image.fromarray(hwc).save(buf, format=fmt, **options)
    return buf.getvalue()


@functools.lru_cache(maxsize=64)
def _npy_header(header: bytes) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) of a .npy file from its header bytes, parsed once per distinct header
    (every view of a cache has the same one; parsing it is a literal_eval each time)."""
    f = io.BytesIO(header)
    version = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read(f)
    if fortran or dtype.hasobject:
        raise ValueError(f"unsupported .npy layout (fortran order {fortran}, dtype {dtype})")
    return shape, dtype


def _load_npy(buf: bytes) -> np.ndarray:
    """A .npy file's array, read-only over `buf` (no pickle, no copy)."""
    if buf[:6] != b"\x93NUMPY" or len(buf) < 12:
        raise ValueError("not a .npy file")
    width = 2 if buf[6] == 1 else 4  # header length field: uint16 in version 1, uint32 after
    start = 8 + width + int.from_bytes(buf[8:8 + width], "little")
    shape, dtype = _npy_header(bytes(buf[:start]))
    return np.frombuffer(buf, dtype=dtype, count=math.prod(shape), offset=start).reshape(shape)


MAX_VIEW_SIDE = 4096  # of a stored view whose size the caller does not give (none is larger)


def decode_view(data: bytes, size: int | None = None) -> torch.Tensor:
    """File bytes of a stored view -> uint8 [3, S, S] (the inverse of encode_view). `size`:
    S, as the cache's manifest gives it: what the file declares (a zstd frame's decompressed
    size, an image's width and height) is compared with it before anything is decoded, so a
    crafted view declaring gigabytes is refused with memory flat (at most MAX_VIEW_SIDE)."""
    import torch

    from .frames import zstd_decompress

    side = size or MAX_VIEW_SIDE
    if data[:4] == _ZSTD_MAGIC:
        header = 128  # np.save's header of a [S, S, 3] uint8 array (version 1.0, padded to 64 bytes)
        arr = _load_npy(zstd_decompress(data, header + side * side * 3, at_most=size is None))
    else:
        with Image.open(io.BytesIO(data)) as im:
            if im.size != (side, side) if size else max(im.size) > side:
                raise ValueError(f"a stored view of {im.size[0]} x {im.size[1]} px, {side} x {side} expected")
            arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3 or (size and arr.shape[:2] != (size, size)):
        raise ValueError(f"a stored view must be uint8 [S, S, 3], got {arr.dtype} {arr.shape}")
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)

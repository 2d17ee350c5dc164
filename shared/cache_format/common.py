"""What every backend shares: the format version, errors, int8 quantisation, one view's
targets, and the digest of a stored shard (a Zarr group directory or a tar file)."""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import shutil
import socket
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import MrmaeError

if TYPE_CHECKING:  # torch is imported where a tensor is quantised: reading a cache needs none
    import torch

# 6: the list of a shard's files is a file of its own beside its group (`<group>.files`),
#    bound by its sha256 and size in the entry: start-up reads small entries only
# 5: each shard's entry lists every file of its group with its size and sha256 (listing.py);
#    array metadata as the writer writes it, exactly; small arrays one chunk of the rows
# 4: a checksum on every chunk (Zarr: crc32c codec) or member (wds: zstd frame checksum, or
#    crc32c in meta.json), every chunk stored; 3: int8 scales per group of channels
#    (storage.int8_group); 2: one scale per token
FORMAT_VERSION = 6
READABLE_VERSIONS = (2, 3, 4, 5, 6)  # a version 2 cache reads as one with int8_group null
CHECKED_VERSION = 4  # the first format whose every chunk or member carries a checksum
LISTED_VERSION = 5  # the first format whose every entry lists its group's files
SIDECAR_VERSION = 6  # the first format whose entries keep that list in a file beside the group
ROWS_PER_CHUNK = 16  # views per features chunk: sequential loader reads, ~2.4 MB int8 for B/16


class CacheError(MrmaeError, ValueError):
    """A cache that is missing, damaged, or does not fit what is asked of it."""


class UncheckedCacheWarning(UserWarning):
    """A cache from before format 4: its chunks carry no checksums."""


_warned_unchecked = False


def warn_if_unchecked(root: str, version: int) -> bool:
    """True when a cache of `version` has checksummed chunks; else False, and warn once per
    process (a run opens every shard, and several caches: one line is enough)."""
    global _warned_unchecked
    if version >= CHECKED_VERSION:
        return True
    if not _warned_unchecked:
        _warned_unchecked = True
        warnings.warn(f"{root}: format {version} cache: its chunks carry no checksums, so damaged bytes are not "
                      f"detected as they are read (`mrmae cache verify` compares each shard's sha256; "
                      f"re-extract into a new cache for format {CHECKED_VERSION})", UncheckedCacheWarning, stacklevel=2)
    return False


class UnlistedCacheWarning(UserWarning):
    """A format 4 cache: its entries list no files (chunks are checksummed, not bound to their place)."""


_warned_unlisted = False


def warn_if_unlisted(root: str, version: int) -> None:
    """Warn once per process that a format 4 cache's entries list no files: each chunk's
    crc32c is checked, but a chunk swapped for another whole one of the same array is not
    found while reading (`cache verify` finds it: the group's sha256)."""
    global _warned_unlisted
    if version != CHECKED_VERSION or _warned_unlisted:
        return
    _warned_unlisted = True
    warnings.warn(f"{root}: format {version} cache: its entries list no files, so a chunk replaced by another "
                  f"whole chunk is not detected as it is read (`mrmae cache verify` compares each shard's sha256; "
                  f"re-extract into a new cache for format {FORMAT_VERSION})", UnlistedCacheWarning, stacklevel=2)


def read_error(e: Exception) -> str:
    """What went wrong reading a chunk or member, short: a checksum mismatch by name, any
    other codec error by its type and first words."""
    text = str(e)
    if "checksum do not match" in text:  # zarr's crc32c codec
        return "crc32c checksum mismatch"
    if "match checksum" in text:  # zstd's frame checksum
        return "zstd frame checksum mismatch"
    if text.startswith(("crc32c checksum mismatch", "no checksum")):  # the wds reader's own
        return text
    return f"{type(e).__name__}: {text[:160]}"


# Upper bound of a crop's side and area: no decodable image is larger (views.MAX_IMAGE_PIXELS).
MAX_CROP_PIXELS = 100_000_000


def check_crops(where: str, crop: np.ndarray) -> None:
    """Cheap range checks of stored crop boxes [N, 4] (top, left, height, width) as they are
    read: a damaged box is an error naming `where`, not a huge allocation at render time
    (the render checks each box against its decoded image)."""
    crop = np.asarray(crop, dtype=np.int64).reshape(-1, 4)
    bad = (crop[:, :2] < 0).any(axis=1) | (crop[:, 2:] < 1).any(axis=1) \
        | (crop[:, 0] + crop[:, 2] > MAX_CROP_PIXELS) | (crop[:, 1] + crop[:, 3] > MAX_CROP_PIXELS) \
        | (crop[:, 2] * crop[:, 3] > MAX_CROP_PIXELS)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise CacheError(f"{where}: row {i}: crop {crop[i].tolist()} is not a box in any image "
                         f"({int(bad.sum())} such rows); damaged: run `mrmae cache verify`")


# --- quantisation ---------------------------------------------------------------------


INT8_GROUP = 64  # channels per int8 scale, the default of new caches (`--int8-group`)


def int8_groups(width: int, group: int | None) -> int | None:
    """Scales per token when each covers `group` channels of `width`; None: one per token
    (no group given, or it does not divide `width` into several parts)."""
    if not group or group >= width or width % group:
        return None
    return width // group


def _grouped(x, groups: int | None):
    """[..., C] -> [..., G, C/G] (a view), or x itself when `groups` is None."""
    return x if groups is None else x.reshape(*x.shape[:-1], groups, x.shape[-1] // groups)


def quantize_int8(x: np.ndarray, group: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """float [..., C] -> (int8 [..., C], float16 scale [...] or [..., G]); value ~= int8 * scale.

    One scale per token, or per `group` channels of a token (`int8_groups`): a few large
    channels then coarsen only their own group's steps, not the whole token's. scale =
    absmax / 127, rounded to float16 *before* quantising, so the stored scale is the one the
    values were divided by (error <= scale / 2 per element).
    """
    x = np.asarray(x, dtype=np.float32)
    y = _grouped(x, int8_groups(x.shape[-1], group))
    scale = (np.abs(y).max(axis=-1) / 127.0).astype(np.float16)
    s = scale.astype(np.float32)[..., None]
    q = np.divide(y, s, out=np.zeros_like(y), where=s > 0)
    return np.clip(np.rint(q), -127, 127).astype(np.int8).reshape(x.shape), scale


def quantize_int8_torch(x: torch.Tensor, group: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_int8` on x's own device: (int8 [..., C], float16 [...] or [..., G]), bit-identical.

    The extraction quantises on the teacher's device, so a quarter of the bytes cross the
    bus and no CPU core spends its time on it.
    Same float32 operations in the same order (absmax / 127 -> float16, divide, round half
    to even, clip) as the numpy version; tests hold the two equal. 127 is a tensor on x's
    device: CUDA divides by a Python scalar as a multiplication by its reciprocal, which
    rounds a few float16 scales in a million the other way.
    """
    import torch

    x = x.float()
    y = _grouped(x, int8_groups(x.shape[-1], group))
    scale = (y.abs().amax(dim=-1) / torch.full((), 127.0, device=x.device)).half()
    s = scale.float().unsqueeze(-1)
    q = torch.where(s > 0, y / torch.where(s > 0, s, 1.0), 0.0)
    return q.round().clamp(-127, 127).to(torch.int8).reshape(x.shape), scale


def stored_features(value: np.ndarray | tuple[np.ndarray, np.ndarray], dtype: str, group: int | None = None
                    ) -> tuple[np.ndarray, np.ndarray | None]:
    """What a writer stores for one features column: (values, scale or None).

    `value` is float [n, L, C] or an already quantised (int8, float16 scale) pair from
    `quantize_int8_torch`; dtype "int8" or "float16" as the cache stores; `group`: the
    cache's channels per scale.
    """
    if isinstance(value, tuple):
        if dtype != "int8" or value[0].dtype != np.int8:
            raise ValueError(f"a quantised (int8, scale) pair given to a {dtype} shard")
        return value
    if dtype == "int8":
        return quantize_int8(value, group)
    return np.asarray(value).astype(np.float16), None


def dequantize(values: np.ndarray, scale: np.ndarray | None) -> np.ndarray:
    """Stored features -> float32: int8 x scale (one per token, [...], or per group of
    channels, [..., G]), or float16 as is."""
    if scale is None:
        return values.astype(np.float32)
    v = values.astype(np.float32)
    groups = scale.shape[-1] if scale.ndim == v.ndim else None
    return (_grouped(v, groups) * scale.astype(np.float32)[..., None]).reshape(v.shape)


@dataclass
class ViewTargets:
    """One cached view: geometry and targets (features dequantised to float32)."""

    key: str
    view_index: int
    crop: tuple[int, int, int, int]
    flip: bool
    features: np.ndarray  # [L, C] float32
    attention: np.ndarray  # [L] float32
    cls: np.ndarray  # [C] float32


# --- stored shards on disk ----------------------------------------------------------------


def check_pixels_given(source: str, stores: bool, pixels: list[bytes] | None, rows: int) -> None:
    """A writer's `append` gets each row's encoded view exactly when its cache stores them."""
    if (pixels is not None) != stores or (pixels is not None and len(pixels) != rows):
        raise ValueError(f"{source}: pixels must be given for every row exactly when the cache stores them")


IMAGE_DIGEST_BYTES = 32  # sha256 of a row's source image file, as extraction read it


def image_sha256(image: bytes | None) -> bytes:
    """The digest a row records of the image its views were rendered from (32 bytes; of
    b"" for a sample without an image, which then never matches a recorded image)."""
    return hashlib.sha256(image or b"").digest()


def image_digests(source: str, digests: list[bytes] | np.ndarray | None, rows: int) -> np.ndarray | None:
    """A writer's `append` argument -> uint8 [rows, 32] (or None: the rows record none)."""
    if digests is None:
        return None
    if isinstance(digests, list):  # 32-byte digests, one a row
        if any(len(d) != IMAGE_DIGEST_BYTES for d in digests):
            raise ValueError(f"{source}: an image digest is not {IMAGE_DIGEST_BYTES} bytes")
        digests = np.frombuffer(b"".join(digests), np.uint8)
    out = np.asarray(digests, dtype=np.uint8).reshape(-1, IMAGE_DIGEST_BYTES)
    if len(out) != rows:
        raise ValueError(f"{source}: {len(out)} image digests for {rows} rows")
    return out


class DigestColumn:
    """A writer's image digests: given for every row or for none (a shard that records some
    rows' images would check only those)."""

    def __init__(self, source: str):
        self.source, self.parts, self.rows, self.missing = source, [], 0, 0

    def add(self, digests: list[bytes] | np.ndarray | None, rows: int) -> None:
        column = image_digests(self.source, digests, rows)
        if column is None:
            self.missing += rows
        else:
            self.parts.append(column)
            self.rows += rows
        if self.missing and self.rows:
            raise ValueError(f"{self.source}: image digests must be given for every row or for none")

    def column(self) -> np.ndarray | None:
        """uint8 [N, 32] of every row appended, or None when they record no images."""
        if not self.rows:
            return None
        return np.concatenate(self.parts)


def check_image(where: str, key: str, image: bytes | None, recorded: bytes | None, cache: str,
                digest: bytes | None = None) -> None:
    """The image a cached view is replayed from (`digest`: its sha256, when known already)
    must be the one it was rendered from at extraction: `recorded` (None: the cache predates
    per-row digests, only the shard's sha256 is checked). One CacheError naming `where` and key."""
    if recorded is None:
        return
    digest = digest if digest is not None else image_sha256(image)
    if digest != recorded:
        raise CacheError(f"{where}: key {key}: image differs from the one extracted into {cache} (sha256 "
                         f"{digest.hex()[:16]}..., {recorded.hex()[:16]}... when extracted): same key, other image")


def view_targets(reader, key: str, view: int) -> ViewTargets:
    """One row of a shard reader (either backend: `row` and `read`) as ViewTargets."""
    i = reader.row(key, view)
    block = reader.read(slice(i, i + 1))
    return ViewTargets(key, view, tuple(int(x) for x in block["crop"][0]), bool(block["flip"][0]),
                       block["features"][0], block["attention"][0], block["cls"][0])


# --- the writer's side: temporaries, row checks, publishing --------------------------------
#
# Many writers may work on one cache at once (processes of one run, reruns, other machines
# on NFS or an object store), with no lock: each writes under a temporary name no other
# writer can have, checks what it wrote, and publishes it under a name derived from its
# bytes, so two writers of one shard publish the same group or one yields to the other.
# CACHE_FORMAT.md, "Concurrent writers", says the same for people.

CONTENT_DIGITS = 16  # hex digits of a group's sha256 in its published name


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())[:40] or "host"


def writer_token() -> str:
    """`<host>-<pid>-<random>`: differs between any two writers, on one machine or many
    (a pid alone repeats across machines sharing a file system, and after a restart)."""
    return f"{_host()}-{os.getpid()}-{secrets.token_hex(4)}"


def writer_temp(shards_dir: Path, name: str, suffix: str = "") -> Path:
    """Where one writer assembles shard `name`: `shards/.tmp-<name>-<host>-<pid>-<random><suffix>`.

    No other writer ever creates, writes or removes this path; only `mrmae cache clean`
    removes it once its writer is gone (see `clean_cache`).
    """
    return Path(shards_dir) / f".tmp-{name}-{writer_token()}{suffix}"


def content_group(name: str, digest: str, suffix: str = "") -> str:
    """The published path of shard `name` with these bytes: `shards/<name>.<sha256[:16]><suffix>`.

    Two writers of one shard that wrote the same bytes publish to the same name (the second
    yields); different bytes never share a name, so an entry always points to a whole group.
    """
    return f"shards/{name}.{digest[:CONTENT_DIGITS]}{suffix}"


def check_rows(source: str, where: str, stored: list[tuple[str, int]], expected: list[tuple[str, int]]) -> None:
    """Refuse to publish a shard that does not hold exactly the rows its entry will record.

    `stored`: (key, view) of every row as read back from the finished temporary (so rows
    lost on the way to the disk show, e.g. a missing chunk reading back as the fill value
    ""); `expected`: the rows the shard must hold, kept samples x views, in order.
    """
    stop = f"; shard {source} not published"
    if len(stored) != len(expected):
        raise CacheError(f"{where}: {len(stored)} rows written, {len(expected)} expected (samples kept x views){stop}")
    for i, (got, want) in enumerate(zip(stored, expected)):
        if got[0] == "":
            raise CacheError(f"{where}: row {i} has an empty key{stop}")
        if got != want:
            raise CacheError(f"{where}: row {i} holds key {got[0]!r} view {got[1]}, expected {want[0]!r} "
                             f"view {want[1]}{stop}")


def check_rows_tied(where: str, keys: np.ndarray, views: np.ndarray, per_image: int, entry) -> None:
    """A stored shard's rows are its entry's samples x the manifest's K views: each sample's
    views 0..K-1 in order under one key, no key in two samples, as many samples as the entry
    says. Checked as a shard opens (and by `cache verify`): crafted counts that agree with
    each other (K 2 -> 1 and every entry's samples doubled) would otherwise set the epoch's
    length and the views shown. One CacheError naming `where` and the first row that differs."""
    views = np.asarray(views).astype(np.int64)
    n, k = len(views), per_image
    if n % k or (entry is not None and n // k != entry.num_samples):
        raise CacheError(f"{where}: {n} rows are not num_samples {getattr(entry, 'num_samples', '?')} x "
                         f"{k} views (views.per_image); run `mrmae cache verify --repair`")
    want = np.tile(np.arange(k), n // k)
    if n and not np.array_equal(views, want):
        i = int(np.flatnonzero(views != want)[0])
        raise CacheError(f"{where}: row {i} holds view {views[i]}, expected {want[i]} (views 0..{k - 1} of each "
                         f"sample, in order; views.per_image {k}); run `mrmae cache verify --repair`")
    per_sample = np.asarray(keys).reshape(-1, k) if n else np.zeros((0, k), dtype=str)
    same = (per_sample == per_sample[:, :1]).all(axis=1)
    if not same.all():
        i = int(np.flatnonzero(~same)[0]) * k
        raise CacheError(f"{where}: rows {i}-{i + k - 1} are one sample's views but hold several keys; "
                         "run `mrmae cache verify --repair`")
    if len(set(per_sample[:, 0].tolist())) != len(per_sample):
        seen: set[str] = set()
        for i, key in enumerate(per_sample[:, 0].tolist()):
            if key in seen:
                raise CacheError(f"{where}: rows {i * k}-{i * k + k - 1}: key {key!r} has rows in two samples; "
                                 "run `mrmae cache verify --repair`")
            seen.add(key)


def remove_path(path: Path) -> None:
    """Delete a file or directory tree if it exists (what a writer does to its own temp)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)

"""Bounded decoding of the compressed frames a cache stores: zstd and blosc.

A frame says in its header how large it decompresses (zstd's Frame_Content_Size, blosc's
`nbytes`), and a decoder allocates that much before it checks anything. Readers know the
size from the cache's own metadata (a chunk's shape and dtype, a member's `.npy` header),
so the header's size is compared with it first: a frame declaring 4 GiB is one error, with
memory flat, never an allocation. Nothing here imports torch or the cache package.
"""

from __future__ import annotations

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_FCS_BYTES = (0, 2, 4, 8)  # Frame_Content_Size field size per FCS_flag (0: 1 byte when single-segment)
_DICT_BYTES = (0, 1, 2, 4)


class FrameError(ValueError):
    """A frame that is not what its reader expects; the message says what (no path: the
    caller names the file, the member and the row)."""


def zstd_content_size(data: bytes | memoryview) -> int:
    """The decompressed size a zstd frame declares (RFC 8878, 3.1.1.1). A frame without
    that field, with a dictionary, a skippable frame or no zstd frame at all is refused:
    every writer of a cache records the size (numcodecs and zarr compress whole buffers)."""
    head = bytes(data[:18])
    if len(head) < 6 or head[:4] != ZSTD_MAGIC:
        raise FrameError("not a zstd frame")
    fhd = head[4]
    fcs_flag, single, reserved, dict_flag = fhd >> 6, (fhd >> 5) & 1, (fhd >> 3) & 1, fhd & 3
    if reserved or dict_flag:
        raise FrameError("a zstd frame with a dictionary or reserved bits set")
    width = _FCS_BYTES[fcs_flag] or (1 if single else 0)
    if not width:
        raise FrameError("a zstd frame that does not declare its decompressed size")
    pos = 5 + (0 if single else 1) + _DICT_BYTES[dict_flag]
    if len(head) < pos + width:
        raise FrameError("a truncated zstd frame header")
    size = int.from_bytes(head[pos:pos + width], "little")
    return size + 256 if width == 2 else size


def check_zstd(data: bytes | memoryview, expected: int, at_most: bool = False) -> int:
    """The size `data`'s zstd frame declares, which must be `expected` (or, `at_most`, not
    exceed it); FrameError otherwise, before anything is decompressed."""
    size = zstd_content_size(data)
    if size > expected or (size != expected and not at_most):
        raise FrameError(f"zstd frame declares {size:,} bytes decompressed, "
                         f"{'at most ' if at_most else ''}{expected:,} expected")
    return size


def zstd_decompress(data: bytes | memoryview, expected: int, at_most: bool = False) -> bytearray:
    """Decompress one zstd frame of `expected` bytes into a buffer of the size it declares
    (checked first: never more), verifying the frame's checksum if it has one; writable, so
    arrays over it need no copy."""
    from numcodecs import Zstd

    size = check_zstd(data, expected, at_most)
    out = bytearray(size)
    try:
        Zstd().decode(data, out=out)
    except (RuntimeError, ValueError) as e:  # more bytes than declared, a damaged frame, its checksum
        raise FrameError(f"zstd frame: {str(e)[:120]}") from None
    return out


def blosc_nbytes(data: bytes | memoryview) -> tuple[int, int]:
    """(decompressed, compressed) sizes a blosc 1 frame declares in its 16-byte header."""
    head = bytes(data[:16])
    if len(head) < 16 or head[0] not in (1, 2):
        raise FrameError("not a blosc frame")
    return int.from_bytes(head[4:8], "little"), int.from_bytes(head[12:16], "little")


def check_blosc(data: bytes | memoryview, expected: int) -> None:
    """A blosc frame must declare `expected` bytes decompressed and its own length."""
    nbytes, cbytes = blosc_nbytes(data)
    if nbytes != expected:
        raise FrameError(f"blosc frame declares {nbytes:,} bytes decompressed, {expected:,} expected")
    if cbytes != len(data):
        raise FrameError(f"blosc frame declares {cbytes:,} bytes compressed, holds {len(data):,}")

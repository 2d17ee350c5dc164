"""Seeds derived from what a random choice is about, not from hidden generator state.

Every random choice that must replay (a view's crop, the view an epoch shows, a step's
masks, a fine-tuning sample's augmentation) is drawn from a seed hashed from its parts:
(seed, key, view index), (seed, epoch, key), ("mask", seed, micro-step), ... The same parts
give the same bits in any process, worker or run, so caches and resumed runs replay.

The hash is sha256 of the parts' `str`s joined by NUL bytes; the seed is the little-endian
integer of its first bytes. sha256 rather than Python's `hash`, which is salted per process.
The bytes these functions produce are part of the cache format (a cached view's crop is
drawn from `numpy_rng_from(seed, key, view_index)`): changing them breaks every cache.
"""

from __future__ import annotations

import hashlib

import numpy as np


def seed_from(*parts: object, bits: int = 63) -> int:
    """A `bits`-bit seed from `parts`: the little-endian integer of the first ceil(bits / 8)
    bytes of sha256(b"\\x00".join(str(p).encode() for p in parts)), its top bits cleared.

    bits=63 fits torch.Generator.manual_seed (a non-negative int64); bits=64 takes 8 bytes
    whole; bits=128 the 16 bytes numpy's generators take. 1 <= bits <= 256.
    """
    if not 1 <= bits <= 256:
        raise ValueError(f"bits must be in [1, 256], got {bits}")
    digest = hashlib.sha256("\x00".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:(bits + 7) // 8], "little") & ((1 << bits) - 1)


def generator_from(*parts: object):
    """A CPU torch.Generator seeded with `seed_from(*parts)` (63 bits)."""
    import torch  # (a light import for the callers that only need numbers)

    return torch.Generator().manual_seed(seed_from(*parts))


def numpy_rng_from(*parts: object) -> np.random.Generator:
    """A numpy Generator (PCG64) seeded with `seed_from(*parts, bits=128)`."""
    return np.random.default_rng(seed_from(*parts, bits=128))

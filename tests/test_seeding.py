"""shared/seeding.py reproduces, bit for bit, the four seed formulas it replaced (written
out here as the reference): a cache's views, an epoch's view choice, a step's masks and a
fine-tuning sample's augmentation all replay from stored runs and caches."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from mrmae.shared.seeding import generator_from, numpy_rng_from, seed_from
from mrmae.shared.views import view_rng
from mrmae.train.stream import pick_view
from mrmae.train.engine import mask_generator

CASES = [(0, "k", 0), (7, "n01440764_10026", 3), (2**40 + 1, "dir/ké y", 11), (-3, "", 1)]


@pytest.mark.parametrize("seed,key,index", CASES)
def test_view_rng_is_the_old_formula(seed, key, index):
    digest = hashlib.sha256(f"{seed}\x00{key}\x00{index}".encode()).digest()
    old = np.random.default_rng(int.from_bytes(digest[:16], "little"))
    assert np.array_equal(view_rng(seed, key, index).random(8), old.random(8))
    assert np.array_equal(numpy_rng_from(seed, key, index).integers(0, 2**62, 4),
                          np.random.default_rng(int.from_bytes(digest[:16], "little")).integers(0, 2**62, 4))


@pytest.mark.parametrize("seed,key,epoch", CASES)
def test_pick_view_is_the_old_formula(seed, key, epoch):
    for k in (1, 2, 3, 7):
        digest = hashlib.sha256(f"{seed}\x00{epoch}\x00{key}".encode()).digest()
        assert pick_view(seed, epoch, key, k) == int.from_bytes(digest[:8], "little") % k


@pytest.mark.parametrize("seed,micro", [(0, 0), (0, 1), (5, 123456), (2**33, 7)])
def test_mask_generator_is_the_old_formula(seed, micro):
    digest = hashlib.sha256(f"mask\x00{seed}\x00{micro}".encode()).digest()
    old = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    assert torch.equal(torch.rand(3, 5, generator=mask_generator(seed, micro)), torch.rand(3, 5, generator=old))


@pytest.mark.parametrize("parts", [("finetune-aug", 0, 1, 0, "key"), ("finetune-step", 3, 17, 1), ()])
def test_seed_from_is_the_old_sample_seed(parts):
    digest = hashlib.sha256("\x00".join(map(str, parts)).encode()).digest()
    assert seed_from(*parts) == int.from_bytes(digest[:8], "little") & (2**63 - 1)
    assert generator_from(*parts).initial_seed() == seed_from(*parts)


def test_bits_and_parts_matter():
    assert seed_from(1, 2) != seed_from(2, 1) != seed_from("1\x002")  # order counts; parts joined by NUL
    assert seed_from("1\x002") == seed_from(1, 2)  # (the join is the formula: a key holding NUL collides)
    wide = seed_from("x", bits=128)
    assert seed_from("x", bits=64) == wide & (2**64 - 1) and seed_from("x") == wide & (2**63 - 1)
    assert seed_from("x", bits=1) in (0, 1) and seed_from("x", bits=256).bit_length() <= 256
    for bad in (0, 257):
        with pytest.raises(ValueError, match="bits"):
            seed_from("x", bits=bad)

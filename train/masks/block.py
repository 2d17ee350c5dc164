"""BEiT's block-wise masking: the masked tokens come in rectangles, not scattered.

Scattered masks leave every masked patch a visible neighbour to copy from; rectangles of
hidden patches make the student infer whole parts of the object (BEiT, Bao et al. 2021,
section 2.5). Each row places rectangles of random area (at least `block_min_patches`
tokens) and log-uniform aspect ratio (in [1 / block_max_aspect, block_max_aspect]) at
random positions on the g x g token grid, as long as a rectangle adds at least one new
masked token without passing the row's count; after ten failed tries in a row it stops,
and the count is made exact with the highest-noise tokens outside the blocks (scattered ones).

All rows are placed together: step k tries every still-active row's k-th candidate
rectangle at once (array operations over the batch, not a Python loop over rows).

Randomness: a row's k-th candidate comes from a counter-based hash (splitmix64) of a seed
hashed from the row's own noise, so the mask is a function of that row alone (the
registry's contract, train/masking.py), whatever the batch it sits in.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from mrmae.train.masking import MaskOption, Masks, masks_from_keep, num_visible, register_mask

TRIES = 10  # BEiT's: failed placements in a row before a row stops adding blocks

OPTIONS = (MaskOption("block_min_patches", 16.0, "Block masking: the least tokens a block covers.", low=1.0,
                      label="min"),
           MaskOption("block_max_aspect", 1 / 0.3, "Block masking: aspect ratios in [1/A, A].", low=1.0,
                      label="aspect"))

GOLDEN = np.uint64(0x9E3779B97F4A7C15)  # splitmix64's increment
DRAWS = 4  # uniforms per candidate rectangle: area, aspect, top, left


@register_mask("block", options=OPTIONS)
def draw(noise: torch.Tensor, mask_ratio: float, attention: None = None, block_min_patches: float = 16.0,
         block_max_aspect: float = 1 / 0.3) -> Masks:
    """BEiT's block-wise masking: the masked tokens come in rectangles (module docstring)."""
    batch, n = noise.shape
    g = math.isqrt(n)
    if g * g != n:
        raise ValueError(f"block masking needs a square token grid, got {n} tokens")
    n_keep = num_visible(n, mask_ratio)
    blocks = torch.from_numpy(block_maps(row_seeds(noise), g, n - n_keep, block_min_patches,
                                         block_max_aspect)).reshape(batch, n)
    # Visible: the n_keep lowest-noise tokens outside the blocks (blocks cover at most n - n_keep).
    score = noise.double().cpu() + blocks.double()
    return masks_from_keep(torch.argsort(score, dim=1)[:, :n_keep].to(noise.device), n)


def mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 words (wrapping arithmetic): a bijection whose
    output bits each depend on every input bit."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def row_seeds(noise: torch.Tensor) -> np.ndarray:
    """noise [B, N] in [0, 1) -> uint64 [B]: one seed per row hashed from all of its values
    (torch.rand's float32 values are multiples of 2**-24, so the words hold every bit),
    each word mixed with its position so that permuted rows differ."""
    words = (noise.detach().cpu().double() * 2**24).long().numpy().astype(np.uint64)
    position = np.arange(1, words.shape[1] + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        return mix(mix(words + position * GOLDEN).sum(axis=1, dtype=np.uint64))


def candidate(seeds: np.ndarray, k: int) -> np.ndarray:
    """float64 [B, DRAWS] uniforms in [0, 1): the k-th candidate rectangle's draws for each
    row (the splitmix64 stream of the row's seed at positions k * DRAWS + 1 ...)."""
    counter = np.arange(k * DRAWS + 1, (k + 1) * DRAWS + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        bits = mix(seeds[:, None] + counter * GOLDEN)
    return (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53


def block_maps(seeds: np.ndarray, g: int, to_mask: int, min_patches: float, max_aspect: float) -> np.ndarray:
    """bool [B, g, g]: per row, rectangles covering at most `to_mask` tokens, tried one
    candidate after another until `to_mask` is reached or TRIES tries in a row add nothing
    that fits (each success adds a token, so at most (to_mask + 1) * TRIES steps)."""
    batch = len(seeds)
    grid = np.zeros((batch, g, g), dtype=bool)
    masked = np.zeros(batch, dtype=np.int64)
    fails = np.zeros(batch, dtype=np.int64)
    log_aspect, lines = math.log(max_aspect), np.arange(g)
    k = 0
    while True:
        active = (masked < to_mask) & (fails < TRIES)
        if not active.any():
            return grid
        u = candidate(seeds, k)
        k += 1
        left_over = to_mask - masked
        low = np.minimum(min_patches, left_over)
        area = low + u[:, 0] * (left_over - low)
        aspect = np.exp(log_aspect * (2 * u[:, 1] - 1))
        h = np.round(np.sqrt(area * aspect)).astype(np.int64)  # half to even, as Python's round
        w = np.round(np.sqrt(area / aspect)).astype(np.int64)
        fits = (h >= 1) & (h <= g) & (w >= 1) & (w <= g)
        top = np.floor(u[:, 2] * np.maximum(g - h + 1, 1)).astype(np.int64)
        left = np.floor(u[:, 3] * np.maximum(g - w + 1, 1)).astype(np.int64)
        in_rows = (lines >= top[:, None]) & (lines < (top + h)[:, None])
        in_cols = (lines >= left[:, None]) & (lines < (left + w)[:, None])
        rect = in_rows[:, :, None] & in_cols[:, None, :]
        added = (rect & ~grid).sum(axis=(1, 2))
        accept = active & fits & (added > 0) & (added <= left_over)
        grid |= rect & accept[:, None, None]
        masked += np.where(accept, added, 0)
        fails = np.where(accept, 0, fails + active)

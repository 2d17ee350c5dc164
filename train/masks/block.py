"""BEiT's block-wise masking: the masked tokens come in rectangles, not scattered.

Scattered masks leave every masked patch a visible neighbour to copy from; rectangles of
hidden patches make the student infer whole parts of the object (BEiT, Bao et al. 2021,
section 2.5). Each row places rectangles of random area (at least `block_min_patches`
tokens) and log-uniform aspect ratio (in [1 / block_max_aspect, block_max_aspect]) at
random positions on the g x g token grid, as long as a rectangle adds at least one new
masked token without passing the row's count; after ten failed tries it stops, and the
count is made exact with the highest-noise tokens outside the blocks (scattered ones).

Randomness: a row's blocks are drawn from a numpy generator seeded with its own noise row,
so the mask is a function of that row alone (the registry's contract, train/masking.py).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from mrmae.train.masking import MaskOption, Masks, masks_from_keep, num_visible, register_mask

TRIES = 10  # BEiT's: placements tried before a row stops adding blocks

OPTIONS = (MaskOption("block_min_patches", 16.0, "Block masking: the least tokens a block covers.", low=1.0,
                      label="min"),
           MaskOption("block_max_aspect", 1 / 0.3, "Block masking: aspect ratios in [1/A, A].", low=1.0,
                      label="aspect"))


@register_mask("block", options=OPTIONS)
def draw(noise: torch.Tensor, mask_ratio: float, attention: None = None, block_min_patches: float = 16.0,
         block_max_aspect: float = 1 / 0.3) -> Masks:
    """BEiT's block-wise masking: the masked tokens come in rectangles (module docstring)."""
    batch, n = noise.shape
    g = math.isqrt(n)
    if g * g != n:
        raise ValueError(f"block masking needs a square token grid, got {n} tokens")
    n_keep = num_visible(n, mask_ratio)
    blocks = torch.stack([torch.from_numpy(block_map(row_rng(noise[i]), g, n - n_keep, block_min_patches,
                                                     block_max_aspect)).reshape(n) for i in range(batch)])
    # Visible: the n_keep lowest-noise tokens outside the blocks (blocks cover at most n - n_keep).
    score = noise.double().cpu() + blocks.double()
    return masks_from_keep(torch.argsort(score, dim=1)[:, :n_keep].to(noise.device), n)


def row_rng(noise_row: torch.Tensor) -> np.random.Generator:
    """A generator seeded with one row's noise [N] in [0, 1), scaled to integers (torch.rand's
    float32 values are multiples of 2**-24, so the words hold every bit of the row)."""
    words = (noise_row.detach().cpu().double() * 2**24).long().numpy().astype(np.uint64)
    return np.random.default_rng(words)


def block_map(rng: np.random.Generator, g: int, to_mask: int, min_patches: float, max_aspect: float) -> np.ndarray:
    """bool [g, g]: rectangles covering at most `to_mask` tokens, placed one after another
    until `to_mask` is reached or TRIES placements in a row add nothing that fits."""
    grid = np.zeros((g, g), dtype=bool)
    masked, log_aspect = 0, math.log(max_aspect)
    while masked < to_mask:
        left_over, added = to_mask - masked, 0
        for _ in range(TRIES):
            area = rng.uniform(min(min_patches, left_over), left_over)
            aspect = math.exp(rng.uniform(-log_aspect, log_aspect))
            h, w = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if not (1 <= h <= g and 1 <= w <= g):
                continue
            top, left = rng.integers(0, g - h + 1), rng.integers(0, g - w + 1)
            window = grid[top:top + h, left:left + w]
            added = h * w - int(window.sum())
            if 0 < added <= left_over:
                window[...] = True
                masked += added
                break
            added = 0
        if added == 0:
            break
    return grid

"""Which patch tokens the student encoder sees: uniform (MAE) and attention-focused masking.

Every function returns the same triple, on the device of its inputs:

    ids_keep     [B, n_keep] long   indices of the visible tokens, sorted ascending per row
    mask         [B, N]      bool   True = masked (hidden from the encoder), False = visible
    ids_restore  [B, N]      long   unshuffle index: a sequence laid out as
                                    cat(visible tokens in ids_keep order, masked tokens in
                                    ascending index order) is put back into patch order by
                                    seq.gather(1, ids_restore) (what the decoder does)

n_keep = int(N * (1 - mask_ratio)) (MAE's rule: ratio 0.75 keeps 49 of 196), computed
with a 1e-9 guard against float round-off (1 - 0.7 = 0.30000000000000004 is fine, but
10 * (1 - 0.9) = 0.9999999999999998 would give 0). Masking is drawn outside the model so
that the same masks can be replayed in cached, live and plain modes.

Hybrid (ConvViT) students draw the same token mask; `blockwise_visible_maps` blows it up
to the higher-resolution grids of their convolution stages.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

Masks = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def num_visible(num_tokens: int, mask_ratio: float) -> int:
    """Number of visible tokens for `mask_ratio` in [0, 1); at least 1."""
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    return max(1, int(num_tokens * (1.0 - mask_ratio) + 1e-9))


def masks_from_keep(ids_keep: torch.Tensor, num_tokens: int) -> Masks:
    """Visible indices ids_keep [B, n_keep] (any order, no duplicates) -> the triple.

    The returned ids_keep is sorted ascending; the masked tokens follow in ascending order
    in the shuffled layout that ids_restore undoes.
    """
    if ids_keep.ndim != 2:
        raise ValueError(f"ids_keep must be [B, n_keep], got {tuple(ids_keep.shape)}")
    batch, n_keep = ids_keep.shape
    mask = torch.ones(batch, num_tokens, dtype=torch.bool, device=ids_keep.device)
    mask.scatter_(1, ids_keep.long(), False)
    if int((~mask).sum()) != batch * n_keep:
        raise ValueError("ids_keep has duplicate indices in a row")
    # Stable sort of 0 (visible) before 1 (masked) keeps ascending index order in each group.
    ids_shuffle = torch.sort(mask.to(torch.uint8), dim=1, stable=True).indices
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    return ids_shuffle[:, :n_keep].contiguous(), mask, ids_restore


def random_masking(batch: int, num_tokens: int, mask_ratio: float,
                   generator: torch.Generator | None = None,
                   device: torch.device | str | None = None, noise: torch.Tensor | None = None) -> Masks:
    """MAE uniform masking: each row keeps a uniformly random n_keep-subset of N tokens.

    The subset is the n_keep smallest of uniform `noise` [B, N] (drawn from `generator`,
    which must live on `device`, when not given). Passing each row's slice of one global
    noise tensor makes a row's mask independent of how a batch is split over processes.
    Returns (ids_keep [B, n_keep], mask [B, N], ids_restore [B, N]) (module docstring).
    """
    n_keep = num_visible(num_tokens, mask_ratio)
    if noise is None:
        noise = torch.rand(batch, num_tokens, generator=generator, device=device)
    ids_keep = torch.argsort(noise, dim=1)[:, :n_keep]
    return masks_from_keep(ids_keep, num_tokens)


def focus_weights(attention: torch.Tensor, temperature: float = 1.0, uniform_mix: float = 0.0,
                  eps: float = 1e-6) -> torch.Tensor:
    """Sampling weights [B, N] (rows sum to 1, float64) from teacher attention [B, N].

    w = (1 - uniform_mix) * softmax(log(attention + eps) / temperature) + uniform_mix / N,
    i.e. attention ** (1 / T) normalised per row, mixed with the uniform distribution.
    Negative attention is clipped to 0; weights are floored at 1e-30 so that every token
    stays drawable (torch.multinomial needs n_keep non-zero weights).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0.0 <= uniform_mix <= 1.0:
        raise ValueError(f"uniform_mix must be in [0, 1], got {uniform_mix}")
    logits = torch.log(attention.double().clamp_min(0.0) + eps) / temperature
    w = (1.0 - uniform_mix) * torch.softmax(logits, dim=-1) + uniform_mix / attention.shape[-1]
    return w.clamp_min(1e-30)


def focused_masking(attention: torch.Tensor, mask_ratio: float, temperature: float = 1.0,
                    uniform_mix: float = 0.0, generator: torch.Generator | None = None,
                    noise: torch.Tensor | None = None) -> Masks:
    """Focused mimicking: visible tokens drawn by the teacher's [CLS]->patch attention.

    attention [B, N] float (non-negative). Each row's n_keep visible tokens are drawn by
    multinomial sampling without replacement with `focus_weights` (salient tokens are
    visible more often; this is not a fixed top-k). The draw uses the Gumbel-top-k form
    of that sampling (the n_keep largest of log w + Gumbel noise have exactly the law of
    successive draws without replacement), so, as in `random_masking`, it is a function of
    uniform `noise` [B, N] (drawn from `generator`, on attention's device, when not given).
    Returns (ids_keep [B, n_keep], mask [B, N], ids_restore [B, N]).
    """
    if attention.ndim != 2:
        raise ValueError(f"attention must be [B, N], got {tuple(attention.shape)}")
    n_keep = num_visible(attention.shape[1], mask_ratio)
    weights = focus_weights(attention, temperature, uniform_mix)
    if noise is None:
        noise = torch.rand(attention.shape, generator=generator, device=attention.device)
    u = noise.double().clamp(1e-12, 1.0 - 1e-12)
    gumbel = -torch.log(-torch.log(u))
    ids_keep = torch.topk(weights.log() + gumbel, n_keep, dim=1).indices
    return masks_from_keep(ids_keep, attention.shape[1])


def blockwise_visible_maps(mask: torch.Tensor, scales: Sequence[int] = (4, 2)) -> tuple[torch.Tensor, ...]:
    """Block-wise multi-scale masking (ConvMAE): one token mask at every stage resolution.

    mask [B, N] bool (True = masked) on a square g x g token grid (N = g * g, row-major as
    in patchify) -> for each scale s in `scales`, a visible map [B, 1, g*s, g*s] float32
    (1 = visible, 0 = masked) in which token (r, c) covers exactly the s x s block of rows
    r*s .. r*s+s-1 and columns c*s .. c*s+s-1. The default (4, 2) gives the 56x56 and 28x28
    maps of a 224-px ConvViT's stages 1 and 2 (scale 16 gives the pixel map). Every stage
    thus hides the same image region, which keeps the visible fraction 1 - N_masked / N at
    every scale, and a block never straddles a visible and a masked token.
    """
    if mask.ndim != 2:
        raise ValueError(f"mask must be [B, N], got {tuple(mask.shape)}")
    b, n = mask.shape
    g = math.isqrt(n)
    if g * g != n:
        raise ValueError(f"{n} tokens do not form a square grid")
    visible = (~mask.bool()).float().reshape(b, 1, g, g)
    return tuple(visible.repeat_interleave(s, dim=2).repeat_interleave(s, dim=3) for s in scales)

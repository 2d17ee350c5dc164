"""MAE's uniform masking: every token equally likely to stay visible."""

from __future__ import annotations

import torch

from mrmae.train.masking import Masks, masks_from_keep, num_visible, register_mask


@register_mask("random")
def draw(noise: torch.Tensor, mask_ratio: float, attention: None = None) -> Masks:
    """MAE's uniform masking: each row keeps a uniformly random subset of its tokens."""
    return random_masking(noise.shape[0], noise.shape[1], mask_ratio, noise=noise)


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

"""Focused mimicking's masking: the teacher's salient tokens stay visible more often."""

from __future__ import annotations

import torch

from mrmae.train.masking import MaskOption, Masks, masks_from_keep, num_visible, register_mask

OPTIONS = (MaskOption("focus_temperature", 1.0, "Focused masking: attention ** (1/T).", low=0.0, low_open=True,
                      label="T", flag="--focus-temperature"),
           MaskOption("focus_uniform_mix", 0.0, "Focused masking: share of uniform weight.", low=0.0, high=1.0,
                      label="mix", flag="--focus-uniform-mix"))


@register_mask("focused", needs_attention=True, options=OPTIONS)
def draw(noise: torch.Tensor, mask_ratio: float, attention: torch.Tensor, focus_temperature: float = 1.0,
         focus_uniform_mix: float = 0.0) -> Masks:
    """Visible tokens drawn by the teacher's [CLS] attention (needs a cache or live teacher)."""
    return focused_masking(attention, mask_ratio, focus_temperature, focus_uniform_mix, noise=noise)


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

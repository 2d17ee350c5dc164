"""The MR-MAE student registry: build a student by name (`create_model`), its config
(`model_config`), the names (`students.registry.student_names`) and `describe_models`. The families live in
`mrmae.train.students` (one file each: `vit.py`, the MAE ViT; `convvit.py`, the hybrid
ConvViT), all on `MaskedStudent` (`mrmae.train.student`).

Shapes: B images, N = (img_size / patch_size) ** 2 patch tokens, n = n_keep visible
tokens, D encoder width, C teacher width, P = patch_size ** 2 * 3 pixel values per patch
(ordered row, column, channel inside a patch). Masks come from `mrmae.train.masking`.
"""

from __future__ import annotations

from dataclasses import fields, replace
from typing import Any

import torch

from mrmae.train.student import MaskedStudent
from mrmae.train.students.registry import family_of, student_names


# --- registry ----------------------------------------------------------------------------

# The papers list "88M" for every base-size encoder (ViT-B, ConvViT-B, Swin-B alike).
PAPER_BASE_PARAMS = 88e6


def model_config(name: str, **overrides) -> Any:
    """The registry config of `name` (its family's config class: MRMAEConfig, ConvViTConfig, ...)
    with `overrides` applied; KeyError for an unknown name, TypeError for an unknown field."""
    if name not in student_names():
        raise KeyError(f"unknown model {name!r}; known: {', '.join(student_names())}")
    family = family_of(name)
    known = {f.name for f in fields(family.config)}
    if bad := set(overrides) - known:
        raise TypeError(f"unknown {family.config.__name__} fields: {sorted(bad)}")
    return replace(family.config(**family.archs[name]), **overrides)


def create_model(name: str, **overrides) -> MaskedStudent:
    """Build a registry model, e.g. create_model("mrmae_convvit_base", teacher_dim=768)."""
    cfg = model_config(name, **overrides)  # KeyError for unknown names
    return family_of(name).student(cfg)


def describe_models() -> list[str]:
    """A line on how parameters are counted, then one line per registry model (built on the
    meta device: cheap) with its encoder size and its size with the default decoder."""
    rows = [f"params: encoder = what computes the latent (no mimic head, no decoder, fixed sin-cos "
            f"pos-embeds excluded); the papers list {PAPER_BASE_PARAMS / 1e6:.0f}M for base-size encoders"]
    for name in student_names():
        with torch.device("meta"):
            m = create_model(name)
        family, enc = family_of(name), m.encoder_num_params()
        total = sum(p.numel() for p in m.parameters())
        arch, extra = family.describe(m), family.params_note(m)
        rows.append(f"{name}: {arch}; encoder {enc / 1e6:.1f}M{extra} (+{m.pos_embed.numel() / 1e6:.2f}M fixed "
                    f"pos-embed); with decoder 512-d x 8: {total / 1e6:.1f}M")
    return rows

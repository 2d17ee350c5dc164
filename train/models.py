"""The MR-MAE student registry: build a student by name (`create_model`), its config
(`model_config`), the names (`list_models`) and `describe_models`. The families live in
`mrmae.train.students` (one file each: `vit.py`, the MAE ViT; `convvit.py`, the hybrid
ConvViT), all on `MaskedStudent` (`mrmae.train.student`); the names below are re-exported
for code written against this module.

Shapes: B images, N = (img_size / patch_size) ** 2 patch tokens, n = n_keep visible
tokens, D encoder width, C teacher width, P = patch_size ** 2 * 3 pixel values per patch
(ordered row, column, channel inside a patch). Masks come from `mrmae.train.masking`.
"""

from __future__ import annotations

from dataclasses import fields, replace
from typing import Any, Callable

import torch

from mrmae.train.students import family_of, student_names
from mrmae.train.student import MaskedStudent, check_fuse_layers, gather_visible, sincos_pos_embed  # noqa: F401
from mrmae.train.students.convvit import ConvViTConfig, MRConvViT  # noqa: F401
from mrmae.train.students.vit import MRMAE, MRMAEConfig  # noqa: F401


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


def list_models() -> list[str]:
    return student_names()


def _factory(name: str) -> Callable[..., MaskedStudent]:
    def make(**overrides) -> MaskedStudent:
        return create_model(name, **overrides)

    make.__name__ = make.__qualname__ = name
    make.__doc__ = f"{name} (see `describe_models`; decoder 512-d, 8 blocks unless overridden)."
    return make


# mrmae.train.models.mrmae_vit_base_patch16(teacher_dim=768), ...: one builder per registered name
globals().update({_name: _factory(_name) for _name in student_names()})


def encoder_num_params(model: MaskedStudent) -> int:
    """Learnable encoder parameters: everything that computes the latent, i.e. no mimic head and
    no decoder; fixed sin-cos pos-embeds excluded. ViT: patch embed, cls token, blocks, norm.
    ConvViT: stage embeds, conv blocks, token projection, blocks, norm and the stage-1/2 fusion
    convs (which only exist for pre-training; `MRConvViT.backbone_num_params` leaves them out).
    """
    return model.encoder_num_params()


def describe_models() -> list[str]:
    """A line on how parameters are counted, then one line per registry model (built on the
    meta device: cheap) with its encoder size and its size with the default decoder."""
    rows = [f"params: encoder = what computes the latent (no mimic head, no decoder, fixed sin-cos "
            f"pos-embeds excluded); the papers list {PAPER_BASE_PARAMS / 1e6:.0f}M for base-size encoders"]
    for name in list_models():
        with torch.device("meta"):
            m = create_model(name)
        family, enc = family_of(name), encoder_num_params(m)
        total = sum(p.numel() for p in m.parameters())
        arch, extra = family.describe(m), family.params_note(m)
        rows.append(f"{name}: {arch}; encoder {enc / 1e6:.1f}M{extra} (+{m.pos_embed.numel() / 1e6:.2f}M fixed "
                    f"pos-embed); with decoder 512-d x 8: {total / 1e6:.1f}M")
    return rows

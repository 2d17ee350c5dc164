"""A tiny MR-MAE student saved as a pretrain run would save it (checkpoint + config.json)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mrmae.train.run.checkpoint import TrainState, save_checkpoint
from mrmae.train.students.vit import MRMAE
from mrmae.train.models import create_model

NAME = "mrmae_vit_tiny_patch16"


def save_tiny_student(out: Path, fuse_layers: tuple[int, ...] = (), seed: int = 0) -> MRMAE:
    """Build the tiny student with every weight perturbed away from its init (so that a
    wrong or missing tensor changes the output), save it under out/checkpoints, write
    out/config.json as `mrmae pretrain` does; returns the model in eval mode."""
    torch.manual_seed(seed)
    model = create_model(NAME, teacher_dim=192, decoder_embed_dim=64, decoder_depth=1, fuse_layers=fuse_layers)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    save_checkpoint(out, model, torch.optim.AdamW(model.parameters()), TrainState(epoch=1, step=1))
    (out / "config.json").write_text(json.dumps({"model": NAME, "fuse_layers": list(fuse_layers),
                                                 "step_options": {"mask": "random", "mask_ratio": 0.75}}))
    return model.eval()


def save_tiny_convvit(out: Path, fuse_layers: tuple[int, ...] = (), img_size: int = 224, seed: int = 0):
    """The tiny ConvViT student (at `img_size` px, with `fuse_layers`), every weight perturbed
    away from its init, saved and described as `mrmae pretrain` does; returns it in eval mode."""
    torch.manual_seed(seed)
    model = create_model("mrmae_convvit_tiny", img_size=img_size, teacher_dim=192, decoder_embed_dim=64,
                         decoder_depth=1, fuse_layers=fuse_layers)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    save_checkpoint(out, model, torch.optim.AdamW(model.parameters()), TrainState(epoch=1, step=1))
    (out / "config.json").write_text(json.dumps({"model": "mrmae_convvit_tiny", "fuse_layers": list(fuse_layers),
                                                 "model_config": {"conv_norm_eps": model.cfg.conv_norm_eps}}))
    return model.eval()

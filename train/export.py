"""`mrmae export`: the student's encoder as a timm VisionTransformer state dict (safetensors).

The encoder is a ViT that timm's `VisionTransformer` computes exactly: timm pre-norm
`Block`s, a conv `PatchEmbed`, a class token, a final LayerNorm (eps 1e-6). MR-MAE's fixed
sin-cos position embedding (cls slot zero) is written as the ordinary learnable
`pos_embed` tensor [1, 1+N, D], which timm adds to cat(cls, patches) just as the student
does. The decoder, mask token and mimic head are dropped.

The exported model has no head (`num_classes=0`) and `global_pool='token'`: timm's
`forward_head` then returns the [CLS] token after the final norm, the feature MAE's linear
probe reads. (`'avg'` would make timm add an `fc_norm` the student never trained.)
`forward_features` returns all normed tokens [B, 1+N, D], equal to the student's encoder
with every patch visible.

Load it with:

    timm.create_model(NAME, pretrained=True, num_classes=0, **KWARGS,
                      pretrained_cfg_overlay=dict(file=PATH, num_classes=0))

(`num_classes=0` in the overlay too: otherwise timm assumes a 1000-class head was dropped
and loads non-strictly.) NAME and KWARGS are printed and stored in the file's metadata
(`timm_model`, `timm_kwargs` as JSON).

Students trained with `--fuse-layers` (final norm applied to a sum of several blocks'
outputs) are refused: timm's VisionTransformer cannot express that sum. So are students
that are not plain ViTs (the ConvViT).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save as safetensors_bytes

from mrmae.train.checkpoint import write_atomic
from mrmae.train.models import MRMAE
from mrmae.train.restore import load_student

# timm's registered ViT of the same width, depth and heads (huge: timm's is patch 14; the
# kwargs below set the patch size explicitly, so any name whose defaults we override works).
_TIMM_NAMES = {
    (192, 12, 3): "vit_tiny_patch16_224",
    (384, 12, 6): "vit_small_patch16_224",
    (768, 12, 12): "vit_base_patch16_224",
    (1024, 24, 16): "vit_large_patch16_224",
    (1280, 32, 16): "vit_huge_patch14_224",
}


class ExportError(ValueError):
    """A student that timm's VisionTransformer cannot represent."""


@dataclass
class Exported:
    path: Path
    timm_model: str
    timm_kwargs: dict
    num_tensors: int

    def create_call(self) -> str:
        """The timm.create_model call that loads the file (strictly), as Python source."""
        kw = "".join(f", {k}={v!r}" for k, v in self.timm_kwargs.items())
        return (f"timm.create_model({self.timm_model!r}, pretrained=True{kw}, "
                f"pretrained_cfg_overlay=dict(file={str(self.path)!r}, num_classes=0))")


def timm_spec(model: torch.nn.Module) -> tuple[str, dict]:
    """(timm model name, create_model kwargs) building a VisionTransformer like `model`'s encoder."""
    if not isinstance(model, MRMAE):
        raise ExportError(f"only ViT students export to timm's VisionTransformer, not {type(model).__name__}")
    c = model.cfg
    if len(model.fuse_layers) > 1 or model.fuse_layers[0] != c.depth:
        raise ExportError(f"this student fuses blocks {','.join(map(str, model.fuse_layers))} (--fuse-layers): "
                          "timm's VisionTransformer has no such sum; evaluate it with `mrmae eval` instead")
    name = _TIMM_NAMES.get((c.embed_dim, c.depth, c.num_heads), "vit_base_patch16_224")
    kwargs = dict(img_size=c.img_size, patch_size=c.patch_size, embed_dim=c.embed_dim, depth=c.depth,
                  num_heads=c.num_heads, mlp_ratio=c.mlp_ratio, qkv_bias=True, class_token=True,
                  global_pool="token", num_classes=0)
    return name, kwargs


def encoder_state_dict(model: MRMAE) -> dict[str, torch.Tensor]:
    """The encoder's tensors under timm VisionTransformer names (keys match one to one:
    both use timm's PatchEmbed and Block; pos_embed [1, 1+N, D] includes the cls slot)."""
    keep = ("patch_embed.", "blocks.", "norm.")
    out = {k: v for k, v in model.state_dict().items() if k.startswith(keep)}
    out["cls_token"] = model.cls_token.detach()
    out["pos_embed"] = model.pos_embed.detach()
    return {k: v.detach().float().cpu().contiguous() for k, v in out.items()}


def export_encoder(checkpoint: str | Path, out: str | Path) -> Exported:
    """Write the student's encoder of `checkpoint` to `out` (safetensors, timm names)."""
    restored = load_student(checkpoint)
    name, kwargs = timm_spec(restored.model)
    tensors = encoder_state_dict(restored.model)
    out = Path(out)
    if out.resolve().parent == restored.weights.resolve().parent:  # e.g. --out .../stepN/model.safetensors
        raise ExportError(f"--out {out}: inside the checkpoint {restored.weights.parent}, whose files it would "
                          "replace; write the encoder elsewhere")
    out.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "pt", "timm_model": name, "timm_kwargs": json.dumps(kwargs),
                "source_checkpoint": str(restored.weights), "mrmae_model": restored.run_config.get("model", "")}
    write_atomic(out, safetensors_bytes(tensors, metadata=metadata))  # a full disk: an OSError naming `out`
    return Exported(out, name, kwargs, len(tensors))

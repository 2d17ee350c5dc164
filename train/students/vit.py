"""Student family `vit`: a MAE ViT (timm blocks) with a linear feature-mimic head, and its
encoder as timm's own VisionTransformer (`mrmae_vit_*_patch16`).

Shapes: B images, N = (img_size / patch_size) ** 2 patch tokens, n = n_keep visible
tokens, D encoder width, C teacher width, P = patch_size ** 2 * 3 pixel values per patch
(ordered row, column, channel inside a patch). Masks come from `mrmae.train.masking`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn as nn
from timm.layers import PatchEmbed
from timm.models import build_model_with_cfg
from timm.models.vision_transformer import Block, VisionTransformer, checkpoint_filter_fn

from mrmae.train.student import MaskedStudent, StudentConfig, gather_visible, sincos_pos_embed
from mrmae.train.students.registry import StudentFamily, register_family

VIT_ARCHS: dict[str, dict] = {
    "mrmae_vit_tiny_patch16": dict(embed_dim=192, depth=12, num_heads=3),
    "mrmae_vit_small_patch16": dict(embed_dim=384, depth=12, num_heads=6),
    "mrmae_vit_base_patch16": dict(embed_dim=768, depth=12, num_heads=12),
    "mrmae_vit_large_patch16": dict(embed_dim=1024, depth=24, num_heads=16),
    "mrmae_vit_huge_patch16": dict(embed_dim=1280, depth=32, num_heads=16),  # MAE's huge uses patch 14
}


@dataclass(frozen=True, kw_only=True)
class MRMAEConfig(StudentConfig):
    """A ViT student: the shared fields (`StudentConfig`) and the ViT's sizes."""

    patch_size: int = 16
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0


class MRMAE(MaskedStudent):
    """MAE ViT encoder/decoder plus a linear mimic head on the encoder's visible tokens.

    Norms: every timm Block is pre-norm and its output is un-normed. The encoder output is
    S = sum of the outputs (cls and visible tokens) of the blocks in `fuse_layers` (only
    the last block when empty), and S passes the encoder's final LayerNorm `norm` once:
    latent = norm(S) [B, 1+n, D]. latent feeds the decoder; latent[:, 1:] feeds the mimic
    head (one nn.Linear D -> C, no norm of its own). The decoder ends with `decoder_norm`
    before the pixel predictor. Position embeddings are fixed sin-cos buffers (cls slot 0).
    """

    num_prefix_tokens = 1

    def __init__(self, cfg: MRMAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.embed_dim
        self.patch_embed = PatchEmbed(cfg.img_size, cfg.patch_size, 3, d)
        grid, n = self.patch_embed.grid_size[0], self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.register_buffer("pos_embed", sincos_pos_embed(d, grid).unsqueeze(0))
        block = partial(Block, mlp_ratio=cfg.mlp_ratio, qkv_bias=True, norm_layer=cfg.norm_layer)
        self.blocks = nn.ModuleList(block(d, cfg.num_heads) for _ in range(cfg.depth))
        self.norm = cfg.norm_layer(d)
        self.fuse_layers = cfg.fuse_layers or (cfg.depth,)
        self._build_heads(d, cfg.mlp_ratio)
        assert self.pos_embed.shape[1] == n + 1 and n == self.num_patches
        self._init_weights()

    def _init_weights(self) -> None:
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def no_weight_decay(self) -> set[str]:
        """Names exempt from weight decay (the pos-embeds are buffers, listed for safety)."""
        return {"pos_embed", "cls_token", "mask_token", "decoder_pos_embed"}

    def encoder_modules(self) -> list[nn.Module | nn.Parameter]:
        """Patch embed, cls token, blocks, final norm (the pos-embed is a fixed buffer)."""
        return [self.patch_embed, self.cls_token, self.blocks, self.norm]

    def forward_encoder(self, imgs: torch.Tensor, ids_keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """imgs [B, 3, H, W], ids_keep [B, n] -> (latent [B, 1+n, D], visible [B, n, D]).

        Only the cls token and the n visible patch tokens enter the blocks. latent is the
        normed fused sequence (see the class docstring); visible = latent[:, 1:].
        """
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:]
        x = gather_visible(x, ids_keep)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        fused = None
        for i, blk in enumerate(self.blocks, start=1):
            x = blk(x)
            if i in self.fuse_layers:
                fused = x if fused is None else fused + x
        latent = self.norm(fused)
        return latent, latent[:, 1:]


@register_family
class ViTFamily(StudentFamily):
    """The ViT student; its encoder is timm's VisionTransformer ([CLS] token, learnable-shaped
    pos-embed [1, 1+N, D] holding the student's sin-cos values, `global_pool='token'`)."""

    name = "vit"
    rank = 0
    archs = {n: dict(patch_size=16, **a) for n, a in VIT_ARCHS.items()}
    config, student = MRMAEConfig, MRMAE
    first_conv = "patch_embed.proj"
    encoder_keys = ("patch_embed.", "blocks.", "norm.", "cls_token", "pos_embed")
    cls_token = True
    tiny = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
    # timm's own ViTs that earlier exports named
    old_encoder_names = ("vit_tiny_patch16_224", "vit_small_patch16_224", "vit_base_patch16_224",
                         "vit_large_patch16_224", "vit_huge_patch14_224")

    def stock_name(self, name: str) -> str:
        # timm's ViT of the same sizes (the huge one has patch 14 there: exports pass patch_size=16)
        return dict(zip(VIT_ARCHS, self.old_encoder_names)).get(name, name)

    def encoder_defaults(self, name: str) -> dict:
        return dict(img_size=224, patch_size=16, mlp_ratio=4.0, qkv_bias=True, class_token=True, global_pool="token",
                    **VIT_ARCHS[name])

    def build_encoder(self, name: str, pretrained: bool, **kwargs) -> VisionTransformer:
        args = {k: v for k, v in self.encoder_defaults(name).items() if k != "img_size"}  # the cfg's input_size
        return build_model_with_cfg(VisionTransformer, name, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                                    feature_cfg=dict(out_indices=3, feature_cls="getter"), **{**args, **kwargs})

    def encoder_kwargs(self, c: MRMAEConfig) -> dict:
        return dict(img_size=c.img_size, patch_size=c.patch_size, embed_dim=c.embed_dim, depth=c.depth,
                    num_heads=c.num_heads, mlp_ratio=c.mlp_ratio)

    def restore_overrides(self, state: dict) -> dict:
        # a ViT's own sizes are all in its shapes
        patch = state["patch_embed.proj.weight"].shape[-1]
        depth = 1 + max((int(k.split(".")[1]) for k in state if k.startswith("blocks.")), default=-1)
        return dict(embed_dim=state["cls_token"].shape[-1], depth=depth, patch_size=patch,
                    img_size=math.isqrt(state["pos_embed"].shape[1] - 1) * patch)

    def describe(self, model: MRMAE) -> str:
        c = model.cfg
        return f"ViT {c.embed_dim}-d, {c.depth} blocks, {c.num_heads} heads"

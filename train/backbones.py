"""The students' encoders as timm models: what `mrmae export` writes, `finetune` trains and `eval` probes.

Registered with timm when `mrmae` is imported (`mrmae/__init__.py`), so after `import mrmae`

    timm.create_model("mrmae_convvit_base", pretrained=True, pretrained_cfg_overlay=dict(file=PATH))

builds the encoder and loads an `mrmae export` file strictly. Names match the student
registry (`mrmae.train.models`); here they are the encoders alone, without decoder, mimic
head or fusion:

- `mrmae_vit_{tiny,small,base,large,huge}_patch16`: timm's own VisionTransformer ([CLS]
  token, learnable-shaped pos-embed [1, 1+N, D] holding the student's sin-cos values,
  `global_pool='token'`).
- `mrmae_convvit_{tiny,small,base,large,huge}`: `ConvViT` below, the ConvMAE hybrid: two
  convolution stages, then transformer blocks on the 16x16-patch grid, no [CLS] token.

Their pretrained configs carry the preprocessing the students trained and are evaluated
with (ImageNet mean and std, bicubic, MAE's eval crop 224 of 256, i.e. crop_pct 0.875),
so `timm.data.resolve_data_config({}, model=m)` returns it. `num_classes` defaults to 0
(a backbone, which is what an export holds); pass `num_classes=N` for a new head.

This module imports no other mrmae module: it runs from inside `import timm` (see
`mrmae/__init__.py`), when the student modules may be half-imported. The students build
their conv stages from the blocks defined here.
"""

from __future__ import annotations

from functools import partial
from typing import Iterable

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, LayerNorm2d, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models.vision_transformer import Block, VisionTransformer, checkpoint_filter_fn

# ---- the ConvViT's building blocks (shared with the pretraining student, train/convvit.py) ----


class StridedEmbed(nn.Module):
    """Non-overlapping k x k conv with stride k, LayerNorm over channels, GELU.

    [B, Cin, H, W] -> [B, Cout, H/k, W/k]. Each output cell sees exactly one k x k input block.
    """

    def __init__(self, in_dim: int, out_dim: int, k: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_dim, out_dim, k, stride=k)
        self.norm = LayerNorm2d(out_dim, eps=1e-6)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.proj(x)))


class MaskedConvBlock(nn.Module):
    """A transformer-style block with a (masked) depth-wise conv in place of attention.

    forward(x [B, C, H, W], visible [B, 1, H, W] float or None) -> [B, C, H, W]:
        x = x + drop_path(pw2(dwconv(visible * pw1(LN(x)))))   pw = 1x1 conv, dwconv = k x k depth-wise
        x = x + drop_path(mlp(LN(x)))                          mlp = 1x1 conv, GELU, 1x1 conv
    The depth-wise conv is the block's only spatial op; zeroing its input at masked
    positions means a visible output reads visible inputs only. visible=None (fine-tuning,
    evaluation): nothing is masked.
    """

    def __init__(self, dim: int, mlp_ratio: float, kernel_size: int = 5, drop_path: float = 0.0) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = LayerNorm2d(dim, eps=1e-6)
        self.pw1 = nn.Conv2d(dim, dim, 1)
        self.dwconv = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.pw2 = nn.Conv2d(dim, dim, 1)
        self.norm2 = LayerNorm2d(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Conv2d(dim, hidden, 1), nn.GELU(), nn.Conv2d(hidden, dim, 1))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, visible: torch.Tensor | None = None) -> torch.Tensor:
        h = self.pw1(self.norm1(x))
        if visible is not None:
            h = h * visible.to(h.dtype)
        x = x + self.drop_path(self.pw2(self.dwconv(h)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


# ---- the ConvViT encoder / classifier -------------------------------------------------------


class ConvViT(nn.Module):
    """ConvMAE's hybrid encoder with timm's model interface (the fine-tuning and export model).

    Shapes: B images of S x S pixels, g = S / 16, N = g * g tokens, widths D1, D2, D.

        x [B, 3, S, S] -> embed1 (4x4, stride 4) + stage1 conv blocks -> [B, D1, 4g, 4g]   stride 4
                       -> embed2 (2x2, stride 2) + stage2 conv blocks -> [B, D2, 2g, 2g]   stride 8
                       -> embed3 (2x2, stride 2) -> tokens [B, N, D], token_proj, + pos_embed
                       -> transformer blocks -> norm                  -> [B, N, D]         stride 16
        forward_head: mean over the N tokens -> fc_norm -> head        -> [B, num_classes]

    This is the pretraining student's backbone with every patch visible: the same module
    names and weights, without its fusion convs and its `--fuse-layers` sum (pretraining
    devices), so the encoder output is the last block's, then the final norm.
    `fc_norm=True` (fine-tuning, as MAE and ConvMAE do) replaces `norm` by a new LayerNorm
    after pooling; the default keeps `norm`, which is what an export holds.
    """

    def __init__(self, img_size: int | tuple[int, int] = 224, embed_dims: Iterable[int] = (256, 384, 768),
                 depths: Iterable[int] = (2, 2, 11), num_heads: int = 12,
                 mlp_ratios: Iterable[float] = (4.0, 4.0, 4.0), kernel_size: int = 5, num_classes: int = 1000,
                 global_pool: str = "avg", fc_norm: bool = False, drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, in_chans: int = 3) -> None:
        super().__init__()
        (d1, d2, d), (l1, l2, l3), (r1, r2, r3) = tuple(embed_dims), tuple(depths), tuple(mlp_ratios)
        if not isinstance(img_size, int):  # timm passes its pretrained config's (H, W)
            if len(set(img_size)) != 1:
                raise ValueError(f"ConvViT takes square images, got img_size {tuple(img_size)}")
            img_size = int(img_size[0])
        if img_size % 16:
            raise ValueError(f"img_size {img_size} is not a multiple of 16")
        if global_pool not in ("avg", ""):
            raise ValueError(f"ConvViT has no [CLS] token: global_pool must be 'avg' (or '' for tokens), "
                             f"got {global_pool!r}")
        self.img_size, self.grid_size = img_size, img_size // 16
        self.num_classes, self.global_pool = num_classes, global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = d
        self.num_prefix_tokens = 0
        self.grad_checkpointing = False
        n = l1 + l2 + l3  # stochastic depth rising linearly with depth (plain floats: builds on the meta device)
        rates = [drop_path_rate * i / max(1, n - 1) for i in range(n)]
        self.embed1 = StridedEmbed(in_chans, d1, 4)
        self.stage1 = nn.ModuleList(MaskedConvBlock(d1, r1, kernel_size, rates[i]) for i in range(l1))
        self.embed2 = StridedEmbed(d1, d2, 2)
        self.stage2 = nn.ModuleList(MaskedConvBlock(d2, r2, kernel_size, rates[l1 + i]) for i in range(l2))
        self.embed3 = StridedEmbed(d2, d, 2)
        self.token_proj = nn.Linear(d, d)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid_size ** 2, d))
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        self.blocks = nn.ModuleList(Block(d, num_heads, mlp_ratio=r3, qkv_bias=True, norm_layer=norm_layer,
                                          drop_path=rates[l1 + l2 + i]) for i in range(l3))
        self.norm = nn.Identity() if fc_norm else norm_layer(d)
        self.fc_norm = norm_layer(d) if fc_norm else nn.Identity()
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(d, num_classes) if num_classes > 0 else nn.Identity()
        self.feature_info = [dict(num_chs=d1, reduction=4, module="stage1"),
                             dict(num_chs=d2, reduction=8, module="stage2"),
                             dict(num_chs=d, reduction=16, module="blocks")]
        trunc_normal_(self.pos_embed, std=0.02)
        self.apply(self._init_linear)

    @staticmethod
    def _init_linear(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """Parameter groups for layer-wise lr decay (timm's `param_groups_layer_decay`), from the
        input up: each conv stage with its embedding is one layer (our choice: it plays the part
        of a ViT's patch embedding), then each transformer block, the final norm with the last
        block; the head is last. `coarse`: the conv stages together as one stem."""
        if coarse:
            return dict(stem=r"^embed[123]|^stage[12]\.|^token_proj|^pos_embed", blocks=r"^blocks\.(\d+)")
        return dict(stage1=r"^embed1|^stage1\.", stage2=r"^embed2|^stage2\.",
                    stage3=r"^embed3|^token_proj|^pos_embed",
                    blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            if global_pool not in ("avg", ""):
                raise ValueError(f"ConvViT has no [CLS] token: global_pool must be 'avg' or '', got {global_pool!r}")
            self.global_pool = global_pool
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    def _stage3_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """stage-2 output [B, D2, 2g, 2g] -> tokens with position [B, N, D]."""
        return self.token_proj(self.embed3(x).flatten(2).transpose(1, 2)) + self.pos_embed

    def _conv_stage(self, embed: nn.Module, blocks: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
        x = embed(x)
        for blk in blocks:
            x = torch.utils.checkpoint.checkpoint(blk, x, use_reentrant=False) if self._checkpointing() else blk(x)
        return x

    def _checkpointing(self) -> bool:
        return self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, 3, S, S] -> normed tokens [B, N, D] (no prefix tokens)."""
        x = self._conv_stage(self.embed2, self.stage2, self._conv_stage(self.embed1, self.stage1, x))
        x = self._stage3_tokens(x)
        for blk in self.blocks:
            x = torch.utils.checkpoint.checkpoint(blk, x, use_reentrant=False) if self._checkpointing() else blk(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """tokens [B, N, D] -> logits [B, num_classes] (pre_logits: the pooled feature [B, D])."""
        if self.global_pool == "avg":
            x = x.mean(dim=1)
        x = self.head_drop(self.fc_norm(x))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(self, x: torch.Tensor, indices: int | list[int] | None = None, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NCHW", intermediates_only: bool = False
                              ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Feature maps of the three stages, for dense tasks (detection necks take them as an FPN's input).

        x [B, 3, S, S] -> [stage1 [B, D1, S/4, S/4], stage2 [B, D2, S/8, S/8], stage3 [B, D, S/16, S/16]]
        (NCHW; 'NHWC' puts channels last), the ones `indices` picks (None: all three; an int
        n: the last n; a list: those). `norm`: stage 3's map after the final norm.
        Returns the list, or (final normed tokens [B, N, D], list) unless `intermediates_only`.
        """
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        take, last = feature_take_indices(3, indices)
        maps = []
        x = self._conv_stage(self.embed1, self.stage1, x)
        maps.append(x)
        if not (stop_early and last < 1):
            x = self._conv_stage(self.embed2, self.stage2, x)
            maps.append(x)
        if not (stop_early and last < 2):
            x = self._stage3_tokens(x)
            for blk in self.blocks:
                x = blk(x)
            tokens = self.norm(x)
            g = self.grid_size
            maps.append((tokens if norm else x).transpose(1, 2).reshape(x.shape[0], -1, g, g))
        picked = [maps[i] for i in take]
        if output_fmt == "NHWC":
            picked = [m.permute(0, 2, 3, 1) for m in picked]
        if intermediates_only:
            return picked
        return tokens, picked

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop what the feature maps `indices` do not need (timm's `features_only` calls this)."""
        take, last = feature_take_indices(3, indices)
        if last < 2:
            self.blocks, self.norm = nn.ModuleList(), nn.Identity()
            self.embed3, self.token_proj = nn.Identity(), nn.Identity()
        if last < 1:
            self.embed2, self.stage2 = nn.Identity(), nn.ModuleList()
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.fc_norm = nn.Identity()
            self.reset_classifier(0, "")
        return take


# ---- timm registration ------------------------------------------------------------------------

VIT_ARCHS: dict[str, dict] = {
    "mrmae_vit_tiny_patch16": dict(embed_dim=192, depth=12, num_heads=3),
    "mrmae_vit_small_patch16": dict(embed_dim=384, depth=12, num_heads=6),
    "mrmae_vit_base_patch16": dict(embed_dim=768, depth=12, num_heads=12),
    "mrmae_vit_large_patch16": dict(embed_dim=1024, depth=24, num_heads=16),
    "mrmae_vit_huge_patch16": dict(embed_dim=1280, depth=32, num_heads=16),  # MAE's huge uses patch 14
}

# Base is ConvMAE's ConvViT-B (the MR-MAE paper's student); small / large / huge follow ConvMAE's
# scaled variants (conv stages of large and huge use MLP ratio 8); tiny is ours, stage 3 as wide
# as ViT-Ti, for tests and demos.
CONVVIT_ARCHS: dict[str, dict] = {
    "mrmae_convvit_tiny": dict(embed_dims=(64, 128, 192), depths=(2, 2, 11), num_heads=3),
    "mrmae_convvit_small": dict(embed_dims=(128, 256, 384), depths=(2, 2, 11), num_heads=6),
    "mrmae_convvit_base": dict(embed_dims=(256, 384, 768), depths=(2, 2, 11), num_heads=12),
    "mrmae_convvit_large": dict(embed_dims=(384, 768, 1024), depths=(2, 2, 23), num_heads=16,
                                mlp_ratios=(8.0, 8.0, 4.0)),
    "mrmae_convvit_huge": dict(embed_dims=(768, 1024, 1280), depths=(2, 2, 31), num_heads=16,
                               mlp_ratios=(8.0, 8.0, 4.0)),
}

# What the students saw: ImageNet mean/std (train/data.py), bicubic resizing, and MAE's eval
# transform (resize the shorter side to 256, centre crop 224: crop_pct 224 / 256).
EVAL_CROP_PCT = 0.875


def pretrained_cfg(first_conv: str, img_size: int = 224) -> dict:
    """The pretrained config of an exported encoder (no URL: weights come from a file)."""
    return dict(url="", num_classes=0, input_size=(3, img_size, img_size), pool_size=None,
                crop_pct=EVAL_CROP_PCT, crop_mode="center", interpolation="bicubic", fixed_input_size=True,
                mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD, first_conv=first_conv, classifier="head",
                license="see the pretraining data and teacher")


default_cfgs = generate_default_cfgs({
    **{name: pretrained_cfg("patch_embed.proj") for name in VIT_ARCHS},
    **{name: pretrained_cfg("embed1.proj") for name in CONVVIT_ARCHS},
})


def registered_kwargs(name: str) -> dict:
    """The architecture arguments the registered model `name` is built with by default."""
    if name in VIT_ARCHS:
        return dict(img_size=224, patch_size=16, mlp_ratio=4.0, qkv_bias=True, class_token=True, global_pool="token",
                    **VIT_ARCHS[name])
    if name in CONVVIT_ARCHS:
        return dict(img_size=224, mlp_ratios=(4.0, 4.0, 4.0), kernel_size=5, **CONVVIT_ARCHS[name])
    return {}


def _vit(variant: str, pretrained: bool, **kwargs) -> VisionTransformer:
    args = {k: v for k, v in registered_kwargs(variant).items() if k != "img_size"}  # img_size: the cfg's input_size
    return build_model_with_cfg(VisionTransformer, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                                feature_cfg=dict(out_indices=3, feature_cls="getter"), **{**args, **kwargs})


def _convvit(variant: str, pretrained: bool, **kwargs) -> ConvViT:
    args = {k: v for k, v in registered_kwargs(variant).items() if k != "img_size"}
    return build_model_with_cfg(ConvViT, variant, pretrained, feature_cfg=dict(out_indices=(0, 1, 2),
                                feature_cls="getter"), **{**args, **kwargs})


@register_model
def mrmae_vit_tiny_patch16(pretrained: bool = False, **kwargs) -> VisionTransformer:
    return _vit("mrmae_vit_tiny_patch16", pretrained, **kwargs)


@register_model
def mrmae_vit_small_patch16(pretrained: bool = False, **kwargs) -> VisionTransformer:
    return _vit("mrmae_vit_small_patch16", pretrained, **kwargs)


@register_model
def mrmae_vit_base_patch16(pretrained: bool = False, **kwargs) -> VisionTransformer:
    return _vit("mrmae_vit_base_patch16", pretrained, **kwargs)


@register_model
def mrmae_vit_large_patch16(pretrained: bool = False, **kwargs) -> VisionTransformer:
    return _vit("mrmae_vit_large_patch16", pretrained, **kwargs)


@register_model
def mrmae_vit_huge_patch16(pretrained: bool = False, **kwargs) -> VisionTransformer:
    return _vit("mrmae_vit_huge_patch16", pretrained, **kwargs)


@register_model
def mrmae_convvit_tiny(pretrained: bool = False, **kwargs) -> ConvViT:
    return _convvit("mrmae_convvit_tiny", pretrained, **kwargs)


@register_model
def mrmae_convvit_small(pretrained: bool = False, **kwargs) -> ConvViT:
    return _convvit("mrmae_convvit_small", pretrained, **kwargs)


@register_model
def mrmae_convvit_base(pretrained: bool = False, **kwargs) -> ConvViT:
    return _convvit("mrmae_convvit_base", pretrained, **kwargs)


@register_model
def mrmae_convvit_large(pretrained: bool = False, **kwargs) -> ConvViT:
    return _convvit("mrmae_convvit_large", pretrained, **kwargs)


@register_model
def mrmae_convvit_huge(pretrained: bool = False, **kwargs) -> ConvViT:
    return _convvit("mrmae_convvit_huge", pretrained, **kwargs)

"""Student family `convvit`: the hybrid ConvViT, masked convolution stages (ConvMAE / MCMAE)
before the ViT blocks, and its encoder as a timm model (`ConvViT`, `mrmae_convvit_*`).

Shapes: B images of S x S pixels, g = S / 16 (14 at 224), N = g * g tokens, n visible;
D1, D2, D the widths of stages 1-3; C teacher width; P = 16 * 16 * 3 pixel values per patch.

    imgs [B, 3, S, S]
    stage 1: 4x4 conv, stride 4   -> [B, D1, 4g, 4g]  then L1 masked conv blocks
    stage 2: 2x2 conv, stride 2   -> [B, D2, 2g, 2g]  then L2 masked conv blocks
    stage 3: 2x2 conv, stride 2   -> [B, D, g, g] -> tokens [B, N, D] -> the n visible ones
                                     -> L3 transformer blocks (timm Block), visible tokens only
    fusion: stage-1/2 outputs -> strided convs -> [B, D, g, g] -> visible [B, n, D], added
            to the stage-3 output; LayerNorm -> latent [B, n, D] (no cls token)

The 14x14 token mask (the one the ViT student, the cache and focused masking use) is blown
up block-wise to every stage (`masking.blockwise_visible_maps`). No information from a
masked pixel reaches a visible output: the only ops that mix positions are the 5x5
depth-wise convs, whose input is multiplied by the visible map, and the strided convs,
whose input is multiplied by it too (they are non-overlapping and block-aligned, so this
is a second guard); everything else (LayerNorm, 1x1 convs, GELU) is per position, and
stage 3 sees the visible tokens only. Masked positions of stages 1-2 are computed (the
grids are dense) but never read by a visible one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from types import SimpleNamespace
from typing import ClassVar, Iterable

import torch
import torch.nn as nn
from timm.layers import DropPath, LayerNorm2d, trunc_normal_
from timm.models import build_model_with_cfg
from timm.models._features import feature_take_indices
from timm.models.vision_transformer import Block

from mrmae.train.masking import blockwise_visible_maps
from mrmae.train.student import MaskedStudent, StudentConfig, gather_visible, sincos_pos_embed
from mrmae.train.students.registry import StudentFamily, register_family

# ---- the blocks (shared by the pretraining student and the timm encoder) ----


# ConvMAE's conv stages normalise with nn.LayerNorm's default eps (its CBlock and PatchEmbed
# ignore the norm_layer they are given); its transformer blocks, final norm and decoder use 1e-6.
# Runs from before mrmae matched it used 1e-6 here too and record none (`CONV_NORM_EPS_BEFORE`).
CONV_NORM_EPS = 1e-5
CONV_NORM_EPS_BEFORE = 1e-6


class StridedEmbed(nn.Module):
    """Non-overlapping k x k conv with stride k, LayerNorm over channels (eps `eps`), GELU.

    [B, Cin, H, W] -> [B, Cout, H/k, W/k]. Each output cell sees exactly one k x k input block.
    """

    def __init__(self, in_dim: int, out_dim: int, k: int, eps: float = CONV_NORM_EPS) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_dim, out_dim, k, stride=k)
        self.norm = LayerNorm2d(out_dim, eps=eps)
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
    evaluation): nothing is masked. Both LNs use `eps` (ConvMAE's: 1e-5).
    """

    def __init__(self, dim: int, mlp_ratio: float, kernel_size: int = 5, drop_path: float = 0.0,
                 eps: float = CONV_NORM_EPS) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = LayerNorm2d(dim, eps=eps)
        self.pw1 = nn.Conv2d(dim, dim, 1)
        self.dwconv = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.pw2 = nn.Conv2d(dim, dim, 1)
        self.norm2 = LayerNorm2d(dim, eps=eps)
        self.mlp = nn.Sequential(nn.Conv2d(dim, hidden, 1), nn.GELU(), nn.Conv2d(hidden, dim, 1))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, visible: torch.Tensor | None = None) -> torch.Tensor:
        h = self.pw1(self.norm1(x))
        if visible is not None:
            h = h * visible.to(h.dtype)
        x = x + self.drop_path(self.pw2(self.dwconv(h)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


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


@dataclass(frozen=True, kw_only=True)
class ConvViTConfig(StudentConfig):
    """A ConvViT student: the shared fields (`StudentConfig`) and the three stages' sizes."""

    embed_dims: tuple[int, int, int] = (256, 384, 768)  # stage widths D1, D2, D
    depths: tuple[int, int, int] = (2, 2, 11)  # conv blocks, conv blocks, transformer blocks
    num_heads: int = 12  # stage 3
    mlp_ratios: tuple[float, float, float] = (4.0, 4.0, 4.0)
    kernel_size: int = 5  # the depth-wise conv of the conv blocks
    conv_norm_eps: float = CONV_NORM_EPS  # the conv stages' LayerNorms (ConvMAE's); older runs: 1e-6

    patch_size: ClassVar[int] = 16  # 4 * 2 * 2: one stage-3 token per 16x16 pixel patch
    strides: ClassVar[tuple[int, int, int]] = (4, 2, 2)

    def __post_init__(self) -> None:
        for name in ("embed_dims", "depths", "mlp_ratios"):
            value = tuple(getattr(self, name))
            if len(value) != 3:
                raise ValueError(f"{name} needs one value per stage (3), got {value}")
            object.__setattr__(self, name, value)
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not a multiple of {self.patch_size}")
        if self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd (same-size output), got {self.kernel_size}")
        super().__post_init__()  # fuse_layers, counted in stage-3 blocks (`depth`)

    @property
    def embed_dim(self) -> int:
        """Width D of the tokens the encoder outputs (as MRMAEConfig.embed_dim)."""
        return self.embed_dims[2]

    @property
    def depth(self) -> int:
        """Number of transformer blocks, the ones `fuse_layers` counts (as MRMAEConfig.depth)."""
        return self.depths[2]


class MRConvViT(MaskedStudent):
    """MR-MAE with a ConvViT encoder: same decoder, mimic head, losses and interface as MRMAE.

    latent = norm(S + F1 + F2) [B, n, D], where S = sum of the outputs of the stage-3 blocks
    in `fuse_layers` (the last block when empty) and F1, F2 = the visible tokens of the
    stage-1/2 outputs brought to the g x g grid by strided convs (`fuse1` 4x4 stride 4,
    `fuse2` 2x2 stride 2). There is no cls token (num_prefix_tokens = 0): latent feeds both
    the decoder and the mimic head, and forward_encoder returns it twice. Stage-3 position
    embeddings and the decoder's are fixed sin-cos buffers without a cls slot.
    """

    num_prefix_tokens = 0

    def __init__(self, cfg: ConvViTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        (d1, d2, d), (l1, l2, l3), (r1, r2, r3) = cfg.embed_dims, cfg.depths, cfg.mlp_ratios
        s1, s2, s3 = cfg.strides
        eps = cfg.conv_norm_eps
        self.embed1 = StridedEmbed(3, d1, s1, eps)
        self.stage1 = nn.ModuleList(MaskedConvBlock(d1, r1, cfg.kernel_size, eps=eps) for _ in range(l1))
        self.embed2 = StridedEmbed(d1, d2, s2, eps)
        self.stage2 = nn.ModuleList(MaskedConvBlock(d2, r2, cfg.kernel_size, eps=eps) for _ in range(l2))
        self.embed3 = StridedEmbed(d2, d, s3, eps)
        self.token_proj = nn.Linear(d, d)  # per-token mixing after the conv embed, as in ConvMAE
        self.register_buffer("pos_embed", sincos_pos_embed(d, self.grid_size, cls_token=False).unsqueeze(0))
        block = partial(Block, mlp_ratio=r3, qkv_bias=True, norm_layer=cfg.norm_layer)
        self.blocks = nn.ModuleList(block(d, cfg.num_heads) for _ in range(l3))
        self.fuse1 = nn.Conv2d(d1, d, s2 * s3, stride=s2 * s3)
        self.fuse2 = nn.Conv2d(d2, d, s3, stride=s3)
        self.norm = cfg.norm_layer(d)
        self.fuse_layers = cfg.fuse_layers or (l3,)
        self._build_heads(d)
        self._init_weights()

    def _init_weights(self) -> None:
        # Linear layers and the strided (patch-embedding-like) convs: xavier-uniform on the
        # flattened weight, as MAE does for its patch embed; the 1x1 / depth-wise convs of the
        # conv blocks keep PyTorch's default init.
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):  # LayerNorm2d included
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for conv in (self.embed1.proj, self.embed2.proj, self.embed3.proj, self.fuse1, self.fuse2):
            nn.init.xavier_uniform_(conv.weight.view(conv.weight.shape[0], -1))
            nn.init.zeros_(conv.bias)
        nn.init.normal_(self.mask_token, std=0.02)

    def no_weight_decay(self) -> set[str]:
        """Names exempt from weight decay (the pos-embeds are buffers, listed for safety)."""
        return {"pos_embed", "mask_token", "decoder_pos_embed"}

    def backbone_modules(self) -> list[nn.Module]:
        """The encoder a fine-tuning run keeps: stages 1-3 and the final norm, no fusion convs."""
        return [self.embed1, self.stage1, self.embed2, self.stage2, self.embed3, self.token_proj, self.blocks,
                self.norm]

    def encoder_modules(self) -> list[nn.Module]:
        """Everything that computes the latent: the backbone plus the stage-1/2 fusion convs."""
        return [*self.backbone_modules(), self.fuse1, self.fuse2]

    def backbone_num_params(self) -> int:
        """Parameters of `backbone_modules` (ConvViT-B: 84.5M, vs 88.8M with the fusion convs)."""
        return sum(p.numel() for m in self.backbone_modules() for p in m.parameters())

    @property
    def patch_embed(self) -> SimpleNamespace:
        """The 16x16 patch grid, shaped like timm PatchEmbed's attributes (img_size, patch_size,
        grid_size, num_patches as in MRMAE.patch_embed) for code written against MRMAE. There is
        no single patch-embedding layer here: prefer `img_size`, `grid_size`, `num_patches`."""
        s, p, g = self.img_size, self.patch_size, self.grid_size
        return SimpleNamespace(img_size=(s, s), patch_size=(p, p), grid_size=(g, g), num_patches=g * g)

    def forward_encoder(self, imgs: torch.Tensor, ids_keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """imgs [B, 3, S, S], ids_keep [B, n] -> (latent [B, n, D], visible [B, n, D]), the same tensor.

        Visible tokens are in ids_keep order (as MRMAE's). See the class docstring for latent.
        """
        b = imgs.shape[0]
        mask = torch.ones(b, self.num_patches, dtype=torch.bool, device=imgs.device)
        mask.scatter_(1, ids_keep.long(), False)
        s1, s2, s3 = self.cfg.strides
        vis_px, vis1, vis2 = blockwise_visible_maps(mask, (s1 * s2 * s3, s2 * s3, s3))  # 224, 56, 28 at 224

        x = self.embed1(imgs * vis_px.to(imgs.dtype))  # [B, D1, 4g, 4g]
        for blk in self.stage1:
            x = blk(x, vis1)
        x1 = x * vis1.to(x.dtype)  # masked positions to 0 before any strided conv reads them
        x = self.embed2(x1)  # [B, D2, 2g, 2g]
        for blk in self.stage2:
            x = blk(x, vis2)
        x2 = x * vis2.to(x.dtype)
        tokens = self.token_proj(self.embed3(x2).flatten(2).transpose(1, 2)) + self.pos_embed  # [B, N, D]

        x = gather_visible(tokens, ids_keep)  # [B, n, D]
        fused = None
        for i, blk in enumerate(self.blocks, start=1):
            x = blk(x)
            if i in self.fuse_layers:
                fused = x if fused is None else fused + x
        multi_scale = (self.fuse1(x1) + self.fuse2(x2)).flatten(2).transpose(1, 2)  # [B, N, D]
        latent = self.norm(fused + gather_visible(multi_scale, ids_keep))
        return latent, latent


# ---- the encoder as a timm model (export, finetune, eval) ----


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
                 drop_path_rate: float = 0.0, in_chans: int = 3, conv_norm_eps: float = CONV_NORM_EPS) -> None:
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
        eps = conv_norm_eps
        self.embed1 = StridedEmbed(in_chans, d1, 4, eps)
        self.stage1 = nn.ModuleList(MaskedConvBlock(d1, r1, kernel_size, rates[i], eps) for i in range(l1))
        self.embed2 = StridedEmbed(d1, d2, 2, eps)
        self.stage2 = nn.ModuleList(MaskedConvBlock(d2, r2, kernel_size, rates[l1 + i], eps) for i in range(l2))
        self.embed3 = StridedEmbed(d2, d, 2, eps)
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


@register_family
class ConvViTFamily(StudentFamily):
    """The ConvViT student; its encoder is `ConvViT` above (no [CLS] token, 'avg' pooling)."""

    name = "convvit"
    rank = 1
    archs = CONVVIT_ARCHS
    config, student = ConvViTConfig, MRConvViT
    first_conv = "embed1.proj"
    encoder_keys = ("embed1.", "stage1.", "embed2.", "stage2.", "embed3.", "token_proj.", "blocks.", "norm.",
                    "pos_embed")
    cls_token = False
    fuse_blocks = "transformer blocks (stage 3)"
    fusion_label = "stages+"  # the stage-1/2 outputs are always fused: 'stages+4,8,11', 'stages+last'
    fused_maps = "the stage-1/2 maps"
    tiny = dict(img_size=32, embed_dims=(16, 24, 32), depths=(1, 1, 2), num_heads=2)
    recorded = ("conv_norm_eps",)
    before_recorded = {"conv_norm_eps": CONV_NORM_EPS_BEFORE}

    def encoder_defaults(self, name: str) -> dict:
        return {**dict(img_size=224, mlp_ratios=(4.0, 4.0, 4.0), kernel_size=5, conv_norm_eps=CONV_NORM_EPS),
                **CONVVIT_ARCHS[name]}  # large: 8, 8, 4

    def build_encoder(self, name: str, pretrained: bool, **kwargs) -> ConvViT:
        args = {k: v for k, v in self.encoder_defaults(name).items() if k != "img_size"}
        return build_model_with_cfg(ConvViT, name, pretrained, feature_cfg=dict(out_indices=(0, 1, 2),
                                    feature_cls="getter"), **{**args, **kwargs})

    def encoder_kwargs(self, c: ConvViTConfig) -> dict:
        return dict(img_size=c.img_size, embed_dims=list(c.embed_dims), depths=list(c.depths),
                    num_heads=c.num_heads, mlp_ratios=list(c.mlp_ratios), kernel_size=c.kernel_size,
                    conv_norm_eps=c.conv_norm_eps)

    def restore_overrides(self, state: dict) -> dict:
        # its input size is in its pos-embed (one token per 16 x 16 patch, no cls slot)
        return dict(img_size=math.isqrt(state["pos_embed"].shape[1]) * 16)

    def classifier_kwargs(self, global_pool: str) -> dict:
        super().classifier_kwargs(global_pool)
        return dict(fc_norm=True) if global_pool == "avg" else {}  # timm's ViT: implied by 'avg'

    def describe(self, model: MRConvViT) -> str:
        c = model.cfg
        return (f"ConvViT {'/'.join(map(str, c.embed_dims))}-d, {'+'.join(map(str, c.depths))} blocks, "
                f"{c.num_heads} heads")

    def params_note(self, model: MRConvViT) -> str:
        backbone = model.backbone_num_params()
        return f" = backbone {backbone / 1e6:.1f}M + fusion convs {(model.encoder_num_params() - backbone) / 1e6:.1f}M"

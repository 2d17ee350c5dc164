"""The hybrid ConvViT student: masked convolution stages (ConvMAE / MCMAE) before the ViT blocks.

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

from dataclasses import dataclass
from functools import partial
from types import SimpleNamespace
from typing import Callable, ClassVar

import torch
import torch.nn as nn
from timm.models.vision_transformer import Block

from mrmae.train.backbones import CONVVIT_ARCHS, MaskedConvBlock, StridedEmbed  # noqa: F401 (ARCHS re-exported)
from mrmae.train.masking import blockwise_visible_maps
from mrmae.train.student import MaskedStudent, check_fuse_layers, gather_visible, sincos_pos_embed


@dataclass(frozen=True)
class ConvViTConfig:
    img_size: int = 224
    embed_dims: tuple[int, int, int] = (256, 384, 768)  # stage widths D1, D2, D
    depths: tuple[int, int, int] = (2, 2, 11)  # conv blocks, conv blocks, transformer blocks
    num_heads: int = 12  # stage 3
    mlp_ratios: tuple[float, float, float] = (4.0, 4.0, 4.0)
    kernel_size: int = 5  # the depth-wise conv of the conv blocks
    decoder_embed_dim: int = 512
    decoder_depth: int = 8
    decoder_num_heads: int = 16
    teacher_dim: int = 0  # 0: no mimic head (plain MAE)
    joint_teacher_dims: tuple[int, ...] = ()  # more teachers, one more mimic head each (joint)
    fuse_layers: tuple[int, ...] = ()  # 1-based stage-3 blocks summed; () = last block only
    norm_layer: Callable[[int], nn.Module] = partial(nn.LayerNorm, eps=1e-6)
    norm_pix_loss: bool = True

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
        object.__setattr__(self, "fuse_layers", check_fuse_layers(self.fuse_layers, self.depths[2]))

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
        self.embed1 = StridedEmbed(3, d1, s1)
        self.stage1 = nn.ModuleList(MaskedConvBlock(d1, r1, cfg.kernel_size) for _ in range(l1))
        self.embed2 = StridedEmbed(d1, d2, s2)
        self.stage2 = nn.ModuleList(MaskedConvBlock(d2, r2, cfg.kernel_size) for _ in range(l2))
        self.embed3 = StridedEmbed(d2, d, s3)
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

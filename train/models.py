"""The MR-MAE students and their registry: a MAE ViT (timm blocks) with a linear feature-mimic
head here, and the hybrid ConvViT in `mrmae.train.convvit`; both share `MaskedStudent`.

Shapes: B images, N = (img_size / patch_size) ** 2 patch tokens, n = n_keep visible
tokens, D encoder width, C teacher width, P = patch_size ** 2 * 3 pixel values per patch
(ordered row, column, channel inside a patch). Masks come from `mrmae.train.masking`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from functools import partial
from typing import Callable

import torch
import torch.nn as nn
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block

from mrmae.train.backbones import CONVVIT_ARCHS, VIT_ARCHS
from mrmae.train.convvit import ConvViTConfig, MRConvViT
from mrmae.train.student import MaskedStudent, check_fuse_layers, gather_visible, sincos_pos_embed

@dataclass(frozen=True)
class MRMAEConfig:
    img_size: int = 224
    patch_size: int = 16
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    decoder_embed_dim: int = 512
    decoder_depth: int = 8
    decoder_num_heads: int = 16
    teacher_dim: int = 0  # 0: no mimic head (plain MAE)
    joint_teacher_dims: tuple[int, ...] = ()  # more teachers, one more mimic head each (joint)
    fuse_layers: tuple[int, ...] = ()  # 1-based encoder blocks summed; () = last block only
    norm_layer: Callable[[int], nn.Module] = partial(nn.LayerNorm, eps=1e-6)
    norm_pix_loss: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "fuse_layers", check_fuse_layers(self.fuse_layers, self.depth))


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


# --- registry ----------------------------------------------------------------------------

# The papers list "88M" for every base-size encoder (ViT-B, ConvViT-B, Swin-B alike).
PAPER_BASE_PARAMS = 88e6


def _registry() -> dict[str, tuple[type, type, dict]]:
    """name -> (model class, config class, config fields), ViT entries first."""
    vit = {n: (MRMAE, MRMAEConfig, dict(patch_size=16, **a)) for n, a in VIT_ARCHS.items()}
    return {**vit, **{n: (MRConvViT, ConvViTConfig, a) for n, a in CONVVIT_ARCHS.items()}}


def model_config(name: str, **overrides) -> MRMAEConfig | ConvViTConfig:
    """The registry config (MRMAEConfig or ConvViTConfig) for `name` with `overrides` applied."""
    reg = _registry()
    if name not in reg:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(reg)}")
    _, config_cls, arch = reg[name]
    known = {f.name for f in fields(config_cls)}
    if bad := set(overrides) - known:
        raise TypeError(f"unknown {config_cls.__name__} fields: {sorted(bad)}")
    return replace(config_cls(**arch), **overrides)


def create_model(name: str, **overrides) -> MaskedStudent:
    """Build a registry model, e.g. create_model("mrmae_convvit_base", teacher_dim=768)."""
    cfg = model_config(name, **overrides)  # KeyError for unknown names
    return _registry()[name][0](cfg)


def list_models() -> list[str]:
    return list(_registry())


def _factory(name: str) -> Callable[..., MaskedStudent]:
    def make(**overrides) -> MaskedStudent:
        return create_model(name, **overrides)

    make.__name__ = make.__qualname__ = name
    make.__doc__ = f"{name} (see `describe_models`; decoder 512-d, 8 blocks unless overridden)."
    return make


mrmae_vit_tiny_patch16 = _factory("mrmae_vit_tiny_patch16")
mrmae_vit_small_patch16 = _factory("mrmae_vit_small_patch16")
mrmae_vit_base_patch16 = _factory("mrmae_vit_base_patch16")
mrmae_vit_large_patch16 = _factory("mrmae_vit_large_patch16")
mrmae_vit_huge_patch16 = _factory("mrmae_vit_huge_patch16")
mrmae_convvit_tiny = _factory("mrmae_convvit_tiny")
mrmae_convvit_small = _factory("mrmae_convvit_small")
mrmae_convvit_base = _factory("mrmae_convvit_base")
mrmae_convvit_large = _factory("mrmae_convvit_large")
mrmae_convvit_huge = _factory("mrmae_convvit_huge")


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
        c, enc = m.cfg, encoder_num_params(m)
        total = sum(p.numel() for p in m.parameters())
        if isinstance(m, MRMAE):
            arch = f"ViT {c.embed_dim}-d, {c.depth} blocks, {c.num_heads} heads"
            extra = ""
        else:
            arch = (f"ConvViT {'/'.join(map(str, c.embed_dims))}-d, {'+'.join(map(str, c.depths))} blocks, "
                    f"{c.num_heads} heads")
            extra = f" = backbone {m.backbone_num_params() / 1e6:.1f}M + fusion convs " \
                    f"{(enc - m.backbone_num_params()) / 1e6:.1f}M"
        rows.append(f"{name}: {arch}; encoder {enc / 1e6:.1f}M{extra} (+{m.pos_embed.numel() / 1e6:.2f}M fixed "
                    f"pos-embed); with decoder 512-d x 8: {total / 1e6:.1f}M")
    return rows

"""The MR-MAE student: a MAE ViT (timm blocks) with a linear feature-mimic head.

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
    fuse_layers: tuple[int, ...] = ()  # 1-based encoder blocks summed; () = last block only
    norm_layer: Callable[[int], nn.Module] = partial(nn.LayerNorm, eps=1e-6)
    norm_pix_loss: bool = True

    def __post_init__(self) -> None:
        fuse = tuple(sorted({int(i) for i in self.fuse_layers}))
        if fuse and (fuse[0] < 1 or fuse[-1] != self.depth):
            raise ValueError(f"fuse_layers {self.fuse_layers} must lie in 1..{self.depth} and include the "
                             f"last block {self.depth} (blocks after the last fused one would get no gradient)")
        object.__setattr__(self, "fuse_layers", fuse)


def sincos_pos_embed(dim: int, grid: int, cls_token: bool = True) -> torch.Tensor:
    """Fixed 2-D sin-cos position embeddings [(1 if cls_token) + grid*grid, dim].

    Token t = row * grid + col (PatchEmbed's order). The first dim/2 channels encode the
    column, the last dim/2 the row; each half is [sin(pos * w_k), cos(pos * w_k)] with
    w_k = 10000 ** (-k / (dim / 4)), k = 0 .. dim/4 - 1. The cls slot is all zeros.
    """
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs dim % 4 == 0, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    pos = torch.arange(grid, dtype=torch.float64)
    rows, cols = torch.meshgrid(pos, pos, indexing="ij")

    def one_axis(p: torch.Tensor) -> torch.Tensor:
        angles = p.reshape(-1, 1) * omega.reshape(1, -1)
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    emb = torch.cat([one_axis(cols), one_axis(rows)], dim=1)
    if cls_token:
        emb = torch.cat([torch.zeros(1, dim, dtype=emb.dtype), emb], dim=0)
    return emb.float()


def gather_visible(tokens: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
    """Per-patch tokens [B, N, ...] -> the visible ones [B, n, ...], in ids_keep order."""
    index = ids_keep.long().reshape(*ids_keep.shape, *([1] * (tokens.ndim - 2)))
    return torch.gather(tokens, 1, index.expand(*ids_keep.shape, *tokens.shape[2:]))


class MRMAE(nn.Module):
    """MAE encoder/decoder plus a linear mimic head on the encoder's visible tokens.

    Norms: every timm Block is pre-norm and its output is un-normed. The encoder output is
    S = sum of the outputs (cls and visible tokens) of the blocks in `fuse_layers` (only
    the last block when empty), and S passes the encoder's final LayerNorm `norm` once:
    latent = norm(S) [B, 1+n, D]. latent feeds the decoder; latent[:, 1:] feeds the mimic
    head (one nn.Linear D -> C, no norm of its own). The decoder ends with `decoder_norm`
    before the pixel predictor. Position embeddings are fixed sin-cos buffers (cls slot 0).
    """

    def __init__(self, cfg: MRMAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        p, d, dd = cfg.patch_size, cfg.embed_dim, cfg.decoder_embed_dim
        self.patch_embed = PatchEmbed(cfg.img_size, p, 3, d)
        grid, n = self.patch_embed.grid_size[0], self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.register_buffer("pos_embed", sincos_pos_embed(d, grid).unsqueeze(0))
        block = partial(Block, mlp_ratio=cfg.mlp_ratio, qkv_bias=True, norm_layer=cfg.norm_layer)
        self.blocks = nn.ModuleList(block(d, cfg.num_heads) for _ in range(cfg.depth))
        self.norm = cfg.norm_layer(d)
        self.fuse_layers = cfg.fuse_layers or (cfg.depth,)
        self.mimic_head = nn.Linear(d, cfg.teacher_dim) if cfg.teacher_dim > 0 else None

        self.decoder_embed = nn.Linear(d, dd)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dd))
        self.register_buffer("decoder_pos_embed", sincos_pos_embed(dd, grid).unsqueeze(0))
        self.decoder_blocks = nn.ModuleList(block(dd, cfg.decoder_num_heads) for _ in range(cfg.decoder_depth))
        self.decoder_norm = cfg.norm_layer(dd)
        self.decoder_pred = nn.Linear(dd, p * p * 3)
        assert self.pos_embed.shape[1] == n + 1
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

    @property
    def num_patches(self) -> int:
        return self.patch_embed.num_patches

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """imgs [B, 3, H, W] -> patches [B, N, p*p*3], row-major patches, (row, col, chan) inside."""
        p = self.cfg.patch_size
        b, c, h, w = imgs.shape
        x = imgs.reshape(b, c, h // p, p, w // p, p)
        return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), p * p * c)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """patches [B, N, p*p*3] -> imgs [B, 3, H, W] (inverse of patchify, square grid)."""
        p, g = self.cfg.patch_size, self.patch_embed.grid_size[0]
        b = x.shape[0]
        x = x.reshape(b, g, g, p, p, 3).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(b, 3, g * p, g * p)

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

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """latent [B, 1+n, D], ids_restore [B, N] -> pixel predictions pred [B, N, p*p*3]."""
        x = self.decoder_embed(latent)
        b, n_masked = x.shape[0], ids_restore.shape[1] + 1 - x.shape[1]
        seq = torch.cat([x[:, 1:], self.mask_token.expand(b, n_masked, -1)], dim=1)
        seq = gather_visible(seq, ids_restore)  # back to patch order
        x = torch.cat([x[:, :1], seq], dim=1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]

    def forward_mimic(self, visible: torch.Tensor) -> torch.Tensor:
        """visible encoder tokens [B, n, D] -> predicted teacher features [B, n, C]."""
        if self.mimic_head is None:
            raise RuntimeError("this model has no mimic head (teacher_dim = 0)")
        return self.mimic_head(visible)

    def recon_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Eq. 1. imgs [B, 3, H, W], pred [B, N, P], mask [B, N] bool (True = masked) -> scalar.

        Target: each patch's P values, normalised per patch with its mean and unbiased
        variance, (t - mean) / sqrt(var + 1e-6), when norm_pix_loss. Loss: squared error
        averaged over the P values of a patch, then averaged over all masked patches of
        the batch. Computed in float32.
        """
        target = self.patchify(imgs).float()
        if self.cfg.norm_pix_loss:
            target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
        per_patch = (pred.float() - target).pow(2).mean(-1)
        m = mask.float()
        return (per_patch * m).sum() / m.sum()

    @staticmethod
    def mimic_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Eq. 2. pred, target [B, n, C] -> scalar: mean over the B*n tokens of ||pred - target||^2 / C.

        (That is, plain element-wise MSE; computed in float32.)
        """
        if pred.shape != target.shape:
            raise ValueError(f"mimic prediction {tuple(pred.shape)} vs target {tuple(target.shape)}")
        return (pred.float() - target.float()).pow(2).mean()

    def forward(self, imgs: torch.Tensor, ids_keep: torch.Tensor, ids_restore: torch.Tensor,
                mask: torch.Tensor, targets: torch.Tensor | None = None,
                recon_weight: float = 0.5, mimic_weight: float = 0.5) -> dict[str, torch.Tensor]:
        """One MR-MAE loss. targets: teacher features of the visible tokens [B, n, C]
        (`gather_visible(all_targets, ids_keep)`), or None.

        With targets: loss = recon_weight * loss_recon + mimic_weight * loss_mimic.
        Without (plain MAE): loss = loss_recon (unweighted) and loss_mimic = 0.
        Returns {"loss", "loss_recon", "loss_mimic"} (scalars).
        """
        latent, visible = self.forward_encoder(imgs, ids_keep)
        loss_recon = self.recon_loss(imgs, self.forward_decoder(latent, ids_restore), mask)
        if targets is None:
            zero = torch.zeros((), device=loss_recon.device)
            return {"loss": loss_recon, "loss_recon": loss_recon, "loss_mimic": zero}
        if self.mimic_head is None:
            raise ValueError("targets given but the model has no mimic head: build it with teacher_dim > 0")
        if targets.shape[:2] != ids_keep.shape:
            raise ValueError(f"targets must be the visible tokens' [B, n, C]; got {tuple(targets.shape)} "
                             f"for ids_keep {tuple(ids_keep.shape)} (use gather_visible)")
        loss_mimic = self.mimic_loss(self.forward_mimic(visible), targets)
        loss = recon_weight * loss_recon + mimic_weight * loss_mimic
        return {"loss": loss, "loss_recon": loss_recon, "loss_mimic": loss_mimic}


# --- registry ----------------------------------------------------------------------------

_ARCHS: dict[str, dict] = {
    "mrmae_vit_tiny_patch16": dict(embed_dim=192, depth=12, num_heads=3),
    "mrmae_vit_small_patch16": dict(embed_dim=384, depth=12, num_heads=6),
    "mrmae_vit_base_patch16": dict(embed_dim=768, depth=12, num_heads=12),
    "mrmae_vit_large_patch16": dict(embed_dim=1024, depth=24, num_heads=16),
    "mrmae_vit_huge_patch16": dict(embed_dim=1280, depth=32, num_heads=16),  # MAE's huge uses patch 14
}


def model_config(name: str, **overrides) -> MRMAEConfig:
    """The registry config for `name` with `overrides` (any MRMAEConfig field) applied."""
    if name not in _ARCHS:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(list_models())}")
    known = {f.name for f in fields(MRMAEConfig)}
    if bad := set(overrides) - known:
        raise TypeError(f"unknown MRMAEConfig fields: {sorted(bad)}")
    return replace(MRMAEConfig(patch_size=16, **_ARCHS[name]), **overrides)


def create_model(name: str, **overrides) -> MRMAE:
    """Build a registry model, e.g. create_model("mrmae_vit_base_patch16", teacher_dim=768)."""
    return MRMAE(model_config(name, **overrides))


def list_models() -> list[str]:
    return list(_ARCHS)


def _factory(name: str) -> Callable[..., MRMAE]:
    def make(**overrides) -> MRMAE:
        return create_model(name, **overrides)

    make.__name__ = make.__qualname__ = name
    make.__doc__ = f"{name}: {_ARCHS[name]} (decoder 512-d, 8 blocks unless overridden)."
    return make


mrmae_vit_tiny_patch16 = _factory("mrmae_vit_tiny_patch16")
mrmae_vit_small_patch16 = _factory("mrmae_vit_small_patch16")
mrmae_vit_base_patch16 = _factory("mrmae_vit_base_patch16")
mrmae_vit_large_patch16 = _factory("mrmae_vit_large_patch16")
mrmae_vit_huge_patch16 = _factory("mrmae_vit_huge_patch16")


def encoder_num_params(model: MRMAE) -> int:
    """Learnable encoder parameters: patch embed, cls token, blocks, final norm (no pos-embed)."""
    parts = [model.patch_embed, model.blocks, model.norm]
    return model.cls_token.numel() + sum(p.numel() for m in parts for p in m.parameters())


def describe_models() -> list[str]:
    """One line per registry model with its encoder size (built on the meta device: cheap)."""
    rows = []
    for name in list_models():
        with torch.device("meta"):
            m = create_model(name)
        c = m.cfg
        rows.append(f"{name}: {c.embed_dim}-d, {c.depth} blocks, {c.num_heads} heads, "
                    f"encoder {encoder_num_params(m) / 1e6:.1f}M params (+{m.pos_embed.numel() / 1e6:.2f}M fixed "
                    f"pos-embed), with decoder 512-d x 8: {sum(p.numel() for p in m.parameters()) / 1e6:.1f}M")
    return rows

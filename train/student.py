"""What every MR-MAE student shares: position embeddings, token gathering, fuse-layer checks,
and `MaskedStudent` (the MAE decoder, the mimic head, the losses, patchify).

Shapes: B images, N = (img_size / patch_size) ** 2 patch tokens, n = n_keep visible
tokens, D encoder width, C teacher width, P = patch_size ** 2 * 3 pixel values per patch
(ordered row, column, channel inside a patch). Masks come from `mrmae.train.masking`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable, Iterable

import torch
import torch.nn as nn


def check_fuse_layers(fuse_layers: Iterable[int], depth: int) -> tuple[int, ...]:
    """Sorted, de-duplicated 1-based block numbers; they must lie in 1..depth and include depth."""
    fuse = tuple(sorted({int(i) for i in fuse_layers}))
    if fuse and (fuse[0] < 1 or fuse[-1] != depth):
        raise ValueError(f"fuse_layers {tuple(fuse_layers)} must lie in 1..{depth} and include the "
                         f"last block {depth} (blocks after the last fused one would get no gradient)")
    return fuse


@dataclass(frozen=True, kw_only=True)
class StudentConfig:
    """What every student family's config holds beside its encoder's sizes: the input size,
    the MAE decoder, the mimic heads, block fusion and the pixel loss's normalisation
    (`MaskedStudent._build_heads` and `losses` read these). A family's config subclasses it
    and adds its encoder (`embed_dim` and `depth`, as fields or properties: `fuse_layers`
    counts the `depth` blocks). Keyword-only: the fields' order is the base's then the
    family's, which no caller should have to know."""

    img_size: int = 224
    decoder_embed_dim: int = 512
    decoder_depth: int = 8
    decoder_num_heads: int = 16
    teacher_dim: int = 0  # 0: no mimic head (plain MAE)
    joint_teacher_dims: tuple[int, ...] = ()  # more teachers, one more mimic head each (joint)
    # > 0: a second linear head on the decoder predicts the teacher's features of the masked tokens
    # (table 3 row 5: high-level targets reconstructed beside the pixels, in place of the mimic head)
    decoder_teacher_dim: int = 0
    fuse_layers: tuple[int, ...] = ()  # 1-based encoder blocks summed; () = last block only
    norm_layer: Callable[[int], nn.Module] = partial(nn.LayerNorm, eps=1e-6)
    norm_pix_loss: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "fuse_layers", check_fuse_layers(self.fuse_layers, self.depth))
        if self.decoder_teacher_dim and (self.teacher_dim or self.joint_teacher_dims):
            raise ValueError("decoder_teacher_dim (features reconstructed at the decoder, table 3 row 5) replaces the "
                             "mimic heads: give teacher_dim 0")


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


def masked_ids(mask: torch.Tensor) -> torch.Tensor:
    """mask [B, N] bool (True = masked, the same count m in every row) -> the masked tokens'
    indices [B, m], in patch order."""
    m = int(mask[0].sum()) if mask.shape[0] else 0
    return mask.to(torch.int8).argsort(dim=1, descending=True, stable=True)[:, :m].sort(dim=1).values


def gather_visible(tokens: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
    """Per-patch tokens [B, N, ...] -> the visible ones [B, n, ...], in ids_keep order."""
    index = ids_keep.long().reshape(*ids_keep.shape, *([1] * (tokens.ndim - 2)))
    return torch.gather(tokens, 1, index.expand(*ids_keep.shape, *tokens.shape[2:]))


class MaskedStudent(nn.Module):
    """What every MR-MAE student shares: the MAE decoder, the mimic head, the losses, patchify.

    A subclass builds its encoder, sets `cfg` (img_size, patch_size, decoder_*, teacher_dim,
    norm_layer, norm_pix_loss) and `num_prefix_tokens` (encoder tokens before the patch
    tokens: 1 for a cls token, 0 for none), calls `_build_heads(D)` and implements
    `forward_encoder(imgs, ids_keep) -> (latent [B, k+n, D], visible [B, n, D])` (k =
    num_prefix_tokens) and `encoder_modules()`. Geometry: `img_size` S, `patch_size` p,
    `grid_size` g = S / p, `num_patches` N = g * g (the token grid masks and caches use).
    """

    cfg: StudentConfig  # a family's subclass: MRMAEConfig, ConvViTConfig, ...
    num_prefix_tokens: int = 1

    def _build_heads(self, dim: int, decoder_mlp_ratio: float = 4.0) -> None:
        """Mimic head (D -> C, None when teacher_dim = 0), one more per joint teacher
        (`joint_heads`, D -> C_j), and the MAE decoder on encoder width D, with its pixel head
        and, when decoder_teacher_dim C' > 0, its feature head (`decoder_feature_pred`, d -> C')."""
        # imported here: the first import of timm imports the student families (mrmae/__init__.py),
        # which import this module, so this module must not be the one importing timm
        from timm.models.vision_transformer import Block

        cfg, dd = self.cfg, self.cfg.decoder_embed_dim
        self.mimic_head = nn.Linear(dim, cfg.teacher_dim) if cfg.teacher_dim > 0 else None
        if cfg.joint_teacher_dims and self.mimic_head is None:
            raise ValueError("joint_teacher_dims needs a first teacher (teacher_dim > 0)")
        self.joint_heads = nn.ModuleList(nn.Linear(dim, c) for c in cfg.joint_teacher_dims)
        self.decoder_embed = nn.Linear(dim, dd)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dd))
        pos = sincos_pos_embed(dd, self.grid_size, cls_token=self.num_prefix_tokens == 1)
        self.register_buffer("decoder_pos_embed", pos.unsqueeze(0))
        block = partial(Block, mlp_ratio=decoder_mlp_ratio, qkv_bias=True, norm_layer=cfg.norm_layer)
        self.decoder_blocks = nn.ModuleList(block(dd, cfg.decoder_num_heads) for _ in range(cfg.decoder_depth))
        self.decoder_norm = cfg.norm_layer(dd)
        self.decoder_pred = nn.Linear(dd, cfg.patch_size ** 2 * 3)
        self.decoder_feature_pred = nn.Linear(dd, cfg.decoder_teacher_dim) if cfg.decoder_teacher_dim > 0 else None

    @property
    def img_size(self) -> int:
        return self.cfg.img_size

    @property
    def patch_size(self) -> int:
        return self.cfg.patch_size

    @property
    def grid_size(self) -> int:
        return self.cfg.img_size // self.cfg.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size ** 2

    def forward_encoder(self, imgs: torch.Tensor, ids_keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """imgs [B, 3, S, S], ids_keep [B, n] -> (latent [B, k+n, D], visible [B, n, D])."""
        raise NotImplementedError

    def encoder_modules(self) -> list[nn.Module | nn.Parameter]:
        """The learnable parts that compute the latent (no mimic head, no decoder)."""
        raise NotImplementedError

    def encoder_num_params(self) -> int:
        """Learnable encoder parameters (`encoder_modules`; fixed sin-cos buffers excluded)."""
        return sum(m.numel() if isinstance(m, nn.Parameter) else sum(p.numel() for p in m.parameters())
                   for m in self.encoder_modules())

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """imgs [B, 3, H, W] -> patches [B, N, p*p*3], row-major patches, (row, col, chan) inside."""
        p = self.cfg.patch_size
        b, c, h, w = imgs.shape
        x = imgs.reshape(b, c, h // p, p, w // p, p)
        return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), p * p * c)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """patches [B, N, p*p*3] -> imgs [B, 3, H, W] (inverse of patchify, square grid)."""
        p, g = self.cfg.patch_size, self.grid_size
        b = x.shape[0]
        x = x.reshape(b, g, g, p, p, 3).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(b, 3, g * p, g * p)

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """latent [B, k+n, D], ids_restore [B, N] -> pixel predictions pred [B, N, p*p*3]."""
        return self.decoder_pred(self.decode(latent, ids_restore))

    def decode(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """latent [B, k+n, D], ids_restore [B, N] -> the decoder's normed tokens [B, N, d], which
        the heads read (`decoder_pred`: pixels; `decoder_feature_pred`: teacher features).

        Mask tokens fill the N - n masked slots, ids_restore puts the sequence back in patch
        order, the k prefix tokens (cls) ride along and are dropped from the output.
        """
        k = self.num_prefix_tokens
        x = self.decoder_embed(latent)
        b, n_masked = x.shape[0], ids_restore.shape[1] + k - x.shape[1]
        seq = torch.cat([x[:, k:], self.mask_token.expand(b, n_masked, -1)], dim=1)
        seq = gather_visible(seq, ids_restore)  # back to patch order
        x = torch.cat([x[:, :k], seq], dim=1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_norm(x)[:, k:]

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
                mask: torch.Tensor, targets: torch.Tensor | list[torch.Tensor] | None = None,
                recon_weight: float = 0.5, mimic_weight: float = 0.5,
                decoder_targets: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """One MR-MAE loss. targets: teacher features of the visible tokens [B, n, C]
        (`gather_visible(all_targets, ids_keep)`), a list of them (joint: one per head,
        `mimic_head` first, then `joint_heads`), or None.

        With targets: loss = recon_weight * loss_recon + mimic_weight * loss_mimic, where
        loss_mimic is the mean of the heads' eq. 2 losses (so a joint run keeps the total
        mimic weight). Without (plain MAE): loss = loss_recon (unweighted), loss_mimic = 0.
        Returns {"loss", "loss_recon", "loss_mimic"} (scalars).

        decoder_targets (a model with `decoder_feature_pred`, table 3 row 5): the teacher's
        features of the masked tokens [B, m, C'] (`masked_ids(mask)` order) instead of
        `targets`: loss = recon_weight * loss_recon + mimic_weight * loss_recon_features, the
        latter the eq. 2 MSE of the decoder's feature head on the masked tokens; returns
        {"loss", "loss_recon", "loss_recon_features"}.
        """
        latent, visible = self.forward_encoder(imgs, ids_keep)
        decoded = self.decode(latent, ids_restore)
        loss_recon = self.recon_loss(imgs, self.decoder_pred(decoded), mask)
        if decoder_targets is not None:
            return self._feature_recon(decoded, mask, decoder_targets, loss_recon, recon_weight, mimic_weight)
        if targets is None:
            zero = torch.zeros((), device=loss_recon.device)
            return {"loss": loss_recon, "loss_recon": loss_recon, "loss_mimic": zero}
        if self.mimic_head is None:
            raise ValueError("targets given but the model has no mimic head: build it with teacher_dim > 0")
        targets = [targets] if isinstance(targets, torch.Tensor) else list(targets)
        heads = [self.mimic_head, *self.joint_heads]
        if len(targets) != len(heads):
            raise ValueError(f"{len(targets)} target sets for {len(heads)} mimic heads")
        for t in targets:
            if t.shape[:2] != ids_keep.shape:
                raise ValueError(f"targets must be the visible tokens' [B, n, C]; got {tuple(t.shape)} "
                                 f"for ids_keep {tuple(ids_keep.shape)} (use gather_visible)")
        loss_mimic = torch.stack([self.mimic_loss(h(visible), t) for h, t in zip(heads, targets)]).mean()
        loss = recon_weight * loss_recon + mimic_weight * loss_mimic
        return {"loss": loss, "loss_recon": loss_recon, "loss_mimic": loss_mimic}

    def _feature_recon(self, decoded: torch.Tensor, mask: torch.Tensor, targets: torch.Tensor,
                       loss_recon: torch.Tensor, recon_weight: float, weight: float) -> dict[str, torch.Tensor]:
        """The row-5 loss from the decoder's tokens [B, N, d] and the masked tokens' targets [B, m, C']."""
        if self.decoder_feature_pred is None:
            raise ValueError("decoder_targets given but the model has no decoder feature head: build it with "
                             "decoder_teacher_dim > 0")
        ids = masked_ids(mask)
        if targets.shape[:2] != ids.shape:
            raise ValueError(f"decoder_targets must be the masked tokens' [B, m, C]; got {tuple(targets.shape)} for "
                             f"{ids.shape[1]} masked tokens (gather them at masked_ids(mask))")
        loss_features = self.mimic_loss(self.decoder_feature_pred(gather_visible(decoded, ids)), targets)
        loss = recon_weight * loss_recon + weight * loss_features
        return {"loss": loss, "loss_recon": loss_recon, "loss_recon_features": loss_features}

"""Pretraining's step: what one micro-batch of MR-MAE does (`PretrainStep`), kept apart from
set-up (`pretrain.py`) and from the loop that both commands share (`loop.py`).

Every random choice of a step is a function of the seed and of where the sample sits:
the view (seed, epoch, key; stream.py), the mask (seed, optimiser step, position in the
effective batch; here). A resumed run therefore replays the same batches and masks as an
uninterrupted one, with no hidden RNG state to carry, and with --data-split samples a step
trains on the same samples, views and masks however its effective batch is split.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from mrmae.shared.seeding import generator_from
from mrmae.shared.views import normalize
from mrmae.train.batch import Batch
from mrmae.train.run.micro_batch import MASK_SEEDING, MicroBatch
from mrmae.train.config import StepOptions
from mrmae.train.masking import get_mask
from mrmae.train.student import masked_ids


def normalize_targets(targets: torch.Tensor, how: str) -> torch.Tensor:
    """Teacher tokens [B, n, C] -> normalised per token; the cache itself stays raw."""
    if how == "none":
        return targets
    if how == "layernorm":
        return F.layer_norm(targets, targets.shape[-1:])
    if how == "l2":
        return F.normalize(targets, dim=-1)
    raise ValueError(f"unknown target norm {how!r}")


def mask_generator(seed: int, key: int) -> torch.Generator:
    """The generator of one draw of mask noise: a function of (seed, key) only (`key`: the
    optimiser step, or the micro-step under mask seeding 1)."""
    return generator_from("mask", seed, key)


def draw_masks(batch_size: int, num_tokens: int, attention: torch.Tensor | None, opts: StepOptions,
               key: int, slot: int, slots: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids_keep [B, n], mask [B, N], ids_restore [B, N]) for rows [slot B, (slot + 1) B), on the CPU.

    One uniform noise tensor [slots x B, N] is drawn from (seed, key), and these rows of it
    are masked with the strategy (a function of each row's noise and attention alone). The
    loop keys it by optimiser step with the effective batch's slots (`MicroBatch.slot`), so
    a sample's mask depends on its place in the effective batch only; under mask seeding 1
    (older runs) the key is the micro-step and the slots the processes.
    """
    noise = torch.rand(slots * batch_size, num_tokens, generator=mask_generator(opts.seed, key))
    noise = noise[slot * batch_size:(slot + 1) * batch_size]
    return get_mask(opts.mask)(noise, opts.mask_ratio, None if attention is None else attention.float().cpu(),
                               opts.mask_options)


@dataclass
class PretrainStep:
    """The MR-MAE step of one micro-batch, for `loop.TrainRun.train`: render (crops from a
    `render_on_device` loader), normalise, run a live teacher, draw the masks, prepare the
    targets, forward -> {"loss", "loss_recon", "loss_mimic"} (scalars, not yet backpropagated).

    A `batch.Batch` from `train/stream.py`: [B,3,S,S] uint8 pixels, targets as stored (one
    TargetSet [B,N,C] per teacher) and [B,N] attention, or [B,3,T,T] uint8 teacher pixels
    in live mode; or the views' crops, rendered here (S the student's img_size, T the
    teacher's input_size).
    With `opts.high_level_at` "decoder" (table 3 row 5) the targets are the masked tokens',
    for the decoder's feature head, and the losses {"loss", "loss_recon", "loss_recon_features"}.
    `target_pca[j]`: (mean [C], basis [K, C]) on the device when `batch.targets[j]` (0: the
    main cache's, j >= 1: the joint ones') comes from a PCA cache; None (or a short list)
    for whole features.
    `mask_seeding`: `micro_batch.MASK_SEEDING`, or 1 for a run resumed from before it.
    """

    model: torch.nn.Module
    accelerator: object
    opts: StepOptions
    teacher: torch.nn.Module | None = None
    target_pca: Sequence[tuple[torch.Tensor, torch.Tensor] | None] = ()
    mask_seeding: int = MASK_SEEDING

    def __call__(self, batch: Batch, where: MicroBatch) -> dict[str, torch.Tensor]:
        opts, device, teacher = self.opts, self.accelerator.device, self.teacher
        inner = getattr(self.model, "module", self.model)
        batch = batch.rendered(device, inner.img_size, teacher.input_size if teacher is not None else 0)
        # uint8 from the loader, normalised here on the device
        imgs = normalize(batch.pixels.to(device, non_blocking=True), opts.pixel_mean, opts.pixel_std)
        live = attention = None
        if teacher is not None:
            with torch.no_grad(), self.accelerator.autocast():
                out = teacher(normalize(batch.teacher_pixels.to(device, non_blocking=True), teacher.mean, teacher.std))
            live, attention = out.features.float(), out.attention.float()
        else:
            attention = batch.attention
        key, slot, slots = ((where.step, where.slot, where.slots) if self.mask_seeding == MASK_SEEDING
                            else (where.micro, where.rank, where.world))
        ids_keep, mask, ids_restore = (t.to(device) for t in draw_masks(imgs.shape[0], inner.num_patches, attention,
                                                                       opts, key, slot, slots))
        at_decoder = opts.high_level_at == "decoder"  # row 5: the masked tokens' features, for the decoder's head
        targets = (prepare_targets(batch, masked_ids(mask) if at_decoder else ids_keep, device, self.target_pca,
                                   opts.target_norm, live) if opts.mimic_weight > 0 else None)
        with self.accelerator.autocast():
            losses = self.model(imgs, ids_keep, ids_restore, mask, None if at_decoder else targets,
                                recon_weight=opts.recon_weight, mimic_weight=opts.mimic_weight,
                                decoder_targets=targets if at_decoder else None)
        return {k: v for k, v in losses.items() if k.startswith("loss")}


def prepare_targets(batch: Batch, ids_keep: torch.Tensor, device: torch.device,
                    target_pca: Sequence[tuple[torch.Tensor, torch.Tensor] | None], norm: str,
                    live: torch.Tensor | None = None) -> torch.Tensor | list[torch.Tensor] | None:
    """The targets of the tokens `ids_keep` [B, n] (the visible ones; table 3 row 5: the masked
    ones) as the loss takes them: [B, n, C] float32 on `device`, or a
    list of them for a joint run (one per mimic head, in `batch.targets`' order: the main
    teacher's, then the joint ones'); None when the batch has none (plain MAE).

    `live` [B, N, C]: a live teacher's float features (never quantised nor coefficients).
    Otherwise the batch's stored sets (TargetSet: [B, N, C] int8 with a scale [B, N] or
    [B, N, G], or float16; a PCA cache's [B, N, K] coefficients with `target_pca[j]`):
    each gathered, dequantised, rebuilt from its PCA basis, normalised (`norm`).
    """
    if live is not None:
        return _visible_targets(live, None, ids_keep, device, None, norm)
    if not batch.targets:
        return None
    sets = [_visible_targets(t.values, t.scale, ids_keep, device, target_pca[j] if j < len(target_pca) else None, norm)
            for j, t in enumerate(batch.targets)]
    return sets if len(sets) > 1 else sets[0]


def visible_float_targets(targets: torch.Tensor, scale: torch.Tensor | None, ids_keep: torch.Tensor,
                          device: torch.device) -> torch.Tensor:
    """targets [B, N, C] (int8 with scale [B, N], or [B, N, G] for G groups of channels;
    float16 or float32) -> the visible tokens' float32 targets [B, n, C] on `device`.

    The stored values cross to the device (int8: a quarter of float32's bytes), the
    visible quarter is kept, and only that is dequantised.
    """
    from mrmae.train.student import gather_visible

    t = gather_visible(targets.to(device, non_blocking=True), ids_keep).float()
    if scale is None:
        return t
    s = gather_visible(scale.to(device, non_blocking=True), ids_keep).float()
    if s.ndim == t.ndim:  # [B, n, G]: each scale covers C / G channels
        return (t.unflatten(-1, (s.shape[-1], -1)) * s.unsqueeze(-1)).flatten(-2)
    return t * s.unsqueeze(-1)


def pca_reconstruct(coefficients: torch.Tensor, mean: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """coefficients [B, n, K] float32 -> teacher features [B, n, C] = coefficients @ basis + mean.

    Applied after the visible tokens were gathered: the loader carries K values per token
    (the cache's bytes), and only the visible quarter is expanded to C, on the device.
    `mean` [C] and `basis` [K, C]: float32, on the coefficients' device.
    """
    flat = torch.addmm(mean, coefficients.reshape(-1, coefficients.shape[-1]), basis)
    return flat.reshape(*coefficients.shape[:-1], basis.shape[-1])


def _visible_targets(stored: torch.Tensor, scale: torch.Tensor | None, ids_keep: torch.Tensor, device: torch.device,
                     pca: tuple[torch.Tensor, torch.Tensor] | None, norm: str) -> torch.Tensor:
    """One target set's visible tokens [B, n, C] as the loss takes them: gathered, then
    dequantised, then (PCA caches) reconstructed, then normalised."""
    t = visible_float_targets(stored, scale, ids_keep, device)
    if pca is not None:
        t = pca_reconstruct(t, *pca)
    return normalize_targets(t, norm)

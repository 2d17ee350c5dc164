"""The training engine: one epoch of MR-MAE steps, kept apart from set-up and the CLI.

Every random choice of a step is a function of the seed and of where the sample sits:
the view (seed, epoch, key; data.py), the mask (seed, micro-step, row of the global
batch; here). A resumed run therefore replays the same batches and
masks as an uninterrupted one, with no hidden RNG state to carry.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F

from mrmae.shared.errors import MrmaeError
from mrmae.shared.seeding import generator_from
from mrmae.shared.views import normalize
from mrmae.train.data import IMAGENET_MEAN, IMAGENET_STD, render_views
from mrmae.train.masking import get_mask


class NonFiniteLossError(MrmaeError, FloatingPointError):
    """A loss that is NaN or infinite: the run stops; the last good checkpoint stays."""


@dataclass
class StepOptions:
    mask: str = "random"  # a registered masking strategy (train/masks/: "random", "focused", ...)
    mask_ratio: float = 0.75
    mask_options: dict[str, float] = field(default_factory=dict)  # its options; absent ones take their defaults
    recon_weight: float = 0.5
    mimic_weight: float = 0.5
    target_norm: str = "none"  # "none" | "layernorm" | "l2"
    seed: int = 0
    pixel_mean: tuple[float, float, float] = IMAGENET_MEAN  # the student's input normalisation (0-1 units)
    pixel_std: tuple[float, float, float] = IMAGENET_STD


def lr_at(step: float, base_lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Linear warm-up to `base_lr`, then half-cosine to `min_lr` (held after `total_steps`)."""
    if step < warmup_steps:
        return base_lr * step / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def normalize_targets(targets: torch.Tensor, how: str) -> torch.Tensor:
    """Teacher tokens [B, n, C] -> normalised per token; the cache itself stays raw."""
    if how == "none":
        return targets
    if how == "layernorm":
        return F.layer_norm(targets, targets.shape[-1:])
    if how == "l2":
        return F.normalize(targets, dim=-1)
    raise ValueError(f"unknown target norm {how!r}")


def mask_generator(seed: int, micro_step: int) -> torch.Generator:
    """The generator of one micro-step's mask noise: a function of (seed, micro-step) only."""
    return generator_from("mask", seed, micro_step)


def draw_masks(batch_size: int, num_tokens: int, attention: torch.Tensor | None, opts: StepOptions,
               micro_step: int, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids_keep [B, n], mask [B, N], ids_restore [B, N]) for this rank's rows, on the CPU.

    One uniform noise tensor is drawn for the whole global batch (world x B rows) from
    (seed, micro-step); each rank masks its own rows with its slice. A sample's mask thus
    depends on its place in the global batch, not on the process count.
    """
    noise = torch.rand(world * batch_size, num_tokens, generator=mask_generator(opts.seed, micro_step))
    noise = noise[rank * batch_size:(rank + 1) * batch_size]
    return get_mask(opts.mask)(noise, opts.mask_ratio, None if attention is None else attention.float().cpu(),
                               opts.mask_options)


def train_one_epoch(model: torch.nn.Module, batches: Iterable[dict], optimizer: torch.optim.Optimizer,
                    accelerator, epoch: int, start_step: int, opts: StepOptions,
                    set_lr: Callable[[int], float], teacher: torch.nn.Module | None = None,
                    on_step: Callable[[int, dict], None] | None = None,
                    target_pca: Sequence[tuple[torch.Tensor, torch.Tensor] | None] = ()) -> int:
    """Run optimiser steps over `batches`; returns the global step reached.

    Each batch is a dict from `mrmae.train.data` ([B,3,S,S] uint8 pixels, optional [B,N,C]
    targets as stored (int8 with [B,N] or [B,N,G] targets_scale, or float16) and [B,N] attention,
    or [B,3,T,T] uint8 teacher pixels in live mode); from a `render_on_device` loader, the
    views' crops instead of pixels and teacher pixels, rendered here on the device
    (`data.render_views`: S the student's img_size, T the live teacher's input_size).
    `target_pca[j]`: (mean [C], basis [K, C]) on the device when target set j (0: `targets`,
    j >= 1: `targets@j`) comes from a PCA cache, whose stored targets are [B,N,K] coefficients;
    None (or a short list) for caches that store the features whole.
    """
    model.train()
    device = accelerator.device
    step, rank = start_step, accelerator.process_index
    micro = start_step * accelerator.gradient_accumulation_steps  # seeds the masks
    tick = time.perf_counter()
    for batch in batches:
        # render_on_device loaders hand over crops: their views are rendered here, exactly
        batch = render_views(batch, device, getattr(model, "module", model).img_size,
                             teacher.input_size if teacher is not None else 0)
        # uint8 from the loader, normalised here on the device
        imgs = normalize(batch["pixels"].to(device, non_blocking=True), opts.pixel_mean, opts.pixel_std)
        targets, attention = batch.get("targets"), batch.get("attention")
        if teacher is not None:
            with torch.no_grad(), accelerator.autocast():
                out = teacher(normalize(batch["teacher_pixels"].to(device, non_blocking=True), teacher.mean, teacher.std))
            targets, attention = out.features.float(), out.attention.float()
        n_tokens = model_num_patches(model)
        ids_keep, mask, ids_restore = draw_masks(imgs.shape[0], n_tokens, attention, opts, micro, rank,
                                                 accelerator.num_processes)
        micro += 1
        ids_keep, mask, ids_restore = ids_keep.to(device), mask.to(device), ids_restore.to(device)
        visible_targets = None
        if targets is not None and opts.mimic_weight > 0:
            cached = teacher is None  # live targets are the teacher's float features, never coefficients
            scale = batch.get("targets_scale") if cached else None
            visible_targets = _visible_targets(targets, scale, ids_keep, device, _pca_of(target_pca, 0, cached),
                                               opts.target_norm)
            joint = [_visible_targets(batch[f"targets@{j}"], batch.get(f"targets_scale@{j}"), ids_keep, device,
                                      _pca_of(target_pca, j, cached), opts.target_norm)
                     for j in range(1, 1 + sum(1 for k in batch if k.startswith("targets@")))]
            if joint:  # one target set per mimic head
                visible_targets = [visible_targets, *joint]
        with accelerator.accumulate(model):
            with accelerator.autocast():
                losses = model(imgs, ids_keep, ids_restore, mask, visible_targets,
                               recon_weight=opts.recon_weight, mimic_weight=opts.mimic_weight)
            loss = losses["loss"]
            if not torch.isfinite(loss.detach()).all():
                parts = {k: float(torch.as_tensor(losses[k]).detach()) for k in ("loss_recon", "loss_mimic")}
                raise NonFiniteLossError(f"epoch {epoch} step {step}: loss is {loss.item()} "
                                         f"(recon {parts['loss_recon']}, mimic {parts['loss_mimic']})")
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                lr = set_lr(step)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if not accelerator.sync_gradients:
            continue
        step += 1
        now = time.perf_counter()
        world_imgs = imgs.shape[0] * accelerator.num_processes * accelerator.gradient_accumulation_steps
        record = {"epoch": epoch, "step": step, "lr": lr, "images_per_s": world_imgs / max(now - tick, 1e-9)}
        for k in ("loss", "loss_recon", "loss_mimic"):
            record[k] = accelerator.reduce(torch.as_tensor(losses[k], device=device).detach().float(), "mean").item()
        tick = now
        if on_step is not None:
            on_step(step, record)
    return step


class InterruptibleLoader(torch.utils.data.DataLoader):
    """A DataLoader whose worker start-up Ctrl-C cannot cut. While `iter()` forks the
    workers, SIGINT is blocked (the workers inherit the mask and, with
    `worker_ignores_interrupt`, discard it) and a SIGINT the main process had already
    received is only noted; it is raised once the iterator is whole, where torch can stop
    its workers. Unguarded, a SIGINT landing in the fork killed a half-started worker (a
    traceback), broke the iterator half-built, or was swallowed by an at-fork handler (the
    run went on)."""

    def __iter__(self):
        import signal
        import threading

        if self.num_workers == 0 or threading.current_thread() is not threading.main_thread():
            return super().__iter__()
        noted: list[int] = []
        previous = signal.signal(signal.SIGINT, lambda signum, frame: noted.append(signum))
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            batches = super().__iter__()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)
        if noted:
            del batches  # a whole iterator: its workers are stopped
            raise KeyboardInterrupt
        return batches


def epoch_passes(stream, loader: Iterable[dict], epoch: int, empty: Exception) -> Iterator[dict]:
    """This rank's batches for `epoch`: `stream.set_epoch(epoch, repeat)`, then the loader,
    again with the next `repeat` when its shards run out (ranks with fewer samples keep up
    with the others' step count); `empty` is raised when a pass yields nothing at all."""
    for repeat in itertools.count():
        stream.set_epoch(epoch, repeat)
        got = False
        for batch in loader:
            got = True
            yield batch
        if not got:
            raise empty


def visible_float_targets(targets: torch.Tensor, scale: torch.Tensor | None, ids_keep: torch.Tensor,
                          device: torch.device) -> torch.Tensor:
    """targets [B, N, C] (int8 with scale [B, N], or [B, N, G] for G groups of channels;
    float16 or float32) -> the visible tokens' float32 targets [B, n, C] on `device`.

    The stored values cross to the device (int8: a quarter of float32's bytes), the
    visible quarter is kept, and only that is dequantised.
    """
    from mrmae.train.models import gather_visible

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


def _pca_of(target_pca: Sequence[tuple[torch.Tensor, torch.Tensor] | None], j: int,
            cached: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
    return target_pca[j] if cached and j < len(target_pca) else None


def _visible_targets(stored: torch.Tensor, scale: torch.Tensor | None, ids_keep: torch.Tensor, device: torch.device,
                     pca: tuple[torch.Tensor, torch.Tensor] | None, norm: str) -> torch.Tensor:
    """One target set's visible tokens [B, n, C] as the loss takes them: gathered, then
    dequantised, then (PCA caches) reconstructed, then normalised."""
    t = visible_float_targets(stored, scale, ids_keep, device)
    if pca is not None:
        t = pca_reconstruct(t, *pca)
    return normalize_targets(t, norm)


def model_num_patches(model: torch.nn.Module) -> int:
    inner = getattr(model, "module", model)
    return inner.num_patches

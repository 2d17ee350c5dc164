"""One training loop for `mrmae pretrain` and `mrmae finetune`.

A command builds its data, model, optimiser and fingerprint, then gives a `TrainRun` its
steps (each epoch's optimiser steps, each a sequence of micro-batches) and its step
function (one micro-batch -> its losses); the run does the rest, the same way
for both: the accelerator, the lr (blr x effective batch / 256, linear warm-up, then
half-cosine per optimiser step), steps per epoch, checkpoints and `--resume` (the batches
a resumed epoch already trained on are skipped), config.json, metrics.jsonl (one line per
optimiser step), tensorboard, the progress bar, the stop on a non-finite loss, and the
accumulate / backward / optimiser-step block.

Effective batch: E = B x W x A images per optimiser step (--batch-size B, W processes,
--accum-steps A). Micro-batch a (0..A-1) of a step on rank r holds the rows
[(a W + r) B, (a W + r + 1) B) of the step's E (`MicroBatch.slot`), which is how
`stream.rank_slots` hands out the samples with `--data-split samples`. A step's random
draws are keyed by the optimiser step and the row's position in E (not by micro-step,
process or row of a micro-batch), so that, with `--data-split samples`, a step trains on
the same samples, views and masks whatever split of E gives it.
"""

from __future__ import annotations

import itertools
import math
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from tqdm import tqdm

from mrmae.shared.errors import MrmaeError, OptionError
from mrmae.train.run import checkpoint as ckpt
from mrmae.train.run.records import (Resolved, StepRecord, ValidationRecord, append_metrics, read_run_config,
                                 write_run_config)
from mrmae.train.run.micro_batch import MASK_SEEDING, MicroBatch
from mrmae.train.run.run_dir import set_aside

class NonFiniteLossError(MrmaeError, FloatingPointError):
    """A loss that is NaN or infinite: the run stops; the last good checkpoint stays."""


StepFn = Callable[[Any, MicroBatch], dict[str, torch.Tensor]]  # -> {"loss": scalar to backpropagate, parts...}


def lr_at(step: float, peak_lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Linear warm-up to `peak_lr`, then half-cosine to `min_lr` (held after `total_steps`)."""
    if step < warmup_steps:
        return peak_lr * step / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def resolve_accum_steps(batch_size: int, accum_steps: int | None, effective_batch: int | None,
                        processes: int) -> int:
    """The gradient accumulation steps of a run: --accum-steps (default 1) or, with
    --effective-batch N, N / (batch_size x processes), so a recipe's batch holds on any number
    of GPUs. OptionError when N is no multiple of that, or --accum-steps asks for another."""
    for option, value in (("--accum-steps", accum_steps), ("--effective-batch", effective_batch)):
        if value is not None and value < 1:
            raise OptionError(f"{option} {value}: must be at least 1")
    if effective_batch is None:
        return accum_steps or 1
    per_micro = batch_size * processes
    if effective_batch % per_micro:
        raise OptionError(f"--effective-batch {effective_batch}: not a multiple of --batch-size {batch_size} x "
                          f"{processes} processes = {per_micro} images per micro-step; change --batch-size "
                          "or the process count")
    derived = effective_batch // per_micro
    if accum_steps is not None and accum_steps != derived:
        raise OptionError(f"--accum-steps {accum_steps}: --effective-batch {effective_batch} at --batch-size "
                          f"{batch_size} x {processes} processes needs --accum-steps {derived}; give one of the two")
    return derived


def check_epoch_fits(cfg, processes: int, samples: int, counted_in: str) -> None:
    """An optimiser step of more images than an epoch has would repeat samples within the
    step and make the epoch one step long (`cfg`: a PretrainConfig or FinetuneConfig)."""
    eff = cfg.batch_size * cfg.accum_steps * processes
    if eff > samples:
        named = f"--effective-batch {eff}" if cfg.effective_batch else f"--batch-size {cfg.batch_size}"
        raise OptionError(f"{named}: {eff} images per step (--batch-size {cfg.batch_size} x --accum-steps "
                          f"{cfg.accum_steps} x {processes} processes) is more than the {samples} samples of an "
                          f"epoch ({counted_in})")


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 'es' if word.endswith('s') else 's'}"


def fit_warmup(warmup_epochs: float, epochs: int, written_for: int) -> tuple[float, str | None]:
    """A warm-up the user did not give (a command's default, or a --config recipe's) that is
    as long as this run or longer, shortened to keep its share of the schedule it was written
    for (`written_for` epochs: 5 of MAE's 100 fine-tuning epochs is 5%, so 0.1 of 2): (the
    warm-up, a note saying so, or None when it fits as it is)."""
    if warmup_epochs <= 0 or warmup_epochs < epochs:
        return warmup_epochs, None
    fitted = warmup_epochs * epochs / max(written_for, epochs + 1)
    return fitted, (f"--warmup-epochs {warmup_epochs:g} (not given on the command line) is as long as this "
                    f"{epochs}-epoch run; warming up for {fitted:.3g} epochs instead, its share of the "
                    f"{written_for} epochs it was set for")


def make_accelerator(device: str = "auto"):
    """bf16 on CUDA (`device` "auto" where there is CUDA); otherwise cpu=True, so multi-process
    runs join with gloo on the CPU."""
    from accelerate import Accelerator

    from mrmae.shared.launch import process_rank

    process_rank()  # (says when a multi-machine launch started this process alone)
    cuda = torch.cuda.is_available() and device != "cpu"
    return Accelerator(mixed_precision="bf16" if cuda else "no", cpu=not cuda)


def optimiser_steps(model: torch.nn.Module, optimizer: torch.optim.Optimizer, accelerator,
                    steps: Iterable[Sequence[Any]], step_fn: StepFn, set_lr: Callable[[int], float],
                    epoch: int, start_step: int, images_per_step: int) -> Iterator[StepRecord]:
    """One optimiser step per item of `steps` (this process's `accum` micro-batches of it);
    yields each step's record: epoch, step (done, 1-based), lr, each loss of `step_fn` as the
    mean over the step's micro-batches and the processes, images_per_s.

    accelerate scales each micro-batch's loss by 1 / accum and DDP averages over processes,
    so the gradient is the mean of the micro-batch means: the mean over E when every
    micro-batch holds B rows and each loss is a mean over rows. NonFiniteLossError names
    epoch, step and the losses when a micro-batch's loss is NaN or infinite.
    """
    model.train()
    rank, world, accum = accelerator.process_index, accelerator.num_processes, accelerator.gradient_accumulation_steps
    step, tick = start_step, time.perf_counter()
    for micro_batches in steps:
        lr = set_lr(step)
        sums: dict[str, torch.Tensor] = {}
        for index, batch in enumerate(micro_batches):
            with accelerator.accumulate(model):
                losses = step_fn(batch, MicroBatch(epoch, step, index, rank, world, accum))
                _check_finite(losses, epoch, step)
                accelerator.backward(losses["loss"])
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            for k, v in losses.items():
                sums[k] = sums.get(k, 0) + torch.as_tensor(v, device=accelerator.device).detach().float()
        step += 1
        means = accelerator.reduce(torch.stack(list(sums.values())) / len(micro_batches), "mean").tolist()
        now = time.perf_counter()
        yield StepRecord(epoch, step, lr, dict(zip(sums, means)), images_per_step / max(now - tick, 1e-9))
        tick = now


def _check_finite(losses: dict[str, torch.Tensor], epoch: int, step: int) -> None:
    loss = losses["loss"].detach()
    if not torch.isfinite(loss).all():
        parts = ", ".join(f"{k.removeprefix('loss_')} {float(torch.as_tensor(v).detach())}"
                          for k, v in losses.items() if k != "loss")
        raise NonFiniteLossError(f"epoch {epoch} step {step}: loss is {loss.item()}" + (f" ({parts})" if parts else ""))


class TrainRun:
    """One training run's machinery around a command's step (module docstring).

    Use: `run = TrainRun(cfg, "pretrain")`; `run.plan(samples, ...)`; `model, optimizer =
    run.start(model, optimizer, fingerprint)`; `run.write_config({...})`;
    `result = run.train(steps_of, step_fn)`. `cfg`: a PretrainConfig or FinetuneConfig
    (out, epochs, batch_size, accum_steps, effective_batch, blr, lr, min_lr, warmup_epochs,
    resume, save_every_steps, progress, device); `run.cfg` has accum_steps resolved.
    """

    def __init__(self, cfg, task: str, *, mask_seeding: int | None = None):
        self.accelerator = make_accelerator(getattr(cfg, "device", "auto"))  # --device
        self.cuda = self.accelerator.device.type == "cuda"
        world = self.accelerator.num_processes
        self.cfg = replace(cfg, accum_steps=resolve_accum_steps(cfg.batch_size, cfg.accum_steps,
                                                                cfg.effective_batch, world))
        self.accelerator.gradient_accumulation_steps = self.cfg.accum_steps  # known once the process count is
        self.task, self.out, self.mask_seeding = task, Path(cfg.out), mask_seeding
        self.effective_batch = cfg.batch_size * self.cfg.accum_steps * world
        # the peak lr: --lr as given, else MAE's rule, --blr x effective batch / 256
        self.peak_lr = cfg.lr if cfg.lr is not None else cfg.blr * self.effective_batch / 256
        self.is_main = self.accelerator.is_main_process

    def plan(self, samples: int, counted_in: str, full_steps_only: bool = True) -> None:
        """Steps per epoch from the `samples` of an epoch (`counted_in`: where they were
        counted, for the refusal when one step would hold more); `full_steps_only` False:
        a last partial step counts (--data-split shards, whose ranks repeat their shards)."""
        check_epoch_fits(self.cfg, self.accelerator.num_processes, samples, counted_in)
        rounding = math.floor if full_steps_only else math.ceil
        self.steps_per_epoch = max(1, rounding(samples / self.effective_batch))
        self.total_steps = self.steps_per_epoch * self.cfg.epochs
        self.warmup_steps = int(self.cfg.warmup_epochs * self.steps_per_epoch)

    def lr(self, step: int) -> float:
        return lr_at(step, self.peak_lr, self.cfg.min_lr, self.warmup_steps, self.total_steps)

    def start(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, fingerprint: ckpt.Fingerprint,
              compile: str | None = None) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        """Fresh or resumed (`cfg.resume`: the fingerprint, batch included, is checked before
        any file is touched); then compiled in place (`compile`: a torch.compile backend;
        names, checkpoints and DDP unchanged) and prepared. Returns the prepared pair."""
        c = self.cfg
        self.fingerprint = ckpt.Fingerprint((*fingerprint.fields, ckpt.batch_field(
            c.batch_size, c.accum_steps, self.accelerator.num_processes)))
        if c.overwrite and self.is_main and (aside := set_aside(self.out)) is not None:
            tqdm.write(f"mrmae: note: --overwrite: the run that was in {self.out} is now {aside}", file=sys.stderr)
        resume = c.resume_from or c.resume  # --resume-from auto|PATH, else --resume's latest
        self.state, self.metrics = ckpt.start_or_resume(self.out, resume, model, optimizer, self.is_main,
                                                        self.fingerprint)
        resumed = ckpt.resume_point(self.out, resume)
        if resumed is not None:
            self._note_other_workers()
        if resumed is not None and self.mask_seeding is not None:
            self.mask_seeding = ckpt.read_state(resumed).get("mask_seeding", 1)
            if self.mask_seeding != MASK_SEEDING and c.accum_steps > 1 and self.is_main:
                tqdm.write(f"mrmae: note: {resumed} was trained with masks drawn per micro-step (mask seeding "
                           f"{self.mask_seeding}); this run goes on with that rule", file=sys.stderr)
        if compile:
            model.compile(backend=compile)
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        return self.model, self.optimizer

    def _note_other_workers(self) -> None:
        """A resumed run with another --workers than the run had (its default is the machine's
        cores): each loader worker reads its own shards in its own shuffle, so the batches
        of the epoch's rest differ from an uninterrupted run's, and as --resume skips the
        steps already done by count, samples may repeat or be left out until the epoch ends."""
        try:
            was = read_run_config(self.out).workers
        except (OSError, ValueError):
            return
        if was is not None and was != self.cfg.workers and self.is_main:
            tqdm.write(f"mrmae: warning: --workers {self.cfg.workers}, but {self.out} ran with {was}: the rest of "
                       "this epoch is read in another order than an uninterrupted run's (samples may repeat or be "
                       f"left out until the epoch ends); give --workers {was} to replay it exactly", file=sys.stderr)

    def write_config(self, fields: dict) -> None:
        """OUT/config.json: `fields` (the command's options and what it resolved) and the
        run's own: the lr as resolved (`lr`: the peak; `lr_rule`: how it was found), the
        effective batch, steps, processes, mask seeding, and `provenance` (versions,
        revision, command line, host, devices)."""
        if not self.is_main:
            return
        from mrmae.shared.provenance import provenance

        c = self.cfg
        rule = "--lr" if c.lr is not None else f"--blr {c.blr:g} x {self.effective_batch} / 256"
        write_run_config(self.out, fields, Resolved(
            self.peak_lr, rule, self.effective_batch, self.steps_per_epoch, self.total_steps, self.warmup_steps,
            self.accelerator.num_processes, provenance(self.devices()), self.mask_seeding))

    def devices(self) -> list[str]:
        """This run's devices as recorded: 'cpu', or 'cuda:N NAME' per process of this machine."""
        device = self.accelerator.device
        if device.type != "cuda":
            return [f"{device.type} x {plural(self.accelerator.num_processes, 'process')}"]
        name = torch.cuda.get_device_name(device)
        return [f"{device.type} x {plural(self.accelerator.num_processes, 'process')} ({name})"]

    def start_line(self, what: str) -> str:
        """The line a run starts with: `what` (the command's model, mode, teacher, cache), then
        the steps, the effective batch and its split, the lr as resolved and the warm-up."""
        c = self.cfg
        lr = f"lr {self.peak_lr:.3g}" + ("" if c.lr is not None else f" (--blr {c.blr:g} x {self.effective_batch}/256)")
        warm = f", warm-up {self.warmup_steps} steps" if self.warmup_steps else ""
        resumed = f", resuming at step {self.state.step}" if self.state.step else ""
        return (f"{self.task}: {what}; {c.epochs} epochs x {self.steps_per_epoch} steps = {self.total_steps} steps of "
                f"{self.effective_batch} images ({c.batch_size} x {plural(self.accelerator.num_processes, 'process')} x "
                f"{c.accum_steps} accumulated); {lr}{warm}{resumed}; -> {self.out}")

    def log(self, record: StepRecord | ValidationRecord) -> None:
        """Append `record` to OUT/metrics.jsonl (main process only)."""
        if self.is_main:
            append_metrics(self.metrics, record)

    def train(self, steps_of: Callable[[int], Iterable[Sequence]], step_fn: StepFn,
              end_of_epoch: Callable[[int], None] | None = None, what: str = "") -> dict:
        """Every epoch from the resumed one: `steps_of(epoch)` (this process's optimiser
        steps, each a sequence of its `accum_steps` micro-batches; `loader.grouped` makes
        them), the epoch's share of them, the ones done skipped, trained with `step_fn`; then `end_of_epoch(epoch)` (fine-tuning evaluates) and a checkpoint. The
        start line (`what`: the command's model and data) is printed first. Returns {out,
        checkpoint, metrics, steps, main_process, seconds, images_per_s, last (the last
        step's record)}; `summary(result)` is the end's lines."""
        c, state = self.cfg, self.state
        if self.is_main:
            tqdm.write(self.start_line(what), file=sys.stdout)
        self._bar = tqdm(total=self.total_steps, initial=state.step, desc=self.task, unit="step",
                         disable=not (c.progress and self.is_main), dynamic_ncols=True)
        self._writer = _LazyWriter(self.out) if self.is_main else None
        self._last: StepRecord | None = None
        first_step, tick = state.step, time.perf_counter()
        last_path = ckpt.latest_checkpoint(self.out)
        for epoch in range(state.epoch, c.epochs):
            steps = itertools.islice(steps_of(epoch), self.steps_per_epoch)
            for _ in range(state.step_in_epoch):  # the data position of a resumed epoch
                next(steps, None)
            try:
                for record in optimiser_steps(self.model, self.optimizer, self.accelerator, steps, step_fn,
                                              self._set_lr, epoch, state.step, self.effective_batch):
                    self._after_step(record)
            except NonFiniteLossError as e:
                raise NonFiniteLossError(f"{e}; the last good checkpoint is {ckpt.latest_checkpoint(self.out)}"
                                         ) from None
            if end_of_epoch is not None:
                end_of_epoch(epoch)
            state.epoch, state.step_in_epoch = epoch + 1, 0
            last_path = self.save()
        self._bar.close()
        if self._writer is not None:
            self._writer.close()
        self.accelerator.wait_for_everyone()
        seconds = time.perf_counter() - tick
        return {"out": str(self.out), "checkpoint": str(last_path), "metrics": str(self.metrics), "steps": state.step,
                "main_process": self.is_main, "seconds": seconds,
                "images_per_s": (state.step - first_step) * self.effective_batch / max(seconds, 1e-9),
                "last": self._last, "tensorboard": self._writer is not None and self._writer.writer is not None}

    def log_scalars(self, record: StepRecord | ValidationRecord, prefix: str) -> None:
        """`record`'s numbers to TensorBoard under `prefix/` at the run's step (main process)."""
        if self._writer is not None:
            for k, v in record.to_json().items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("epoch", "step"):
                    self._writer.add_scalar(f"{prefix}/{k}", v, self.state.step)

    def _set_lr(self, step: int) -> float:
        lr = self.lr(step)
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)  # fine-tuning's layer-wise decay
        return lr

    def _after_step(self, record: StepRecord) -> None:
        state = self.state
        state.step, state.step_in_epoch = record.step, state.step_in_epoch + 1
        self.log(record)
        self.log_scalars(record, "train")
        self._last = record
        self._bar.set_postfix(loss=f"{record.losses['loss']:.4f}", img_s=f"{record.images_per_s:.0f}")
        self._bar.update(1)
        mid_epoch = state.step_in_epoch < self.steps_per_epoch  # the epoch's end saves anyway
        if self.cfg.save_every_steps and state.step % self.cfg.save_every_steps == 0 and mid_epoch:
            self.save()

    def save(self) -> Path | None:
        """A checkpoint of the run's state (main process writes; every process waits)."""
        self.accelerator.wait_for_everyone()
        path = None
        if self.is_main:
            extra = {"task": self.task, "fingerprint": self.fingerprint.to_json()}
            if self.mask_seeding is not None:
                extra["mask_seeding"] = self.mask_seeding
            path = ckpt.save_checkpoint(self.out, self.accelerator.unwrap_model(self.model), self.optimizer,
                                        self.state, extra)
        self.accelerator.wait_for_everyone()
        return path


class _LazyWriter:
    """TensorBoard scalars into OUT/tensorboard, its SummaryWriter made with the first scalar:
    a run stopped before its first step (bad data found by the loader) leaves no events
    file. Without the tensorboard package, one note line and nothing else (metrics.jsonl
    has every step either way)."""

    def __init__(self, out: Path) -> None:
        self.out, self.writer, self.missing = out, None, False

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        if self.writer is None and not self.missing:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                self.missing = True
                tqdm.write("mrmae: note: tensorboard is not installed (pip install tensorboard): no OUT/tensorboard "
                           "logs; metrics.jsonl has every step", file=sys.stderr)
                return
            self.writer = SummaryWriter(str(self.out / "tensorboard"))
        if self.writer is not None:
            self.writer.add_scalar(tag, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def summary(result: dict) -> list[str]:
    """The end of a run, a line each: steps, time and images/s; the last step's losses; where
    everything went."""
    last = result["last"]
    losses = ", ".join(f"{k} {v:.4f}" for k, v in (last.losses if last is not None else {}).items())
    out = Path(result["out"])
    logs = ", tensorboard/" if result["tensorboard"] else ""
    return [f"{result['steps']} steps done; this process trained {result['seconds']:.1f} s at "
            f"{result['images_per_s']:.1f} images/s" + (f"; last step: {losses}" if losses else ""),
            f"run: {out} (config.json, metrics.jsonl{logs}); checkpoint: {result['checkpoint']}"]

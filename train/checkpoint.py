"""Checkpoints: written whole under a temporary name, renamed into place, never unpickled.

    OUT/checkpoints/step00000120/
        model.safetensors      the student's weights
        optimizer.pt           optimiser state and RNG states (tensors and plain containers
                               only; loaded with torch.load(weights_only=True))
        state.json             epoch, step, step_in_epoch (the data position), and the run's
                               fingerprint (`Fingerprint`: what it trains on and what shapes
                               its weights), which `--resume` compares before touching the run
    OUT/checkpoints/latest     the name of the newest complete checkpoint
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from mrmae.shared.errors import naming

KEEP = 2  # complete checkpoints kept on disk


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or that a resumed run does not fit; names the file or field."""


@dataclass(frozen=True)
class FingerprintField:
    """One part of a run's identity: `shown` is what a user recognises (a path, a model
    name), `digest` the sha256 of everything the part stands for."""

    name: str
    shown: str
    digest: str


def fingerprint_field(name: str, shown: str, value: object) -> FingerprintField:
    """A field whose digest is the sha256 of `value`'s canonical JSON."""
    blob = json.dumps(value, sort_keys=True, default=str, separators=(",", ":"))
    return FingerprintField(name, shown, hashlib.sha256(blob.encode()).hexdigest())


@dataclass(frozen=True)
class Fingerprint:
    """What a run trains on and what shapes its weights (e.g. task, cache, teacher_dim,
    model, data), compared field by field in this order when a run resumes."""

    fields: tuple[FingerprintField, ...]

    def to_json(self) -> dict:
        return {f.name: {"shown": f.shown, "digest": f.digest} for f in self.fields}

    @staticmethod
    def from_json(blob: object, where: Path) -> Fingerprint:
        try:
            return Fingerprint(tuple(FingerprintField(str(k), str(v["shown"]), str(v["digest"]))
                                     for k, v in dict(blob).items()))
        except (TypeError, KeyError, ValueError) as e:
            raise CheckpointError(f"{where}: unreadable fingerprint ({e!r})") from None


@dataclass
class TrainState:
    epoch: int = 0  # the epoch in progress
    step: int = 0  # optimiser steps done in all
    step_in_epoch: int = 0  # optimiser steps done in `epoch` (batches to skip on resume)

    def to_json(self) -> dict:
        return {"epoch": self.epoch, "step": self.step, "step_in_epoch": self.step_in_epoch}


def save_checkpoint(out: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    state: TrainState, extra: dict | None = None) -> Path:
    """Write a checkpoint for `state` and point `latest` at it; returns its directory. `extra`
    goes into state.json too (e.g. {"fingerprint": Fingerprint.to_json()})."""
    root = Path(out) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"step{state.step:08d}"
    tmp = root / f".tmp-{name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    blob = io.BytesIO()
    torch.save({"optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state()}, blob)
    final = root / name
    files = {"model.safetensors": safetensors_bytes(weights), "optimizer.pt": blob.getvalue(),
             "state.json": json.dumps({**state.to_json(), **(extra or {})}, indent=1).encode()}
    for file, data in files.items():  # serialised in memory, written by Python: errors carry a path
        try:
            write_bytes(tmp / file, data)
        except OSError as e:  # e.g. a full disk: named as the checkpoint file it would have become
            shutil.rmtree(tmp, ignore_errors=True)
            raise type(e)(e.errno, e.strerror, str(final / file)) from e
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    write_atomic(root / "latest", name.encode())
    for old in sorted(p for p in root.glob("step*") if p.is_dir())[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path`; an OSError (full disk, read-only, forbidden) names `path`."""
    with naming(path), open(path, "wb") as f:
        f.write(data)


def write_atomic(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` whole or not at all (a temporary file renamed into place); an
    OSError (full disk, read-only, forbidden) names `path` and leaves nothing behind."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise type(e)(e.errno, e.strerror, str(path)) from e


def latest_checkpoint(out: str | Path) -> Path | None:
    pointer = Path(out) / "checkpoints" / "latest"
    if not pointer.is_file():
        return None
    path = pointer.parent / pointer.read_text().strip()
    return path if (path / "state.json").is_file() else None


def read_state(path: Path) -> dict:
    """The state.json of the checkpoint directory `path` (CheckpointError naming it if unreadable)."""
    f = path / "state.json"
    try:
        s = json.loads(f.read_text())
        TrainState(int(s["epoch"]), int(s["step"]), int(s["step_in_epoch"]))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{f}: not a checkpoint's state ({type(e).__name__}: {e})") from None
    return s


def check_resume(path: Path, run: Fingerprint) -> None:
    """Refuse (CheckpointError, one line naming the field) to resume the checkpoint at `path`
    with a run of another fingerprint; one from before fingerprints resumes with a warning.
    Fields the checkpoint does not record (added since) are not compared."""
    blob = read_state(path).get("fingerprint")
    if blob is None:
        warnings.warn(f"{path}: checkpoint from before run fingerprints were recorded; --resume cannot check "
                      "that this run has its cache, model and data")
        return
    recorded = {f.name: f for f in Fingerprint.from_json(blob, path / "state.json").fields}
    for now in run.fields:
        was = recorded.get(now.name)
        if was is not None and was.digest != now.digest:
            raise CheckpointError(f"--resume: the checkpoint {path} was trained on {now.name} {was.shown} "
                                  f"(fingerprint {was.digest[:8]}..), this run gives {now.shown} "
                                  f"({now.digest[:8]}..): field {now.name}")


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> TrainState:
    """Restore model (strictly), optimiser and RNG state from `path`; returns the train state.
    Anything unreadable or not fitting is a CheckpointError naming the file."""
    s = read_state(path)
    weights, opt = path / "model.safetensors", path / "optimizer.pt"
    try:
        model.load_state_dict(load_file(str(weights)), strict=True)
    except (OSError, SafetensorError, RuntimeError) as e:
        raise CheckpointError(f"{weights}: {_first_line(e)}") from None
    try:
        blob = torch.load(opt, map_location="cpu", weights_only=True)
        if optimizer is not None:
            optimizer.load_state_dict(blob["optimizer"])
        torch.set_rng_state(blob["torch_rng"])
    except (OSError, RuntimeError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{opt}: {_first_line(e)}") from None
    return TrainState(s["epoch"], s["step"], s["step_in_epoch"])


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def start_or_resume(out: Path, resume: bool, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    is_main: bool, fingerprint: Fingerprint | None = None) -> tuple[TrainState, Path]:
    """(state, OUT/metrics.jsonl) for a run: with `resume` and a checkpoint, check it was
    trained with `fingerprint` (before any weight or file is touched), load it and cut the
    metrics to its step (the resumed run recomputes the rest); else a fresh start, with an
    empty metrics file. Only the main process touches files."""
    out = Path(out)
    metrics = out / "metrics.jsonl"
    if resume and (last := latest_checkpoint(out)) is not None:
        if fingerprint is not None:
            check_resume(last, fingerprint)
        state = load_checkpoint(last, model, optimizer)
        if is_main:
            from mrmae.train.engine import truncate_metrics

            truncate_metrics(metrics, state.step)
        return state, metrics
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        metrics.unlink(missing_ok=True)
    return TrainState(), metrics

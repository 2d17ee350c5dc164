"""Checkpoints: written whole under a temporary name, renamed into place, never unpickled.

    OUT/checkpoints/step00000120/
        model.safetensors      the student's weights
        optimizer.pt           optimiser state and RNG states (tensors and plain containers
                               only; loaded with torch.load(weights_only=True))
        state.json             epoch, step, step_in_epoch (the data position), config digest
    OUT/checkpoints/latest     the name of the newest complete checkpoint
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

KEEP = 2  # complete checkpoints kept on disk


@dataclass
class TrainState:
    epoch: int = 0  # the epoch in progress
    step: int = 0  # optimiser steps done in all
    step_in_epoch: int = 0  # optimiser steps done in `epoch` (batches to skip on resume)

    def to_json(self) -> dict:
        return {"epoch": self.epoch, "step": self.step, "step_in_epoch": self.step_in_epoch}


def save_checkpoint(out: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    state: TrainState, extra: dict | None = None) -> Path:
    """Write a checkpoint for `state` and point `latest` at it; returns its directory."""
    root = Path(out) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"step{state.step:08d}"
    tmp = root / f".tmp-{name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(weights, str(tmp / "model.safetensors"))
    torch.save({"optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state()}, tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps({**state.to_json(), **(extra or {})}, indent=1))
    final = root / name
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _write_atomic(root / "latest", name)
    for old in sorted(p for p in root.glob("step*") if p.is_dir())[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def latest_checkpoint(out: str | Path) -> Path | None:
    pointer = Path(out) / "checkpoints" / "latest"
    if not pointer.is_file():
        return None
    path = pointer.parent / pointer.read_text().strip()
    return path if (path / "state.json").is_file() else None


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> TrainState:
    """Restore model (strictly), optimiser and RNG state from `path`; returns the train state."""
    model.load_state_dict(load_file(str(path / "model.safetensors")), strict=True)
    blob = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    if optimizer is not None:
        optimizer.load_state_dict(blob["optimizer"])
    torch.set_rng_state(blob["torch_rng"])
    s = json.loads((path / "state.json").read_text())
    return TrainState(s["epoch"], s["step"], s["step_in_epoch"])


def start_or_resume(out: Path, resume: bool, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    is_main: bool) -> tuple[TrainState, Path]:
    """(state, OUT/metrics.jsonl) for a run: with `resume` and a checkpoint, load it and cut
    the metrics to its step (the resumed run recomputes the rest); else a fresh start,
    with an empty metrics file. Only the main process touches files."""
    out = Path(out)
    metrics = out / "metrics.jsonl"
    if resume and (last := latest_checkpoint(out)) is not None:
        state = load_checkpoint(last, model, optimizer)
        if is_main:
            from mrmae.train.engine import truncate_metrics

            truncate_metrics(metrics, state.step)
        return state, metrics
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        metrics.unlink(missing_ok=True)
    return TrainState(), metrics

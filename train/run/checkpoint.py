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

import hashlib
import io
import json
import os
import pickle
import re
import shutil
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from mrmae.shared.errors import MrmaeError, naming
from mrmae.shared.outfiles import refuse_link, write_file
from mrmae.train.run.records import read_json_object, truncate_records

KEEP = 2  # complete checkpoints kept on disk


class CheckpointError(MrmaeError, ValueError):
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


def batch_field(batch_size: int, accum_steps: int, processes: int) -> FingerprintField:
    """The images per optimiser step: a checkpoint's step count, lr schedule and data
    position (batches to skip) are in its units, so a resumed run with another effective
    batch would skip the wrong samples and end its schedule early or late."""
    eff = batch_size * accum_steps * processes
    return fingerprint_field("batch", f"{eff} images per step (--batch-size {batch_size} x --accum-steps "
                             f"{accum_steps} x {processes} processes)", eff)


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
    # Never the one just written: a fresh run over an older, longer one's checkpoints saves
    # lower step numbers, and pruning by name alone deleted the checkpoint `latest` names.
    others = sorted(p for p in root.glob("step*") if p.is_dir() and p.name != name)
    for old in others[:len(others) - (KEEP - 1)]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path`, never through a link; an OSError (full disk, read-only,
    forbidden) names `path`."""
    write_file(path, data)


def write_atomic(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` whole or not at all (a temporary file renamed into place); an
    OSError (full disk, read-only, forbidden) names `path` and leaves nothing behind."""
    write_file(path, data)  # (never through a link: shared/outfiles.py)


def latest_checkpoint(out: str | Path) -> Path | None:
    """The checkpoint `OUT/checkpoints/latest` names, or None when there is no pointer.

    The pointer must be a regular file (read without following a link: a link to itself,
    a FIFO or a directory there is an error, never a hang) naming a complete checkpoint
    directory beside it (`stepNNNNNNNN`): a pointer to anything else (`../../etc`, an
    absolute path, a deleted checkpoint) is a CheckpointError naming it and the newest
    complete checkpoint there, never followed out of the run and never read as "no
    checkpoint" (which would make `--resume` start over and discard the run)."""
    pointer = Path(out) / "checkpoints" / "latest"
    try:
        mode = os.lstat(pointer).st_mode
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(mode):
        what = "a symbolic link (never followed)" if stat.S_ISLNK(mode) else "not a regular file"
        raise CheckpointError(f"{pointer}: {what}{_newest_hint(out)}")
    try:
        fd = os.open(pointer, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
        with os.fdopen(fd, "rb") as f:
            name = f.read(256).decode().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{pointer}: unreadable ({type(e).__name__}: {e}){_newest_hint(out)}") from None
    if not _STEP_NAME.fullmatch(name):
        raise CheckpointError(f"{pointer}: names {name[:80]!r}, not a checkpoint directory beside it "
                              f"(stepNNNNNNNN){_newest_hint(out)}")
    path = pointer.parent / name
    if not (path / "state.json").is_file():
        raise CheckpointError(f"{pointer}: names {name}, which is not a complete checkpoint ({path}/state.json "
                              f"missing){_newest_hint(out)}")
    return path


CHECKPOINT_FILES = ("model.safetensors", "optimizer.pt", "state.json")


def complete_checkpoints(out: str | Path) -> list[Path]:
    """Every complete checkpoint of a run, oldest first: a real directory `stepNNNNNNNN`
    (no link) holding its three files as regular files and a state.json that reads."""
    root = Path(out) / "checkpoints"
    found = []
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except (FileNotFoundError, NotADirectoryError):
        return []
    for e in entries:
        if not (_STEP_NAME.fullmatch(e.name) and e.is_dir(follow_symlinks=False)):
            continue
        path = Path(e.path)
        if not all(stat.S_ISREG(_lmode(path / f)) for f in CHECKPOINT_FILES):
            continue
        try:
            read_state(path)
        except CheckpointError:
            continue
        found.append(path)
    return sorted(found, key=lambda p: int(p.name[len("step"):]))


def _lmode(path: Path) -> int:
    try:
        return os.lstat(path).st_mode
    except OSError:
        return 0


def _newest_hint(out: str | Path) -> str:
    """"; the newest complete checkpoint is X: continue from it with ..." (or "")."""
    done = complete_checkpoints(out)
    if not done:
        return ""
    return (f"; the newest complete checkpoint is {done[-1]}: continue from it with --resume-from auto "
            f"(or --resume-from {done[-1]})")


def resume_point(out: str | Path, resume: bool | str | None) -> Path | None:
    """The checkpoint a run continues from, or None for a fresh start.

    `resume` True (`--resume`): the one `latest` names; a missing `latest` while complete
    checkpoints exist is a CheckpointError naming the newest and how to continue from it
    (never a fresh start over the run). "auto" (`--resume-from auto`): the newest complete
    checkpoint, whatever `latest` says (None when there is none). Another string
    (`--resume-from PATH`): that checkpoint directory, which must be a complete one of this
    run's (OUT/checkpoints/stepNNNNNNNN)."""
    if not resume:
        return None
    if resume == "auto":
        done = complete_checkpoints(out)
        return done[-1] if done else None
    if isinstance(resume, str):
        return _given_checkpoint(out, resume)
    last = latest_checkpoint(out)
    if last is None and complete_checkpoints(out):
        raise CheckpointError(f"{Path(out) / 'checkpoints' / 'latest'}: missing, yet the run has checkpoints"
                              f"{_newest_hint(out)}")
    return last


def _given_checkpoint(out: str | Path, given: str) -> Path:
    """`--resume-from PATH`: one of this run's complete checkpoints (its metrics are cut to it)."""
    path = Path(given)
    done = {p.resolve(): p for p in complete_checkpoints(out)}
    if path.resolve() not in done or path.is_symlink():
        raise CheckpointError(f"--resume-from {given}: not a complete checkpoint of {out} (one of "
                              f"{Path(out) / 'checkpoints'}/stepNNNNNNNN, with {', '.join(CHECKPOINT_FILES)})"
                              f"{_newest_hint(out)}")
    return done[path.resolve()]


def check_out_apart(out: str | Path, caches: list[str | None]) -> None:
    """Refuse (OptionError, before anything is written) a run directory inside a feature
    cache or one holding it: a run's checkpoints and metrics would be mixed with the
    cache's files (`cache clean` removes what it does not know), or the cache with the
    run's. Local paths only (a URL cache cannot contain a local --out)."""
    from mrmae.shared.errors import OptionError

    run = os.path.realpath(out)
    for cache in caches:
        if not cache or "://" in str(cache):
            continue
        root = os.path.realpath(cache)
        if run == root or run.startswith(root + os.sep):
            raise OptionError(f"--out {out}: inside the feature cache {cache}; give a run directory outside it")
        if root.startswith(run + os.sep):
            raise OptionError(f"--out {out}: holds the feature cache {cache}; give a run directory that does not")


_STEP_NAME = re.compile(r"step\d{8,}")
_STATE_LIMIT = 10**12  # no run takes this many steps: a larger value is a damaged or crafted state.json


def read_state(path: Path) -> dict:
    """The state.json of the checkpoint directory `path` (CheckpointError naming it and the
    key if unreadable): epoch, step and step_in_epoch must be integers in [0, 1e12]."""
    f = path / "state.json"
    s = read_json_object(f, "a checkpoint's state", CheckpointError)
    for key in ("epoch", "step", "step_in_epoch"):
        v = s.get(key)
        if type(v) is not int or not 0 <= v <= _STATE_LIMIT:  # not bool, str or float: a crafted file
            raise CheckpointError(f"{f}: key {key} is {v!r}, not a step count (an integer from 0)")
    if s["step_in_epoch"] > s["step"]:
        raise CheckpointError(f"{f}: key step_in_epoch {s['step_in_epoch']} exceeds step {s['step']}")
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
    Anything unreadable or not fitting is a CheckpointError naming the file (and the keys)."""
    s = read_state(path)
    weights, opt = path / "model.safetensors", path / "optimizer.pt"
    try:
        tensors = load_file(str(weights))
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"{weights}: {_first_line(e)}") from None
    _check_tensors(weights, tensors, model.state_dict())
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as e:  # e.g. a dtype the parameter cannot take
        raise CheckpointError(f"{weights}: {_first_line(e)}") from None
    try:  # weights_only: a crafted pickle is refused (UnpicklingError), never run
        with warnings.catch_warnings():  # torch's "Detected pickle protocol N ... file an issue" for foreign pickles
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            blob = torch.load(opt, map_location="cpu", weights_only=True)
        if optimizer is not None:
            optimizer.load_state_dict(blob["optimizer"])
            _check_optimizer_state(opt, optimizer)
        torch.set_rng_state(blob["torch_rng"])
    except pickle.UnpicklingError:  # torch's message advises weights_only=False: not something to suggest
        raise CheckpointError(f"{opt}: holds more than tensors and plain containers; refused, not unpickled "
                              "(an optimizer.pt that mrmae wrote never does)") from None
    except (OSError, RuntimeError, ValueError, KeyError, TypeError, IndexError) as e:
        raise CheckpointError(f"{opt}: {_first_line(e)}") from None
    return TrainState(s["epoch"], s["step"], s["step_in_epoch"])


def _check_tensors(weights: Path, tensors: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """CheckpointError naming `weights` and the first keys that are missing, unexpected or
    of another shape than the model's (load_state_dict would say so in many lines)."""
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    shapes = [f"{k} {tuple(tensors[k].shape)} (model {tuple(v.shape)})" for k, v in expected.items()
              if k in tensors and tensors[k].shape != v.shape]
    for what, keys in (("missing", missing), ("unexpected", unexpected), ("misshaped", shapes)):
        if keys:
            more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
            raise CheckpointError(f"{weights}: not this run's model: {what} {', '.join(keys[:3])}{more}")


def _check_optimizer_state(opt: Path, optimizer: torch.optim.Optimizer) -> None:
    """Each parameter's moment tensors must have the parameter's shape: torch does not check
    on load, and a crafted or foreign optimizer.pt would fail (or broadcast) mid-step."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            for name, value in optimizer.state.get(p, {}).items():
                if torch.is_tensor(value) and value.ndim > 0 and value.shape != p.shape:
                    raise ValueError(f"optimiser state {name} {tuple(value.shape)} for a parameter "
                                     f"{tuple(p.shape)}: not this model's optimiser")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


_HELD: dict[str, int] = {}  # run directories this process holds (a descriptor with an flock each)


def hold_run(out: Path) -> bool:
    """Take an exclusive lock on the run directory `out` for the rest of this process, so a
    second run started on the same --out stops in one line instead of interleaving its
    metrics, config and checkpoints with this one's. The kernel releases the lock when the
    process ends, killed or not; a file system without flock (some network mounts) runs
    unlocked. Reentrant within a process (a test or notebook running several runs).
    Returns whether the lock is held."""
    import fcntl

    key = str(out.resolve())
    if key in _HELD:
        return True
    fd = os.open(out, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise CheckpointError(f"{out}: another run is training into this --out (it holds its lock); "
                              "wait for it or give another --out") from None
    except OSError:  # flock not supported here: nothing to hold
        os.close(fd)
        return False
    _HELD[key] = fd
    return True


def remove_interrupted_saves(out: Path) -> None:
    """Remove what saves cut short by Ctrl-C or a kill left in OUT/checkpoints (a whole
    model and optimiser each): called with the run's lock held, when no other save can be live."""
    root = out / "checkpoints"
    for leftover in [*root.glob(".tmp-step*"), *root.glob(".latest.*.tmp")]:
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)


def start_or_resume(out: Path, resume: bool | str, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    is_main: bool, fingerprint: Fingerprint | None = None) -> tuple[TrainState, Path]:
    """(state, OUT/metrics.jsonl) for a run: with `resume` (`resume_point`: True, "auto" or
    a checkpoint's path) and a checkpoint, check it was
    trained with `fingerprint` (before any weight or file is touched), load it and cut the
    metrics to its step (the resumed run recomputes the rest); else a fresh start, with an
    empty metrics file. Only the main process touches files, and it first takes the run's
    lock (`hold_run`)."""
    out = Path(out)
    metrics = out / "metrics.jsonl"
    if is_main:
        with naming(out):
            out.mkdir(parents=True, exist_ok=True)
        if hold_run(out):
            remove_interrupted_saves(out)
    if (last := resume_point(out, resume)) is not None:
        if fingerprint is not None:
            check_resume(last, fingerprint)
        state = load_checkpoint(last, model, optimizer)
        if is_main:
            truncate_records(metrics, state.step)
        return state, metrics
    if is_main:
        refuse_link(metrics)  # (a link planted there: one line, never removed nor written through)
        metrics.unlink(missing_ok=True)
    return TrainState(), metrics

"""Rebuild a trained MR-MAE student from a checkpoint, for export, evaluation and pictures.

A checkpoint (`train/run/checkpoint.py`) holds the weights only; what built the model is the
run's `OUT/config.json` (written by `mrmae pretrain`): the registry name and
`fuse_layers`, which no tensor shape reveals. The sizes pretrain may override (teacher
width, decoder width and depth) and, for a ViT, all its sizes are read from the shapes, so
a model built with other overrides loads too. Without a config.json the registry ViT of
the checkpoint's width and depth is assumed, without fusion (with a warning).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from mrmae.train.run.checkpoint import CheckpointError, latest_checkpoint
from mrmae.train.run.records import RunConfig, read_run_config
from mrmae.train.students.vit import MRMAEConfig
from mrmae.train.models import create_model, model_config
from mrmae.train.students.registry import family_of, student_names


@dataclass
class Restored:
    model: torch.nn.Module  # the student (MRMAE or another registry student), eval mode, CPU
    name: str  # its registry name
    weights: Path  # the model.safetensors read
    run_dir: Path | None  # the pretrain OUT directory, when the checkpoint lies in one
    run_config: RunConfig | None  # its config.json (None without one)


def resolve_weights(checkpoint: str | Path) -> tuple[Path, Path | None]:
    """A run dir (its latest checkpoint), a checkpoint dir or a model.safetensors file ->
    (weights file, run dir or None). Raises FileNotFoundError naming the path."""
    path = Path(checkpoint)
    if path.is_dir() and (path / "checkpoints").is_dir():
        last = latest_checkpoint(path)
        if last is None:
            raise FileNotFoundError(f"{path}: run directory without a complete checkpoint")
        path = last
    weights = path / "model.safetensors" if path.is_dir() else path
    if not weights.is_file():
        raise FileNotFoundError(f"{checkpoint}: no model.safetensors (give a run dir, a checkpoint dir or the file)")
    run_dir = weights.parent.parent.parent  # OUT/checkpoints/stepN/model.safetensors
    return weights, run_dir if (run_dir / "config.json").is_file() else None


def _max_index(state: dict, prefix: str) -> int:
    """Number of `prefix.<i>.` modules in a state dict (0 when none)."""
    return 1 + max((int(k.split(".")[1]) for k in state if k.startswith(prefix + ".")), default=-1)


def model_spec(state: dict[str, torch.Tensor], run_config: RunConfig | None) -> tuple[str, dict]:
    """(registry name, create_model overrides) of the student whose weights are `state`."""
    name = run_config.model if run_config else None
    dim = state["cls_token"].shape[-1] if "cls_token" in state else None
    depth = _max_index(state, "blocks")
    if name is None:
        name = next((n for n in student_names() if isinstance(c := model_config(n), MRMAEConfig)
                     and (c.embed_dim, c.depth) == (dim, depth)), None)
        if name is None:
            raise ValueError(f"no config.json beside the checkpoint names its model, and no registry ViT is "
                             f"{dim}-d with {depth} blocks")
        warnings.warn(f"no config.json beside the checkpoint: assuming {name} without --fuse-layers")
    overrides = dict(teacher_dim=state["mimic_head.weight"].shape[0] if "mimic_head.weight" in state else 0,
                     joint_teacher_dims=tuple(state[f"joint_heads.{j}.weight"].shape[0]
                                              for j in range(_max_index(state, "joint_heads"))),
                     fuse_layers=(run_config.fuse_layers if run_config else None) or (),
                     decoder_embed_dim=state["decoder_embed.weight"].shape[0],
                     decoder_depth=_max_index(state, "decoder_blocks"),
                     decoder_teacher_dim=(state["decoder_feature_pred.weight"].shape[0]
                                          if "decoder_feature_pred.weight" in state else 0))
    family = family_of(name)
    overrides.update(family.restore_overrides(state))  # e.g. a ViT's sizes, all in its shapes
    # what no shape reveals (a ConvViT's conv-stage LayerNorm eps): as the run recorded it, or as runs had it before
    overrides.update(family.restored_config(run_config.model_config if run_config else None, "config.json"))
    return name, overrides


def load_student(checkpoint: str | Path, fmt: str = "auto") -> Restored:
    """Load a student strictly from `checkpoint` (see resolve_weights, or MAE's or ConvMAE's
    pretraining `.pth`: `official.py`, `fmt` auto, mae or convmae), in eval mode on CPU.
    A file that is no safetensors file, a truncated one, or the weights of another model
    are a CheckpointError naming the file."""
    from mrmae.train.official import OFFICIAL, is_official_file, read_official

    if fmt in OFFICIAL or (fmt == "auto" and is_official_file(checkpoint)):
        return official_student(read_official(checkpoint, fmt))
    weights, run_dir = resolve_weights(checkpoint)
    run_config = read_run_config(run_dir) if run_dir else None
    state = read_weights(weights)
    if run_config:
        check_model_name(run_config)
    try:
        name, overrides = model_spec(state, run_config)
        model = create_model(name, **overrides)
        model.load_state_dict(state, strict=True)
    except (KeyError, ValueError, TypeError, IndexError, RuntimeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"{weights}: not the weights of an mrmae student ({type(e).__name__}: {first})") from None
    return Restored(model.eval(), name, weights, run_dir, run_config)


def resumed_config(out: str | Path, name: str) -> dict:
    """The config overrides no shape reveals (a ConvViT's conv-stage eps) that the run in `out`
    recorded, so that `--resume` goes on with them: a run from before they were recorded keeps
    the values of then. {} when `out` holds no config.json (nothing to resume)."""
    if not (Path(out) / "config.json").is_file():
        return {}
    recorded = read_run_config(Path(out))
    try:
        return family_of(name).restored_config(recorded.model_config, str(recorded.path))
    except ValueError as e:
        raise CheckpointError(str(e)) from None


def official_student(ck) -> Restored:
    """The student of MAE's or ConvMAE's pretraining checkpoint (`official.OfficialCheckpoint`):
    every tensor lands (encoder, fusion convs, decoder); no mimic head (they mimic nothing)."""
    if ck.stage != "pretrain":
        raise CheckpointError(f"{ck.path}: a {ck.label} has no decoder; this needs a pretraining checkpoint")
    model = create_model(ck.name, **ck.student)
    try:
        model.load_state_dict(ck.state, strict=True)
    except RuntimeError as e:
        first = (str(e).strip().splitlines() or ["mismatch"])[0]
        raise CheckpointError(f"{ck.path}: does not fit {ck.name}: {first}") from None
    return Restored(model.eval(), ck.name, ck.path, None, None)


def init_from(model: torch.nn.Module, name: str, source: str | Path, fmt: str = "auto") -> str:
    """`pretrain --init`: copy the tensors of `source` (MAE's or ConvMAE's `.pth`, pretrained or
    fine-tuned, or an mrmae pretraining checkpoint) into the fresh student `model` (registry
    `name`), by name; returns the note line that accounts for every tensor: loaded, not used
    (a fine-tuned head), or kept at its initialisation (a mimic head, a decoder the file lacks).
    A tensor of another shape is a CheckpointError naming it: nothing is skipped silently."""
    from mrmae.train.official import OFFICIAL, is_official_file, read_official, summarise

    if fmt in OFFICIAL or (fmt == "auto" and is_official_file(source)):
        ck = read_official(source, fmt)
        state, label, theirs = ck.state, ck.label, ck.name
    else:
        restored = load_student(source, fmt)
        state, label, theirs = restored.model.state_dict(), "mrmae checkpoint", restored.name
    if family_of(theirs).name != family_of(name).name:
        raise CheckpointError(f"--init {source}: a {label} of a {family_of(theirs).name} encoder; --model {name} "
                              f"is a {family_of(name).name}")
    own = model.state_dict()
    for key, tensor in state.items():
        if key in own and own[key].shape != tensor.shape:
            what = "the decoder's: give its --decoder-dim and --decoder-depth" if key.startswith("decoder") else \
                "the encoder's: give the --model of its sizes (and the input size it was trained at)"
            raise CheckpointError(f"--init {source}: tensor {key} is {tuple(tensor.shape)} there but "
                                  f"{tuple(own[key].shape)} in {name} ({what})")
    used = {k: v for k, v in state.items() if k in own}
    model.load_state_dict(used, strict=False)
    unused, kept = sorted(set(state) - set(own)), sorted(set(own) - set(state))
    return (f"--init {source}: a {label}, {len(used)} tensors loaded"
            + (f"; not used: {summarise(unused)}" if unused else "")
            + (f"; kept at their initialisation: {summarise(kept)}" if kept else ""))


def read_weights(weights: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; CheckpointError naming it if it is none (or cut short)."""
    try:
        return load_file(str(weights))
    except SafetensorError as e:
        raise CheckpointError(f"{weights}: not a readable safetensors file ({e})") from None


def check_model_name(run_config: RunConfig) -> None:
    """The recorded `model` must be a registered student's name (the record's own reading
    checked its type and `fuse_layers`'): one CheckpointError naming the file and the key,
    not blamed on the weights."""
    name = run_config.model
    if name is not None and name not in student_names():
        raise CheckpointError(f"{run_config.path}: key model is {name[:80]!r}, not a registered student's name "
                              "(`mrmae models` lists them)")


def num_prefix_tokens(model: torch.nn.Module) -> int:
    """Tokens before the patch tokens in the encoder's output: 1 (cls) for the ViT, 0 without a cls token."""
    return int(getattr(model, "num_prefix_tokens", 1))


@torch.no_grad()
def encode_all_tokens(model: torch.nn.Module, imgs: torch.Tensor) -> torch.Tensor:
    """imgs [B, 3, H, W] (normalised) -> the encoder's normed tokens [B, k+N, D], nothing masked
    (k = num_prefix_tokens: 1 for the ViT's [CLS]).

    Every patch is visible (ids_keep = 0..N-1 for each row), so this is the plain ViT
    forward the student's encoder computes (with fusion, if the model was trained with it).
    """
    ids_keep = torch.arange(model.num_patches, device=imgs.device).expand(imgs.shape[0], -1)
    latent, _ = model.forward_encoder(imgs, ids_keep)
    return latent

"""Official checkpoints in: facebookresearch/mae's and Alpha-VL/ConvMAE's published `.pth` files.

Both repositories save `{"model": state_dict}` (their training checkpoints add `optimizer`,
`epoch`, `scaler` and the run's `args`), read here with `torch.load(weights_only=True)`:
tensors, plain containers and argparse's Namespace, nothing else is unpickled. Four kinds:

- MAE pretraining (`models_mae.MaskedAutoencoderViT`): `patch_embed.proj.*`, `cls_token`,
  `pos_embed` (fixed sin-cos), `blocks.i.*`, `norm.*`, then `decoder_embed.*`, `mask_token`,
  `decoder_pos_embed`, `decoder_blocks.i.*`, `decoder_norm.*`, `decoder_pred.*`: mrmae's ViT
  student's own names. The pretrained checkpoints MAE publishes for fine-tuning hold the
  encoder alone (stage "encoder"); its visualisation ones keep the decoder.
- MAE fine-tuning (`models_vit.VisionTransformer`): the encoder names, `fc_norm.*` in place
  of `norm.*` with global pooling, and `head.*`: timm's VisionTransformer's names.
- ConvMAE pretraining (`models_convmae.MaskedAutoencoderConvViT`): `patch_embed{1,2,3}` (conv
  `proj`, `norm`), `blocks{1,2}.i` (conv blocks: `norm1`, `conv1`, `attn` the 5x5 depth-wise
  conv, `conv2`, `norm2`, `mlp.fc1`, `mlp.fc2`), `patch_embed4` (the Linear on stage 3),
  `pos_embed` (no cls slot), `blocks3.i`, `norm`, `stage{1,2}_output_decode` (the fusion
  convs) and MAE's decoder names; renamed here to the ConvViT student's (`RENAMES`).
- ConvMAE fine-tuning (`models_convvit.ConvViT`): the encoder names with `fc_norm` and `head`.

The kind comes from the tensor names (`detect`), or is named (`--checkpoint-format mae|convmae`,
then the names must be that kind's). Every tensor of the file is accounted for: it lands in
the model, or it is named as unused in one note line (a pretraining decoder where only the
encoder is wanted); a name the kind does not have is an error, never dropped. The sizes come
from the shapes (widths, depths, MLP ratios, kernel, input size, decoder); the head counts,
which no shape reveals, from the mrmae model of those sizes (MAE's and ConvMAE's base, large
and huge are registered), the decoder's 16 heads from both papers.
"""

from __future__ import annotations

import argparse
import math
import os
import pickle
import re
import stat
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mrmae.shared.errors import MrmaeError

FORMATS = ("auto", "mrmae", "mae", "convmae")  # --checkpoint-format
OFFICIAL = ("mae", "convmae")
DECODER_HEADS = 16  # MAE's and ConvMAE's decoders (no shape shows the head count)

# ConvMAE name -> mrmae name (the ConvViT student's, which its timm encoder shares)
RENAMES: tuple[tuple[re.Pattern, str], ...] = tuple((re.compile(a), b) for a, b in (
    (r"^patch_embed([123])\.(proj|norm)\.", r"embed\1.\2."),
    (r"^patch_embed4\.", "token_proj."),
    (r"^blocks([12])\.(\d+)\.conv1\.", r"stage\1.\2.pw1."),
    (r"^blocks([12])\.(\d+)\.attn\.", r"stage\1.\2.dwconv."),
    (r"^blocks([12])\.(\d+)\.conv2\.", r"stage\1.\2.pw2."),
    (r"^blocks([12])\.(\d+)\.mlp\.fc1\.", r"stage\1.\2.mlp.0."),
    (r"^blocks([12])\.(\d+)\.mlp\.fc2\.", r"stage\1.\2.mlp.2."),
    (r"^blocks([12])\.(\d+)\.(norm[12])\.", r"stage\1.\2.\3."),
    (r"^blocks3\.", "blocks."),
    (r"^stage1_output_decode\.", "fuse1."),
    (r"^stage2_output_decode\.", "fuse2."),
))
# mrmae names an official checkpoint may hold as they are (after RENAMES), by kind
_KEPT = {
    "mae": re.compile(r"^(patch_embed\.proj\.(weight|bias)|cls_token|pos_embed|blocks\.\d+\.(norm[12]|attn\.(qkv|proj)|"
                      r"mlp\.fc[12])\.(weight|bias)|(norm|fc_norm|head)\.(weight|bias))$"),
    "convmae": re.compile(r"^(embed[123]\.(proj|norm)\.(weight|bias)|stage[12]\.\d+\.(norm[12]|pw[12]|dwconv|"
                          r"mlp\.[02])\.(weight|bias)|token_proj\.(weight|bias)|pos_embed|blocks\.\d+\.(norm[12]|"
                          r"attn\.(qkv|proj)|mlp\.fc[12])\.(weight|bias)|(norm|fc_norm|head|fuse[12])\.(weight|bias))$"),
}
_DECODER = re.compile(r"^(decoder_(embed|norm|pred)\.(weight|bias)|decoder_blocks\.\d+\.(norm[12]|attn\.(qkv|proj)|"
                      r"mlp\.fc[12])\.(weight|bias)|mask_token|decoder_pos_embed)$")


class OfficialCheckpointError(MrmaeError, ValueError):
    """An official checkpoint that cannot be read or used; one line naming the file."""


@dataclass(frozen=True)
class OfficialCheckpoint:
    """A MAE or ConvMAE checkpoint in mrmae's names, with the mrmae model of its sizes."""

    path: Path
    kind: str  # "mae" | "convmae"
    stage: str  # "pretrain" (with its decoder) | "encoder" (pretrained, the decoder left out) | "finetune" (a head)
    name: str  # the mrmae registry name of its encoder's sizes (mrmae_vit_base_patch16, ...)
    state: dict[str, torch.Tensor]  # every tensor of the file, under mrmae's names
    student: dict = field(default_factory=dict)  # create_model overrides of the student (sizes, decoder)
    timm_kwargs: dict = field(default_factory=dict)  # the timm encoder's arguments (with its head, if any)

    @property
    def label(self) -> str:
        what = {"pretrain": "pretraining", "encoder": "pretrained encoder", "finetune": "fine-tuned"}[self.stage]
        return f"{'MAE' if self.kind == 'mae' else 'ConvMAE'} {what} checkpoint"


def is_official_file(path: str | Path) -> bool:
    """A regular file that is not a safetensors file (mrmae writes no other): a `.pth`."""
    p = Path(path)
    try:
        if not stat.S_ISREG(os.stat(p).st_mode):
            return False
        with open(p, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    # safetensors: an 8-byte little-endian header length, then the JSON header's "{"
    return not (len(head) == 9 and head[8:9] == b"{")


def read_official(path: str | Path, fmt: str = "auto") -> OfficialCheckpoint:
    """The checkpoint at `path` (`fmt`: auto, mae or convmae), renamed and sized; one-line
    OfficialCheckpointError for a file that is none."""
    path = Path(path)
    raw = _tensors(path)
    kind = detect(raw, path) if fmt == "auto" else fmt
    if kind not in OFFICIAL:
        raise OfficialCheckpointError(f"--checkpoint-format {fmt}: not one of {', '.join(OFFICIAL)} for {path}")
    if detect(raw, path) != kind:
        raise OfficialCheckpointError(f"{path}: --checkpoint-format {kind}, but its tensor names are "
                                      f"{detect(raw, path)}'s")
    state = {_rename(k) if kind == "convmae" else k: v for k, v in raw.items()}
    unknown = sorted(k for k in state if not (_KEPT[kind].match(k) or _DECODER.match(k)))
    if unknown:
        shown = [_original(k, raw) for k in unknown[:4]]
        raise OfficialCheckpointError(f"{path}: {len(unknown)} tensors that a {kind} checkpoint does not have: "
                                      f"{', '.join(shown)}{', ...' if len(unknown) > 4 else ''}")
    # MAE publishes its pretrained encoders without the decoder ("encoder"; its visualisation
    # checkpoints keep it): no head and no decoder
    stage = "pretrain" if "decoder_embed.weight" in state else "finetune" if "head.weight" in state else "encoder"
    try:
        name, student, timm_kwargs = (_vit_sizes if kind == "mae" else _convvit_sizes)(state, stage)
    except (KeyError, IndexError, ValueError) as e:
        raise OfficialCheckpointError(f"{path}: not a whole {kind} {stage} checkpoint ({type(e).__name__}: "
                                      f"{e})") from None
    return OfficialCheckpoint(path, kind, stage, name, state, student, timm_kwargs)


def detect(state: dict[str, torch.Tensor], path: Path) -> str:
    """'convmae' or 'mae' from the tensor names; OfficialCheckpointError for neither."""
    if "patch_embed1.proj.weight" in state:
        return "convmae"
    if "patch_embed.proj.weight" in state:
        return "mae"
    some = ", ".join(sorted(state)[:3])
    raise OfficialCheckpointError(f"{path}: neither a MAE checkpoint (patch_embed.proj.weight) nor a ConvMAE one "
                                  f"(patch_embed1.proj.weight); its tensors start {some or 'nowhere (none)'}")


def _rename(name: str) -> str:
    for pattern, new in RENAMES:
        if pattern.match(name):
            return pattern.sub(new, name, count=1)
    return name


def _original(name: str, raw: dict) -> str:
    """The file's own name of the renamed tensor `name` (for messages)."""
    return next((k for k in raw if _rename(k) == name), name)


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    """The state dict of a `.pth`: its `model` (or `state_dict`) entry, or the file's dict
    itself; every value a tensor. Read with weights_only=True (argparse.Namespace allowed:
    MAE's and ConvMAE's training checkpoints store their `args` so)."""
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        raise OfficialCheckpointError(f"{path}: {e.strerror}") from None
    if not stat.S_ISREG(mode):
        raise OfficialCheckpointError(f"{path}: not a regular file")
    try:
        with warnings.catch_warnings(), torch.serialization.safe_globals([argparse.Namespace]):
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            blob = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise OfficialCheckpointError(f"{path}: holds more than tensors and plain containers; refused, not "
                                      "unpickled (save {'model': model.state_dict()} from the official code)") from None
    except (OSError, RuntimeError, ValueError, EOFError, KeyError, TypeError, AttributeError, IndexError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise OfficialCheckpointError(f"{path}: not a readable torch checkpoint ({first[:200]})") from None
    state = blob.get("model", blob.get("state_dict", blob)) if isinstance(blob, dict) else None
    if not isinstance(state, dict) or not state:
        raise OfficialCheckpointError(f"{path}: no state dict in it (a dict with a 'model' entry, as MAE and "
                                      "ConvMAE save)")
    bad = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise OfficialCheckpointError(f"{path}: entry {bad[0]!r} of its state dict is not a tensor")
    return state


def _count(state: dict, prefix: str) -> int:
    """Number of `prefix.<i>.` modules (0 when none); ValueError unless numbered 0..n-1."""
    ids = {int(k[len(prefix) + 1:].split(".")[0]) for k in state if k.startswith(prefix + ".")}
    if ids and ids != set(range(len(ids))):
        raise ValueError(f"{prefix} numbered {sorted(ids)[:6]}..., not 0..{len(ids) - 1}")
    return len(ids)


def _decoder(state: dict, stage: str, encoder_dim: int, pixels: int) -> dict:
    """The student's decoder overrides (pretraining checkpoints; {} for fine-tuned ones)."""
    if stage != "pretrain":
        return {}
    dd = state["decoder_embed.weight"].shape[0]
    if state["decoder_embed.weight"].shape[1] != encoder_dim or state["decoder_pred.weight"].shape[0] != pixels:
        raise ValueError("its decoder does not fit its encoder")
    if dd % DECODER_HEADS:
        raise ValueError(f"decoder width {dd} is not a multiple of {DECODER_HEADS} heads")
    return dict(decoder_embed_dim=dd, decoder_depth=_count(state, "decoder_blocks"), decoder_num_heads=DECODER_HEADS,
                teacher_dim=0)


def _head(state: dict) -> dict:
    """The timm head arguments of a fine-tuned encoder: its classes and pooling."""
    if "head.weight" not in state:
        return {}
    pool = "avg" if "fc_norm.weight" in state else "token"
    return dict(num_classes=state["head.weight"].shape[0], global_pool=pool)


def _vit_sizes(state: dict, stage: str) -> tuple[str, dict, dict]:
    """(registry name, student overrides, timm kwargs) of a MAE checkpoint."""
    from mrmae.train.students.vit import MRMAEConfig
    from mrmae.train.models import model_config
    from mrmae.train.students.registry import student_names

    proj = state["patch_embed.proj.weight"]
    dim, patch, depth = proj.shape[0], proj.shape[-1], _count(state, "blocks")
    tokens = state["pos_embed"].shape[1] - 1
    grid = math.isqrt(tokens)
    if grid * grid != tokens or "cls_token" not in state:
        raise ValueError(f"pos_embed of {tokens + 1} tokens is not a [CLS] token and a square grid")
    ratio = state["blocks.0.mlp.fc1.weight"].shape[0] / dim if depth else 4.0
    name = next((n for n in student_names() if isinstance(c := model_config(n), MRMAEConfig)
                 and (c.embed_dim, c.depth, c.mlp_ratio) == (dim, depth, ratio)), None)
    if name is None:
        raise ValueError(f"no mrmae ViT is {dim}-d with {depth} blocks and MLP ratio {ratio:g}")
    sizes = dict(img_size=grid * patch, patch_size=patch)
    timm_kwargs = dict(embed_dim=dim, depth=depth, num_heads=model_config(name).num_heads, mlp_ratio=ratio, **sizes)
    return name, {**sizes, **_decoder(state, stage, dim, patch * patch * 3)}, {**timm_kwargs, **_head(state)}


def _convvit_sizes(state: dict, stage: str) -> tuple[str, dict, dict]:
    """(registry name, student overrides, timm kwargs) of a ConvMAE checkpoint."""
    from mrmae.train.students.convvit import ConvViTConfig
    from mrmae.train.models import model_config
    from mrmae.train.students.registry import student_names

    dims = tuple(state[f"embed{i}.proj.weight"].shape[0] for i in (1, 2, 3))
    kernels = tuple(state[f"embed{i}.proj.weight"].shape[-1] for i in (1, 2, 3))
    if kernels != ConvViTConfig.strides:
        raise ValueError(f"stage embeddings of {kernels} px, not ConvMAE's {ConvViTConfig.strides}")
    depths = (_count(state, "stage1"), _count(state, "stage2"), _count(state, "blocks"))
    ratios = tuple(state[f"{p}.0.{fc}.weight"].shape[0] / d if n else 4.0
                   for p, fc, d, n in zip(("stage1", "stage2", "blocks"), ("mlp.0", "mlp.0", "mlp.fc1"), dims, depths))
    kernel = state["stage1.0.dwconv.weight"].shape[-1] if depths[0] else 5
    grid = math.isqrt(state["pos_embed"].shape[1])
    if grid * grid != state["pos_embed"].shape[1]:
        raise ValueError(f"pos_embed of {state['pos_embed'].shape[1]} tokens is not a square grid")
    name = next((n for n in student_names() if isinstance(c := model_config(n), ConvViTConfig)
                 and (c.embed_dims, c.depths, c.mlp_ratios) == (dims, depths, ratios)), None)
    if name is None:
        raise ValueError(f"no mrmae ConvViT is {'/'.join(map(str, dims))}-d with {'+'.join(map(str, depths))} blocks "
                         f"and MLP ratios {'/'.join(f'{r:g}' for r in ratios)}")
    sizes = dict(img_size=grid * 16, kernel_size=kernel)  # conv_norm_eps: the registry's, ConvMAE's 1e-5
    timm_kwargs = dict(embed_dims=list(dims), depths=list(depths), num_heads=model_config(name).num_heads,
                       mlp_ratios=list(ratios), **sizes)
    head = _head(state)
    if head:
        head["fc_norm"] = head["global_pool"] == "avg"
        if not head["fc_norm"]:
            raise ValueError("a ConvViT head without fc_norm pools a [CLS] token it has not")
    return name, {**sizes, **_decoder(state, stage, dims[2], 16 * 16 * 3)}, {**timm_kwargs, **head}


def split_unused(state: dict[str, torch.Tensor], wanted: set[str]) -> tuple[dict, list[str]]:
    """(the tensors named in `wanted`, the other names)."""
    return {k: v for k, v in state.items() if k in wanted}, sorted(k for k in state if k not in wanted)


def summarise(names: list[str]) -> str:
    """'decoder_blocks.* (96), mask_token, ...': names grouped by their first part, for one line."""
    groups: dict[str, int] = {}
    for n in names:
        top = n.split(".")[0]
        key = f"{top}.*" if "." in n else n
        groups[key] = groups.get(key, 0) + 1
    return ", ".join(f"{k} ({v})" if v > 1 else k for k, v in groups.items())

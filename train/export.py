"""`mrmae export`: the student's encoder as a timm model's weights (safetensors).

Every student exports to its family's timm encoder (a ViT to timm's VisionTransformer, a
ConvViT to `ConvViT`; `mrmae.train.students`), registered with timm as `mrmae_*` by
`import mrmae` (`train/backbones.py`). The file
loads strictly with

    timm.create_model(NAME, pretrained=True, pretrained_cfg_overlay=dict(file=PATH))

(NAME, any non-default kwargs and PATH, absolute, are printed and stored in the file's
metadata as `load_with`). The decoder, mask token, mimic heads and the fusion convs are
dropped: fusion (`--fuse-layers`, and a ConvViT's stage-1/2 maps added to its latent) is a
pretraining device; the exported encoder is what MAE and ConvMAE fine-tune, the last
block, then the final norm. For a ViT that is the student's encoder with every patch
visible; its fixed sin-cos position embedding (cls slot zero) is written as timm's
`pos_embed` tensor [1, 1+N, D].

`read_encoder` gives the same encoder from an export file or from any student checkpoint
(run dir, checkpoint dir, model.safetensors): `finetune` and `eval` start from it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes

from mrmae.shared.errors import MrmaeError
from mrmae.train.checkpoint import CheckpointError, write_atomic
from mrmae.train.restore import Restored, load_student, read_weights
from mrmae.train.students import families, family_of, pretrained_cfg, registered_kwargs, student_names


def _arch_kwargs() -> set[str]:
    """What an export file's metadata may pass timm: the registered encoders' architecture
    arguments and num_classes (no checkpoint_path, no pretrained_cfg)."""
    return {"num_classes"} | {k for n in student_names() for k in registered_kwargs(n)}


class ExportError(MrmaeError, ValueError):
    """A file or student that cannot become a timm encoder (one line, naming the file)."""


@dataclass(frozen=True)
class Encoder:
    """A pretrained encoder as timm builds it, and where it came from."""

    timm_model: str  # registered timm name, e.g. mrmae_convvit_base
    timm_kwargs: dict  # architecture arguments for timm.create_model (all of them)
    tensors: dict[str, torch.Tensor]  # the encoder's weights under the timm model's names
    weights: Path  # the file they were read from
    run_dir: Path | None  # the pretrain run, when read from one
    note: str | None = None  # one line when pretraining fused what the encoder leaves out

    def create(self, **overrides) -> torch.nn.Module:
        """The timm model, randomly initialised (`overrides`: num_classes, drop_path_rate, ...)."""
        import timm

        import mrmae  # noqa: F401  (registers the mrmae_* models with timm)

        return timm.create_model(self.timm_model, pretrained=False, **{**self.timm_kwargs, **overrides})

    def load(self) -> torch.nn.Module:
        """The timm model with these weights loaded strictly, in eval mode."""
        model = self.create()
        try:
            model.load_state_dict(self.tensors, strict=True)
        except RuntimeError as e:
            first = (str(e).strip().splitlines() or ["mismatch"])[0]
            raise ExportError(f"{self.weights}: does not fit timm {self.timm_model}: {first}") from None
        return model.eval()


def fusion_note(model: torch.nn.Module) -> str | None:
    """The line that says what of a fused student the encoder leaves out (None: nothing)."""
    fuse = tuple(model.fuse_layers)
    blocks = f"blocks {','.join(map(str, fuse))} (--fuse-layers)" if len(fuse) > 1 else ""
    maps = next((f.fused_maps for f in families().values() if isinstance(model, f.student)), None)
    if not blocks and not maps:
        return None
    what = " and ".join(filter(None, [maps, blocks]))
    return (f"pretraining fused {what} into the latent; the encoder is the last block, then the final norm, as MAE "
            "and ConvMAE fine-tune (`mrmae eval --fused` probes the fused features)")


def student_encoder(restored: Restored) -> Encoder:
    """The encoder of a restored student, under its timm model's names."""
    model, family = restored.model, family_of(restored.name)
    keep = family.encoder_keys  # (pos_embed is a buffer, kept too)
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items() if k.startswith(keep)}
    return Encoder(restored.name, family.encoder_kwargs(model.cfg), tensors, restored.weights, restored.run_dir,
                   fusion_note(model))


def read_export(path: Path) -> Encoder | None:
    """An `mrmae export` file's encoder; None when `path` is a safetensors file without export metadata."""
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    if "timm_model" not in meta:
        return None
    name = meta["timm_model"]
    try:
        kwargs = json.loads(meta.get("timm_kwargs", "{}"))
    except ValueError:
        kwargs = None
    if not isinstance(kwargs, dict) or set(kwargs) - _arch_kwargs():
        raise ExportError(f"{path}: its timm_kwargs metadata is not a set of architecture arguments")
    try:  # our encoders, and timm's own ViTs that earlier exports named
        family_of(name)
    except KeyError:
        raise ExportError(f"{path}: names timm model {name!r}, not an mrmae encoder") from None
    kwargs.pop("num_classes", None)  # earlier exports stored num_classes=0: the caller decides the head
    encoder = Encoder(name, kwargs, read_weights(path), path, None, meta.get("fusion_note") or None)
    _check_fits(encoder)
    return encoder


def _check_fits(encoder: Encoder) -> None:
    """ExportError unless the file's tensors are those of the model its metadata describes, checked
    on the meta device (no memory), so crafted sizes build nothing large and a mismatch is one line."""
    numbers = [v for x in encoder.timm_kwargs.values() for v in (x if isinstance(x, list) else [x])
               if not isinstance(v, (str, bool))]
    if any(not isinstance(v, (int, float)) or not 0 < v <= 8192 for v in numbers):
        raise ExportError(f"{encoder.weights}: its timm_kwargs hold a size out of range")
    try:
        with torch.device("meta"):
            expected = encoder.create().state_dict()
    except (TypeError, ValueError, KeyError, RuntimeError, AssertionError, NotImplementedError) as e:
        raise ExportError(f"{encoder.weights}: timm {encoder.timm_model} cannot be built from its timm_kwargs "
                          f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    for key, tensor in encoder.tensors.items():
        if key not in expected or expected[key].shape != tensor.shape:
            raise ExportError(f"{encoder.weights}: tensor {key} {tuple(tensor.shape)} is not in timm "
                              f"{encoder.timm_model} as its metadata describes it")


def read_export_at(source: str | Path) -> Encoder | None:
    """The encoder of the `mrmae export` that `source` names (its file, or the `--out`
    directory holding its model.safetensors); None for anything else (a student checkpoint)."""
    path = Path(source)
    file = path / "model.safetensors" if path.is_dir() else path
    return read_export(file) if file.is_file() else None


def read_encoder(source: str | Path) -> Encoder:
    """The encoder of an `mrmae export` (its directory or file), or of a student checkpoint (a
    run dir, a checkpoint dir or its model.safetensors)."""
    if (encoder := read_export_at(source)) is not None:
        return encoder
    return student_encoder(load_student(source))


@dataclass
class Exported:
    path: Path  # absolute
    encoder: Encoder
    pretrained_cfg: dict

    @property
    def num_tensors(self) -> int:
        return len(self.encoder.tensors)

    def create_call(self) -> str:
        """The timm.create_model call that loads the file strictly, as Python source."""
        defaults = registered_kwargs(self.encoder.timm_model)
        extra = {k: v for k, v in self.encoder.timm_kwargs.items() if _plain(defaults.get(k)) != _plain(v)}
        kw = "".join(f", {k}={v!r}" for k, v in extra.items())
        size = "" if self.encoder.timm_kwargs.get("img_size", 224) == 224 else \
            f", input_size={tuple(self.pretrained_cfg['input_size'])!r}"
        return (f"timm.create_model({self.encoder.timm_model!r}, pretrained=True{kw}, "
                f"pretrained_cfg_overlay=dict(file={str(self.path)!r}{size}))")


def _plain(value):
    """Tuples and lists compare alike (JSON metadata turns tuples into lists)."""
    return list(value) if isinstance(value, (tuple, list)) else value


def export_encoder(checkpoint: str | Path, out: str | Path) -> Exported:
    """Write the encoder of `checkpoint` (see `read_encoder`) to `out` (safetensors, timm names)."""
    encoder = read_encoder(checkpoint)
    out = Path(out).parent.resolve() / Path(out).name  # (not the file itself: a link there is refused, never followed)
    if out.parent == encoder.weights.resolve().parent:  # e.g. --out .../stepN
        raise ExportError(f"--out {out.parent}: the checkpoint {encoder.weights.parent}, whose files it would "
                          "replace; write the encoder elsewhere")
    cfg = pretrained_cfg(family_of(encoder.timm_model).first_conv, int(encoder.timm_kwargs.get("img_size", 224)))
    exported = Exported(out, encoder, cfg)
    metadata = {"format": "pt", "timm_model": encoder.timm_model, "timm_kwargs": json.dumps(encoder.timm_kwargs),
                "pretrained_cfg": json.dumps(cfg), "load_with": exported.create_call(),
                "source_checkpoint": str(encoder.weights.resolve()), "fusion_note": encoder.note or ""}
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, safetensors_bytes(encoder.tensors, metadata=metadata))  # a full disk: an OSError naming `out`
    return exported

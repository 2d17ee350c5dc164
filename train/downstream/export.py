"""`mrmae export`: an encoder in the model hub's layout, `OUT/config.json` + `OUT/model.safetensors`,
as timm's own hub saving writes them (`timm.models.save_for_hf`), so that

    timm.create_model("local-dir:OUT", pretrained=True)            # num_classes=N: a new head

builds and loads it. A ViT student exports under timm's own architecture name
(`vit_base_patch16_224` and its siblings; `model_args` in config.json give the exact sizes),
so timm without mrmae loads it; a ConvViT under its mrmae name (`mrmae_convvit_*`, which
`import mrmae` registers; `train/students/registry.py`). The pretrained config in config.json is
the students' preprocessing (ImageNet mean and std, bicubic, MAE's eval crop 224 of 256:
crop_pct 0.875), not timm's ViT default (0.5). No file holds an absolute path: config.json's
`mrmae` section names the run and the checkpoint the export came from relative to OUT
(`source_run`, `source_checkpoint`).

What is exported (`read_encoder`, which finetune and eval use too):
- a pretraining run (run dir, checkpoint dir, its model.safetensors): the student's encoder,
  without decoder, mask token, mimic heads and fusion convs. Fusion (`--fuse-layers`, a
  ConvViT's stage-1/2 maps) is a pretraining device; the exported encoder is what MAE and
  ConvMAE fine-tune, the last block, then the final norm (one note says so);
- a fine-tuning run: the classifier, its head and `fc_norm` included (`num_classes` and the
  pooling in config.json);
- MAE's or ConvMAE's published `.pth` (`train/official.py`), pretrained or fine-tuned;
- an earlier export (this layout, or a lone model.safetensors whose metadata names its timm
  model, as mrmae wrote before).
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from mrmae.shared.errors import MrmaeError, OptionError
from mrmae.shared.outfiles import refuse_link
from mrmae.train.run.checkpoint import CheckpointError
from mrmae.train.run.records import RunConfig, read_json_object, read_run_config
from mrmae.train.official import (FORMATS, OFFICIAL, OfficialCheckpoint, is_official_file, read_official,
                                  split_unused, summarise)
from mrmae.train.restore import Restored, load_student, read_weights, resolve_weights
from mrmae.train.students.registry import families, family_of, pretrained_cfg, registered_kwargs, student_names

HUB_CONFIG, HUB_WEIGHTS = "config.json", "model.safetensors"
HEAD_KWARGS = ("num_classes", "global_pool", "fc_norm")  # a classifier's, beside the architecture's


def _arch_kwargs() -> set[str]:
    """What an export's config may pass timm: the registered encoders' architecture
    arguments, the head's, and in_chans (no checkpoint_path, no pretrained_cfg)."""
    return {*HEAD_KWARGS, "in_chans"} | {k for n in student_names() for k in registered_kwargs(n)}


class ExportError(MrmaeError, ValueError):
    """A file or student that cannot become a timm encoder (one line, naming the file)."""


@dataclass(frozen=True)
class Encoder:
    """A pretrained encoder (or fine-tuned classifier) as timm builds it, and where it came from."""

    timm_model: str  # registered timm name, e.g. mrmae_convvit_base (or vit_base_patch16_224)
    timm_kwargs: dict  # architecture arguments for timm.create_model (all of them; a classifier's head too)
    tensors: dict[str, torch.Tensor]  # the weights under the timm model's names
    weights: Path  # the file they were read from
    run_dir: Path | None  # the pretraining or fine-tuning run, when read from one
    note: str | None = None  # one line: what pretraining fused that the encoder leaves out, unused tensors
    source: str = "pretrain"  # what it is: "pretrain", "finetune", "MAE pretrain checkpoint", ...

    @property
    def num_classes(self) -> int:
        """Classes of the head the weights hold (0: none, a backbone)."""
        head = self.tensors.get("head.weight")
        return 0 if head is None else int(head.shape[0])

    def create(self, **overrides) -> torch.nn.Module:
        """The timm model, randomly initialised (`overrides`: num_classes, drop_path_rate, ...)."""
        import timm

        import mrmae  # noqa: F401  (registers the mrmae_* models with timm)

        kwargs = {"num_classes": self.num_classes, **self.timm_kwargs, **overrides}
        return timm.create_model(self.timm_model, pretrained=False, **kwargs)

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


def classifier_encoder(weights: Path, run_dir: Path, run_config: RunConfig) -> Encoder:
    """The classifier a fine-tuning run trained (config.json: timm_model, timm_kwargs with
    num_classes and global_pool), head and fc_norm included."""
    where = run_config.path
    name, kwargs = run_config.timm_model, run_config.timm_kwargs
    if name is None or kwargs is None:
        raise ExportError(f"{where}: a fine-tuning run's config without timm_model and timm_kwargs")
    family = _family(name, where)
    try:
        pool = family.classifier_kwargs(str(kwargs.get("global_pool", "avg")))  # the norm after 'avg' pooling
    except ValueError as e:
        raise ExportError(f"{where}: {e}") from None
    # a ConvViT fine-tuned before its conv-stage eps was recorded had the eps of then
    kwargs = {**family.before_recorded, **kwargs, **pool}
    encoder = Encoder(name, _checked_kwargs(kwargs, where), read_weights(weights), weights, run_dir, None, "finetune")
    _check_fits(encoder, exact=True)
    return encoder


def official_encoder(ck: OfficialCheckpoint) -> Encoder:
    """The encoder (and head, if fine-tuned) of a MAE or ConvMAE checkpoint; the decoder
    tensors of a pretraining checkpoint are named as unused in the note."""
    family = family_of(ck.name)
    wanted = {k for k in ck.state if k.startswith((*family.encoder_keys, "head.", "fc_norm."))}
    tensors, unused = split_unused(ck.state, wanted)
    notes = [f"{ck.path}: a {ck.label}" + (f"; not used by the encoder: {summarise(unused)}" if unused else "")]
    if ck.kind == "convmae" and ck.stage == "pretrain":
        notes.append(f"ConvMAE's pretraining fused {family.fused_maps} into the latent; the encoder is the last "
                     "block, then the final norm, as ConvMAE fine-tunes")
    encoder = Encoder(ck.name, {**registered_kwargs(ck.name), **ck.timm_kwargs},
                      {k: v.float().contiguous() for k, v in tensors.items()}, ck.path, None, "; ".join(notes),
                      ck.label)
    _check_fits(encoder, exact=True)
    return encoder


def _family(name: str, where):
    try:  # our encoders, and timm's own ViTs that ViT exports name
        return family_of(name)
    except KeyError:
        raise ExportError(f"{where}: names timm model {name!r}, not an mrmae encoder") from None


def _checked_kwargs(kwargs, where) -> dict:
    """`kwargs` if it is a set of architecture arguments (ExportError naming `where` otherwise)."""
    if not isinstance(kwargs, dict) or set(kwargs) - _arch_kwargs():
        raise ExportError(f"{where}: its timm arguments are not a set of architecture arguments")
    if kwargs.get("in_chans", 3) != 3:
        raise ExportError(f"{where}: in_chans {kwargs['in_chans']!r}; mrmae's encoders take RGB images (3)")
    return dict(kwargs)


def read_export(path: Path) -> Encoder | None:
    """An earlier export's lone model.safetensors (its metadata names the timm model); None
    when `path` is a safetensors file without such metadata."""
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    if "timm_model" not in meta:
        return None
    family = _family(meta["timm_model"], path)
    try:
        kwargs = json.loads(meta.get("timm_kwargs", "{}"))
    except ValueError:
        kwargs = None
    kwargs = _checked_kwargs(kwargs, path)
    kwargs.pop("num_classes", None)  # earlier exports stored num_classes=0: the caller decides the head
    kwargs = {**family.before_recorded, **kwargs}  # a ConvViT exported before its eps was recorded had 1e-6
    encoder = Encoder(meta["timm_model"], kwargs, read_weights(path), path, None, meta.get("fusion_note") or None)
    _check_fits(encoder)
    return encoder


def read_hub_export(folder: Path) -> Encoder:
    """The encoder of a hub-layout export folder (config.json + model.safetensors)."""
    config = read_json_object(folder / HUB_CONFIG, "a timm model config", CheckpointError)
    where = folder / HUB_CONFIG
    name, args = config.get("architecture"), config.get("model_args", {})
    if not isinstance(name, str):
        raise ExportError(f"{where}: no architecture")
    _family(name, where)
    kwargs = _checked_kwargs(args, where)
    size = kwargs.get("img_size")
    if isinstance(size, list) and len(size) == 2 and size[0] == size[1]:  # timm writes [S, S]; mrmae speaks S
        kwargs["img_size"] = size[0]
    ours = config.get("mrmae") if isinstance(config.get("mrmae"), dict) else {}
    note = ours.get("fusion_note") if isinstance(ours.get("fusion_note"), str) else None
    weights = folder / HUB_WEIGHTS
    encoder = Encoder(name, kwargs, read_weights(weights), weights, None, note,
                      str(ours.get("source", "export")))
    _check_fits(encoder, exact=True)
    return encoder


def export_source_run(folder: str | Path) -> Path | None:
    """The run an export came from (config.json `mrmae.source_run`, relative to the export
    folder), when it names one that is still there; None otherwise."""
    folder = Path(folder)
    try:
        ours = json.loads((folder / HUB_CONFIG).read_text()).get("mrmae") or {}
    except (OSError, ValueError, AttributeError):
        return None
    run = ours.get("source_run") if isinstance(ours, dict) else None
    if not isinstance(run, str) or os.path.isabs(run):
        return None
    path = Path(os.path.normpath(folder / run))  # only a training run (config.json, checkpoints/), nothing else
    return path if (path / "config.json").is_file() and (path / "checkpoints").is_dir() else None


def _check_fits(encoder: Encoder, exact: bool = False) -> None:
    """ExportError unless the file's tensors are those of the model its config describes (all
    of them, with `exact`), checked on the meta device (no memory), so crafted sizes build
    nothing large and a mismatch is one line."""
    numbers = [v for x in encoder.timm_kwargs.values() for v in (x if isinstance(x, list) else [x])
               if not isinstance(v, (str, bool))]
    if any(not isinstance(v, (int, float)) or not 0 <= v <= 8192 for v in numbers):
        raise ExportError(f"{encoder.weights}: its timm arguments hold a size out of range")
    try:
        with torch.device("meta"):
            expected = encoder.create().state_dict()
    except (TypeError, ValueError, KeyError, RuntimeError, AssertionError, NotImplementedError) as e:
        raise ExportError(f"{encoder.weights}: timm {encoder.timm_model} cannot be built from its timm arguments "
                          f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    for key, tensor in encoder.tensors.items():
        if key not in expected or expected[key].shape != tensor.shape:
            raise ExportError(f"{encoder.weights}: tensor {key} {tuple(tensor.shape)} is not in timm "
                              f"{encoder.timm_model} as its config describes it")
    missing = sorted(set(expected) - set(encoder.tensors)) if exact else []
    if missing:
        raise ExportError(f"{encoder.weights}: lacks {len(missing)} tensors of timm {encoder.timm_model}: "
                          f"{', '.join(missing[:4])}")


def read_export_at(source: str | Path) -> Encoder | None:
    """The encoder of the export that `source` names (its folder, or the model.safetensors in
    it; an earlier export's lone file); None for anything else (a run's checkpoint)."""
    path = Path(source)
    folder = path if path.is_dir() else path.parent
    if (folder / HUB_CONFIG).is_file() and (path.is_dir() or path.name == HUB_WEIGHTS) \
            and not (folder / "checkpoints").is_dir():  # (a run's own config.json is no hub config)
        return read_hub_export(folder)
    file = path / HUB_WEIGHTS if path.is_dir() else path
    return read_export(file) if file.is_file() else None


def read_encoder(source: str | Path, fmt: str = "auto") -> Encoder:
    """The encoder of `source`: MAE's or ConvMAE's `.pth` (`fmt` auto: from the tensor names),
    an export (folder or file), a fine-tuning run's classifier, or a pretraining student (a
    run dir, a checkpoint dir or its model.safetensors)."""
    if fmt not in FORMATS:
        raise OptionError(f"--checkpoint-format {fmt}: one of {', '.join(FORMATS)}")
    if fmt in OFFICIAL or (fmt == "auto" and is_official_file(source)):
        return official_encoder(read_official(source, fmt))
    if (encoder := read_export_at(source)) is not None:
        return encoder
    weights, run_dir = resolve_weights(source)
    run_config = read_run_config(run_dir) if run_dir else None
    if run_config is not None and run_config.task == "finetune":
        return classifier_encoder(weights, run_dir, run_config)
    return student_encoder(load_student(source))


# --- writing: the hub layout -----------------------------------------------------------------


@dataclass
class Exported:
    folder: Path  # absolute
    encoder: Encoder  # as written (under the hub architecture name)
    pretrained_cfg: dict

    @property
    def num_tensors(self) -> int:
        return len(self.encoder.tensors)

    @property
    def needs_mrmae(self) -> bool:
        """Whether timm must `import mrmae` to build it (a ConvViT; ViTs are timm's own)."""
        return self.encoder.timm_model in student_names()

    def local_dir_call(self) -> str:
        """The timm.create_model call that builds and loads the folder, as Python source."""
        return f"timm.create_model({f'local-dir:{self.folder}'!r}, pretrained=True)"

    def file_call(self) -> str:
        """The same from the weights file, as timm's plain `pretrained=True` call: the sizes
        and pooling that differ from the architecture's defaults as keyword arguments, the head's
        classes in the overlay (so that timm loads strictly; `num_classes=N` gives a new head)."""
        defaults = registered_kwargs(self.encoder.timm_model) if self.needs_mrmae else {}
        extra = {k: v for k, v in self.encoder.timm_kwargs.items()
                 if _plain(defaults.get(k)) != _plain(v) and k not in ("in_chans", "num_classes")}
        kw = "".join(f", {k}={v!r}" for k, v in extra.items())
        classes = self.encoder.num_classes
        overlay = f"file={str(self.folder / HUB_WEIGHTS)!r}" + (f", num_classes={classes}" if classes else "")
        if not self.needs_mrmae:  # timm's own ViT config has num_classes 1000 and mean/std 0.5: say ours
            overlay += ("" if classes else ", num_classes=0") + \
                f", mean={self.pretrained_cfg['mean']}, std={self.pretrained_cfg['std']}"
        return f"timm.create_model({self.encoder.timm_model!r}, pretrained=True{kw}, pretrained_cfg_overlay=dict({overlay}))"


def _plain(value):
    """Tuples and lists compare alike (JSON turns tuples into lists)."""
    return list(value) if isinstance(value, (tuple, list)) else value


def hub_encoder(encoder: Encoder) -> Encoder:
    """The same weights under the architecture name the export carries: a ViT under timm's own
    name (`vit_base_patch16_224`, ...) with every size in its arguments, a ConvViT as it is."""
    family = family_of(encoder.timm_model)
    stock = family.stock_name(encoder.timm_model)
    if stock is None:
        return encoder
    kwargs = {**family.encoder_defaults(encoder.timm_model), **encoder.timm_kwargs} \
        if encoder.timm_model in student_names() else dict(encoder.timm_kwargs)
    kwargs.setdefault("global_pool", "token")
    return replace(encoder, timm_model=stock, timm_kwargs=kwargs)


def export_encoder(checkpoint: str | Path, out: str | Path, fmt: str = "auto", overwrite: bool = False) -> Exported:
    """Write the encoder of `checkpoint` (see `read_encoder`) to the folder `out`: config.json
    and model.safetensors, by timm's `save_for_hf`. An export already in `out` is refused, or
    with `overwrite` set aside (renamed, `run_dir.set_aside`) once the checkpoint has been read."""
    from mrmae.train.run.run_dir import EXPORT_FILES, check_out, set_aside

    source = read_encoder(checkpoint, fmt)
    folder = Path(out).resolve()
    _check_out(folder, source)
    for name in EXPORT_FILES:  # a link planted where an output goes: refused, never written through nor over
        refuse_link(folder / name)
    check_out(out, False, overwrite, EXPORT_FILES, "an export")
    if overwrite and (aside := set_aside(out, EXPORT_FILES)) is not None:
        warnings.warn(f"--overwrite: the export that was in {out} is now {aside}")
    encoder = hub_encoder(source)
    cfg = {**pretrained_cfg(family_of(encoder.timm_model).first_conv, _img_size(encoder.timm_kwargs)),
           "num_classes": encoder.num_classes}
    model = encoder.create(pretrained_cfg=cfg)
    model.load_state_dict(encoder.tensors, strict=True)
    ours = {"version": _version(), "source": source.source, "student": source.timm_model,
            "source_run": _relative(source.run_dir, folder), "source_checkpoint": _relative(source.weights, folder),
            "fusion_note": source.note}
    folder.mkdir(parents=True, exist_ok=True)
    _save_for_hf(model, folder, {"mrmae": ours})
    return Exported(folder, encoder, cfg)


def _check_out(folder: Path, source: Encoder) -> None:
    """ExportError unless `folder` is a place for an export: not the checkpoint read (e.g.
    `--out .../stepN`), not a run (whose config.json it would replace)."""
    if folder == source.weights.resolve().parent:
        raise ExportError(f"--out {folder}: the checkpoint {source.weights.parent}, whose files it would "
                          "replace; write the encoder elsewhere")
    config = folder / HUB_CONFIG
    if (folder / "checkpoints").is_dir() or (source.run_dir and folder == source.run_dir.resolve()):
        raise ExportError(f"--out {folder}: a training run, whose config.json the export would replace; write the "
                          "encoder elsewhere")
    if config.is_file():
        try:
            hub = "architecture" in json.loads(config.read_text())
        except (OSError, ValueError, TypeError):
            hub = False
        if not hub:
            raise ExportError(f"--out {folder}: holds a config.json that is not an export's; write the encoder "
                              "elsewhere")


def _img_size(kwargs: dict) -> int:
    size = kwargs.get("img_size", 224)
    return int(size[0] if isinstance(size, (list, tuple)) else size)


def _version() -> str:
    import mrmae

    return mrmae.__version__


def _relative(path: Path | None, folder: Path) -> str | None:
    """`path` relative to the export folder (no absolute path goes into a file)."""
    return None if path is None else os.path.relpath(Path(path).resolve(), folder)


def _save_for_hf(model: torch.nn.Module, folder: Path, model_config: dict) -> None:
    """timm's `save_for_hf` into a temporary folder inside `folder`, then both files renamed into
    place, weights first, config.json last (local-dir reads it first): an old config.json is
    removed before, so a half-done export never pairs an old config with new weights. An
    OSError names the final file."""
    from timm.models import save_for_hf

    tmp = folder / f".export-{os.getpid()}.tmp"
    target = folder / HUB_WEIGHTS
    try:
        save_for_hf(model, str(tmp), model_config=model_config, safe_serialization=True)
        refuse_link(target)  # (planted while it was written)
        (folder / HUB_CONFIG).unlink(missing_ok=True)
        os.replace(tmp / HUB_WEIGHTS, target)
        target = folder / HUB_CONFIG
        os.replace(tmp / HUB_CONFIG, target)
    except OSError as e:
        raise type(e)(e.errno, e.strerror, str(target)) from e
    except SafetensorError as e:  # safetensors' own wrapper of a failed write ("... (os error 28)")
        code = re.search(r"os error (\d+)", str(e))
        number = int(code.group(1)) if code else errno.EIO
        raise OSError(number, os.strerror(number), str(target)) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

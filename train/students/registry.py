"""The student family registry: `@register_family` on a `StudentFamily` subclass makes its
students buildable by name (`create_model`), exportable, fine-tunable and restorable from a
checkpoint, and registers its encoders with timm (`mrmae_*` names, after `import mrmae`).

A family (one file in this package: `vit.py`, `convvit.py`) says
- `archs`: registry name -> its config's fields (the same name is the timm encoder's),
- `config`, `student`: the pretraining config dataclass and the `MaskedStudent` it builds,
- `build_encoder` and `encoder_defaults`: the timm encoder export, finetune and eval use,
  `encoder_kwargs` and `encoder_keys`: how a student's config and weights become it,
- `restore_overrides`: the sizes a checkpoint's tensor shapes reveal,
- its fusion rule (`fused_maps`, `fuse_blocks`, `fusion_label`) and its classifier rule (`cls_token`),
- `tiny`: the sizes of a test-sized student (tests/test_models.py builds every name so).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import register_model

# What the students saw: ImageNet mean/std (shared/views.py), bicubic resizing, and MAE's eval
# transform (resize the shorter side to 256, centre crop 224: crop_pct 224 / 256).
EVAL_CROP_PCT = 0.875


class StudentFamily:
    """One student family; subclass, set the class attributes and register with `@register_family`."""

    name: ClassVar[str]  # "vit"
    archs: ClassVar[dict[str, dict]]  # registry name -> config fields
    config: ClassVar[type]  # the config dataclass (img_size, patch_size, depth, fuse_layers, decoder_*, ...)
    student: ClassVar[type]  # the MaskedStudent subclass, built as student(config)
    first_conv: ClassVar[str]  # the timm encoder's first conv (its pretrained config's `first_conv`)
    encoder_keys: ClassVar[tuple[str, ...]]  # student state-dict prefixes the encoder keeps, same names
    cls_token: ClassVar[bool]  # the encoder has a [CLS] token ('token' pooling possible)
    fuse_blocks: ClassVar[str] = "blocks"  # what --fuse-layers counts, for messages
    fused_maps: ClassVar[str | None] = None  # what else the latent fuses that the encoder drops, for notes
    fusion_label: ClassVar[str] = ""  # how `mrmae report` prefixes the fused blocks for what else it fuses
    old_encoder_names: ClassVar[tuple[str, ...]] = ()  # timm names earlier exports recorded for this family
    rank: ClassVar[int] = 100  # families list in rank order (then by name): `mrmae models`, messages
    tiny: ClassVar[dict]  # config overrides for a test-sized student of any of its names (a few blocks, 32 px)
    # Config fields no tensor shape reveals that a run records (config.json `model_config`; the timm
    # encoder takes them under the same names), and the values runs had before they recorded them.
    recorded: ClassVar[tuple[str, ...]] = ()
    before_recorded: ClassVar[dict] = {}

    def encoder_defaults(self, name: str) -> dict:
        """The architecture arguments the timm encoder `name` is built with by default."""
        raise NotImplementedError

    def build_encoder(self, name: str, pretrained: bool, **kwargs) -> nn.Module:
        """timm's entry point for `name` (timm.create_model calls it)."""
        raise NotImplementedError

    def encoder_kwargs(self, cfg: Any) -> dict:
        """The timm encoder's architecture arguments for a student built from `cfg` (export)."""
        raise NotImplementedError

    def restore_overrides(self, state: dict) -> dict:
        """Config overrides a student checkpoint's tensor shapes reveal (img_size at least)."""
        raise NotImplementedError

    def classifier_kwargs(self, global_pool: str) -> dict:
        """Extra timm kwargs for a fine-tuning classifier with `global_pool`: a new norm after
        'avg' pooling (MAE's and ConvMAE's recipe); ValueError for a pool the encoder lacks."""
        if global_pool == "token" and not self.cls_token:
            raise ValueError(f"a {self.name} encoder has no [CLS] token to pool: use --global-pool avg")
        return {}

    def recorded_config(self, cfg: Any) -> dict:
        """What a run writes to config.json's `model_config` for a student built from `cfg`."""
        return {k: getattr(cfg, k) for k in self.recorded}

    def restored_config(self, record: Any, where: str) -> dict:
        """Config overrides from a run's recorded `model_config` (None: a run from before it
        was recorded, which had `before_recorded`); ValueError naming `where` for a bad value."""
        record = {} if record is None else record
        if not isinstance(record, dict):
            raise ValueError(f"{where}: model_config is {record!r}, not an object")
        values = {**self.before_recorded, **{k: record[k] for k in self.recorded if k in record}}
        for k, v in values.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 1e3:
                raise ValueError(f"{where}: model_config {k} is {v!r}, not a positive number")
        return values

    def stock_name(self, name: str) -> str | None:
        """timm's own architecture name that builds the encoder `name` (with its sizes as
        arguments), under which exports go so that timm without mrmae loads them; None when
        timm has none (the encoder is ours)."""
        return None

    def describe(self, model: nn.Module) -> str:
        """The architecture in a few words, for `mrmae models`."""
        raise NotImplementedError

    def params_note(self, model: nn.Module) -> str:
        """What the encoder parameter count of `mrmae models` holds beyond the backbone ('' if nothing)."""
        return ""


_FAMILIES: dict[str, StudentFamily] = {}
_BY_NAME: dict[str, StudentFamily] = {}
default_cfgs: dict[str, dict] = {}  # timm reads the pretrained configs of registered names here


def register_family(cls: type[StudentFamily]) -> type[StudentFamily]:
    """Class decorator: register a StudentFamily subclass, its student names and timm encoders."""
    family = cls()
    taken = [n for n in family.archs if n in _BY_NAME and _BY_NAME[n].name != family.name]
    if taken:
        raise ValueError(f"student family {family.name!r}: {', '.join(taken)} registered by another family")
    _FAMILIES[family.name] = family
    for name in family.archs:
        _BY_NAME[name] = family
        default_cfgs[name] = pretrained_cfg(family.first_conv)
        register_model(_timm_entry(family, name))
    return cls


def _timm_entry(family: StudentFamily, name: str):
    def entry(pretrained: bool = False, **kwargs) -> nn.Module:
        return family.build_encoder(name, pretrained, **kwargs)

    entry.__name__ = entry.__qualname__ = name
    entry.__module__ = __name__  # where timm looks for `default_cfgs`
    entry.__doc__ = f"{name}: the encoder of the {family.name} student (an `mrmae export` file loads into it)."
    return entry


def pretrained_cfg(first_conv: str, img_size: int = 224) -> dict:
    """The pretrained config of an exported encoder (no URL: weights come from a file)."""
    return dict(url="", num_classes=0, input_size=(3, img_size, img_size), pool_size=None,
                crop_pct=EVAL_CROP_PCT, crop_mode="center", interpolation="bicubic", fixed_input_size=True,
                mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD, first_conv=first_conv, classifier="head",
                license="see the pretraining data and teacher")


def families() -> dict[str, StudentFamily]:
    """Registered families by name, in rank order."""
    return {f.name: f for f in sorted(_FAMILIES.values(), key=lambda f: (f.rank, f.name))}


def student_names() -> list[str]:
    """Every registered student name, family by family (rank order), each family's in its order."""
    return [n for f in families().values() for n in f.archs]


def family_of(name: str) -> StudentFamily:
    """The family of a student / timm encoder name (earlier exports' timm names included); KeyError."""
    if name in _BY_NAME:
        return _BY_NAME[name]
    for family in _FAMILIES.values():
        if name in family.old_encoder_names:
            return family
    raise KeyError(f"unknown model {name!r}; known: {', '.join(_BY_NAME)}")


def registered_kwargs(name: str) -> dict:
    """The architecture arguments the registered timm encoder `name` is built with by default ({} if unknown)."""
    return _BY_NAME[name].encoder_defaults(name) if name in _BY_NAME else {}

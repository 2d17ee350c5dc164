"""What one `mrmae pretrain` run does: `PretrainConfig` (and the step's `StepOptions`), each
option declared once (`shared/options.py`) for Python callers and the command line alike.

Kept free of torch (the command line builds its options from these classes); the masking
strategies and the student registry are imported only when a value is checked.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import click

from mrmae.shared.options import RegistryChoice, option, workers
from mrmae.shared.views import IMAGENET_MEAN, IMAGENET_STD
from mrmae.train.run.options import RunOptions
from mrmae.train.run.recipe import RecipeFile

# train/official.py's FORMATS, spelled out: the command line does not import torch to parse
CHECKPOINT_FORMATS = ("auto", "mrmae", "mae", "convmae")


def checkpoint_format() -> object:
    """The `checkpoint_format` field of a command that reads MAE's or ConvMAE's .pth too."""
    return option("What the checkpoint is: auto (from the file: MAE's and ConvMAE's .pth by their tensor names), "
                  "mrmae, or mae / convmae (a facebookresearch/mae or Alpha-VL/ConvMAE .pth, pretrained or "
                  "fine-tuned).", "auto", type=click.Choice(list(CHECKPOINT_FORMATS)))


def _mask_names() -> list[str]:
    """--mask's choices: the registered masking strategies (train/masks/, and plug-ins)."""
    from mrmae.train.masking import mask_names

    return mask_names()


def mask_options_callback(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> dict[str, float]:
    """--mask-option NAME=VALUE (repeated) -> {name: value}; checked against the strategies
    when the run is set up (train/pretrain.check_mask)."""
    options = {}
    for text in values:
        name, eq, value = text.partition("=")
        try:
            options[name.strip().replace("-", "_")] = float(value)
        except ValueError:
            eq = ""
        if not eq or not name.strip():
            raise click.BadParameter(f"{text!r}: give NAME=NUMBER, e.g. block_min_patches=16", param=param)
    return options


def _blocks(ctx: click.Context, param: click.Parameter, text) -> tuple[int, ...]:
    """A comma-separated list of 1-based block numbers ("4,8,12"); BadParameter names the option."""
    if isinstance(text, tuple):  # (the field's own default)
        return text
    try:
        blocks = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise click.BadParameter(f"{text!r}: give block numbers, e.g. 4,8,12", param=param) from None
    if any(b < 1 for b in blocks):
        raise click.BadParameter(f"{text!r}: blocks are numbered from 1", param=param)
    return blocks


@dataclass
class StepOptions:
    """How a pretraining step masks and weighs its losses (config.json `step_options`)."""

    mask: str = option("Masking strategy (train/masks/): random (MAE's), focused (by the teacher's attention), ...",
                       "random", type=RegistryChoice(_mask_names))
    mask_ratio: float = option("Share of the patches masked.", 0.75, type=click.FloatRange(0, 1, max_open=True),
                               low=0.0, high=1.0)
    # the strategy's options (a flag each where its registration names one, else --mask-option);
    # absent ones take their defaults
    mask_options: dict[str, float] = field(default_factory=dict)
    recon_weight: float = option("Weight of L_R, the reconstruction of the masked patches' normalised pixels.", 0.5,
                                 low=0.0)
    mimic_weight: float = option("Weight of L_M, the visible tokens' mimicking of the teacher's (without a teacher: "
                                 "L_R alone).", 0.5, low=0.0)
    target_norm: str = option("Normalise the teacher's tokens before L_M (at training time: the cache stays raw).",
                              "none", type=click.Choice(["none", "layernorm", "l2"]))
    # where the teacher's features are the target: "encoder" (L_M on the visible tokens) or "decoder"
    # (table 3 row 5: a decoder head reconstructs the masked tokens' features, weighted by mimic_weight)
    high_level_at: str = option("Where the teacher's features are the target: encoder (MR-MAE's L_M, on the visible "
                                "tokens) or decoder (table 3 row 5: a second decoder head reconstructs them for the "
                                "masked tokens, beside the pixels); weighted by --mimic-weight.", "encoder",
                                type=click.Choice(["encoder", "decoder"]))
    seed: int = 0  # the run's --seed
    pixel_mean: tuple[float, float, float] = IMAGENET_MEAN  # the student's input normalisation (0-1 units)
    pixel_std: tuple[float, float, float] = IMAGENET_STD


@dataclass(kw_only=True)
class PretrainConfig(RunOptions):
    shards: str = option("Source tars (the ones the cache was extracted from).")
    model: str = option("See `mrmae models`.", "mrmae_vit_base_patch16")
    feature_cache: str | None = option("Train from this cache (a directory or an fsspec URL).", None)
    # `open_targets`: "main" (default), an added teacher, or several joint: "main,clip-B16"
    target: str | None = option("Which teacher of the cache to mimic: main (default, the one that drew the views) or "
                                "a name from extract-features --add-teacher; several, comma-separated, train jointly "
                                "(a head each).", None)
    teacher: str | None = option("Live teacher spec instead of a cache (clip:... / dino:...).", None)
    decoder_dim: int = option("Decoder width.", 512, type=click.IntRange(min=1))
    decoder_depth: int = option("Decoder transformer blocks.", 8, type=click.IntRange(min=0))
    fuse_layers: tuple[int, ...] = option("Encoder blocks whose visible tokens are summed, e.g. 4,8,12.", (),
                                          cli_default="", callback=_blocks)
    # start from these weights (MAE's or ConvMAE's .pth, an mrmae checkpoint): restore.init_from
    init: str | None = option("Start from these weights: MAE's or ConvMAE's published .pth (pretrained: encoder and "
                              "decoder; fine-tuned: the encoder) or an mrmae pretraining run/checkpoint; the mimic "
                              "head starts fresh.", None, type=click.Path(exists=True))
    checkpoint_format: str = checkpoint_format()  # what --init is (`official.FORMATS`; auto: from the file)
    views_per_image: int = option("Live/plain modes: views per image.", 2, flags=("--views",),
                                  type=click.IntRange(min=1))  # (cached mode reads the cache's)
    workers: int = workers("Loader processes per training process (read tars and cache, decode, render).")
    seed: int = option("Seed of the initialisation, the views and masks drawn and the shuffles.", 0)
    # "shards" (each rank reads its shards) | "samples" (exact at any world size)
    data_split: str = option("shards: each process reads its own shards; samples: every process reads all shards "
                             "and keeps its slots, so global batches are the same at any process count.", "shards",
                             type=click.Choice(["shards", "samples"]))
    pixels_from_cache: bool = option("Read each view's pixels from the cache (extracted with --store-pixels), not "
                                     "from the tars.", False, is_flag=True)
    # workers decode, the step renders the views; None: on with CUDA
    render_on_device: bool | None = option(
        "Loader workers read, decode and fetch targets; the training device renders the views, pixel for pixel as "
        "the workers would (the same batches and losses). Default: on with CUDA, off on CPU. Nothing to render with "
        "--pixels-from-cache.", None, flags=("--render-on-device/--no-render-on-device",))
    # torch.compile backend ("inductor"; "eager" to test the plumbing), None: eager mode
    compile: str | None = option("torch.compile the student (inductor: the fast one; a GPU gains most).", None,
                                 type=click.Choice(["inductor", "eager", "aot_eager"]))
    step_options: StepOptions = field(default_factory=StepOptions)
    config_file: RecipeFile | None = None  # the --config file the options came from (recorded in config.json)


def pretrain_config(params: dict, **given) -> PretrainConfig:
    """The PretrainConfig of `mrmae pretrain`'s parsed parameters (click's names, as in
    `ctx.params`): the declared fields, the mask strategies' options from their own flags
    (`masking.flagged_mask_options`) and --mask-option together (`mask_options`), each once.
    OptionError for a --mask-option that has a flag of its own."""
    from mrmae.shared.errors import OptionError
    from mrmae.shared.options import config_from
    from mrmae.train.masking import flagged_mask_options, get_mask

    params = dict(params)
    flagged = {o.name: params.pop(o.name) for o in flagged_mask_options() if o.name in params}
    given_options = dict(flagged)
    for name, value in (params.pop("mask_option", None) or {}).items():
        if name in flagged:
            raise OptionError(f"--mask-option {name}: give it as --{name.replace('_', '-')}")
        given_options[name] = value
    cfg = config_from(PretrainConfig, params, **given)
    # recorded whole in config.json: the strategy's defaults too, as this version has them
    options = {**get_mask(cfg.step_options.mask).resolve(given_options), **given_options}
    cfg.step_options.mask_options, cfg.step_options.seed = options, cfg.seed
    return cfg

"""What a downstream run does, each option declared once (`shared/options.py`): the label
options fine-tuning and every eval protocol share (`LabelFields`) and `FinetuneConfig`.

Kept free of torch: the command line builds its options from these classes.
"""

from __future__ import annotations

from dataclasses import dataclass

import click

from mrmae.shared.options import like, option, workers
from mrmae.train.config import checkpoint_format
from mrmae.train.run.options import RunOptions
from mrmae.train.run.recipe import RecipeFile


@dataclass(kw_only=True)
class LabelFields:
    """Where a labelled sample's class is (train/downstream/labels.py)."""

    label_format: str = option("Where a sample's class is: cls: {key}.cls, a decimal integer (ImageNet's shards); "
                               "json: --label-field of {key}.json; auto: .cls, else .json, as the first training tar "
                               "has it (recorded).", "auto", type=click.Choice(["auto", "cls", "json"]))
    label_field: str | None = option("json: the field holding the label.  [default: label]", None)
    class_map: str | None = option("Labels are class names, mapped by FILE: FILE.json an object {name: index} or a "
                                   "list of names; any other FILE one name per line, index = line number from 0 "
                                   "(timm's .txt).", None, type=click.Path(exists=True, dir_okay=False))
    skip_bad_labels: bool = option("Count and skip samples whose label is missing, unparseable, not in --class-map, "
                                   "negative or not below --num-classes (recorded, printed) instead of stopping at "
                                   "the first.", False, is_flag=True)


@dataclass(kw_only=True)
class EvalLabels(LabelFields):
    """eval's label options: fine-tuning's, and an optional --num-classes (fine-tuning's own
    sizes its head)."""

    num_classes: int | None = option("Classes scored; labels must be below it.  [default: the --class-map's, else "
                                     "the largest label + 1]", None, type=click.IntRange(min=1))


@dataclass(kw_only=True)
class FinetuneConfig(LabelFields, RunOptions):
    # a pretrain run/checkpoint (see restore.resolve_weights) or an `mrmae export` file
    checkpoint: str = option("A pretrain run dir, a checkpoint dir, its model.safetensors, an `mrmae export` "
                             "directory or file, or MAE's / ConvMAE's .pth.", type=click.Path(exists=True))
    checkpoint_format: str = checkpoint_format()  # `official.FORMATS`: what --checkpoint is (auto: from the file)
    train_shards: str = option("Labelled training tars ({key}.jpg + {key}.cls, or --label-format json).",
                               flags=("--shards", "--train-shards"))
    val_shards: str = option("Labelled validation tars (top-1/top-5 after each epoch).")
    num_classes: int = option("Outputs of the new head (labels must be below it).", 1000, type=click.IntRange(min=1))
    epochs: int = like(RunOptions, "epochs", 100)
    blr: float = like(RunOptions, "blr", 3e-4)  # the paper's section 4.1
    min_lr: float = like(RunOptions, "min_lr", 1e-6)
    warmup_epochs: float = like(RunOptions, "warmup_epochs", 5.0)
    weight_decay: float = like(RunOptions, "weight_decay", 0.05,
                               help="AdamW's, except on norms, biases and position/cls tokens.")
    layer_decay: float = option("Layer-wise lr decay.", 0.6, low=0.0, high=1.0, low_open=True)
    # `layer_decay.RULES`: MAE's and ConvMAE's assignment, or "stages"
    layer_decay_groups: str = option("official: MAE's and ConvMAE's layers (all before the first transformer block "
                                     "in layer 0, block i in i+1, the rest on top); stages: each ConvViT conv stage "
                                     "a layer (timm's group_matcher).", "official",
                                     type=click.Choice(["official", "stages"]))
    drop_path: float = option("Stochastic depth rate of the encoder's blocks.", 0.2, low=0.0, high=1.0)
    global_pool: str = option("avg: mean patch token + new fc_norm (MAE); token: the normed [CLS] token.", "avg",
                              type=click.Choice(["avg", "token"]))
    mixup: float = option("Mixup alpha (0: off).", 0.8, low=0.0)
    cutmix: float = option("CutMix alpha (0: off).", 1.0, low=0.0)
    mixup_prob: float = option("Chance that a batch is mixed.", 1.0, low=0.0, high=1.0)
    mixup_switch_prob: float = option("Chance of CutMix when both are on.", 0.5, low=0.0, high=1.0)
    smoothing: float = option("Label smoothing.", 0.1, low=0.0, high=1.0)
    augment: str = option("randaug: RandAugment + random erasing (MAE); light: crop and flip only.", "randaug",
                          type=click.Choice(["randaug", "light"]))
    rand_augment: str = option("timm's RandAugment policy string.", "rand-m9-mstd0.5-inc1")
    re_prob: float = option("Random erasing probability.", 0.25, low=0.0, high=1.0)
    eval_batch_size: int = option("Images per validation batch.", 64, type=click.IntRange(min=1))
    workers: int = workers("Loader processes per training process (read, decode, augment).")
    seed: int = option("Seed of the head, the augmentation, Mixup, drop path and the shuffles.", 0)
    config_file: RecipeFile | None = None  # the --config file the options came from (recorded in config.json)

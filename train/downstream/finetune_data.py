"""Labelled training data for `mrmae finetune`: WebDataset shards ({key}.jpg + its label, `labels.py`).

Pipeline (webdataset stages, like `train/stream.py`):

    epoch_shards      shard URLs in an order drawn from (seed, epoch, pass)
    split_by_node     this rank's shards
    split_by_worker   this DataLoader worker's shards
    samples           (key, image bytes, label) in tar order; a sample without a usable
                      label or an image is left out (`labels.py`; the run counted them
                      all before its first step, `finetune.take_census`)
    shuffle           a seeded buffer (seed, epoch, pass, rank, worker)
    augment           (pixels [3,S,S] float, label): decode, then timm's training transform
    batched           (pixels [B,3,S,S], labels [B]); only full batches (Mixup pairs rows)

timm's transforms draw from Python's `random`, numpy's and torch's global generators. All
three are seeded from (seed, epoch, pass, key) right before each sample is transformed, so
a sample's augmentation does not depend on the worker count, the batch it lands in or on
whether the run was resumed.
"""

from __future__ import annotations

import random
import warnings
from typing import Callable, Iterator

import numpy as np
import torch
import webdataset as wds
from torchvision.transforms.functional import to_pil_image

from mrmae.shared.seeding import seed_from
from mrmae.shared.shards import expand_urls, iter_samples
from mrmae.shared.views import ImageDecodeError, decode_image
from mrmae.shared.views import IMAGENET_MEAN, IMAGENET_STD
from mrmae.train.stream import epoch_shards
from mrmae.train.downstream.labels import LabelSpec, Skip, sample_labels

AUGMENTS = ("randaug", "light")


def train_transform(img_size: int, augment: str = "randaug", rand_augment: str = "rand-m9-mstd0.5-inc1",
                    re_prob: float = 0.25) -> Callable:
    """PIL image -> normalised float32 [3, S, S].

    `randaug`: MAE's fine-tuning transform (RandomResizedCrop 0.08-1 bicubic, flip,
    RandAugment, random erasing with per-pixel noise). `light`: crop and flip only, for
    tests and quick runs.
    """
    from timm.data import create_transform

    if augment not in AUGMENTS:
        raise ValueError(f"augment must be one of {AUGMENTS}, got {augment!r}")
    heavy = augment == "randaug"
    # color_jitter=None: with RandAugment timm ignores it anyway, and `light` stays geometric.
    return create_transform(img_size, is_training=True, auto_augment=rand_augment if heavy else None,
                            color_jitter=None, re_prob=re_prob if heavy else 0.0, re_mode="pixel",
                            interpolation="bicubic", mean=IMAGENET_MEAN, std=IMAGENET_STD)


def seed_everything(seed: int) -> None:
    """Seed the global generators timm's transforms and Mixup (and drop path) draw from."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def labelled_samples(urls: Iterator[str], spec: LabelSpec) -> Iterator[tuple[str, str, bytes, int]]:
    """(url, key, image bytes, label) of each sample with an image and a label `spec` can
    use; the others (counted by the census before training) are left out, as are later
    copies of a repeated key."""
    for url in urls:
        for _, s, label in sample_labels(url, 0, spec, iter_samples(url)):
            if not isinstance(label, Skip):
                yield url, s.key, s.image, label


def _collate(samples: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.stack([x for x, _ in samples]), torch.tensor([y for _, y in samples], dtype=torch.long)


class LabelledStream(torch.utils.data.IterableDataset):
    """Batches of augmented labelled images; call `set_epoch` before iterating."""

    def __init__(self, shards: str | list[str], batch_size: int, transform: Callable, spec: LabelSpec,
                 seed: int = 0, shuffle_buffer: int = 1000):
        super().__init__()
        self.urls, self.spec = expand_urls(shards), spec
        self.batch_size, self.transform, self.seed, self.shuffle_buffer = batch_size, transform, seed, shuffle_buffer
        self.epoch, self.repeat, self.first_epoch = 0, 0, None

    def set_epoch(self, epoch: int, repeat: int = 0) -> None:
        """Select the epoch and the pass over this rank's shards (a rank that runs short takes another)."""
        self.epoch, self.repeat = epoch, repeat
        self.first_epoch = epoch if self.first_epoch is None else self.first_epoch

    def _augment(self, samples: Iterator[tuple[str, str, bytes, int]]) -> Iterator[tuple[torch.Tensor, int]]:
        for url, key, data, label in samples:
            try:
                image = to_pil_image(decode_image(data))
            except ImageDecodeError as e:
                if self.epoch == self.first_epoch and self.repeat == 0:  # once a run, not once an epoch
                    warnings.warn(f"{url}: sample {key}: image does not decode ({e}); not trained on")
                continue
            seed_everything(seed_from("finetune-aug", self.seed, self.epoch, self.repeat, key))
            yield self.transform(image), label

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch, repeat = self.epoch, self.repeat
        rank, _, worker, _ = wds.utils.pytorch_worker_info()
        buffer_rng = random.Random(f"{self.seed}:{epoch}:{repeat}:{rank}:{worker}")
        stages = [
            lambda _: iter(epoch_shards(self.urls, self.seed, epoch * 1000 + repeat)),
            wds.split_by_node,
            wds.split_by_worker,
            lambda urls: labelled_samples(urls, self.spec),
            wds.shuffle(self.shuffle_buffer, min(self.shuffle_buffer, 100), rng=buffer_rng),
            self._augment,
            wds.batched(self.batch_size, collation_fn=_collate, partial=False),
        ]
        stream: Iterator = iter([None])
        for stage in stages:
            stream = stage(stream)
        yield from stream

"""`mrmae eval knn | linear-probe`: frozen-encoder evaluation on labelled WebDataset shards.

Images (`{key}.jpg`, their label in `{key}.cls` or as `labels.py` reads it) get MAE's
evaluation transform: bicubic resize of the shorter side to img_size / 0.875 (256 for 224),
centre crop img_size, ImageNet mean/std. The frozen encoder (`load_frozen`: an export file
or any student checkpoint) sees every patch and gives one feature per image: the [CLS]
token (`cls`) or the mean of the patch tokens (`mean`; `auto`: cls where there is one),
after the final norm. The encoder is the exported one (the last block, then the final
norm); `fused` probes a student's pretraining latent instead (its `--fuse-layers` sum and,
for a ConvViT, the stage-1/2 maps added, then the norm).

- kNN (DINO's protocol): cosine similarity of L2-normalised features, the k nearest
  training features vote for their labels with weight exp(similarity / T).
- Linear probe (MAE's head): BatchNorm1d without affine, then Linear, trained with SGD
  (momentum 0.9, cosine lr) on features computed once.
- Ensemble: either protocol per model, class probabilities averaged over the models. Unlike MAE's linprobe there is no
  train-time augmentation: the frozen features are computed once, which costs one encoder
  pass instead of one per epoch.

Each result is printed as a table row and appended as one JSON line to a results file,
with the images it is over: those evaluated and those present in the tars, the samples
skipped per reason (`labels.py`), the classes of both splits.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from mrmae.shared.shards import expand_urls, iter_samples
from mrmae.shared.errors import MrmaeError, worker_ignores_interrupt
from mrmae.shared.views import ImageDecodeError, decode_image, normalize
from mrmae.shared.views import IMAGENET_MEAN, IMAGENET_STD
from mrmae.train.run.loader import InterruptibleLoader
from mrmae.train.run.records import EvalRecord, MemberResult, append_eval
from mrmae.train.downstream.labels import (MAX_INFERRED_CLASSES, LabelError, LabelOptions, LabelSpec, Skip, Tally, class_notes,
                                resolve_labels, sample_labels)
from mrmae.train.restore import encode_all_tokens, load_student

FEATURES = ("auto", "cls", "mean")


class EvalError(MrmaeError, ValueError):
    """An evaluation that cannot run as asked (e.g. `cls` features of a student without [CLS])."""


def eval_transform(image: torch.Tensor, img_size: int = 224) -> torch.Tensor:
    """uint8 [3, H, W] -> float32 [3, S, S]: resize shorter side to S / 0.875, centre crop S, normalise."""
    resized = TF.resize(image, [round(img_size / 0.875)], interpolation=InterpolationMode.BICUBIC, antialias=True)
    return normalize(TF.center_crop(resized, [img_size, img_size]), IMAGENET_MEAN, IMAGENET_STD)


class LabelledImages(torch.utils.data.IterableDataset):
    """One item per sample of `urls`, shard by shard (DataLoader workers take every w-th
    shard): (pixels [3, S, S], label, None, order, end) for a sample used, (None, -1, Skip,
    order, end) for one skipped (`labels.py`: a bad label, no image, an image that does not
    decode, a repeated key). `order`: (shard number, position in the tar), the shard numbers
    being `indices` (their place in the split's list; default 0, 1, ...); `end` is 1 on a
    shard's last sample, else 0 (a count of the shards done, wherever the workers are).
    Batch with `collate_labelled`."""

    def __init__(self, urls: list[str], img_size: int, spec: LabelSpec, indices: list[int] | None = None):
        super().__init__()
        self.urls, self.img_size, self.spec = urls, img_size, spec
        self.indices = indices if indices is not None else list(range(len(urls)))

    def __iter__(self) -> Iterator[tuple]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        for index, url in list(zip(self.indices, self.urls))[worker::workers]:
            last = None  # held back one item, to mark the shard's last
            for item in self._items(url, index):
                if last is not None:
                    yield (*last, 0)
                last = item
            if last is not None:
                yield (*last, 1)

    def _items(self, url: str, index: int) -> Iterator[tuple]:
        for position, s, label in sample_labels(url, index, self.spec, iter_samples(url)):
            if isinstance(label, Skip):
                yield None, -1, label, (index, position)
                continue
            try:
                yield eval_transform(decode_image(s.image), self.img_size), label, None, (index, position)
            except ImageDecodeError as e:
                yield None, -1, Skip((index, position), "undecodable-image", url, s.key,
                                     detail=f"image does not decode ({e})"), (index, position)


@dataclass
class LabelledBatch:
    pixels: torch.Tensor  # [B, 3, S, S] of the samples used (B may be 0)
    labels: torch.Tensor  # [B] long
    order: torch.Tensor  # [B] long: shard number x 2^32 + position in the tar (tar order, whatever the workers)
    skips: list[Skip]  # the batch's samples not used
    ends: int  # shards whose last sample is in the batch


def collate_labelled(items: list[tuple]) -> LabelledBatch:
    used = [(x, y, (i << 32) + p) for x, y, skip, (i, p), _ in items if skip is None]
    pixels = torch.stack([x for x, _, _ in used]) if used else torch.empty(0)
    return LabelledBatch(pixels, torch.tensor([y for _, y, _ in used], dtype=torch.long),
                         torch.tensor([o for *_, o in used], dtype=torch.long),
                         [skip for _, _, skip, _, _ in items if skip is not None], sum(item[-1] for item in items))


class FusedFeatures(torch.nn.Module):
    """A student's pretraining latent, every patch visible, behind timm's `forward_features`."""

    def __init__(self, student: torch.nn.Module) -> None:
        super().__init__()
        self.student, self.num_prefix_tokens, self.img_size = student, student.num_prefix_tokens, student.img_size

    def forward_features(self, imgs: torch.Tensor) -> torch.Tensor:
        return encode_all_tokens(self.student, imgs)


@dataclass
class Frozen:
    model: torch.nn.Module  # has forward_features(imgs) -> [B, k+N, D], num_prefix_tokens
    weights: Path  # the file read
    run_dir: Path | None
    img_size: int


def load_frozen(source: str | Path, fused: bool = False, fmt: str = "auto") -> Frozen:
    """The encoder to probe from an export file or a student checkpoint (see `export.read_encoder`;
    `fmt`: --checkpoint-format); `fused`: the student's fused pretraining latent (a student
    checkpoint only)."""
    from mrmae.train.downstream.export import read_encoder, read_export_at

    if fused:
        if read_export_at(source) is not None:
            raise EvalError(f"{source}: an exported encoder keeps no fusion; give the pretrain run or checkpoint "
                            "for --fused")
        r = load_student(source, fmt)
        return Frozen(FusedFeatures(r.model).eval(), r.weights, r.run_dir, r.model.img_size)
    encoder = read_encoder(source, fmt)
    model = encoder.load()
    return Frozen(model, encoder.weights, encoder.run_dir, int(encoder.timm_kwargs.get("img_size", 224)))


def results_path(frozen: Frozen, source: str | Path) -> tuple[Path, str]:
    """Where `mrmae eval` appends by default, and why: the run the checkpoint belongs to; for
    an export, the run it was exported from (its config.json names it, relative to the
    export) when that run is still there, so `mrmae report RUN` shows the result; else beside
    the weights read."""
    from mrmae.train.downstream.export import export_source_run

    if frozen.run_dir is not None:
        return frozen.run_dir / "eval.jsonl", "the run"
    folder = Path(source) if Path(source).is_dir() else Path(source).parent
    run = export_source_run(folder)
    if run is not None:
        return run / "eval.jsonl", "the run the export came from"
    return frozen.weights.parent / "eval.jsonl", "beside the weights"


def resolve_feature(feature: str, model: torch.nn.Module) -> str:
    """`auto` -> `cls` for an encoder with a [CLS] token, else `mean`; EvalError for `cls` without one."""
    if feature not in FEATURES:
        raise EvalError(f"feature must be one of {FEATURES}, got {feature!r}")
    k = int(getattr(model, "num_prefix_tokens", 1))
    if feature == "auto":
        return "cls" if k == 1 else "mean"
    if feature == "cls" and k != 1:
        name = type(getattr(model, "student", model)).__name__
        raise EvalError(f"{name} has no [CLS] token: use --feature mean")
    return feature


@dataclass
class SplitFeatures:
    """A split's frozen features [M, D] float32, their labels [M] long, and the count of its samples."""

    features: torch.Tensor
    labels: torch.Tensor
    tally: Tally


@torch.no_grad()
def extract_features(frozen: Frozen, shards: str | list[str], feature: str = "auto", batch_size: int = 64,
                     device: str = "cpu", workers: int = 0, progress: str | None = None,
                     spec: LabelSpec | None = None, option: str = "--shards") -> SplitFeatures:
    """Frozen features of the usable labelled images of `shards` in tar order (whatever
    `workers`: a probe trained on them does not depend on it), read with `spec` (default:
    the detected format, bad labels stopping); `option` names the shards in errors.
    `progress`: the title of a bar on stderr, in shards (the known total; their image counts
    are not known before they are read), with the images so far."""
    from tqdm import tqdm

    model = frozen.model.to(device).eval()
    feature, k = resolve_feature(feature, model), int(getattr(model, "num_prefix_tokens", 1))
    urls = expand_urls(shards)
    spec = spec or resolve_labels(LabelOptions(), urls)
    loader = InterruptibleLoader(LabelledImages(urls, frozen.img_size, spec), batch_size=batch_size,
                                 num_workers=workers, collate_fn=collate_labelled,
                                 worker_init_fn=worker_ignores_interrupt)
    feats, labels, order, tally = [], [], [], Tally()
    with tqdm(total=len(urls), desc=progress, unit="shard", disable=progress is None, dynamic_ncols=True) as bar:
        for batch in loader:
            for skip in batch.skips:
                tally.skip(skip, spec.skip_bad)
            if len(batch.labels):
                tokens = model.forward_features(batch.pixels.to(device))  # [B, k+N, D], after the final norm
                feats.append((tokens[:, 0] if feature == "cls" else tokens[:, k:].mean(1)).float().cpu())
                labels.append(batch.labels)
                order.append(batch.order)
                tally.use(batch.labels.tolist())
            skipped = f", {tally.present - tally.used} skipped" if tally.present > tally.used else ""
            bar.set_postfix_str(f"{tally.used} images{skipped}", refresh=False)
            bar.update(batch.ends)
        bar.update(bar.total - bar.n)  # shards without a sample mark no end
    tally.check_any(f"{option} {shards if isinstance(shards, str) else '::'.join(shards)}")
    tar_order = torch.cat(order).argsort()  # DataLoader workers interleave their shards: put them back in order
    return SplitFeatures(torch.cat(feats)[tar_order], torch.cat(labels)[tar_order], tally)


def knn_scores(train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor, num_classes: int,
               k: int = 20, temperature: float = 0.07, chunk: int = 1024) -> torch.Tensor:
    """Weighted kNN votes. train [M, D], train_labels [M], test [Q, D] -> class scores [Q, C].

    Each test feature's k most cosine-similar training features add exp(sim / T) to their
    label's score (DINO's weighting: near neighbours count much more than far ones).
    """
    train, test = F.normalize(train.float(), dim=1), F.normalize(test.float(), dim=1)
    k = min(k, train.shape[0])
    out = []
    for start in range(0, test.shape[0], chunk):  # bounds the [chunk, M] similarity matrix
        sim, idx = (test[start:start + chunk] @ train.T).topk(k, dim=1)
        votes = torch.zeros(sim.shape[0], num_classes, dtype=sim.dtype)
        out.append(votes.scatter_add_(1, train_labels[idx], (sim / temperature).exp()))
    return torch.cat(out)


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> list[float]:
    """scores [Q, C], labels [Q] -> percent of rows whose label is among the k best scores, per k."""
    ranked = scores.argsort(dim=1, descending=True, stable=True)
    hit = ranked == labels[:, None]
    return [100.0 * int(hit[:, :k].any(1).sum()) / len(labels) for k in ks]


def train_linear_probe(train: torch.Tensor, train_labels: torch.Tensor, num_classes: int, epochs: int = 10,
                       lr: float = 0.1, batch_size: int = 256, seed: int = 0) -> torch.nn.Module:
    """Fit BatchNorm1d(D, affine=False) + Linear(D, C) to train [M, D] -> labels [M]; returns it in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    # momentum=None: BatchNorm keeps the exact running average over all batches, so its
    # eval statistics are right even after the few steps a small set gives.
    head = torch.nn.Sequential(torch.nn.BatchNorm1d(train.shape[1], affine=False, eps=1e-6, momentum=None),
                               torch.nn.Linear(train.shape[1], num_classes))
    torch.nn.init.trunc_normal_(head[1].weight, std=0.01, generator=gen)  # MAE's head init
    torch.nn.init.zeros_(head[1].bias)
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=0.0)
    steps_per_epoch = math.ceil(train.shape[0] / batch_size)
    total, step = max(1, epochs * steps_per_epoch), 0
    head.train()
    for _ in range(epochs):
        order = torch.randperm(train.shape[0], generator=gen)
        for start in range(0, train.shape[0], batch_size):
            idx = order[start:start + batch_size]
            if idx.numel() < 2:  # BatchNorm cannot train on one sample
                continue
            for g in opt.param_groups:
                g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
            loss = F.cross_entropy(head(train[idx]), train_labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    return head.eval()


@dataclass
class EvalResult:
    record: EvalRecord  # what was appended to the results file
    train: Tally
    val: Tally
    notes: list[str]  # also in the record: the classes of the splits, as `labels.class_notes` sees them

    def table(self) -> str:
        """The result as a table: a header, a row per ensemble member, the result's row."""
        r, s = self.record, self.record.settings
        cols = ["protocol", "feature", "setting", "train", "val", "classes", "top1", "top5", "checkpoint"]
        setting = f"k={s['k']} T={s['temperature']}" if "k" in s else f"epochs={s['epochs']} lr={s['lr']}"
        shared = [setting, str(r.counts["n_train"]), str(r.counts["n_val"]), str(r.num_classes)]

        def row(protocol: str, feature: str, fused: bool, top1: float, top5: float, checkpoint: str) -> list[str]:
            return [protocol, feature + (" (fused)" if fused else ""), *shared, f"{top1:.2f}", f"{top5:.2f}",
                    checkpoint]

        rows = [row(r.protocol.removesuffix("-ensemble"), m.feature, m.fused, m.top1, m.top5, m.checkpoint)
                for m in r.members]
        checkpoint = " + ".join(r.checkpoint) if isinstance(r.checkpoint, list) else r.checkpoint
        rows.append(row(r.protocol, r.feature_name, r.fused, r.top1, r.top5, checkpoint))
        widths = [max(len(x) for x in column) for column in zip(cols, *rows)]
        return "\n".join("  ".join(x.ljust(w) for x, w in zip(line, widths)).rstrip() for line in (cols, *rows))

    def summary(self) -> list[str]:
        """A line per split: images used of those present (skips by reason), classes."""
        return [self.train.summary("train"), self.val.summary("val")]


def class_probabilities(protocol: str, xtr: torch.Tensor, ytr: torch.Tensor, xva: torch.Tensor, num_classes: int,
                        k: int = 20, temperature: float = 0.07, epochs: int = 10, lr: float = 0.1,
                        probe_batch_size: int = 256, seed: int = 0) -> torch.Tensor:
    """One protocol's prediction for val features xva [Q, D]: class probabilities [Q, C].

    kNN: each row's votes divided by their sum; linear probe: softmax of the logits. On
    this common scale models trained apart can be averaged (`run_ensemble`).
    """
    if protocol == "knn":
        votes = knn_scores(xtr, ytr, xva, num_classes, k, temperature)
        return votes / votes.sum(1, keepdim=True).clamp_min(1e-30)
    if protocol == "linear-probe":
        head = train_linear_probe(xtr, ytr, num_classes, epochs, lr, probe_batch_size, seed)
        with torch.no_grad():
            return head(xva).softmax(1)
    raise ValueError(f"unknown protocol {protocol!r}")


def _settings(protocol: str, k: int, temperature: float, epochs: int, lr: float, probe_batch_size: int,
              seed: int) -> dict:
    if protocol == "knn":
        return dict(k=k, temperature=temperature)
    return dict(epochs=epochs, lr=lr, batch_size=probe_batch_size, seed=seed)


def _split_features(model: Frozen, train_shards: str, val_shards: str, feature: str, batch_size: int,
                    device: str, workers: int, progress: str | None, spec: LabelSpec
                    ) -> tuple[SplitFeatures, SplitFeatures]:
    """Features, labels and counts of both splits; `progress`: a bar per split, titled `progress` + the split."""
    def title(split: str) -> str | None:
        return None if progress is None else f"{progress}{split}"

    train = extract_features(model, train_shards, feature, batch_size, device, workers, title("train"), spec)
    if expand_urls(val_shards) == expand_urls(train_shards):  # e.g. a sanity check on the training set
        return train, train
    return train, extract_features(model, val_shards, feature, batch_size, device, workers, title("val"), spec,
                                   "--val-shards")


def class_count(spec: LabelSpec, train: SplitFeatures, val: SplitFeatures) -> int:
    """The classes scored: --num-classes or the class map's, else the largest label + 1 (a
    label that would make more than MAX_INFERRED_CLASSES is refused: give --num-classes)."""
    if spec.num_classes is not None:
        return spec.num_classes
    largest = int(max(train.labels.max(), val.labels.max()))
    if largest >= MAX_INFERRED_CLASSES:
        raise LabelError(f"label {largest}: more than {MAX_INFERRED_CLASSES:,} classes without --num-classes; give "
                         "--num-classes N (labels at or above it are then bad labels) or a --class-map")
    return largest + 1


def run_eval(protocol: str, model: Frozen, train_shards: str, val_shards: str, results: str | Path,
             feature: str = "auto", batch_size: int = 64, device: str = "cpu", workers: int = 0, k: int = 20,
             temperature: float = 0.07, epochs: int = 10, lr: float = 0.1, probe_batch_size: int = 256,
             seed: int = 0, progress: bool = False, labels: LabelOptions = LabelOptions()) -> EvalResult:
    """Extract features of both splits, run `protocol` ('knn' | 'linear-probe'), append the result."""
    return run_ensemble(protocol, [model], train_shards, val_shards, results, feature, batch_size,
                        device, workers, k, temperature, epochs, lr, probe_batch_size, seed, progress, labels)


def run_ensemble(protocol: str, members: list[Frozen], train_shards: str, val_shards: str,
                 results: str | Path, feature: str = "auto", batch_size: int = 64, device: str = "cpu",
                 workers: int = 0, k: int = 20, temperature: float = 0.07, epochs: int = 10, lr: float = 0.1,
                 probe_batch_size: int = 256, seed: int = 0, progress: bool = False,
                 labels: LabelOptions = LabelOptions()) -> EvalResult:
    """`protocol` on each member's frozen features, then the mean of their class
    probabilities (the paper's "Sep." row: models pretrained apart, e.g. on CLIP and on
    DINO targets, combined at prediction time). One member: a plain evaluation. Labels are
    read as `labels` asks (`labels.py`); `progress`: bars on stderr for the encoder's passes."""
    t0 = time.time()
    spec = resolve_labels(labels, expand_urls(train_shards))
    features = [resolve_feature(feature, m.model) for m in members]
    probs, each, splits, num_classes = [], [], None, 0
    for i, (frozen, feature) in enumerate(zip(members, features)):
        title = None if not progress else "eval " + (f"member {i + 1}/{len(members)} " if len(members) > 1 else "")
        train, val = _split_features(frozen, train_shards, val_shards, feature, batch_size, device, workers, title,
                                     spec)
        if splits is None:
            splits, num_classes = (train, val), class_count(spec, train, val)
        elif not torch.equal(splits[1].labels, val.labels):
            raise EvalError(f"{frozen.weights}: read other validation labels than the first member")
        p = class_probabilities(protocol, train.features, train.labels, val.features, num_classes, k, temperature,
                                epochs, lr, probe_batch_size, seed)
        probs.append(p)
        top1, top5 = topk_accuracy(p, val.labels)
        each.append(MemberResult(str(frozen.weights), feature, isinstance(frozen.model, FusedFeatures), top1, top5))
    train, val = splits
    notes = class_notes(train.tally, val.tally, spec)
    top1, top5 = topk_accuracy(torch.stack(probs).mean(0), val.labels)
    record = EvalRecord(protocol if len(members) == 1 else f"{protocol}-ensemble",
                        features[0] if len(set(features)) == 1 else features, top1, top5,
                        fused=any(m.fused for m in each),
                        checkpoint=each[0].checkpoint if len(members) == 1 else [m.checkpoint for m in each],
                        train_shards=train_shards, val_shards=val_shards, counts=_counts(train.tally, val.tally),
                        num_classes=num_classes, labels=spec.record(), notes=tuple(notes),
                        settings=_settings(protocol, k, temperature, epochs, lr, probe_batch_size, seed),
                        members=tuple(each) if len(members) > 1 else (), seconds=round(time.time() - t0, 2))
    append_eval(results, record)
    return EvalResult(record, train.tally, val.tally, notes)


def _counts(train: Tally, val: Tally) -> dict:
    """The record's denominators: images evaluated (n_*), present in the tars, classes seen,
    and the samples skipped per reason with their first keys."""
    out = {"n_train": train.used, "n_val": val.used, "n_train_present": train.present,
           "n_val_present": val.present, "classes_train": len(train.classes), "classes_val": len(val.classes)}
    out["skipped"] = {split: t.record()["skipped"] for split, t in (("train", train), ("val", val))}
    out["skipped_examples"] = {split: t.record()["examples"] for split, t in (("train", train), ("val", val))}
    return out

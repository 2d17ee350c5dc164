"""`mrmae finetune`: end-to-end classification fine-tuning of a pretrained encoder.

The encoder is the one `mrmae export` writes (same names, same weights), loaded into its
timm model (`train/students/`: timm's VisionTransformer for a ViT student, the ConvViT
for a ConvViT one) with a new head. The recipe is the MR-MAE paper's (section 4.1:
100 epochs, 5 warm-up, AdamW, weight decay 0.05, lr 3e-4, layer decay 0.6, drop path 0.2)
on MAE's fine-tuning protocol for what the paper leaves unsaid: AdamW (0.9, 0.999), no
decay on norms, biases, pos/cls tokens, lr = blr x effective batch / 256 (the paper's
"lr 1.5e-4" for pretraining is MAE's blr, so its 3e-4 is read as a blr too), linear
warm-up then cosine per step, Mixup 0.8 / CutMix 1.0 with label smoothing 0.1,
RandAugment and random erasing. MAE's own ViT-B values: --blr 5e-4 --layer-decay 0.65
--drop-path 0.1.

Pooling: `global_pool='avg'` by default, as in MAE's fine-tuning: the mean patch token
through a new `fc_norm` LayerNorm. MR-MAE's losses (pixel reconstruction, feature
mimicking) act on patch tokens; the [CLS] token is reached only through the decoder's
attention, so the patch mean is the feature pretraining shaped most directly. timm then drops the final `norm` (its tensors are the only
ones not loaded); `--global-pool token` keeps it and pools the [CLS] token.

Determinism: the sample order and each sample's augmentation come from (seed, epoch, key)
(`finetune_data.py`); Mixup/CutMix (numpy's global RNG) and drop path (torch's) are
reseeded before every micro-step from (seed, micro-step, rank). A resumed run thus replays
the uninterrupted run's batches, mixes and drop-path masks.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm import tqdm

from mrmae.shared.errors import MrmaeError, worker_ignores_interrupt
from mrmae.train.run import checkpoint as ckpt
from mrmae.train.run.loader import InterruptibleLoader, epoch_passes, grouped
from mrmae.train.run.loop import TrainRun
from mrmae.train.run.micro_batch import MicroBatch
from mrmae.shared.seeding import seed_from
from mrmae.train.downstream.finetune_data import LabelledStream, seed_everything, train_transform
from mrmae.train.downstream.labels import LabelOptions, LabelSpec, Tally, census, class_notes, resolve_labels
from mrmae.train.downstream.config import FinetuneConfig
from mrmae.train.run.records import ValImages, ValidationRecord, read_metrics

if TYPE_CHECKING:
    from mrmae.train.downstream.export import Encoder

POOLS = ("avg", "token")


class FinetuneError(MrmaeError, ValueError):
    """A fine-tuning run that cannot start or go on as asked (bad encoder file, labels, batch)."""


def build_classifier(checkpoint: str | Path, num_classes: int, drop_path: float = 0.1, global_pool: str = "avg",
                     seed: int = 0, fmt: str = "auto") -> tuple[torch.nn.Module, "Encoder"]:
    """The pretrained encoder (`export.read_encoder`: an export, a student or fine-tuning
    checkpoint, MAE's or ConvMAE's `.pth`; `fmt`: --checkpoint-format) as a timm classifier
    with a new head -> (model, encoder). A fine-tuned encoder's own head is left out (its
    fc_norm kept).

    ViT: timm's VisionTransformer; ConvViT: `students.convvit.ConvViT` (no [CLS] token: 'avg' only).
    With 'avg' pooling a new `fc_norm` follows the pooling and the final `norm` goes, as in
    MAE's and ConvMAE's fine-tuning. Loaded non-strictly, but only the new head and fc_norm
    may be missing and only that final norm left over: any other mismatch is an error
    naming the keys (a half-loaded encoder would fine-tune silently).
    """
    from mrmae.train.downstream.export import read_encoder

    if global_pool not in POOLS:
        raise FinetuneError(f"global pool must be one of {POOLS}, got {global_pool!r}")
    from mrmae.train.students.registry import family_of

    encoder = read_encoder(checkpoint, fmt)
    tensors = {k: v for k, v in encoder.tensors.items() if not k.startswith("head.")}
    try:  # the family's rule: a pool its encoder has, and the norm after 'avg' pooling
        pool = family_of(encoder.timm_model).classifier_kwargs(global_pool)
    except ValueError as e:
        raise FinetuneError(f"{checkpoint}: {e}") from None
    torch.manual_seed(seed)  # the new head's init
    try:
        model = encoder.create(num_classes=num_classes, global_pool=global_pool, drop_path_rate=drop_path, **pool)
        missing, unexpected = model.load_state_dict(tensors, strict=False)
    except (RuntimeError, TypeError, ValueError, KeyError) as e:  # shapes of another model, or bad kwargs
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise FinetuneError(f"{checkpoint}: encoder does not fit timm {encoder.timm_model}: {first}") from None
    new = {"head.weight", "head.bias"} | ({"fc_norm.weight", "fc_norm.bias"} if global_pool == "avg" else set())
    unused = {"norm.weight", "norm.bias"} if global_pool == "avg" else set()
    bad_missing, bad_unexpected = sorted(set(missing) - new), sorted(set(unexpected) - unused)
    if bad_missing or bad_unexpected:
        raise FinetuneError(f"{checkpoint}: encoder does not fit timm {encoder.timm_model}: missing "
                            f"{bad_missing[:5]}, unexpected {bad_unexpected[:5]}")
    with torch.no_grad():  # MAE's head init: near-zero logits, so early gradients barely stir the encoder
        torch.nn.init.trunc_normal_(model.head.weight, std=2e-5)
        torch.nn.init.zeros_(model.head.bias)
    return model, encoder


@torch.no_grad()
def evaluate(model: torch.nn.Module, shards: str, img_size: int, spec: LabelSpec, accelerator,
             batch_size: int = 64, workers: int = 0) -> tuple[dict, Tally]:
    """Top-1/top-5 (%) and cross-entropy on `shards` with MAE's eval transform, and the
    count of its samples (`labels.Tally`); each rank takes every world-th shard and the
    counts are summed over ranks. -> (the epoch record's fields, the tally)."""
    from mrmae.shared.shards import expand_urls
    from mrmae.train.downstream.evaluate import LabelledImages, collate_labelled

    rank, world = accelerator.process_index, accelerator.num_processes
    urls = expand_urls(shards)
    data = LabelledImages(urls[rank::world], img_size, spec, list(range(len(urls)))[rank::world])
    loader = InterruptibleLoader(data, batch_size=batch_size, num_workers=workers, collate_fn=collate_labelled,
                                 worker_init_fn=worker_ignores_interrupt)
    model.eval()
    totals, tally = torch.zeros(3, dtype=torch.float64, device=accelerator.device), Tally()  # top1, top5, loss sum
    for batch in loader:
        for skip in batch.skips:
            tally.skip(skip, spec.skip_bad)
        if not len(batch.labels):
            continue
        x, y = batch.pixels.to(accelerator.device), batch.labels.to(accelerator.device)
        with accelerator.autocast():
            logits = model(x).float()
        hits = logits.topk(min(5, logits.shape[1]), dim=1).indices == y[:, None]
        totals += torch.stack([hits[:, 0].sum().double(), hits.any(1).sum().double(),
                               torch.nn.functional.cross_entropy(logits, y, reduction="sum").double()])
        tally.use(batch.labels.tolist())
    totals, tally = accelerator.reduce(totals, "sum"), gather_tally(tally, accelerator)
    tally.check_any(f"--val-shards {shards}")
    n = tally.used
    return {"top1": 100.0 * float(totals[0]) / n, "top5": 100.0 * float(totals[1]) / n,
            "val_loss": float(totals[2]) / n, "n_val": n, "n_val_present": tally.present,
            "classes_val": len(tally.classes), "val_skipped": tally.record()["skipped"]}, tally


def gather_tally(tally: Tally, accelerator) -> Tally:
    """The tallies of all processes merged, on every process (as JSON bytes in tensors: the
    collective runs on gloo or NCCL alike, and nothing is unpickled)."""
    if accelerator.num_processes == 1:
        return tally
    device = accelerator.device
    blob = json.dumps(tally.to_wire()).encode()
    sizes = accelerator.gather(torch.tensor([len(blob)], dtype=torch.int64, device=device)).tolist()
    padded = torch.zeros(max(sizes), dtype=torch.uint8, device=device)
    padded[:len(blob)] = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
    rows = accelerator.gather(padded).view(len(sizes), -1).cpu()
    merged = Tally()
    for row, size in zip(rows, sizes):
        merged.merge(Tally.from_wire(json.loads(bytes(row[:size].tolist()))))
    return merged


@dataclass
class Census:
    """Both splits' labels, counted before the first step (`take_census`)."""

    spec: LabelSpec
    train: Tally
    val: Tally
    notes: list[str]

    def record(self) -> dict:
        """config.json's account of the labels and samples."""
        return {"labels": self.spec.record(), "samples": {"train": self.train.record(), "val": self.val.record()},
                "notes": self.notes}


def take_census(cfg: FinetuneConfig, accelerator) -> Census:
    """Every label of --shards and --val-shards read (not the images) before training, each
    rank a world-th of the shards, the counts gathered: a bad label stops the run here in one
    line (or, with --skip-bad-labels, is counted), not an epoch in; the usable training
    samples set the epoch's length."""
    from mrmae.shared.shards import expand_urls

    train_urls, val_urls = expand_urls(cfg.train_shards), expand_urls(cfg.val_shards)
    spec = resolve_labels(LabelOptions(cfg.label_format, cfg.label_field, cfg.class_map, cfg.skip_bad_labels,
                                       cfg.num_classes), train_urls)
    rank, world = accelerator.process_index, accelerator.num_processes
    tallies = []
    for urls, option in ((train_urls, f"--shards {cfg.train_shards}"), (val_urls, f"--val-shards {cfg.val_shards}")):
        tally = gather_tally(census(urls[rank::world], spec, range(rank, len(urls), world)), accelerator)
        tally.check_any(option)
        tallies.append(tally)
    return Census(spec, *tallies, class_notes(*tallies, spec))


def results_table(metrics: Path) -> str:
    """One row per evaluated epoch of `metrics` (a metrics.jsonl): loss, val loss, top-1, top-5
    and the images they are over ('6 of 8' when some of those present were skipped)."""
    rows = [["epoch", "step", "train_loss", "val_loss", "top1", "top5", "val_images"]]
    for r in read_metrics(metrics):
        if r.top1 is not None:
            images = ValImages(r.images.n, r.images.present)  # (the classes are in the summary lines)
            rows.append([str(r.epoch), str(r.step), f"{r.train_loss:.4f}", f"{r.val_loss:.4f}", f"{r.top1:.2f}",
                         f"{r.top5:.2f}", str(images)])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(x.ljust(w) for x, w in zip(row, widths)).rstrip() for row in rows)


def _epoch_loss(metrics: Path, epoch: int) -> float:
    """Mean training loss of `epoch` from metrics.jsonl (so a resumed epoch counts its first part)."""
    losses = [r.losses["loss"] for r in read_metrics(metrics) if "loss" in r.losses and r.epoch == epoch]
    return sum(losses) / max(1, len(losses))


def run_fingerprint(cfg: FinetuneConfig, timm_name: str, timm_kwargs: dict,
                    labels: LabelSpec | None = None) -> ckpt.Fingerprint:
    """What this fine-tuning starts from, what shapes its weights and what it trains on,
    recorded in each checkpoint and compared by --resume (shards by file name; `labels`: how
    they were read, which decides the samples trained on and the epoch's length)."""
    from mrmae.shared.shards import expand_urls
    from mrmae.train.restore import resolve_weights

    path = Path(cfg.checkpoint)
    weights = path if path.is_file() else resolve_weights(path)[0]
    # drop path shapes no tensor; nor does the conv-stage eps, which the encoder's source fixes (and runs
    # fine-tuned before it was recorded resume with)
    shape = {k: v for k, v in timm_kwargs.items() if k not in ("drop_path_rate", "conv_norm_eps")}
    names = [n.rstrip("/").split("/")[-1] for n in expand_urls(cfg.train_shards)]
    return ckpt.Fingerprint((
        ckpt.fingerprint_field("task", "finetune", "finetune"),
        ckpt.fingerprint_field("encoder", cfg.checkpoint, _file_sha256(weights)),
        ckpt.fingerprint_field("model", f"{timm_name} ({cfg.num_classes} classes, {cfg.global_pool} pool)",
                               [timm_name, shape]),
        ckpt.fingerprint_field("data", f"{len(names)} shards {names[0] if names else ''}..{names[-1] if names else ''}"
                               f", seed {cfg.seed}", {"shards": names, "seed": cfg.seed}),
        *([] if labels is None else [_labels_field(labels)]),
    ))


def _labels_field(spec: LabelSpec) -> ckpt.FingerprintField:
    """The label reader as a fingerprint field: format, field, class map (by content), skipping."""
    shown = spec.format + (f" field {spec.field}" if spec.format == "json" else "") + \
        (f" names by {spec.class_map.path}" if spec.class_map else "") + (", bad labels skipped" if spec.skip_bad else "")
    return ckpt.fingerprint_field("labels", shown, {"format": spec.format, "field": spec.field, "skip": spec.skip_bad,
                                                    "class_map": spec.class_map and spec.class_map.sha256})


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def check_numbers(cfg: FinetuneConfig) -> None:
    """The options of a fine-tuning run, before anything is built or written: every bad one
    at once (OptionErrors, a line each; NaN passes click's ranges)."""
    from mrmae.shared.errors import OptionChecks
    from mrmae.train.downstream.finetune_data import train_transform
    from mrmae.train.run.options import check_run_options, check_shard_list
    from mrmae.train.run.run_dir import check_out

    checks = OptionChecks()
    source = Path(cfg.checkpoint).resolve()
    if source == Path(cfg.out).resolve() or Path(cfg.out).resolve() in source.parents:
        checks.fail(f"--out {cfg.out}: holds the --checkpoint {cfg.checkpoint} (its config.json, metrics and "
                    "checkpoints would be replaced); give the fine-tuning its own --out")
    else:
        checks.run(check_out, cfg.out, cfg.resume or bool(cfg.resume_from), cfg.overwrite)
    check_run_options(cfg, checks)  # the declared types and ranges (NaN too), the warm-up
    for option, value in (("drop-path", cfg.drop_path), ("smoothing", cfg.smoothing)):
        if value == 1.0:  # (above 1, or NaN: the range check said so)
            checks.fail(f"--{option} must be below 1")
    if (cfg.mixup > 0 or cfg.cutmix > 0) and cfg.batch_size % 2:
        checks.fail(f"--batch-size {cfg.batch_size} is odd: Mixup/CutMix pair the rows of a batch "
                    "(use an even size, or --mixup 0 --cutmix 0)")
    checks.run(check_shard_list, cfg.train_shards)
    checks.run(check_shard_list, cfg.val_shards, "--val-shards")
    if cfg.augment == "randaug":
        try:
            train_transform(224, cfg.augment, cfg.rand_augment, cfg.re_prob)
        except (AssertionError, ValueError, KeyError, IndexError) as e:
            checks.fail(f"--rand-augment {cfg.rand_augment}: not a timm RandAugment policy ({e})")
    checks.done()


def run_finetune(cfg: FinetuneConfig) -> dict:
    """Fine-tune; returns {checkpoint, metrics, steps, table, summary, main_process} (`summary`:
    a line per split, the images used of those present). Resumes with `resume`."""
    from mrmae.train.downstream.layer_decay import param_groups_layer_decay

    check_numbers(cfg)
    run = TrainRun(cfg, "finetune")
    cfg, cuda = run.cfg, run.cuda
    model, encoder = build_classifier(cfg.checkpoint, cfg.num_classes, cfg.drop_path, cfg.global_pool, cfg.seed,
                                      cfg.checkpoint_format)
    if encoder.note and run.is_main:
        tqdm.write(f"mrmae: note: {encoder.note}", file=sys.stderr)
    counted = take_census(cfg, run.accelerator)  # after the model: its refusals are quick, a census may not be
    timm_name, timm_kwargs = encoder.timm_model, {**encoder.timm_kwargs, "num_classes": cfg.num_classes,
                                                  "global_pool": cfg.global_pool}
    img_size = int(timm_kwargs.get("img_size", 224))
    stream = LabelledStream(cfg.train_shards, cfg.batch_size, train_transform(img_size, cfg.augment, cfg.rand_augment,
                            cfg.re_prob), counted.spec, cfg.seed, cfg.shuffle_buffer)
    # Not accelerator.prepare(loader): the stream splits shards by node and worker itself.
    loader = InterruptibleLoader(stream, batch_size=None, num_workers=cfg.workers, pin_memory=cuda,
                                 worker_init_fn=worker_ignores_interrupt)
    samples = cfg.samples_per_epoch or counted.train.used
    run.plan(samples, "samples_per_epoch" if cfg.samples_per_epoch else "usable labelled samples in --shards")
    groups = param_groups_layer_decay(model, cfg.weight_decay, cfg.layer_decay, cfg.layer_decay_groups)
    optimizer = torch.optim.AdamW(groups, lr=run.peak_lr, betas=(0.9, 0.999), fused=cuda or None)
    model, _ = run.start(model, optimizer, run_fingerprint(cfg, timm_name, timm_kwargs, counted.spec))
    run.write_config({"task": "finetune", **asdict(cfg), "timm_model": timm_name, "timm_kwargs": timm_kwargs,
                      **counted.record()})
    for note in counted.notes if run.is_main else ():  # once the run is set up: not beside a refusal
        tqdm.write(f"mrmae: note: {note}", file=sys.stderr)
    val = [counted.val]  # the last evaluation's count (the census's until one ran)

    def steps_of(epoch: int):
        usable = counted.train
        empty = FinetuneError(f"no full batch of usable labelled images in this process's shards ({stream.urls[:3]}"
                              f"...; --shards holds {usable.used} of {usable.present} in all): fewer shards than "
                              "processes x workers, or --batch-size above a shard's usable images?")
        return grouped(epoch_passes(stream, loader, epoch, empty), run.cfg.accum_steps)

    def end_of_epoch(epoch: int) -> None:
        result, val[0] = evaluate(run.accelerator.unwrap_model(model), cfg.val_shards, img_size, counted.spec,
                                  run.accelerator, cfg.eval_batch_size, cfg.workers)
        if run.is_main:  # the epoch's mean from the file: a resumed epoch counts its first part too
            record = ValidationRecord(epoch, run.state.step, _epoch_loss(run.metrics, epoch), **result)
            run.log(record)
            run.log_scalars(record, "val")

    what = (f"{timm_name} with a {cfg.num_classes}-class head ({cfg.global_pool} pool) from {cfg.checkpoint}, "
            f"layer decay {cfg.layer_decay:g}")
    result = run.train(steps_of, ClassifierStep(model, run.accelerator, cfg), end_of_epoch, what=what)
    result["table"] = results_table(run.metrics) if run.is_main else ""
    result["summary"] = [counted.train.summary("train"), val[0].summary("val")]
    return result


class ClassifierStep:
    """Fine-tuning's step of one micro-batch (x [B, 3, S, S] float, y [B] labels) ->
    {"loss"}: Mixup/CutMix, then the criterion (soft-target cross-entropy with mixing,
    else label smoothing or plain cross-entropy). Mixup's draws (numpy's global RNG) and
    drop path (torch's) are reseeded from (seed, micro-step, rank) first, so a resumed run
    mixes and drops as the uninterrupted one did."""

    def __init__(self, model: torch.nn.Module, accelerator, cfg: FinetuneConfig):
        from timm.data import Mixup
        from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

        mixing = cfg.mixup > 0 or cfg.cutmix > 0
        self.model, self.accelerator, self.cfg = model, accelerator, cfg
        self.mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob,
                           switch_prob=cfg.mixup_switch_prob, label_smoothing=cfg.smoothing,
                           num_classes=cfg.num_classes) if mixing else None
        self.criterion = (SoftTargetCrossEntropy() if mixing else LabelSmoothingCrossEntropy(cfg.smoothing)
                          if cfg.smoothing > 0 else torch.nn.CrossEntropyLoss())

    def __call__(self, batch: tuple[torch.Tensor, torch.Tensor], where: MicroBatch) -> dict[str, torch.Tensor]:
        x, y = batch  # labels checked by the reader (labels.py): 0 <= y < num_classes
        device = self.accelerator.device
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        seed_everything(seed_from("finetune-step", self.cfg.seed, where.micro, where.rank))
        if self.mixup is not None:
            x, y = self.mixup(x, y)
        with self.accelerator.autocast():
            return {"loss": self.criterion(self.model(x), y)}

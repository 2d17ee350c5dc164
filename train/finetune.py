"""`mrmae finetune`: end-to-end classification fine-tuning of a pretrained encoder.

The encoder is the one `mrmae export` writes (same names, same weights), loaded into its
timm model (`train/backbones.py`: timm's VisionTransformer for a ViT student, the ConvViT
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
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm import tqdm

from mrmae.shared.errors import MrmaeError, worker_ignores_interrupt
from mrmae.train import checkpoint as ckpt
from mrmae.train.checkpoint import CheckpointError
from mrmae.train.engine import InterruptibleLoader
from mrmae.train.loop import MicroBatch, TrainRun, epoch_passes
from mrmae.shared.seeding import seed_from
from mrmae.train.finetune_data import LabelledStream, seed_everything, train_transform
from mrmae.train.recipe import RecipeFile

if TYPE_CHECKING:
    from mrmae.train.export import Encoder

POOLS = ("avg", "token")


class FinetuneError(MrmaeError, ValueError):
    """A fine-tuning run that cannot start or go on as asked (bad encoder file, labels, batch)."""


@dataclass
class FinetuneConfig:
    checkpoint: str  # a pretrain run/checkpoint (see restore.resolve_weights) or an `mrmae export` file
    train_shards: str
    val_shards: str
    out: str
    num_classes: int = 1000
    epochs: int = 100
    batch_size: int = 64  # per process, per micro-batch
    accum_steps: int | None = None  # None: 1, or what effective_batch asks (pretrain.resolve_accum_steps)
    effective_batch: int | None = None  # images per optimiser step, whatever the process count
    blr: float = 3e-4  # the paper's section 4.1
    lr: float | None = None  # absolute; default blr x effective batch / 256
    min_lr: float = 1e-6
    warmup_epochs: float = 5.0
    weight_decay: float = 0.05
    layer_decay: float = 0.6
    drop_path: float = 0.2
    global_pool: str = "avg"
    mixup: float = 0.8
    cutmix: float = 1.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    smoothing: float = 0.1
    augment: str = "randaug"  # "randaug" | "light"
    rand_augment: str = "rand-m9-mstd0.5-inc1"
    re_prob: float = 0.25
    eval_batch_size: int = 64
    workers: int = 0
    shuffle_buffer: int = 1000
    seed: int = 0
    resume: bool = False
    resume_from: str | None = None  # "auto" (the newest complete checkpoint) or a checkpoint's path
    save_every_steps: int = 0  # 0: at the end of each epoch only
    samples_per_epoch: int | None = None  # default: counted from the tar headers
    progress: bool = True
    device: str = "auto"  # "auto": accelerate's choice (a GPU per process where there are GPUs); "cpu": CPU anyway
    config_file: RecipeFile | None = None  # the --config file the options came from (recorded in config.json)


def build_classifier(checkpoint: str | Path, num_classes: int, drop_path: float = 0.1, global_pool: str = "avg",
                     seed: int = 0) -> tuple[torch.nn.Module, "Encoder"]:
    """The pretrained encoder (`export.read_encoder`: an export file or any student checkpoint)
    as a timm classifier with a new head -> (model, encoder).

    ViT: timm's VisionTransformer; ConvViT: `backbones.ConvViT` (no [CLS] token: 'avg' only).
    With 'avg' pooling a new `fc_norm` follows the pooling and the final `norm` goes, as in
    MAE's and ConvMAE's fine-tuning. Loaded non-strictly, but only the new head and fc_norm
    may be missing and only that final norm left over: any other mismatch is an error
    naming the keys (a half-loaded encoder would fine-tune silently).
    """
    from mrmae.train.export import read_encoder

    if global_pool not in POOLS:
        raise FinetuneError(f"global pool must be one of {POOLS}, got {global_pool!r}")
    from mrmae.train.students import family_of

    encoder = read_encoder(checkpoint)
    try:  # the family's rule: a pool its encoder has, and the norm after 'avg' pooling
        pool = family_of(encoder.timm_model).classifier_kwargs(global_pool)
    except ValueError as e:
        raise FinetuneError(f"{checkpoint}: {e}") from None
    torch.manual_seed(seed)  # the new head's init
    try:
        model = encoder.create(num_classes=num_classes, global_pool=global_pool, drop_path_rate=drop_path, **pool)
        missing, unexpected = model.load_state_dict(encoder.tensors, strict=False)
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
def evaluate(model: torch.nn.Module, shards: str, img_size: int, num_classes: int, accelerator,
             batch_size: int = 64, workers: int = 0) -> dict:
    """Top-1/top-5 (%) and cross-entropy on `shards` with MAE's eval transform; each rank
    takes every world-th shard and the counts are summed over ranks."""
    from mrmae.shared.shards import expand_urls
    from mrmae.train.evaluate import LabelledImages

    rank, world = accelerator.process_index, accelerator.num_processes
    data = LabelledImages(expand_urls(shards)[rank::world], img_size)
    loader = InterruptibleLoader(data, batch_size=batch_size, num_workers=workers,
                                         worker_init_fn=worker_ignores_interrupt)
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=accelerator.device)  # top1, top5, loss sum, n
    for x, y in loader:
        x, y = x.to(accelerator.device), y.long().to(accelerator.device)
        if int(y.max()) >= num_classes:
            raise FinetuneError(f"{shards}: label {int(y.max())} >= --num-classes {num_classes}")
        with accelerator.autocast():
            logits = model(x).float()
        hits = logits.topk(min(5, num_classes), dim=1).indices == y[:, None]
        totals += torch.stack([hits[:, 0].sum().double(), hits.any(1).sum().double(),
                               torch.nn.functional.cross_entropy(logits, y, reduction="sum").double(),
                               torch.tensor(len(y), dtype=torch.float64, device=y.device)])
    totals = accelerator.reduce(totals, "sum")
    n = float(totals[3])
    if n == 0:
        raise FinetuneError(f"no labelled images (image + .cls) in --val-shards {shards}")
    return {"top1": 100.0 * float(totals[0]) / n, "top5": 100.0 * float(totals[1]) / n,
            "val_loss": float(totals[2]) / n, "n_val": int(totals[3])}


def results_table(metrics: Path) -> str:
    """One row per evaluated epoch of `metrics` (a metrics.jsonl): loss, val loss, top-1, top-5."""
    records = [json.loads(ln) for ln in metrics.read_text().splitlines() if ln]
    rows = [["epoch", "step", "train_loss", "val_loss", "top1", "top5"]]
    for r in records:
        if "top1" in r:
            rows.append([str(r["epoch"]), str(r["step"]), f"{r['train_loss']:.4f}", f"{r['val_loss']:.4f}",
                         f"{r['top1']:.2f}", f"{r['top5']:.2f}"])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(x.ljust(w) for x, w in zip(row, widths)).rstrip() for row in rows)


def _epoch_loss(metrics: Path, epoch: int) -> float:
    """Mean training loss of `epoch` from metrics.jsonl (so a resumed epoch counts its first part)."""
    records = map(json.loads, metrics.read_text().splitlines())
    losses = [r["loss"] for r in records if "loss" in r and r["epoch"] == epoch]
    return sum(losses) / max(1, len(losses))


def run_fingerprint(cfg: FinetuneConfig, timm_name: str, timm_kwargs: dict) -> ckpt.Fingerprint:
    """What this fine-tuning starts from, what shapes its weights and what it trains on,
    recorded in each checkpoint and compared by --resume (shards by file name)."""
    from mrmae.shared.shards import expand_urls
    from mrmae.train.restore import resolve_weights

    path = Path(cfg.checkpoint)
    weights = path if path.is_file() else resolve_weights(path)[0]
    shape = {k: v for k, v in timm_kwargs.items() if k != "drop_path_rate"}  # drop path shapes no tensor
    names = [n.rstrip("/").split("/")[-1] for n in expand_urls(cfg.train_shards)]
    return ckpt.Fingerprint((
        ckpt.fingerprint_field("task", "finetune", "finetune"),
        ckpt.fingerprint_field("encoder", cfg.checkpoint, _file_sha256(weights)),
        ckpt.fingerprint_field("model", f"{timm_name} ({cfg.num_classes} classes, {cfg.global_pool} pool)",
                               [timm_name, shape]),
        ckpt.fingerprint_field("data", f"{len(names)} shards {names[0] if names else ''}..{names[-1] if names else ''}"
                               f", seed {cfg.seed}", {"shards": names, "seed": cfg.seed}),
    ))


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def check_numbers(cfg: FinetuneConfig) -> None:
    """The float options of a fine-tuning run and its RandAugment policy, before anything is
    built or written (OptionError naming the first bad one: NaN passes click's ranges)."""
    from mrmae.shared.errors import OptionError
    from mrmae.train.finetune_data import train_transform
    from mrmae.train.pretrain import check_warmup, number_option

    source = Path(cfg.checkpoint).resolve()
    if source == Path(cfg.out).resolve() or Path(cfg.out).resolve() in source.parents:
        raise OptionError(f"--out {cfg.out}: holds the --checkpoint {cfg.checkpoint} (its config.json, metrics and "
                          "checkpoints would be replaced); give the fine-tuning its own --out")
    for option, value, low, high, low_open in (
            ("lr", cfg.lr, 0.0, math.inf, True), ("blr", cfg.blr, 0.0, math.inf, True),
            ("min-lr", cfg.min_lr, 0.0, math.inf, False), ("warmup-epochs", cfg.warmup_epochs, 0.0, math.inf, False),
            ("weight-decay", cfg.weight_decay, 0.0, math.inf, False), ("layer-decay", cfg.layer_decay, 0.0, 1.0, True),
            ("drop-path", cfg.drop_path, 0.0, 1.0, False), ("mixup", cfg.mixup, 0.0, math.inf, False),
            ("cutmix", cfg.cutmix, 0.0, math.inf, False), ("mixup-prob", cfg.mixup_prob, 0.0, 1.0, False),
            ("mixup-switch-prob", cfg.mixup_switch_prob, 0.0, 1.0, False), ("smoothing", cfg.smoothing, 0.0, 1.0, False),
            ("re-prob", cfg.re_prob, 0.0, 1.0, False)):
        number_option(option, value, low, high, low_open=low_open)
    check_warmup(cfg.warmup_epochs, cfg.epochs)
    if cfg.drop_path >= 1.0 or cfg.smoothing >= 1.0:
        raise OptionError(f"--{'drop-path' if cfg.drop_path >= 1 else 'smoothing'} must be below 1")
    if cfg.augment == "randaug":
        try:
            train_transform(224, cfg.augment, cfg.rand_augment, cfg.re_prob)
        except (AssertionError, ValueError, KeyError, IndexError) as e:
            raise OptionError(f"--rand-augment {cfg.rand_augment}: not a timm RandAugment policy ({e})") from None


def run_finetune(cfg: FinetuneConfig) -> dict:
    """Fine-tune; returns {checkpoint, metrics, steps, table, main_process}. Resumes with `resume`."""
    from timm.optim import param_groups_layer_decay

    from mrmae.shared.shards import expand_urls
    from mrmae.train.pretrain import count_samples

    check_numbers(cfg)
    run = TrainRun(cfg, "finetune")
    cfg, cuda = run.cfg, run.cuda
    if (cfg.mixup > 0 or cfg.cutmix > 0) and cfg.batch_size % 2:
        raise FinetuneError(f"--batch-size {cfg.batch_size} is odd: Mixup/CutMix pair the rows of a batch "
                            "(use an even size, or --mixup 0 --cutmix 0)")
    model, encoder = build_classifier(cfg.checkpoint, cfg.num_classes, cfg.drop_path, cfg.global_pool, cfg.seed)
    if encoder.note and run.is_main:
        tqdm.write(f"mrmae: note: {encoder.note}", file=sys.stderr)
    timm_name, timm_kwargs = encoder.timm_model, {**encoder.timm_kwargs, "num_classes": cfg.num_classes,
                                                  "global_pool": cfg.global_pool}
    img_size = int(timm_kwargs.get("img_size", 224))
    stream = LabelledStream(cfg.train_shards, cfg.batch_size, train_transform(img_size, cfg.augment, cfg.rand_augment,
                            cfg.re_prob), cfg.seed, cfg.shuffle_buffer)
    # Not accelerator.prepare(loader): the stream splits shards by node and worker itself.
    loader = InterruptibleLoader(stream, batch_size=None, num_workers=cfg.workers, pin_memory=cuda,
                                 worker_init_fn=worker_ignores_interrupt)
    samples = cfg.samples_per_epoch or count_samples(expand_urls(cfg.train_shards), None)
    run.plan(samples, "samples_per_epoch" if cfg.samples_per_epoch else "counted in --shards")
    groups = param_groups_layer_decay(model, cfg.weight_decay, model.no_weight_decay(), layer_decay=cfg.layer_decay)
    optimizer = torch.optim.AdamW(groups, lr=run.base_lr, betas=(0.9, 0.999), fused=cuda or None)
    model, _ = run.start(model, optimizer, run_fingerprint(cfg, timm_name, timm_kwargs))
    run.write_config({"task": "finetune", **asdict(cfg), "timm_model": timm_name, "timm_kwargs": timm_kwargs})

    def batches_of(epoch: int):
        empty = FinetuneError(f"no full batch of labelled images in this process's shards ({stream.urls[:3]}...): "
                              "fewer shards than processes x workers, or --batch-size above a shard's images?")
        return epoch_passes(stream, loader, epoch, empty)

    def end_of_epoch(epoch: int) -> None:
        result = evaluate(run.accelerator.unwrap_model(model), cfg.val_shards, img_size, cfg.num_classes,
                          run.accelerator, cfg.eval_batch_size, cfg.workers)
        if run.is_main:  # the epoch's mean from the file: a resumed epoch counts its first part too
            run.log({"epoch": epoch, "step": run.state.step, "train_loss": _epoch_loss(run.metrics, epoch), **result})

    result = run.train(batches_of, ClassifierStep(model, run.accelerator, cfg), end_of_epoch)
    result["table"] = results_table(run.metrics) if run.is_main else ""
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
        x, y = batch
        if int(y.max()) >= self.cfg.num_classes:
            raise FinetuneError(f"{self.cfg.train_shards}: label {int(y.max())} >= --num-classes {self.cfg.num_classes}")
        device = self.accelerator.device
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        seed_everything(seed_from("finetune-step", self.cfg.seed, where.micro, where.rank))
        if self.mixup is not None:
            x, y = self.mixup(x, y)
        with self.accelerator.autocast():
            return {"loss": self.criterion(self.model(x), y)}

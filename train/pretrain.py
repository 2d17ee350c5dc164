"""`mrmae pretrain`: set up data, student, optimiser and (in live mode) a teacher, then loop.

Three modes of one command, with the same render, mask and loss code:

- cached (`feature_cache`): targets and attention stream from the cache; no teacher built;
- live (`teacher`): the teacher runs on each batch's views;
- plain MAE (neither): reconstruction only.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from tqdm import tqdm

from mrmae.shared import shards
from mrmae.shared.shards import expand_urls
from mrmae.shared import cache_format as cf
from mrmae.shared.errors import OptionError, naming, worker_ignores_interrupt
from mrmae.train import checkpoint as ckpt
from mrmae.train.data import DataConfig, StudentStream, check_cache_fits
from mrmae.train.masking import all_mask_options, get_mask, mask_names, num_visible
from mrmae.train.recipe import RecipeFile
from mrmae.train.engine import (InterruptibleLoader, NonFiniteLossError, StepOptions, epoch_passes,
                                lr_at, train_one_epoch)
from mrmae.train.jsonl import append_record as append_metrics


@dataclass
class PretrainConfig:
    shards: str
    out: str
    model: str = "mrmae_vit_base_patch16"
    feature_cache: str | None = None
    target: str | None = None  # `open_targets`: "main" (default), an added teacher, or several joint: "main,clip-B16"
    teacher: str | None = None
    epochs: int = 1
    batch_size: int = 64  # per process, per micro-batch
    accum_steps: int | None = None  # None: 1, or what effective_batch asks (`resolve_accum_steps`)
    effective_batch: int | None = None  # images per optimiser step, whatever the process count
    blr: float = 1.5e-4
    lr: float | None = None  # absolute; default blr x effective batch / 256
    min_lr: float = 0.0
    warmup_epochs: float = 0.0
    weight_decay: float = 0.05
    decoder_dim: int = 512
    decoder_depth: int = 8
    fuse_layers: tuple[int, ...] = ()
    views_per_image: int = 2  # live / plain modes (cached mode reads the cache's)
    workers: int = 0
    shuffle_buffer: int = 1000
    seed: int = 0
    resume: bool = False
    save_every_steps: int = 0  # 0: at the end of each epoch only
    pixels_from_cache: bool = False  # views from the cache (--store-pixels), source tars unread
    render_on_device: bool | None = None  # workers decode, the step renders the views; None: on with CUDA
    compile: str | None = None  # torch.compile backend ("inductor"; "eager" to test the plumbing), None: eager mode
    samples_per_epoch: int | None = None  # default: counted from the cache or the tars
    data_split: str = "shards"  # "shards" (each rank reads its shards) | "samples" (exact at any world size)
    progress: bool = True
    device: str = "auto"  # "auto": accelerate's choice (a GPU per process where there are GPUs); "cpu": CPU anyway
    step_options: StepOptions = field(default_factory=StepOptions)
    config_file: RecipeFile | None = None  # the --config file the options came from (recorded in config.json)


def count_samples(urls: list[str], cache: cf.FeatureCache | None) -> int:
    """Samples of an epoch: the cache's entries, or a pass over each tar's headers (local,
    `pipe:` and URL shards alike; data is read, since a stream cannot seek, and dropped)."""
    if cache is not None:  # (the entries alone: no group is opened)
        return sum(cache.entry(u).num_samples for u in urls)
    return sum(shards.count_samples(url) for url in urls)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: no decay on norms, biases, position/cls/mask tokens."""
    skip = set(getattr(model, "no_weight_decay", lambda: set())())
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name in skip or name.endswith(".bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def cache_fingerprint(cache: cf.FeatureCache) -> str:
    m = cache.manifest.to_json()
    blob = json.dumps({k: m[k] for k in ("teacher", "views", "storage")}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


MAIN_TARGET = "main"  # --target's name for the teacher that drew the cache's views


def open_targets(root: str, target: str | None) -> list[cf.FeatureCache]:
    """The caches `--target` names in the cache at `root`: `main` (the default) or a teacher
    added with `extract-features --add-teacher`; several, comma-separated, train jointly
    (one mimic head each; the first one's attention drives focused masking)."""
    names = [n.strip() for n in (target or MAIN_TARGET).split(",") if n.strip()]
    if len(set(names)) != len(names):
        raise OptionError(f"--target {target}: a teacher is named twice")
    return [cf.FeatureCache(root, None if n == MAIN_TARGET else n) for n in names]


def check_options(cfg: PretrainConfig) -> None:
    """Refuse (OptionError naming the option) what cannot work, before anything is written."""
    from mrmae.train.models import list_models, model_config

    for option, value, least in (("--epochs", cfg.epochs, 1), ("--batch-size", cfg.batch_size, 1),
                                 ("--workers", cfg.workers, 0),
                                 ("--views", cfg.views_per_image, 1), ("--decoder-dim", cfg.decoder_dim, 1),
                                 ("--decoder-depth", cfg.decoder_depth, 0), ("--save-every-steps", cfg.save_every_steps, 0),
                                 ("--shuffle-buffer", cfg.shuffle_buffer, 0)):
        if value < least:
            raise OptionError(f"{option} {value}: must be at least {least}")
    check_numbers(cfg)
    check_mask(cfg.step_options)
    if cfg.model not in list_models():
        raise OptionError(f"--model {cfg.model}: unknown; known: {', '.join(list_models())}")
    try:
        config = model_config(cfg.model, fuse_layers=cfg.fuse_layers)
    except ValueError as e:  # the list was written for another depth (4,8,12 is a ViT-B's, 4,8,11 a ConvViT's)
        from mrmae.train.students import family_of

        depth, blocks = model_config(cfg.model).depth, family_of(cfg.model).fuse_blocks  # what the list counts
        raise OptionError(f"--fuse-layers {','.join(map(str, cfg.fuse_layers))}: {cfg.model} has {depth} {blocks}; "
                          f"{e}") from None
    tokens = (config.img_size // config.patch_size) ** 2
    if num_visible(tokens, cfg.step_options.mask_ratio) >= tokens:  # nothing masked: L_R is a mean over nothing
        raise OptionError(f"--mask-ratio {cfg.step_options.mask_ratio}: masks none of {cfg.model}'s {tokens} patches")
    urls = expand_urls(cfg.shards)
    if not urls:
        raise OptionError(f"--shards {cfg.shards!r}: names no shard")
    if len(set(urls)) != len(urls):  # e.g. overlapping brace ranges: those samples would count twice an epoch
        twice = next(u for u in urls if urls.count(u) > 1)
        raise OptionError(f"--shards: {twice} is listed twice")
    if cfg.target and not cfg.feature_cache:
        raise OptionError("--target picks targets inside a cache: give --feature-cache too")
    if cfg.feature_cache and cfg.teacher:
        raise OptionError("give --feature-cache or --teacher, not both")
    if cfg.pixels_from_cache and not cfg.feature_cache:
        raise OptionError("--pixels-from-cache reads the views from a cache: give --feature-cache")
    if get_mask(cfg.step_options.mask).needs_attention and not (cfg.feature_cache or cfg.teacher):
        raise OptionError(f"--mask {cfg.step_options.mask} needs teacher attention: give --feature-cache or --teacher")


def check_mask(o: StepOptions) -> None:
    """--mask names a registered strategy, and each of --mask-option's (any strategy's: the
    command line sets --focus-* whatever --mask is) is an option of one, in its range."""
    if o.mask not in mask_names():
        raise OptionError(f"--mask {o.mask}: unknown masking strategy; known: {', '.join(mask_names())}")
    known = all_mask_options()
    for name, value in o.mask_options.items():
        if name not in known:
            raise OptionError(f"--mask-option {name}: no masking strategy takes it; known: {', '.join(sorted(known))}")
        spec = known[name]
        shown = spec.flag[2:] if spec.flag else f"mask-option {name}"  # (number_option adds the dashes)
        number_option(shown, value, spec.low, spec.high, low_open=spec.low_open)


def number_option(option: str, value: float | None, low: float, high: float = math.inf, *,
                  low_open: bool = False) -> None:
    """OptionError naming `option` unless `value` (when given) is a finite number in
    [low, high] (or (low, high] with `low_open`): NaN passes click's ranges and every
    comparison, and trains on NaN or records a meaningless result."""
    if value is None:
        return
    if not math.isfinite(value) or value < low or value > high or (low_open and value == low):
        where = (f"above {low:g}" if low_open else f"from {low:g}") if high == math.inf else f"in {'(' if low_open else '['}{low:g}, {high:g}]"
        raise OptionError(f"--{option} {value}: must be a finite number {where}")


def check_warmup(warmup_epochs: float, epochs: int) -> None:
    """A warm-up as long as the run never reaches the peak lr, and a longer one trains the
    whole run at a fraction of it: refused (0, no warm-up, is fine)."""
    if warmup_epochs > 0 and warmup_epochs >= epochs:
        raise OptionError(f"--warmup-epochs {warmup_epochs:g}: must be below --epochs {epochs} (a warm-up of the "
                          "whole run or longer never reaches the peak lr)")


def resolve_accum_steps(batch_size: int, accum_steps: int | None, effective_batch: int | None,
                        processes: int) -> int:
    """The gradient accumulation steps of a run: --accum-steps (default 1) or, with
    --effective-batch N, N / (batch_size x processes), so a recipe's batch holds on any number
    of GPUs. OptionError when N is no multiple of that, or --accum-steps asks for another."""
    for option, value in (("--accum-steps", accum_steps), ("--effective-batch", effective_batch)):
        if value is not None and value < 1:
            raise OptionError(f"{option} {value}: must be at least 1")
    if effective_batch is None:
        return accum_steps or 1
    per_micro = batch_size * processes
    if effective_batch % per_micro:
        raise OptionError(f"--effective-batch {effective_batch}: not a multiple of --batch-size {batch_size} x "
                          f"{processes} processes = {per_micro} images per micro-step; change --batch-size "
                          "or the process count")
    derived = effective_batch // per_micro
    if accum_steps is not None and accum_steps != derived:
        raise OptionError(f"--accum-steps {accum_steps}: --effective-batch {effective_batch} at --batch-size "
                          f"{batch_size} x {processes} processes needs --accum-steps {derived}; give one of the two")
    return derived


def check_epoch_fits(cfg, processes: int, samples: int, counted_in: str) -> None:
    """An optimiser step of more images than an epoch has would repeat samples within the
    step and make the epoch one step long (`cfg`: a PretrainConfig or FinetuneConfig)."""
    eff = cfg.batch_size * cfg.accum_steps * processes
    if eff > samples:
        named = f"--effective-batch {eff}" if cfg.effective_batch else f"--batch-size {cfg.batch_size}"
        raise OptionError(f"{named}: {eff} images per step (--batch-size {cfg.batch_size} x --accum-steps "
                          f"{cfg.accum_steps} x {processes} processes) is more than the {samples} samples of an "
                          f"epoch ({counted_in})")


def check_numbers(cfg: PretrainConfig) -> None:
    """The float options of a pretraining run (OptionError naming the first bad one)."""
    o = cfg.step_options
    for option, value, low, high, low_open in (
            ("lr", cfg.lr, 0.0, math.inf, True), ("blr", cfg.blr, 0.0, math.inf, True),
            ("min-lr", cfg.min_lr, 0.0, math.inf, False), ("weight-decay", cfg.weight_decay, 0.0, math.inf, False),
            ("warmup-epochs", cfg.warmup_epochs, 0.0, math.inf, False), ("mask-ratio", o.mask_ratio, 0.0, 1.0, False),
            ("recon-weight", o.recon_weight, 0.0, math.inf, False), ("mimic-weight", o.mimic_weight, 0.0, math.inf, False)):
        number_option(option, value, low, high, low_open=low_open)
    check_warmup(cfg.warmup_epochs, cfg.epochs)
    if o.mask_ratio >= 1.0:
        raise OptionError(f"--mask-ratio {o.mask_ratio}: must be below 1")
    if o.recon_weight == 0 and o.mimic_weight == 0:
        raise OptionError("--recon-weight 0 --mimic-weight 0: the loss would be zero; give one of them a weight")


def run_fingerprint(cfg: PretrainConfig, urls: list[str], caches: list[cf.FeatureCache], teacher,
                    teacher_dims: tuple[int, ...]) -> ckpt.Fingerprint:
    """What this run trains on and what shapes its weights, recorded in each checkpoint and
    compared by --resume. Shards are named by file name, as the cache matches them, so a
    run whose shards moved (another mount) still resumes; the targets are the cache's
    configuration plus the recorded digest of each shard trained on."""
    targets = [{"config": cache_fingerprint(c), "shards": [_shard_digest(c, u) for u in urls]} for c in caches]
    names = [cf.shard_basename(u) for u in urls]
    fuse = ",".join(map(str, cfg.fuse_layers)) or "last"
    target = ",".join(n.strip() for n in (cfg.target or MAIN_TARGET).split(",") if n.strip())  # a head each
    data = {"shards": names, "views_per_image": None if caches else cfg.views_per_image, "seed": cfg.seed,
            "split": cfg.data_split, "pixels_from_cache": cfg.pixels_from_cache}
    return ckpt.Fingerprint((
        ckpt.fingerprint_field("task", "pretrain", "pretrain"),
        ckpt.fingerprint_field("cache", cfg.feature_cache or "none", targets),
        ckpt.fingerprint_field("teacher", cfg.teacher or "none", teacher.fingerprint if teacher else None),
        ckpt.fingerprint_field("teacher_dim", ",".join(map(str, teacher_dims)), list(teacher_dims)),
        ckpt.fingerprint_field("model", f"{cfg.model} (fuse {fuse}, decoder {cfg.decoder_dim}x{cfg.decoder_depth}, "
                               f"target {target})",
                               [cfg.model, list(cfg.fuse_layers), cfg.decoder_dim, cfg.decoder_depth, target]),
        ckpt.fingerprint_field("data", f"{len(names)} shards {names[0] if names else ''}..{names[-1] if names else ''}, "
                               f"seed {cfg.seed}, split {cfg.data_split}", data),
    ))


def _shard_digest(cache: cf.FeatureCache, url: str) -> list:
    """(file name, sha256 of its stored group) of one shard in `cache`."""
    return [cf.shard_basename(url), cache.entry(url).sha256]


def run_pretrain(cfg: PretrainConfig) -> dict:
    """Train; returns {checkpoint, metrics, steps}. Resumes from OUT/checkpoints with `resume`."""
    from accelerate import Accelerator

    from mrmae.shared.teachers import build_teacher
    from mrmae.train.models import create_model

    out = Path(cfg.out)
    check_options(cfg)  # before anything is built, read or written
    cuda = torch.cuda.is_available() and cfg.device != "cpu"
    # cpu=True without CUDA: accelerate then sets up multi-process runs with gloo on CPU
    accelerator = Accelerator(mixed_precision="bf16" if cuda else "no", cpu=not cuda)
    cfg = replace(cfg, accum_steps=resolve_accum_steps(cfg.batch_size, cfg.accum_steps, cfg.effective_batch,
                                                       accelerator.num_processes))
    accelerator.gradient_accumulation_steps = cfg.accum_steps  # known once the process count is
    # Stored views need no render; otherwise the device renders where one is (the same pixels either way).
    cfg = replace(cfg, render_on_device=not cfg.pixels_from_cache and
                  (cuda if cfg.render_on_device is None else cfg.render_on_device))
    torch.manual_seed(cfg.seed)
    urls = expand_urls(cfg.shards)
    caches = open_targets(cfg.feature_cache, cfg.target) if cfg.feature_cache else []
    cache, joint = (caches[0], tuple(caches[1:])) if caches else (None, ())
    teacher = build_teacher(cfg.teacher).to(accelerator.device) if cfg.teacher else None
    teacher_dim = cache.manifest.teacher.dim if cache else (teacher.dim if teacher else 0)
    joint_dims = tuple(c.manifest.teacher.dim for c in joint)
    fingerprint = run_fingerprint(cfg, urls, caches, teacher, (teacher_dim, *joint_dims))
    fingerprint = ckpt.Fingerprint((*fingerprint.fields,
                                    ckpt.batch_field(cfg.batch_size, cfg.accum_steps, accelerator.num_processes)))
    model = create_model(cfg.model, teacher_dim=teacher_dim, joint_teacher_dims=joint_dims, fuse_layers=cfg.fuse_layers,
                         decoder_embed_dim=cfg.decoder_dim, decoder_depth=cfg.decoder_depth)
    grid = model.grid_size
    for i, c in enumerate(caches):
        check_cache_fits(c, urls, grid, c.manifest.teacher.dim, model.img_size if cfg.pixels_from_cache and not i else 0)
        c.check_shards(urls)  # every group there, of these shapes and rows (a few zarr.json each), before any write
    data_cfg = DataConfig(shards=urls, batch_size=cfg.batch_size, seed=cfg.seed, img_size=model.img_size,
                          views_per_image=cfg.views_per_image, shuffle_buffer=cfg.shuffle_buffer,
                          teacher_size=teacher.input_size if teacher else 0, split=cfg.data_split,
                          pixels_from_cache=cfg.pixels_from_cache, render_on_device=cfg.render_on_device)
    # PCA caches: the loader carries their K coefficients; the engine reconstructs the
    # visible tokens with each cache's own stored basis, on the device.
    target_pca = [None if (p := c.pca()) is None else
                  (torch.from_numpy(p[0]).to(accelerator.device), torch.from_numpy(p[1]).to(accelerator.device))
                  for c in caches]
    stream = StudentStream(data_cfg, cache, joint)
    loader = InterruptibleLoader(stream, batch_size=None, num_workers=cfg.workers, pin_memory=cuda,
                                         worker_init_fn=worker_ignores_interrupt)
    # Not accelerator.prepare(loader): accelerate re-shards iterable datasets and would drop
    # or repeat samples; the stream splits shards by node and worker itself.

    eff_batch = cfg.batch_size * cfg.accum_steps * accelerator.num_processes
    base_lr = cfg.lr if cfg.lr is not None else cfg.blr * eff_batch / 256
    samples = cfg.samples_per_epoch or count_samples(urls, cache)
    check_epoch_fits(cfg, accelerator.num_processes, samples, "samples_per_epoch" if cfg.samples_per_epoch else
                     "counted in --feature-cache" if cache else "counted in --shards")
    steps_per_epoch = max(1, (math.ceil if cfg.data_split == "shards" else math.floor)(samples / eff_batch))
    total_steps, warmup_steps = steps_per_epoch * cfg.epochs, int(cfg.warmup_epochs * steps_per_epoch)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=base_lr, betas=(0.9, 0.95),
                                  fused=cuda or None)
    state, metrics = ckpt.start_or_resume(out, cfg.resume, model, optimizer, accelerator.is_main_process, fingerprint)
    if cfg.compile:
        # In place (nn.Module.compile): parameter names, checkpoints and DDP are unchanged.
        model.compile(backend=cfg.compile)
    model, optimizer = accelerator.prepare(model, optimizer)

    if accelerator.is_main_process:
        resolved = {**asdict(cfg), "base_lr": base_lr, "effective_batch": eff_batch, "steps_per_epoch": steps_per_epoch,
                    "num_processes": accelerator.num_processes, "teacher_dim": teacher_dim,
                    "joint_teacher_dims": list(joint_dims),
                    "target_pca": [c.pca_config and c.pca_config.to_json() for c in caches],
                    "cache_fingerprint": cache_fingerprint(cache) if cache else None,
                    "teacher_weights_sha256": (cache.manifest.teacher.weights_sha256 if cache
                                               else teacher.fingerprint if teacher else None)}
        with naming(out / "config.json"):
            (out / "config.json").write_text(json.dumps(resolved, indent=1, default=str) + "\n")
        writer = _tensorboard(out)

    def set_lr(step: int) -> float:
        lr = lr_at(step, base_lr, cfg.min_lr, warmup_steps, total_steps)
        for g in optimizer.param_groups:
            g["lr"] = lr
        return lr

    bar = tqdm(total=total_steps, initial=state.step, desc="pretrain", unit="step",
               disable=not (cfg.progress and accelerator.is_main_process), dynamic_ncols=True)

    def on_step(step: int, record: dict) -> None:
        state.step, state.step_in_epoch = step, state.step_in_epoch + 1
        if accelerator.is_main_process:
            append_metrics(metrics, record)
            if writer is not None:
                for k, v in record.items():
                    writer.add_scalar(f"train/{k}", v, step)
            bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{record['images_per_s']:.0f}")
            bar.update(1)
        if cfg.save_every_steps and step % cfg.save_every_steps == 0:
            _save(accelerator, out, model, optimizer, state, fingerprint)

    last_path = ckpt.latest_checkpoint(out)
    micro_per_epoch = steps_per_epoch * cfg.accum_steps
    for epoch in range(state.epoch, cfg.epochs):
        if cfg.data_split == "shards":  # every rank runs the same number of steps (DDP needs it)
            empty = cf.CacheError(f"this process got no samples (shards {stream.urls[:3]}...): "
                                  "fewer shards than processes x workers?")
            batches = itertools.islice(epoch_passes(stream, loader, epoch, empty), micro_per_epoch)
        else:  # every rank reads the same stream: the same number of batches by construction
            stream.set_epoch(epoch)
            batches = iter(loader)
        for _ in range(state.step_in_epoch * cfg.accum_steps):  # the data position of a resumed epoch
            next(batches, None)
        try:
            train_one_epoch(model, batches, optimizer, accelerator, epoch, state.step, cfg.step_options, set_lr,
                            teacher=teacher, on_step=on_step, target_pca=target_pca)
        except NonFiniteLossError as e:
            raise NonFiniteLossError(f"{e}; the last good checkpoint is {ckpt.latest_checkpoint(out)}") from None
        state.epoch, state.step_in_epoch = epoch + 1, 0
        last_path = _save(accelerator, out, model, optimizer, state, fingerprint)
    bar.close()
    if accelerator.is_main_process and writer is not None:
        writer.close()
    accelerator.wait_for_everyone()
    return {"checkpoint": str(last_path), "metrics": str(metrics), "steps": state.step,
            "main_process": accelerator.is_main_process}


def _save(accelerator, out: Path, model, optimizer, state: ckpt.TrainState, fingerprint: ckpt.Fingerprint
          ) -> Path | None:
    accelerator.wait_for_everyone()
    path = None
    if accelerator.is_main_process:
        path = ckpt.save_checkpoint(out, accelerator.unwrap_model(model), optimizer, state,
                                    {"fingerprint": fingerprint.to_json()})
    accelerator.wait_for_everyone()
    return path


def _tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # optional: metrics.jsonl is always written
        return None
    return SummaryWriter(str(out / "tensorboard"))

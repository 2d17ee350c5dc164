"""`mrmae pretrain`: set up data, student, optimiser and (in live mode) a teacher, then loop.

Three modes of one command, with the same render, mask and loss code:

- cached (`feature_cache`): targets and attention stream from the cache; no teacher built;
- live (`teacher`): the teacher runs on each batch's views;
- plain MAE (neither): reconstruction only.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import asdict, replace

import torch

from mrmae.shared import shards
from mrmae.shared.shard_sizes import ShardSizes, read_sizes
from mrmae.shared.shards import expand_urls
from mrmae.shared import cache_format as cf
from mrmae.shared.errors import OptionChecks, OptionError, unknown_name
from mrmae.train.run import checkpoint as ckpt
from mrmae.train.stream import DataConfig, StudentLoader, StudentStream, check_cache_fits
from mrmae.train.masking import all_mask_options, get_mask, mask_names, num_visible
from mrmae.shared.options import number_option
from mrmae.train.config import PretrainConfig, StepOptions
from mrmae.train.engine import PretrainStep
from mrmae.train.run.loop import TrainRun
from mrmae.train.run.micro_batch import MASK_SEEDING
from mrmae.train.run.options import check_run_options, check_shard_list
from mrmae.train.run.run_dir import check_out


def count_samples(urls: list[str], cache: cf.FeatureCache | None, sizes: ShardSizes | None = None) -> int:
    """Samples of an epoch: the cache's entries; else the counts `sizes` (the sizes.json
    beside the shards, `shard_sizes`) records, and a pass over the headers of each tar it
    does not (local, `pipe:` and URL shards alike; data is read, since a stream cannot seek,
    and dropped). The loader checks each recorded count as it reads the tar."""
    if cache is not None:  # (the entries alone: no group is opened)
        return sum(cache.entry(u).num_samples for u in urls)
    sizes = sizes if sizes is not None else read_sizes(urls)
    return sum(sizes.counts.get(url) if url in sizes.counts else shards.count_samples(url) for url in urls)


def counted_in(cfg: PretrainConfig, caches: list, sizes: ShardSizes | None) -> str:
    """Where an epoch's samples were counted, for the run's start (and a refusal)."""
    if cfg.samples_per_epoch:
        return "samples_per_epoch"
    if caches:
        return "counted in --feature-cache"
    if sizes is not None and sizes.counts and not sizes.unrecorded:
        return f"recorded in {', '.join(sorted(set(sizes.recorded_in.values())))}"
    return "counted in --shards"


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
    """Refuse what cannot work before anything is written: every bad option at once (an
    OptionErrors, a line each naming its option)."""
    checks = OptionChecks()
    check_run_options(cfg, checks)  # the declared types and ranges (NaN too), the warm-up
    checks.run(check_mask, cfg.step_options)
    checks.run(check_model, cfg)
    checks.run(check_shard_list, cfg.shards)
    checks.run(check_out, cfg.out, cfg.resume or bool(cfg.resume_from), cfg.overwrite)
    checks.run(ckpt.check_out_apart, cfg.out, [cfg.feature_cache])
    checks.run(check_high_level, cfg)
    o = cfg.step_options
    if o.recon_weight == 0 and (o.mimic_weight == 0 or not (cfg.feature_cache or cfg.teacher)):
        shown = "--recon-weight 0 --mimic-weight 0" if o.mimic_weight == 0 else "--recon-weight 0 without a teacher"
        checks.fail(f"{shown}: the loss would be zero; give one of them a weight")
    if cfg.target and not cfg.feature_cache:
        checks.fail("--target picks targets inside a cache: give --feature-cache too")
    if cfg.feature_cache and cfg.teacher:
        checks.fail("give --feature-cache or --teacher, not both")
    if cfg.pixels_from_cache and not cfg.feature_cache:
        checks.fail("--pixels-from-cache reads the views from a cache: give --feature-cache")
    if cfg.step_options.mask in mask_names() and get_mask(cfg.step_options.mask).needs_attention \
            and not (cfg.feature_cache or cfg.teacher):
        checks.fail(f"--mask {cfg.step_options.mask} needs teacher attention: give --feature-cache or --teacher")
    checks.done()


def check_model(cfg: PretrainConfig) -> None:
    """--model is a registered student, --fuse-layers fits its depth, --mask-ratio masks some of its patches."""
    from mrmae.train.models import model_config
    from mrmae.train.students.registry import student_names

    if cfg.model not in student_names():
        raise OptionError(unknown_name("--model", cfg.model, student_names(), "see `mrmae models`"))
    try:
        config = model_config(cfg.model, fuse_layers=cfg.fuse_layers)
    except ValueError as e:  # the list was written for another depth (4,8,12 is a ViT-B's, 4,8,11 a ConvViT's)
        from mrmae.train.students.registry import family_of

        depth, blocks = model_config(cfg.model).depth, family_of(cfg.model).fuse_blocks  # what the list counts
        raise OptionError(f"--fuse-layers {','.join(map(str, cfg.fuse_layers))}: {cfg.model} has {depth} {blocks}; "
                          f"{e}") from None
    tokens, ratio = (config.img_size // config.patch_size) ** 2, cfg.step_options.mask_ratio
    if 0 <= ratio < 1 and num_visible(tokens, ratio) >= tokens:  # masks nothing: L_R would be a mean over nothing (NaN or out of range: check_numbers says so)
        raise OptionError(f"--mask-ratio {cfg.step_options.mask_ratio}: masks none of {cfg.model}'s {tokens} patches")


def check_high_level(cfg: PretrainConfig) -> None:
    """--high-level-at decoder (table 3 row 5) needs one teacher's features and a weight for them."""
    o = cfg.step_options
    if o.high_level_at not in ("encoder", "decoder"):
        raise OptionError(f"--high-level-at {o.high_level_at}: encoder or decoder")
    if o.high_level_at != "decoder":
        return
    if not (cfg.feature_cache or cfg.teacher):
        raise OptionError("--high-level-at decoder reconstructs the teacher's features: give --feature-cache or "
                          "--teacher")
    if o.mimic_weight == 0:
        raise OptionError("--high-level-at decoder with --mimic-weight 0: the decoder's feature head would learn "
                          "nothing; give the features a weight")
    if cfg.target and len([n for n in cfg.target.split(",") if n.strip()]) > 1:
        raise OptionError(f"--target {cfg.target}: --high-level-at decoder reconstructs one teacher's features")


def check_mask(o: StepOptions) -> None:
    """--mask names a registered strategy, and each of --mask-option's (any strategy's: the
    command line sets --focus-* whatever --mask is) is an option of one, in its range."""
    if o.mask not in mask_names():
        raise OptionError(unknown_name("--mask", o.mask, mask_names(), "a file of train/masks/"))
    known = all_mask_options()
    checks = OptionChecks()
    for name, value in o.mask_options.items():
        if name not in known:
            checks.fail(unknown_name("--mask-option", name, sorted(known), "no masking strategy takes it"))
            continue
        spec = known[name]
        shown = spec.flag[2:] if spec.flag else f"mask-option {name}"  # (number_option adds the dashes)
        checks.run(number_option, shown, value, spec.low, spec.high, low_open=spec.low_open)
    checks.done()


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
    if cfg.step_options.high_level_at != "encoder":  # row 5's head sits on the decoder (older runs record none)
        target += f" at the {cfg.step_options.high_level_at}"
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
    """Train; returns {checkpoint, metrics, steps, main_process}. Resumes from OUT/checkpoints with `resume`."""
    from mrmae.shared.teachers.base import build_teacher
    from mrmae.train.models import create_model
    from mrmae.train.restore import init_from, resumed_config
    from mrmae.train.students.registry import family_of

    check_options(cfg)  # before anything is built, read or written
    run = TrainRun(cfg, "pretrain", mask_seeding=MASK_SEEDING)
    cuda, device = run.cuda, run.accelerator.device
    # Stored views need no render; otherwise the device renders where one is (the same pixels either way).
    cfg = run.cfg = replace(run.cfg, render_on_device=not cfg.pixels_from_cache and
                            (cuda if cfg.render_on_device is None else cfg.render_on_device))
    torch.manual_seed(cfg.seed)
    urls = expand_urls(cfg.shards)
    caches = open_targets(cfg.feature_cache, cfg.target) if cfg.feature_cache else []
    teacher = build_teacher(cfg.teacher).to(device) if cfg.teacher else None
    dims = target_dims(caches, teacher)
    heads = (dict(teacher_dim=0, decoder_teacher_dim=dims[0]) if cfg.step_options.high_level_at == "decoder"
             else dict(teacher_dim=dims[0], joint_teacher_dims=dims[1:]))  # row 5: the decoder's head, no mimic head
    if cfg.resume or cfg.resume_from:  # what the run recorded beyond its shapes (a ConvViT run from before 1e-5: its 1e-6)
        heads.update(resumed_config(cfg.out, cfg.model))
    model = create_model(cfg.model, fuse_layers=cfg.fuse_layers, decoder_embed_dim=cfg.decoder_dim,
                         decoder_depth=cfg.decoder_depth, **heads)
    model_record = family_of(cfg.model).recorded_config(model.cfg)  # what restoring it needs beyond its shapes
    if cfg.init:  # (a resumed run's checkpoint then replaces these weights)
        init_note = init_from(model, cfg.model, cfg.init, cfg.checkpoint_format)
        if run.is_main:
            print(f"mrmae: note: {init_note}", file=sys.stderr)
    sizes = None if caches else read_sizes(urls)  # (plain and live: the counts recorded beside the shards)
    data = student_data(cfg, urls, caches, model, teacher, cuda, sizes)
    samples = cfg.samples_per_epoch or count_samples(urls, caches[0] if caches else None, sizes)
    run.plan(samples, counted_in(cfg, caches, sizes), full_steps_only=cfg.data_split == "samples")
    # PCA caches: the loader carries their K coefficients; the step rebuilds the visible
    # tokens with each cache's own stored basis, on the device.
    # Read (and checked) before the run directory is written: a bad basis leaves nothing.
    pca = [None if (p := c.pca()) is None else (torch.from_numpy(p[0]).to(device), torch.from_numpy(p[1]).to(device))
           for c in caches]
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=run.peak_lr, betas=(0.9, 0.95),
                                  fused=cuda or None)
    model, _ = run.start(model, optimizer, run_fingerprint(cfg, urls, caches, teacher, dims), cfg.compile)
    run.write_config({**asdict(cfg), "model_config": model_record, "teacher_dim": dims[0],
                      "joint_teacher_dims": list(dims[1:]),
                      "target_pca": [c.pca_config and c.pca_config.to_json() for c in caches],
                      "cache_fingerprint": cache_fingerprint(caches[0]) if caches else None,
                      "teacher_weights_sha256": (caches[0].manifest.teacher.weights_sha256 if caches
                                                 else teacher.fingerprint if teacher else None)})
    step = PretrainStep(model, run.accelerator, cfg.step_options, teacher, pca, run.mask_seeding)
    return run.train(data.steps, step,
                     what=describe_run(cfg, run.accelerator.unwrap_model(model), caches))


def describe_run(cfg: PretrainConfig, model: torch.nn.Module, caches: list[cf.FeatureCache]) -> str:
    """The start line's account of a run: model and parameters, mode, teacher and cache, mask."""
    enc, total = model.encoder_num_params(), sum(p.numel() for p in model.parameters() if p.requires_grad)
    if caches:
        m = caches[0].manifest
        mode = (f"cached targets from {cfg.feature_cache} ({m.teacher.spec}, {m.views.per_image} views"
                + (f", --target {cfg.target}" if cfg.target else "") + ")")
    else:
        mode = f"live teacher {cfg.teacher}" if cfg.teacher else "plain MAE (no teacher)"
    o = cfg.step_options
    return (f"{cfg.model} ({enc / 1e6:.1f}M encoder params, {total / 1e6:.1f}M trained), {mode}, "
            f"mask {o.mask} {o.mask_ratio:g}")


def target_dims(caches: list[cf.FeatureCache], teacher) -> tuple[int, ...]:
    """(main, *joint) teacher widths the mimic heads predict: the caches' or the live
    teacher's; (0,) for plain MAE (no mimic head)."""
    if caches:
        return tuple(c.manifest.teacher.dim for c in caches)
    return (teacher.dim if teacher else 0,)


def student_data(cfg: PretrainConfig, urls: list[str], caches: list[cf.FeatureCache], model, teacher,
                 pin: bool, sizes: ShardSizes | None = None) -> StudentLoader:
    """The checked caches' stream of this run's steps (module docstring of stream.py)."""
    for i, c in enumerate(caches):
        check_cache_fits(c, urls, model.grid_size, c.manifest.teacher.dim,
                         model.img_size if cfg.pixels_from_cache and not i else 0)
        c.check_shards(urls)  # every group there, of these shapes and rows (a few zarr.json each), before any write
    data_cfg = DataConfig(shards=urls, batch_size=cfg.batch_size, seed=cfg.seed, img_size=model.img_size,
                          views_per_image=cfg.views_per_image, shuffle_buffer=cfg.shuffle_buffer,
                          teacher_size=teacher.input_size if teacher else 0, split=cfg.data_split,
                          pixels_from_cache=cfg.pixels_from_cache, render_on_device=cfg.render_on_device,
                          accum_steps=cfg.accum_steps, sizes=sizes)
    stream = StudentStream(data_cfg, caches[0] if caches else None, tuple(caches[1:]))
    return StudentLoader(stream, cfg.workers, pin)

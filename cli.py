"""The `mrmae` command line: parses options and calls into the packages, nothing more."""

from __future__ import annotations

import json
import logging
import sys
import warnings

import click

from mrmae import __version__
from mrmae.train.recipe import config_option


class _OneLineErrors(click.Group):
    """Known failures (bad input, mismatched cache, unknown teacher, a full disk or read-only
    path, the same raised in a DataLoader worker) end as one line, exit 1."""

    def invoke(self, ctx: click.Context):
        from mrmae.shared.shards import ShardReadError
        from mrmae.extract.runner import SkippedSampleError
        from mrmae.shared.cache_format import CacheError
        from mrmae.shared.errors import OptionError, one_line
        from mrmae.shared.teachers import TeacherError
        from mrmae.train.checkpoint import CheckpointError
        from mrmae.train.engine import NonFiniteLossError
        from mrmae.train.evaluate import EvalError
        from mrmae.train.export import ExportError
        from mrmae.train.finetune import FinetuneError

        try:
            return super().invoke(ctx)
        except click.exceptions.NoArgsIsHelpError:
            raise
        except KeyboardInterrupt as e:  # Ctrl-C: one line (where to resume from), not click's "Aborted!"
            click.echo(f"mrmae: interrupted{f': {e}' if str(e) else ''}", err=True)
            sys.exit(130)
        except click.UsageError as e:  # a bad option value or combination: one line, not usage + hint
            click.echo(f"mrmae: error: {e.format_message()}", err=True)
            sys.exit(e.exit_code)
        except (CacheError, TeacherError, ShardReadError, SkippedSampleError, OSError, NonFiniteLossError,
                OptionError, CheckpointError, EvalError, ExportError, FinetuneError) as e:
            # OSError: its path and reason (ENOSPC, EROFS, EACCES); a worker's error: its own message
            click.echo(f"mrmae: error: {one_line(e)}", err=True)
            sys.exit(1)


def _one_line(err: Exception) -> str:
    """A command's own error as one line (also when a DataLoader worker raised it)."""
    from mrmae.shared.errors import one_line

    return one_line(err)


class _Interrupted(KeyboardInterrupt):
    """Ctrl-C in a training run; the message says which checkpoint `--resume` continues from."""

    def __init__(self, out: str) -> None:
        from mrmae.train.checkpoint import CheckpointError, latest_checkpoint

        try:
            last = latest_checkpoint(out)
        except (CheckpointError, OSError):
            last = None
        super().__init__(f"the last checkpoint is {last}; rerun the same command with --resume to continue"
                         if last else f"no checkpoint in {out} yet")


def _warnings_one_line() -> None:
    warnings.formatwarning = lambda msg, cat, *a, **k: f"mrmae: warning: {msg}\n"
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")


@click.group(cls=_OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mrmae")
def cli() -> None:
    """MR-MAE pretraining with an offline, exactly replayable teacher-feature cache."""
    _warnings_one_line()


@cli.command("make-demo-shards")
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--num-images", default=64, show_default=True, help="Samples in all.")
@click.option("--shard-size", default=16, show_default=True, help="Samples per tar.")
@click.option("--seed", default=0, show_default=True)
def make_demo_shards(out_dir: str, num_images: int, shard_size: int, seed: int) -> None:
    """Write ImageNet-style WebDataset tars ({key}.jpg, {key}.cls) from bundled photographs."""
    from mrmae.demo import write_demo_shards

    paths = write_demo_shards(out_dir, num_images, shard_size, seed)
    click.echo(f"wrote {len(paths)} shards, {num_images} images: {paths[0]} .. {paths[-1]}")


def _blocks(param: click.Parameter, text: str) -> tuple[int, ...]:
    """A comma-separated list of 1-based block numbers ("4,8,12"); BadParameter names the option."""
    try:
        blocks = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise click.BadParameter(f"{text!r}: give block numbers, e.g. 4,8,12", param=param) from None
    if any(b < 1 for b in blocks):
        raise click.BadParameter(f"{text!r}: blocks are numbered from 1", param=param)
    return blocks


class _MaskChoice(click.Choice):
    """--mask: the registered masking strategies (train/masks/), listed at first use rather
    than at import, so that `mrmae --help` does not import torch and every strategy."""

    def __init__(self) -> None:
        self._names: tuple[str, ...] | None = None
        super().__init__(())

    @property
    def choices(self) -> tuple[str, ...]:
        if self._names is None:
            from mrmae.train.masking import mask_names

            self._names = tuple(mask_names())
        return self._names

    @choices.setter
    def choices(self, _value) -> None:  # click.Choice.__init__ assigns (); the registry decides
        pass


def _mask_options(param: click.Parameter, values: tuple[str, ...]) -> dict[str, float]:
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


def _device(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """A torch device this machine has (cpu, cuda, cuda:N, mps), or BadParameter naming the option."""
    import torch

    try:
        device = torch.device(value)
    except RuntimeError:
        raise click.BadParameter(f"{value!r} is not a torch device (cpu, cuda, cuda:0, ...)", param=param) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise click.BadParameter(f"{value!r}: this machine has no CUDA device", param=param)
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise click.BadParameter(f"{value!r}: this machine has {torch.cuda.device_count()} CUDA devices", param=param)
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise click.BadParameter(f"{value!r}: MPS is not available here", param=param)
    return value


def _number(low: float, high: float = float("inf"), low_open: bool = False):
    """A click callback: the float option's value must be finite and in [low, high] ((low,
    high] with `low_open`); NaN passes click's FloatRange and every comparison."""
    import math

    def check(ctx: click.Context, param: click.Parameter, value):
        if value is not None and (not math.isfinite(value) or not low <= value <= high or (low_open and value == low)):
            where = f"above {low:g}" if low_open else f"at least {low:g}"
            raise click.BadParameter(f"{value}: must be a finite number {where}"
                                     + (f" and at most {high:g}" if high != float("inf") else ""), param=param)
        return value
    return check


@cli.command("extract-features")
@click.option("--shards", help="Input tars: a webdataset URL list or brace range (with --add-teacher: default "
              "the cache's own).")
@click.option("--out", required=True, help="Cache directory, or an fsspec URL (s3://bucket/cache, file://...).")
@click.option("--teacher", help="clip:ARCH[@WEIGHTS] or dino:TIMM_NAME[@WEIGHTS].")
@click.option("--add-teacher", help="Add this teacher's targets to the existing cache --out, for exactly its views.")
@click.option("--name", "target", help="With --add-teacher: the targets' name (default from the spec, e.g. clip-ViT-B-16).")
@click.option("--views", "num_views", type=click.IntRange(min=1), default=2, show_default=True, help="Views per image.")
@click.option("--dtype", type=click.Choice(["int8", "float16"]), default="int8", show_default=True)
@click.option("--int8-group", type=click.IntRange(min=0), default=64, show_default=True,
              help="int8: one scale per this many channels of a token (0: one per token). Smaller groups keep a "
                   "few large channels from coarsening the whole token, at 2 bytes per group.")
@click.option("--format", "cache_format", type=click.Choice(["zarr", "wds"]), default="zarr", show_default=True,
              help="zarr: a Zarr v3 store; wds: one WebDataset tar per input shard.")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True, help="Views per teacher batch.")
@click.option("--seed", default=0, show_default=True, help="Global view seed.")
@click.option("--device", default="cpu", show_default=True, callback=_device)
@click.option("--workers", type=click.IntRange(min=0), default=0, show_default=True,
              help="DataLoader workers that decode (and render, without --render-on-device).")
@click.option("--image-size", type=click.IntRange(min=1), default=224, show_default=True,
              help="The student's input size (recorded).")
@click.option("--store-pixels", type=click.Choice(["zstd", "png", "webp", "jpeg"]), default=None,
              help="Also store each view at --image-size (zstd: raw, lossless, fastest to decode; png, webp: "
                   "lossless, smaller; jpeg: quality 95, lossy), so pretrain --pixels-from-cache reads the cache alone.")
@click.option("--pca", "pca_rank", type=click.IntRange(min=1), default=None,
              help="Store K PCA coefficients per token instead of the teacher's C channels (K <= C); the basis is "
                   "fitted before the first shard and stored in the cache (--dtype applies to the coefficients).")
@click.option("--pca-fit-views", type=click.IntRange(min=1), default=None,
              help="With --pca: fit the basis on the first N views in input order.  [default: 2048]")
@click.option("--decode-on-device", is_flag=True,
              help="Decode JPEGs (nvjpeg on CUDA) and render views on --device; workers only read headers. "
                   "Training then needs --store-pixels / --pixels-from-cache (other decoder than PIL).")
@click.option("--render-on-device/--no-render-on-device", default=None,
              help="Workers only decode (PIL) and --device renders the views, pixel for pixel as the workers "
                   "would: the same cache.  [default: on when --device is CUDA]")
@click.option("--strict", is_flag=True, help="Stop at an undecodable image instead of skipping it.")
@click.option("--no-progress", is_flag=True)
def extract_features(shards, out, teacher, add_teacher, target, num_views, dtype, int8_group, cache_format, batch_size, seed,
                     device, workers, image_size, store_pixels, decode_on_device, render_on_device, pca_rank,
                     pca_fit_views, strict, no_progress) -> None:
    """Run TEACHER once over --views augmented views of each image and cache its targets.

    With --add-teacher SPEC instead, run SPEC over the views already in the cache --out (its
    crops and flips, its backend; no new views are drawn) and store the targets under
    OUT/targets/NAME, for `mrmae pretrain --target NAME`.
    """
    from mrmae.extract.runner import ExtractConfig, run_extraction
    from mrmae.shared import cache_format as cf
    from mrmae.shared.views import ViewConfig

    if bool(teacher) == bool(add_teacher):
        raise click.UsageError("give --teacher (a new cache) or --add-teacher (another teacher for a cache's views)")
    if not shards and not add_teacher:
        raise click.UsageError("--shards is required with --teacher")
    if pca_fit_views is not None and pca_rank is None:
        raise click.UsageError("--pca-fit-views goes with --pca")
    if target is not None and not add_teacher:
        raise click.UsageError("--name goes with --add-teacher")
    if target == "main":  # (pretrain's --target main is the teacher that drew the views: this one could never be chosen)
        raise click.UsageError("--name main: 'main' is what --target calls the teacher that drew the views; give another")
    where = cf.target_root(out, target or cf.target_name(add_teacher)) if add_teacher else out
    cfg = ExtractConfig(
        shards=shards or [], out=where, teacher=teacher or add_teacher, dtype=dtype, int8_group=int8_group or None,
        format=cache_format,
        batch_size=batch_size, device=device, workers=workers,
        strict=strict, views=ViewConfig(per_image=num_views, seed=seed, output_size=image_size),
        progress=not no_progress, views_from=out if add_teacher else None, store_pixels=store_pixels,
        decode_on_device=decode_on_device, render_on_device=render_on_device,
        pca=pca_rank, **({"pca_fit_views": pca_fit_views} if pca_fit_views is not None else {}),
    )
    s = run_extraction(cfg)
    rank = f"rank {s['rank']}/{s['world_size']}: " if s["world_size"] > 1 else ""  # each rank did its own shards
    click.echo(f"{rank}{s['extracted']} shards extracted, {s['skipped_complete']} already complete, "
               f"{s['views']} views, {s['samples_skipped']} samples skipped, {s['seconds']} s -> {where}")


@cli.command("pretrain")
@config_option
@click.option("--shards", required=True, help="Source tars (the ones the cache was extracted from).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run directory.")
@click.option("--feature-cache", help="Train from this cache (a directory or an fsspec URL).")
@click.option("--target", help="Which teacher of the cache to mimic: main (default, the one that drew the views) or "
              "a name from extract-features --add-teacher; several, comma-separated, train jointly (a head each).")
@click.option("--teacher", help="Live teacher spec instead of a cache (clip:... / dino:...).")
@click.option("--model", default="mrmae_vit_base_patch16", show_default=True, help="See `mrmae models`.")
@click.option("--epochs", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True,
              help="Per process and micro-batch.")
@click.option("--accum-steps", type=click.IntRange(min=1), default=None,
              help="Gradient accumulation (default 1, or what --effective-batch asks).")
@click.option("--effective-batch", type=click.IntRange(min=1), default=None,
              help="Images per optimiser step (the paper's 1024): --accum-steps = N / (--batch-size x processes).")
@click.option("--blr", default=1.5e-4, show_default=True, help="lr = blr x effective batch / 256.")
@click.option("--lr", type=float, default=None, help="Absolute lr (overrides --blr).")
@click.option("--min-lr", default=0.0, show_default=True)
@click.option("--warmup-epochs", default=0.0, show_default=True)
@click.option("--weight-decay", default=0.05, show_default=True)
@click.option("--mask", type=_MaskChoice(), default="random", show_default=True,
              help="Masking strategy (train/masks/): random (MAE's), focused (by the teacher's attention), ...")
@click.option("--mask-ratio", type=click.FloatRange(0, 1, max_open=True), default=0.75, show_default=True)
@click.option("--focus-temperature", default=1.0, show_default=True, help="Focused masking: attention ** (1/T).")
@click.option("--focus-uniform-mix", default=0.0, show_default=True, help="Focused masking: share of uniform weight.")
@click.option("--mask-option", "mask_option", multiple=True, metavar="NAME=VALUE",
              callback=lambda ctx, p, v: _mask_options(p, v),
              help="An option of the --mask strategy (see its file in train/masks/); repeatable.")
@click.option("--recon-weight", default=0.5, show_default=True)
@click.option("--mimic-weight", default=0.5, show_default=True)
@click.option("--target-norm", type=click.Choice(["none", "layernorm", "l2"]), default="none", show_default=True)
@click.option("--fuse-layers", default="", callback=lambda ctx, p, v: _blocks(p, v),
              help="Encoder blocks whose visible tokens are summed, e.g. 4,8,12.")
@click.option("--decoder-dim", type=click.IntRange(min=1), default=512, show_default=True)
@click.option("--decoder-depth", type=click.IntRange(min=0), default=8, show_default=True)
@click.option("--views", "views_per_image", type=click.IntRange(min=1), default=2, show_default=True,
              help="Live/plain modes: views per image.")
@click.option("--workers", type=click.IntRange(min=0), default=4, show_default=True)
@click.option("--shuffle-buffer", type=click.IntRange(min=0), default=1000, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--data-split", type=click.Choice(["shards", "samples"]), default="shards", show_default=True,
              help="shards: each process reads its own shards; samples: every process reads all shards and "
                   "keeps its slots, so global batches are the same at any process count.")
@click.option("--resume", is_flag=True, help="Continue from OUT/checkpoints/latest.")
@click.option("--save-every-steps", type=click.IntRange(min=0), default=0, show_default=True,
              help="0: at each epoch's end only.")
@click.option("--pixels-from-cache", is_flag=True,
              help="Read each view's pixels from the cache (extracted with --store-pixels), not from the tars.")
@click.option("--render-on-device/--no-render-on-device", default=None,
              help="Loader workers read, decode and fetch targets; the training device renders the views, pixel "
                   "for pixel as the workers would (the same batches and losses). Default: on with CUDA, off on "
                   "CPU. Nothing to render with --pixels-from-cache.")
@click.option("--compile", "compile_backend", type=click.Choice(["inductor", "eager", "aot_eager"]), default=None,
              help="torch.compile the student (inductor: the fast one; a GPU gains most).")
@click.option("--no-progress", is_flag=True)
def pretrain(no_progress, **params) -> None:
    """Train MR-MAE from a feature cache, with a live teacher, or as plain MAE (neither)."""
    from mrmae.train.pretrain import run_pretrain

    cfg = pretrain_config(progress=not no_progress, **params)
    try:
        r = run_pretrain(cfg)
    except KeyboardInterrupt:
        raise _Interrupted(cfg.out) from None
    if r["main_process"]:  # one summary per run, not one per process
        click.echo(f"{r['steps']} steps; checkpoint: {r['checkpoint']}; metrics: {r['metrics']}")


def pretrain_config(progress: bool = True, **params):
    """The PretrainConfig of `mrmae pretrain`'s parsed options (click's parameter names, as
    in `ctx.params`, less --no-progress)."""
    from mrmae.train.engine import StepOptions
    from mrmae.train.pretrain import PretrainConfig

    from mrmae.shared.errors import OptionError
    from mrmae.train.masking import get_mask

    step = {k: params.pop(k) for k in ("mask", "mask_ratio", "recon_weight", "mimic_weight", "target_norm")}
    given = {k: params.pop(k) for k in ("focus_temperature", "focus_uniform_mix")}  # focused's, by their own flags
    for name, value in (params.pop("mask_option", None) or {}).items():
        if name in given:  # focused's options have flags of their own
            raise OptionError(f"--mask-option {name}: give it as --{name.replace('_', '-')}")
        given[name] = value
    # recorded whole in config.json: the strategy's defaults too, as this version has them
    step["mask_options"] = {**get_mask(step["mask"]).resolve(given), **given}
    compile_backend = params.pop("compile_backend")
    return PretrainConfig(**params, compile=compile_backend, progress=progress,
                          step_options=StepOptions(**step, seed=params["seed"]))


@cli.command("models")
def models() -> None:
    """List the student architectures and their parameter counts."""
    from mrmae.train.models import describe_models

    for row in describe_models():
        click.echo(row)


@cli.group()
def cache() -> None:
    """Inspect and check a feature cache."""


@cache.command("info")
@click.argument("cache_dir")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def cache_info(cache_dir: str, as_json: bool) -> None:
    """Teacher, views, shards complete/total, views stored, bytes, compression."""
    from mrmae.extract.verify import cache_info as info

    d = info(cache_dir)
    if as_json:
        click.echo(json.dumps(d, indent=1))
        return
    width = max(map(len, d))
    for k, v in d.items():
        click.echo(f"{k:<{width}}  {v}")


@cache.command("verify")
@click.argument("cache_dir")
@click.option("--recompute", default=8, show_default=True, help="Random views to re-render and rerun.")
@click.option("--seed", default=0, show_default=True)
@click.option("--device", default="cpu", show_default=True, callback=_device)
@click.option("--sources", is_flag=True, help="Also re-hash every input shard (finds shards changed since).")
@click.option("--repair", is_flag=True, help="Mark each damaged shard incomplete (its entry and bytes removed), so "
              "the next extract-features with the same --shards redoes just those shards.")
@click.option("--shards", help="Where to read the source tars (matched to the cache's shards by URL, else file name); "
              "default: as recorded, which is refused where a recorded source is a pipe: command.")
def cache_verify(cache_dir: str, recompute: int, seed: int, device: str, sources: bool, repair: bool,
                 shards: str | None) -> None:
    """Check stored groups against their sha256, then re-render N cached views from source and
    rerun the teacher; exit 2 on damage (repaired or not) or past tolerance (--recompute 0:
    integrity only)."""
    from mrmae.extract.verify import duplicate_keys, verify_cache

    r = verify_cache(cache_dir, recompute, seed, device, sources, repair=repair, shards=shards)
    dups = duplicate_keys(cache_dir) if not r.problems else {}
    if dups:  # not damage, but usually the same images twice in the input
        key = sorted(dups)[0]
        click.echo(f"mrmae: warning: {len(dups)} keys appear in more than one shard (e.g. {key} in "
                   f"{', '.join(dups[key])})", err=True)
    for line in r.problems:
        click.echo(f"mrmae: damaged: {line}", err=True)
    for group in r.repaired:
        click.echo(f"mrmae: repaired: {group}: marked incomplete; rerun extract-features with the same --shards "
                   "to redo it", err=True)
    click.echo(f"integrity: {'OK' if not r.problems else f'{len(r.problems)} problems'}"
               + (f", {len(r.repaired)} shards marked incomplete" if r.repaired else ""))
    if r.checked:
        what = "coefficient cosine" if r.pca_rank else "token cosine"
        click.echo(f"checked {r.checked} views: worst {what} {r.worst_cosine:.6f} (mean {r.mean_cosine:.6f}, "
                   f"floor {r.tolerance}), worst attention error {r.worst_attention_error:.2e}: "
                   + ("OK" if r.ok else "FAILED"))
        if r.pca_rank:  # lossy by construction: measured and shown; the line above judged the coefficients
            click.echo(f"PCA rank {r.pca_rank}: reconstruction (coefficients @ basis + mean) vs the live teacher: "
                       f"worst token cosine {r.reconstruction_worst_cosine:.6f} "
                       f"(mean {r.reconstruction_mean_cosine:.6f}; the live features' own projection: "
                       f"worst {r.projection_worst_cosine:.6f})")
    if not r.ok:
        sys.exit(2)


@cache.command("clean")
@click.argument("cache_dir")
@click.option("--older-than", "older_than", type=click.FloatRange(min=0), default=24.0, show_default=True,
              help="Hours since a leftover was last written (0: all; only when no writer runs).")
@click.option("--dry-run", is_flag=True, help="List what would be removed, remove nothing.")
def cache_clean(cache_dir: str, older_than: float, dry_run: bool) -> None:
    """Remove temporaries of killed writers and groups no shard entry points to.

    Writers never remove another writer's temporary (it may be live, on another machine),
    so leftovers of killed runs stay until this command removes them."""
    from mrmae.shared.cache_format import clean_cache

    removed = clean_cache(cache_dir, older_than, dry_run)
    for path in removed:
        click.echo(f"{'would remove' if dry_run else 'removed'} {path}")
    click.echo(f"{len(removed)} leftovers {'found' if dry_run else 'removed'} (older than {older_than:g} h)")


# --- export, visualize, eval: thin wrappers over train/export.py, visualize.py, evaluate.py ---


@cli.command("export")
@click.option("--checkpoint", required=True, type=click.Path(exists=True),
              help="A pretrain run dir (latest checkpoint), a checkpoint dir or its model.safetensors.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Output .safetensors file.")
def export(checkpoint: str, out: str) -> None:
    """Write the student's encoder as a timm model's weights (mrmae_vit_* / mrmae_convvit_*, no head).

    `import mrmae` registers those models with timm; the printed call loads the file strictly."""
    from mrmae.train.export import export_encoder

    e = export_encoder(checkpoint, out)
    if e.encoder.note:
        click.echo(f"mrmae: note: {e.encoder.note}", err=True)
    click.echo(f"wrote {e.num_tensors} tensors -> {e.path}")
    click.echo(f"timm model: {e.encoder.timm_model}")
    click.echo(f"preprocessing: mean {e.pretrained_cfg['mean']}, std {e.pretrained_cfg['std']}, "
               f"{e.pretrained_cfg['interpolation']}, crop_pct {e.pretrained_cfg['crop_pct']}")
    click.echo(f"load with: import mrmae, timm; model = {e.create_call()}")


@cli.command("finetune")
@config_option
@click.option("--checkpoint", required=True, type=click.Path(exists=True),
              help="A pretrain run dir, a checkpoint dir, its model.safetensors, or an `mrmae export` file.")
@click.option("--train-shards", required=True, help="Labelled training tars ({key}.jpg + {key}.cls).")
@click.option("--val-shards", required=True, help="Labelled validation tars (top-1/top-5 after each epoch).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run directory.")
@click.option("--num-classes", type=click.IntRange(min=1), default=1000, show_default=True)
@click.option("--epochs", type=click.IntRange(min=1), default=100, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True,
              help="Per process and micro-batch.")
@click.option("--accum-steps", type=click.IntRange(min=1), default=None,
              help="Gradient accumulation (default 1, or what --effective-batch asks).")
@click.option("--effective-batch", type=click.IntRange(min=1), default=None,
              help="Images per optimiser step (the paper's 1024): --accum-steps = N / (--batch-size x processes).")
@click.option("--blr", default=3e-4, show_default=True, help="lr = blr x effective batch / 256.")
@click.option("--lr", type=float, default=None, help="Absolute peak lr (overrides --blr).")
@click.option("--min-lr", default=1e-6, show_default=True)
@click.option("--warmup-epochs", default=5.0, show_default=True)
@click.option("--weight-decay", default=0.05, show_default=True)
@click.option("--layer-decay", default=0.6, show_default=True, help="Layer-wise lr decay.")
@click.option("--drop-path", default=0.2, show_default=True)
@click.option("--global-pool", type=click.Choice(["avg", "token"]), default="avg", show_default=True,
              help="avg: mean patch token + new fc_norm (MAE); token: the normed [CLS] token.")
@click.option("--mixup", default=0.8, show_default=True, help="Mixup alpha (0: off).")
@click.option("--cutmix", default=1.0, show_default=True, help="CutMix alpha (0: off).")
@click.option("--mixup-prob", default=1.0, show_default=True)
@click.option("--mixup-switch-prob", default=0.5, show_default=True, help="Chance of CutMix when both are on.")
@click.option("--smoothing", default=0.1, show_default=True, help="Label smoothing.")
@click.option("--augment", type=click.Choice(["randaug", "light"]), default="randaug", show_default=True,
              help="randaug: RandAugment + random erasing (MAE); light: crop and flip only.")
@click.option("--rand-augment", default="rand-m9-mstd0.5-inc1", show_default=True)
@click.option("--re-prob", default=0.25, show_default=True, help="Random erasing probability.")
@click.option("--eval-batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--workers", type=click.IntRange(min=0), default=4, show_default=True)
@click.option("--shuffle-buffer", type=click.IntRange(min=0), default=1000, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--resume", is_flag=True, help="Continue from OUT/checkpoints/latest.")
@click.option("--save-every-steps", type=click.IntRange(min=0), default=0, show_default=True, help="0: at each epoch's end only.")
@click.option("--no-progress", is_flag=True)
def finetune(no_progress, **kwargs) -> None:
    """Fine-tune the pretrained encoder as a timm ViT classifier (MAE's recipe); top-1/top-5 per epoch."""
    from mrmae.train.export import ExportError
    from mrmae.train.finetune import FinetuneConfig, FinetuneError, run_finetune

    try:
        r = run_finetune(FinetuneConfig(**kwargs, progress=not no_progress))
    except KeyboardInterrupt:
        raise _Interrupted(kwargs["out"]) from None
    except (ExportError, FinetuneError) as err:
        click.echo(f"mrmae: error: {_one_line(err)}", err=True)
        sys.exit(1)
    if r["main_process"]:
        click.echo(r["table"])
        click.echo(f"{r['steps']} steps; checkpoint: {r['checkpoint']}; metrics: {r['metrics']}")


@cli.command("visualize")
@click.option("--feature-cache", required=True, help="The cache (a directory or an fsspec URL).")
@click.option("--shards", required=True, help="Source tars the cache was extracted from.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Output PNG.")
@click.option("--checkpoint", type=click.Path(exists=True), help="Add the student's reconstruction column.")
@click.option("--num", type=click.IntRange(min=1), default=4, show_default=True, help="Samples (rows).")
@click.option("--view", "view_index", type=click.IntRange(min=0), default=0, show_default=True,
              help="Which cached view of each sample.")
@click.option("--mask-ratio", type=click.FloatRange(0, 1, max_open=True), default=None,
              help="Default: the run's, else 0.75.")
@click.option("--seed", default=0, show_default=True, help="Seed of the mask draws.")
def visualize(feature_cache, shards, out, checkpoint, num, view_index, mask_ratio, seed) -> None:
    """PNG grid per sample: view, teacher [CLS] attention, a mask per masking strategy, [reconstruction]."""
    from mrmae.train.visualize import render_grid

    click.echo(str(render_grid(feature_cache, shards, out, checkpoint, num, view_index, mask_ratio, seed)))


@cli.command("report")
@click.argument("runs", nargs=-1, required=True)
@click.option("--out", required=True, help="Directory for report.md, report.csv and curves.png (created).")
def report(runs: tuple[str, ...], out: str) -> None:
    """One table row per RUN (model, mask, fusion, targets, weights, final losses, eval results) and their loss curves."""
    from mrmae.train.report import ReportConfig, run_report

    written = run_report(ReportConfig(runs=runs, out=out))
    click.echo(written.markdown.read_text())
    click.echo(f"wrote {written.markdown}, {written.csv}, {written.curves}")


@cli.group("eval")
def eval_group() -> None:
    """Frozen-encoder evaluation: kNN and linear probe on labelled shards ({key}.cls)."""


def _eval_options(f, ensemble: bool = False):
    options = [
        click.option("--checkpoint", "checkpoint", required=True, type=click.Path(exists=True), multiple=ensemble,
                     help="A pretrain run dir, a checkpoint dir, its model.safetensors or an `mrmae export` file"
                          + (" (once per member: --checkpoint A --checkpoint B)." if ensemble else ".")),
        click.option("--train-shards", required=True, help="Labelled training tars (webdataset URL list)."),
        click.option("--val-shards", required=True, help="Labelled validation tars."),
        click.option("--feature", type=click.Choice(["auto", "cls", "mean"]), default="auto", show_default=True,
                     help="[CLS] token or mean of the patch tokens (auto: cls where there is one, else mean)."),
        click.option("--fused", is_flag=True,
                     help="Probe the student's fused pretraining latent (--fuse-layers sum, a ConvViT's stage-1/2 "
                          "maps) instead of the encoder (last block, final norm); needs a pretrain checkpoint."),
        click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True,
                     help="Images per encoder batch."),
        click.option("--device", default="cpu", show_default=True, callback=_device),
        click.option("--workers", type=click.IntRange(min=0), default=0, show_default=True),
        click.option("--results", type=click.Path(dir_okay=False),
                     help="JSON lines file to append to (default: RUN/eval.jsonl, else beside the checkpoint)."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _run_eval(protocol: str, checkpoint: str, results: str | None, fused: bool, **kwargs) -> None:
    from pathlib import Path

    from mrmae.train.evaluate import load_frozen, run_eval

    frozen = load_frozen(checkpoint, fused)
    if results is None:
        results = str((frozen.run_dir or frozen.weights.parent) / "eval.jsonl")
    r = run_eval(protocol, frozen, results=results, **kwargs)
    click.echo(r.table())
    click.echo(f"appended to {Path(results)}")


@eval_group.command("knn")
@_eval_options
@click.option("--k", type=click.IntRange(min=1), default=20, show_default=True, help="Neighbours.")
@click.option("--temperature", default=0.07, show_default=True, callback=_number(0, low_open=True),
              help="Vote weight exp(cosine / T).")
def eval_knn(checkpoint, results, **kwargs) -> None:
    """Weighted k-nearest-neighbour classification (cosine, DINO's voting)."""
    _run_eval("knn", checkpoint, results, **kwargs)


@eval_group.command("linear-probe")
@_eval_options
@click.option("--epochs", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--lr", default=0.1, show_default=True, callback=_number(0, low_open=True),
              help="SGD lr (momentum 0.9, cosine decay).")
@click.option("--probe-batch-size", type=click.IntRange(min=1), default=256, show_default=True,
              help="Features per probe step.")
@click.option("--seed", default=0, show_default=True)
def eval_linear_probe(checkpoint, results, **kwargs) -> None:
    """BatchNorm (no affine) + linear classifier on frozen features."""
    _run_eval("linear-probe", checkpoint, results, **kwargs)


@eval_group.command("ensemble")
@(lambda f: _eval_options(f, ensemble=True))
@click.option("--protocol", type=click.Choice(["knn", "linear-probe"]), default="knn", show_default=True)
@click.option("--k", type=click.IntRange(min=1), default=20, show_default=True, help="kNN: neighbours.")
@click.option("--temperature", default=0.07, show_default=True, callback=_number(0, low_open=True),
              help="kNN: vote weight exp(cosine / T).")
@click.option("--epochs", type=click.IntRange(min=1), default=10, show_default=True, help="Linear probe epochs.")
@click.option("--lr", default=0.1, show_default=True, callback=_number(0, low_open=True), help="Linear probe SGD lr.")
@click.option("--probe-batch-size", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--seed", default=0, show_default=True)
def eval_ensemble(checkpoint, results, protocol, fused, **kwargs) -> None:
    """Average the class probabilities of separately pretrained models (the paper's "Sep." row)."""
    from mrmae.train.evaluate import load_frozen, run_ensemble

    if len(checkpoint) < 2:
        raise click.UsageError("an ensemble needs two or more --checkpoint")
    members = [load_frozen(c, fused) for c in checkpoint]
    results = results or str((members[0].run_dir or members[0].weights.parent) / "eval.jsonl")
    r = run_ensemble(protocol, members, results=results, **kwargs)
    for m in r.record["members"]:
        click.echo(f"member {m['checkpoint']}: top1 {m['top1']:.2f}")
    click.echo(r.table())
    click.echo(f"appended to {results}")


def main(argv: list[str] | None = None) -> None:
    """Entry point; `main(argv)` is callable from tests."""
    cli.main(args=argv, prog_name="mrmae")

"""The `mrmae` command line: parses options and calls into the packages, nothing more."""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from pathlib import Path

import click

from mrmae.cli_help import Command, Group, no_progress_option, renamed_argument, workers_option
from mrmae.shared.options import RegistryChoice, click_field, click_options, config_from, device
from mrmae.train.config import PretrainConfig, checkpoint_format, mask_options_callback, pretrain_config
from mrmae.train.downstream.config import EvalLabels, FinetuneConfig
from mrmae.train.run.recipe import config_option

DEMO_SHARDS = '"demo/shards/demo-{000000..000002}.tar"'  # the examples' data: `mrmae make-demo-shards`


class _OneLineErrors(Group):
    """Known failures (bad input, mismatched cache, unknown teacher, a full disk or read-only
    path, the same raised in a DataLoader worker) end as one line: exit 2 for a usage error
    (bad options, each on its own line), 1 for data and runtime errors. They are all
    MrmaeErrors or OSErrors, so nothing but shared/errors.py is imported to catch them."""

    def main(self, args=None, *rest, **kwargs):
        from mrmae.shared.provenance import record_command

        record_command(list(sys.argv[1:] if args is None else args))  # config.json's provenance.argv
        return super().main(args, *rest, **kwargs)

    def invoke(self, ctx: click.Context):
        from mrmae.shared.errors import MrmaeError, one_line

        try:
            return super().invoke(ctx)
        except click.exceptions.NoArgsIsHelpError:
            raise
        except KeyboardInterrupt as e:  # Ctrl-C: one line (where to resume from), not click's "Aborted!"
            click.echo(f"mrmae: interrupted{f': {e}' if str(e) else ''}", err=True)
            _exit(130)
        except click.UsageError as e:  # bad option values or combinations: a line each, not usage + hint
            for line in getattr(e, "lines", None) or [e.format_message()]:
                click.echo(f"mrmae: error: {line}", err=True)
            _exit(e.exit_code)
        except MrmaeError as e:  # exit 2 for options (OptionError), 1 for data and runtime errors
            for line in e.lines:
                click.echo(f"mrmae: error: {line}", err=True)
            _exit(e.exit_code)
        except OSError as e:  # its path and reason (ENOSPC, EROFS, EACCES); a worker's error: its own message
            click.echo(f"mrmae: error: {one_line(e)}", err=True)
            _exit(1)


def _exit(code: int) -> None:
    """Exit after the error's own line. Reads still in flight (a Zarr shard's blocks read
    ahead on zarr's event loop) are abandoned with the process; asyncio would log each as
    "Task was destroyed but it is pending!" at shutdown, lines that say nothing of the error."""
    logging.getLogger("asyncio").disabled = True
    sys.exit(code)


class _Interrupted(KeyboardInterrupt):
    """Ctrl-C in a training run; the message says which checkpoint `--resume` continues from."""

    def __init__(self, out: str) -> None:
        from mrmae.train.run.checkpoint import CheckpointError, latest_checkpoint

        try:
            last = latest_checkpoint(out)
        except (CheckpointError, OSError):
            last = None
        super().__init__(f"the last checkpoint is {last}; rerun the same command with --resume to continue"
                         if last else f"no checkpoint in {out} yet")


def _version(ctx: click.Context, value: bool) -> None:
    if value and not ctx.resilient_parsing:
        from mrmae.shared.provenance import version_line

        click.echo(version_line())
        ctx.exit()


def _warnings_one_line() -> None:
    warnings.formatwarning = lambda msg, cat, *a, **k: f"mrmae: warning: {msg}\n"
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")


@click.group(cls=_OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]},
             example=f"mrmae extract-features --shards {DEMO_SHARDS} --feature-cache demo/cache --teacher clip:ViT-S-16")
@click.option("--version", is_flag=True, expose_value=False, is_eager=True, callback=lambda c, p, v: _version(c, v),
              help="Print the version (and, in a git checkout, the revision) and exit.")
def cli() -> None:
    """MR-MAE pretraining with an offline, exactly replayable teacher-feature cache.

    The cache is --feature-cache, data tars are --shards (--val-shards beside them), --out
    is a directory; `mrmae COMMAND --help` lists a command's options by section."""
    _warnings_one_line()


@cli.command("make-demo-shards", renamed={"out_dir": "--out"},
             example="mrmae make-demo-shards --out demo/shards --num-images 48 --shard-size 16")
@click.argument("out_dir", required=False, type=click.Path(file_okay=False))
@click.option("--out", type=click.Path(file_okay=False), help="Directory for the tars (created).")
@click.option("--num-images", type=click.IntRange(min=1), default=64, show_default=True, help="Samples in all.")
@click.option("--shard-size", type=click.IntRange(min=1), default=16, show_default=True, help="Samples per tar.")
@click.option("--seed", default=0, show_default=True, help="The same seed writes byte-identical tars.")
def make_demo_shards(out_dir: str | None, out: str | None, num_images: int, shard_size: int, seed: int) -> None:
    """Write ImageNet-style WebDataset tars ({key}.jpg, {key}.cls) from bundled photographs."""
    from mrmae.demo import write_demo_shards

    out = renamed_argument("OUT_DIR", "--out", out_dir, out)
    if "://" in out:  # the tars are written locally; an object store gets them by an upload
        raise click.UsageError(f"--out {out}: a local directory (write there, then upload, e.g. "
                               "`aws s3 cp --recursive DIR s3://bucket/shards/`)")
    paths = write_demo_shards(out, num_images, shard_size, seed, sizes=True)
    click.echo(f"wrote {len(paths)} shards, {num_images} images: {paths[0]} .. {paths[-1]} (their sizes in "
               f"{paths[0].parent / 'sizes.json'})")


@cli.group("shards", example='mrmae shards index --shards "demo/shards/demo-{000000..000002}.tar"')
def shards_group() -> None:
    """Input tars: record their sizes."""


@shards_group.command("index", example='mrmae shards index --shards "demo/shards/demo-{000000..000002}.tar"')
@click.option("--shards", required=True,
              help="Tars to count: a webdataset URL list or brace range (local paths or fsspec URLs).")
def shards_index(shards: str) -> None:
    """Count each tar's samples once and write them beside the tars, in the sizes.json of
    their directory (webdataset's convention; counts of other shards there are kept), so that
    plain and live pretraining know an epoch's length without reading every tar."""
    from mrmae.shared.shard_sizes import index_shards
    from mrmae.shared.shards import expand_urls

    for path, counts in index_shards(expand_urls(shards)).items():
        click.echo(f"{path}: {len(counts)} shards, {sum(counts.values())} samples")


def device_option(what: str):
    """`--device` of a command that runs one model on one device (`shared.options.device`)."""
    return click_field("device", device(what))


def _out_dir(filename: str):
    """A click callback: `--out` names a directory, into which the command writes `filename`;
    a path ending like that file is refused in one line (it was a file path once)."""
    def check(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
        if value is not None and Path(value).suffix.lower() == Path(filename).suffix:
            where = Path(value).parent
            raise click.BadParameter(f"{value}: --out is a directory, into which this command writes {filename} "
                                     f"(e.g. --out {where} writes {where / filename})", param=param)
        return value
    return check


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


def _cache_backends() -> list[str]:
    """--format's choices: the registered cache backends (built in, and plug-ins)."""
    from mrmae.shared.cache_format import backend_names

    return backend_names()


@cli.command("extract-features", renamed={"--out": "--feature-cache"},
             sections={"seed": "Data", "batch_size": "Performance", "target": "Teacher"},
             example=(f"mrmae extract-features --shards {DEMO_SHARDS} --feature-cache demo/cache \\\n"
                      "      --teacher clip:ViT-S-16 --views 2 --batch-size 16",
                      "mrmae extract-features --feature-cache demo/cache --add-teacher dino:vit_tiny_patch16_224 "
                      "--name dino-tiny"))
@click.option("--shards", help="Input tars: a webdataset URL list or brace range (with --add-teacher: default "
              "the cache's own).")
@click.option("--feature-cache", "--out", "out", required=True,
              help="The cache to write: a directory or an fsspec URL (s3://bucket/cache, file://...); with "
                   "--add-teacher, the cache whose views the added teacher sees.")
@click.option("--teacher", help="clip:ARCH[@WEIGHTS] or dino:TIMM_NAME[@WEIGHTS].")
@click.option("--add-teacher", help="Add this teacher's targets to the existing --feature-cache, for exactly its views.")
@click.option("--name", "target", help="With --add-teacher: the targets' name (default from the spec, e.g. clip-ViT-B-16).")
@click.option("--views", "num_views", type=click.IntRange(min=1), default=2, show_default=True, help="Views per image.")
@click.option("--dtype", type=click.Choice(["int8", "float16"]), default="int8", show_default=True,
              help="How tokens are stored: int8 with a float16 scale per --int8-group channels, or float16.")
@click.option("--int8-group", type=click.IntRange(min=0), default=64, show_default=True,
              help="int8: one scale per this many channels of a token (0: one per token). Smaller groups keep a "
                   "few large channels from coarsening the whole token, at 2 bytes per group.")
@click.option("--format", "cache_format", type=RegistryChoice(_cache_backends), default="zarr",
              show_default=True, help="The cache backend: zarr, a Zarr v3 store; wds, one WebDataset tar per input "
                                      "shard; or one a plug-in registers (`mrmae.backends`).")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True, help="Views per teacher batch.")
@click.option("--seed", default=0, show_default=True, help="Global view seed.")
@device_option("the teacher")
@workers_option("Processes that decode (and render, without --render-on-device) the images.")
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
@no_progress_option
def extract_features(shards, out, teacher, add_teacher, target, num_views, dtype, int8_group, cache_format, batch_size, seed,
                     device, workers, image_size, store_pixels, decode_on_device, render_on_device, pca_rank,
                     pca_fit_views, strict, no_progress) -> None:
    """Run TEACHER once over --views augmented views of each image and cache its targets.

    With --add-teacher SPEC instead, run SPEC over the views already in the --feature-cache
    (its crops and flips, its backend; no new views are drawn) and store the targets under
    CACHE/targets/NAME, for `mrmae pretrain --target NAME`.
    """
    from mrmae.extract.config import ExtractConfig
    from mrmae.extract.runner import run_extraction
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


@cli.command("save-teacher", example="mrmae save-teacher --teacher dino:vit_tiny_patch16_224 --out demo/weights")
@click.option("--teacher", required=True, help="clip:ARCH@TAG (open_clip) or dino:TIMM_NAME@TAG (timm): weights to fetch "
              "from the hub (where one is reachable) and keep as a local file.")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Directory for KIND-ARCH-TAG.safetensors (created; an existing file is refused).")
def save_teacher(teacher: str, out: str) -> None:
    """Write a teacher's weights to a local safetensors file and print the spec that loads it.

    Run it where a model hub is reachable, with a tag (clip:ViT-B-16-quickgelu@openai,
    dino:vit_base_patch16_224@dino); then give the printed spec to extract-features,
    pretrain --teacher or cache verify anywhere, offline included (README "Teacher weights").
    Without a tag it keeps random weights (the example: runnable offline, for tests)."""
    from mrmae.shared.teachers.base import build_teacher, save_weights

    path, spec = save_weights(build_teacher(teacher), out)
    click.echo(f"wrote {path}")
    click.echo(f"use: --teacher {spec}")


_CHECKPOINT_FORMAT = click_field("checkpoint_format", checkpoint_format())


class _PretrainCommand(Command):
    """`mrmae pretrain`: its options are PretrainConfig's (train/config.py), and each masking
    strategy's options that its registration gives a flag of their own (`MaskOption.flag`),
    added when the command is first parsed or shown, so that `mrmae --help` imports no
    strategy (nor torch)."""

    def get_params(self, ctx: click.Context) -> list[click.Parameter]:
        if not getattr(self, "_mask_flags", None):
            from mrmae.train.masking import flagged_mask_options

            self._mask_flags = [click.Option([o.flag, o.name], type=float, default=o.default, show_default=True,
                                             help=o.help) for o in flagged_mask_options()]
            at = next(i for i, p in enumerate(self.params) if p.name == "mask_option")
            self.params[at:at] = self._mask_flags
        return super().get_params(ctx)


@cli.command("pretrain", cls=_PretrainCommand, sections={"target": "Teacher"},
             example=(f"mrmae pretrain --shards {DEMO_SHARDS} --feature-cache demo/cache \\\n"
                      "      --model mrmae_vit_tiny_patch16 --mask focused --epochs 2 --batch-size 16 --out demo/run-focused",
                      f"mrmae pretrain --config table3-row3-focused --shards {DEMO_SHARDS} --feature-cache demo/cache "
                      "\\\n      --model mrmae_vit_tiny_patch16 --epochs 1 --effective-batch 16 --batch-size 8 "
                      "--out demo/row3"))
@config_option
@click_options(PretrainConfig)
@click.option("--mask-option", "mask_option", multiple=True, metavar="NAME=VALUE", callback=mask_options_callback,
              help="An option of the --mask strategy (see its file in train/masks/); repeatable.")
def pretrain(**params) -> None:
    """Train MR-MAE from a feature cache, with a live teacher, or as plain MAE (neither)."""
    from mrmae.train.pretrain import run_pretrain
    from mrmae.train.run.loop import summary

    _fit_warmup(params)
    cfg = pretrain_config(params)
    try:
        r = run_pretrain(cfg)
    except KeyboardInterrupt:
        raise _Interrupted(cfg.out) from None
    if r["main_process"]:  # one summary per run, not one per process
        for line in summary(r):
            click.echo(line)


def _fit_warmup(params: dict) -> None:
    """A --warmup-epochs not given on the command line (the default, or a --config file's)
    that a short run cannot fit is shortened, with one note (`loop.fit_warmup`); one given
    there is checked as given."""
    from click.core import ParameterSource

    from mrmae.train.run.loop import fit_warmup

    ctx = click.get_current_context()
    source = ctx.get_parameter_source("warmup_epochs")
    if source not in (ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP):
        return
    recipe = ctx.default_map or {}
    written_for = recipe.get("epochs") if source == ParameterSource.DEFAULT_MAP and "epochs" in recipe else \
        next(p.default for p in ctx.command.params if p.name == "epochs")
    params["warmup_epochs"], note = fit_warmup(params["warmup_epochs"], params["epochs"], int(written_for))
    if note and os.environ.get("RANK", "0") == "0":
        click.echo(f"mrmae: note: {note}", err=True)


@cli.command("models", example="mrmae models")
def models() -> None:
    """List the student architectures and their parameter counts."""
    from mrmae.train.models import describe_models

    for row in describe_models():
        click.echo(row)


@cli.command("recipes", example="mrmae recipes")
def recipes() -> None:
    """List the recipes mrmae ships (the paper's runs and its ablation rows), for --config NAME."""
    from mrmae.train.run.recipe import list_recipes, recipes_folder

    rows = list_recipes()
    width = max(len(name) for name, _ in rows)
    for name, what in rows:
        click.echo(f"{name:<{width}}  {what}")
    click.echo(f"({recipes_folder()}; run one with `mrmae pretrain --config NAME ...`, its first lines say how)")


@cli.group(example="mrmae cache info --feature-cache demo/cache")
def cache() -> None:
    """Inspect, check and tidy a feature cache."""


def _cache_option(f):
    """`--feature-cache` of the cache commands, which once took the cache as a positional argument."""
    f = click.option("--feature-cache", help="The cache: a directory or an fsspec URL.")(f)
    return click.argument("cache_dir", required=False)(f)


def _the_cache(cache_dir: str | None, feature_cache: str | None) -> str:
    return renamed_argument("CACHE", "--feature-cache", cache_dir, feature_cache)


@cache.command("info", renamed={"cache_dir": "--feature-cache"},
               example="mrmae cache info --feature-cache demo/cache")
@_cache_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def cache_info(cache_dir: str | None, feature_cache: str | None, as_json: bool) -> None:
    """Teacher, views, shards complete/total, views stored, bytes, compression."""
    from mrmae.shared.cache_format.info import cache_info as info

    d = info(_the_cache(cache_dir, feature_cache))
    if as_json:
        click.echo(json.dumps(d, indent=1))
        return
    width = max(map(len, d))
    for k, v in d.items():
        click.echo(f"{k:<{width}}  {v}")


@cache.command("verify", renamed={"cache_dir": "--feature-cache"}, sections={"seed": "Output and run"},
               example="mrmae cache verify --feature-cache demo/cache --recompute 4")
@_cache_option
@click.option("--recompute", default=8, show_default=True,
              help="Random views to re-render and rerun the teacher on (0: the stored bytes' integrity only).")
@click.option("--seed", default=0, show_default=True, help="Seed of the views picked.")
@device_option("the teacher")
@click.option("--sources", is_flag=True, help="Also re-hash every input shard (finds shards changed since).")
@click.option("--repair", is_flag=True, help="Mark each damaged shard incomplete (its entry and bytes removed), so "
              "the next extract-features with the same --shards redoes just those shards.")
@click.option("--shards", help="Where to read the source tars (matched to the cache's shards by URL, else file name); "
              "default: as recorded, which is refused where a recorded source is a pipe: command.")
@no_progress_option
def cache_verify(cache_dir: str | None, feature_cache: str | None, recompute: int, seed: int, device: str,
                 sources: bool, repair: bool, shards: str | None, no_progress: bool) -> None:
    """Check stored groups against their sha256, then re-render N cached views from source and
    rerun the teacher; exit 1 on damage (repaired or not) or past tolerance (--recompute 0:
    integrity only)."""
    from mrmae.extract.verify import duplicate_keys, verify_cache

    cache_dir = _the_cache(cache_dir, feature_cache)
    r = verify_cache(cache_dir, recompute, seed, device, sources, repair=repair, shards=shards,
                     progress=not no_progress)
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
    if not r.ok:  # damaged data: 1, as every data error (2 is for usage)
        sys.exit(1)


@cache.command("clean", renamed={"cache_dir": "--feature-cache"},
               example="mrmae cache clean --feature-cache demo/cache --older-than 0 --dry-run")
@_cache_option
@click.option("--older-than", "older_than", type=click.FloatRange(min=0), default=24.0, show_default=True,
              help="Hours since a leftover was last written (0: all; only when no writer runs).")
@click.option("--dry-run", is_flag=True, help="List what would be removed, remove nothing.")
def cache_clean(cache_dir: str | None, feature_cache: str | None, older_than: float, dry_run: bool) -> None:
    """Remove temporaries of killed writers and groups no shard entry points to.

    Writers never remove another writer's temporary (it may be live, on another machine),
    so leftovers of killed runs stay until this command removes them."""
    from mrmae.shared.cache_format import clean_cache

    removed = clean_cache(_the_cache(cache_dir, feature_cache), older_than, dry_run)
    for path in removed:
        click.echo(f"{'would remove' if dry_run else 'removed'} {path}")
    click.echo(f"{len(removed)} leftovers {'found' if dry_run else 'removed'} (older than {older_than:g} h)")


# --- export, visualize, eval: thin wrappers over train/downstream/export.py, visualize.py, evaluate.py ---


@cli.command("export", example="mrmae export --checkpoint demo/run --out demo/encoder")
@click.option("--checkpoint", required=True, type=click.Path(exists=True),
              help="A pretrain or finetune run dir (latest checkpoint), a checkpoint dir, its model.safetensors, or "
                   "MAE's / ConvMAE's .pth.")
@_CHECKPOINT_FORMAT
@click.option("--out", required=True, type=click.Path(file_okay=False), callback=_out_dir("model.safetensors"),
              help="Directory for config.json + model.safetensors, the hub's layout (created).")
@click.option("--overwrite", is_flag=True, help="--out holds an export: rename it to OUT.old-DATE-TIME (never deleted) "
              "and write anew. Without this, such an --out is refused.")
@click.option("--push-to-hub", metavar="REPO", help="Also upload the folder to this Hugging Face Hub repository "
              "(huggingface_hub; the token from HF_TOKEN or `hf auth login`).")
def export(checkpoint: str, checkpoint_format: str, out: str, overwrite: bool, push_to_hub: str | None) -> None:
    """Write the encoder (a fine-tuned run's classifier with its head) in the hub's layout for timm.

    A ViT goes under timm's own name (timm alone loads it), a ConvViT under its mrmae_* name
    (`import mrmae` registers it); `timm.create_model("local-dir:OUT", pretrained=True)` loads either."""
    from mrmae.train.downstream.export import export_encoder
    from mrmae.train.downstream.hub import check_hub_reachable, push_folder

    if push_to_hub:
        check_hub_reachable(push_to_hub)  # before anything is written
    e = export_encoder(checkpoint, out, checkpoint_format, overwrite)
    if e.encoder.note:
        click.echo(f"mrmae: note: {e.encoder.note}", err=True)
    click.echo(f"wrote {e.num_tensors} tensors -> {e.folder} (config.json, model.safetensors)")
    head = f", head of {e.encoder.num_classes} classes" if e.encoder.num_classes else ", no head"
    click.echo(f"timm model: {e.encoder.timm_model}{head}")
    click.echo(f"preprocessing: mean {e.pretrained_cfg['mean']}, std {e.pretrained_cfg['std']}, "
               f"{e.pretrained_cfg['interpolation']}, crop_pct {e.pretrained_cfg['crop_pct']}")
    imports = "import mrmae, timm" if e.needs_mrmae else "import timm"
    click.echo(f"load with: {imports}; model = {e.local_dir_call()}")
    click.echo(f"or the file: {imports}; model = {e.file_call()}")
    if push_to_hub:
        click.echo(f"pushed to {push_folder(e.folder, push_to_hub)}")


@cli.command("finetune", renamed={"--train-shards": "--shards"},
             sections={"checkpoint": "Model", "eval_batch_size": "Performance"},
             example=("mrmae finetune --checkpoint demo/run --shards \"demo/shards/demo-{000000..000001}.tar\" "
                      "--val-shards demo/shards/demo-000002.tar \\\n"
                      "      --num-classes 14 --epochs 2 --batch-size 8 --out demo/finetune",
                      "mrmae finetune --config paper-finetune-convvit-base --checkpoint demo/run --shards "
                      "\"demo/shards/demo-{000000..000001}.tar\" \\\n      --val-shards demo/shards/demo-000002.tar "
                      "--num-classes 14 --epochs 1 --effective-batch 16 --batch-size 8 --out demo/finetune-paper"))
@config_option
@click_options(FinetuneConfig)
def finetune(**params) -> None:
    """Fine-tune the pretrained encoder as a timm ViT classifier (MAE's recipe); top-1/top-5 per epoch."""
    from mrmae.train.downstream.finetune import run_finetune
    from mrmae.train.run.loop import summary

    _fit_warmup(params)
    cfg = config_from(FinetuneConfig, params)
    try:
        r = run_finetune(cfg)
    except KeyboardInterrupt:
        raise _Interrupted(cfg.out) from None
    if r["main_process"]:
        click.echo(r["table"])
        for line in r["summary"]:
            click.echo(line)
        for line in summary(r):
            click.echo(line)


@cli.command("visualize", sections={"checkpoint": "Model"},
             example="mrmae visualize --feature-cache demo/cache --shards demo/shards/demo-000000.tar "
                     "--checkpoint demo/run --out demo/run")
@click.option("--feature-cache", required=True, help="The cache (a directory or an fsspec URL).")
@click.option("--shards", required=True, help="Source tars the cache was extracted from.")
@click.option("--out", required=True, type=click.Path(file_okay=False), callback=_out_dir("views.png"),
              help="Directory for views.png (created).")
@click.option("--checkpoint", type=click.Path(exists=True), help="Add the student's reconstruction column (a pretrain "
              "run or checkpoint, or MAE's / ConvMAE's pretraining .pth).")
@_CHECKPOINT_FORMAT
@click.option("--num", type=click.IntRange(min=1), default=4, show_default=True, help="Samples (rows).")
@click.option("--view", "view_index", type=click.IntRange(min=0), default=0, show_default=True,
              help="Which cached view of each sample.")
@click.option("--mask-ratio", type=click.FloatRange(0, 1, max_open=True), default=None,
              help="Default: the run's, else 0.75.")
@click.option("--seed", default=0, show_default=True, help="Seed of the mask draws.")
@device_option("the student")
@no_progress_option
def visualize(feature_cache, shards, out, checkpoint, checkpoint_format, num, view_index, mask_ratio, seed, device,
              no_progress) -> None:
    """PNG grid per sample: view, teacher [CLS] attention, a mask per masking strategy, [reconstruction]."""
    from mrmae.train.downstream.visualize import render_grid

    click.echo(str(render_grid(feature_cache, shards, Path(out) / "views.png", checkpoint, num, view_index,
                               mask_ratio, seed, device=device, progress=not no_progress,
                               checkpoint_format=checkpoint_format)))


@cli.command("report", example="mrmae report demo/run demo/run-focused demo/finetune --out demo/report")
@click.argument("runs", nargs=-1, required=True)
@click.option("--out", required=True, help="Directory for report.md, report.csv and curves.png (created).")
def report(runs: tuple[str, ...], out: str) -> None:
    """One table row per RUN (model, mask, fusion, targets, weights, final losses, eval results) and their loss curves."""
    from mrmae.train.downstream.report import ReportConfig, run_report

    written = run_report(ReportConfig(runs=runs, out=out))
    click.echo(written.markdown.read_text())
    click.echo(f"wrote {written.markdown}, {written.csv}, {written.curves}")


@cli.group("eval", example="mrmae eval knn --checkpoint demo/run --shards \"demo/shards/demo-{000000..000001}.tar\" "
                           "--val-shards demo/shards/demo-000002.tar")
def eval_group() -> None:
    """Frozen-encoder evaluation: kNN and linear probe on labelled shards ({key}.cls)."""


# eval's own meaning of these names: the probe's, not a training run's
_EVAL_SECTIONS = {"batch_size": "Performance", "epochs": "Protocol", "lr": "Protocol", "seed": "Protocol"}
_EVAL_DATA = "--shards \"demo/shards/demo-{000000..000001}.tar\" --val-shards demo/shards/demo-000002.tar"


def _eval_options(f, ensemble: bool = False):
    options = [
        click.option("--checkpoint", "checkpoint", required=True, type=click.Path(exists=True), multiple=ensemble,
                     help="A pretrain run dir, a checkpoint dir, its model.safetensors or an `mrmae export` directory "
                          "or file, or MAE's / ConvMAE's .pth" + (" (once per member: --checkpoint A --checkpoint B)."
                                                                  if ensemble else ".")),
        _CHECKPOINT_FORMAT,
        click.option("--shards", "--train-shards", "train_shards", required=True,
                     help="Labelled training tars (webdataset URL list)."),
        click.option("--val-shards", required=True, help="Labelled validation tars."),
        click_options(EvalLabels),
        click.option("--feature", type=click.Choice(["auto", "cls", "mean"]), default="auto", show_default=True,
                     help="[CLS] token or mean of the patch tokens (auto: cls where there is one, else mean)."),
        click.option("--fused", is_flag=True,
                     help="Probe the student's fused pretraining latent (--fuse-layers sum, a ConvViT's stage-1/2 "
                          "maps) instead of the encoder (last block, final norm); needs a pretrain checkpoint."),
        click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True,
                     help="Images per encoder batch."),
        device_option("the encoder"),
        workers_option("Processes that read and decode the images."),
        click.option("--results", type=click.Path(dir_okay=False),
                     help="JSON lines file to append to (default: RUN/eval.jsonl, else beside the checkpoint)."),
        no_progress_option,
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _label_kwargs(kwargs: dict):
    """eval's label options out of `kwargs`, as a LabelOptions."""
    from mrmae.train.downstream.labels import LabelOptions

    return LabelOptions(kwargs.pop("label_format"), kwargs.pop("label_field"), kwargs.pop("class_map"),
                        kwargs.pop("skip_bad_labels"), kwargs.pop("num_classes"))


def _echo_eval(r, results: str, why: str = "") -> None:
    """The result table, a line per split (images used of those present, skips, classes), its
    notes, and where the record went (`why`: whose eval.jsonl that is, when not given)."""
    click.echo(r.table())
    for line in r.summary():
        click.echo(line)
    for note in r.notes:
        click.echo(f"mrmae: note: {note}", err=True)
    click.echo(f"appended to {Path(results)}" + (f" ({why})" if why else ""))


def _run_eval(protocol: str, checkpoint: str, results: str | None, fused: bool, no_progress: bool,
              checkpoint_format: str = "auto", **kwargs) -> None:
    from mrmae.train.downstream.evaluate import load_frozen, results_path, run_eval

    labels = _label_kwargs(kwargs)
    frozen = load_frozen(checkpoint, fused, checkpoint_format)
    why = ""
    if results is None:
        path, why = results_path(frozen, checkpoint)
        results = str(path)
    _echo_eval(run_eval(protocol, frozen, results=results, progress=not no_progress, labels=labels, **kwargs),
               results, why)


@eval_group.command("knn", renamed={"--train-shards": "--shards"}, sections=_EVAL_SECTIONS,
                    example=f"mrmae eval knn --checkpoint demo/run {_EVAL_DATA} --k 10")
@_eval_options
@click.option("--k", type=click.IntRange(min=1), default=20, show_default=True, help="Neighbours.")
@click.option("--temperature", default=0.07, show_default=True, callback=_number(0, low_open=True),
              help="Vote weight exp(cosine / T).")
def eval_knn(checkpoint, results, **kwargs) -> None:
    """Weighted k-nearest-neighbour classification (cosine, DINO's voting)."""
    _run_eval("knn", checkpoint, results, **kwargs)


@eval_group.command("linear-probe", renamed={"--train-shards": "--shards"}, sections=_EVAL_SECTIONS,
                    example=f"mrmae eval linear-probe --checkpoint demo/run {_EVAL_DATA} --epochs 10")
@_eval_options
@click.option("--epochs", type=click.IntRange(min=1), default=10, show_default=True,
              help="Passes of the probe over the features.")
@click.option("--lr", default=0.1, show_default=True, callback=_number(0, low_open=True),
              help="SGD lr (momentum 0.9, cosine decay).")
@click.option("--probe-batch-size", type=click.IntRange(min=1), default=256, show_default=True,
              help="Features per probe step.")
@click.option("--seed", default=0, show_default=True, help="Seed of the probe's initialisation and batch order.")
def eval_linear_probe(checkpoint, results, **kwargs) -> None:
    """BatchNorm (no affine) + linear classifier on frozen features."""
    _run_eval("linear-probe", checkpoint, results, **kwargs)


@eval_group.command("ensemble", renamed={"--train-shards": "--shards"}, sections=_EVAL_SECTIONS,
                    example=f"mrmae eval ensemble --checkpoint demo/run --checkpoint demo/run-focused {_EVAL_DATA}")
@(lambda f: _eval_options(f, ensemble=True))
@click.option("--protocol", type=click.Choice(["knn", "linear-probe"]), default="knn", show_default=True,
              help="How each member predicts; their class probabilities are averaged.")
@click.option("--k", type=click.IntRange(min=1), default=20, show_default=True, help="kNN: neighbours.")
@click.option("--temperature", default=0.07, show_default=True, callback=_number(0, low_open=True),
              help="kNN: vote weight exp(cosine / T).")
@click.option("--epochs", type=click.IntRange(min=1), default=10, show_default=True, help="Linear probe epochs.")
@click.option("--lr", default=0.1, show_default=True, callback=_number(0, low_open=True), help="Linear probe SGD lr.")
@click.option("--probe-batch-size", type=click.IntRange(min=1), default=256, show_default=True,
              help="Linear probe: features per step.")
@click.option("--seed", default=0, show_default=True, help="Linear probe: seed of the initialisation and batch order.")
def eval_ensemble(checkpoint, results, protocol, fused, no_progress, checkpoint_format, **kwargs) -> None:
    """Average the class probabilities of separately pretrained models (the paper's "Sep." row)."""
    from mrmae.train.downstream.evaluate import load_frozen, results_path, run_ensemble

    if len(checkpoint) < 2:
        raise click.UsageError("an ensemble needs two or more --checkpoint")
    labels = _label_kwargs(kwargs)
    members = [load_frozen(c, fused, checkpoint_format) for c in checkpoint]
    results = results or str(results_path(members[0], checkpoint[0])[0])  # the first member's run
    _echo_eval(run_ensemble(protocol, members, results=results, progress=not no_progress, labels=labels, **kwargs),
               results)


def main(argv: list[str] | None = None) -> None:
    """Entry point; `main(argv)` is callable from tests."""
    cli.main(args=argv, prog_name="mrmae")

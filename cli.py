"""The `mrmae` command line: parses options and calls into the packages, nothing more."""

from __future__ import annotations

import json
import logging
import sys
import warnings

import click

from mrmae import __version__


class _OneLineErrors(click.Group):
    """Known failures (bad input, mismatched cache, unknown teacher) end as one line, exit 1."""

    def invoke(self, ctx: click.Context):
        from mrmae.extract.reader import ShardReadError
        from mrmae.extract.runner import SkippedSampleError
        from mrmae.shared.cache_format import CacheError
        from mrmae.shared.teachers import TeacherError

        try:
            return super().invoke(ctx)
        except (CacheError, TeacherError, ShardReadError, SkippedSampleError, FileNotFoundError) as e:
            click.echo(f"mrmae: error: {e}", err=True)
            sys.exit(1)


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


@cli.command("extract-features")
@click.option("--shards", required=True, help="Input tars: a webdataset URL list or brace range.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Cache directory (Zarr v3 store).")
@click.option("--teacher", required=True, help="clip:ARCH[@WEIGHTS] or dino:TIMM_NAME[@WEIGHTS].")
@click.option("--views", "num_views", default=2, show_default=True, help="Views per image.")
@click.option("--dtype", type=click.Choice(["int8", "float16"]), default="int8", show_default=True)
@click.option("--batch-size", default=64, show_default=True, help="Views per teacher batch.")
@click.option("--seed", default=0, show_default=True, help="Global view seed.")
@click.option("--device", default="cpu", show_default=True)
@click.option("--workers", default=0, show_default=True, help="DataLoader workers that decode and render.")
@click.option("--layers", default="", help="Extra teacher blocks to store, 1-based, e.g. 4,8.")
@click.option("--image-size", default=224, show_default=True, help="The student's input size (recorded).")
@click.option("--strict", is_flag=True, help="Stop at an undecodable image instead of skipping it.")
@click.option("--no-progress", is_flag=True)
def extract_features(shards, out, teacher, num_views, dtype, batch_size, seed, device, workers, layers,
                     image_size, strict, no_progress) -> None:
    """Run TEACHER once over --views augmented views of each image and cache its targets."""
    from mrmae.extract.runner import ExtractConfig, run_extraction
    from mrmae.shared.views import ViewConfig

    cfg = ExtractConfig(
        shards=shards, out=out, teacher=teacher, dtype=dtype, batch_size=batch_size, device=device,
        workers=workers, layers=tuple(int(x) for x in layers.split(",") if x), strict=strict,
        views=ViewConfig(per_image=num_views, seed=seed, output_size=image_size), progress=not no_progress,
    )
    s = run_extraction(cfg)
    click.echo(f"{s['extracted']} shards extracted, {s['skipped_complete']} already complete, "
               f"{s['views']} views, {s['samples_skipped']} samples skipped, {s['seconds']} s -> {out}")


@cli.group()
def cache() -> None:
    """Inspect and check a feature cache."""


@cache.command("info")
@click.argument("cache_dir", type=click.Path(exists=True, file_okay=False))
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
@click.argument("cache_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--recompute", default=8, show_default=True, help="Random views to re-render and rerun.")
@click.option("--seed", default=0, show_default=True)
@click.option("--device", default="cpu", show_default=True)
def cache_verify(cache_dir: str, recompute: int, seed: int, device: str) -> None:
    """Re-render N cached views from source, rerun the teacher; non-zero exit past tolerance."""
    from mrmae.extract.verify import verify_cache

    r = verify_cache(cache_dir, recompute, seed, device)
    click.echo(f"checked {r.checked} views: worst token cosine {r.worst_cosine:.6f} (mean {r.mean_cosine:.6f}, "
               f"floor {r.tolerance}), worst attention error {r.worst_attention_error:.2e}: "
               + ("OK" if r.ok else "FAILED"))
    if not r.ok:
        sys.exit(2)


def main(argv: list[str] | None = None) -> None:
    """Entry point; `main(argv)` is callable from tests."""
    cli.main(args=argv, prog_name="mrmae")

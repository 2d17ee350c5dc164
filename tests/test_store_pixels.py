"""--store-pixels: views stored in the cache, and a student that trains from the cache alone."""

from __future__ import annotations

from functools import partial

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
import conftest
from conftest import DINO_TINY

from mrmae.cli import cli
from mrmae.shared.shards import iter_samples
from mrmae.extract.config import ExtractConfig
from mrmae.extract.runner import run_extraction
from mrmae.shared import cache_format as cf
from mrmae.shared.views import View, ViewConfig, decode_image, decode_view, render_view_uint8

extract = partial(conftest.extract, seed=3, batch_size=6)

TINY = ["--model", "mrmae_vit_tiny_patch16", "--decoder-depth", "1", "--decoder-dim", "64", "--batch-size", "6", "--workers", "0",
        "--no-progress", "--seed", "3", "--lr", "1e-3", "--mask", "focused"]




@pytest.mark.parametrize("backend,codec", [("zarr", "png"), ("wds", "webp"), ("zarr", "jpeg"), ("wds", "zstd")])
def test_stored_views_are_the_rendered_views(demo_shards, tmp_path, backend, codec):
    extract(str(demo_shards[0]), tmp_path / "c", backend, store_pixels=codec)
    cache = cf.FeatureCache(tmp_path / "c")
    assert cache.manifest.storage.pixels == codec
    group = cache.shard(str(demo_shards[0]))
    crop, flip, _ = group.geometry()
    sources = {s.key: s.image for s in iter_samples(str(demo_shards[0]))}
    worst = 0
    for i, key in enumerate(group.keys):
        stored = decode_view(group.stored_pixels(i))
        replay = render_view_uint8(decode_image(sources[str(key)]), View(*map(int, crop[i]), flip=bool(flip[i])), 224)
        assert stored.shape == replay.shape == (3, 224, 224)
        worst = max(worst, int((stored.int() - replay.int()).abs().max()))
    if codec == "jpeg":  # lossy, but close: quality 95 without chroma subsampling
        assert 0 < worst < 64
    else:
        assert worst == 0  # lossless: exactly the pixels a replay renders


def test_training_from_the_cache_alone_equals_training_from_the_tars(demo_shards, tmp_path):
    copies = [str(shutil.copy(p, tmp_path / p.name)) for p in demo_shards]
    urls = "::".join(copies)
    extract(urls, tmp_path / "c", "zarr", store_pixels="zstd")
    # --render-on-device (here the CPU): the tars' run renders in the step; stored views need no render
    base = ["pretrain", "--shards", urls, "--feature-cache", str(tmp_path / "c"), *TINY, "--render-on-device"]
    r = CliRunner().invoke(cli, [*base, "--out", str(tmp_path / "tars")])
    assert r.exit_code == 0, r.output
    for c in copies:  # the tars are gone: only the cache can feed the next run
        Path(c).unlink()
    r = CliRunner().invoke(cli, [*base, "--pixels-from-cache", "--out", str(tmp_path / "cache-only")])
    assert r.exit_code == 0, r.output
    read = lambda run: [json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    a, b = read("tars"), read("cache-only")
    rendered = {run: json.loads((tmp_path / run / "config.json").read_text())["render_on_device"]
                for run in ("tars", "cache-only")}
    assert rendered == {"tars": True, "cache-only": False}
    assert len(a) == len(b) == 3
    for x, y in zip(a, b):
        for k in ("loss", "loss_recon", "loss_mimic"):
            assert x[k] == pytest.approx(y[k], rel=1e-6), (x["step"], k)


def test_a_cache_without_stored_views_is_refused_in_one_line(demo_shards, tmp_path):
    run_extraction(ExtractConfig(shards=str(demo_shards[0]), out=str(tmp_path / "c"), teacher=DINO_TINY,
                                 views=ViewConfig(per_image=2), progress=False))
    r = CliRunner().invoke(cli, ["pretrain", "--shards", str(demo_shards[0]), "--feature-cache", str(tmp_path / "c"),
                                 "--pixels-from-cache", "--out", str(tmp_path / "o"), *TINY])
    lines = [ln for ln in r.output.splitlines() if ln.startswith("mrmae: error")]
    assert r.exit_code == 1 and len(lines) == 1 and "extract with --store-pixels" in lines[0], r.output
    g = cf.FeatureCache(tmp_path / "c").shard(str(demo_shards[0]))
    with pytest.raises(cf.CacheError, match="stores no views"):
        g.stored_pixels(0)

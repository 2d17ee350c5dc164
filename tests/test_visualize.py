"""`mrmae visualize`: the PNG grid from a cache, its source shards and a short pretrain run."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import DINO_TINY
from PIL import Image

from mrmae.cli import cli
from mrmae.shared.shards import read_shard
from mrmae.extract.config import ExtractConfig
from mrmae.extract.runner import run_extraction
from mrmae.shared import cache_format as cf
from mrmae.shared.views import View, ViewConfig, decode_image, render_view_uint8
from mrmae.train.downstream.visualize import mask_columns

CELL, PAD, HEADER = 224, 8, 24  # the layout documented in train/downstream/visualize.py


@pytest.fixture(scope="module")
def run(demo_shards, tmp_path_factory):
    """A cache of the first demo shard and a 1-epoch focused-masking run trained from it."""
    root = tmp_path_factory.mktemp("vis")
    shard = str(demo_shards[0])
    with warnings.catch_warnings():  # the test teacher's random-weights warning
        warnings.filterwarnings("ignore", message=".*HAS RANDOM WEIGHTS.*")
        run_extraction(ExtractConfig(shards=shard, out=str(root / "cache"), teacher=DINO_TINY,
                                     views=ViewConfig(per_image=2, seed=3), batch_size=12, progress=False))
    r = CliRunner().invoke(cli, ["pretrain", "--shards", shard, "--feature-cache", str(root / "cache"),
                                 "--out", str(root / "run"), "--model", "mrmae_vit_tiny_patch16",
                                 "--decoder-depth", "1", "--decoder-dim", "64", "--batch-size", "6", "--workers", "0",
                                 "--no-progress", "--lr", "1e-3", "--mask", "focused"])
    assert r.exit_code == 0, r.output + repr(r.exception)
    return shard, root


def _visualize(args: list[str]) -> str:
    r = CliRunner().invoke(cli, ["visualize", *args])
    assert r.exit_code == 0, r.output + repr(r.exception)
    return r.stdout


def _cell(img: np.ndarray, row: int, col: int) -> np.ndarray:
    y, x = HEADER + row * (CELL + PAD), PAD + col * (CELL + PAD)
    return img[y:y + CELL, x:x + CELL].astype(int)


def _grey_patches(panel: np.ndarray) -> np.ndarray:
    """[14, 14] bool: patches that are all the mask grey."""
    p = panel.reshape(14, 16, 14, 16, 3).transpose(0, 2, 1, 3, 4).reshape(14, 14, -1)
    return (p == 110).all(-1)


def test_grid_with_reconstruction(run, tmp_path):
    shard, root = run
    out = tmp_path / "views.png"
    printed = _visualize(["--feature-cache", str(root / "cache"), "--shards", shard, "--out", str(tmp_path),
                          "--checkpoint", str(root / "run"), "--num", "3"])
    assert printed.strip() == str(out)
    with Image.open(out) as im:
        # view, attention, a mask per registered strategy (focused, random, then the others), reconstruction
        cols = 2 + len(mask_columns()) + 1
        assert im.format == "PNG" and im.size == (PAD + cols * (CELL + PAD), HEADER + 3 * (CELL + PAD))
        img = np.asarray(im.convert("RGB"))
    cache = cf.FeatureCache(root / "cache")
    samples = read_shard(shard)
    for row in range(3):
        view = _cell(img, row, 0)
        # column 1 is the cached view replayed from the source (the key label sits in its corner)
        t = cache.get(shard, samples[row].key, 0)
        replay = render_view_uint8(decode_image(samples[row].image), View(*t.crop, flip=t.flip), CELL)
        replay = replay.permute(1, 2, 0).numpy().astype(int)
        assert np.array_equal(view[40:], replay[40:])
        # focused and random masks hide 75% of the 196 patches, each a different draw
        focused, uniform = _grey_patches(_cell(img, row, 2)), _grey_patches(_cell(img, row, 3))
        assert focused.sum() == uniform.sum() == 147 and not np.array_equal(focused, uniform)
        assert all(_grey_patches(_cell(img, row, c)).sum() == 147 for c in range(4, cols - 1))  # any further strategy
        # the run trained with focused masks: the reconstruction shows the input where the focused
        # draw is visible and the decoder's prediction where it is masked
        recon = _cell(img, row, cols - 1).reshape(14, 16, 14, 16, 3).transpose(0, 2, 1, 3, 4)
        source = replay.reshape(14, 16, 14, 16, 3).transpose(0, 2, 1, 3, 4)
        diff = np.abs(recon - source).reshape(14, 14, -1).max(-1)
        assert (diff[~focused][1:] <= 1).all()  # (the first visible patch may hold part of the key label)
        assert (diff[focused] > 1).mean() > 0.9
        assert not np.array_equal(_cell(img, row, 1), view)  # the attention overlay changes the view


def test_grid_without_checkpoint_and_a_missing_shard(run, tmp_path):
    shard, root = run
    out = tmp_path / "sub" / "views.png"
    r = CliRunner().invoke(cli, ["visualize", "--feature-cache", str(root / "cache"), "--shards", shard,
                                 "--out", str(out.parent), "--num", "2"])
    assert r.exit_code == 0 and r.stdout.strip() == str(out), r.output
    bar = [ln for ln in r.stderr.replace("\r", "\n").splitlines() if ln.startswith("visualize:")]
    assert "0/2" in bar[0] and "100%" in bar[-1] and "2/2" in bar[-1], r.stderr  # a view replayed per row
    with Image.open(out) as im:
        im.verify()
        assert im.size == (PAD + (2 + len(mask_columns())) * (CELL + PAD), HEADER + 2 * (CELL + PAD))
    r = CliRunner().invoke(cli, ["visualize", "--feature-cache", str(root / "cache"), "--shards",
                                 str(tmp_path / "other-000.tar"), "--out", str(tmp_path / "x")])
    assert r.exit_code == 1 and "other-000.tar is not in the cache" in r.output, r.output
    for name in ("views.png", "fig.PNG"):  # --out was the picture's path once: one line says what it is now
        r = CliRunner().invoke(cli, ["visualize", "--feature-cache", str(root / "cache"), "--shards", shard,
                                     "--out", str(tmp_path / name)])
        assert r.exit_code == 2 and r.stderr.splitlines() == [
            f"mrmae: error: Invalid value for '--out': {tmp_path / name}: --out is a directory, into which this "
            f"command writes views.png (e.g. --out {tmp_path} writes {tmp_path / 'views.png'})"]
        assert not (tmp_path / name).exists()

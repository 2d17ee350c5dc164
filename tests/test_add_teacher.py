"""A second teacher added to a cache: the same views, byte for byte, and training from either."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import CLIP_SMALL, DINO_TINY, rows, url_list
from safetensors.torch import load_file

from mrmae.cli import cli
from mrmae.extract.config import ExtractConfig
from mrmae.extract.runner import run_extraction
from mrmae.shared import cache_format as cf
from mrmae.shared.views import ViewConfig

GEOMETRY = ("keys", "view", "crop", "flip")




@pytest.fixture(scope="module")
def two_teachers(demo_shards, tmp_path_factory):
    """A DINO cache with CLIP added, and CLIP extracted on its own with the same view seed."""
    tmp = tmp_path_factory.mktemp("add")
    urls = url_list(demo_shards[:2])
    cache = tmp / "cache"
    run_extraction(ExtractConfig(shards=urls, out=str(cache), teacher=DINO_TINY, views=ViewConfig(per_image=2, seed=5),
                                 batch_size=4, progress=False))
    r = CliRunner().invoke(cli, ["extract-features", "--feature-cache", str(cache), "--add-teacher", CLIP_SMALL,
                                 "--batch-size", "4", "--no-progress"])
    assert r.exit_code == 0, r.output
    alone = tmp / "clip-alone"
    run_extraction(ExtractConfig(shards=urls, out=str(alone), teacher=CLIP_SMALL, views=ViewConfig(per_image=2, seed=5),
                                 batch_size=4, progress=False))
    return cache, alone


def test_an_added_teacher_sees_exactly_the_cached_views(two_teachers):
    cache, alone = two_teachers
    assert cf.list_targets(cache) == ["clip-ViT-S-16"]
    dino, clip = cf.FeatureCache(cache), cf.FeatureCache(cache, "clip-ViT-S-16")
    assert clip.manifest.views == dino.manifest.views and clip.manifest.teacher.dim == 384
    d, c, a = rows(dino), rows(clip), rows(cf.FeatureCache(alone))
    assert d.keys() == c.keys() and len(c) == 2
    for src in d:
        for col in GEOMETRY:  # the same crops and flips, byte for byte
            assert d[src][col].tobytes() == c[src][col].tobytes(), col
        # Same views -> the same teacher input: the added targets equal CLIP extracted alone.
        for col in ("features", "attention", "cls"):
            np.testing.assert_array_equal(c[src][col], a[src][col])
        assert not np.array_equal(d[src]["attention"], c[src]["attention"])  # another teacher indeed


def test_adding_again_redoes_nothing_and_an_unknown_target_is_named(two_teachers):
    cache, _ = two_teachers
    r = CliRunner().invoke(cli, ["extract-features", "--feature-cache", str(cache), "--add-teacher", CLIP_SMALL, "--no-progress"])
    assert r.exit_code == 0 and "0 shards extracted, 2 already complete" in r.output, r.output
    with pytest.raises(cf.CacheError, match=r"no target 'dino-x' \(added teachers: clip-ViT-S-16\)"):
        cf.FeatureCache(cache, "dino-x")
    r = CliRunner().invoke(cli, ["extract-features", "--feature-cache", str(cache), "--add-teacher", CLIP_SMALL,
                                 "--teacher", DINO_TINY])
    assert r.exit_code != 0 and "give --teacher (a new cache) or --add-teacher" in r.output


def test_pretraining_from_either_target_of_one_cache_or_both_jointly(demo_shards, two_teachers, tmp_path):
    from mrmae.train.restore import load_student

    cache, _ = two_teachers
    base = ["pretrain", "--shards", url_list(demo_shards[:2]), "--feature-cache", str(cache),
            "--model", "mrmae_vit_tiny_patch16", "--decoder-dim", "64", "--decoder-depth", "1", "--batch-size", "4",
            "--workers", "0",
            "--epochs", "1", "--mask", "focused", "--no-progress"]
    heads = {}
    for target in ("clip-ViT-S-16", "main,clip-ViT-S-16"):  # the default (main) is every other test's
        out = tmp_path / target.replace(",", "+")
        r = CliRunner().invoke(cli, [*base, "--out", str(out), "--target", target])
        assert r.exit_code == 0, r.output
        latest = (out / "checkpoints" / "latest").read_text().strip()  # the pointer file names the step
        weights = load_file(str(out / "checkpoints" / latest / "model.safetensors"))
        joint = sorted(k for k in weights if k.startswith("joint_heads.") and k.endswith(".weight"))
        heads[target] = [weights[k].shape[0] for k in ["mimic_head.weight", *joint]]
        assert load_student(out).model.cfg.joint_teacher_dims == tuple(heads[target][1:])  # restores strictly
    # Each run mimicked its own teacher(s): DINO-tiny is 192 wide, CLIP ViT-S 384; joint: one head each.
    assert heads == {"clip-ViT-S-16": [384], "main,clip-ViT-S-16": [192, 384]}

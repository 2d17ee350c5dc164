"""Student data: cached and live modes show the same views; mismatches stop with one line."""

from __future__ import annotations

import io
import shutil
import tarfile
from collections import Counter

import numpy as np
import pytest
import torch
from conftest import DINO_TINY, url_list

from mrmae.extract.config import ExtractConfig
from mrmae.extract.runner import run_extraction
from mrmae.shared import cache_format as cf
from mrmae.shared.batch_render import render_exact
from mrmae.shared.views import View, ViewConfig
from mrmae.train.data import DataConfig, StudentStream, check_cache_fits, pick_view, render_views


@pytest.fixture(scope="module")
def tiny_cache(demo_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache") / "c"
    run_extraction(ExtractConfig(shards=url_list(demo_shards), out=str(out), teacher=DINO_TINY,
                                 views=ViewConfig(per_image=3, seed=7), batch_size=8, progress=False))
    return cf.FeatureCache(out)


def test_pick_view_is_a_function_of_seed_epoch_key():
    assert pick_view(0, 3, "k", 4) == pick_view(0, 3, "k", 4)
    assert Counter(pick_view(0, e, "k", 4) for e in range(400)).keys() == {0, 1, 2, 3}
    assert [pick_view(0, e, "k", 4) for e in range(20)] != [pick_view(1, e, "k", 4) for e in range(20)]


def _epoch(shards, cache, epoch, workers=0, **kw):
    ds = StudentStream(DataConfig(shards=shards, batch_size=4, seed=7, shuffle_buffer=8, **kw), cache)
    ds.set_epoch(epoch)
    return list(torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers))


def test_cached_and_live_modes_render_the_same_views(demo_shards, tiny_cache):
    urls = url_list(demo_shards)
    cached = _epoch(urls, tiny_cache, epoch=2)
    live = _epoch(urls, None, epoch=2, views_per_image=3, teacher_size=224)
    assert [b["keys"] for b in cached] == [b["keys"] for b in live]
    for c, lv in zip(cached, live):
        assert torch.equal(c["crop"], lv["crop"]) and torch.equal(c["flip"], lv["flip"])
        assert torch.equal(c["pixels"], lv["pixels"])
        assert c["targets"].shape[1:] == (196, 192) and "targets" not in lv and "teacher_pixels" in lv
    keys = [k for b in cached for k in b["keys"]]
    assert sorted(keys) == sorted(set(keys)) and len(keys) == 18  # each sample once per epoch
    # the stored targets are those of the shown view
    group = tiny_cache.shard(str(demo_shards[0]))
    b = cached[0]
    i = next(j for j, k in enumerate(b["keys"]) if k in set(group.keys))
    row = group.row(b["keys"][i], pick_view(7, 2, b["keys"][i], 3))
    assert b["targets"].dtype == torch.int8 and b["targets_scale"].dtype == torch.float16  # as stored
    dequantized = cf.dequantize(b["targets"][i].numpy(), b["targets_scale"][i].numpy())  # per group of channels
    np.testing.assert_array_equal(dequantized, group.read(slice(row, row + 1))["features"][0])


def test_epochs_differ_and_worker_count_keeps_the_samples(demo_shards, tiny_cache):
    urls = url_list(demo_shards)
    e0, e1 = _epoch(urls, tiny_cache, 0), _epoch(urls, tiny_cache, 1)
    assert [b["keys"] for b in e0] != [b["keys"] for b in e1]
    two = _epoch(urls, tiny_cache, 0, workers=2)
    assert sorted(k for b in two for k in b["keys"]) == sorted(k for b in e0 for k in b["keys"])
    again = _epoch(urls, tiny_cache, 0, workers=2)
    assert [b["keys"] for b in two] == [b["keys"] for b in again]  # deterministic for a worker count


def test_mismatched_cache_is_refused_naming_shard_and_key(demo_shards, tiny_cache, tmp_path):
    with pytest.raises(cf.CacheError, match="does not match the student's 16x16"):
        check_cache_fits(tiny_cache, [str(demo_shards[0])], 16, 192)
    with pytest.raises(cf.CacheError, match="teacher width 192 does not match the mimic head's 768"):
        check_cache_fits(tiny_cache, [str(demo_shards[0])], 14, 768)
    other = tmp_path / "other-000.tar"
    shutil.copy(demo_shards[0], other)
    with pytest.raises(cf.CacheError, match="other-000.tar is not in the cache"):
        check_cache_fits(tiny_cache, [str(other)], 14, 192)
    # a shard that gained a sample since extraction, under the same file name
    changed = tmp_path / demo_shards[0].name
    with tarfile.open(demo_shards[0]) as src, tarfile.open(changed, "w") as dst:
        for m in src.getmembers():
            dst.addfile(m, src.extractfile(m))
        intruder = tarfile.TarInfo("intruder_9.jpg")
        intruder.size = 30000  # larger than tar's 10 KiB record padding: the size changes
        dst.addfile(intruder, io.BytesIO(b"\xff\xd8" + bytes(29998)))
    with pytest.raises(cf.CacheError, match=rf"{changed}: shard changed since extraction"):
        check_cache_fits(tiny_cache, [str(changed)], 14, 192)
    with pytest.raises(cf.CacheError, match=rf"{changed.name}: key intruder_9 has no rows"):
        _epoch(str(changed), tiny_cache, 0)


def _unpacked(batch: dict) -> tuple[list[torch.Tensor], list[View]]:
    """A render_on_device batch's crops [3, h, w] and their views (the whole crop), by hand."""
    crops, offset = [], 0
    for h, w in batch["crop"][:, 2:].tolist():
        crops.append(batch["crop_pixels"][offset:offset + 3 * h * w].view(h, w, 3).permute(2, 0, 1))
        offset += 3 * h * w
    assert offset == len(batch["crop_pixels"])  # nothing else packed in
    return crops, [View(0, 0, c.shape[1], c.shape[2], flip=bool(f)) for c, f in zip(crops, batch["flip"])]


@pytest.mark.parametrize("mode", ["cached", "live", "plain"])
def test_render_on_device_gives_the_worker_batches_pixel_for_pixel(demo_shards, tiny_cache, mode):
    urls = url_list(demo_shards)
    cache, kw = (tiny_cache, {}) if mode == "cached" else (None, {"views_per_image": 3})
    kw["teacher_size"] = 112 if mode == "live" else 0  # a teacher size of its own: rendered from the same crop
    today = _epoch(urls, cache, 1, **kw)
    split = _epoch(urls, cache, 1, workers=1 if mode == "plain" else 0, render_on_device=True, **kw)
    assert len(today) == len(split) == 5  # 18 samples, batch 4
    for a, b in zip(today, split):
        assert "pixels" not in b and "teacher_pixels" not in b and b["crop_pixels"].dtype == torch.uint8
        rendered = render_views(b, "cpu", 224, kw["teacher_size"])
        assert rendered.keys() == a.keys() and rendered["keys"] == a["keys"]
        for k in a.keys() - {"keys"}:  # pixels, teacher pixels, crop, flip, targets, scales, attention
            assert torch.equal(rendered[k], a[k]), k
        crops, views = _unpacked(b)
        assert torch.equal(render_exact(crops, views, 224), a["pixels"])  # CUDA's renderer, run on the CPU
        if kw["teacher_size"]:
            assert torch.equal(render_exact(crops, views, 112), a["teacher_pixels"])
    assert render_views(today[0], "cpu", 224) is today[0]  # rendered in the workers: left as it is


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (runs where one is lent)")
def test_render_on_cuda_gives_the_worker_pixels(demo_shards):
    """What `mrmae pretrain` does on a GPU by default: the batch's views rendered on CUDA
    (batch_render's exact matmuls, not torchvision's float path) equal the workers' pixels."""
    urls = url_list(demo_shards)
    today = _epoch(urls, None, 0, views_per_image=3, teacher_size=112)
    split = _epoch(urls, None, 0, workers=1, views_per_image=3, render_on_device=True)
    for a, b in zip(today, split):
        rendered = render_views(b, "cuda", 224, 112)
        assert rendered["pixels"].device.type == "cuda"
        assert torch.equal(rendered["pixels"].cpu(), a["pixels"])
        assert torch.equal(rendered["teacher_pixels"].cpu(), a["teacher_pixels"])

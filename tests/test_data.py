"""Student data: cached and live modes show the same views; mismatches stop with one line."""

from __future__ import annotations

import io
import itertools
import shutil
import sys
import tarfile
from collections import Counter
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import DINO_TINY, url_list

from mrmae.extract.config import ExtractConfig
from mrmae.extract.runner import run_extraction
from mrmae.shared import cache_format as cf
from mrmae.shared.batch_render import render_exact
from mrmae.shared.views import View, ViewConfig
from mrmae.train.batch import Batch, Step
from mrmae.train.stream import DataConfig, StudentLoader, StudentStream, check_cache_fits, pick_view

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # (_latency_fs: a store with latency)


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
    assert all(isinstance(b, Batch) for b in cached + live)  # the dataclass through the DataLoader
    assert [b.keys for b in cached] == [b.keys for b in live]
    for c, lv in zip(cached, live):
        assert torch.equal(c.crop, lv.crop) and torch.equal(c.flip, lv.flip)
        assert c.crop.shape == (len(c), 4) and c.crop.dtype == torch.int64 and c.flip.dtype == torch.bool
        assert torch.equal(c.pixels, lv.pixels)
        assert [t.values.shape[1:] for t in c.targets] == [(196, 192)] and c.attention.shape == (len(c), 196)
        assert lv.targets == [] and lv.attention is None and lv.teacher_pixels is not None and c.teacher_pixels is None
    keys = [k for b in cached for k in b.keys]
    assert sorted(keys) == sorted(set(keys)) and len(keys) == 18  # each sample once per epoch
    # the stored targets are those of the shown view
    group = tiny_cache.shard(str(demo_shards[0]))
    b = cached[0]
    i = next(j for j, k in enumerate(b.keys) if k in set(group.keys))
    row = group.row(b.keys[i], pick_view(7, 2, b.keys[i], 3))
    (t,) = b.targets
    assert t.values.dtype == torch.int8 and t.scale.dtype == torch.float16  # as stored
    dequantized = cf.dequantize(t.values[i].numpy(), t.scale[i].numpy())  # per group of channels
    np.testing.assert_array_equal(dequantized, group.read(slice(row, row + 1))["features"][0])


def test_epochs_differ_and_worker_count_keeps_the_samples(demo_shards, tiny_cache):
    urls = url_list(demo_shards)
    e0, e1 = _epoch(urls, tiny_cache, 0), _epoch(urls, tiny_cache, 1)
    assert [b.keys for b in e0] != [b.keys for b in e1]
    two = _epoch(urls, tiny_cache, 0, workers=2)
    assert sorted(k for b in two for k in b.keys) == sorted(k for b in e0 for k in b.keys)
    again = _epoch(urls, tiny_cache, 0, workers=2)
    assert [b.keys for b in two] == [b.keys for b in again]  # deterministic for a worker count


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


def _tensors(batch: Batch) -> dict[str, torch.Tensor]:
    """Every tensor of a batch by name (each target set's values and scale numbered)."""
    out = {f.name: getattr(batch, f.name) for f in fields(batch) if torch.is_tensor(getattr(batch, f.name))}
    for j, t in enumerate(batch.targets):
        out.update({f"targets{j}": t.values, **({f"scale{j}": t.scale} if t.scale is not None else {})})
    return out


def _unpacked(batch: Batch) -> tuple[list[torch.Tensor], list[View]]:
    """A render_on_device batch's crops [3, h, w] and their views (the whole crop), by hand."""
    crops, offset = [], 0
    for h, w in batch.crop[:, 2:].tolist():
        crops.append(batch.crop_pixels[offset:offset + 3 * h * w].view(h, w, 3).permute(2, 0, 1))
        offset += 3 * h * w
    assert offset == len(batch.crop_pixels)  # nothing else packed in
    return crops, [View(0, 0, c.shape[1], c.shape[2], flip=bool(f)) for c, f in zip(crops, batch.flip)]


@pytest.mark.parametrize("mode", ["cached", "live", "plain"])
def test_render_on_device_gives_the_worker_batches_pixel_for_pixel(demo_shards, tiny_cache, mode):
    urls = url_list(demo_shards)
    cache, kw = (tiny_cache, {}) if mode == "cached" else (None, {"views_per_image": 3})
    kw["teacher_size"] = 112 if mode == "live" else 0  # a teacher size of its own: rendered from the same crop
    today = _epoch(urls, cache, 1, **kw)
    split = _epoch(urls, cache, 1, workers=1 if mode == "plain" else 0, render_on_device=True, **kw)
    assert len(today) == len(split) == 5  # 18 samples, batch 4
    for a, b in zip(today, split):
        assert b.pixels is None and b.teacher_pixels is None and b.crop_pixels.dtype == torch.uint8
        rendered = b.rendered("cpu", 224, kw["teacher_size"])
        assert rendered.crop_pixels is None and rendered.keys == a.keys
        got, want = _tensors(rendered), _tensors(a)
        assert got.keys() == want.keys()
        for k in want:  # pixels, teacher pixels, crop, flip, targets, scales, attention
            assert torch.equal(got[k], want[k]), k
        crops, views = _unpacked(b)
        assert torch.equal(render_exact(crops, views, 224), a.pixels)  # CUDA's renderer, run on the CPU
        if kw["teacher_size"]:
            assert torch.equal(render_exact(crops, views, 112), a.teacher_pixels)
    assert today[0].rendered("cpu", 224) is today[0]  # rendered in the workers: left as it is


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (runs where one is lent)")
def test_render_on_cuda_gives_the_worker_pixels(demo_shards):
    """What `mrmae pretrain` does on a GPU by default: the batch's views rendered on CUDA
    (batch_render's exact matmuls, not torchvision's float path) equal the workers' pixels."""
    urls = url_list(demo_shards)
    today = _epoch(urls, None, 0, views_per_image=3, teacher_size=112)
    split = _epoch(urls, None, 0, workers=1, views_per_image=3, render_on_device=True)
    for a, b in zip(today, split):
        rendered = b.pin_memory().rendered("cuda", 224, 112)  # pinned, as the DataLoader hands it over on CUDA
        assert rendered.pixels.device.type == "cuda"
        assert torch.equal(rendered.pixels.cpu(), a.pixels)
        assert torch.equal(rendered.teacher_pixels.cpu(), a.teacher_pixels)


@pytest.mark.parametrize("split", ["shards", "samples"])
def test_the_loader_hands_the_loop_steps_of_accum_batches_in_loader_order(demo_shards, split):
    """Steps of A = 2 Batches: grouped after the DataLoader (split shards: the workers' batches
    in the order the loader hands them over) or made whole in a worker (split samples: a
    step never mixes two workers' slots); either way each sample once."""
    cfg = DataConfig(shards=url_list(demo_shards), batch_size=2, seed=7, shuffle_buffer=8, views_per_image=3,
                     split=split, accum_steps=2)
    data = StudentLoader(StudentStream(cfg, None), workers=2, pin=False)
    steps = list(itertools.islice(data.steps(0), 3))  # (split shards: passes repeat; the loop takes its share)
    assert len(steps) == 3 and all(isinstance(s, Step) and len(s) == 2 for s in steps)
    assert all(isinstance(b, Batch) and len(b) == 2 and b.pixels.shape == (2, 3, 224, 224) for s in steps for b in s)
    keys = [b.keys for s in steps for b in s]
    assert len({k for ks in keys for k in ks}) == 12
    if split == "shards":
        data.stream.set_epoch(0)
        assert keys == [b.keys for b in itertools.islice(data.loader, 6)]
    else:  # the workers hand over whole steps, kept as they are
        data.stream.set_epoch(0)
        items = list(data.loader)
        assert all(isinstance(item, Step) for item in items) and [b.keys for s in items for b in s][:6] == keys


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (runs where one is lent)")
def test_pinned_batches_reach_the_step_as_batches(demo_shards, tiny_cache):
    """On CUDA the DataLoader pins what it hands over: a Batch (and its target sets) pins
    itself, and stays a Batch."""
    cfg = DataConfig(shards=url_list(demo_shards), batch_size=4, seed=7, shuffle_buffer=8, render_on_device=True)
    (batch,) = next(StudentLoader(StudentStream(cfg, tiny_cache), workers=1, pin=True).steps(0))
    assert isinstance(batch, Batch)
    assert batch.crop_pixels.is_pinned() and batch.crop.is_pinned() and batch.attention.is_pinned()
    assert all(t.values.is_pinned() and t.scale.is_pinned() for t in batch.targets)
    assert batch.rendered("cuda", 224).pixels.device.type == "cuda"


# --- prefetch: the next shards opened while one is read ------------------------------------


def _same_batches(a: list[Batch], b: list[Batch]) -> None:
    assert [x.keys for x in a] == [y.keys for y in b] and len(a) > 1
    for x, y in zip(a, b):
        tx, ty = _tensors(x), _tensors(y)
        assert tx.keys() == ty.keys()
        for k in tx:
            assert torch.equal(tx[k], ty[k]), k


@pytest.mark.parametrize("mode", ["cached", "live", "plain"])
def test_prefetch_gives_the_same_samples_in_the_same_order(demo_shards, tiny_cache, mode, tmp_path):
    """Shards opened ahead (groups, first rows, the tar's stream), Zarr blocks read ahead:
    the same batches, sample for sample and byte for byte, as a loader that opens each shard
    when it reaches it; in a DataLoader worker and on a store with latency too."""
    from _latency_fs import LatencyMemoryFileSystem as Store

    cache, kw = (tiny_cache, {}) if mode == "cached" else (None, {"views_per_image": 3})
    kw["teacher_size"] = 112 if mode == "live" else 0
    urls = url_list(demo_shards)
    plain = _epoch(urls, cache, 1, prefetch=0, **kw)
    _same_batches(plain, _epoch(urls, cache, 1, prefetch=2, **kw))
    _same_batches(plain, _epoch(urls, cache, 1, workers=1, prefetch=1, **kw))
    Store.clear()
    try:
        Store.latency = 0.005
        Store.upload_tree(demo_shards[0].parent, "latmem://prefetch/shards")
        remote = url_list([f"latmem://prefetch/shards/{p.name}" for p in demo_shards])
        if cache is not None:
            Store.upload_tree(cache.root, "latmem://prefetch/cache")
            cache = cf.FeatureCache("latmem://prefetch/cache")
        _same_batches(plain, _epoch(remote, cache, 1, prefetch=2, **kw))
    finally:
        Store.clear()


def test_shards_opened_ahead_are_bounded_in_order_and_fail_where_reached():
    """`opened_ahead`: at most `depth` openings beyond the one handed over, results in the
    items' order whatever order they finish in, an opening's error raised when its item is
    reached (the items before it are all handed over), and what was opened ahead of a
    reader that stopped early is closed."""
    import threading
    import time

    from mrmae.shared.prefetch import opened_ahead

    lock, state, closed = threading.Lock(), {"now": 0, "peak": 0}, []

    def open_fn(i: int) -> int:
        with lock:
            state["now"] += 1
            state["peak"] = max(state["peak"], state["now"])
        time.sleep(0.02 * (5 - i % 5))  # later items finish first
        with lock:
            state["now"] -= 1
        if i == 6:
            raise ValueError("shard 6 is damaged")
        return i * 10

    got = []
    for item, future in opened_ahead(range(9), open_fn, depth=2):
        try:
            got.append(future.result())
        except ValueError as e:
            got.append(str(e))
    assert got == [0, 10, 20, 30, 40, 50, "shard 6 is damaged", 70, 80]
    assert state["peak"] <= 3  # the one handed over (still finishing) and 2 ahead
    stream = opened_ahead(range(9), lambda i: i, depth=3, close=closed.append)
    assert next(stream)[1].result() == 0
    stream.close()
    time.sleep(0.2)
    assert closed and set(closed) <= {1, 2, 3}


def test_a_zarr_groups_next_block_read_ahead_gives_the_same_rows(tmp_path):
    """A sequential reader of a group with read_ahead on gets each next block of rows from a
    thread (read while it used the block before): the same values, row for row, in order and
    when it skips about; a damaged block fails where it is reached, naming its file."""
    rng = np.random.default_rng(0)
    rows, dim = 200, 8
    w = cf.open_shard_writer("zarr", tmp_path, "src.tar", rows, dim, 196, "int8")
    w.append([f"k{i // 2}" for i in range(rows)], np.arange(rows) % 2, np.ones((rows, 4)), np.zeros(rows),
             rng.standard_normal((rows, 196, dim)).astype(np.float32), np.ones((rows, 196)), np.ones((rows, dim)))
    w.close({"source": "src.tar", "num_samples": rows // 2})
    plain, ahead = cf.ShardGroup(w.final, None), cf.ShardGroup(w.final, None)
    ahead.read_ahead = True
    ahead.stored_row(0)
    assert sorted(ahead._ahead) == [(64, "features"), (128, "features"), (192, "features")]  # in threads
    order = list(range(rows)) + [5, 150, 70, 199]
    for i in order:
        a, b = plain.stored_row(i), ahead.stored_row(i)
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])
    chunk = w.final / "features" / "c" / "5" / "0" / "0"  # rows 80-95, in the block of rows 64-127
    chunk.write_bytes(chunk.read_bytes()[:-1] + bytes([chunk.read_bytes()[-1] ^ 1]))
    damaged = cf.ShardGroup(w.final, None)
    damaged.read_ahead = True
    damaged.stored_row(0)  # (the block of rows 64-127 is read ahead now, and fails there)
    with pytest.raises(cf.CacheError, match=r"array features, rows 64-127: unreadable chunk \(crc32c"):
        damaged.stored_row(64)

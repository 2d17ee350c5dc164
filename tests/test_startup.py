"""Start-up on an object store: what opening a cache, `cache info` and the steps before
pretraining's first batch ask of the store, counted request by request.

The store is fsspec's memory filesystem with a latency per request
(benchmarks/_latency_fs.py, `latmem://`): a reader that opens every shard's group to count
an epoch, or asks for 1,024 entries one after the other, makes start-up at ImageNet scale
take minutes on s3 (benchmarks/startup.py); here a few shards show the same per-shard
costs. The caches are written by the real writer (the benchmark's builder).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

from _latency_fs import LatencyMemoryFileSystem as Store  # noqa: E402
import startup  # noqa: E402

from mrmae.shared import cache_format as cf  # noqa: E402
from mrmae.train.stream import check_cache_fits  # noqa: E402
from mrmae.train.config import PretrainConfig  # noqa: E402
from mrmae.train.pretrain import count_samples, run_fingerprint  # noqa: E402

SHARDS = 5
URL = "latmem://startup-test/cache"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A 5-shard cache (10 and 9 images a shard, 2 views) on local disk: (root, source urls)."""
    return startup.build(tmp_path_factory.mktemp("startup"), images=48, shards=SHARDS, views=2, dim=16)


@pytest.fixture
def store(built):
    """The cache on latmem:// (1 ms a request), requests counted from zero."""
    Store.clear()
    Store.upload_tree(built[0], URL)
    Store.latency = 0.001
    Store.reset_stats(record=True)
    yield URL, built[1]
    Store.clear()


def _reads(log: list[tuple[str, str]]) -> list[str]:
    return [path for method, path in log if method in ("cat_file", "_open")]


def test_clones_are_the_writer_bytes(built, tmp_path):
    """The benchmark copies a written shard under other sources: each copy must be what the
    writer writes for that source (entry and group digest alike), or the benchmark would
    time another layout."""
    root, urls = built
    copies = {e.source: e for e in cf.read_manifest(root).shards}
    fresh = tmp_path / "fresh"
    cf.init_cache(fresh, startup.tiny_manifest(2, 16))
    for url in (urls[1], urls[4]):  # copies of the 10- and the 9-image template
        keys, images = startup.write_tar(tmp_path / "again.tar", copies[url].num_samples)
        written = startup.write_shard(fresh, url, keys, images, startup.tiny_manifest(2, 16))
        assert cf.group_digest(root / copies[url].group) == (written.sha256, written.bytes)
        copy = cf.with_files(root, copies[url], "zarr")  # (its file list, as the shard opens)
        ignored = {"seconds": None, "file_list": None}
        assert written.__dict__ | ignored == copy.__dict__ | ignored


def test_opening_asks_for_the_entries_concurrently(store):
    """manifest.json, one listing and one GET per entry, overlapped: 1,024 entries at 20 ms
    a request were 20 s one after the other."""
    url, _ = store
    Store.latency = 0.01  # long enough for the reads to overlap on a busy machine
    cache = cf.FeatureCache(url)
    s = Store.stats()
    assert len(cache.complete_shards) == SHARDS
    assert s["requests"] == SHARDS + 2, s["by_method"]
    assert s["peak_in_flight"] > 1


def test_the_steps_before_training_open_no_group(store):
    """Counting an epoch, fingerprinting the run and matching every shard read the entries
    already in memory: no request at all (they opened each shard's group, ~30 requests a
    shard: 15 minutes for ImageNet's 1,024 on a 20 ms store)."""
    url, urls = store
    cache = cf.FeatureCache(url)
    Store.reset_stats(record=True)
    cfg = PretrainConfig(shards=",".join(urls), out="unused", feature_cache=url)
    assert count_samples(urls, cache) == 48
    run_fingerprint(cfg, urls, [cache], None, (16,))
    check_cache_fits(cache, urls, 14, 16)
    assert Store.stats()["requests"] == 0, Store.stats()["log"]


def test_checking_the_groups_reads_metadata_only_and_overlaps(store):
    """`check_shards` (before pretraining writes anything) reads a few arrays' zarr.json a
    group: a constant number of requests a shard, no listing (zarr's chunk keys make ~1,100
    directories a group), no chunk read, no file list, shards overlapped. `cache info`'s
    logical bytes come from the entries alone (no request), and are the bytes an opened
    group counts."""
    url, urls = store
    cache = cf.FeatureCache(url)
    Store.reset_stats(record=True)
    Store.latency = 0.01
    assert [e.source for e in cache.check_shards(urls)] == urls
    s = Store.stats()
    assert s["by_method"] == {"cat_file": 4 * SHARDS}, s["by_method"]  # keys, features, attention, cls
    assert all(p.endswith("zarr.json") for p in _reads(s["log"])), _reads(s["log"])
    assert s["peak_in_flight"] > 1
    Store.reset_stats(record=True)
    Store.latency = 0.0
    logical = cache.logical_bytes()
    assert Store.stats()["requests"] == 0
    assert logical == sum(cache.shard(u).logical_bytes() for u in urls) > 0


def test_damage_is_found_before_training_or_at_the_groups_opening(store):
    """A group without its keys' metadata is refused by `check_shards`, naming the group and
    the file; a chunk file missing (which zarr would read as fill values) when the loader
    reads it, before any of its rows is trained on (format 5: the entry lists it)."""
    url, urls = store
    cache = cf.FeatureCache(url)
    broken, short = cache.entry(urls[3]).group, cache.entry(urls[1]).group
    Store().rm_file(f"{url}/{broken}/keys/zarr.json")
    with pytest.raises(cf.CacheError, match=rf"{broken}: file keys/zarr.json \(metadata\): missing"):
        cache.check_shards(urls)
    Store().rm_file(next(p for p in Store().find(f"{url}/{short}/features") if "/c/" in p))
    with pytest.raises(cf.CacheError, match=rf"{short}: file features/c/\d+/0/0 \(rows \d+-\d+\): missing \(zarr"):
        cache.shard(urls[1]).read(slice(None))


def test_the_benchmark_runs_at_small_scale(built, tmp_path):
    """benchmarks/startup.py's three stages, on disk and on latmem://, at 5 shards."""
    root, urls = built
    args = type("Args", (), {"batch_size": 4, "workers": 0, "count_sample": 2})
    rows = startup.measure("local", str(root), urls, args, str(tmp_path / "run"))
    Store.clear()
    Store.upload_tree(root, URL)
    remote = startup.upload_tars(urls, "latmem://startup-test/tars")
    Store.latency = 0.001
    rows += startup.measure("latmem", URL, remote, args, str(tmp_path / "run"))
    Store.clear()
    stages = ("open", "cache info", "first batch", "plain first batch", "plain: every tar read")
    assert [(r["where"], r["stage"]) for r in rows] == [(w, s) for w in ("local", "latmem") for s in stages]
    assert all(r["seconds"] > 0 for r in rows) and all(r["requests"] > 0 for r in rows[5:])
    plain = rows[5 + 3]  # latmem's plain start: the epoch from sizes.json, one request
    assert plain["stages"]["samples"] == 48 and plain["stages"]["count_from_sizes"] < rows[5 + 4]["seconds"]
    assert rows[2]["stages"]["samples"] == 48
    assert startup.storage_rows()[0]["view_bytes"] == 196 * 768 + 196 * 12 * 2 + 196 * 2 + 768 * 2 + 51

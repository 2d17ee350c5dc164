"""A cache at an fsspec URL (fsspec's in-memory filesystem standing in for s3:// or gs://).

The 2-process runs into and out of a file:// URL are in test_extract.py and
test_pretrain.py; here, in one process, each backend's whole life on a store with no
rename and no lock: write, read back, damage, resume.
"""

from __future__ import annotations

from functools import partial

import uuid

import fsspec
import numpy as np
import pytest
import conftest
from conftest import rows, url_list

from mrmae.shared import cache_format as cf

extract = partial(conftest.extract, batch_size=4)






@pytest.mark.parametrize("backend", cf.backend_names())
def test_a_cache_on_an_object_store_equals_a_local_one_and_resumes(demo_shards, tmp_path, backend):
    urls = url_list(demo_shards[:2])
    url = f"memory://mrmae-test-{uuid.uuid4().hex}/cache"
    extract(urls, str(tmp_path / "local"), backend)
    extract(urls, url, backend)
    fs = fsspec.filesystem("memory")
    root = url.removeprefix("memory://")
    assert not [p for p in fs.find(root) if "/.tmp-" in p]  # only whole shards were uploaded

    local, remote = rows(str(tmp_path / "local")), rows(url)
    assert local.keys() == remote.keys() and len(remote) == 2
    for src in local:
        for col in local[src]:
            np.testing.assert_array_equal(local[src][col], remote[src][col])
    entries = cf.read_manifest(url).shards
    assert [e.sha256 for e in entries] == [e.sha256 for e in cf.read_manifest(tmp_path / "local").shards]
    assert cf.check_integrity(url) == []

    # Bit rot in the store: one byte of one stored file flipped.
    victim = sorted(p for p in fs.find(f"{root}/{entries[0].group}") if "features" in p or p.endswith(".tar"))[-1]
    data = bytearray(fs.cat_file(victim))
    data[len(data) // 2] ^= 0xFF
    fs.pipe_file(victim, bytes(data))
    (problem,) = cf.check_integrity(url)
    assert entries[0].group in problem and "sha256 differs" in problem

    # A shard whose entry is gone is not in the cache; the next run redoes it alone.
    fs.rm(f"{root}/{cf.manifest.entry_path(entries[0].group)}")
    assert [e.group for e in cf.read_manifest(url).shards] == [entries[1].group]
    summary = extract(urls, url, backend)
    assert (summary["extracted"], summary["skipped_complete"]) == (1, 1)
    assert cf.check_integrity(url) == []
    for col in local[entries[0].source]:
        np.testing.assert_array_equal(local[entries[0].source][col], rows(url)[entries[0].source][col])


def test_a_url_that_holds_no_cache_is_named(tmp_path):
    with pytest.raises(cf.CacheError, match=r"memory://nowhere-\w+/c: not a feature cache \(no manifest.json\)"):
        cf.FeatureCache(f"memory://nowhere-{uuid.uuid4().hex}/c")

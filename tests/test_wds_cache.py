"""The WebDataset cache backend: the same views and targets as Zarr, read through the same API."""

from __future__ import annotations

from functools import partial

import copy
import hashlib
import io
import json
import re
import shutil
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
import zarr
from click.testing import CliRunner
import conftest
from conftest import url_list
from numcodecs import Zstd
from PIL import Image

from mrmae.cli import cli
from mrmae.shared import cache_format as cf
from mrmae.shared.cache_format import wds_store
from mrmae.train.stream import DataConfig, StudentStream

extract = partial(conftest.extract, batch_size=4)

SAFE_MEMBER = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_]+\.(npy|npy\.zst|json)")




@pytest.fixture(scope="module")
def caches(demo_shards, tmp_path_factory) -> dict[str, Path]:
    """int8 caches of all demo shards and float16 caches of one, in both formats."""
    root = tmp_path_factory.mktemp("caches")
    urls = url_list(demo_shards)
    with warnings.catch_warnings():  # module scope: conftest's per-test filter does not apply yet
        warnings.filterwarnings("ignore", message=".*HAS RANDOM WEIGHTS.*")
        for fmt in ("zarr", "wds"):
            extract(urls, root / f"{fmt}-int8", fmt)
            extract(str(demo_shards[0]), root / f"{fmt}-float16", fmt, dtype="float16")
    return {p.name: p for p in root.iterdir()}


def all_rows(root: Path, layer: str = "features") -> dict[str, dict[str, np.ndarray]]:
    cache = cf.FeatureCache(root)
    return {s.source: cache.shard(s.source).read(slice(None), layer) for s in cache.complete_shards}


def tar_members(path: Path) -> dict[str, np.ndarray | dict]:
    """Every member of a shard tar, read with tarfile, zstd and numpy alone (no mrmae)."""
    out = {}
    with tarfile.open(path) as tf:
        for info in tf:
            data = tf.extractfile(info).read()
            if info.name.endswith(".zst"):
                data = Zstd().decode(data)
            out[info.name] = json.loads(data) if info.name.endswith(".json") else np.load(io.BytesIO(data),
                                                                                            allow_pickle=False)
    return out


@pytest.mark.parametrize("dtype", ["int8", "float16"])
def test_wds_cache_holds_the_same_views_and_targets_as_zarr(caches, dtype):
    z_root, w_root = caches[f"zarr-{dtype}"], caches[f"wds-{dtype}"]
    zm, wm = cf.read_manifest(z_root), cf.read_manifest(w_root)
    assert wm.storage.backend == "wds" and "zstd" in wm.storage.codec
    assert (wm.format_version, wm.teacher, wm.views) == (zm.format_version, zm.teacher, zm.views)
    for ze, we in zip(zm.shards, wm.shards, strict=True):
        # each named after its own bytes: shards/<name>.<sha256[:16]>[.tar]
        assert cf.manifest.entry_path(we.group) == cf.manifest.entry_path(ze.group)
        assert we.group == f"{ze.group.rsplit('.', 1)[0]}.{we.sha256[:16]}.tar" and (w_root / we.group).is_file()
        for k in ("source", "num_samples", "num_views", "skipped", "status"):
            assert getattr(ze, k) == getattr(we, k)
    z, w = all_rows(z_root), all_rows(w_root)
    assert z.keys() == w.keys()
    for src in z:
        for col in z[src]:  # keys, view, crop, flip, features, attention, cls: equal, same dtypes
            assert z[src][col].dtype == w[src][col].dtype and z[src][col].shape == w[src][col].shape, col
            np.testing.assert_array_equal(z[src][col], w[src][col], err_msg=col)
    # the stored values themselves, read without mrmae: the same int8 codes (or float16 values)
    entry = wm.shards[0]
    members = tar_members(w_root / entry.group)
    group = zarr.open_group(str(z_root / zm.shards[0].group), mode="r")
    features = [a for n, a in members.items() if ".features." in n]
    metas = [a for n, a in members.items() if n.endswith(".meta.json")]
    assert all(n.endswith((".json", ".npy.zst")) for n in members)
    assert np.stack(features).dtype == np.dtype(dtype)
    np.testing.assert_array_equal(np.stack(features), group["features"][:])
    if dtype == "int8":
        np.testing.assert_array_equal(np.stack([a for n, a in members.items() if n.endswith(".scale.npy.zst")]),
                                      group["features_scale"][:])
    assert [m["key"] for m in metas] == [str(k) for k in group["keys"][:]]
    assert [m["crop"] for m in metas] == group["crop"][:].tolist()
    assert [m["flip"] for m in metas] == group["flip"][:].tolist()


def test_reader_api_round_trip(caches):
    cache = cf.FeatureCache(caches["wds-float16"])
    source = cache.complete_shards[0].source
    g = cache.shard(source)
    assert isinstance(g, cf.WdsShard) and g.entry.source == source and len(g) == 12
    full = g.read(slice(None))
    crop, flip, attention = g.geometry()
    np.testing.assert_array_equal(crop, full["crop"])
    np.testing.assert_array_equal(flip, full["flip"])
    np.testing.assert_array_equal(attention, full["attention"])
    for i in list(range(len(g))) + [7, 0, 11, 3]:  # sequential, then jumping back and forth
        np.testing.assert_array_equal(g.features_row(i), full["features"][i])
    part = g.read(slice(3, 8))
    for col in part:
        np.testing.assert_array_equal(part[col], full[col][3:8])
    assert g.read(slice(5, 5))["features"].shape == (0,) + full["features"].shape[1:]
    key, view = str(full["keys"][5]), int(full["view"][5])
    assert g.row(key, view) == 5
    t = cache.get(source, key, view)
    assert (t.key, t.view_index, t.crop, t.flip) == (key, view, tuple(full["crop"][5]), bool(full["flip"][5]))
    np.testing.assert_array_equal(t.features, full["features"][5])
    np.testing.assert_array_equal(t.cls, full["cls"][5])
    with pytest.raises(cf.CacheError, match="no row for key"):
        g.row(key, 7)
    with pytest.raises(cf.CacheError, match="no layer9 member"):
        g.features_row(0, "layer9")
    with tarfile.open(g.path) as tf:  # the reader's own header scan agrees with tarfile
        assert wds_store._ustar_members(g.path) == [(i.name, i.offset_data, i.size) for i in tf]
    g2 = copy.deepcopy(g)  # as for DataLoader workers: __getstate__ leaves the open file behind
    np.testing.assert_array_equal(g2.features_row(4), full["features"][4])
    zarr_cache = cf.FeatureCache(caches["zarr-float16"])
    assert cache.logical_bytes() == zarr_cache.logical_bytes()


def test_a_shard_whose_samples_were_all_skipped_is_an_empty_tar(tmp_path):
    w = cf.WdsShardWriter(tmp_path, "/data/bad.tar", 0, 8, 196, "int8")
    path, digest, size = w.close({"source": "/data/bad.tar"})
    assert path.name.endswith(".tar") and (digest, size) == cf.group_digest(path)
    assert not list(tmp_path.glob("**/.tmp-*"))
    g = cf.WdsShard(path, {})
    assert len(g) == 0 and g.read(slice(None))["features"].shape[0] == 0 and g.geometry()[0].shape == (0, 4)
    assert g.logical_bytes() == 0
    w = cf.WdsShardWriter(tmp_path, "/data/other.tar", 1, 8, 196, "int8")
    w.append(["x"], np.zeros(1), np.zeros((1, 4)), np.zeros(1), np.ones((1, 196, 8)), np.ones((1, 196)),
             np.ones((1, 8)))
    w.abort()  # an extraction that failed part-way leaves no tar, temporary or final
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == [path.name]


def test_cache_info_and_verify_work_on_a_wds_cache(caches):
    runner = CliRunner()
    r = runner.invoke(cli, ["cache", "info", "--feature-cache", str(caches["wds-int8"]), "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.output)
    zinfo = json.loads(runner.invoke(cli, ["cache", "info", "--feature-cache", str(caches["zarr-int8"]), "--json"]).output)
    assert info["views"] == zinfo["views"] == 36 and info["shards_complete"] == 3
    assert info["bytes"] == sum(f.stat().st_size for f in (caches["wds-int8"] / "shards").glob("*.tar"))
    assert "zstd" in info["codec"] and info["compression_ratio"] > 0.8
    r = runner.invoke(cli, ["cache", "verify", "--feature-cache", str(caches["wds-int8"]), "--recompute", "3"])
    assert r.exit_code == 0 and "integrity: OK" in r.output and "checked 3 views" in r.output, r.output


def test_integrity_catches_a_damaged_truncated_or_missing_tar(caches, tmp_path):
    out = tmp_path / "c"
    shutil.copytree(caches["wds-int8"], out)
    tars = [out / s.group for s in cf.read_manifest(out).shards]
    for entry, path in zip(cf.read_manifest(out).shards, tars):  # the recorded sha256 is the file's
        assert entry.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
        assert entry.bytes == path.stat().st_size
    assert cf.check_integrity(out) == []
    data = bytearray(tars[0].read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit
    tars[0].write_bytes(bytes(data))
    tars[1].write_bytes(tars[1].read_bytes()[:-700])  # truncated
    tars[2].unlink()
    problems = cf.check_integrity(out)
    assert len(problems) == 3
    # (format 5 on: each member read through the entry's list names the damaged one first)
    assert str(tars[0]) in problems[0] and "sha256 differs from the entry's" in problems[0]
    assert str(tars[1]) in problems[1] and "bytes, recorded" in problems[1]
    assert str(tars[2]) in problems[2] and "missing" in problems[2]
    r = CliRunner().invoke(cli, ["cache", "verify", "--feature-cache", str(out), "--recompute", "0"])
    assert r.exit_code == 1 and r.output.count("mrmae: damaged") == 3


def test_a_training_epoch_reads_the_same_targets_from_either_backend(caches, demo_shards):
    urls = url_list(demo_shards)
    batches = {}
    for fmt in ("zarr", "wds"):
        stream = StudentStream(DataConfig(shards=urls, batch_size=4, seed=0), cf.FeatureCache(caches[f"{fmt}-int8"]))
        stream.set_epoch(0)
        batches[fmt] = list(stream)
    assert len(batches["wds"]) == len(batches["zarr"]) > 1
    for z, w in zip(batches["zarr"], batches["wds"]):
        assert z.keys == w.keys
        for k in ("crop", "flip", "attention", "pixels"):
            assert torch.equal(getattr(z, k), getattr(w, k)), k
        (zt,), (wt,) = z.targets, w.targets
        assert torch.equal(zt.values, wt.values) and torch.equal(zt.scale, wt.scale)


def test_rerun_skips_complete_tars_and_leaves_a_killed_writers_temp_to_cache_clean(caches, demo_shards, tmp_path):
    out = tmp_path / "c"
    shutil.copytree(caches["wds-int8"], out)
    entry = cf.read_manifest(out).shards[0]
    name = cf.group_name(entry.source)
    stale = out / "shards" / f".tmp-{name}-otherhost-99999-0badcafe.tar"
    stale.write_bytes(b"half a tar")
    (out / entry.group).unlink()  # recorded complete but gone: redone whole
    stamp = (out / cf.read_manifest(out).shards[1].group).stat().st_mtime_ns
    summary = extract(url_list(demo_shards), out, "wds")
    assert summary["skipped_complete"] == 2 and summary["extracted"] == 1
    assert stale.exists() and cf.check_integrity(out) == []  # a writer never removes another's temporary
    assert cf.clean_cache(out, older_than_hours=0) == [str(stale)] and cf.check_integrity(out) == []
    assert (out / cf.read_manifest(out).shards[1].group).stat().st_mtime_ns == stamp
    assert cf.read_manifest(out).shards[0].sha256 == entry.sha256  # the same bytes again


def test_sample_names_are_safe_and_distinct():
    keys = ["n01440764_10026", "a/b", "a_b", "../../etc/passwd", "..", ".", "", "a.b", "x" * 300, "x" * 301,
            "caf\u00e9 \u2603", "-rf"]
    names = [cf.sample_name(k, v) for k in keys for v in (0, 1)]
    assert len(set(names)) == len(names)
    assert all(re.fullmatch(r"[A-Za-z0-9_-]+_v[01]", n) and len(n) < 140 for n in names)
    assert cf.sample_name("n01440764_10026", 1) == "n01440764_10026_v1"  # safe keys are kept as they are


def test_unsafe_source_keys_are_sanitised_in_the_tar_and_kept_in_meta(tmp_path):
    jpg = io.BytesIO()
    Image.new("RGB", (96, 80), (200, 30, 10)).save(jpg, format="JPEG")
    keys = ["../../escape", "dir/sub/img", "plain_key", "long/" + "k" * 150]  # long: pax headers in the cache tar
    with wds.TarWriter(str(tmp_path / "evil.tar")) as sink:
        for k in keys:
            sink.write({"__key__": k, "jpg": jpg.getvalue(), "cls": b"1"})
    out = tmp_path / "c"
    extract(str(tmp_path / "evil.tar"), out, "wds")
    tar = out / cf.read_manifest(out).shards[0].group
    with tarfile.open(tar) as tf:
        names = tf.getnames()
        assert all(SAFE_MEMBER.fullmatch(n) and "/" not in n and ".." not in n for n in names), names
        tf.extractall(tmp_path / "x", filter="data")
    extracted = [p for p in (tmp_path / "x").rglob("*")]
    assert len(extracted) == len(names) == 4 * 2 * 5 and all(p.parent == tmp_path / "x" for p in extracted)
    assert not (tmp_path / "escape").exists() and not list(tmp_path.parent.glob("escape*"))
    metas = [json.loads(p.read_text()) for p in sorted(extracted) if p.name.endswith(".meta.json")]
    assert sorted({m["key"] for m in metas}) == sorted(keys)
    assert wds_store._ustar_members(tar) is None  # names over 100 characters: pax headers, read by tarfile
    g = cf.FeatureCache(out).shard(str(tmp_path / "evil.tar"))
    assert list(g.keys) == [k for k in keys for _ in range(2)]
    assert g.get("../../escape", 1).features.shape == (196, 192)

"""Bad and unusual inputs: each ends in one clear line, a recorded skip, or works as is."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest
import webdataset as wds
from click.testing import CliRunner
from conftest import DINO_TINY, entry_files, extract, rows, url_list
from PIL import Image

from mrmae.cli import cli
from mrmae.shared import cache_format as cf






@pytest.fixture(scope="module")
def uninterrupted(demo_shards, tmp_path_factory) -> dict:
    """The rows of one uninterrupted extraction, which every killed-and-resumed run must equal."""
    out = tmp_path_factory.mktemp("full") / "c"
    extract(url_list(demo_shards), out, batch_size=2)
    return rows(out)


@pytest.mark.parametrize("when", ["first-shard-recorded", "mid-shard-write", "second-shard-recorded"])
def test_sigkill_at_three_points_then_resume_equals_an_uninterrupted_run(demo_shards, uninterrupted, tmp_path, when):
    urls = url_list(demo_shards)
    out = tmp_path / "killed"

    def reached() -> bool:
        done = len(entry_files(out / "shards"))  # complete shards' entries
        if when == "mid-shard-write":  # a temp group with rows in it, nothing recorded yet
            tmp = list((out / "shards").glob(".tmp-*/features/c")) if (out / "shards").exists() else []
            return bool(tmp) and done == 0
        return done >= (1 if when == "first-shard-recorded" else 2)

    proc = subprocess.Popen([sys.executable, "-m", "mrmae", "extract-features", "--shards", urls, "--feature-cache", str(out),
                             "--teacher", DINO_TINY, "--views", "2", "--batch-size", "2", "--no-progress"],
                            env={**os.environ, "PYTHONWARNINGS": "ignore"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not reached() and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert reached(), f"the kill did not land at {when}"
    extract(urls, out, batch_size=2)
    full, resumed = uninterrupted, rows(out)
    assert full.keys() == resumed.keys()
    for src in full:
        for col in full[src]:
            np.testing.assert_array_equal(full[src][col], resumed[src][col])
    cf.clean_cache(out, older_than_hours=0)  # the killed writer's temporary: left by writers, removed here
    assert not list((out / "shards").glob(".tmp-*"))


def test_empty_tar_gives_an_empty_complete_shard(tmp_path):
    empty = tmp_path / "empty.tar"
    with tarfile.open(empty, "w"):
        pass
    extract(str(empty), tmp_path / "c")
    entry = cf.read_manifest(tmp_path / "c").shards[0]
    assert entry.num_samples == 0 and entry.num_views == 0 and entry.status == "complete"


def test_decompression_bomb_is_skipped_and_named(tmp_path):
    bomb = io.BytesIO()
    Image.new("L", (12000, 9000)).save(bomb, format="PNG")  # 108 Mpx, a few KB compressed
    ok = io.BytesIO()
    Image.new("RGB", (300, 200), (10, 200, 30)).save(ok, format="JPEG")
    shard = tmp_path / "bomb.tar"
    with wds.TarWriter(str(shard)) as sink:
        sink.write({"__key__": "bomb_0", "jpg": bomb.getvalue()})
        sink.write({"__key__": "ok_1", "jpg": ok.getvalue()})
    with pytest.warns(UserWarning, match="bomb.tar key bomb_0: undecodable image: image of 12000x9000 px"):
        extract(str(shard), tmp_path / "c")
    entry = cf.read_manifest(tmp_path / "c").shards[0]
    assert [s.key for s in entry.skipped] == ["bomb_0"] and entry.num_samples == 1


def test_pipe_urls_read_like_files_and_match_the_cache_by_name(demo_shards, tmp_path):
    extract(f"pipe:cat {demo_shards[0]}", tmp_path / "piped")
    extract(str(demo_shards[0]), tmp_path / "plain")
    a, b = rows(tmp_path / "piped"), rows(tmp_path / "plain")
    for col in ("keys", "crop", "flip", "features"):
        np.testing.assert_array_equal(next(iter(a.values()))[col], next(iter(b.values()))[col])
    # training names the shard differently than extraction did: found by its file name
    assert cf.FeatureCache(tmp_path / "piped").shard(str(demo_shards[0])).entry.source.startswith("pipe:cat")


def test_duplicate_keys_across_shards_are_reported_by_verify(demo_shards, tmp_path):
    copy = tmp_path / "copy-000.tar"
    copy.write_bytes(demo_shards[0].read_bytes())  # same keys under another shard name
    extract(f"{demo_shards[0]}::{copy}", tmp_path / "c")
    r = CliRunner().invoke(cli, ["cache", "verify", "--feature-cache", str(tmp_path / "c"), "--recompute", "0"])
    assert r.exit_code == 0, r.output
    warn = [ln for ln in r.output.splitlines() if "keys appear in more than one shard" in ln]
    assert len(warn) == 1 and "6 keys" in warn[0] and "demo_00000000" in warn[0]


def test_fsspec_urls_are_read_through_fsspec(demo_shards, tmp_path):
    import fsspec

    with fsspec.open("memory://bucket/demo-000000.tar", "wb") as f:
        f.write(demo_shards[0].read_bytes())
    extract("memory://bucket/demo-000000.tar", tmp_path / "mem")
    extract(f"file://{demo_shards[0]}", tmp_path / "file")
    a, b = rows(tmp_path / "mem"), rows(tmp_path / "file")
    for col in ("keys", "crop", "flip", "features"):
        np.testing.assert_array_equal(next(iter(a.values()))[col], next(iter(b.values()))[col])
    r = CliRunner().invoke(cli, ["extract-features", "--shards", "memory://bucket/missing.tar", "--feature-cache",
                                 str(tmp_path / "x"), "--teacher", DINO_TINY, "--no-progress"])
    assert r.exit_code == 1 and "memory://bucket/missing.tar: cannot read shard" in r.output


def test_verify_sources_finds_a_shard_changed_since_extraction(demo_shards, tmp_path):
    shard = tmp_path / "demo-000000.tar"
    shard.write_bytes(demo_shards[0].read_bytes())
    extract(str(shard), tmp_path / "c")
    entry = cf.read_manifest(tmp_path / "c").shards[0]
    import hashlib

    assert entry.source_sha256 == hashlib.sha256(shard.read_bytes()).hexdigest()
    runner = CliRunner()
    assert runner.invoke(cli, ["cache", "verify", "--feature-cache", str(tmp_path / "c"), "--recompute", "0", "--sources"]).exit_code == 0
    data = bytearray(shard.read_bytes())
    data[5000] ^= 0xFF  # same size, other bytes: only the hash sees it
    shard.write_bytes(bytes(data))
    r = runner.invoke(cli, ["cache", "verify", "--feature-cache", str(tmp_path / "c"), "--recompute", "0", "--sources"])
    damaged = [ln for ln in r.output.splitlines() if ln.startswith("mrmae: damaged")]
    assert r.exit_code == 1 and len(damaged) == 1 and f"{shard}: source shard changed since extraction" in damaged[0]

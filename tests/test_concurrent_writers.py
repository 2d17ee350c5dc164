"""Concurrent writers on one --out lose nothing: races on the manifest and on one shard,
foreign temps, `cache clean`, a full disk and a read-only --out.

"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import DINO_TINY

from mrmae.cli import cli
from mrmae.demo import write_demo_shards
from mrmae.extract.config import ExtractConfig
from mrmae.extract.runner import run_extraction
from mrmae.shared import cache_format as cf
from mrmae.shared.views import ViewConfig


_GATE = "MRMAE_TEST_GATE"


def _gated(tar: Path) -> str:
    """A `pipe:` source that reads `tar` at once, or, in a process whose environment names a
    gate file, only once that file exists: the same URL (so the same shard) for both writers,
    while the test decides when the second one may start on it."""
    return (f'pipe:sh -c \'while [ -n "${_GATE}" ] && [ ! -e "${_GATE}" ]; do sleep 0.02; done; '
            f"exec cat {tar}'")


def _extract_cmd(urls: list[str], out: Path, backend: str) -> list[str]:
    return [sys.executable, "-m", "mrmae", "extract-features", "--shards", "::".join(urls), "--feature-cache", str(out),
            "--teacher", DINO_TINY, "--views", "2", "--batch-size", "4", "--workers", "0", "--format", backend,
            "--no-progress"]


def _writing_rows(out: Path, backend: str) -> bool:
    """Whether a writer's temporary on `out` already holds rows (a features chunk, or a few
    views of a tar)."""
    shards = out / "shards"
    if backend == "zarr":
        return bool(list(shards.glob(".tmp-*/features/c"))) if shards.exists() else False
    return any(p.stat().st_size > 100_000 for p in shards.glob(".tmp-*.tar")) if shards.exists() else False


def _cache_rows(root: Path) -> dict[str, dict[str, np.ndarray]]:
    cache = cf.FeatureCache(root)
    return {s.source: cache.shard(s.source).read(slice(None)) for s in cache.complete_shards}


def test_a_run_that_loses_the_manifest_race_to_another_configuration_writes_nothing(demo_shards, tmp_path):
    """Two runs with other --views started on one new --out: both find no manifest; the
    first to create it wins. The other (held in its PCA fit by a gated source, past its
    first check) used to write its 2-view shards into the 3-view cache, making every later
    read fail; it now refuses in one line and writes nothing."""
    out, gate = tmp_path / "c", tmp_path / "gate"
    cmd = lambda views, url: [sys.executable, "-m", "mrmae", "extract-features", "--shards", url,  # noqa: E731
                              "--feature-cache", str(out), "--teacher", DINO_TINY, "--views", views, "--pca", "8",
                              "--pca-fit-views", "8", "--no-progress"]
    held = subprocess.Popen(cmd("2", _gated(demo_shards[0])), env={**os.environ, _GATE: str(gate)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not _gate_waiting(demo_shards[0]):  # its PCA fit reads the shard: past its first check
            assert time.time() < deadline and held.poll() is None, held.communicate()
            time.sleep(0.2)
        first = subprocess.run(cmd("3", str(demo_shards[1])), capture_output=True, text=True, timeout=300)
        assert first.returncode == 0, first.stderr
        gate.touch()
        _, err = held.communicate(timeout=300)
    finally:
        held.kill()
    assert held.returncode == 1 and "views.per_image: cache has 3, asked for 2" in err, err
    assert [e.num_views for e in cf.read_manifest(out).shards] == [18]


def _gate_waiting(tar: Path) -> bool:
    """Whether a gated `pipe:` of `tar` runs (its shell waits for the gate)."""
    for p in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if b"exec cat " + str(tar).encode() in p.read_bytes():
                return True
        except OSError:
            continue
    return False


@pytest.mark.parametrize("backend", cf.backend_names())
def test_two_extractions_racing_on_one_shard_both_succeed_and_publish_one_whole_group(tmp_path, backend):
    """Writer A is stopped (SIGSTOP) with rows in its temporary; writer B, started with it,
    then extracts the same shards to the end; A resumes and finishes. Before the fix, B
    deleted A's temporary and A published a group with blank rows (zarr) or crashed (wds)."""
    race = write_demo_shards(tmp_path / "in", num_images=16, shard_size=16, seed=3, prefix="race")[0]
    urls = [_gated(race)]
    out, gate = tmp_path / "c", tmp_path / "gate"
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    a = subprocess.Popen(_extract_cmd(urls, out, backend), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    b = subprocess.Popen(_extract_cmd(urls, out, backend), env={**env, _GATE: str(gate)},
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not _writing_rows(out, backend) and a.poll() is None:
            time.sleep(0.005)
        a.send_signal(signal.SIGSTOP)
        assert _writing_rows(out, backend), "writer A should be stopped with rows in its temporary"
        (a_temp,) = (out / "shards").glob(".tmp-*")
        gate.touch()  # B now reads the shard, extracts it and publishes it
        assert b.wait(120) == 0, b.stderr.read().decode()
        assert a_temp.exists()  # B never removed A's temporary: A is alive (if stopped)
        a.send_signal(signal.SIGCONT)
        assert a.wait(120) == 0, a.stderr.read().decode()  # A finds B's identical group there and yields
    finally:
        for p in (a, b):
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGCONT)
            p.kill() if p.poll() is None else None
    entries = cf.read_manifest(out).shards
    assert len(entries) == 1 and all(e.status == "complete" for e in entries)
    stored = sorted(p.name for p in (out / "shards").iterdir())
    assert stored == sorted([Path(e.group).name for e in entries] + [Path(cf.manifest.entry_path(e.group)).name
                                                                       for e in entries]
                            + [Path(cf.files_path(e.group)).name for e in entries]
                            + (["zarr.json"] if backend == "zarr" else []))  # no temps, no strays
    rows = _cache_rows(out)
    for e in entries:  # exactly its rows, each with its key, views 0, 1 in order
        keys, views = [str(k) for k in rows[e.source]["keys"]], list(rows[e.source]["view"])
        assert len(keys) == e.num_views == 2 * e.num_samples and all(keys)
        assert keys[::2] == keys[1::2] and views == [0, 1] * e.num_samples
    r = CliRunner().invoke(cli, ["cache", "verify", "--feature-cache", str(out), "--recompute", "0"])
    assert r.exit_code == 0 and "integrity: OK" in r.output, r.output
    single = tmp_path / "single"  # the same shards, one process, nobody racing
    run_extraction(ExtractConfig(shards=urls, out=str(single), teacher=DINO_TINY, views=ViewConfig(per_image=2),
                                 format=backend, batch_size=4, progress=False))
    same = lambda m: sorted((e.source, e.group, e.sha256) for e in m.shards)  # noqa: E731
    assert same(cf.read_manifest(out)) == same(cf.read_manifest(single))  # the same bytes, named alike
    for src, cols in _cache_rows(single).items():
        for col, value in cols.items():
            np.testing.assert_array_equal(rows[src][col], value, err_msg=col)


def test_a_writer_leaves_foreign_temps_and_cache_clean_removes_only_leftovers(demo_shards, tmp_path):
    out = tmp_path / "c"
    extract = lambda: run_extraction(ExtractConfig(  # noqa: E731
        shards=str(demo_shards[0]), out=str(out), teacher=DINO_TINY, views=ViewConfig(per_image=2), batch_size=4,
        progress=False))
    extract()
    (entry,) = cf.read_manifest(out).shards
    name, shards = cf.group_name(entry.source), out / "shards"
    live = shards / f".tmp-{name}-otherhost-4242-0badcafe"  # a writer on another machine, writing now
    (live / "features").mkdir(parents=True)
    (live / "features" / "zarr.json").write_text("{}")
    dead = shards / f".tmp-{name}-thishost-17-deadbeef.tar"  # a writer killed two days ago
    dead.write_bytes(b"half a tar")
    stray = shards / f"{name}.0123456789abcdef"  # published by a writer killed before its entry
    shutil.copytree(out / entry.group, stray)
    stray_list = shards / f"{name}.0123456789abcdef.files"  # ... with its file list (format 6)
    stray_list.write_text('{"files":{}}')
    old = time.time() - 48 * 3600
    for p in [dead, stray, stray_list, *stray.rglob("*")]:
        os.utime(p, (old, old))
    (out / entry.group).rename(out / "gone")  # recorded complete but missing: redone by the next run
    shutil.rmtree(out / "gone")
    assert extract()["extracted"] == 1
    assert live.exists() and dead.exists() and stray.exists()  # a writer removes nothing but its own temp
    runner = CliRunner()
    r = runner.invoke(cli, ["cache", "clean", "--feature-cache", str(out), "--dry-run"])
    assert r.exit_code == 0 and dead.exists() and str(dead) in r.output and str(live) not in r.output, r.output
    r = runner.invoke(cli, ["cache", "clean", "--feature-cache", str(out)])  # default: leftovers untouched for 24 h
    assert r.exit_code == 0 and "3 leftovers removed" in r.output, r.output
    assert live.exists() and not dead.exists() and not stray.exists() and not stray_list.exists()
    r = runner.invoke(cli, ["cache", "clean", "--feature-cache", str(out), "--older-than", "0"])  # no writer running now
    assert r.exit_code == 0 and not live.exists(), r.output
    assert sorted(p.name for p in shards.iterdir()) == sorted([Path(entry.group).name, Path(cf.files_path(entry.group)).name,
                                                               f"{name}.json", "zarr.json"])
    assert cf.check_integrity(out) == [] and cf.read_manifest(out).shards[0].sha256 == entry.sha256


def test_cache_clean_never_removes_the_input_tars_beside_the_groups(demo_shards, tmp_path):
    """--out DATA with the inputs in DATA/shards/ (as many datasets lay them out): the cache
    and the tars share shards/. `cache clean --older-than 0` removes only what writers name
    (temporaries, groups named after their bytes), never the tars no entry points to."""
    data = tmp_path / "data"
    (data / "shards").mkdir(parents=True)
    tars = [Path(shutil.copy(p, data / "shards")) for p in demo_shards[:2]]
    r = CliRunner().invoke(cli, ["extract-features", "--shards", "::".join(map(str, tars)), "--feature-cache", str(data),
                                 "--teacher", DINO_TINY, "--format", "wds", "--no-progress"])
    assert r.exit_code == 0, r.output
    stray = data / "shards" / "x-01234567.0123456789abcdef.tar"  # a killed writer's group, published
    stray.write_bytes(b"a tar")
    r = CliRunner().invoke(cli, ["cache", "clean", "--feature-cache", str(data), "--older-than", "0"])
    assert r.exit_code == 0 and "1 leftovers removed" in r.output and not stray.exists(), r.output
    assert all(t.exists() for t in tars) and cf.check_integrity(data) == []


@pytest.mark.parametrize("backend", cf.backend_names())
def test_a_group_whose_rows_were_lost_under_its_writer_is_never_published(tmp_path, backend):
    rng = np.random.default_rng(0)
    writer = cf.open_shard_writer(backend, tmp_path, "/data/s.tar", 40, 8, 196, "int8")

    def append(first: int, n: int) -> None:
        keys = [f"k{(first + i) // 2}" for i in range(n)]
        writer.append(keys, np.arange(first, first + n) % 2, np.tile([0, 0, 8, 8], (n, 1)), np.zeros(n, bool),
                      rng.normal(size=(n, 196, 8)).astype(np.float32), np.ones((n, 196)), np.ones((n, 8)))

    append(0, 16)
    cf.common.remove_path(writer.tmp)  # what a racing writer's cleanup did before the fix
    append(16, 8)
    expected = [(f"k{i}", v) for i in range(12) for v in (0, 1)]
    with pytest.raises(cf.CacheError, match=r"/data/s\.tar not published"):
        writer.finish({"source": "/data/s.tar", "num_samples": 12}, expected)
    writer.abort()
    assert not list(tmp_path.glob("shards/*"))  # nothing published, nothing left

    writer = cf.open_shard_writer(backend, tmp_path, "/data/s.tar", 40, 8, 196, "int8")
    append(0, 24)
    with pytest.raises(cf.CacheError, match=r"24 rows written, 26 expected.*/data/s\.tar not published"):
        writer.finish({"source": "/data/s.tar", "num_samples": 13}, expected + [("k12", 0), ("k12", 1)])
    writer.abort()
    assert not list(tmp_path.glob("shards/*"))


def _synthetic_writer(backend: str, root: str, source: str = "/data/s.tar"):
    """A writer of one shard holding 6 samples x 2 views of fixed rows."""
    rng = np.random.default_rng(1)
    w = cf.open_shard_writer(backend, root, source, 12, 8, 196, "int8")
    w.append([f"k{i // 2}" for i in range(12)], np.arange(12) % 2, np.tile([0, 0, 8, 8], (12, 1)), np.zeros(12, bool),
             rng.normal(size=(12, 196, 8)).astype(np.float32), np.ones((12, 196)), np.ones((12, 8)))
    return w


def _entry(w, digest: str, size: int) -> cf.ShardEntry:
    return cf.ShardEntry(w.source, w.group_path, 6, 12, (), "complete", digest, size, files=w.files)


@pytest.mark.parametrize("backend", cf.backend_names())
@pytest.mark.parametrize("where", ["local", "file-url", "memory-url"])
def test_the_second_writer_of_the_same_bytes_yields_and_damage_under_the_name_is_replaced(tmp_path, backend, where):
    import uuid

    import fsspec

    root = {"local": str(tmp_path / "c"), "file-url": f"file://{tmp_path}/c",
            "memory-url": f"memory://mrmae-race-{uuid.uuid4().hex}/c"}[where]
    teacher = {"spec": "dino:synthetic", "family": "dino", "arch": "synthetic", "weights": None,
               "weights_sha256": "0" * 64, "input_size": 224, "patch_size": 16, "grid": [14, 14], "dim": 8,
               "mean": [0.5] * 3, "std": [0.5] * 3, "layers": []}
    cf.init_cache(root, cf.new_manifest(teacher, ViewConfig(per_image=2),
                                        cf.storage_section(backend, "int8"), "test"))
    first, second = _synthetic_writer(backend, root), _synthetic_writer(backend, root)  # both writing at once
    a, b = first.finish({"source": first.source, "num_samples": 6}), second.finish({"source": first.source,
                                                                                     "num_samples": 6})
    assert a == b and first.group_path == second.group_path and first.tmp != second.tmp
    assert cf.commit_shard(root, first, _entry(first, *a)) is True
    assert cf.commit_shard(root, second, _entry(second, *b)) is False  # same bytes there: it yields
    loc = cf.Location(root)
    assert [e.group for e in cf.read_manifest(root).shards] == [first.group_path]
    group_meta = ["zarr.json"] if backend == "zarr" else []  # the `shards` group's own metadata
    published = [first.group_path.split("/")[1], cf.files_path(first.group_path).split("/")[1], f"{first.name}.json"]
    assert loc.children("shards") == sorted([*published, *group_meta])
    assert cf.check_integrity(root) == []
    # Damage under the group's name (a flipped byte; for Zarr a stray file too): a writer of
    # those bytes puts them back instead of yielding to it.
    fs, path = fsspec.core.url_to_fs(loc.join(first.group_path))
    victim = sorted(p for p in fs.find(path) if "features" in p or p.endswith(".tar"))[-1]
    data = bytearray(fs.cat_file(victim))
    data[len(data) // 2] ^= 0xFF
    fs.pipe_file(victim, bytes(data))
    if backend == "zarr":
        fs.pipe_file(f"{path}/features/stray", b"x")
    assert len(cf.check_integrity(root)) == 1
    third = _synthetic_writer(backend, root)
    assert cf.commit_shard(root, third, _entry(third, *third.finish({"source": third.source, "num_samples": 6})))
    assert cf.check_integrity(root) == [] and loc.children("shards") == sorted([*published, *group_meta])


@contextlib.contextmanager
def _tmpfs(path: Path, options: str):
    """A small tmpfs at `path` (root with CAP_SYS_ADMIN only: chmod means nothing to root)."""
    path.mkdir(parents=True)
    if shutil.which("mount") is None or subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                                                       capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN): no way to fill or freeze a disk")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _extract_cli(shards: list[Path], out: Path):
    return CliRunner().invoke(cli, ["extract-features", "--shards", "::".join(map(str, shards)), "--feature-cache", str(out),
                                    "--teacher", DINO_TINY, "--views", "2", "--batch-size", "4", "--no-progress"])


def test_a_full_disk_during_extraction_is_one_line_naming_the_path(demo_shards, tmp_path):
    with _tmpfs(tmp_path / "small", "size=160k") as out:  # the manifest fits, a shard group does not
        r = _extract_cli(demo_shards[:1], out)
        assert r.exit_code == 1, r.output
        (line,) = [ln for ln in r.output.splitlines() if ln.startswith("mrmae: error:")]
        assert "No space left on device" in line and str(out) in line and "Traceback" not in r.output
        assert cf.read_manifest(out).shards == () and not list((out / "shards").glob(".tmp-*"))


def test_a_read_only_out_is_one_line_naming_the_path(demo_shards, tmp_path):
    with _tmpfs(tmp_path / "ro", "size=8m") as out:
        assert _extract_cli(demo_shards[:1], out).exit_code == 0
        if os.geteuid() == 0:
            assert subprocess.run(["mount", "-o", "remount,ro", str(out)]).returncode == 0
        else:
            os.chmod(out / "shards", 0o555)
        r = _extract_cli(demo_shards[:2], out)  # the first shard is complete; the second cannot be written
        assert r.exit_code == 1, r.output
        (line,) = [ln for ln in r.output.splitlines() if ln.startswith("mrmae: error:")]
        assert ("Read-only file system" in line or "Permission denied" in line) and str(out / "shards") in line
        assert "Traceback" not in r.output and len(cf.read_manifest(out).shards) == 1

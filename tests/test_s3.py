"""Against a real S3 API: moto's server on 127.0.0.1, reached by s3fs through AWS_ENDPOINT_URL
and credentials in the environment (the `s3` fixture in conftest.py), as a user would.

Extraction from s3:// shards into an s3:// cache equals a local one; `cache info|verify`,
cached, live and plain pretraining, finetune and eval read from s3://; a killed extraction
resumes to the same objects; two writers racing into one s3:// cache lose nothing; no
temporary object is ever left; processes exit without third-party noise.
"""

from __future__ import annotations

from functools import partial

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
import conftest
from conftest import DINO_TINY, url_list

from mrmae.cli import cli
from mrmae.extract.config import ExtractConfig
from mrmae.extract.runner import run_extraction
from mrmae.shared import cache_format as cf
from mrmae.shared.cache_format.location import is_temp
from mrmae.shared.views import ViewConfig

rows = partial(conftest.rows, by_name=True)  # (the same tars under other URLs: compared by name)

EXTRACT = ["--teacher", DINO_TINY, "--views", "2", "--batch-size", "4", "--workers", "0", "--no-progress"]
TINY = ["--model", "mrmae_vit_tiny_patch16", "--decoder-depth", "1", "--decoder-dim", "32", "--batch-size", "4",
        "--workers", "0", "--no-progress", "--seed", "3", "--lr", "1e-3", "--epochs", "1"]
TIMING = ("seconds", "images_per_s", "time", "elapsed")
NOISE = ("Unclosed client session", "Unclosed connector", "Traceback", "Exception ignored")


def extract_args(shards: str, cache: str) -> list[str]:
    return ["extract-features", "--shards", shards, "--feature-cache", cache, *EXTRACT]


def mrmae_process(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    """`python -m mrmae ARGS` in a process of its own (its exit is part of what is tested)."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "mrmae", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def assert_clean_exit(r: subprocess.CompletedProcess) -> None:
    assert r.returncode == 0, r.stderr[-3000:]
    assert not [w for w in NOISE if w in r.stderr], r.stderr[-3000:]




def same_rows(a: str, b: str) -> None:
    ra, rb = rows(a), rows(b)
    assert ra.keys() == rb.keys() and ra
    for name in ra:
        for col in ra[name]:
            np.testing.assert_array_equal(ra[name][col], rb[name][col], err_msg=f"{name} {col}")


def entries(root: str) -> list[tuple]:
    """Each shard's entry less where its source was read from and how long it took."""
    return sorted((Path(e.source).name, e.group, e.sha256, e.num_samples, e.num_views)
                  for e in cf.read_manifest(root).shards)


def objects(s3, prefix: str) -> dict[str, bytes]:
    """Every object under s3://prefix, by key relative to it, with its bytes."""
    return {k[len(prefix) + 1:]: s3.fs.cat_file(k) for k in s3.keys(prefix)}


def temps(keys) -> list[str]:
    return [k for k in keys if any(is_temp(part) for part in k.split("/"))]


@pytest.fixture(scope="module")
def s3_data(s3, demo_shards) -> dict:
    """Two demo tars in a bucket of their own and a zarr cache extracted from them into another."""
    shards = s3.upload(demo_shards[:2], s3.bucket())
    cache = f"s3://{s3.bucket()}/cache"
    r = mrmae_process(extract_args(shards, cache))
    return {"shards": shards, "cache": cache, "extract": r}


@pytest.fixture(scope="module")
def local_caches(s3_data, tmp_path_factory) -> dict[str, Path]:
    """The same s3:// shards extracted into local directories, per backend."""
    out = tmp_path_factory.mktemp("local")
    for backend in cf.backend_names():
        run_extraction(ExtractConfig(shards=s3_data["shards"], out=str(out / backend), teacher=DINO_TINY,
                                     views=ViewConfig(per_image=2), format=backend, batch_size=4, progress=False))
    return {b: out / b for b in cf.backend_names()}


def test_extraction_from_s3_into_s3_equals_the_local_cache_and_exits_clean(s3, s3_data, local_caches):
    assert_clean_exit(s3_data["extract"])
    s3.forget_listings()
    cache = s3_data["cache"]
    same_rows(cache, str(local_caches["zarr"]))
    assert entries(cache) == entries(str(local_caches["zarr"]))  # the same bytes, named alike
    assert not temps(s3.keys(cache.removeprefix("s3://")))
    r = mrmae_process(["cache", "info", "--feature-cache", cache])
    assert_clean_exit(r)
    info = dict(ln.split(None, 1) for ln in r.stdout.splitlines() if ln.strip())
    assert (info["shards_complete"], info["shards_total"], info["views"]) == ("2", "2", "24"), r.stdout
    r = mrmae_process(["cache", "verify", "--feature-cache", cache, "--recompute", "2", "--shards", s3_data["shards"]])
    assert_clean_exit(r)
    assert "integrity: OK" in r.stdout, r.stdout


def test_a_wds_cache_on_s3_equals_the_local_one(s3, s3_data, local_caches):
    cache = f"s3://{s3.bucket()}/cache"
    r = CliRunner().invoke(cli, [*extract_args(s3_data["shards"], cache), "--format", "wds"])
    assert r.exit_code == 0, r.output
    same_rows(cache, str(local_caches["wds"]))
    assert entries(cache) == entries(str(local_caches["wds"]))
    assert not temps(s3.keys(cache.removeprefix("s3://"))) and cf.check_integrity(cache) == []


def metrics(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]


def losses(out: Path) -> list[float]:
    return [m["loss"] for m in metrics(out)]


def test_cached_live_and_plain_pretraining_read_s3_as_local_files(s3, s3_data, local_caches, demo_shards, tmp_path):
    local = url_list(demo_shards[:2])
    runs = {"cached": ["--feature-cache"], "live": ["--teacher", DINO_TINY, "--views", "2"], "plain": []}
    for mode, extra in runs.items():
        for where, shards, cache in (("s3", s3_data["shards"], s3_data["cache"]),
                                     ("local", local, str(local_caches["zarr"]))):
            args = ["pretrain", "--shards", shards, *TINY, "--out", str(tmp_path / f"{mode}-{where}")]
            args += [*extra, cache] if mode == "cached" else extra
            if mode == "plain" and where == "s3":  # a process of its own: its exit is checked too
                assert_clean_exit(mrmae_process(args))
            else:
                r = CliRunner().invoke(cli, args)
                assert r.exit_code == 0, r.output + repr(r.exception)
        got = losses(tmp_path / f"{mode}-s3")
        assert got == losses(tmp_path / f"{mode}-local") and len(got) == 3, mode


def test_finetune_and_eval_read_s3_shards_as_local_files(s3, s3_data, demo_shards, tmp_path):
    from test_finetune import FT, records, save_small_student

    student = tmp_path / "student"
    save_small_student(student)
    train, val = s3_data["shards"].split("::")
    for where, (t, v) in {"s3": (train, val), "local": (str(demo_shards[0]), str(demo_shards[1]))}.items():
        r = CliRunner().invoke(cli, ["finetune", "--checkpoint", str(student), "--shards", t, "--val-shards", v,
                                     *FT, "--epochs", "1", "--out", str(tmp_path / f"ft-{where}")])
        assert r.exit_code == 0, r.output + repr(r.exception)
        r = CliRunner().invoke(cli, ["eval", "knn", "--checkpoint", str(student), "--shards", t,
                                     "--val-shards", v, "--k", "3", "--results", str(tmp_path / f"{where}.jsonl")])
        assert r.exit_code == 0, r.output + repr(r.exception)
    untimed = lambda ms: [{k: v for k, v in m.items() if k not in TIMING} for m in ms]  # noqa: E731
    s3_run, local_run = untimed(records(tmp_path / "ft-s3")), untimed(records(tmp_path / "ft-local"))
    assert s3_run == local_run and [m["step"] for m in s3_run if "loss" in m] == [1]
    knn = [json.loads((tmp_path / f"{w}.jsonl").read_text()) for w in ("s3", "local")]
    assert (knn[0]["n_train"], knn[0]["n_val"]) == (6, 6) and knn[0]["top1"] == knn[1]["top1"]


# --- publishing on a store without rename ---------------------------------------------

def test_conditional_create_lets_exactly_one_of_racing_writers_win(s3):
    """manifest.json and a PCA basis are created once, by whoever comes first: on S3 a PUT
    with If-None-Match: *, which the server refuses once the key exists."""
    from concurrent.futures import ThreadPoolExecutor

    root = f"s3://{s3.bucket()}/c"
    with ThreadPoolExecutor(8) as pool:
        won = list(pool.map(lambda i: cf.Location(root).create_exclusive("manifest.json", b"writer %d" % i), range(8)))
    assert won.count(True) == 1
    assert s3.fs.cat_file(f"{root[5:]}/manifest.json") == b"writer %d" % won.index(True)
    assert cf.Location(root).create_exclusive("manifest.json", b"late") is False
    assert s3.keys(root[5:]) == [f"{root[5:]}/manifest.json"]  # no temporary, nothing else


def test_a_reader_sees_what_another_process_published_since_its_first_listing(s3):
    """mrmae's s3fs instance is shared in the process and caches listings forever; another
    process's client (here the test's own) publishes an entry and a group file after the
    first listing, and every listing call of Location sees them."""
    bucket = s3.bucket()
    loc = cf.Location(f"s3://{bucket}/c")
    s3.fs.pipe_file(f"{bucket}/c/shards/a-00000000.json", b"{}")
    assert loc.glob("shards/*.json") == ["shards/a-00000000.json"]
    assert loc.children("shards") == ["a-00000000.json"] and not loc.exists("shards/b-00000000.json")
    s3.fs.pipe_file(f"{bucket}/c/shards/b-00000000.json", b"{}")
    s3.fs.pipe_file(f"{bucket}/c/shards/b.1234/zarr.json", b"{}")
    assert loc.glob("shards/*.json") == ["shards/a-00000000.json", "shards/b-00000000.json"]
    assert loc.children("shards") == ["a-00000000.json", "b-00000000.json", "b.1234"]
    assert loc.exists("shards/b-00000000.json") and loc.files("shards/b.1234") == [("zarr.json", 2)]


def _popen_extract(shards: str, cache: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "mrmae", *extract_args(shards, cache)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _halfway_through_a_publish(s3, cache: str, proc: subprocess.Popen) -> list[str]:
    """Wait until `proc` has uploaded part of a group whose entry is not written yet (the
    window a kill or a racing writer can hit on a store: no rename, one PUT per file);
    the group's objects seen then."""
    prefix, deadline = cache.removeprefix("s3://"), time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        keys = s3.keys(prefix) if s3.fs.exists(f"{prefix}/manifest.json") else []
        shards = {k.split("/shards/")[1].split("/")[0] for k in keys if "/shards/" in k} - {"zarr.json"}
        committed = {n[:-len(".json")] for n in shards if n.endswith(".json")}  # <name>.json: entries
        # groups are <name>.<sha256[:16]>: one whose entry is missing is being uploaded (its
        # file list, <group>.files, is no group)
        partial = sorted(g for g in shards if not g.endswith((".json", ".files")) and g.rsplit(".", 1)[0] not in committed)
        if partial:
            return [k for k in keys if f"/shards/{partial[0]}/" in k]
        time.sleep(0.01)
    err = proc.stderr.read().decode()[-2000:] if proc.poll() is not None else ""
    raise AssertionError(f"never saw a group half published (exit {proc.poll()}): {err}")


def _same_objects(s3, a: str, b: str) -> None:
    """Two caches on S3 hold the same objects with the same bytes; entries may differ in
    their timing only."""
    oa, ob = objects(s3, a.removeprefix("s3://")), objects(s3, b.removeprefix("s3://"))
    assert sorted(oa) == sorted(ob) and not temps(oa)
    for key in oa:
        if key.endswith(".json") and key.startswith("shards/") and key != "shards/zarr.json":
            untimed = lambda d: {k: v for k, v in json.loads(d).items() if k not in TIMING}  # noqa: E731
            assert untimed(oa[key]) == untimed(ob[key]), key
        else:
            assert oa[key] == ob[key], key


def test_a_killed_extraction_into_s3_resumes_to_the_same_objects(s3, s3_data):
    """SIGKILL while a group is half uploaded (its entry not written: the shard is not in
    the cache); `cache clean` removes the half group, the rerun redoes that shard and the
    cache holds exactly the objects of an uninterrupted run, no temporary object anywhere."""
    cache = f"s3://{s3.bucket()}/cache"
    proc = _popen_extract(s3_data["shards"], cache)
    try:
        group = _halfway_through_a_publish(s3, cache, proc)[0].split("/shards/")[1].split("/")[0]
    finally:
        proc.kill()
        proc.wait()
    s3.forget_listings()
    done = [e.source for e in cf.read_manifest(cache).shards]
    assert len(done) < 2 and group not in {Path(e.group).name for e in cf.read_manifest(cache).shards}
    r = CliRunner().invoke(cli, ["cache", "clean", "--feature-cache", cache, "--older-than", "0"])
    assert r.exit_code == 0 and "1 leftovers removed" in r.output, r.output  # its age read from LastModified
    assert not [k for k in s3.keys(cache[5:]) if f"/shards/{group}/" in k]
    assert_clean_exit(mrmae_process(extract_args(s3_data["shards"], cache)))
    s3.forget_listings()
    _same_objects(s3, cache, s3_data["cache"])
    assert cf.check_integrity(cache) == [] and len(cf.read_manifest(cache).shards) == 2


def test_two_writers_racing_into_one_s3_cache_lose_nothing(s3, s3_data):
    """Writer A is stopped (SIGSTOP) halfway through uploading a group; writer B extracts the
    same shards into the same cache, publishes that group over A's half (the same bytes,
    one PUT a file) and commits it; readers see whole groups only. A then resumes, finishes
    its upload of identical bytes and its entry; both succeed and the cache holds the
    objects of one uninterrupted writer."""
    cache = f"s3://{s3.bucket()}/cache"
    a = _popen_extract(s3_data["shards"], cache)
    try:
        _halfway_through_a_publish(s3, cache, a)
        a.send_signal(signal.SIGSTOP)
        assert_clean_exit(mrmae_process(extract_args(s3_data["shards"], cache)))
        s3.forget_listings()  # while A is stopped halfway: readers see B's whole groups
        assert cf.check_integrity(cache) == [] and len(cf.read_manifest(cache).shards) == 2
        a.send_signal(signal.SIGCONT)
        assert a.wait(240) == 0, a.stderr.read().decode()[-2000:]
    finally:
        with contextlib.suppress(ProcessLookupError):
            a.send_signal(signal.SIGCONT)
        if a.poll() is None:
            a.kill()
    s3.forget_listings()
    _same_objects(s3, cache, s3_data["cache"])
    same_rows(cache, s3_data["cache"])
    assert cf.check_integrity(cache) == []

"""Two nodes on one machine: two launcher agents, each with one process, that meet through
a rendezvous on 127.0.0.1 as two machines would through the head node's address.

torchrun: `--nnodes 2 --node-rank 0|1 --nproc-per-node 1 --rdzv-backend c10d
--rdzv-endpoint 127.0.0.1:PORT`; accelerate: `--num_machines 2 --machine_rank 0|1
--main_process_ip 127.0.0.1 --main_process_port PORT` (its torchrun launcher; gloo on CPU).
Extraction writes the cache of one process; pretraining with --data-split samples gives
the losses of one process, and with --data-split shards trains on every sample exactly
once per epoch across the nodes (counted by tests/_count_keys.py).
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import DINO_TINY, url_list

from mrmae.cli import cli
from mrmae.demo import write_demo_shards
from mrmae.extract.config import ExtractConfig
from mrmae.extract.runner import run_extraction
from mrmae.shared import cache_format as cf
from mrmae.shared.views import ViewConfig

pytestmark = pytest.mark.slow  # each launch starts 4 Python processes that import torch

COUNTER = Path(__file__).with_name("_count_keys.py")
TINY = ["--model", "mrmae_vit_tiny_patch16", "--decoder-depth", "1", "--decoder-dim", "32", "--workers", "0",
        "--no-progress", "--seed", "3", "--lr", "1e-3", "--epochs", "2", "--shuffle-buffer", "4"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_command(launcher: str, rank: int, port: int) -> list[str]:
    """The launcher of node `rank` of 2, one process each, meeting at 127.0.0.1:port."""
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(rank),
                "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
                "--rdzv-id", f"mrmae-test-{port}"]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "2", "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
            "--main_process_port", str(port), "--mixed_precision", "no", "--dynamo_backend", "no"]


def two_nodes(launcher: str, program: list[str], env: dict | None = None, timeout: int = 400) -> None:
    """Run `program` (`-m mrmae ARGS` or `SCRIPT ARGS`) on two nodes; both must exit 0."""
    port = free_port()
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo",
           **(env or {})}
    nodes = [subprocess.Popen([*node_command(launcher, rank, port), *program], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    try:
        outputs = [p.communicate(timeout=timeout)[0] for p in nodes]
    finally:
        for p in nodes:
            if p.poll() is None:
                p.kill()
    for p, out in zip(nodes, outputs):
        assert p.returncode == 0, out[-3000:]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[Path]:
    """Four tars of 6 images: two a node under --data-split shards."""
    return write_demo_shards(tmp_path_factory.mktemp("shards"), num_images=24, shard_size=6, seed=5)


@pytest.fixture(scope="module")
def one_process(shards, tmp_path_factory) -> dict[str, Path]:
    """What one process makes of the shards: a cache, and a run with --data-split samples."""
    out = tmp_path_factory.mktemp("one")
    run_extraction(ExtractConfig(shards=url_list(shards), out=str(out / "cache"), teacher=DINO_TINY,
                                 views=ViewConfig(per_image=2), batch_size=4, progress=False))
    r = CliRunner().invoke(cli, ["pretrain", "--shards", url_list(shards), *TINY, "--data-split", "samples",
                                 "--batch-size", "6", "--out", str(out / "run")])
    assert r.exit_code == 0, r.output + repr(r.exception)
    return {"cache": out / "cache", "run": out / "run"}


@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_two_nodes_extract_the_cache_of_one_process(shards, one_process, tmp_path, launcher):
    urls = url_list(shards)
    two_nodes(launcher, ["-m", "mrmae", "extract-features", "--shards", urls,
                         "--feature-cache", str(tmp_path / "two"), "--teacher", DINO_TINY, "--views", "2",
                         "--batch-size", "4", "--no-progress"])
    one, two = cf.FeatureCache(one_process["cache"]), cf.FeatureCache(tmp_path / "two")
    assert len(two.complete_shards) == 4
    for s in one.complete_shards:
        a, b = one.shard(s.source).read(slice(None)), two.shard(s.source).read(slice(None))
        for col in a:
            np.testing.assert_array_equal(a[col], b[col], err_msg=col)
    strip = lambda c: [dataclasses.replace(s, seconds=None) for s in cf.read_manifest(c).shards]  # noqa: E731
    assert strip(one_process["cache"]) == strip(tmp_path / "two")  # the same bytes: every group's sha256


def metrics(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_two_nodes_pretrain_as_one_process_or_each_sample_once(shards, one_process, tmp_path, launcher):
    urls = url_list(shards)
    # --data-split samples: the global batches of one process, so its losses
    two_nodes(launcher, ["-m", "mrmae", "pretrain", "--shards", urls, *TINY, "--data-split", "samples",
                         "--batch-size", "3", "--out", str(tmp_path / "two")])
    one, two = metrics(one_process["run"]), metrics(tmp_path / "two")
    assert len(one) == len(two) == 8  # 24 samples, global batches of 6, 2 epochs
    for a, b in zip(one, two):
        assert a["lr"] == b["lr"] and a["loss"] == pytest.approx(b["loss"], rel=1e-4), a["step"]
    assert json.loads((tmp_path / "two" / "config.json").read_text())["num_processes"] == 2

    # --data-split shards: each node reads its own shards; every sample once per epoch
    counted = tmp_path / "keys"
    counted.mkdir()
    two_nodes(launcher, [str(COUNTER), "pretrain", "--shards", urls, *TINY, "--data-split", "shards",
                         "--batch-size", "3", "--out", str(tmp_path / "split")], env={"MRMAE_TEST_KEYS": str(counted)})
    batches = {p.stem: [json.loads(ln) for ln in p.read_text().splitlines()] for p in counted.glob("rank*.jsonl")}
    assert sorted(batches) == ["rank0", "rank1"]
    every = {k for p in shards for k in _tar_keys(p)}
    assert len(every) == 24
    for epoch in (0, 1):
        per_rank = {r: [k for b in bs if b["epoch"] == epoch for k in b["keys"]] for r, bs in batches.items()}
        assert all(len(v) == 12 for v in per_rank.values())  # 4 steps of 3 samples on each node
        seen = Counter(k for v in per_rank.values() for k in v)
        assert set(seen) == every and set(seen.values()) == {1}, seen  # each sample exactly once
        assert not set(per_rank["rank0"]) & set(per_rank["rank1"])
    assert len(metrics(tmp_path / "split")) == 8


def _tar_keys(path: Path) -> list[str]:
    from mrmae.shared.shards import iter_samples

    return [s.key for s in iter_samples(str(path))]

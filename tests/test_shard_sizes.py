"""An epoch's length without reading every tar: webdataset's sizes.json beside the shards,
written by make-demo-shards and `mrmae shards index`, read by plain and live pretraining
and checked against each tar as it is read; hostile sizes files are one line."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import put_hostile, url_list

from mrmae.cli import cli
from mrmae.demo import write_demo_shards
from mrmae.shared.shard_sizes import SIZES_FILE, SizesError, read_sizes
from mrmae.train.pretrain import count_samples

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

TINY = ["--model", "mrmae_vit_tiny_patch16", "--decoder-depth", "1", "--decoder-dim", "32", "--batch-size", "4",
        "--workers", "0", "--no-progress", "--seed", "3"]


@pytest.fixture
def shards(demo_shards, tmp_path) -> list[Path]:
    """A copy of the 3 demo tars (6 samples each) in a directory of their own, no sizes file."""
    out = tmp_path / "shards"
    out.mkdir()
    return [Path(shutil.copy(p, out / p.name)) for p in demo_shards]


def test_make_demo_shards_and_shards_index_record_what_training_counts(shards, tmp_path):
    r = CliRunner().invoke(cli, ["make-demo-shards", "--out", str(tmp_path / "d"), "--num-images", "10",
                                 "--shard-size", "4"])
    assert r.exit_code == 0, r.output
    demo = json.loads((tmp_path / "d" / SIZES_FILE).read_text())
    assert demo == {"demo-000000.tar": 4, "demo-000001.tar": 4, "demo-000002.tar": 2}
    sizes = shards[0].parent / SIZES_FILE
    sizes.write_text(json.dumps({"other-000.tar": 9}))  # another shard's count: kept
    r = CliRunner().invoke(cli, ["shards", "index", "--shards", url_list(shards[:2])])
    assert r.exit_code == 0 and f"{sizes}: 2 shards, 12 samples" in r.output, r.output
    assert json.loads(sizes.read_text()) == {"demo-000000.tar": 6, "demo-000001.tar": 6, "other-000.tar": 9}
    recorded = read_sizes([str(p) for p in shards])
    assert recorded.counts == {str(shards[0]): 6, str(shards[1]): 6} and recorded.unrecorded == [str(shards[2])]


def test_an_epoch_is_counted_from_the_sizes_file_without_opening_a_tar(shards):
    """On a store with latency, counting an epoch of recorded shards asks for the sizes file
    alone (one GET), where counting them read every tar."""
    from _latency_fs import LatencyMemoryFileSystem as Store

    write_demo_shards(shards[0].parent, num_images=18, shard_size=6, seed=0, sizes=True)
    Store.clear()
    try:
        Store.upload_tree(shards[0].parent, "latmem://sizes/shards")
        Store.latency = 0.0
        urls = [f"latmem://sizes/shards/{p.name}" for p in shards]
        Store.reset_stats(record=True)
        assert count_samples(urls, None) == 18
        assert [p for m, p in Store.stats()["log"] if m in ("cat_file", "_open")] == ["/sizes/shards/sizes.json"]
        Store.reset_stats(record=True)
        (shards[0].parent / SIZES_FILE).unlink()
        Store.clear()
        Store.upload_tree(shards[0].parent, "latmem://sizes/shards")
        assert count_samples(urls, None) == 18  # no file: each tar read to its end, as before
        assert sum(m == "_open" for m, _ in Store.stats()["log"]) == 3
    finally:
        Store.clear()


@pytest.mark.parametrize("recorded", [5, 7])
def test_a_tar_holding_another_count_than_recorded_stops_the_run_in_one_line(shards, tmp_path, recorded):
    """sizes.json says 5 (or 7) samples for a 6-sample tar: plain pretraining stops at that
    tar (5: as soon as a sixth sample is read) with one line naming it and the file."""
    sizes = shards[0].parent / SIZES_FILE
    sizes.write_text(json.dumps({p.name: 6 for p in shards} | {shards[1].name: recorded}))
    r = CliRunner().invoke(cli, ["pretrain", "--shards", url_list(shards), "--out", str(tmp_path / "run"), *TINY,
                                 "--views", "2"])
    lines = [ln for ln in r.output.splitlines() if ln.startswith("mrmae: error")]
    assert r.exit_code == 1 and len(lines) == 1, r.output
    assert f"{shards[1]}: holds {'more than the 5' if recorded == 5 else '6 samples, ' + str(sizes) + ' records 7'}" \
        in lines[0] and str(sizes) in lines[0] and "mrmae shards index" in lines[0], lines
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_plain_run_trains_the_steps_of_its_recorded_counts(shards, tmp_path):
    """A true sizes file: the run counts its epoch from it and trains every step, each tar
    checked against its count as it is read."""
    write_demo_shards(shards[0].parent, num_images=18, shard_size=6, seed=0, sizes=True)
    r = CliRunner().invoke(cli, ["pretrain", "--shards", url_list(shards), "--out", str(tmp_path / "run"), *TINY,
                                 "--views", "2"])
    assert r.exit_code == 0, r.output
    metrics = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len([m for m in metrics if "loss" in m]) == 5  # 18 samples, batch 4: 4 steps and a partial one


@pytest.mark.parametrize("how", ["truncated", "huge", "a FIFO", "a directory", "not counts", "a key twice"])
def test_a_hostile_sizes_file_is_one_line(shards, how):
    sizes = shards[0].parent / SIZES_FILE
    text = json.dumps({p.name: 6 for p in shards})
    if put_hostile(sizes, how, text.encode()):
        pass
    elif how == "not counts":
        sizes.write_text(json.dumps({shards[0].name: "6"}))
    else:
        sizes.write_text(text[:-1] + f', "{shards[0].name}": 7}}')
    want = {"truncated": "unreadable", "huge": "more than", "a FIFO": "a FIFO, not a regular file",
            "a directory": "a directory, not a regular file", "not counts": "expected a number of samples",
            "a key twice": "appears twice"}[how]
    with pytest.raises(SizesError, match=want) as caught:
        read_sizes([str(p) for p in shards])
    assert str(sizes) in str(caught.value) and "\n" not in str(caught.value)


def test_names_of_shards_not_given_are_ignored_never_opened(shards, tmp_path):
    """A sizes file of a whole dataset (or crafted): only the given shards' names are looked
    up; a name that is a path is a name, never opened."""
    sizes = shards[0].parent / SIZES_FILE
    sizes.write_text(json.dumps({shards[0].name: 6, "../../etc/passwd": 3, "/dev/zero": 1, "x" * 4000: 2}))
    recorded = read_sizes([str(shards[0]), str(shards[1])])
    assert recorded.counts == {str(shards[0]): 6} and recorded.unrecorded == [str(shards[1])]
    assert count_samples([str(shards[0]), str(shards[1])], None) == 12

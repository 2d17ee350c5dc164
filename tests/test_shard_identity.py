"""A shard is what was extracted: a truncated tar is an error, never a shorter complete shard;
other images behind the same name are refused; rows record their image sha256.

"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import DINO_TINY, error_line

from mrmae.cli import cli
from mrmae.demo import write_demo_shards
from mrmae.extract.config import ExtractConfig
from mrmae.extract.runner import run_extraction
from mrmae.shared import cache_format as cf
from mrmae.shared.views import ViewConfig


def _cut_at(data: bytes, where: str) -> bytes:
    """A tar cut inside its 2nd member's data, exactly after it, or inside the 3rd header."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        second, third = tf.getmembers()[1:3]
    return data[:{"mid-member": second.offset_data + second.size // 2, "boundary": third.offset,
                  "in-header": third.offset + 100}[where]]




@pytest.mark.parametrize("where", ["mid-member", "boundary", "in-header"])
def test_4_truncated_shard_stops_extraction_and_pretraining_naming_it(demo_shards, tmp_path, where):
    cut = tmp_path / "demo-000000.tar"
    cut.write_bytes(_cut_at(demo_shards[0].read_bytes(), where))
    for url in (str(cut), f"pipe:cat {cut}"):
        out = tmp_path / ("c-pipe" if url.startswith("pipe:") else "c-path")
        r = CliRunner().invoke(cli, ["extract-features", "--shards", f"{demo_shards[1]}::{url}", "--feature-cache", str(out),
                                     "--teacher", DINO_TINY, "--views", "1", "--no-progress"])
        assert error_line(r).startswith(f"mrmae: error: {url}: truncated tar")
        entries = cf.read_manifest(out).shards  # the whole shard before it is kept; the cut one is not
        assert [e.source for e in entries if e.status == "complete"] == [str(demo_shards[1])]
        r = CliRunner().invoke(cli, ["pretrain", "--shards", url, "--out", str(tmp_path / "p"), "--model",
                                     "mrmae_vit_tiny_patch16", "--workers", "0", "--no-progress"])  # plain: counts samples first
        assert error_line(r).startswith(f"mrmae: error: {url}: truncated tar")


def test_4_truncated_pipe_shard_is_one_line_from_a_real_process(demo_shards, tmp_path):
    cut = tmp_path / "demo-000000.tar"
    cut.write_bytes(_cut_at(demo_shards[0].read_bytes(), "boundary"))
    r = subprocess.run([sys.executable, "-m", "mrmae", "extract-features", "--shards", f"pipe:cat {cut}", "--feature-cache",
                        str(tmp_path / "c"), "--teacher", DINO_TINY, "--views", "1", "--no-progress"],
                       capture_output=True, text=True, timeout=120)
    errors = [ln for ln in r.stderr.splitlines() if "error" in ln.lower()]
    assert r.returncode == 1 and len(errors) == 1 and "Traceback" not in r.stderr, r.stderr
    assert errors[0].startswith(f"mrmae: error: pipe:cat {cut}: truncated tar: ends without its end-of-archive")

# --- 5. shard identity: the bytes trained on are the bytes extracted -------------------

TINY_PRETRAIN = ["--model", "mrmae_vit_tiny_patch16", "--decoder-depth", "1", "--decoder-dim", "64",
                 "--batch-size", "6", "--workers", "0", "--no-progress", "--seed", "3", "--lr", "1e-3"]


def test_5_plain_live_and_finetune_count_pipe_and_url_shards(demo_shards, tmp_path):
    """`count_samples` reads `pipe:` and fsspec shards as it reads local ones; plain and live
    pretraining and fine-tuning run on them."""
    import fsspec
    from test_finetune import FT, save_small_student

    from mrmae.train.pretrain import count_samples

    with fsspec.open("memory://faults-5/demo-000001.tar", "wb") as f:
        f.write(demo_shards[1].read_bytes())
    shards = f"pipe:cat {demo_shards[0]}::memory://faults-5/demo-000001.tar"
    assert count_samples([f"pipe:cat {demo_shards[0]}", "memory://faults-5/demo-000001.tar",
                          f"file://{demo_shards[2]}"], None) == 18
    for mode, extra in (("plain", []), ("live", ["--teacher", DINO_TINY])):
        r = CliRunner().invoke(cli, ["pretrain", "--shards", shards, "--out", str(tmp_path / mode), *TINY_PRETRAIN,
                                     *extra])
        assert r.exit_code == 0, r.output + repr(r.exception)
        steps = [json.loads(ln) for ln in (tmp_path / mode / "metrics.jsonl").read_text().splitlines()]
        assert len(steps) == 2  # 12 samples counted, batch 6
    save_small_student(tmp_path / "student")
    r = CliRunner().invoke(cli, ["finetune", "--checkpoint", str(tmp_path / "student"), "--shards", shards,
                                 "--val-shards", f"file://{demo_shards[2]}", "--out", str(tmp_path / "ft"), *FT,
                                 "--epochs", "1"])
    assert r.exit_code == 0, r.output + repr(r.exception)
    assert [m["step"] for m in map(json.loads, (tmp_path / "ft" / "metrics.jsonl").read_text().splitlines())
            if "loss" in m] == [1, 2, 3]  # 12 images / batch 4


def _other_images(tmp_path, n: int = 12):
    """(shard A, shard B, cache of A): B has A's file name and keys, other images."""
    a = write_demo_shards(tmp_path / "a", num_images=n, shard_size=n, seed=0)[0]
    b = write_demo_shards(tmp_path / "b", num_images=n, shard_size=n, seed=1)[0]
    assert a.name == b.name and a.read_bytes() != b.read_bytes()
    cache = tmp_path / "cache"
    run_extraction(ExtractConfig(shards=str(a), out=str(cache), teacher=DINO_TINY, views=ViewConfig(per_image=1),
                                 batch_size=12, progress=False))
    return a, b, cache


def test_5_other_images_behind_the_same_name_stop_pretraining_before_any_step(tmp_path):
    """A cache extracted from shard A; pretraining (a real process) on `pipe:cat B`, B holding
    the same file and key names with other images: one line naming the shard and its FIRST
    key, before any step (no metrics line, no checkpoint; with the shard-level sha256 alone,
    a batch of B's images trained before the shard's end). At a URL alike."""
    import fsspec


    a, b, cache = _other_images(tmp_path)
    args = ["pretrain", "--feature-cache", str(cache), *TINY_PRETRAIN, "--shuffle-buffer", "0",
            "--save-every-steps", "1"]
    r = CliRunner().invoke(cli, [*args, "--shards", f"pipe:cat {a}", "--out", str(tmp_path / "ok")])
    assert r.exit_code == 0, r.output + repr(r.exception)  # the extracted bytes, piped: trains
    assert len((tmp_path / "ok" / "metrics.jsonl").read_text().splitlines()) == 2
    out = tmp_path / "other"
    r = subprocess.run([sys.executable, "-m", "mrmae", *args, "--shards", f"pipe:cat {b}", "--out", str(out)],
                       capture_output=True, text=True, timeout=120)
    errors = [ln for ln in r.stderr.splitlines() if "error" in ln.lower()]
    assert r.returncode != 0 and len(errors) == 1 and "Traceback" not in r.stderr, r.stderr
    assert errors[0].startswith(f"mrmae: error: pipe:cat {b}: key demo_00000000: image differs from the one "
                                f"extracted into {cache}"), errors[0]
    written = {p.relative_to(out).as_posix(): p for p in out.rglob("*") if p.is_file()}
    assert set(written) <= {"config.json", "metrics.jsonl"}, sorted(written)  # no checkpoint
    assert "metrics.jsonl" not in written or written["metrics.jsonl"].read_text() == ""  # no step
    with fsspec.open(f"memory://faults-5b/{b.name}", "wb") as f:  # a URL: no size to compare, only bytes
        f.write(b.read_bytes())
    r = CliRunner().invoke(cli, [*args, "--shards", f"memory://faults-5b/{b.name}", "--out", str(tmp_path / "url")])
    assert error_line(r).startswith(f"mrmae: error: memory://faults-5b/{b.name}: key demo_00000000: image differs")
    # A's images, another label member: the images pass, the shard's sha256 stops it
    relabelled = tmp_path / "c" / a.name
    relabelled.parent.mkdir()
    with tarfile.open(a) as src, tarfile.open(relabelled, "w") as dst:
        for m in src.getmembers():
            data = src.extractfile(m).read()
            data = b"99" if m.name.endswith(".cls") else data
            m.size = len(data)
            dst.addfile(m, io.BytesIO(data))
    r = CliRunner().invoke(cli, [*args, "--shards", f"pipe:cat {relabelled}", "--out", str(tmp_path / "cls")])
    assert error_line(r).startswith(f"mrmae: error: pipe:cat {relabelled}: not the shard extracted into {cache}")


def test_5_add_teacher_verify_and_visualize_refuse_other_images_behind_the_same_name(tmp_path):
    """--add-teacher --shards B replays A's views: B's first image is refused before any view
    is rendered, one line naming the shard and key; no target shard is written. `cache
    verify --shards B` and `visualize --shards B` alike."""
    a, b, cache = _other_images(tmp_path, n=6)
    r = CliRunner().invoke(cli, ["extract-features", "--feature-cache", str(cache), "--add-teacher", DINO_TINY, "--name", "t",
                                 "--shards", str(b), "--no-progress"])
    assert error_line(r).startswith(f"mrmae: error: {b}: key demo_00000000: image differs from the one extracted "
                                     f"into {cache}")
    assert [p.name for p in (cache / "targets" / "t").glob("shards/*")] in ([], ["zarr.json"])  # no shard written
    # cache verify's re-rendering and visualize replay views from B alike: refused, naming the key
    r = CliRunner().invoke(cli, ["cache", "verify", "--feature-cache", str(cache), "--recompute", "2", "--shards", str(b)])
    assert f"{b}: key demo_0000000" in error_line(r) and "image differs from the one extracted" in error_line(r)
    r = CliRunner().invoke(cli, ["visualize", "--feature-cache", str(cache), "--shards", str(b), "--num", "1",
                                 "--out", str(tmp_path / "v")])
    assert error_line(r).startswith(f"mrmae: error: {b}: key demo_00000000: image differs from the one extracted")


@pytest.mark.parametrize("backend", ["zarr", "wds"])
def test_5_rows_record_their_image_sha256(demo_shards, tmp_path, backend):
    """Every row records the sha256 of the image file its view was rendered from (Zarr:
    array image_sha256 [N, 32] uint8 with a crc32c; wds: sealed meta.json field); a damaged
    digest is one line naming the shard."""
    import dataclasses
    import hashlib


    from mrmae.shared.shards import read_shard

    cache = tmp_path / "cache"
    run_extraction(ExtractConfig(shards=str(demo_shards[0]), out=str(cache), teacher=DINO_TINY, format=backend,
                                 views=ViewConfig(per_image=2), batch_size=12, progress=False))
    group = cf.FeatureCache(str(cache)).shard(str(demo_shards[0]))
    images = {s.key: hashlib.sha256(s.image).digest() for s in read_shard(str(demo_shards[0]))}
    digests = group.image_digests()
    assert digests.dtype == np.uint8 and digests.shape == (12, 32)
    assert [group.image_digest(i) for i in range(12)] == [images[str(k)] for k in group.keys]
    if backend == "zarr":
        meta = json.loads((Path(group.path) / "image_sha256" / "zarr.json").read_text())
        assert "crc32c" in [c["name"] for c in meta["codecs"]]
        chunk = Path(group.path) / "image_sha256" / "c" / "0" / "0"
        data = bytearray(chunk.read_bytes())
        data[len(data) // 2] ^= 0xFF
        chunk.write_bytes(bytes(data))
        with pytest.raises(cf.CacheError, match=r"file image_sha256/c/0/0 \(all rows\): sha256 differs"):
            cf.ShardGroup(group.path, group.entry).image_digests()  # (its entry lists the file's sha256)
        with pytest.raises(cf.CacheError, match=r"array image_sha256, all rows: unreadable chunk"):
            cf.ShardGroup(group.path, dataclasses.replace(group.entry, files=None)).image_digests()  # format 4
    else:  # the field is sealed: another digest fails meta.json's crc32c

        with tarfile.open(group.path) as tf:
            first = next(m for m in tf.getmembers() if m.name.endswith(".meta.json"))
            assert json.loads(tf.extractfile(first).read())["image_sha256"] == images[str(group.keys[0])].hex()
        raw = bytearray(Path(group.path).read_bytes())
        at = raw.index(images[str(group.keys[0])].hex().encode())
        raw[at] = ord("0") if raw[at] != ord("0") else ord("1")
        Path(group.path).write_bytes(bytes(raw))
        with pytest.raises(cf.CacheError, match=r"meta.json, row 0: sha256 differs from the entry's"):
            cf.WdsShard(group.path, group.entry).image_digests()
        with pytest.raises(cf.CacheError, match=r"meta.json, row 0: checksum mismatch"):  # format 4: its own seal
            cf.WdsShard(group.path, dataclasses.replace(group.entry, files=None)).image_digests()

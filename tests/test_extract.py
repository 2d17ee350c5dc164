"""Extraction end to end on real tars, real Zarr stores and real teachers."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from click.testing import CliRunner
from conftest import CLIP_SMALL, DINO_TINY, entry_files, extract, launch_two, url_list
from PIL import Image

from mrmae.cli import cli
from mrmae.extract.config import ExtractConfig
from mrmae.extract.runner import run_extraction
from mrmae.shared.cache_format.info import cache_info
from mrmae.extract.verify import verify_cache
from mrmae.shared import cache_format as cf
from mrmae.shared.views import ViewConfig




def all_rows(root) -> dict[str, dict[str, np.ndarray]]:
    cache = cf.FeatureCache(root)
    return {s.source: cache.shard(s.source).read(slice(None)) for s in cache.complete_shards}


def test_views_and_targets_do_not_depend_on_batch_size_or_workers(demo_shards, tmp_path):
    urls = url_list(demo_shards)
    extract(urls, tmp_path / "a", batch_size=3, workers=0)
    extract(urls, tmp_path / "b", batch_size=8, workers=2)
    a, b = all_rows(tmp_path / "a"), all_rows(tmp_path / "b")
    assert a.keys() == b.keys() and len(a) == 3
    for src in a:
        for col in ("keys", "view", "crop", "flip"):
            np.testing.assert_array_equal(a[src][col], b[src][col])
        assert list(a[src]["view"]) == [0, 1] * 6  # tar order, views 0..K-1 per sample
        # float reductions may differ in the last bits between batch shapes; int8 codes
        # then differ by at most one step
        np.testing.assert_allclose(a[src]["features"], b[src]["features"], atol=0.02, rtol=0.02)
        np.testing.assert_allclose(a[src]["attention"], b[src]["attention"], atol=1e-3)


@pytest.mark.parametrize("dtype,floor,group", [("int8", 0.999, 64), ("int8", 0.999, None), ("float16", 0.99999, 64)])
def test_stored_views_replay_through_the_teacher(demo_shards, tmp_path, dtype, floor, group):
    extract(str(demo_shards[0]), tmp_path / "c", teacher=CLIP_SMALL, dtype=dtype, batch_size=4, int8_group=group)
    values, scale = cf.FeatureCache(tmp_path / "c").shard(str(demo_shards[0])).stored_row(0)
    if dtype == "int8":  # ViT-S: 384 channels, 6 groups of 64 or one scale per token
        assert values.dtype == np.int8 and scale.shape == ((196, 6) if group else (196,))
    else:
        assert values.dtype == np.float16 and scale is None
    report = verify_cache(str(tmp_path / "c"), recompute=5, seed=1)
    assert report.checked == 5 and report.ok
    assert report.worst_cosine >= floor and report.tolerance == floor
    info = cache_info(str(tmp_path / "c"))
    assert info["views"] == 12 and info["shards_complete"] == 1 and info["bytes_per_view"] > 0
    if dtype == "float16":  # once: `mrmae cache info` in a fresh interpreter reads the cache without torch
        import subprocess
        import sys

        code = ("import sys\nfrom mrmae.cli import main\ntry:\n    main(['cache', 'info', '--feature-cache', "
                f"{str(tmp_path / 'c')!r}, '--json'])\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
                "print('torch' in sys.modules)")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        assert '"views": 12' in out and out.splitlines()[-1] == "False", out


def test_verify_detects_a_cache_that_does_not_replay(demo_shards, tmp_path):
    import zarr

    out = tmp_path / "c"
    extract(str(demo_shards[0]), out, teacher=DINO_TINY)
    entry = cf.read_manifest(out).shards[0]
    crop = zarr.open_array(str(out / entry.group / "crop"), mode="r+")
    boxes = crop[:]
    boxes[:, 0] = 0  # move every crop to the top: stored targets no longer match the view
    boxes[:, 2] = np.maximum(boxes[:, 2] // 2, 16)
    crop[:] = boxes
    report = verify_cache(str(out), recompute=6)
    assert not report.ok and len(report.problems) == 1 and report.checked == 0  # integrity catches it
    # Even with a matching checksum (say, a cache written by a buggy extractor), the replay
    # through the teacher shows the targets are not those of the recorded views.
    digest, size, files = cf.group_files(out / entry.group)
    cf.record_shard(out, dataclasses.replace(entry, sha256=digest, bytes=size, files=files))
    report = verify_cache(str(out), recompute=6)
    assert not report.problems and report.checked == 6 and not report.ok and report.worst_cosine < 0.99


def test_resume_skips_complete_shards_and_equals_an_uninterrupted_run(demo_shards, tmp_path):
    urls = url_list(demo_shards)
    extract(urls, tmp_path / "full")
    out = tmp_path / "resumed"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "mrmae", "extract-features", "--shards", urls, "--feature-cache", str(out),
           "--teacher", DINO_TINY, "--views", "2", "--batch-size", "2", "--no-progress"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:  # kill as soon as the first shard is recorded complete
        if entry_files(out / "shards"):  # an entry: that shard is complete
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = [s.source for s in cf.read_manifest(out).shards]
    assert 1 <= len(done) < 3, "the kill should land mid-run"
    first_group = out / cf.read_manifest(out).shards[0].group
    stamp = (first_group / "zarr.json").stat().st_mtime_ns
    summary = extract(urls, out)
    assert summary["skipped_complete"] == len(done) and summary["extracted"] == 3 - len(done)
    assert (first_group / "zarr.json").stat().st_mtime_ns == stamp  # not rewritten
    # The killed writer's temp group stays (no writer removes another's: it may be live)
    # until `mrmae cache clean` removes it.
    temps = {str(p) for p in (out / "shards").glob(".tmp-*")}
    assert temps <= set(cf.clean_cache(out, older_than_hours=0)) and not list((out / "shards").glob(".tmp-*"))
    full, resumed = all_rows(tmp_path / "full"), all_rows(out)
    assert full.keys() == resumed.keys()
    for src in full:
        for col in full[src]:
            np.testing.assert_array_equal(full[src][col], resumed[src][col])


def test_refuses_to_add_with_another_configuration(demo_shards, tmp_path):
    out = tmp_path / "c"
    extract(str(demo_shards[0]), out)
    runner = CliRunner()
    base = ["extract-features", "--shards", str(demo_shards[1]), "--feature-cache", str(out), "--no-progress"]
    for extra, field in ([["--teacher", DINO_TINY, "--views", "3"], "views.per_image"],
                         [["--teacher", DINO_TINY, "--dtype", "float16"], "storage.dtype"],
                         [["--teacher", "dino:vit_small_patch16_224"], "teacher."],
                         [["--teacher", DINO_TINY, "--seed", "1"], "views.seed"],
                         [["--teacher", DINO_TINY, "--int8-group", "0"], "storage."]):
        r = runner.invoke(cli, base + extra)
        assert r.exit_code == 1, r.output
        lines = [ln for ln in r.output.splitlines() if ln.startswith("mrmae: error")]
        assert len(lines) == 1 and "refusing to add" in lines[0] and field in lines[0] and str(out) in lines[0]
    assert [s.source for s in cf.read_manifest(out).shards] == [str(demo_shards[0])]


def _bad_shard(path: Path) -> Path:
    good = io.BytesIO()
    Image.new("RGB", (300, 240), (30, 140, 200)).save(good, format="JPEG")
    corrupt = bytearray(good.getvalue())
    corrupt[200:600] = b"\x00" * 400
    png = io.BytesIO()
    Image.new("L", (260, 210), 90).save(png, format="PNG")
    cmyk = io.BytesIO()
    Image.new("CMYK", (250, 220), (0, 50, 90, 10)).save(cmyk, format="JPEG")
    with wds.TarWriter(str(path)) as sink:
        sink.write({"__key__": "ok_0", "jpg": good.getvalue(), "cls": b"1"})
        sink.write({"__key__": "corrupt_1", "jpg": bytes(corrupt[: len(corrupt) // 3]), "cls": b"1"})
        sink.write({"__key__": "text_2", "jpg": b"<html>not an image</html>", "cls": b"1"})
        sink.write({"__key__": "noimage_3", "cls": b"1"})
        sink.write({"__key__": "png_4", "jpg": png.getvalue(), "cls": b"2"})  # PNG bytes under .jpg
        sink.write({"__key__": "cmyk_5", "jpg": cmyk.getvalue(), "cls": b"3"})
    return path


def test_corrupt_images_are_counted_named_and_recorded_never_stored(tmp_path):
    shard = _bad_shard(tmp_path / "bad.tar")
    with pytest.warns(UserWarning, match=r"bad.tar: 2 samples: undecodable image \(keys corrupt_1, text_2"):
        extract(str(shard), tmp_path / "c")
    entry = cf.read_manifest(tmp_path / "c").shards[0]
    assert sorted(s.key for s in entry.skipped) == ["corrupt_1", "noimage_3", "text_2"]
    assert entry.num_samples == 3 and entry.num_views == 6
    rows = all_rows(tmp_path / "c")[str(shard)]
    assert sorted(set(rows["keys"])) == ["cmyk_5", "ok_0", "png_4"]  # converted, not skipped
    r = CliRunner().invoke(cli, ["extract-features", "--shards", str(shard), "--feature-cache", str(tmp_path / "s"),
                                 "--teacher", DINO_TINY, "--strict", "--no-progress"])
    assert r.exit_code == 1 and "key corrupt_1" in r.output and "bad.tar" in r.output
    assert cf.read_manifest(tmp_path / "s").shards == ()  # nothing half-written looks complete
    assert [p.name for p in (tmp_path / "s" / "shards").iterdir()] == ["zarr.json"]  # the `shards` group alone


def test_missing_and_truncated_shards_are_one_clear_line(tmp_path, demo_shards):
    runner = CliRunner()
    trunc = tmp_path / "trunc.tar"
    trunc.write_bytes(demo_shards[0].read_bytes()[:30000])
    for shard, words in ((tmp_path / "missing.tar", "No such file"), (trunc, "truncated tar")):
        r = runner.invoke(cli, ["extract-features", "--shards", str(shard), "--feature-cache", str(tmp_path / "c"),
                                "--teacher", DINO_TINY, "--no-progress"])
        err = [ln for ln in r.output.splitlines() if ln.startswith("mrmae: error")]
        assert r.exit_code == 1 and len(err) == 1 and str(shard) in err[0] and words in err[0], r.output


@pytest.mark.parametrize("launcher,remote", [("torchrun", False), ("accelerate", True)])
def test_two_processes_write_the_same_cache_as_one(demo_shards, tmp_path, launcher, remote):
    """Under torchrun into a directory, and under accelerate launch into a file:// URL (the
    fsspec path every object store takes: staged shards, uploaded, entries written last)."""
    urls = url_list(demo_shards)
    extract(urls, tmp_path / "one", batch_size=4)
    out = f"file://{tmp_path / 'two'}" if remote else str(tmp_path / "two")
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([*launch_two(launcher), "extract-features", "--shards", urls, "--feature-cache", out, "--teacher", DINO_TINY,
                        "--views", "2", "--batch-size", "4", "--no-progress"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    one, two = all_rows(tmp_path / "one"), all_rows(out)
    assert one.keys() == two.keys() and len(two) == 3
    for src in one:
        for col in one[src]:
            np.testing.assert_array_equal(one[src][col], two[src][col])
    m1, m2 = cf.read_manifest(tmp_path / "one"), cf.read_manifest(out)
    strip = lambda m: [dataclasses.replace(s, seconds=None) for s in m.shards]  # noqa: E731
    assert strip(m1) == strip(m2)  # the same bytes too: the recorded sha256 of every group
    assert cf.check_integrity(out) == []


def test_cache_verify_reports_bit_rot_truncation_and_missing_groups(demo_shards, tmp_path):
    import shutil

    out = tmp_path / "c"
    extract(url_list(demo_shards), out)
    runner = CliRunner()
    r = runner.invoke(cli, ["cache", "verify", "--feature-cache", str(out), "--recompute", "0"])
    assert r.exit_code == 0 and "integrity: OK" in r.output
    groups = [out / s.group for s in cf.read_manifest(out).shards]
    chunk = next(f for f in sorted((groups[0] / "features").rglob("*")) if f.is_file())
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit
    chunk.write_bytes(bytes(data))
    chunk2 = next(f for f in sorted((groups[1] / "attention").rglob("*")) if f.is_file())
    chunk2.write_bytes(chunk2.read_bytes()[:-5])  # truncated
    shutil.rmtree(groups[2])
    r = runner.invoke(cli, ["cache", "verify", "--feature-cache", str(out), "--recompute", "0"])
    damaged = [ln for ln in r.output.splitlines() if ln.startswith("mrmae: damaged")]
    assert r.exit_code == 1 and len(damaged) == 3
    assert str(groups[0]) in damaged[0] and "file features/c/0/0/0 (rows 0-11): sha256 differs" in damaged[0]
    assert str(groups[1]) in damaged[1] and "file attention/c/0/0 (rows 0-11):" in damaged[1]
    assert "bytes, the entry lists" in damaged[1]
    assert str(groups[2]) in damaged[2] and "missing" in damaged[2]


def test_a_version_2_cache_reads_and_grows_only_with_per_token_scales(demo_shards, tmp_path):
    """Format 2 had one int8 scale per token and no storage.int8_group: such a cache still
    reads, grows with --int8-group 0, and refuses the grouped default in one line; an
    unknown format version is refused by name."""
    out = tmp_path / "c"
    extract(str(demo_shards[0]), out, int8_group=None)
    manifest_path = out / cf.MANIFEST
    manifest = json.loads(manifest_path.read_text())
    manifest["format_version"] = 2
    del manifest["storage"]["int8_group"]
    manifest_path.write_text(json.dumps(manifest))
    before = all_rows(out)
    assert before[str(demo_shards[0])]["features"].shape == (12, 196, 192)

    with pytest.raises(cf.CacheError, match=r"refusing to add.*storage\.(quantisation|int8_group).*--int8-group 0"):
        extract(str(demo_shards[1]), out)
    extract(str(demo_shards[1]), out, int8_group=None)
    after = all_rows(out)
    assert len(after) == 2 and np.array_equal(after[str(demo_shards[0])]["features"],
                                              before[str(demo_shards[0])]["features"])

    manifest["format_version"] = 1
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(cf.CacheError, match=r"format_version 1, this mrmae reads 2 and 3"):
        cf.FeatureCache(out)
    # a group that does not divide the teacher's width is refused before anything is written
    with pytest.raises(cf.CacheError, match=r"--int8-group 100 does not divide the 192 channels"):
        extract(str(demo_shards[0]), tmp_path / "d", int8_group=100)
    assert not (tmp_path / "d").exists()


def _age_into_layers_cache(new: Path, old: Path) -> None:
    """`old`: the cache `new` as `extract-features --layers 3` (removed since) wrote it: the
    manifest's teacher.layers = [3] and a layer3 array (here features * 2) in every shard."""
    m = cf.read_manifest(new)
    teacher = {**m.teacher.to_json(), "layers": [3]}
    cf.init_cache(str(old), cf.new_manifest(teacher, m.views, cf.storage_section(m.storage.backend, m.storage.dtype),
                                            "0.1.0"))
    cache = cf.FeatureCache(new)
    for e in cache.complete_shards:
        g = cache.shard(e.source)
        r, n = g.read(slice(None)), len(g)
        w = cf.open_shard_writer(m.storage.backend, old, e.source, n, m.teacher.dim, 196, m.storage.dtype, layers=(3,))
        w.append([str(k) for k in r["keys"]], r["view"], r["crop"], r["flip"], r["features"], r["attention"], r["cls"],
                 {3: r["features"] * 2}, image_sha256=[g.image_digest(i) for i in range(n)])
        digest, size = w.finish({"source": e.source, "num_samples": e.num_samples},
                                [(str(k), int(v)) for k, v in zip(r["keys"], r["view"])])
        cf.commit_shard(str(old), w, dataclasses.replace(e, group=w.group_path, sha256=digest, bytes=size, files=w.files))


@pytest.mark.parametrize("backend", cf.backend_names())
def test_a_cache_written_with_layers_is_still_read_and_its_layers_ignored(demo_shards, tmp_path, backend):
    new, old = tmp_path / "new", tmp_path / "old"
    extract(str(demo_shards[0]), new, format=backend, dtype="float16", batch_size=4)
    assert json.loads((new / "manifest.json").read_text())["teacher"]["layers"] == []
    _age_into_layers_cache(new, old)
    m = cf.read_manifest(old)
    assert m.teacher.layers == (3,)
    assert cf.check_integrity(str(old)) == []
    rows = all_rows(old)
    assert rows.keys() == all_rows(new).keys()
    for src, r in all_rows(new).items():
        np.testing.assert_array_equal(rows[src]["features"], r["features"])
    assert verify_cache(str(old), recompute=2).ok  # recomputes the features, not the blocks
    # training reads the features only: the same losses from both caches
    losses = []
    for root in (new, old):
        out = tmp_path / f"run-{root.name}"
        r = CliRunner().invoke(cli, ["pretrain", "--shards", str(demo_shards[0]), "--feature-cache", str(root),
                                     "--out", str(out), "--model", "mrmae_vit_tiny_patch16", "--decoder-depth", "1",
                                     "--decoder-dim", "64", "--batch-size", "6", "--workers", "0", "--no-progress"])
        assert r.exit_code == 0, r.output + repr(r.exception)
        losses.append([json.loads(ln)["loss"] for ln in (out / "metrics.jsonl").read_text().splitlines()])
    assert losses[0] == losses[1] and losses[0]
    # more shards cannot join it: their rows would lack the blocks the manifest promises
    with pytest.raises(cf.CacheError, match=r"teacher.layers: cache has \[3\], asked for \[\]"):
        extract(url_list(demo_shards[:2]), old, format=backend, dtype="float16", batch_size=4)


def test_bars_count_shards_and_views_and_one_precision_rule_runs_fit_extraction_and_verify(
        demo_shards, tmp_path, capsys, monkeypatch):
    from mrmae.extract import teacher_stage

    ruled: list[str] = []  # the devices the stage's precision rule was asked about (the real rule applies)
    real = teacher_stage.precision
    monkeypatch.setattr(teacher_stage, "precision", lambda device: ruled.append(str(device)) or real(device))
    urls = url_list(demo_shards[:2])
    run_extraction(ExtractConfig(shards=urls, out=str(tmp_path / "c"), teacher=DINO_TINY, batch_size=5, pca=8,
                                 pca_fit_views=10, views=ViewConfig(per_image=2)))
    fit_and_extraction = len(ruled)
    assert fit_and_extraction == 2 + 6  # the fit's 10 views in 2 batches, then 2 shards of 12 views in 5, 5, 2
    report = verify_cache(str(tmp_path / "c"), recompute=5, seed=0)
    assert report.ok and len(ruled) > fit_and_extraction and set(ruled) == {"cpu"}
    err = capsys.readouterr().err
    assert "extract: 100%" in err and "2.0/2 shards" in err and "24 views" in err and "views/s" in err
    assert "verify integrity: 100%" in err and "2/2" in err and "verify recompute: 100%" in err and "5/5" in err
    assert not real("cpu")._enabled  # float32 on a CPU (bfloat16 autocast on CUDA, where the machine has one)
    extract(urls, tmp_path / "quiet")  # progress=False
    verify_cache(str(tmp_path / "quiet"), recompute=1, progress=False)
    assert "shards" not in capsys.readouterr().err

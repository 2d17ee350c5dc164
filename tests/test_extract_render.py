"""--render-on-device with the CPU as the device: workers only decode with PIL, the main
process renders every view of a batch with batch_render, and the cache is byte for byte
the one the workers' own render writes (same files, same bytes, same manifest)."""

from __future__ import annotations

from functools import partial

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
import conftest
from conftest import DINO_TINY, entry_files, url_list
from test_extract import _bad_shard

from mrmae.cli import cli
from mrmae.extract import runner, teacher_stage
from mrmae.extract.config import ExtractConfig
from mrmae.extract.runner import run_extraction
from mrmae.extract.teacher_stage import render_loader
from mrmae.shared import cache_format as cf
from mrmae.shared.shards import read_shard
from mrmae.shared.views import ViewConfig, decode_image

extract = partial(conftest.extract, seed=3)




def assert_same_cache(a: Path, b: Path) -> None:
    """Every file of cache `a` is in `b` with the same bytes, and nothing else is; the shard
    entries alike but for `seconds` (the time each run took)."""
    files = {p.relative_to(a) for p in a.rglob("*") if p.is_file()}
    assert files == {p.relative_to(b) for p in b.rglob("*") if p.is_file()}
    assert len(files) > 2
    for rel in sorted(files):
        if rel.parent == Path("shards") and rel.suffix == ".json" and rel.name != "zarr.json":  # a shard's entry
            one, two = (json.loads((root / rel).read_text()) for root in (a, b))
            assert one.pop("seconds") >= 0 and two.pop("seconds") >= 0
            assert one == two, rel
        else:
            assert (a / rel).read_bytes() == (b / rel).read_bytes(), f"{rel} differs"


@pytest.fixture
def device_renders(monkeypatch) -> list[int]:
    """Counts the batches the main process renders (the real function runs): proves which
    path a run took, so an option that did nothing could not pass the comparison."""
    calls: list[int] = []
    real = teacher_stage.device_views

    def counted(batch, sizes, device):
        calls.append(len(batch))
        return real(batch, sizes, device)

    monkeypatch.setattr(runner, "device_views", counted)  # the runner's own call (--store-pixels) and the stage's
    monkeypatch.setattr(teacher_stage, "device_views", counted)
    return calls


# format, dtype, store_pixels, workers, teacher, extra options (a ViT-Tiny teacher: the render
# path does not depend on the family, and CLIP's ViT-S takes ~6 s to build on this machine)
CASES = [
    ("zarr", "int8", None, 0, DINO_TINY, {}),
    ("zarr", "float16", "zstd", 2, DINO_TINY, {"image_size": 96, "pca": 8, "pca_fit_views": 10}),
    ("wds", "int8", "png", 2, DINO_TINY, {"views": 3, "shards": 1}),  # student size = the teacher's: one render
    ("wds", "float16", "webp", 0, DINO_TINY, {"int8_group": None, "image_size": 64, "batch_size": 7, "shards": 1}),
]


@pytest.mark.parametrize("fmt,dtype,pixels,workers,teacher,extra", CASES,
                         ids=["zarr-int8", "zarr-f16-zstd-w2-pca", "wds-int8-png-w2", "wds-f16-webp"])
def test_render_on_device_writes_the_cpu_paths_cache_byte_for_byte(demo_shards, tmp_path, device_renders,
                                                                    fmt, dtype, pixels, workers, teacher, extra):
    kw = {"batch_size": 5, **extra, "format": fmt, "dtype": dtype, "store_pixels": pixels, "workers": workers,
          "teacher": teacher}
    shards = demo_shards[:kw.pop("shards", 2)]
    urls = url_list(shards)
    extract(urls, tmp_path / "cpu", **kw)  # the default on a CPU: the workers render
    assert device_renders == []
    extract(urls, tmp_path / "device", render_on_device=True, **kw)
    assert sum(device_renders) >= len(shards) * 6 * extra.get("views", 2)  # every view, by the main process
    assert_same_cache(tmp_path / "cpu", tmp_path / "device")
    manifest = cf.read_manifest(tmp_path / "device")
    assert manifest.views.decoder == "pil"  # PIL decoded: replays from the tars, no stored pixels needed


def test_workers_hand_over_the_pil_decoded_image_in_its_own_layout(demo_shards):
    cfg = ExtractConfig(shards=[], out="", teacher="", views=ViewConfig(per_image=3), workers=1, render_on_device=True)
    samples = read_shard(str(demo_shards[0]))
    chunks = list(render_loader(cfg, 224).render(samples))
    got = [r for chunk in chunks for r in chunk]
    assert [r.key for r in got] == [s.key for s in samples]
    for s, r in zip(samples, got):
        want = decode_image(s.image)
        assert r.pixels.shape == (3, 0) and r.crops.shape == (3, 4)  # no view rendered in the worker
        assert torch.equal(r.decoded, want) and r.decoded.stride() == want.stride()


def test_which_path_by_default_and_the_refusals_in_one_line(demo_shards, tmp_path):
    def on(**kw) -> bool:
        return ExtractConfig(shards=[], out="", teacher="", **kw).renders_on_device

    assert on(device="cuda") and on(device="cuda:1") and not on(device="cpu")
    assert not on(device="cuda", render_on_device=False) and on(device="cpu", render_on_device=True)
    assert not on(device="cuda", decode_on_device=True)  # that path renders on the device its own way
    base = ["extract-features", "--shards", str(demo_shards[0]), "--teacher", DINO_TINY, "--decode-on-device",
            "--no-progress"]
    for flag in ("--render-on-device", "--no-render-on-device"):
        r = CliRunner().invoke(cli, [*base, flag, "--feature-cache", str(tmp_path / flag)])
        lines = [ln for ln in r.output.splitlines() if ln.strip()]
        assert r.exit_code == 2 and len(lines) == 1, r.output
        assert lines[0].startswith("mrmae: error") and flag in lines[0] and "--decode-on-device" in lines[0]
        assert not (tmp_path / flag).exists()  # refused before anything is written


def test_bad_samples_are_skipped_and_recorded_alike_and_strict_stops(tmp_path, device_renders):
    shard = str(_bad_shard(tmp_path / "bad.tar"))
    for name, on in (("cpu", False), ("device", True)):
        with pytest.warns(UserWarning, match=r"bad.tar: 2 samples: undecodable image \(keys corrupt_1, text_2"):
            extract(shard, tmp_path / name, teacher=DINO_TINY, batch_size=4, render_on_device=on)
    assert device_renders  # the second run rendered in the main process
    entry = cf.read_manifest(tmp_path / "device").shards[0]
    assert sorted(s.key for s in entry.skipped) == ["corrupt_1", "noimage_3", "text_2"]
    assert entry.num_samples == 3  # PNG-in-.jpg and CMYK are converted, as on the CPU path
    assert_same_cache(tmp_path / "cpu", tmp_path / "device")  # reasons too: no object address in them
    r = CliRunner().invoke(cli, ["extract-features", "--shards", shard, "--feature-cache", str(tmp_path / "s"), "--teacher",
                                 DINO_TINY, "--render-on-device", "--strict", "--no-progress"])
    lines = [ln for ln in r.output.splitlines() if ln.startswith("mrmae: error")]
    assert r.exit_code == 1 and len(lines) == 1 and "key corrupt_1" in lines[0] and "bad.tar" in lines[0], r.output
    assert cf.read_manifest(tmp_path / "s").shards == ()  # nothing half-written looks complete


def test_another_teacher_replays_the_cached_views_alike(demo_shards, tmp_path, device_renders):
    shard = str(demo_shards[0])
    extract(shard, tmp_path / "c", teacher=DINO_TINY, batch_size=4)
    for name, on in (("cpu", False), ("device", True)):
        run_extraction(ExtractConfig(shards=[], out=cf.target_root(tmp_path / "c", name), teacher=DINO_TINY,
                                     views_from=str(tmp_path / "c"), batch_size=3, progress=False,
                                     render_on_device=on))
    assert device_renders
    assert_same_cache(Path(cf.target_root(tmp_path / "c", "cpu")), Path(cf.target_root(tmp_path / "c", "device")))


def test_a_killed_run_resumes_to_the_cpu_paths_cache(demo_shards, tmp_path):
    urls = url_list(demo_shards)
    extract(urls, tmp_path / "cpu", teacher=DINO_TINY, batch_size=2)
    out = tmp_path / "resumed"
    cmd = [sys.executable, "-m", "mrmae", "extract-features", "--shards", urls, "--feature-cache", str(out), "--teacher",
           DINO_TINY, "--views", "2", "--seed", "3", "--batch-size", "2", "--render-on-device", "--no-progress"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not entry_files(out / "shards"):  # killed once a shard is complete
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(cf.read_manifest(out).shards)
    assert 1 <= done < 3, "the kill should land mid-run"
    summary = extract(urls, out, teacher=DINO_TINY, batch_size=2, render_on_device=True)
    assert summary["skipped_complete"] == done and summary["extracted"] == 3 - done
    cf.clean_cache(out, older_than_hours=0)  # the killed writer's temp group (as on the CPU path)
    assert_same_cache(tmp_path / "cpu", out)

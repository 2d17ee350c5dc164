"""--decode-on-device: decoding and rendering on the teacher's device (here the CPU, where
torchvision's decoder is libjpeg-turbo like PIL's), its fallbacks, and what training allows."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import DINO_TINY
from PIL import Image

from mrmae.cli import cli
from mrmae.shared.batch_render import render_batch
from mrmae.extract.device_decode import decode_batch, image_size
from mrmae.shared.shards import read_shard
from mrmae.extract.config import ExtractConfig
from mrmae.extract.runner import run_extraction
from mrmae.shared import cache_format as cf
from mrmae.shared.views import ImageDecodeError, View, ViewConfig, decode_image, render_view_uint8


def test_batch_decode_and_render_match_pil_and_fall_back_per_image(demo_shards):
    samples = read_shard(str(demo_shards[0]))[:3]
    png = io.BytesIO()
    Image.fromarray(np.full((40, 60, 3), 90, np.uint8)).save(png, format="PNG")
    images = [s.image for s in samples] + [png.getvalue(), samples[0].image[:200]]  # + a PNG, + a cut JPEG
    with pytest.raises(ImageDecodeError):
        decode_batch(images, "cpu")  # the cut JPEG: neither decoder can, and it says so
    decoded = decode_batch(images[:4], "cpu")
    for data, img in zip(images[:4], decoded):
        assert torch.equal(img, decode_image(data))  # JPEGs by torchvision, the PNG by PIL: same pixels
    assert image_size(images[3]) == (40, 60)
    views = [View(10, 20, 100, 120, flip=True), View(0, 0, 60, 40, flip=False), View(5, 5, 50, 50, flip=True)]
    got = render_batch(decoded[:3], views, 64)
    want = torch.stack([render_view_uint8(img, v, 64) for img, v in zip(decoded[:3], views)])
    assert torch.equal(got, want)


def test_extraction_on_the_device_path_and_what_training_may_do_with_it(demo_shards, tmp_path):
    def extract(out, **kw):
        run_extraction(ExtractConfig(shards=str(demo_shards[0]), out=str(out), teacher=DINO_TINY, batch_size=5,
                                     views=ViewConfig(per_image=2, seed=1), progress=False, **kw))

    extract(tmp_path / "pil")
    extract(tmp_path / "dev", decode_on_device=True, store_pixels="zstd", workers=1)  # headers read in a worker
    pil, dev = cf.FeatureCache(tmp_path / "pil"), cf.FeatureCache(tmp_path / "dev")
    assert dev.manifest.views.decoder == "torchvision" and pil.manifest.views.decoder == "pil"
    a = pil.shard(str(demo_shards[0])).read(slice(None))
    b = dev.shard(str(demo_shards[0])).read(slice(None))
    for col in ("keys", "crop", "flip", "features", "attention"):  # same views, same decoded pixels
        np.testing.assert_array_equal(a[col], b[col])
    base = ["pretrain", "--shards", str(demo_shards[0]), "--feature-cache", str(tmp_path / "dev"), "--model",
            "mrmae_vit_tiny_patch16", "--decoder-depth", "1", "--decoder-dim", "64", "--batch-size", "6",
            "--workers", "0", "--no-progress"]
    r = CliRunner().invoke(cli, [*base, "--out", str(tmp_path / "o1")])  # replaying with PIL: refused
    assert r.exit_code == 1 and "decoded with 'torchvision'" in r.output and "--pixels-from-cache" in r.output
    r = CliRunner().invoke(cli, [*base, "--pixels-from-cache", "--out", str(tmp_path / "o2")])
    assert r.exit_code == 0, r.output


def test_an_image_damaged_past_its_header_stops_the_device_path_in_one_line(demo_shards, tmp_path):
    import tarfile

    good = read_shard(str(demo_shards[0]))[0].image
    bad = tmp_path / "bad.tar"
    with tarfile.open(bad, "w") as tf:
        for key, data in (("ok_0", good), ("cut_1", good[: len(good) // 3])):  # header intact, scan data cut
            for name, payload in ((f"{key}.jpg", data), (f"{key}.cls", b"1")):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tf.addfile(info, io.BytesIO(payload))
    r = CliRunner().invoke(cli, ["extract-features", "--shards", str(bad), "--feature-cache", str(tmp_path / "c"), "--teacher",
                                 DINO_TINY, "--decode-on-device", "--batch-size", "4", "--no-progress"])
    lines = [ln for ln in r.output.splitlines() if ln.startswith("mrmae: error")]
    assert r.exit_code == 1 and len(lines) == 1, r.output
    assert str(bad) in lines[0] and "key cut_1" in lines[0] and "without --decode-on-device" in lines[0]
    assert cf.read_manifest(tmp_path / "c").shards == ()  # nothing half-written looks complete


def test_verify_replays_with_the_recorded_decoder_or_refuses_in_one_line(demo_shards, tmp_path, monkeypatch):
    import json

    from mrmae.extract import teacher_stage
    from mrmae.extract.verify import verify_cache
    from mrmae.shared.teachers.base import build_teacher

    teacher = build_teacher(DINO_TINY)
    decoded_on = []  # the devices teacher_stage decodes bytes on (the real decoder runs)
    real = teacher_stage.decode_batch

    def spied(images, device):
        decoded_on.append(str(device))
        return real(images, device)

    monkeypatch.setattr(teacher_stage, "decode_batch", spied)
    caches = {}
    for name, kw in (("pil", {}), ("dev", {"decode_on_device": True})):
        caches[name] = tmp_path / name
        run_extraction(ExtractConfig(shards=str(demo_shards[0]), out=str(caches[name]), teacher=DINO_TINY,
                                     batch_size=5, progress=False, **kw), teacher=teacher)
    assert cf.read_manifest(caches["dev"]).views.decoder == "torchvision"
    for name, decodes in (("pil", False), ("dev", True)):
        decoded_on.clear()
        report = verify_cache(str(caches[name]), recompute=4, seed=3, progress=False, teacher=teacher)
        assert report.ok and report.checked == 4 and report.worst_cosine >= 0.999, name
        assert bool(decoded_on) == decodes and set(decoded_on) <= {"cpu"}, name  # torchvision's CPU decoder, not PIL
    r = CliRunner().invoke(cli, ["cache", "verify", str(caches["dev"]), "--recompute", "3"])
    assert r.exit_code == 0 and "checked 3 views" in r.output and "OK" in r.output, r.output
    # a cache nvjpeg decoded (extracted on CUDA): no CPU replays its pixels
    manifest = caches["dev"] / "manifest.json"
    obj = json.loads(manifest.read_text())
    obj["views"]["decoder"] = "nvjpeg"
    manifest.write_text(json.dumps(obj))
    r = CliRunner().invoke(cli, ["cache", "verify", str(caches["dev"]), "--recompute", "3"])
    lines = [ln for ln in r.output.splitlines() if ln.startswith("mrmae: error")]
    assert r.exit_code == 1 and len(lines) == 1, r.output
    assert "'nvjpeg'" in lines[0] and "--device cuda" in lines[0] and "--recompute 0" in lines[0]
    r = CliRunner().invoke(cli, ["cache", "verify", str(caches["dev"]), "--recompute", "0"])
    assert r.exit_code == 0 and "integrity: OK" in r.output, r.output

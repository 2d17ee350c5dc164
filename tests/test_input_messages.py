"""Inputs that used to get a weak message (issue 23, cause 8) get one line naming the file and
key, or a counted, recorded skip: a sample with two images, 10^5 members that are no
images, an all-NaN float image, a config file nested thousands deep.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
from click.testing import CliRunner
from conftest import DINO_TINY
from PIL import Image

from mrmae.cli import cli
from mrmae.shared import cache_format as cf


def _jpeg(colour: tuple[int, int, int], size: tuple[int, int] = (64, 48)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="JPEG")
    return buf.getvalue()


def _tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def _extract(shard: Path, out: Path):
    """`mrmae extract-features` in this process -> (result, the lines its skip warnings print)."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = CliRunner().invoke(cli, ["extract-features", "--shards", str(shard), "--feature-cache", str(out),
                                     "--teacher", DINO_TINY, "--views", "1", "--no-progress"])
    return r, [f"mrmae: warning: {w.message}" for w in caught if str(w.message).startswith("skipping")], \
        [str(w.message) for w in caught]


def test_a_sample_with_two_images_is_a_recorded_skip(tmp_path):
    """`a.b.jpg` beside `a.jpg`: webdataset makes both one sample's (key `a`); which image
    the sample is, is ambiguous, so it is skipped and recorded, never one dropped silently."""
    shard = _tar(tmp_path / "two.tar", [("a.jpg", _jpeg((200, 10, 10))), ("a.b.jpg", _jpeg((10, 200, 10))),
                                        ("c.jpg", _jpeg((10, 10, 200)))])
    r, skips, _ = _extract(shard, tmp_path / "c")
    assert r.exit_code == 0, r.output + repr(r.exception)
    assert skips == [f"mrmae: warning: skipping {shard} key a: 2 images in one sample (a.jpg, a.b.jpg)"]
    entry = cf.read_manifest(tmp_path / "c").shards[0]
    assert entry.skipped == (cf.Skipped("a", "2 images in one sample (a.jpg, a.b.jpg)"),) and entry.num_samples == 1


def test_a_hundred_thousand_members_that_are_no_images_warn_once(tmp_path):
    """10^5 samples without an image printed 100,000 warning lines: now one line for the kind,
    counting them and naming the first keys; each is in the entry's `skipped`."""
    n = 100_000
    shard = _tar(tmp_path / "many.tar", [("img.jpg", _jpeg((90, 90, 90)))] +
                 [(f"t{i:06d}.txt", b"x") for i in range(n)])
    r, skips, _ = _extract(shard, tmp_path / "c")
    assert r.exit_code == 0, r.output + repr(r.exception)
    assert skips == [
        f"mrmae: warning: skipping {shard}: {n:,} samples: no image member (keys t000000, t000001, t000002 and "
        f"{n - 3:,} more; each listed with its reason in the shard's entry)"]
    entry = cf.read_manifest(tmp_path / "c").shards[0]
    assert len(entry.skipped) == n and entry.num_samples == 1


def test_an_all_nan_float_image_is_a_skip_naming_shard_and_key_without_a_stray_warning(tmp_path):
    """A float TIFF of NaNs printed numpy's "All-NaN slice encountered", naming nothing, and
    trained as black; now a recorded skip whose warning names the shard and the key."""
    tiff = io.BytesIO()
    Image.fromarray(np.full((32, 32), np.nan, np.float32), mode="F").save(tiff, format="TIFF")
    ok = io.BytesIO()
    Image.fromarray(np.linspace(0, 1, 32 * 32, dtype=np.float32).reshape(32, 32), mode="F").save(ok, format="TIFF")
    # (a float TIFF under an image extension a shard's members take: PIL opens it by content)
    shard = _tar(tmp_path / "nan.tar", [("nan.png", tiff.getvalue()), ("ok.png", ok.getvalue())])
    r, lines, every = _extract(shard, tmp_path / "c")
    assert r.exit_code == 0, r.output + repr(r.exception)
    assert not [w for w in every if "All-NaN" in w] and "All-NaN" not in r.output
    assert len(lines) == 1 and lines[0].startswith(f"mrmae: warning: skipping {shard} key nan: undecodable image: a "
                                                   "32x32 float image without one finite pixel"), lines


def test_a_config_file_nested_thousands_deep_is_one_line(demo_shards, tmp_path):
    deep = tmp_path / "deep.yaml"
    deep.write_text("epochs: " + "[" * 5000 + "]" * 5000 + "\n")
    r = CliRunner().invoke(cli, ["pretrain", "--config", str(deep), "--shards", str(demo_shards[0]),
                                 "--out", str(tmp_path / "run")])
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert r.exit_code == 2 and len(lines) == 1, r.output[-2000:]
    assert lines[0] == (f"mrmae: error: {deep}: nested too deeply to read; a config file is a flat mapping of "
                        "options (e.g. `epochs: 400`)")
    assert not (tmp_path / "run").exists()

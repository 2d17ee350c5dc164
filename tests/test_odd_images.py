"""Repeated keys (the later copy skipped, warned, listed; --strict stops) and 16-bit and
other image modes scaled to 8 bits.

"""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import DINO_TINY, error_line

from mrmae.cli import cli
from mrmae.extract.config import ExtractConfig
from mrmae.extract.runner import run_extraction
from mrmae.shared import cache_format as cf
from mrmae.shared.views import ViewConfig


def _jpeg(width: int, height: int, colour: tuple[int, int, int]) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buf, format="JPEG")
    return buf.getvalue()


def _repeats_tar(path, layout: str) -> dict[str, bytes]:
    """A tar with key `a` twice, the copies of different sizes (their views differ):
    adjacent a a b c (webdataset's group_by_keys raises there) or apart a b a c.
    Returns the first copy's image per key."""
    first, second = _jpeg(64, 48, (200, 30, 30)), _jpeg(300, 200, (30, 30, 200))
    order = {"adjacent": [("a", first), ("a", second), ("b", _jpeg(80, 80, (0, 90, 0))), ("c", _jpeg(70, 90, (9, 9, 9)))],
             "apart": [("a", first), ("b", _jpeg(80, 80, (0, 90, 0))), ("a", second), ("c", _jpeg(70, 90, (9, 9, 9)))]}
    with tarfile.open(path, "w") as tf:
        for key, image in order[layout]:
            for ext, data in (("jpg", image), ("cls", b"1")):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return {key: image for key, image in reversed(order[layout])}


@pytest.mark.parametrize("layout", ["adjacent", "apart"])
def test_7_repeated_key_later_copy_skipped_warned_listed_strict_stops(tmp_path, layout):
    from mrmae.shared.shards import REPEATED_KEY
    from mrmae.shared.views import ViewConfig, sample_views

    shard = tmp_path / "rep-000.tar"
    _repeats_tar(shard, layout)
    with pytest.warns(UserWarning, match=f"skipping {shard} key a: repeated key"):
        run_extraction(ExtractConfig(shards=str(shard), out=str(tmp_path / "c"), teacher=DINO_TINY,
                                     views=ViewConfig(per_image=2), batch_size=4, progress=False))
    cache = cf.FeatureCache(tmp_path / "c")
    group = cache.shard(str(shard))
    assert group.entry.skipped == (cf.Skipped("a", REPEATED_KEY),) and group.entry.num_samples == 3
    assert list(map(str, group.keys)) == ["a", "a", "b", "b", "c", "c"]
    crop, _, _ = group.geometry()
    views = sample_views("a", 48, 64, ViewConfig(per_image=2))  # the first copy is 64x48
    assert [tuple(int(c) for c in crop[i]) for i in (0, 1)] == [v.box for v in views]
    r = CliRunner().invoke(cli, ["extract-features", "--shards", str(shard), "--feature-cache", str(tmp_path / "strict"),
                                 "--teacher", DINO_TINY, "--views", "1", "--strict", "--no-progress"])
    assert error_line(r) == f"mrmae: error: {shard}: key a: {REPEATED_KEY}"
    assert not [e for e in cf.read_manifest(tmp_path / "strict").shards if e.status == "complete"]


@pytest.mark.parametrize("layout", ["adjacent", "apart"])
def test_7_pretraining_keeps_the_first_copy_of_a_repeated_key(tmp_path, layout):
    from mrmae.train.stream import DataConfig, StudentStream, ViewJoiner

    shard = tmp_path / "rep-000.tar"
    first = _repeats_tar(shard, layout)
    with pytest.warns(UserWarning, match="repeated key"):
        run_extraction(ExtractConfig(shards=str(shard), out=str(tmp_path / "c"), teacher=DINO_TINY,
                                     views=ViewConfig(per_image=2), batch_size=4, progress=False))
    cache = cf.FeatureCache(tmp_path / "c")
    for url in (str(shard), f"pipe:cat {shard}"):
        for c in (cache, None):  # cached and live/plain
            cfg = DataConfig(shards=[url], batch_size=3, img_size=32)
            joined = list(ViewJoiner(cfg, c)(iter([url]), 0))
            assert [(s.key, s.image) for s in joined] == [(k, first[k]) for k in ("a", "b", "c")]
        batches = list(StudentStream(DataConfig(shards=[url], batch_size=3, img_size=32), cache))
        assert sorted(k for b in batches for k in b.keys) == ["a", "b", "c"]
        assert all(b.targets[0].values.shape[0] == 3 for b in batches)


def test_7_sixteen_bit_and_other_modes_are_scaled_to_8_bits():
    import warnings

    from PIL import Image

    from mrmae.shared.views import decode_image

    def encoded(im: Image.Image, fmt: str = "PNG", **kw) -> bytes:
        buf = io.BytesIO()
        im.save(buf, format=fmt, **kw)
        return buf.getvalue()

    rng = np.random.default_rng(0)
    source = rng.integers(0, 65536, (48, 64), dtype=np.uint16)  # a full-range 16-bit image
    png = encoded(Image.fromarray(source))
    assert Image.open(io.BytesIO(png)).mode.startswith("I")
    decoded = decode_image(png).numpy().astype(int)
    assert decoded.shape == (3, 48, 64)
    assert np.abs(decoded - np.round(source / 257.0)[None]).max() <= 1
    assert (decoded == 255).mean() < 0.01  # clipped, 99.6% of them would be 255
    wide = rng.integers(0, 65536, (8, 8)).astype(np.int32)  # mode I (32-bit) holding 16-bit values
    assert np.abs(decode_image(encoded(Image.fromarray(wide), "TIFF")).numpy()[0] - wide / 257.0).max() <= 1
    unit = rng.random((8, 8)).astype(np.float32)  # mode F in 0..1
    assert np.abs(decode_image(encoded(Image.fromarray(unit), "TIFF")).numpy()[0] - unit * 255).max() <= 1
    grey = rng.integers(0, 256, (8, 8), dtype=np.uint8)
    la = Image.merge("LA", [Image.fromarray(grey), Image.fromarray(grey[::-1].copy())])
    assert (decode_image(encoded(la)).numpy() == grey[None]).all()  # alpha dropped, grey kept
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # pure red
    assert tuple(decode_image(encoded(cmyk, "JPEG")).numpy()[:, 4, 4]) in [(r, g, b) for r in range(250, 256)
                                                                        for g in range(6) for b in range(6)]
    palette = Image.fromarray(grey).convert("P")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PIL warns when a palette's transparency is dropped unasked
        assert decode_image(encoded(palette, transparency=0)).shape == (3, 8, 8)

"""View geometry and rendering: determinism, bounds, and the crop/flip conventions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mrmae.shared.views import (ImageDecodeError, View, ViewConfig, ViewError, decode_crop, decode_image,
                                render_view_uint8, sample_view, sample_views, view_rng)


def test_views_depend_only_on_seed_key_and_index():
    cfg = ViewConfig(per_image=4, seed=3)
    a = sample_views("n01440764_10026", 375, 500, cfg)
    # Drawing other keys in between (another order, another worker) changes nothing.
    for k in ("x", "y", "z"):
        sample_views(k, 375, 500, cfg)
    assert sample_views("n01440764_10026", 375, 500, cfg) == a
    assert len(set(a)) == 4  # four different views
    assert sample_views("n01440764_10026", 375, 500, ViewConfig(per_image=4, seed=4)) != a
    assert sample_views("n01440764_10027", 375, 500, cfg) != a


@pytest.mark.parametrize("hw,min_fits", [((375, 500), 250), ((600, 201), 250), ((224, 224), 250), ((17, 900), 0)])
def test_crop_boxes_stay_inside_and_follow_scale_and_ratio(hw, min_fits):
    """Sane images get in-range boxes; a 17x900 strip falls back to a clamped centre crop."""
    h, w = hw
    cfg = ViewConfig()
    fits = 0
    for i in range(300):
        v = sample_view(h, w, view_rng(0, f"k{i}", 0), cfg)
        assert 0 <= v.top and v.top + v.height <= h and 0 <= v.left and v.left + v.width <= w
        assert v.height > 0 and v.width > 0
        area = v.height * v.width / (h * w)
        ratio = v.width / v.height
        assert 0.74 <= ratio <= 1.34 or min_fits == 0
        if 0.19 <= area <= 1.01 and 0.74 <= ratio <= 1.34:
            fits += 1
    assert fits >= min_fits
    if min_fits == 0:  # fallback: the widest box of ratio 4/3, centred
        assert (v.top, v.height, v.width, v.left) == (0, 17, 23, (900 - 23) // 2)


def test_flip_probability():
    flips = [sample_view(300, 400, view_rng(1, f"k{i}", 0), ViewConfig()).flip for i in range(2000)]
    assert 0.45 < np.mean(flips) < 0.55
    assert not any(sample_view(300, 400, view_rng(1, f"k{i}", 0), ViewConfig(flip_p=0.0)).flip for i in range(50))


def _coordinate_image(h: int, w: int) -> torch.Tensor:
    """R channel encodes the row, G the column: a rendered crop tells where it came from."""
    rows = torch.arange(h).view(h, 1).expand(h, w)
    cols = torch.arange(w).view(1, w).expand(h, w)
    return torch.stack([rows, cols, torch.zeros(h, w, dtype=torch.long)]).to(torch.uint8)


def test_crop_box_is_top_left_height_width_in_source_pixels():
    img = _coordinate_image(200, 250)
    v = View(top=40, left=100, height=60, width=120, flip=False)
    out = render_view_uint8(img, v, 60).int()
    # Rows 40..99 and columns 100..219 of the source (resize blurs borders slightly).
    assert abs(out[0, 0, 30].item() - 40) <= 2 and abs(out[0, -1, 30].item() - 99) <= 2
    assert abs(out[1, 30, 0].item() - 100) <= 2 and abs(out[1, 30, -1].item() - 219) <= 3
    flipped = render_view_uint8(img, View(40, 100, 60, 120, True), 60).int()
    assert torch.equal(flipped, out.flip(-1))


def test_decode_converts_grayscale_cmyk_and_png(tmp_path):
    import io

    from PIL import Image

    for mode in ("L", "CMYK", "RGBA", "P"):
        buf = io.BytesIO()
        Image.new(mode, (31, 17)).save(buf, format="PNG" if mode in ("RGBA", "P", "L") else "JPEG")
        t = decode_image(buf.getvalue())
        assert t.shape == (3, 17, 31) and t.dtype == torch.uint8
    with pytest.raises(ImageDecodeError):
        decode_image(b"definitely not an image")
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 10, 10)).save(buf, format="JPEG")
    with pytest.raises(ImageDecodeError):
        decode_image(buf.getvalue()[: len(buf.getvalue()) // 2])  # truncated JPEG


@pytest.mark.parametrize("mode,fmt", [("RGB", "JPEG"), ("RGB", "PNG"), ("L", "JPEG"), ("CMYK", "JPEG"), ("RGBA", "PNG"),
                                      ("P", "PNG"), ("I;16", "PNG")])
def test_decode_crop_is_the_box_of_the_decoded_image(mode, fmt):
    """A worker's hand-over under --render-on-device: exactly decode_image's pixels in the
    box, whatever the mode (16-bit scaled over the whole image, as decode_image does)."""
    import io

    from PIL import Image

    rng = np.random.default_rng(0)
    if mode == "I;16":
        im = Image.fromarray(rng.integers(0, 65536, (37, 53), dtype=np.uint16))
    else:
        im = Image.fromarray(rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)).convert(mode)
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    data = buf.getvalue()
    box = View(5, 11, 20, 30, flip=True)
    crop, view = decode_crop(data, lambda h, w: box if (h, w) == (37, 53) else None)
    assert view == box and crop.dtype == np.uint8 and crop.shape == (20, 30, 3)
    want = decode_image(data)[:, 5:25, 11:41].permute(1, 2, 0)
    assert want.float().std() > 10 and torch.equal(torch.from_numpy(crop.copy()), want)
    with pytest.raises(ViewError, match="not inside the 37x53 image"):
        decode_crop(data, lambda h, w: View(30, 0, 10, 10, flip=False))
    with pytest.raises(ImageDecodeError):
        decode_crop(data[: len(data) // 2] if fmt == "JPEG" else b"not an image", lambda h, w: box)

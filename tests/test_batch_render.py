"""The batched device renderer against the CPU render both stages use: pixel for pixel."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mrmae.shared import batch_render
from mrmae.shared.batch_render import pass_weights, render_batch, render_exact
from mrmae.shared.shards import read_shard
from mrmae.shared.views import View, ViewConfig, decode_image, render_view_uint8, sample_views


def random_views(rng: np.random.Generator, count: int) -> tuple[list[torch.Tensor], list[View]]:
    """Noise and smooth images of 1-320 px a side, two views each: crops from 1 px to the
    whole image, so both passes up- and downscale, and flips."""
    images, views = [], []
    for i in range(count):
        H, W = (int(n) for n in rng.integers(1, 320, 2))
        if i % 2:
            y, x = np.mgrid[0:H, 0:W]
            img = (127.5 + 127.5 * np.sin(y / 7.0) * np.cos(x / 5.0)).astype(np.uint8)[None].repeat(3, 0)
        else:
            img = rng.integers(0, 256, (3, H, W), dtype=np.uint8)
        for _ in range(2):
            h, w = int(rng.integers(1, H + 1)), int(rng.integers(1, W + 1))
            views.append(View(int(rng.integers(0, H - h + 1)), int(rng.integers(0, W - w + 1)), h, w,
                              flip=bool(rng.integers(2))))
            images.append(torch.from_numpy(img))
    return images, views


@pytest.mark.parametrize("size", [224, 37])
def test_exact_render_equals_the_cpu_render_whatever_the_chunks(size, monkeypatch):
    images, views = random_views(np.random.default_rng(size), 30)
    views.append(View(0, 0, size, size, flip=True))  # neither pass resizes
    images.append(images[0][:, :size, :size] if min(images[0].shape[1:]) >= size
                  else torch.randint(0, 256, (3, size, size), dtype=torch.uint8))
    want = torch.stack([render_view_uint8(img, v, size) for img, v in zip(images, views)])
    got = render_exact(images, views, size)
    assert got.dtype == torch.uint8 and got.shape == want.shape
    assert torch.equal(got, want), f"{(got != want).sum().item()} pixels differ"
    monkeypatch.setattr(batch_render, "CHUNK_ELEMENTS", 1 << 16)  # many small chunks: same pixels
    assert torch.equal(render_exact(images, views, size), want)
    assert torch.equal(render_batch(images, views, size), want)  # the CPU's own path


def test_exact_render_of_demo_jpegs_with_the_extraction_views(demo_shards):
    samples = read_shard(str(demo_shards[0]))[:6]
    images, views = [], []
    for s in samples:
        image = decode_image(s.image)
        for v in sample_views(s.key, image.shape[1], image.shape[2], ViewConfig(per_image=2, seed=3)):
            images.append(image)
            views.append(v)
    want = torch.stack([render_view_uint8(img, v, 224) for img, v in zip(images, views)])
    assert torch.equal(render_exact(images, views, 224), want)


@pytest.mark.parametrize("n_in,n_out", [(500, 224), (224, 224), (37, 224), (1, 224), (4000, 37)])
def test_pass_weights_are_int16_rows_summing_to_one(n_in, n_out):
    out, col, w, precision = pass_weights(n_in, n_out)
    assert w.dtype == np.float64 and np.all(w == np.round(w)) and np.abs(w).max() < 1 << 15
    assert col.min() >= 0 and col.max() < n_in and np.all(np.bincount(out, minlength=n_out) > 0)
    sums = np.bincount(out, weights=w, minlength=n_out)
    taps = np.bincount(out, minlength=n_out)
    assert np.all(np.abs(sums - 2.0 ** precision) <= taps)  # each weight rounded by at most 1/2
    if n_in == n_out:  # identity: one weight per output, on its own input
        assert np.array_equal(out, col) and np.all(w == 2.0 ** precision)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (runs where one is lent)")
def test_render_batch_on_cuda_gives_the_cpu_pixels():
    images, views = random_views(np.random.default_rng(7), 20)
    want = torch.stack([render_view_uint8(img, v, 224) for img, v in zip(images, views)])
    on_gpu = {id(im): im.cuda() for im in images}
    got = render_batch([on_gpu[id(im)] for im in images], views, 224)
    assert got.device.type == "cuda" and torch.equal(got.cpu(), want)

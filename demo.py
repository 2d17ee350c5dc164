"""Demo data: ImageNet-style WebDataset shards made from photographs scikit-image ships.

Each sample is a random crop of one of the photographs, rescaled to a random non-square
size of about 200-600 px a side, sometimes overlaid with procedural shapes, saved as a
JPEG (`{key}.jpg`) with its source photograph's index as the class (`{key}.cls`). The
same seed gives byte-identical shards.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image, ImageDraw

# Colour and grayscale photographs bundled with scikit-image (no download needed).
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field",
          "retina", "colorwheel", "camera", "coins", "moon", "brick", "grass", "gravel")


def _photos() -> list[np.ndarray]:
    import skimage.data

    out = []
    for name in PHOTOS:
        im = getattr(skimage.data, name)()
        if im.ndim == 2:
            im = np.stack([im] * 3, axis=-1)
        out.append(np.ascontiguousarray(im[..., :3]))
    return out


def make_image(photo: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """A random crop of `photo` at a random non-square size of ~200-600 px a side."""
    h, w = photo.shape[:2]
    ch, cw = int(rng.integers(h // 3, h + 1)), int(rng.integers(w // 3, w + 1))
    top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    out_w = int(rng.integers(200, 601))
    out_h = int(np.clip(out_w * rng.uniform(0.6, 1.5), 200, 600))
    if out_h == out_w:
        out_h -= 1
    img = Image.fromarray(photo[top:top + ch, left:left + cw]).resize((out_w, out_h), Image.BICUBIC)
    if rng.uniform() < 0.5:  # procedural shapes give each image distinct salient objects
        draw = ImageDraw.Draw(img)
        for _ in range(int(rng.integers(1, 4))):
            x0, y0 = int(rng.integers(0, out_w - 40)), int(rng.integers(0, out_h - 40))
            size = int(rng.integers(30, min(out_w - x0, out_h - y0, 200) + 1))
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))
            shape = draw.ellipse if rng.uniform() < 0.5 else draw.rectangle
            shape([x0, y0, x0 + size, y0 + size], fill=colour)
    return img


def write_demo_shards(out_dir: str | Path, num_images: int = 64, shard_size: int = 16, seed: int = 0,
                      prefix: str = "demo", sizes: bool = False) -> list[Path]:
    """Write `num_images` samples into tars of `shard_size`; returns the tar paths. `sizes`:
    also each tar's samples in the directory's sizes.json (`shared.shard_sizes`)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    photos = _photos()
    rng = np.random.default_rng(seed)
    paths: list[Path] = []
    for shard in range((num_images + shard_size - 1) // shard_size):
        path = out_dir / f"{prefix}-{shard:06d}.tar"
        # mtime fixed so the same seed gives byte-identical tars
        with wds.TarWriter(str(path), mtime=0) as sink:
            for i in range(shard * shard_size, min(num_images, (shard + 1) * shard_size)):
                label = int(rng.integers(0, len(photos)))
                buf = io.BytesIO()
                make_image(photos[label], rng).save(buf, format="JPEG", quality=90)
                sink.write({"__key__": f"{prefix}_{i:08d}", "jpg": buf.getvalue(), "cls": str(label).encode()})
        paths.append(path)
    if sizes:
        from mrmae.shared.shard_sizes import write_sizes

        write_sizes(str(out_dir), {p.name: min(shard_size, num_images - i * shard_size) for i, p in enumerate(paths)})
    return paths

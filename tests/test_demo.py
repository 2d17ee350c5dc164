"""Demo shards: real tars of varied, non-square JPEGs, identical for one seed."""

from __future__ import annotations

import io
import tarfile

from PIL import Image

from mrmae.demo import write_demo_shards


def test_demo_shards_are_deterministic_imagenet_style_tars(tmp_path):
    a = write_demo_shards(tmp_path / "a", num_images=10, shard_size=4, seed=5)
    b = write_demo_shards(tmp_path / "b", num_images=10, shard_size=4, seed=5)
    c = write_demo_shards(tmp_path / "c", num_images=10, shard_size=4, seed=6)
    assert [p.name for p in a] == ["demo-000000.tar", "demo-000001.tar", "demo-000002.tar"]
    assert all(x.read_bytes() == y.read_bytes() for x, y in zip(a, b))
    assert a[0].read_bytes() != c[0].read_bytes()
    sizes, names = set(), []
    for path in a:
        with tarfile.open(path) as tf:
            for m in tf.getmembers():
                names.append(m.name)
                data = tf.extractfile(m).read()
                if m.name.endswith(".jpg"):
                    im = Image.open(io.BytesIO(data))
                    assert im.format == "JPEG" and 190 <= im.width <= 610 and 190 <= im.height <= 610
                    sizes.add(im.size)
                else:
                    assert m.name.endswith(".cls") and int(data) >= 0
    assert len(names) == 20
    assert len(sizes) >= 8 and all(w != h for w, h in sizes)

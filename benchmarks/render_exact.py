"""The two view renderers of `--decode-on-device`, side by side on the same views.

Demo JPEGs (ImageNet-sized, `make_shards`) decoded once onto --device, two extraction
views each; then, alternating per repetition, views/s of
- one_by_one: torchvision's resized_crop view by view (shared/batch_render.render_one_by_one),
- exact: the batched integer-exact matmuls (shared/batch_render.render_exact),
and whether each equals the CPU reference render pixel for pixel.

    .venv/bin/python benchmarks/render_exact.py                  # CPU, ~30 s on 2 cores
    .venv/bin/python benchmarks/render_exact.py --device cuda    # what gpu_bench's render_kernels row times
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from _common import machine_facts, make_shards, table, views_per_image, write_json


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--images", type=int, default=128)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()
    from mrmae.shared.batch_render import render_exact, render_one_by_one
    from mrmae.shared.shards import read_shard
    from mrmae.shared.views import decode_image

    with tempfile.TemporaryDirectory() as tmp:
        samples = read_shard(str(make_shards(tmp, args.images, args.images)[0]))
    cpu_images, views = views_per_image([s.key for s in samples], [decode_image(s.image) for s in samples], 2)
    reference = render_one_by_one(cpu_images, views, args.size)
    on_device = {id(im): im.to(args.device) for im in cpu_images}
    images = [on_device[id(im)] for im in cpu_images]
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    renderers = {"one_by_one": render_one_by_one, "exact": render_exact}
    rates: dict[str, list[float]] = {name: [] for name in renderers}
    equal = {}
    for _ in range(args.reps + 1):  # the first round warms up
        for name, render in renderers.items():
            sync()
            t0 = time.perf_counter()
            out = render(images, views, args.size)
            sync()
            rates[name].append(len(views) / (time.perf_counter() - t0))
            equal[name] = bool(torch.equal(out.cpu(), reference))
    med = {name: statistics.median(r[1:]) for name, r in rates.items()}
    ratio = med["exact"] / med["one_by_one"]
    path = write_json("render_exact", {"benchmark": "render_exact", "machine": machine_facts(), "params": vars(args),
                                       "views": len(views), "views_per_s": rates, "median_views_per_s": med,
                                       "equal_to_cpu_render": equal, "ratio_exact_over_one_by_one": ratio})
    print(table(["renderer", "views/s (median)", "equals the CPU render"],
                [[name, f"{med[name]:.0f}", "yes" if equal[name] else "NO"] for name in renderers]))
    print(f"exact / one_by_one: {ratio:.3f}x on {args.device}, {len(views)} views of {args.images} images "
          f"-> {path}")


if __name__ == "__main__":
    main()

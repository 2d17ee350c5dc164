"""Tar reading throughput: webdataset's tar iterators (what both stages used) vs
`mrmae.shared.shards` (the truncation-proof reader), with and without the sha256 that
cached pretraining now computes over every shard it streams.

One tar of --samples samples ({key}.jpg of --image-bytes random bytes + {key}.cls), read
whole from a local path and through `pipe:cat`; best of --reps passes, one process, no
decoding. MB/s and samples/s; a JPEG decode + render costs ~5-10 ms a sample, so a reader
at thousands of samples/s is not what bounds a loader.

    .venv/bin/python benchmarks/shard_reader.py          # ~20 s

Writes benchmarks/results/shard_reader.json (or --out PATH).
"""

from __future__ import annotations

import argparse
import io
import os
import tarfile
import tempfile
import time

import numpy as np
import webdataset as wds
from webdataset import tariterators

from _common import machine_facts, table, warn_if_busy, write_json
from mrmae.shared.shards import ShardReader


def write_tar(path: str, samples: int, image_bytes: int) -> None:
    rng = np.random.default_rng(0)
    with tarfile.open(path, "w") as tf:
        for i in range(samples):
            for ext, data in (("jpg", rng.bytes(image_bytes)), ("cls", b"7")):
                info = tarfile.TarInfo(f"s{i:06d}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))


def read_webdataset(url: str) -> int:
    items = iter([{"url": url, "stream": wds.gopen(url)}])
    return sum(1 for _ in tariterators.group_by_keys(tariterators.tar_file_expander(items)))


def best_seconds(fn, url: str, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn(url)
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--image-bytes", type=int, default=110_000, help="~ an ImageNet JPEG")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--out")
    args = p.parse_args()
    warn_if_busy()
    readers = {"webdataset tariterators": read_webdataset,
               "shards": lambda u: sum(1 for _ in ShardReader(u, hashed=False)),
               "shards + sha256": lambda u: sum(1 for _ in ShardReader(u, hashed=True))}
    rows, results = [], []
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "bench.tar")
        write_tar(path, args.samples, args.image_bytes)
        size = os.path.getsize(path)
        for name, fn in readers.items():
            for source, url in (("path", path), ("pipe:cat", f"pipe:cat {path}")):
                s = best_seconds(fn, url, args.reps)
                results.append({"reader": name, "source": source, "mb_per_s": round(size / s / 1e6),
                                "samples_per_s": round(args.samples / s)})
                rows.append([name, source, results[-1]["mb_per_s"], results[-1]["samples_per_s"]])
    print(table(["reader", "source", "MB/s", "samples/s"], rows))
    out = write_json("shard_reader", {"machine": machine_facts(), "args": vars(args), "results": results}, args.out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

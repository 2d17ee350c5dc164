"""Reader: WebDataset tar shards -> raw samples of one shard, in tar order.

Streams: URL -> tar members {fname, data} -> samples {__key__, jpg, cls} -> RawSample.
Uses webdataset's tar iterators, so `pipe:` commands and local paths work as in any
webdataset pipeline. Nothing is decoded here (and nothing is ever unpickled).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Iterator

import webdataset as wds
from webdataset import tariterators

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


class ShardReadError(OSError):
    """A shard that cannot be opened or read to its end."""


@dataclass
class RawSample:
    key: str
    image: bytes | None  # None: the sample has no image member
    label: int | None


def expand_urls(urls: str | list[str]) -> list[str]:
    """A webdataset-style URL list ('a-{000..009}.tar::b.tar') -> list of shard URLs."""
    items = urls if isinstance(urls, list) else [urls]
    out: list[str] = []
    for item in items:
        out.extend(wds.shardlists.expand_urls(item))
    return out


def local_file_size(url: str) -> int | None:
    """The size of a shard that is a local file (to notice one changed since); else None."""
    path = url[len("file://"):] if url.startswith("file://") else url
    if path.startswith("pipe:") or "://" in path:  # remote: its size is not cheap to know
        return None
    return os.path.getsize(path) if os.path.isfile(path) else None


def _parse_label(data: bytes | None) -> int | None:
    if data is None:
        return None
    try:
        return int(data.decode().strip())
    except ValueError:
        return None


def open_stream(url: str):
    """A binary stream of the shard: fsspec for `scheme://` URLs (file://, s3://, gs://,
    memory://...), webdataset's gopen for local paths and `pipe:` commands."""
    if "://" in url.split(" ")[0] and not url.startswith("pipe:"):
        import fsspec

        return fsspec.open(url, "rb").open()
    return wds.gopen(url)


def open_url(items: Iterator[dict], handler=None) -> Iterator[dict]:
    """{url} -> {url, stream}"""
    for item in items:
        yield {**item, "stream": open_stream(item["url"])}


class HashingReader:
    """A read-only stream that hashes every byte read through it (no second pass over a shard)."""

    def __init__(self, stream):
        self.stream, self.sha256, self.size = stream, hashlib.sha256(), 0

    def read(self, n: int = -1) -> bytes:
        data = self.stream.read(n)
        self.sha256.update(data)
        self.size += len(data)
        return data

    def finish(self) -> str:
        """Read what the tar reader left (end-of-archive padding), close, return the digest."""
        while self.read(1 << 20):
            pass
        self.stream.close()
        return self.sha256.hexdigest()


def iter_tar_samples(url: str, stream=None) -> Iterator[dict]:
    """One shard's samples {__key__, ext: bytes, ...} in tar order; errors propagate."""
    def reraise(exn: Exception) -> bool:
        raise exn

    stages = [
        tariterators.tar_file_expander,  # {url, stream} -> {fname, data, __url__}
        tariterators.group_by_keys,      # -> {__key__, ext: bytes, ...}
    ]
    items = iter([{"url": url, "stream": stream}]) if stream is not None else open_url(iter([{"url": url}]))
    for stage in stages:
        items = stage(items, handler=reraise)
    return items


def source_digest(url: str) -> str:
    """sha256 of a shard's bytes, however it is reached."""
    reader = HashingReader(open_stream(url))
    return reader.finish()


def image_bytes(sample: dict) -> bytes | None:
    return next((sample[e] for e in IMAGE_EXTS if e in sample), None)


def read_shard(url: str) -> list[RawSample]:
    """All samples of one shard, in tar order. Raises ShardReadError naming the shard."""
    return read_shard_with_digest(url)[0]


def read_shard_with_digest(url: str) -> tuple[list[RawSample], str]:
    """All samples of one shard in tar order, and the sha256 of the shard's bytes."""
    samples: list[RawSample] = []
    try:
        reader = HashingReader(open_stream(url))
        for s in iter_tar_samples(url, reader):
            samples.append(RawSample(str(s["__key__"]), image_bytes(s), _parse_label(s.get("cls"))))
        digest = reader.finish()
    except Exception as e:
        msg = str(e).split(" @ ")[0]
        raise ShardReadError(f"{url}: cannot read shard ({type(e).__name__}: {msg})") from e
    return samples, digest

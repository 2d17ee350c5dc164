"""Samples per shard, recorded once beside the shards: webdataset's `sizes.json`.

An epoch's length in plain and live pretraining was a pass over every tar's headers before
step 1: on an object store one ranged read per member, at ImageNet scale a pass over the
whole dataset. The webdataset convention (open_clip's `get_dataset_size` reads it) keeps
the counts in a JSON object beside the shards, the shard's file name -> its samples:

    shards/sizes.json     {"train-000000.tar": 1251, "train-000001.tar": 1252, ...}

`mrmae make-demo-shards` writes it, `mrmae shards index --shards ...` writes it for any
shards (merging into the file already there: the counts of shards not given stay), and
pretraining reads it for the shards it is given. A count is what training reads of the
shard: its distinct keys (`shards.count_samples`). The file is a claim, checked as the
tars are read: a tar that holds another count stops the run in one line naming it and the
file (`check_count`). The file itself: a regular file only (a FIFO or device is never
opened: lstat, O_NOFOLLOW | O_NONBLOCK), at most MAX_SIZES_BYTES (a larger one is refused
unread), one JSON object of non-negative integers, no key twice; the names of shards not
given are ignored, never opened.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from .errors import MrmaeError
from .shards import count_samples, is_url, local_path

SIZES_FILE = "sizes.json"
# ~40 bytes a shard: a million shards (shards.MAX_URLS) in ~40 MB; anything larger is
# damage or crafted, and never read.
MAX_SIZES_BYTES = 64 << 20


class SizesError(MrmaeError):
    """A sizes file that cannot be read or does not hold what its shards hold."""


def sizes_file_of(url: str) -> str | None:
    """The sizes file beside the shard at `url` (its directory's `sizes.json`); None for a
    shard with no directory to look in (`pipe:` commands, `-`)."""
    if url.startswith("pipe:") or url == "-":
        return None
    head, sep, _ = url.rpartition("/")
    return f"{head}/{SIZES_FILE}" if sep else SIZES_FILE


def shard_name(url: str) -> str:
    """The key of a shard in its sizes file: its file name, as open_clip looks it up."""
    return url.rstrip("/").rsplit("/", 1)[-1]


@dataclass
class ShardSizes:
    """What the sizes files beside some shards record of them: `counts` (url -> samples),
    `recorded_in` (url -> the sizes file), and `unrecorded` (the urls no file names)."""

    counts: dict[str, int] = field(default_factory=dict)
    recorded_in: dict[str, str] = field(default_factory=dict)
    unrecorded: list[str] = field(default_factory=list)

    def check_count(self, url: str, counted: int) -> None:
        """Stop, naming shard and file, when the tar just read holds another count than recorded."""
        recorded = self.counts.get(url)
        if recorded is not None and counted != recorded:
            raise SizesError(f"{url}: holds {counted} samples, {self.recorded_in[url]} records {recorded}: "
                             f"the file is stale or wrong; rewrite it with `mrmae shards index --shards ...`")

    def check_not_past(self, url: str, seen: int) -> None:
        """Stop as soon as a tar being read holds more samples than recorded (not at its end)."""
        recorded = self.counts.get(url)
        if recorded is not None and seen > recorded:
            raise SizesError(f"{url}: holds more than the {recorded} samples {self.recorded_in[url]} records: "
                             f"the file is stale or wrong; rewrite it with `mrmae shards index --shards ...`")


def _read_file(path: str) -> bytes | None:
    """The sizes file's bytes, or None when there is none. Locally a regular file only, at
    most MAX_SIZES_BYTES; on a store at most that many bytes are fetched."""
    from .cache_format.common import CacheError
    from .cache_format.listing import read_regular

    local = local_path(path)
    try:
        if local is not None:
            return read_regular(local, limit=MAX_SIZES_BYTES)
        import fsspec

        fs, p = fsspec.core.url_to_fs(path)
        data = fs.cat_file(p, start=0, end=MAX_SIZES_BYTES + 1)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except CacheError as e:  # a FIFO, a device, a link, too large: one line naming it
        raise SizesError(str(e).replace("a cache's file", "a sizes file")) from None
    except (OSError, ValueError, ImportError) as e:
        raise SizesError(f"{path}: cannot read ({type(e).__name__}: {e})") from None
    if len(data) > MAX_SIZES_BYTES:
        raise SizesError(f"{path}: more than {MAX_SIZES_BYTES:,} bytes, more than any sizes file holds; not read")
    return data


def _unique(pairs: list[tuple[str, object]]) -> dict:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"key {next(k for k in keys if keys.count(k) > 1)!r} appears twice")
    return dict(pairs)


def parse_sizes(data: bytes, where: str) -> dict[str, int]:
    """A sizes file's bytes -> {shard file name: samples}; anything but one JSON object of
    integers >= 0 (a key twice, a string, a float, true) is one SizesError naming it."""
    try:
        obj = json.loads(data, object_pairs_hook=_unique)
    except RecursionError:
        raise SizesError(f"{where}: unreadable (nested too deeply)") from None
    except ValueError as e:  # (JSONDecodeError, UnicodeDecodeError, a repeated key)
        raise SizesError(f"{where}: unreadable, not a JSON object of shard sizes ({e})") from None
    if not isinstance(obj, dict):
        raise SizesError(f"{where}: expected a JSON object of shard file name -> samples, got {type(obj).__name__}")
    for name, n in obj.items():
        if not (isinstance(n, int) and not isinstance(n, bool) and 0 <= n < 2**63):
            shown = name if len(name) <= 60 else name[:57] + "..."
            raise SizesError(f"{where}: {shown!r}: expected a number of samples (an integer >= 0), got {str(n)[:40]}")
    return obj


def read_sizes(urls: list[str]) -> ShardSizes:
    """The counts the sizes files beside `urls` record of them (each file read once)."""
    out, files = ShardSizes(), {}
    for url in urls:
        path = sizes_file_of(url)
        if path is not None and path not in files:
            data = _read_file(path)
            files[path] = None if data is None else parse_sizes(data, path)
        recorded = files.get(path) if path is not None else None
        name = shard_name(url)
        if recorded is not None and name in recorded:
            out.counts[url], out.recorded_in[url] = recorded[name], path
        else:
            out.unrecorded.append(url)
    return out


def index_shards(urls: list[str], threads: int = 8) -> dict[str, dict[str, int]]:
    """Count every shard's samples (its headers read, data dropped; several at once) and
    write them into the sizes file beside each, merged with the counts it holds of other
    shards. Returns {sizes file: the counts written for the given shards}."""
    from .cache_format.location import parallel_map

    by_file: dict[str, dict[str, int]] = {}
    for url in urls:
        if sizes_file_of(url) is None:
            raise SizesError(f"{url}: a command's output has no directory to keep a sizes file in; "
                             "index the shards where they are stored")
    counts = parallel_map(count_samples, urls, threads)
    for url, n in zip(urls, counts):
        by_file.setdefault(sizes_file_of(url), {})[shard_name(url)] = n
    for path, mine in by_file.items():
        data = _read_file(path)
        merged = {**(parse_sizes(data, path) if data is not None else {}), **mine}
        _write_file(path, (json.dumps(dict(sorted(merged.items())), indent=1) + "\n").encode())
    return by_file


def _write_file(path: str, data: bytes) -> None:
    """Replace `path` whole: a temporary beside it renamed into place, or one PUT on a store."""
    import secrets

    local = local_path(path)
    if local is None and is_url(path):
        import fsspec

        fs, p = fsspec.core.url_to_fs(path)
        fs.pipe_file(p, data)
        return
    tmp = f"{local}.{os.getpid()}-{secrets.token_hex(4)}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, local)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_sizes(directory: str, counts: dict[str, int]) -> str:
    """Write `counts` ({shard file name: samples}) as the sizes file of a local directory of
    shards just written (make-demo-shards), replacing any; returns its path."""
    path = os.path.join(directory, SIZES_FILE)
    _write_file(path, (json.dumps(dict(sorted(counts.items())), indent=1) + "\n").encode())
    return path

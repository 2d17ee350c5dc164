"""A cache as a whole: which backend stores it, its writers, its readers, its integrity."""

from __future__ import annotations

import os
import re

from .common import ROWS_PER_CHUNK, CacheError, ViewTargets, dir_bytes, group_digest
from .location import Location, drop_staging, is_url, staging_dir
from .manifest import backend_of, find_shard, read_manifest, record_shard
from .wds_store import WdsShard, WdsShardWriter, wds_codec_description
from .zarr_store import ShardGroup, ShardWriter, zarr_codec_description

BACKENDS = ("zarr", "wds")
_WRITERS = {"zarr": ShardWriter, "wds": WdsShardWriter}
_READERS = {"zarr": ShardGroup, "wds": WdsShard}


def _check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise CacheError(f"unknown cache format {backend!r}: expected one of {', '.join(BACKENDS)}")
    return backend


def codec_description(dtype: str, backend: str = "zarr") -> str:
    return zarr_codec_description(dtype) if _check_backend(backend) == "zarr" else wds_codec_description()


def storage_section(backend: str, dtype: str, pixels: str | None = None) -> dict:
    """The manifest's `storage` for a new cache (what `config_mismatch` compares);
    `pixels`: the codec of stored views (`--store-pixels`), or None."""
    storage = {"backend": _check_backend(backend), "dtype": dtype, "pixels": pixels,
               "quantisation": "per-token absmax int8, value = int8 x scale" if dtype == "int8" else None,
               "codec": codec_description(dtype, backend)}
    if backend == "zarr":
        storage["rows_per_chunk"] = ROWS_PER_CHUNK
    return storage


def open_shard_writer(backend: str, root: str | os.PathLike, source: str, max_rows: int, dim: int, grid_len: int,
                      dtype: str, layers: tuple[int, ...] = (), pixels: str | None = None) -> ShardWriter | WdsShardWriter:
    """The writer of one input shard for `backend`; both have append / close / abort, `name`,
    `group_path` (the manifest entry's `group`), `final` (the finished local copy) and `rows`.

    For a cache at a URL the writer works in a local staging directory; `commit_shard`
    uploads what it wrote. `pixels`: the file extension of stored views, when stored.
    """
    local_root = staging_dir() if is_url(root) else root
    writer = _WRITERS[_check_backend(backend)](local_root, source, max_rows, dim, grid_len, dtype, layers, pixels)
    if is_url(root):
        abort = writer.abort

        def abort_and_drop() -> None:
            abort()
            drop_staging(local_root)

        writer.abort = abort_and_drop
    return writer


def commit_shard(root: str | os.PathLike, writer: ShardWriter | WdsShardWriter, entry: dict) -> None:
    """Make a closed writer's shard part of the cache: its bytes first, then its entry.

    A local writer has already renamed its group into place; a staged one is uploaded
    here. Until the entry is written the shard is not in the cache, whatever a kill
    leaves behind.
    """
    if is_url(root):
        Location(root).publish(writer.final, writer.group_path)
        drop_staging(writer.root)
    record_shard(root, entry)


def check_integrity(root: str | os.PathLike) -> list[str]:
    """Problems with the stored shards, without running any teacher: one line each.

    Compares every complete shard's stored bytes (a Zarr group's files, or a tar) with the
    sha256 recorded when it was written (bit rot, truncation, a replaced chunk) and
    notices missing ones.
    """
    loc = Location(root)
    problems = []
    for entry in read_manifest(root)["shards"]:
        if entry.get("status") != "complete":
            continue
        path = loc.join(entry["group"])
        if not loc.exists(entry["group"]):
            problems.append(f"{path}: group of {entry['source']} is missing")
            continue
        digest, size = group_digest(path)
        if "sha256" in entry and digest != entry["sha256"]:
            what = f"{size} bytes, recorded {entry['bytes']}" if size != entry.get("bytes") else "same size"
            problems.append(f"{path}: sha256 differs from the one recorded at write time ({what}): "
                            f"damaged or changed")
    return problems


def target_root(root: str | os.PathLike, name: str) -> str:
    """Where the targets of teacher `name`, added to the cache at `root`, live: a cache of
    its own (same layout, same views) at `root/targets/<name>`."""
    if not re.fullmatch(r"[A-Za-z0-9._-]+", name) or name in (".", ".."):
        raise CacheError(f"target name {name!r}: use letters, digits, '.', '_' and '-' only")
    return Location(root).join(f"targets/{name}")


def target_name(spec: str) -> str:
    """The default name of an added teacher's targets: its spec without the weights, e.g.
    `clip:ViT-B-16@/w/b16.safetensors` -> `clip-ViT-B-16`."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", spec.split("@")[0].replace(":", "-"))


def list_targets(root: str | os.PathLike) -> list[str]:
    """Names of the teachers added to a cache (the one that drew the views not included)."""
    return [p.split("/")[1] for p in Location(root).glob("targets/*/manifest.json")]


class FeatureCache:
    """A cache, local or at an fsspec URL: its manifest and its complete shards, in either backend."""

    def __init__(self, root: str | os.PathLike, target: str | None = None):
        """`target`: the targets of a teacher added with `extract-features --add-teacher`
        (None: those of the teacher that drew the views)."""
        if target is not None:
            if target not in list_targets(root):
                known = ", ".join(list_targets(root)) or "none"
                raise CacheError(f"{root}: no target {target!r} (added teachers: {known})")
            root = target_root(root, target)
        self.location = Location(root)
        self.root = str(self.location)
        self.manifest = read_manifest(self.root)
        self.backend = _check_backend(backend_of(self.manifest))

    @property
    def complete_shards(self) -> list[dict]:
        return [s for s in self.manifest["shards"] if s.get("status") == "complete"]

    def _open(self, entry: dict) -> ShardGroup | WdsShard:
        return _READERS[self.backend](self.location.join(entry["group"]), entry)

    def shard(self, source: str) -> ShardGroup | WdsShard:
        entry = find_shard(self.manifest, source)
        if entry is None or entry.get("status") != "complete":
            raise CacheError(f"{self.root}: shard {source} is not in the cache (or not complete)")
        return self._open(entry)

    def get(self, source: str, key: str, view: int) -> ViewTargets:
        return self.shard(source).get(key, view)

    def stored_bytes(self) -> int:
        """Bytes on disk of the complete shards (temporaries and lock files not counted)."""
        return sum(s.get("bytes") or dir_bytes(self.location.join(s["group"])) for s in self.complete_shards)

    def logical_bytes(self) -> int:
        """Bytes of all complete shards' arrays before compression."""
        return sum(self._open(s).logical_bytes() for s in self.complete_shards)

"""manifest.json: what made a cache and which shards are complete; one writer at a time."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Iterator

from .common import FORMAT_VERSION, CacheError

MANIFEST = "manifest.json"


def group_name(source: str) -> str:
    """Stable, file-name-safe group name for an input shard URL."""
    stem = re.sub(r"\.tar(\.\w+)?$", "", source.rstrip("/").split("/")[-1].split("::")[-1])
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", stem)[:80] or "shard"
    return f"{stem}-{hashlib.sha1(source.encode()).hexdigest()[:8]}"


def new_manifest(teacher: dict, views: dict, storage: dict, version: str) -> dict:
    return {"format_version": FORMAT_VERSION, "mrmae_version": version, "teacher": teacher,
            "views": views, "storage": storage, "shards": []}


def backend_of(manifest: dict) -> str:
    """The storage backend of a cache (`zarr` for caches from before the field was read)."""
    return manifest.get("storage", {}).get("backend", "zarr")


def read_manifest(root: str | os.PathLike) -> dict:
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise CacheError(f"{root}: not a feature cache (no {MANIFEST})")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CacheError(f"{path}: unreadable manifest ({e})") from e
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CacheError(f"{path}: format_version {manifest.get('format_version')!r}, this mrmae reads {FORMAT_VERSION}")
    return manifest


def _write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


@contextlib.contextmanager
def locked_manifest(root: str | os.PathLike) -> Iterator[dict]:
    """Read-modify-write the manifest under an exclusive file lock (one writer at a time)."""
    root = Path(root)
    with open(root / ".manifest.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            manifest = read_manifest(root)
            yield manifest
            _write_json_atomic(root / MANIFEST, manifest)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def init_cache(root: str | os.PathLike, manifest: dict) -> None:
    """Create the cache and its manifest if absent (first writer wins, under the lock).

    A Zarr cache's root is also a Zarr v3 group; a wds cache is plain directories.
    """
    root = Path(root)
    (root / "shards").mkdir(parents=True, exist_ok=True)
    with open(root / ".manifest.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not (root / MANIFEST).exists():
                if backend_of(manifest) == "zarr":
                    import zarr

                    zarr.open_group(str(root), mode="a")
                _write_json_atomic(root / MANIFEST, manifest)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def config_mismatch(existing: dict, wanted: dict) -> str | None:
    """The first difference between two manifests' teacher/views/storage, or None.

    The teacher's spec and weights path are not compared (files move); its architecture,
    geometry and weights fingerprint are.
    """
    for section in ("teacher", "views", "storage"):
        a, b = existing.get(section, {}), wanted.get(section, {})
        for key in list(b) + [k for k in a if k not in b]:  # in the order fields are declared
            if section == "teacher" and key in ("spec", "weights"):
                continue
            if a.get(key) != b.get(key):
                return f"{section}.{key}: cache has {a.get(key)!r}, asked for {b.get(key)!r}"
    return None


def shard_entry(manifest: dict, source: str) -> dict | None:
    """The manifest entry of exactly this source URL, or None."""
    return next((s for s in manifest["shards"] if s["source"] == source), None)


def shard_basename(source: str) -> str:
    return source.rstrip("/").split("/")[-1]


def find_shard(manifest: dict, source: str) -> dict | None:
    """The entry for `source`: the same URL, else the one entry with the same file name.

    Training often names the shards differently from extraction (a relative path, another
    mount, a `pipe:` command): the tar's file name is what identifies it.
    """
    entry = shard_entry(manifest, source)
    if entry is not None:
        return entry
    same = [s for s in manifest["shards"] if shard_basename(s["source"]) == shard_basename(source)]
    if len(same) > 1:
        raise CacheError(f"shard {source}: {len(same)} cached shards share its file name; name it as at extraction")
    return same[0] if same else None


def record_shard(root: str | os.PathLike, entry: dict) -> None:
    """Replace or add one shard's entry in the manifest."""
    with locked_manifest(root) as manifest:
        manifest["shards"] = [s for s in manifest["shards"] if s["source"] != entry["source"]] + [entry]
        manifest["shards"].sort(key=lambda s: s["group"])

"""The manifest: manifest.json says what made a cache; shards/<name>.json, one per complete
shard, says which shards it holds. No file is ever written by two processes, so the cache
needs no lock, locally, on NFS or on an object store."""

from __future__ import annotations

import hashlib
import json
import os
import re

from .common import FORMAT_VERSION, READABLE_VERSIONS, CacheError
from .location import Location
from .pca import MEASURED_FIELDS

MANIFEST = "manifest.json"


def group_name(source: str) -> str:
    """Stable, file-name-safe group name for an input shard URL."""
    stem = re.sub(r"\.tar(\.\w+)?$", "", source.rstrip("/").split("/")[-1].split("::")[-1])
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", stem)[:80] or "shard"
    return f"{stem}-{hashlib.sha1(source.encode()).hexdigest()[:8]}"


def new_manifest(teacher: dict, views: dict, storage: dict, version: str) -> dict:
    """The configuration part of a manifest; `read_manifest` adds the `shards` entries."""
    return {"format_version": FORMAT_VERSION, "mrmae_version": version, "teacher": teacher,
            "views": views, "storage": storage}


def backend_of(manifest: dict) -> str:
    """The storage backend of a cache (`zarr` for caches from before the field was read)."""
    return manifest.get("storage", {}).get("backend", "zarr")


def entry_path(group: str) -> str:
    """Where a shard's entry lives, beside its group: shards/<name>.json."""
    return re.sub(r"\.tar$", "", group) + ".json"


def read_manifest(root: str | os.PathLike) -> dict:
    """manifest.json plus, under `shards`, the entry of every complete shard (by group name)."""
    loc = Location(root)
    try:
        text = loc.read_bytes(MANIFEST)
    except FileNotFoundError:
        raise CacheError(f"{root}: not a feature cache (no {MANIFEST})") from None
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as e:
        raise CacheError(f"{loc.join(MANIFEST)}: unreadable manifest ({e})") from e
    if manifest.get("format_version") not in READABLE_VERSIONS:
        raise CacheError(f"{loc.join(MANIFEST)}: format_version {manifest.get('format_version')!r}, "
                         f"this mrmae reads {' and '.join(map(str, READABLE_VERSIONS))}")
    names = loc.glob("shards/*.json")
    entries = []
    for name, blob in zip(names, loc.read_many(names)):
        try:
            entries.append(json.loads(blob))
        except json.JSONDecodeError as e:
            raise CacheError(f"{loc.join(name)}: unreadable shard entry ({e})") from e
    manifest["shards"] = sorted(entries, key=lambda s: s["group"])
    return manifest


def _empty_zarr_group() -> bytes:
    import zarr

    store = zarr.storage.MemoryStore()
    zarr.open_group(store, mode="w")
    return store._store_dict["zarr.json"].to_bytes()


def init_cache(root: str | os.PathLike, manifest: dict) -> None:
    """Create the cache's manifest if absent; the first of racing writers wins, whole.

    A Zarr cache's root is also a Zarr v3 group (its zarr.json); a wds cache is plain
    files. `shards` entries are never part of manifest.json: each is its own file.
    """
    loc = Location(root)
    config = {k: v for k, v in manifest.items() if k != "shards"}
    if backend_of(config) == "zarr":
        loc.create_exclusive("zarr.json", _empty_zarr_group())
    loc.create_exclusive(MANIFEST, (json.dumps(config, indent=1) + "\n").encode())


def config_mismatch(existing: dict, wanted: dict) -> str | None:
    """The first difference between two manifests' teacher/views/storage, or None.

    The teacher's spec and weights path are not compared (files move); its architecture,
    geometry and weights fingerprint are. Of `storage.pca` only the configuration (rank,
    fit_views) is: what the fit measured (explained variance, the file's sha256) is known
    only once the basis exists, and a cache keeps its first basis anyway.
    """
    for section in ("teacher", "views", "storage"):
        a, b = existing.get(section, {}), wanted.get(section, {})
        for key in list(b) + [k for k in a if k not in b]:  # in the order fields are declared
            if section == "teacher" and key in ("spec", "weights"):
                continue
            va, vb = a.get(key), b.get(key)
            if section == "storage" and key == "pca":
                va, vb = _pca_config(va), _pca_config(vb)
            if va != vb:
                return f"{section}.{key}: cache has {va!r}, asked for {vb!r}"
    return None


def _pca_config(pca: dict | None) -> dict | None:
    """`storage.pca` without the fields the fit measured (None: no PCA; absent in older caches)."""
    return None if pca is None else {k: v for k, v in pca.items() if k not in MEASURED_FIELDS}


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
    """Mark a shard complete: write its entry (after its bytes are in place)."""
    Location(root).write_bytes(entry_path(entry["group"]), (json.dumps(entry, indent=1) + "\n").encode())


def forget_shard(root: str | os.PathLike, group: str) -> None:
    """Remove a shard's entry before its group is rewritten, so it never looks complete."""
    Location(root).remove(entry_path(group))

"""Cache format v1: the one module that reads and writes a teacher-feature cache.

Layout (CACHE_FORMAT.md says the same for people):

    CACHE/manifest.json           what made the cache, and which shard groups are complete
    CACHE/zarr.json               Zarr v3 root group
    CACHE/shards/<name>/          one group per input shard, written by exactly one process
        keys [N] str  view [N] int16  crop [N,4] int32 (top,left,height,width)  flip [N] bool
        features [N,L,C] int8 + scale [N,L] float16   (or float16 without scale)
        attention [N,L] float16   cls [N,C] float16   layer<i> [N,L,C] (+ layer<i>_scale)

Rows follow the source tar's sample order, views 0..K-1 per sample. A group is written
under a temporary name and renamed into place when whole, then the manifest marks it
complete, so a killed writer never leaves a group that looks finished.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import zarr
from zarr.codecs import BloscCodec, ZstdCodec

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
ROWS_PER_CHUNK = 16  # views per features chunk: sequential loader reads, ~2.4 MB int8 for B/16


class CacheError(ValueError):
    """A cache that is missing, damaged, or does not fit what is asked of it."""


# --- quantisation ---------------------------------------------------------------------


def quantize_int8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float [..., C] -> (int8 [..., C], float16 scale [...]); value ~= int8 * scale.

    scale = per-token absmax / 127, rounded to float16 *before* quantising so the stored
    scale is the one the values were divided by (error <= scale / 2 per element).
    """
    x = np.asarray(x, dtype=np.float32)
    scale = (np.abs(x).max(axis=-1) / 127.0).astype(np.float16)
    s = scale.astype(np.float32)[..., None]
    q = np.divide(x, s, out=np.zeros_like(x), where=s > 0)
    return np.clip(np.rint(q), -127, 127).astype(np.int8), scale


def dequantize(values: np.ndarray, scale: np.ndarray | None) -> np.ndarray:
    """Stored features -> float32 (int8 x scale, or float16 as is)."""
    if scale is None:
        return values.astype(np.float32)
    return values.astype(np.float32) * scale.astype(np.float32)[..., None]


# --- codecs -----------------------------------------------------------------------------

# Chosen by benchmarks/codecs.py on teacher activations (BENCHMARKS.md): int8 values have
# no byte structure for shuffle to exploit, and zstd alone is as small as any blosc mode
# and faster. float16 gains from byte shuffle only when blosc's blocks are large enough
# (1 MiB) for the exponent bytes to share zstd tables: 1.19x against 1.09x for zstd alone.
def compressor_for(dtype: str) -> list:
    if dtype == "int8":
        return [ZstdCodec(level=3)]
    return [BloscCodec(cname="zstd", clevel=3, shuffle="shuffle", blocksize=1 << 20)]


def codec_description(dtype: str) -> str:
    return "zstd(level=3)" if dtype == "int8" else "blosc(zstd, clevel=3, byte shuffle, 1 MiB blocks)"


# --- manifest ---------------------------------------------------------------------------


def group_name(source: str) -> str:
    """Stable, file-name-safe group name for an input shard URL."""
    stem = re.sub(r"\.tar(\.\w+)?$", "", source.rstrip("/").split("/")[-1].split("::")[-1])
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", stem)[:80] or "shard"
    return f"{stem}-{hashlib.sha1(source.encode()).hexdigest()[:8]}"


def new_manifest(teacher: dict, views: dict, storage: dict, version: str) -> dict:
    return {"format_version": FORMAT_VERSION, "mrmae_version": version, "teacher": teacher,
            "views": views, "storage": storage, "shards": []}


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
    """Create the store and its manifest if absent (first writer wins, under the lock)."""
    root = Path(root)
    (root / "shards").mkdir(parents=True, exist_ok=True)
    with open(root / ".manifest.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not (root / MANIFEST).exists():
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


# --- writing one shard group ------------------------------------------------------------


class ShardWriter:
    """Writes one input shard's rows into a temporary group, renamed into place on close.

    Rows arrive in order through `append`; they are buffered to whole chunks so every
    features chunk is written once (the small per-row arrays have larger chunks and are
    rewritten as they fill: negligible next to the features). `max_rows` is an upper bound (samples x views); the arrays are
    cut to the rows actually written when the group is finished.
    """

    def __init__(self, root: str | os.PathLike, source: str, max_rows: int, dim: int, grid_len: int,
                 dtype: str, layers: tuple[int, ...] = ()):
        self.root, self.source, self.dtype, self.layers = Path(root), source, dtype, layers
        self.name = group_name(source)
        self.final = self.root / "shards" / self.name
        self.tmp = self.root / "shards" / f".tmp-{self.name}-{os.getpid()}"
        # One process owns a shard at a time, so any other temp group of this shard is
        # what a killed writer left behind.
        for stale in self.final.parent.glob(f".tmp-{self.name}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        self.group = zarr.open_group(str(self.tmp), mode="w")
        n, L, C, r = max(max_rows, 1), grid_len, dim, ROWS_PER_CHUNK
        small = dict(compressors=[ZstdCodec(level=3)])
        mk = self.group.create_array
        self.arrays = {
            "keys": mk("keys", shape=(n,), dtype=str, chunks=(n,)),
            "view": mk("view", shape=(n,), dtype="int16", chunks=(n,), **small),
            "crop": mk("crop", shape=(n, 4), dtype="int32", chunks=(n, 4), **small),
            "flip": mk("flip", shape=(n,), dtype="bool", chunks=(n,), **small),
            "attention": mk("attention", shape=(n, L), dtype="float16", chunks=(r * 16, L), **small),
            "cls": mk("cls", shape=(n, C), dtype="float16", chunks=(r * 16, C), **small),
        }
        for name in ["features"] + [f"layer{i}" for i in layers]:
            store_dtype = "int8" if dtype == "int8" else "float16"
            self.arrays[name] = mk(name, shape=(n, L, C), dtype=store_dtype, chunks=(r, L, C),
                                   compressors=compressor_for(dtype))
            if dtype == "int8":
                self.arrays[f"{name}_scale"] = mk(f"{name}_scale", shape=(n, L), dtype="float16",
                                                  chunks=(r * 16, L), **small)
        self._buffer: dict[str, list[np.ndarray]] = {k: [] for k in self.arrays}
        self._buffered = 0
        self.rows = 0

    def append(self, keys: list[str], view: np.ndarray, crop: np.ndarray, flip: np.ndarray,
               features: np.ndarray, attention: np.ndarray, cls: np.ndarray,
               layers: dict[int, np.ndarray] | None = None) -> None:
        """Add rows (all arrays share the first dimension; features float32 [n, L, C])."""
        cols = {"keys": np.asarray(keys, dtype=object), "view": view.astype(np.int16),
                "crop": crop.astype(np.int32), "flip": flip.astype(bool),
                "attention": attention.astype(np.float16), "cls": cls.astype(np.float16)}
        for name, value in [("features", features)] + [(f"layer{i}", (layers or {})[i]) for i in self.layers]:
            if self.dtype == "int8":
                cols[name], cols[f"{name}_scale"] = quantize_int8(value)
            else:
                cols[name] = value.astype(np.float16)
        for k, v in cols.items():
            self._buffer[k].append(v)
        self._buffered += len(keys)
        if self._buffered >= ROWS_PER_CHUNK:
            self._flush(whole_chunks=True)

    def _flush(self, whole_chunks: bool) -> None:
        joined = {k: np.concatenate(v) for k, v in self._buffer.items() if v}
        if not joined:
            return
        n = self._buffered - (self._buffered % ROWS_PER_CHUNK if whole_chunks else 0)
        for k, v in joined.items():
            if n:
                self.arrays[k][self.rows:self.rows + n] = v[:n] if k != "keys" else v[:n].astype(str)
            self._buffer[k] = [v[n:]] if n < len(v) else []
        self.rows += n
        self._buffered -= n

    def close(self, attrs: dict) -> tuple[Path, str, int]:
        """Write the remaining rows, cut the arrays, rename the group into place.

        Returns (path, sha256, bytes) of the finished group, for the manifest.
        """
        self._flush(whole_chunks=False)
        for arr in self.arrays.values():
            arr.resize((self.rows,) + arr.shape[1:])
        self.group.attrs.update({**attrs, "rows": self.rows, "status": "complete"})
        digest, size = group_digest(self.tmp)
        if self.final.exists():
            shutil.rmtree(self.final)
        os.replace(self.tmp, self.final)
        return self.final, digest, size

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def group_digest(path: Path) -> tuple[str, int]:
    """sha256 over (relative path, bytes) of every file of a group, in path order; total bytes."""
    h, total = hashlib.sha256(), 0
    for f in sorted(p for p in Path(path).rglob("*") if p.is_file()):
        data = f.read_bytes()
        h.update(f"{f.relative_to(path).as_posix()}\x00{len(data)}\x00".encode())
        h.update(data)
        total += len(data)
    return h.hexdigest(), total


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def check_integrity(root: str | os.PathLike) -> list[str]:
    """Problems with the stored groups, without running any teacher: one line each.

    Compares every complete group's files with the sha256 recorded when it was written
    (bit rot, truncation, a replaced chunk) and notices missing groups.
    """
    root = Path(root)
    problems = []
    for entry in read_manifest(root)["shards"]:
        if entry.get("status") != "complete":
            continue
        path = root / entry["group"]
        if not path.is_dir():
            problems.append(f"{path}: group of {entry['source']} is missing")
            continue
        digest, size = group_digest(path)
        if "sha256" in entry and digest != entry["sha256"]:
            what = f"{size} bytes, recorded {entry['bytes']}" if size != entry.get("bytes") else "same size"
            problems.append(f"{path}: sha256 differs from the one recorded at write time ({what}): "
                            f"damaged or changed")
    return problems


# --- reading ------------------------------------------------------------------------------


@dataclass
class ViewTargets:
    """One cached view: geometry and targets (features dequantised to float32)."""

    key: str
    view_index: int
    crop: tuple[int, int, int, int]
    flip: bool
    features: np.ndarray  # [L, C] float32
    attention: np.ndarray  # [L] float32
    cls: np.ndarray  # [C] float32


class ShardGroup:
    """Read access to one input shard's group: rows by (key, view) or in sequential blocks."""

    def __init__(self, path: Path, entry: dict):
        self.path, self.entry = path, entry
        try:
            self.group = zarr.open_group(str(path), mode="r")
            self.keys = np.array([str(k) for k in self.group["keys"][:]])
            self.views = np.asarray(self.group["view"][:])
        except Exception as e:
            raise CacheError(f"{path}: unreadable shard group ({type(e).__name__}: {e})") from e
        self.quantized = "features_scale" in self.group
        self._row: dict[tuple[str, int], int] = {(k, int(v)): i for i, (k, v) in enumerate(zip(self.keys, self.views))}
        self._block: tuple[int, str, np.ndarray] | None = None  # (first row, layer, features)
        self._geometry: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.keys)

    def row(self, key: str, view: int) -> int:
        try:
            return self._row[(key, view)]
        except KeyError:
            raise CacheError(f"{self.path}: no row for key {key!r} view {view}") from None

    def read(self, rows: slice, layer: str = "features") -> dict[str, np.ndarray]:
        """A block of rows -> dict of numpy arrays, features dequantised to float32."""
        g = self.group
        scale = g[f"{layer}_scale"][rows] if self.quantized else None
        return {
            "keys": self.keys[rows], "view": self.views[rows], "crop": g["crop"][rows], "flip": g["flip"][rows],
            "features": dequantize(g[layer][rows], scale),
            "attention": g["attention"][rows].astype(np.float32), "cls": g["cls"][rows].astype(np.float32),
        }

    def geometry(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(crop [N,4], flip [N], attention [N,L] float32) of every row, read once."""
        if self._geometry is None:
            g = self.group
            self._geometry = (g["crop"][:], g["flip"][:], g["attention"][:].astype(np.float32))
        return self._geometry

    def features_row(self, i: int, layer: str = "features") -> np.ndarray:
        """Features of one row [L, C] float32, decoding each chunk once in a sequential pass.

        A training worker walks a shard's rows in tar order, so it keeps the last decoded
        chunk-aligned block instead of decompressing a whole chunk per row.
        """
        start = i - i % ROWS_PER_CHUNK
        if self._block is None or self._block[:2] != (start, layer):
            rows = slice(start, start + ROWS_PER_CHUNK)
            scale = self.group[f"{layer}_scale"][rows] if self.quantized else None
            self._block = (start, layer, dequantize(self.group[layer][rows], scale))
        return self._block[2][i - start]

    def get(self, key: str, view: int) -> ViewTargets:
        i = self.row(key, view)
        block = self.read(slice(i, i + 1))
        return ViewTargets(key, view, tuple(int(x) for x in block["crop"][0]), bool(block["flip"][0]),
                           block["features"][0], block["attention"][0], block["cls"][0])


class FeatureCache:
    """A cache on disk: its manifest and its complete shard groups."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.manifest = read_manifest(self.root)

    @property
    def complete_shards(self) -> list[dict]:
        return [s for s in self.manifest["shards"] if s.get("status") == "complete"]

    def shard(self, source: str) -> ShardGroup:
        entry = find_shard(self.manifest, source)
        if entry is None or entry.get("status") != "complete":
            raise CacheError(f"{self.root}: shard {source} is not in the cache (or not complete)")
        return ShardGroup(self.root / entry["group"], entry)

    def get(self, source: str, key: str, view: int) -> ViewTargets:
        return self.shard(source).get(key, view)

    def stored_bytes(self) -> int:
        """Bytes on disk of the complete groups (temporary groups and lock files not counted)."""
        return sum(s.get("bytes") or dir_bytes(self.root / s["group"]) for s in self.complete_shards)

    def logical_bytes(self) -> int:
        """Bytes of all complete groups' arrays before compression."""
        total = 0
        for s in self.complete_shards:
            g = zarr.open_group(str(self.root / s["group"]), mode="r")
            total += sum(a.nbytes for _, a in g.arrays() if a.dtype.kind != "T" and str(a.dtype) != "StringDType()")
        return total

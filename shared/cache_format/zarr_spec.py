"""What a shard's Zarr group must be, from its cache's manifest and its entry alone.

The writer creates every array with parameters the manifest fixes (dtype, row shapes,
codecs, chunk rows) and the entry sizes (rows = `num_views`). A reader compares each
array's `zarr.json` with this spec field by field, exactly, before zarr sees it: a
`data_type` turned from int8 to uint8, an added `transpose` or `fixedscaleoffset` codec, a
shape of 10^12 rows or another chunk shape is one error naming the group, the array and
the field. So nothing about decoding comes from a file: the spec does, and the file must
say the same. The spec also gives each chunk's decoded size, which bounds decompression
(`shared/frames.py`), and each chunk's rows, for messages.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from .common import CHECKED_VERSION, LISTED_VERSION, ROWS_PER_CHUNK, CacheError, int8_groups

PIXEL_CHUNK = 1 << 20  # bytes per chunk of the stored-views array (image files are compressed already)
SMALL_ROWS = ROWS_PER_CHUNK * 16  # chunk rows of attention, cls and the int8 scales
MAX_KEY_BYTES = 4096  # of one key in UTF-8 (PATH_MAX): bounds the `keys` chunk's decoded size
_CRC = {"name": "crc32c", "configuration": {}}
_ZSTD = {"name": "zstd", "configuration": {"level": 3, "checksum": False}}
_BLOSC = {"name": "blosc", "configuration": {"typesize": 2, "cname": "zstd", "clevel": 3, "shuffle": "shuffle",
                                             "blocksize": 1 << 20}}
_ITEMSIZE = {"int8": 1, "uint8": 1, "bool": 1, "int16": 2, "int32": 4, "int64": 8, "float16": 2}
_FILL = {"string": "", "bool": False}
_ARRAY_FIELDS = {"shape", "data_type", "chunk_grid", "chunk_key_encoding", "fill_value", "codecs", "attributes",
                 "zarr_format", "node_type", "storage_transformers", "dimension_names"}
_KNOWN_CODECS = {"bytes", "zstd", "blosc", "crc32c", "vlen-utf8"}  # (caches before format 4: whatever of these)


@dataclass(frozen=True)
class ArraySpec:
    """One array as the writer creates it. `shape[0]` None: any length (`pixels`, whose
    bytes the offsets give); `chunk_max` > chunk rows: an older writer's one-chunk arrays,
    created `chunk_max` rows long before their last rows were known."""

    name: str
    data_type: str
    shape: tuple[int | None, ...]
    chunks: tuple[int, ...]
    compressor: str  # zstd | blosc | none (after `bytes`, or `vlen-utf8` for strings)
    chunk_max: int = 0

    def codecs(self, checked: bool) -> list[dict]:
        first = {"name": "vlen-utf8", "configuration": {}} if self.data_type == "string" else \
            {"name": "bytes", "configuration": {"endian": "little"} if _ITEMSIZE[self.data_type] > 1 else {}}
        middle = {"zstd": [_ZSTD], "blosc": [_BLOSC], "none": []}[self.compressor]
        return [first, *middle, *([_CRC] if checked else [])]

    def chunk_count(self, length: int) -> int:
        return -(-length // self.chunks[0]) if length else 0

    def chunk_bytes(self) -> int:
        """Decoded bytes of one chunk (strings: at most, with keys of MAX_KEY_BYTES)."""
        per_row = math.prod(self.chunks[1:])
        if self.data_type == "string":
            return 4 + self.chunks[0] * (4 + MAX_KEY_BYTES)
        return self.chunks[0] * per_row * _ITEMSIZE[self.data_type]

    def rows_of(self, key: str, length: int) -> str:
        """The rows a chunk key (`c/<i>/...`) holds, for messages: `16-31`."""
        parts = key.split("/")
        if len(parts) < 2 or parts[0] != "c" or not parts[1].isdigit():
            return "all rows"
        first = int(parts[1]) * self.chunks[0]
        last = min(first + self.chunks[0], length) - 1
        return f"rows {first}-{last}" if self.name not in ("pixels",) else f"bytes {first:,}-{last:,}"


@dataclass(frozen=True)
class GroupSpec:
    """Every array of one shard's group, and the group's attributes, from manifest and entry."""

    arrays: dict[str, ArraySpec]
    optional: frozenset[str]  # arrays a group may lack (image_sha256: early format 4 writers)
    attributes: dict
    version: int
    per_image: int  # K: views of each sample, rows in order (`check_rows_tied`)

    @property
    def checked(self) -> bool:
        return self.version >= CHECKED_VERSION

    def logical_bytes(self, names: list[str]) -> int:
        """Bytes of arrays `names` before compression: their shapes x item sizes."""
        return sum(math.prod(self.arrays[n].shape) * _ITEMSIZE[self.arrays[n].data_type] for n in names)


def group_spec(manifest, entry) -> GroupSpec:
    """The spec of `entry`'s group in a cache with `manifest` (CACHE_FORMAT.md's array table)."""
    t, st, rows = manifest.teacher, manifest.storage, entry.num_views
    L, C = t.grid[0] * t.grid[1], t.dim
    width = st.pca.rank if st.pca else C
    one = max(rows, 1)
    # an older writer made the one-chunk arrays as long as the tar's samples x K, then cut them
    older = max((entry.num_samples + len(entry.skipped)) * manifest.views.per_image, one)
    most = 0 if manifest.format_version >= LISTED_VERSION else older
    a = [ArraySpec("keys", "string", (rows,), (one,), "zstd", most), ArraySpec("view", "int16", (rows,), (one,), "zstd", most),
         ArraySpec("crop", "int32", (rows, 4), (one, 4), "zstd", most),
         ArraySpec("flip", "bool", (rows,), (one,), "zstd", most),
         ArraySpec("attention", "float16", (rows, L), (SMALL_ROWS, L), "zstd"),
         ArraySpec("cls", "float16", (rows, C), (SMALL_ROWS, C), "zstd"),
         ArraySpec("image_sha256", "uint8", (rows, 32), (one, 32), "zstd")]
    for layer, w in [("features", width)] + [(f"layer{i}", C) for i in t.layers]:
        a.append(ArraySpec(layer, st.dtype, (rows, L, w), (ROWS_PER_CHUNK, L, w),
                           "zstd" if st.dtype == "int8" else "blosc"))
        if st.dtype == "int8":
            g = int8_groups(w, st.int8_group)
            a.append(ArraySpec(f"{layer}_scale", "float16", (rows, L, *(() if g is None else (g,))),
                               (SMALL_ROWS, L, *(() if g is None else (g,))), "zstd"))
    if st.pixels:
        a += [ArraySpec("pixels", "uint8", (None,), (PIXEL_CHUNK,), "none"),
              ArraySpec("pixels_offsets", "int64", (rows + 1,), (rows + 1,), "zstd", most and older + 1)]
    attrs = {"source": entry.source, "num_samples": entry.num_samples, "rows": rows, "status": "complete"}
    return GroupSpec({s.name: s for s in a}, frozenset({"image_sha256"}), attrs, manifest.format_version,
                     manifest.views.per_image)


def _codec(c) -> tuple:
    """A codec as compared: (name, configuration) with an absent configuration as {}."""
    if not isinstance(c, dict) or not isinstance(c.get("name"), str):
        return ("?", repr(c)[:40])
    return c["name"], c.get("configuration") or {}


def check_array_meta(where: str, spec: ArraySpec, meta, checked: bool, exact: bool) -> tuple[int, ArraySpec]:
    """An array's zarr.json (parsed) against `spec`; returns its length (rows, or bytes of
    `pixels`) and the spec with the chunk rows it has (an older writer's one-chunk arrays). CacheError naming `where` (group and array) and the first field that differs.
    `exact` (format 4 on): codecs and chunk key encoding as the writer writes them; older
    caches: their codecs only from the ones those writers used."""
    def fail(field: str, got, want) -> None:
        raise CacheError(f"{where}/zarr.json: {field}: {str(got)[:120]}, this cache's writer writes {str(want)[:120]}; "
                         "not read (run `mrmae cache verify`)")

    if not isinstance(meta, dict):
        fail("content", type(meta).__name__, "an object")
    extra = sorted(set(meta) - _ARRAY_FIELDS)
    if extra:
        fail(extra[0], "an unknown field", "no such field")
    for field, want in (("node_type", "array"), ("zarr_format", 3), ("data_type", spec.data_type)):
        if meta.get(field) != want:
            fail(field, meta.get(field), want)
    for field, want in (("attributes", {}), ("storage_transformers", []), ("dimension_names", None)):
        if meta.get(field, want) != want:
            fail(field, meta.get(field), want)
    shape = meta.get("shape")
    if not (isinstance(shape, list) and len(shape) == len(spec.shape) and all(type(n) is int and n >= 0 for n in shape)
            and all(w is None or n == w for n, w in zip(shape, spec.shape))):
        fail("shape", shape, list(spec.shape))
    chunks = (meta.get("chunk_grid") or {}).get("configuration", {}).get("chunk_shape") \
        if isinstance(meta.get("chunk_grid"), dict) else None
    lead_ok = chunks and type(chunks[0]) is int and (
        chunks[0] == spec.chunks[0] or spec.chunk_max and shape[0] <= chunks[0] <= spec.chunk_max)
    if meta.get("chunk_grid", {}).get("name") != "regular" or not (
            isinstance(chunks, list) and len(chunks) == len(spec.chunks) and lead_ok
            and list(chunks[1:]) == list(spec.chunks[1:])):
        fail("chunk_grid", meta.get("chunk_grid"), {"name": "regular", "chunk_shape": list(spec.chunks)})
    encoding = meta.get("chunk_key_encoding")
    if _codec(encoding) != ("default", {"separator": "/"}):
        fail("chunk_key_encoding", encoding, {"name": "default", "separator": "/"})
    fill = meta.get("fill_value")
    if fill != _FILL.get(spec.data_type, 0) or (type(fill) is bool) != (spec.data_type == "bool"):
        fail("fill_value", fill, _FILL.get(spec.data_type, 0))
    got = [_codec(c) for c in meta.get("codecs") or []]
    want = [_codec(c) for c in spec.codecs(checked)]
    if exact and got != want or not exact and (got[:1] != want[:1] or any(n not in _KNOWN_CODECS for n, _ in got)):
        fail("codecs", [n for n, _ in got], [n for n, _ in want])
    return shape[0], dataclasses.replace(spec, chunks=(chunks[0], *spec.chunks[1:]))

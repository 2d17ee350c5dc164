"""The Zarr v3 backend (default): one group per input shard, one array per column.

    CACHE/zarr.json               Zarr v3 root group
    CACHE/shards/<name>.<sha>/    one group per input shard, named after its bytes (CACHE_FORMAT.md)
        keys [N] str  view [N] int16  crop [N,4] int32 (top,left,height,width)  flip [N] bool
        features [N,L,C] int8 + features_scale [N,L,G] float16 (G = C / int8_group; [N,L]
                                  with one scale per token)   (or float16 without scale)
        attention [N,L] float16   cls [N,C] float16   layer<i> [N,L,C] (+ layer<i>_scale)
        pixels [bytes] uint8 + pixels_offsets [N+1] int64     (--store-pixels: row i's image
                                  file is pixels[offsets[i]:offsets[i+1]])
        image_sha256 [N,32] uint8 sha256 of the source image file row i's view was rendered from
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

from .common import (IMAGE_DIGEST_BYTES, ROWS_PER_CHUNK, CacheError, DigestColumn, ViewTargets, check_crops,
                     check_pixels_given, check_rows, check_rows_tied, content_group, dequantize, int8_groups, read_error,
                     remove_path, stored_features, view_targets, writer_temp)
from . import zarr_open
from ..prefetch import background
from .backend import Backend, register_backend
from .checked_store import ListedFileError
from .location import group_files, local_files, local_path, publish_local
from .manifest import Manifest, ShardEntry, check_row_count, ensure_zarr_groups, group_name
from .zarr_spec import MAX_KEY_BYTES, PIXEL_CHUNK, GroupSpec, group_spec

# --- codecs -----------------------------------------------------------------------------



# Chosen by benchmarks/codecs.py on teacher activations (BENCHMARKS.md): int8 values have
# no byte structure for shuffle to exploit, and zstd alone is as small as any blosc mode
# and faster. float16 gains from byte shuffle only when blosc's blocks are large enough
# (1 MiB) for the exponent bytes to share zstd tables: 1.19x against 1.09x for zstd alone.
# Every array ends with a crc32c of the compressed chunk (format 4): a flipped byte is an
# error as the chunk is read, never a wrong target (BENCHMARKS.md, "Checksums": its cost).
def compressor_for(dtype: str) -> list:
    if dtype == "int8":
        return [ZstdCodec(level=3), Crc32cCodec()]
    return [BloscCodec(cname="zstd", clevel=3, shuffle="shuffle", blocksize=1 << 20), Crc32cCodec()]


# Every chunk is written, even one equal to the fill value (which zarr would otherwise
# skip, and read back as fill values): so a missing chunk file is damage a reader can see.
ALL_CHUNKS = {"write_empty_chunks": True}
SMALL = dict(compressors=[ZstdCodec(level=3), Crc32cCodec()], config=ALL_CHUNKS)  # keys, geometry, ...


def zarr_codec_description(dtype: str) -> str:
    return "zstd(level=3)" if dtype == "int8" else "blosc(zstd, clevel=3, byte shuffle, 1 MiB blocks)"


_ONE_CHUNK = {"keys": (str, ()), "view": ("int16", ()), "crop": ("int32", (4,)), "flip": ("bool", ())}

# Rows a sequential reader decodes per call: 4 chunks at once, which zarr decompresses in
# parallel; each call costs ~0.5-1 ms of zarr overhead whatever its size.
READ_ROWS = 4 * ROWS_PER_CHUNK
# Blocks of READ_ROWS a sequential reader has read ahead (`ShardGroup.read_ahead`): on a store
# a block costs a few round trips (its chunks, then its scales), ~0.2 s at 50 ms a request,
# while a worker uses a block of 64 rows in ~0.1-0.2 s.
READ_AHEAD = 3


# --- writing one shard group ------------------------------------------------------------


class ShardWriter:
    """Writes one input shard's rows into a temporary group of its own, published whole.

    `finish` checks the rows on disk and names the group after its bytes (`group_path`:
    `shards/<name>.<sha256[:16]>`); `publish` renames it there, or yields to the same
    bytes already published by another writer; `close` does both; `abort` removes this
    writer's temporary and nothing else (CACHE_FORMAT.md, "Concurrent writers").

    Rows arrive in order through `append`; they are buffered to whole chunks so every
    features chunk is written once (the small per-row arrays have larger chunks and are
    rewritten as they fill: negligible next to the features). `max_rows` is an upper
    bound (samples x views); the arrays are cut to the rows actually written when the
    group is finished.
    """

    def __init__(self, root: str | os.PathLike, source: str, max_rows: int, dim: int, grid_len: int,
                 dtype: str, layers: tuple[int, ...] = (), pixels: str | None = None, feature_dim: int | None = None,
                 int8_group: int | None = None):
        """`dim`: the teacher's width C (cls, layer<i>); `feature_dim`: the width of
        `features` when it differs (K coefficients of a PCA cache); `int8_group`: channels
        per int8 scale (None: one scale per token)."""
        self.root, self.source, self.dtype, self.layers = Path(root), source, dtype, layers
        self.int8_group = int8_group
        self.name = group_name(source)
        self.group_path: str | None = None  # the manifest entry's `group`, known once `finish` has the bytes
        self.final: Path | None = None  # root / group_path
        self.digest: tuple[str, int] | None = None  # (sha256, bytes) of the finished group
        self.tmp = writer_temp(self.root / "shards", self.name)
        self._written: list[tuple[str, int]] = []  # (key, view) of every row appended, in order
        self.group = zarr.open_group(str(self.tmp), mode="w")
        n, L, C, r = max(max_rows, 1), grid_len, dim, ROWS_PER_CHUNK
        small = SMALL
        mk = self.group.create_array
        # keys, view, crop and flip: one chunk of exactly the rows, written by `finish` (a
        # reader's spec then knows its shape from the entry alone, CACHE_FORMAT.md)
        self._columns: dict[str, list[np.ndarray]] = {k: [] for k in _ONE_CHUNK}
        self.files = None  # the group's FileList, for its entry: known once `finish` has the bytes
        self.arrays = {
            "attention": mk("attention", shape=(n, L), dtype="float16", chunks=(r * 16, L), **small),
            "cls": mk("cls", shape=(n, C), dtype="float16", chunks=(r * 16, C), **small),
        }
        for name in ["features"] + [f"layer{i}" for i in layers]:
            store_dtype = "int8" if dtype == "int8" else "float16"
            width = (feature_dim or C) if name == "features" else C  # layer<i> are never projected
            # (write_empty_chunks also saves comparing every chunk with the fill value first,
            # a third of the writer's time on features)
            self.arrays[name] = mk(name, shape=(n, L, width), dtype=store_dtype, chunks=(r, L, width),
                                   compressors=compressor_for(dtype), config=ALL_CHUNKS)
            if dtype == "int8":  # [n, L], or [n, L, G] with G scales per token
                groups = () if int8_groups(width, int8_group) is None else (int8_groups(width, int8_group),)
                self.arrays[f"{name}_scale"] = mk(f"{name}_scale", shape=(n, L, *groups), dtype="float16",
                                                  chunks=(r * 16, L, *groups), **small)
        self._buffer: dict[str, list[np.ndarray]] = {k: [] for k in self.arrays}
        self._buffered = 0
        self.rows = 0
        # Stored views: image files end to end in one byte array, written in whole chunks.
        self._pixels = mk("pixels", shape=(0,), dtype="uint8", chunks=(PIXEL_CHUNK,), compressors=[Crc32cCodec()],
                          config=ALL_CHUNKS) \
            if pixels else None
        self._pixel_offsets, self._pixel_buf, self._pixel_written = [0], bytearray(), 0
        self._digests = DigestColumn(source)  # image_sha256: written whole by `finish` (32 bytes a row)

    def append(self, keys: list[str], view: np.ndarray, crop: np.ndarray, flip: np.ndarray,
               features: np.ndarray | tuple, attention: np.ndarray, cls: np.ndarray,
               layers: dict[int, np.ndarray | tuple] | None = None, pixels: list[bytes] | None = None,
               image_sha256: list[bytes] | np.ndarray | None = None) -> None:
        """`GroupWriter.append` (backend.py)."""
        check_pixels_given(self.source, self._pixels is not None, pixels, len(keys))
        self._digests.add(image_sha256, len(keys))
        for data in pixels or []:
            self._pixel_buf += data
            self._pixel_offsets.append(self._pixel_offsets[-1] + len(data))
        self._flush_pixels(final=False)
        for key in keys:
            if len(str(key).encode("utf-8", "surrogatepass")) > MAX_KEY_BYTES:
                raise CacheError(f"{self.source}: key {str(key)[:60]!r}...: longer than {MAX_KEY_BYTES} bytes, "
                                 "more than a cache stores")
        for name, value in (("keys", np.asarray(keys, dtype=object)), ("view", view.astype(np.int16)),
                            ("crop", crop.astype(np.int32)), ("flip", flip.astype(bool))):
            self._columns[name].append(value)
        cols = {"attention": attention.astype(np.float16), "cls": cls.astype(np.float16)}
        for name, value in [("features", features)] + [(f"layer{i}", (layers or {})[i]) for i in self.layers]:
            cols[name], scale = stored_features(value, self.dtype, self.int8_group)
            if scale is not None:
                cols[f"{name}_scale"] = scale
        for k, v in cols.items():
            self._buffer[k].append(v)
        self._written += [(str(k), int(v)) for k, v in zip(keys, view)]
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
                self.arrays[k][self.rows:self.rows + n] = v[:n]
            self._buffer[k] = [v[n:]] if n < len(v) else []
        self.rows += n
        self._buffered -= n

    def _flush_pixels(self, final: bool) -> None:
        if self._pixels is None:
            return
        n = len(self._pixel_buf) if final else len(self._pixel_buf) - len(self._pixel_buf) % PIXEL_CHUNK
        if n:
            end = self._pixel_written + n
            self._pixels.resize((end,))
            self._pixels[self._pixel_written:end] = np.frombuffer(bytes(self._pixel_buf[:n]), dtype=np.uint8)
            self._pixel_written, self._pixel_buf = end, self._pixel_buf[n:]

    def finish(self, attrs: dict, expected: list[tuple[str, int]] | None = None) -> tuple[str, int]:
        """Write the remaining rows, cut the arrays, check the group on disk holds exactly
        `expected` rows ((key, view) in order; by default those appended), and name it after
        its bytes. Returns (sha256, bytes) of the group, for the manifest entry."""
        self._flush(whole_chunks=False)
        if self._pixels is not None:
            self._flush_pixels(final=True)
            offsets = np.asarray(self._pixel_offsets, dtype=np.int64)
            self.group.create_array("pixels_offsets", data=offsets, chunks=(len(offsets),), **SMALL)
        for arr in self.arrays.values():
            arr.resize((self.rows,) + arr.shape[1:])
        for name, (dtype, width) in _ONE_CHUNK.items():
            arr = self.group.create_array(name, shape=(self.rows, *width), dtype=dtype,
                                          chunks=(max(self.rows, 1), *width), **SMALL)
            if self.rows:
                column = np.concatenate(self._columns[name])
                arr[:] = column.astype(str) if name == "keys" else column
        digests = self._digests.column()
        if digests is not None:
            self.group.create_array("image_sha256", data=digests, chunks=(max(len(digests), 1), IMAGE_DIGEST_BYTES),
                                    **SMALL)
        self.group.attrs.update({**attrs, "rows": self.rows, "status": "complete"})
        self._check_stored(self._written if expected is None else expected)
        *self.digest, self.files = group_files(self.tmp)
        self.digest = tuple(self.digest)
        self.group_path = content_group(self.name, self.digest[0])
        self.final = self.root / self.group_path
        return self.digest

    def _check_stored(self, expected: list[tuple[str, int]]) -> None:
        """Read the finished group back as readers will (every array checksummed and all its
        chunks present) and require keys and views to be exactly `expected`."""
        try:
            stored = ShardGroup(self.tmp, None)  # (read back before it has an entry)
            rows = list(zip((str(k) for k in stored.keys), (int(v) for v in stored.views)))
            digests = stored.image_digests()
        except (CacheError, OSError) as e:  # the temporary was removed or damaged under this writer
            raise CacheError(f"{self.tmp}: unreadable as written ({e}); shard {self.source} not published") from e
        check_rows(self.source, str(self.tmp), rows, expected)
        given = self._digests.column()
        if (digests is None) != (given is None) or (given is not None and not np.array_equal(digests, given)):
            raise CacheError(f"{self.tmp}: array image_sha256 is not as written; shard {self.source} not published")

    def publish(self) -> bool:
        """Rename the finished group to `final`; False when the same bytes were published
        already (another writer's: this one yields)."""
        return publish_local(self.tmp, self.final, self.digest[0])

    def close(self, attrs: dict, expected: list[tuple[str, int]] | None = None) -> tuple[Path, str, int]:
        """`finish` then `publish`: (path, sha256, bytes) of the published group."""
        digest, size = self.finish(attrs, expected)
        self.publish()
        return self.final, digest, size

    def abort(self) -> None:
        """Remove this writer's temporary (never another writer's, never a published group)."""
        remove_path(self.tmp)


# --- reading ------------------------------------------------------------------------------


def check_row_shapes(path: str, got: dict[str, tuple[int, ...]], shapes: dict[str, tuple[int, ...]]) -> None:
    """Each array's stored shape [N, ...] (`got`) has the rows the manifest gives (`shapes`):
    a group of another teacher's shapes is refused, not a shape error in a training step."""
    for name, want in shapes.items():
        if tuple(got[name][1:]) != tuple(want):
            raise CacheError(f"{path}: array {name} stores rows of shape {list(got[name][1:])}, the manifest's "
                             f"teacher gives {list(want)}: not this cache's group, or a damaged manifest")


def check_group_arrays(path: str, entry: ShardEntry, spec: GroupSpec, checked: bool) -> None:
    """Start-up's look at one group: the zarr.json of `keys`, `features`, `attention` and
    `cls`, each as the spec says (`zarr_open.check_group_arrays`)."""
    zarr_open.check_group_arrays(path, entry, spec, checked, ["keys", "features", "attention", "cls"])


def _rows_text(rows) -> str:
    """A selection of rows as a message shows it: 16-31, or 16."""
    if isinstance(rows, slice):
        stop = "end" if rows.stop is None else rows.stop - 1
        return f"{rows.start or 0}-{stop}"
    return str(rows)


class ShardGroup:
    """Read access to one input shard's group: rows by (key, view) or in sequential blocks.

    The interface every backend's shard reader has (`WdsShard` is the other one).
    `checked` (a format 4 cache): every array must carry a crc32c of each chunk and have all
    its chunks, which is proven once here, from one listing of the group; each chunk's checksum is
    then verified by zarr as it is read. Any damage is a CacheError naming the group, the
    array and the rows, never fill values or flipped targets.
    """

    def __init__(self, path: str | os.PathLike, entry: ShardEntry | None, checked: bool = True,
                 shapes: dict[str, tuple[int, ...]] | None = None, spec: GroupSpec | None = None):
        """`spec`: the group as its manifest and entry say it is (`zarr_spec.group_spec`):
        every array's metadata is compared with it, and the rows' counts tied to the entry.
        `shapes` (without a spec): what one row of some arrays must be (features [L, C or
        K], attention [L], cls [C]). `entry` None: a writer reading back its temporary."""
        self.path, self.entry, self.checked = str(path), entry, checked
        self._arrays: dict[str, zarr.Array] = {}
        try:
            self.store = zarr_open.open_checked(self.path, entry if isinstance(entry, ShardEntry) else None,
                                                spec, checked)
            self.group = zarr.open_group(store=self.store, mode="r", zarr_format=3, use_consolidated=False)
            if spec is None and shapes:
                check_row_shapes(self.path, {n: tuple(self.group[n].shape) for n in shapes}, shapes)
        except CacheError:
            raise
        except Exception as e:
            raise CacheError(f"{path}: unreadable shard group ({type(e).__name__}: {e})") from e
        self.keys = np.array([str(k) for k in self._get("keys", slice(None))])
        self.views = np.asarray(self._get("view", slice(None)))
        check_row_count(self.path, entry, len(self.keys))
        if spec is not None:
            check_rows_tied(self.path, self.keys, self.views, spec.per_image, entry)
        self.quantized = "features_scale" in self.group
        self._row: dict[tuple[str, int], int] = {(k, int(v)): i for i, (k, v) in enumerate(zip(self.keys, self.views))}
        self._block: tuple | None = None  # (first row, layer, stored values, scale or None)
        # A sequential reader's next blocks, read in threads while it uses this one (`read_ahead`):
        # (first row, layer) -> Future of `_read_block`. The same rows either way.
        self._ahead: dict[tuple[int, str], object] = {}
        self.read_ahead = False
        self._pixel_offsets: np.ndarray | None = None
        self._pixel_block: tuple[int, int, bytes] | None = None  # (first row, end row, their bytes)
        self._geometry: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self._image_sha256: np.ndarray | None = None

    def _get(self, name: str, rows) -> np.ndarray:
        """Rows of one array; a checksum mismatch, a truncated chunk or a codec error is one
        CacheError naming this group, the array and the rows."""
        try:
            if name not in self._arrays:
                self._arrays[name] = self.group[name]
            return self._arrays[name][rows]
        except ListedFileError:  # names the file and its rows already
            raise
        except Exception as e:
            where = "all rows" if rows == slice(None) else f"rows {_rows_text(rows)}"
            raise CacheError(f"{self.path}: array {name}, {where}: unreadable chunk ({read_error(e)}); "
                             "run `mrmae cache verify --repair`") from e

    def __len__(self) -> int:
        return len(self.keys)

    def row(self, key: str, view: int) -> int:
        try:
            return self._row[(key, view)]
        except KeyError:
            raise CacheError(f"{self.path}: no row for key {key!r} view {view}") from None

    def read(self, rows: slice, layer: str = "features") -> dict[str, np.ndarray]:
        """A block of rows -> dict of numpy arrays, features dequantised to float32."""
        scale = self._get(f"{layer}_scale", rows) if self.quantized else None
        crop = self._get("crop", rows)
        check_crops(f"{self.path}: array crop", crop)
        return {
            "keys": self.keys[rows], "view": self.views[rows], "crop": crop, "flip": self._get("flip", rows),
            "features": dequantize(self._get(layer, rows), scale),
            "attention": self._get("attention", rows).astype(np.float32),
            "cls": self._get("cls", rows).astype(np.float32),
        }

    def geometry(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(crop [N,4], flip [N], attention [N,L] float32) of every row, read once."""
        if self._geometry is None:
            crop = self._get("crop", slice(None))
            check_crops(f"{self.path}: array crop", crop)
            self._geometry = (crop, self._get("flip", slice(None)),
                              self._get("attention", slice(None)).astype(np.float32))
        return self._geometry

    def image_digests(self) -> np.ndarray | None:
        """uint8 [N, 32]: the sha256 of the source image file each row was rendered from,
        read once; None for a cache written before rows recorded it (only the shard's
        sha256 identifies its source then)."""
        if self._image_sha256 is None:
            if "image_sha256" not in self.group:
                return None
            digests = np.asarray(self._get("image_sha256", slice(None)))
            if digests.dtype != np.uint8 or digests.shape != (len(self), IMAGE_DIGEST_BYTES):
                raise CacheError(f"{self.path}: array image_sha256 is {digests.dtype} {list(digests.shape)}, "
                                 f"not uint8 [{len(self)}, {IMAGE_DIGEST_BYTES}]; run `mrmae cache verify --repair`")
            self._image_sha256 = digests
        return self._image_sha256

    def image_digest(self, i: int) -> bytes | None:
        """Row i's recorded image sha256 (32 bytes), or None (`image_digests`)."""
        digests = self.image_digests()
        return None if digests is None else digests[i].tobytes()

    def stored_row(self, i: int, layer: str = "features") -> tuple[np.ndarray, np.ndarray | None]:
        """Features of one row as stored: (int8 [L, C], float16 scale [L] or [L, G]) or (float16 [L, C], None).

        A training worker walks a shard's rows in tar order, so it keeps the last decoded
        chunk-aligned block instead of decompressing a whole chunk per row; dequantising
        is left to the consumer (the training step does it on the device, after keeping
        only the visible tokens).
        """
        start = i - i % READ_ROWS
        if self._block is None or self._block[:2] != (start, layer):
            ahead = self._ahead.pop((start, layer), None)
            self._block = ahead.result() if ahead is not None else self._read_block(start, layer)
            if self.read_ahead:
                self._read_next(start, layer)
        values, scale = self._block[2], self._block[3]
        # copies: a view would keep the whole READ_ROWS block alive in a shuffle buffer
        return values[i - start].copy(), None if scale is None else scale[i - start].copy()

    def _read_next(self, start: int, layer: str) -> None:
        """Have the READ_AHEAD blocks after `start` read in threads (each a few round trips on
        a store, while the reader uses the blocks before); forget those behind it."""
        for first in [k for k in self._ahead if k[0] <= start or k[1] != layer]:
            self._ahead.pop(first)
        for n in range(1, READ_AHEAD + 1):
            first = start + n * READ_ROWS
            if first < len(self) and (first, layer) not in self._ahead:
                self._ahead[(first, layer)] = background("rows", READ_AHEAD).submit(self._read_block, first, layer)

    def _read_block(self, start: int, layer: str) -> tuple:
        """(start, layer, stored values, scale or None) of rows start..start + READ_ROWS - 1."""
        rows = slice(start, start + READ_ROWS)
        scale = self._get(f"{layer}_scale", rows) if self.quantized else None
        return start, layer, self._get(layer, rows), scale

    def features_row(self, i: int, layer: str = "features") -> np.ndarray:
        """Features of one row [L, C] float32."""
        return dequantize(*self.stored_row(i, layer))

    def stored_pixels(self, i: int) -> bytes:
        """Row i's stored view (an image file: decode with views.decode_view), read in blocks
        of READ_ROWS rows so a sequential pass reads each byte once."""
        if self._pixel_offsets is None:
            if "pixels_offsets" not in self.group:
                raise CacheError(f"{self.path}: this cache stores no views (extract with --store-pixels)")
            self._pixel_offsets = np.asarray(self._get("pixels_offsets", slice(None)), dtype=np.int64)
        off = self._pixel_offsets
        if self._pixel_block is None or not self._pixel_block[0] <= i < self._pixel_block[1]:
            end = min(i + READ_ROWS, len(off) - 1)
            self._pixel_block = (i, end, np.asarray(self._get("pixels", slice(off[i], off[end]))).tobytes())
        first, _, block = self._pixel_block
        return block[off[i] - off[first]:off[i + 1] - off[first]]

    def get(self, key: str, view: int) -> ViewTargets:
        return view_targets(self, key, view)

    def logical_bytes(self) -> int:
        """Bytes of the group's arrays before compression (keys, stored views and image digests
        not counted, as the wds backend counts them)."""
        return sum(a.nbytes for name, a in self.group.arrays() if a.dtype.kind != "T"
                   and str(a.dtype) != "StringDType()" and not name.startswith(("pixels", "image_sha256")))


# --- the backend ----------------------------------------------------------------------------


@register_backend
class ZarrBackend(Backend):
    """Zarr v3: one group per shard, one array per column, a crc32c per chunk (module docstring)."""

    name, suffix = "zarr", ""
    help = "a Zarr v3 store"
    checksums = "crc32c per chunk, every chunk present"

    def codec(self, dtype: str) -> str:
        return zarr_codec_description(dtype)

    def storage(self, dtype: str) -> dict:
        return {"rows_per_chunk": ROWS_PER_CHUNK}

    def prepare(self, root: str | os.PathLike, manifest: Manifest) -> None:
        ensure_zarr_groups(root, manifest)

    def writer(self, root, source, max_rows, dim, grid_len, dtype, layers=(), pixels=None, feature_dim=None,
               int8_group=None) -> ShardWriter:
        return ShardWriter(root, source, max_rows, dim, grid_len, dtype, layers, pixels, feature_dim=feature_dim,
                           int8_group=int8_group)

    def open(self, path: str, entry: ShardEntry, manifest: Manifest, checked: bool) -> ShardGroup:
        return ShardGroup(path, entry, checked=checked, spec=group_spec(manifest, entry))

    def check(self, path: str, entry: ShardEntry, manifest: Manifest, checked: bool) -> None:
        """`keys`, `features`, `attention` and `cls` there, checksummed, of the manifest's row
        shapes and the entry's rows (every chunk present is proven as the loader opens it)."""
        check_group_arrays(path, entry, group_spec(manifest, entry), checked)

    def verify(self, reader: ShardGroup) -> None:
        """Every file of the group through its store's checks: the listed ones (format 5; and
        nothing unlisted there), or each array's chunks as its metadata gives them."""
        store = reader.store
        local = local_path(reader.path)
        if store.files is not None:
            if local is not None:
                extra = sorted({rel for rel, _ in local_files(local)} - set(store.files.paths))
                if extra:
                    raise CacheError(f"{reader.path}: file {extra[0]}: in the group, not in its entry's file list "
                                     f"({len(extra)} such); run `mrmae cache verify --repair`")
            keys = store.files.paths
        else:
            keys = ["zarr.json"] + [f"{name}/{k}" for name, spec in store.specs.items()
                                    for k in zarr_open.chunk_keys([store.lengths[name], *spec.chunks[1:]],
                                                                  list(spec.chunks))]
        for key in keys:
            store.read(key)

    def logical_bytes(self, manifest: Manifest, entries) -> int:
        """The writer's arrays for each entry's rows (keys, image digests and stored views not counted)."""
        counted = ["view", "crop", "flip", "attention", "cls"]
        for layer in ["features"] + [f"layer{i}" for i in manifest.teacher.layers]:
            counted += [layer, f"{layer}_scale"] if manifest.storage.dtype == "int8" else [layer]
        return sum(group_spec(manifest, e).logical_bytes(counted) for e in entries)

"""The WebDataset backend: one tar per input shard, one tar sample per view.

    CACHE/shards/<name>.<sha>.tar         named after its bytes, renamed into place when checked
        <sample>.meta.json                {key, view, crop: [top, left, height, width], flip,
                                           image_sha256: hex sha256 of the source image file}
        <sample>.features.npy.zst         [L, C] int8 (or float16)
        <sample>.scale.npy.zst            [L] or [L, G] float16, int8 only: value = features x scale
        <sample>.attention.npy.zst        [L] float16
        <sample>.cls.npy.zst              [C] float16
        <sample>.layer<i>.npy.zst         [L, C], and <sample>.layer<i>_scale.npy.zst (int8)

`<sample>` is `sample_name(key, view)`: the key made file-name safe (only A-Z a-z 0-9 _ -,
so never a path, never `..`, never a dot that would end webdataset's key early) plus
`_v<view>`; the original key is in meta.json. Every `.npy` member is written by
`numpy.save(allow_pickle=False)` and compressed alone with zstd (level 3), so the tar
stays seekable and streamable sample by sample (benchmarks/wds_codec.py measured this
against compressing the whole tar). Nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

import fsspec
import google_crc32c
import numpy as np
from numcodecs import Zstd

from ..frames import FrameError, zstd_decompress
from .common import (IMAGE_DIGEST_BYTES, ROWS_PER_CHUNK, CacheError, DigestColumn, ViewTargets, check_crops,
                     check_pixels_given, check_rows, check_rows_tied, content_group, dequantize, int8_groups,
                     read_error, stored_features, view_targets, writer_temp)
from .listing import FileList, NotRegularFile, RegularFile, file_digest, regular_size
from .backend import Backend, register_backend
from .location import group_digest, is_file, is_url, local_path, open_file, open_regular, publish_local
from .manifest import ShardEntry, check_row_count, group_name, load_json

ZSTD_LEVEL = 3
MEMBER_CODECS = ("zstd", "none")  # each .npy member compressed alone (.npy.zst), or stored as is
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
_MEMBER = re.compile(r"([A-Za-z0-9_-]+)\.([A-Za-z0-9_]+)\.(npy|npy\.zst|json|png|webp|jpg)")
_HEX_DIGEST = re.compile(r"[0-9a-f]{64}")
_GEOMETRY_BYTES = 2 + 16 + 1  # view int16, crop 4 x int32, flip bool: as the Zarr backend counts them


def wds_codec_description(codec: str = "zstd") -> str:
    return f"zstd(level={ZSTD_LEVEL}) per .npy member (.npy.zst)" if codec == "zstd" else "none"


def sample_name(key: str, view: int) -> str:
    """The tar sample name of (key, view): safe characters only, unique per key.

    A key that had to be changed (unsafe characters, or longer than 120) gets a short hash
    of the original so two keys never share a name.
    """
    safe = _UNSAFE.sub("_", key)[:120]
    if safe != key or not safe:
        safe = f"{safe}-{hashlib.sha1(key.encode()).hexdigest()[:8]}"
    return f"{safe}_v{int(view)}"


def _scale_member(layer: str) -> str:
    return "scale" if layer == "features" else f"{layer}_scale"


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def crc32c(data: bytes) -> int:
    return int(google_crc32c.value(bytes(data)))


def _zstd_frame_checked(data: bytes) -> bool:
    """Whether a zstd frame carries its content checksum (Frame_Header_Descriptor bit 2)."""
    return len(data) > 4 and data[:4] == b"\x28\xb5\x2f\xfd" and bool(data[4] & 0x04)


def _seal(meta: dict) -> bytes:
    """meta.json's bytes, ending with `crc32c`: the checksum of the JSON of the fields before it."""
    return json.dumps({**meta, "crc32c": crc32c(json.dumps(meta).encode())}).encode()


def _unseal(meta: dict) -> bool:
    """Remove a meta's own `crc32c` and say whether it matches the rest (json.loads keeps
    the field order, and the fields are ints, bools, strings and lists: the same text)."""
    seal = meta.pop("crc32c", None)
    return seal is not None and seal == crc32c(json.dumps(meta).encode())


_META_FIELDS = {"key", "view", "crop", "flip", "checksums", "image_sha256", "crc32c"}


def _check_meta(meta, where: str) -> None:
    """One view's meta.json as the writer makes it: key (text), view (0..32767), crop (4
    integers), flip (bool), checksums ({member: crc32c}), image_sha256, crc32c; anything else (a crafted
    or foreign file whose own crc32c was recomputed) is one CacheError naming `where`."""
    def is_int(v, lo: int, hi: int) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi

    if not isinstance(meta, dict):
        raise CacheError(f"{where}: expected a JSON object, got {type(meta).__name__}")
    checks = {"key": lambda v: isinstance(v, str), "view": lambda v: is_int(v, 0, 2**15 - 1),
              "crop": lambda v: isinstance(v, list) and len(v) == 4 and all(is_int(c, -2**31, 2**31 - 1) for c in v),
              "flip": lambda v: isinstance(v, bool),
              "checksums": lambda v: isinstance(v, dict) and all(is_int(c, 0, 2**32 - 1) for c in v.values()),
              "image_sha256": lambda v: isinstance(v, str),  # (its digits: _digest_column)
              "crc32c": lambda v: is_int(v, 0, 2**32 - 1)}
    for field in sorted(set(meta) | {"key", "view", "crop", "flip"}):
        if field not in _META_FIELDS:
            raise CacheError(f"{where}: {field!r}: unknown field")
        if field not in meta or not checks[field](meta[field]):
            raise CacheError(f"{where}: {field}: {'missing' if field not in meta else 'wrong type or range'}")


# --- writing one shard tar ----------------------------------------------------------------


class WdsShardWriter:
    """Writes one input shard's views, in order, into a temporary tar of its own,
    `shards/.tmp-<name>-<host>-<pid>-<random>.tar`; `finish` checks it and names it after
    its bytes (`shards/<name>.<sha256[:16]>.tar`), `publish` renames it there. Same
    interface as the Zarr `ShardWriter`.

    Tar headers carry mtime 0, uid/gid 0 and mode 0444, so the same rows give the same
    bytes (and sha256) whoever writes them.
    """

    def __init__(self, root: str | os.PathLike, source: str, max_rows: int, dim: int, grid_len: int,
                 dtype: str, layers: tuple[int, ...] = (), pixels: str | None = None, codec: str = "zstd",
                 feature_dim: int | None = None, int8_group: int | None = None):
        """`dim`: the teacher's width C (cls, layer<i>); `feature_dim`: the width of
        `features` when it differs (K coefficients of a PCA cache); `int8_group`: channels
        per int8 scale (None: one scale per token)."""
        self.int8_group = int8_group
        if codec not in MEMBER_CODECS:
            raise ValueError(f"member codec {codec!r}: expected one of {MEMBER_CODECS}")
        self.root, self.source, self.dtype, self.layers = Path(root), source, dtype, tuple(layers)
        self.shape = (grid_len, feature_dim or dim)  # of `features`
        self.name = group_name(source)
        self.group_path: str | None = None  # the manifest entry's `group`, known once `finish` has the bytes
        self.final: Path | None = None  # root / group_path
        self.digest: tuple[str, int] | None = None  # (sha256, bytes) of the finished tar
        self.tmp = writer_temp(self.root / "shards", self.name, ".tar")
        self.tmp.parent.mkdir(parents=True, exist_ok=True)
        self._written: list[tuple[str, int]] = []  # (key, view) of every row appended, in order
        self._zstd = Zstd(level=ZSTD_LEVEL, checksum=True) if codec == "zstd" else None  # frame checksums
        self._suffix = ".npy.zst" if codec == "zstd" else ".npy"
        self._tar = tarfile.open(self.tmp, "w", format=tarfile.PAX_FORMAT)
        self._names: set[str] = set()
        self._listed: list[tuple[str, int, str]] = []  # (member, size, sha256) of every member written
        self.files: FileList | None = None  # for the entry, once `finish` has closed the tar
        self._pixels = pixels  # file extension of stored views (`<sample>.pixels.<ext>`), or None
        self._digests = DigestColumn(source)  # every row's image sha256, or none (checked by `finish`)
        self.rows = 0

    def _add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), 0, 0o444
        self._tar.addfile(info, io.BytesIO(data))
        self._listed.append((name, len(data), file_digest(data)))

    def _encode(self, arr: np.ndarray) -> bytes:
        data = _npy(arr)
        return bytes(self._zstd.encode(data)) if self._zstd else data

    def _add_row(self, sample: str, meta: dict, members: list[tuple[str, bytes]], pixels: bytes | None) -> None:
        """One view: meta.json first, sealed with its own crc32c and holding the crc32c of
        every member that is no zstd frame with a checksum (codec "none", stored views)."""
        checksums = {} if self._zstd else {m: crc32c(data) for m, data in members}
        if pixels is not None:
            checksums["pixels"] = crc32c(pixels)
        self._add(f"{sample}.meta.json", _seal({**meta, **({"checksums": checksums} if checksums else {})}))
        for m, data in members:
            self._add(f"{sample}.{m}{self._suffix}", data)
        if pixels is not None:
            self._add(f"{sample}.pixels.{self._pixels}", pixels)

    def append(self, keys: list[str], view: np.ndarray, crop: np.ndarray, flip: np.ndarray,
               features: np.ndarray | tuple, attention: np.ndarray, cls: np.ndarray,
               layers: dict[int, np.ndarray | tuple] | None = None, pixels: list[bytes] | None = None,
               image_sha256: list[bytes] | np.ndarray | None = None) -> None:
        """`GroupWriter.append` (backend.py)."""
        check_pixels_given(self.source, self._pixels is not None, pixels, len(keys))
        first = self._digests.rows
        self._digests.add(image_sha256, len(keys))
        digests = self._digests.parts[-1] if self._digests.rows > first else None
        stored: dict[str, np.ndarray] = {}
        for name, value in [("features", features)] + [(f"layer{i}", (layers or {})[i]) for i in self.layers]:
            stored[name], scale = stored_features(value, self.dtype, self.int8_group)
            if scale is not None:
                stored[_scale_member(name)] = scale
        if tuple(stored["features"].shape[1:]) != self.shape:
            raise ValueError(f"features of shape {tuple(stored['features'].shape)}, this shard stores [n, "
                             f"{self.shape[0]}, {self.shape[1]}]")
        attention, cls = attention.astype(np.float16), cls.astype(np.float16)
        order = ["features"] + (["scale"] if self.dtype == "int8" else [])
        extra = [m for i in self.layers for m in (f"layer{i}", f"layer{i}_scale") if m in stored]
        for r, key in enumerate(keys):
            key, v = str(key), int(view[r])
            sample = sample_name(key, v)
            if sample in self._names:
                raise CacheError(f"{self.source}: key {key!r} view {v} written twice")
            self._names.add(sample)
            meta = {"key": key, "view": v, "crop": [int(c) for c in crop[r]], "flip": bool(flip[r])}
            if digests is not None:  # sealed with the rest of meta.json
                meta["image_sha256"] = digests[r].tobytes().hex()
            members = [(m, self._encode(stored[m][r])) for m in order] + [
                ("attention", self._encode(attention[r])), ("cls", self._encode(cls[r]))] + [
                (m, self._encode(stored[m][r])) for m in extra]
            self._add_row(sample, meta, members, None if pixels is None else pixels[r])
            self._written.append((key, v))
            self.rows += 1

    def finish(self, attrs: dict | None = None, expected: list[tuple[str, int]] | None = None) -> tuple[str, int]:
        """Finish the tar, check it holds exactly `expected` rows ((key, view) in order; by
        default those appended) and name it after its bytes; (sha256, bytes) for the entry.

        `attrs` (source, num_samples) are kept by the manifest entry only: a tar has no
        group attributes, and a tar under its final name is complete by construction.
        """
        self._tar.close()
        try:
            stored = WdsShard(self.tmp, None)  # (read back before it has an entry)
            rows = list(zip((str(k) for k in stored.keys), (int(v) for v in stored.views)))
            digests, given = stored.image_digests(), self._digests.column()
        except (OSError, CacheError) as e:  # the temporary was removed or damaged under this writer
            raise CacheError(f"{self.tmp}: unreadable as written ({e}); shard {self.source} not published") from e
        check_rows(self.source, str(self.tmp), rows, self._written if expected is None else expected)
        if (digests is None) != (given is None) or (given is not None and not np.array_equal(digests, given)):
            raise CacheError(f"{self.tmp}: image_sha256 in meta.json is not as written; shard {self.source} "
                             "not published")
        self.digest = group_digest(self.tmp)
        self.files = FileList(tuple(self._listed))
        self.group_path = content_group(self.name, self.digest[0], ".tar")
        self.final = self.root / self.group_path
        return self.digest

    def publish(self) -> bool:
        """Rename the finished tar to `final`; False when the same bytes were there already."""
        return publish_local(self.tmp, self.final, self.digest[0])

    def close(self, attrs: dict | None = None, expected: list[tuple[str, int]] | None = None
              ) -> tuple[Path, str, int]:
        """`finish` then `publish`: (path, sha256, bytes) of the published tar."""
        digest, size = self.finish(attrs, expected)
        self.publish()
        return self.final, digest, size

    def abort(self) -> None:
        """Remove this writer's temporary (never another writer's, never a published tar)."""
        try:
            self._tar.close()
        except OSError:  # a full disk: the temporary goes anyway
            pass
        finally:
            self.tmp.unlink(missing_ok=True)


# --- reading ------------------------------------------------------------------------------

MAX_META_BYTES = 64 << 10  # a meta.json: a key of at most 4096 UTF-8 bytes, escaped, and a few fields
MAX_MEMBER_BYTES = 256 << 20  # a member read without a spec (a writer's own temporary)


@dataclass(frozen=True)
class NpySpec:
    """One `.npy` member as the writer writes it: its header bytes, dtype and shape."""

    header: bytes
    dtype: np.dtype
    shape: tuple[int, ...]

    @staticmethod
    def of(shape: tuple[int, ...], dtype: str) -> NpySpec:
        buf = io.BytesIO()
        np.lib.format.write_array_header_1_0(buf, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                                   "fortran_order": False, "shape": tuple(shape)})
        return NpySpec(buf.getvalue(), np.dtype(dtype), tuple(shape))

    @property
    def size(self) -> int:
        return len(self.header) + int(np.prod(self.shape)) * self.dtype.itemsize

    def decode(self, data: bytes, compressed: int) -> np.ndarray:
        """The member's bytes -> its array: a zstd frame may declare at most `size` bytes
        (checked before anything is decompressed: never more memory), and the `.npy` must be
        exactly the writer's, header and length."""
        raw = zstd_decompress(data, self.size, at_most=True) if compressed else bytearray(data)
        if len(raw) != self.size or raw[:len(self.header)] != self.header:
            raise FrameError(f".npy {_npy_shown(raw)}: the manifest's teacher gives {self.dtype} {list(self.shape)}")
        return np.frombuffer(raw, self.dtype, offset=len(self.header)).reshape(self.shape)


def _npy_shown(raw: bytes) -> str:
    """What an `.npy` file's header says (dtype and shape), for a message."""
    try:
        f = io.BytesIO(bytes(raw[:4096]))
        np.lib.format.read_magic(f)
        shape, _, dtype = np.lib.format.read_array_header_1_0(f)
        return f"{dtype} {list(shape)}"
    except Exception:  # (not an .npy header at all)
        return f"of {len(raw):,} bytes, no .npy header"


@dataclass(frozen=True)
class WdsSpec:
    """What a cache's manifest says each row of its tars holds: the `.npy` members, and K."""

    members: dict[str, NpySpec]
    per_image: int

    def row_bytes(self) -> int:
        """Bytes of one row's arrays before compression, as the Zarr backend counts them:
        its `.npy` members' values and the geometry (view, crop, flip)."""
        return sum(int(np.prod(m.shape)) * m.dtype.itemsize for m in self.members.values()) + _GEOMETRY_BYTES


def member_spec(manifest) -> WdsSpec:
    """Each `.npy` member's spec (CACHE_FORMAT.md, "The wds backend"), from the manifest."""
    t, st = manifest.teacher, manifest.storage
    L, C = t.grid[0] * t.grid[1], t.dim
    dtype = "int8" if st.dtype == "int8" else "float16"
    members = {"attention": NpySpec.of((L,), "<f2"), "cls": NpySpec.of((C,), "<f2")}
    for layer, w in [("features", st.pca.rank if st.pca else C)] + [(f"layer{i}", C) for i in t.layers]:
        members[layer] = NpySpec.of((L, w), dtype if dtype == "int8" else "<f2")
        if dtype == "int8":
            g = int8_groups(w, st.int8_group)
            members[_scale_member(layer)] = NpySpec.of((L,) if g is None else (L, g), "<f2")
    return WdsSpec(members, manifest.views.per_image)


def _rows_of(names: list[str]) -> list[int]:
    """Each member's row: its sample's position among the samples, in tar order."""
    rows, row, last = [], -1, None
    for name in names:
        sample = name.split(".", 1)[0]
        row += sample != last
        last = sample
        rows.append(row)
    return rows


def check_listed_members(path: str, members: list[tuple[str, int, int]], files: FileList) -> None:
    """A tar's members (name, offset, size) are exactly those its entry lists, in the
    listed order, of the listed sizes: else one CacheError naming the tar, the member and
    its row (the sample it belongs to, counted in tar order)."""
    names, listed, fix = [m[0] for m in members], files.items, "run `mrmae cache verify --repair`"
    rows, listed_rows, present = _rows_of(names), _rows_of([p for p, _, _ in listed]), set(names)
    for i, (name, _, size) in enumerate(members):
        if files.get(name) is None:
            raise CacheError(f"{path}: member {name} (row {rows[i]}): not in the entry's file list; {fix}")
        if listed[i][0] != name:
            if listed[i][0] not in present:
                raise CacheError(f"{path}: member {listed[i][0]} (row {listed_rows[i]}): listed in the entry, not in "
                                 f"the tar; {fix}")
            raise CacheError(f"{path}: member {name} (row {rows[i]}): not where the entry lists it (member {i}); {fix}")
        if size != listed[i][1]:
            raise CacheError(f"{path}: member {name} (row {rows[i]}): {size:,} bytes, the entry lists "
                             f"{listed[i][1]:,}; {fix}")
    if len(listed) != len(members):
        raise CacheError(f"{path}: member {listed[len(members)][0]} (row {listed_rows[len(members)]}): listed in the "
                         f"entry, not in the tar (truncated?); {fix}")


def tar_files(path: str) -> FileList:
    """The file list of a tar as a writer would record it: every member, its size and sha256."""
    with _open_tar(path) as f:
        items = []
        for name, offset, size in _tar_members(path):
            f.seek(offset)
            items.append((name, size, file_digest(f.read(size))))
    return FileList(tuple(items))


def is_file_url(path: str) -> bool:
    fs, p = fsspec.core.url_to_fs(str(path))
    return fs.isfile(p)


def _open_tar(path: str):
    """The tar as a file object: locally a regular file only (lstat, O_NOFOLLOW |
    O_NONBLOCK: a FIFO or device in its place is refused, never blocks); a URL via fsspec."""
    return open_file(path) if is_url(path) and local_path(path) is None else open_regular(local_path(path))


def _ustar_members(path: str) -> list[tuple[str, int, int]] | None:
    """(name, data offset, size) of every member, from plain ustar headers read one by one.

    About 10x faster than `tarfile`'s iteration, which matters when a shard of thousands
    of views is opened in every epoch. Returns None for anything but plain regular-file
    headers with good checksums (pax or GNU extensions, e.g. names over 100 characters,
    or damage): `tarfile` then reads the tar, or says what is wrong with it.
    """
    out, pos = [], 0
    with _open_tar(path) as f:
        while True:
            f.seek(pos)
            h = f.read(512)
            if len(h) < 512 or h.count(0) == 512:
                return out if h.count(0) == len(h) else None  # end of archive (or of the file)
            if h[156:157] not in (b"0", b"\0") or h[124] & 0x80:
                return None
            try:
                checksum, size = int(h[148:156].split(b"\0")[0].strip(), 8), int(h[124:136].split(b"\0")[0].strip(), 8)
            except ValueError:
                return None
            if checksum != 256 + sum(h[:148]) + sum(h[156:]):
                return None
            name = h[:100].split(b"\0")[0]
            if h[257:262] == b"ustar" and h[345]:
                name = h[345:500].split(b"\0")[0] + b"/" + name
            out.append((name.decode("utf-8", "replace"), pos + 512, size))
            pos += 512 + -(-size // 512) * 512


def _tar_members(path: str) -> list[tuple[str, int, int]]:
    fast = _ustar_members(path)
    if fast is not None:
        return fast
    with _open_tar(path) as f, tarfile.open(fileobj=f, mode="r:") as tf:
        return [(info.name if info.isfile() else f"{info.name} (not a file)", info.offset_data, info.size)
                for info in tf]


def _read_index(path: str, listed: list[tuple[str, int, int]]) -> tuple[list[str], dict[str, np.ndarray]]:
    """Sample names in tar order and, per member name, [N, 3] int64 (offset, size, zstd),
    from the tar's members (`_tar_members`)."""
    names: list[str] = []
    members: list[dict[str, tuple[int, int, int]]] = []
    for member_name, offset, size in listed:
        m = _MEMBER.fullmatch(member_name)
        if m is None:
            raise CacheError(f"{path}: unexpected tar member {member_name!r}")
        sample, member, ext = m.groups()
        if not names or names[-1] != sample:
            names.append(sample)
            members.append({})
        members[-1][member] = (offset, size, int(ext == "npy.zst"))  # (pixels: stored_pixels reads them as is)
    if len(set(names)) != len(names):
        raise CacheError(f"{path}: a sample's members are not consecutive")
    every = set().union(*members, ("meta", "features", "attention", "cls") if members else ())
    index = {}
    for member in sorted(every):  # every sample has every member: a missing one is named
        try:
            index[member] = np.array([m[member] for m in members], dtype=np.int64).reshape(-1, 3)
        except KeyError:
            row = next(i for i, m in enumerate(members) if member not in m)
            raise CacheError(f"{path}: sample {names[row]} (row {row}) has no {member} member; "
                             "run `mrmae cache verify --repair`") from None
    return names, index


def _digest_column(path: str, metas: list[dict]) -> np.ndarray | None:
    """Every meta.json's `image_sha256` -> uint8 [N, 32], or None when no row records one;
    some rows without it, or one that is not 64 lower-case hex digits, is damage."""
    given = [m.get("image_sha256") for m in metas]
    if not any(d is not None for d in given):
        return None
    for row, d in enumerate(given):
        if not (isinstance(d, str) and _HEX_DIGEST.fullmatch(d)):
            raise CacheError(f"{path}: row {row}: meta.json image_sha256 {str(d)[:80]!r} is no sha256 (64 hex "
                             "digits); run `mrmae cache verify --repair`")
    return np.frombuffer(bytes.fromhex("".join(given)), np.uint8).reshape(len(metas), IMAGE_DIGEST_BYTES)


class WdsShard:
    """Read access to one shard's tar, with the interface of the Zarr `ShardGroup`.

    The tar's index (member offsets and every meta.json) is read into memory once, at the
    first use (so that opening every shard to look at its manifest entry costs a stat):
    rows are the tar's samples in order. Features are decoded on demand; `features_row`
    reads the bytes of the next ROWS_PER_CHUNK rows at once, so a sequential pass costs one
    read per block and one decode per row.
    """

    def __init__(self, path: str | os.PathLike, entry: ShardEntry | None, checked: bool = True,
                 shapes: dict[str, tuple[int, ...]] | None = None, spec: WdsSpec | None = None):
        """`checked` (a format 4 cache): every meta.json carries its own crc32c, every
        `.npy.zst` member a zstd frame checksum and every other member a crc32c in its
        meta.json; each is verified as it is read, and damage is a CacheError naming the
        tar, the member and the row. A format 5 entry lists every member with its size and
        sha256, which each member read must have. `spec` (`member_spec`): each `.npy`
        member's exact header, shape and dtype, from the manifest (bounds its decoding),
        and K, which ties the rows to the entry's samples."""
        self.path, self.entry, self.checked = str(path), entry, checked
        self._shapes = shapes or {}  # a member's array shape, from the manifest (as the Zarr reader's `shapes`)
        self._spec = spec
        self._files = entry.files if isinstance(entry, ShardEntry) else None
        local = local_path(self.path)
        try:
            present = regular_size(local) is not None if local is not None else is_file_url(self.path)
        except NotRegularFile as e:
            raise CacheError(f"{e}; run `mrmae cache verify --repair`") from None
        if not present:
            raise CacheError(f"{self.path}: shard tar is missing")
        self._file = None
        self._loaded = False
        self._block: tuple[int, int, bytes] | None = None  # (first row, end row, bytes from _lo[first])
        self._geometry: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self._image_sha256: np.ndarray | None = None

    def _load(self) -> None:
        if self._loaded:
            return
        try:
            members = self._checked_members()
            names, index = _read_index(self.path, members)
            self._names, self._digests = names, {o: d for (o, d) in self._listed_digests(members)}
            metas = [self._meta(row, name, int(o), int(s)) for row, (name, (o, s, _)) in
                     enumerate(zip(names, index.get("meta", [])))]
            checksums = {m: np.array([meta["checksums"][m] for meta in metas], dtype=np.int64)
                         for m in (metas[0].get("checksums", {}) if metas else {})}
        except CacheError:
            raise
        except (OSError, tarfile.TarError, ValueError, KeyError, TypeError) as e:
            raise CacheError(f"{self.path}: unreadable shard tar ({type(e).__name__}: {e})") from e
        n = len(metas)
        check_row_count(self.path, self.entry, n)
        self._index, self._checksums = index, checksums
        self._keys = np.array([m["key"] for m in metas], dtype=str)
        self._views = np.array([m["view"] for m in metas], dtype=np.int16)
        if self._spec is not None:
            check_rows_tied(self.path, self._keys, self._views, self._spec.per_image, self.entry)
        self._crop = np.array([m["crop"] for m in metas], dtype=np.int64).reshape(n, 4)
        check_crops(f"{self.path}: meta.json crop", self._crop)
        self._crop = self._crop.astype(np.int32)
        self._flip = np.array([m["flip"] for m in metas], dtype=bool)
        self._image_sha256 = _digest_column(self.path, metas)
        spans = np.stack(list(index.values())) if index else np.zeros((0, n, 3), np.int64)
        self._lo = spans[..., 0].min(axis=0) if n else np.zeros(0, np.int64)  # first data byte of each row
        self._hi = (spans[..., 0] + spans[..., 1]).max(axis=0) if n else np.zeros(0, np.int64)  # past its last
        self._row = {(k, int(v)): i for i, (k, v) in enumerate(zip(self._keys, self._views))}
        self._loaded = True

    def _checked_members(self) -> list[tuple[str, int, int]]:
        """The tar's members (name, data offset, size): each inside the file, and (format 5)
        exactly the members its entry lists, in its order, of its sizes."""
        members = _tar_members(self.path)
        end = self._handle().size if local_path(self.path) is not None else None
        for i, (name, offset, size) in enumerate(members):
            if end is not None and offset + size > end:
                raise CacheError(f"{self.path}: member {name} (member {i}) ends at byte {offset + size:,}, past the "
                                 f"tar's end ({end:,}): truncated; run `mrmae cache verify --repair`")
        if self._files is not None:
            check_listed_members(self.path, members, self._files)
        return members

    def _listed_digests(self, members: list[tuple[str, int, int]]) -> list[tuple[int, str]]:
        """(data offset, listed sha256) of every member (format 5), for `_verify`."""
        if self._files is None:
            return []
        return [(offset, self._files.get(name)[1]) for name, offset, _ in members]

    def _meta(self, row: int, name: str, offset: int, size: int) -> dict:
        """Row `row`'s meta.json, checked: its listed sha256 (format 5), its size, its own
        crc32c, its fields, and that it names its sample."""
        where = f"{self.path}: member {name}.meta.json, row {row}"
        if size > MAX_META_BYTES:
            raise CacheError(f"{where}: {size:,} bytes, more than a meta.json holds ({MAX_META_BYTES:,}); damaged")
        data = self._pread(offset, size)
        if offset in self._digests and file_digest(data) != self._digests[offset]:
            raise CacheError(f"{where}: sha256 differs from the entry's: damaged, or another file in its place; "
                             "run `mrmae cache verify --repair`")
        meta = load_json(data, f"{self.path}: member {name}.meta.json", "meta.json")
        _check_meta(meta, where)
        if not _unseal(meta) and self.checked:
            raise CacheError(f"{where}: checksum mismatch (or none); run `mrmae cache verify --repair`")
        if sample_name(meta["key"], meta["view"]) != name:
            raise CacheError(f"{self.path}: sample {name} holds key {meta['key']!r} view {meta['view']}")
        return meta

    @property
    def keys(self) -> np.ndarray:
        self._load()
        return self._keys

    @property
    def views(self) -> np.ndarray:
        self._load()
        return self._views

    @property
    def quantized(self) -> bool:
        self._load()
        return "scale" in self._index

    # file access: a lazily opened handle, dropped when pickled (DataLoader workers)
    def _handle(self):
        """The open tar: locally a `RegularFile` (bounds-checked reads), else an fsspec file."""
        if self._file is None:
            local = local_path(self.path)
            self._file = RegularFile(local) if local is not None else open_file(self.path)
        return self._file

    def _pread(self, offset: int, size: int) -> bytes:
        f = self._handle()
        if isinstance(f, RegularFile):
            data = f.pread(size, offset)
        else:  # fsspec files: a ranged read
            f.seek(offset)
            data = f.read(size)
        if len(data) != size:
            raise CacheError(f"{self.path}: truncated ({size} bytes wanted at {offset}, got {len(data)})")
        return data

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_file": None, "_block": None}  # (a RegularFile is reopened where unpickled)

    def __del__(self) -> None:
        if getattr(self, "_file", None) is not None:
            self._file.close()

    def _verify(self, data: bytes, compressed: int, row: int, member: str, offset: int) -> None:
        """A member's bytes against its listed sha256 (format 5) and its checksum: the
        crc32c its meta.json records, or the zstd frame's own (checked by the decoder; here
        only that the frame has one)."""
        listed = self._digests.get(offset)
        if listed is not None and file_digest(data) != listed:
            raise ValueError("sha256 differs from the entry's: damaged, or another member in its place")
        expected = self._checksums.get(member)
        if expected is not None:
            if crc32c(data) != expected[row]:
                raise ValueError("crc32c checksum mismatch")
        elif not (compressed and _zstd_frame_checked(data)):
            raise ValueError("no checksum (neither a zstd frame checksum nor a crc32c in meta.json)")

    def _decode(self, data: bytes, compressed: int, row: int, member: str, offset: int) -> np.ndarray:
        """One `.npy[.zst]` member of `row` -> its array, decoded within the size its spec
        gives (the zstd frame's declared size checked first) and with exactly the spec's
        `.npy` header; damage is one CacheError naming the tar, the member and the row."""
        try:
            if self.checked or offset in self._digests:
                self._verify(data, compressed, row, member, offset)
            npy = self._spec.members.get(member) if self._spec is not None else None
            if npy is None:  # (a writer's own temporary: bounded all the same)
                raw = zstd_decompress(data, MAX_MEMBER_BYTES, at_most=True) if compressed else data
                arr = np.load(io.BytesIO(raw), allow_pickle=False)
            else:
                arr = npy.decode(data, compressed)
        except Exception as e:
            raise CacheError(f"{self.path}: member {self._names[row]}.{member}, row {row}: unreadable "
                             f"({read_error(e)}); run `mrmae cache verify --repair`") from e
        want = self._shapes.get(member)
        if want is not None and tuple(arr.shape) != tuple(want):
            raise CacheError(f"{self.path}: member {self._names[row]}.{member}, row {row}: shape {list(arr.shape)}, "
                             f"the manifest's teacher gives {list(want)}")
        return arr

    def _member(self, name: str) -> np.ndarray:
        try:
            return self._index[name]
        except KeyError:
            raise CacheError(f"{self.path}: no {name} member in this shard") from None

    def _arrays(self, rows: list[int], names: list[str]) -> dict[str, np.ndarray]:
        """Decode members `names` of `rows`, from one read spanning them."""
        if not rows:  # empty, shaped like the stored rows (when there are any)
            return {n: a[:0] for n, a in self._arrays([0], names).items()} if len(self) else \
                {n: np.zeros((0,), np.float16) for n in names}
        lo, hi = int(self._lo[min(rows)]), int(self._hi[max(rows)])
        buf = memoryview(self._pread(lo, hi - lo))
        out = {}
        for n in names:
            idx = self._member(n)
            out[n] = np.stack([self._decode(bytes(buf[o - lo:o - lo + s]), z, r, n, o) for r, (o, s, z)
                               in zip(rows, idx[rows])])
        return out

    def __len__(self) -> int:
        return len(self.keys)

    def row(self, key: str, view: int) -> int:
        self._load()
        try:
            return self._row[(key, view)]
        except KeyError:
            raise CacheError(f"{self.path}: no row for key {key!r} view {view}") from None

    def _targets(self, rows: list[int], layer: str) -> dict[str, np.ndarray]:
        names = [layer, "attention", "cls"] + ([_scale_member(layer)] if self.quantized else [])
        a = self._arrays(rows, names)
        return {"features": dequantize(a[layer], a.get(_scale_member(layer))),
                "attention": a["attention"].astype(np.float32), "cls": a["cls"].astype(np.float32)}

    def read(self, rows: slice, layer: str = "features") -> dict[str, np.ndarray]:
        """A block of rows -> dict of numpy arrays, features dequantised to float32."""
        idx = list(range(*rows.indices(len(self))))  # (loads the index)
        return {"keys": self._keys[rows], "view": self._views[rows], "crop": self._crop[rows],
                "flip": self._flip[rows], **self._targets(idx, layer)}

    def geometry(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(crop [N,4], flip [N], attention [N,L] float32) of every row, read once."""
        self._load()
        if self._geometry is None:
            att = self._member("attention") if len(self) else []
            attention = [self._decode(self._pread(int(o), int(s)), int(z), r, "attention", int(o))
                         for r, (o, s, z) in enumerate(att)]
            attention = np.stack(attention).astype(np.float32) if attention else np.zeros((0, 0), np.float32)
            self._geometry = (self._crop, self._flip, attention)
        return self._geometry

    def image_digests(self) -> np.ndarray | None:
        """uint8 [N, 32]: the sha256 of the source image file each row was rendered from
        (meta.json `image_sha256`); None for a cache written before rows recorded it."""
        self._load()
        return self._image_sha256

    def image_digest(self, i: int) -> bytes | None:
        """Row i's recorded image sha256 (32 bytes), or None (`image_digests`)."""
        digests = self.image_digests()
        return None if digests is None else digests[i].tobytes()

    def features_row(self, i: int, layer: str = "features") -> np.ndarray:
        """Features of one row [L, C] float32."""
        return dequantize(*self.stored_row(i, layer))

    def stored_row(self, i: int, layer: str = "features") -> tuple[np.ndarray, np.ndarray | None]:
        """Features of one row as stored: (int8 [L, C], float16 scale [L] or [L, G]) or (float16 [L, C], None).

        One read per ROWS_PER_CHUNK rows in a sequential pass.
        """
        if not 0 <= i < len(self):  # (loads the index)
            raise IndexError(f"{self.path}: row {i} of {len(self)}")
        if self._block is None or not self._block[0] <= i < self._block[1]:
            end = min(i + ROWS_PER_CHUNK, len(self))
            lo = int(self._lo[i])
            self._block = (i, end, self._pread(lo, int(self._hi[end - 1]) - lo))
        base, buf = int(self._lo[self._block[0]]), self._block[2]

        def member(name: str) -> np.ndarray:
            o, s, z = (int(x) for x in self._member(name)[i])
            return self._decode(buf[o - base:o - base + s], z, i, name, o)

        return member(layer), member(_scale_member(layer)) if self.quantized else None

    def stored_pixels(self, i: int) -> bytes:
        """Row i's stored view (an image file: decode with views.decode_view)."""
        self._load()
        if "pixels" not in self._index:
            raise CacheError(f"{self.path}: this cache stores no views (extract with --store-pixels)")
        o, s, _ = (int(x) for x in self._index["pixels"][i])
        data = self._pread(o, s)
        if o in self._digests and file_digest(data) != self._digests[o]:
            raise CacheError(f"{self.path}: member {self._names[i]}.pixels, row {i}: sha256 differs from the "
                             "entry's: damaged, or another member in its place; run `mrmae cache verify --repair`")
        if self.checked and ("pixels" not in self._checksums or crc32c(data) != self._checksums["pixels"][i]):
            raise CacheError(f"{self.path}: member {self._names[i]}.pixels, row {i}: crc32c mismatch (or none); "
                             "run `mrmae cache verify --repair`")
        return data

    def get(self, key: str, view: int) -> ViewTargets:
        return view_targets(self, key, view)

    def logical_bytes(self) -> int:
        """Bytes of the rows' arrays before compression, counted as the Zarr backend counts them."""
        if not len(self):
            return 0
        first = self._arrays([0], [n for n in self._index if n not in ("meta", "pixels")])  # images: not arrays
        return len(self) * (sum(a.nbytes for a in first.values()) + _GEOMETRY_BYTES)


# --- the backend ----------------------------------------------------------------------------


@register_backend
class WdsBackend(Backend):
    """WebDataset: one tar per shard, one tar sample per view (module docstring)."""

    name, suffix = "wds", ".tar"
    help = "one WebDataset tar per input shard"
    checksums = "zstd frame checksum per member, crc32c of meta.json and unframed members"
    sizes_add_up = False  # a tar's headers are not in its list of members

    def codec(self, dtype: str) -> str:
        return wds_codec_description()

    def writer(self, root, source, max_rows, dim, grid_len, dtype, layers=(), pixels=None, feature_dim=None,
               int8_group=None) -> WdsShardWriter:
        return WdsShardWriter(root, source, max_rows, dim, grid_len, dtype, layers, pixels, feature_dim=feature_dim,
                              int8_group=int8_group)

    def open(self, path: str, entry: ShardEntry, manifest, checked: bool) -> WdsShard:
        return WdsShard(path, entry, checked=checked, shapes=manifest.row_shapes(), spec=member_spec(manifest))

    def check(self, path: str, entry: ShardEntry, manifest, checked: bool) -> None:
        """The tar is there (its index is read, and checked, at its first use)."""
        if not is_file(path):
            raise CacheError(f"{path}: shard tar is missing")

    def verify(self, reader: WdsShard) -> None:
        """Every member of every row: its listed sha256 (format 5) or checksum, and each `.npy`
        member decoded as the loader decodes it (its zstd frame's declared size first, then its
        content checksum and its exact `.npy` header)."""
        reader._load()
        for member, index in reader._index.items():
            npy = reader._spec.members.get(member) if reader._spec is not None else None
            for row, (offset, size, compressed) in enumerate(index.tolist()):
                data = reader._pread(offset, size)
                try:
                    if member == "pixels":
                        reader.stored_pixels(row)
                    elif member != "meta" and (reader.checked or offset in reader._digests):
                        reader._verify(data, compressed, row, member, offset)
                    if npy is not None:
                        npy.decode(data, compressed)
                except (ValueError, FrameError) as e:
                    if isinstance(e, CacheError):
                        raise
                    raise CacheError(f"{reader.path}: member {reader._names[row]}.{member}, row {row}: {e}; "
                                     "run `mrmae cache verify --repair`") from None

    def logical_bytes(self, manifest, entries) -> int:
        """Each row's `.npy` members and its geometry, as the Zarr backend counts them."""
        per_row = member_spec(manifest).row_bytes()
        return sum(e.num_views * per_row for e in entries)

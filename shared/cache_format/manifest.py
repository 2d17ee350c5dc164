"""The manifest: manifest.json says what made a cache; shards/<name>.json, one per complete
shard, says which shards it holds. No file is ever written by two processes, so the cache
needs no lock, locally, on NFS or on an object store.

This module owns the schema. Both files are read into frozen dataclasses (`Manifest`,
`TeacherInfo`, `ViewConfig`, `StorageInfo`, `PcaInfo`, `ShardEntry`) and every field is
checked on the way in (type, range, known value): anything else is one `CacheError`
naming the file and the key, never a KeyError or a TypeError deep in a reader. Nothing
recorded is followed out of the cache: an entry's `group` must be the stored shard beside
the entry itself (`shards/<name>`, wds `shards/<name>.tar`), never another path or a URL;
and a recorded `source` that would start a program when opened (`runs_command`) is
opened only when the user gives it again on the command line. Files are written through
`to_json`, with the field names CACHE_FORMAT.md documents.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import urlparse

from ..views import PIXEL_CODECS, ViewConfig
from .backend import DEFAULT_BACKEND, backend_names, backend_of_group, get_backend, group_suffixes
from .common import FORMAT_VERSION, LISTED_VERSION, READABLE_VERSIONS, SIDECAR_VERSION, CacheError
from .listing import FileList, file_digest
from .location import Location, check_inside
from .pca import MEASURED_FIELDS

MANIFEST = "manifest.json"
DTYPES = ("int8", "float16")
DECODERS = ("pil", "torchvision", "nvjpeg")  # the JPEG decoders extraction records (views.decoder)
INTERPOLATIONS = ("bicubic",)  # what render_view replays
_SHA256 = re.compile(r"[0-9a-f]{64}")
_SAFE_NAME = re.compile(r"[A-Za-z0-9._-]{1,200}")
_REQUIRED = object()
_MAX_INT = 2**63 - 1  # no count, size or offset a writer records is larger (10**400 would overflow a float)
# Far above any teacher (ViT-22B: width 6144), far below what would make pretraining allocate
# terabytes for a mimic head before any shard is read.
_MAX_DIM, _MAX_SIDE = 65536, 65536


# --- checked reading of one JSON object ----------------------------------------------------


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


class _Fields:
    """The fields of one JSON object, each checked as it is taken. Errors are one line:
    `<file>: <section.key>: <what is wrong>`; a field nobody takes is refused (`done`)."""

    def __init__(self, obj: Any, where: str, prefix: str = ""):
        self.where, self.prefix, self.taken = where, prefix, set()
        if not isinstance(obj, dict):
            raise CacheError(f"{where}: {prefix.rstrip('.') or 'content'}: expected a JSON object, got {_show(obj)}")
        self.obj = obj

    def fail(self, key: str, what: str) -> NoReturn:
        raise CacheError(f"{self.where}: {self.prefix}{key}: {what}")

    def take(self, key: str, default: Any = _REQUIRED) -> Any:
        self.taken.add(key)
        if key in self.obj:
            return self.obj[key]
        if default is _REQUIRED:
            self.fail(key, "missing")
        return default

    def integer(self, key: str, minimum: int | None = 0, default: Any = _REQUIRED, nullable: bool = False,
                maximum: int = _MAX_INT) -> int | None:
        v = self.take(key, default)
        if v is None and nullable:
            return None
        if not _is_int(v) or (minimum is not None and v < minimum) or abs(v) > maximum:
            self.fail(key, f"expected an integer{'' if minimum is None else f' >= {minimum}'} and <= "
                           f"{'2^63 - 1' if maximum == _MAX_INT else maximum}, got {_show(v)}")
        return v

    def number(self, key: str, low: float = -math.inf, high: float = math.inf, default: Any = _REQUIRED,
               nullable: bool = False) -> float | None:
        v = self.take(key, default)
        if v is None and nullable:
            return None
        if not _is_number(v) or not low <= v <= high:
            self.fail(key, f"expected a number in [{low}, {high}], got {_show(v)}")
        return v

    def text(self, key: str, choices: tuple[str, ...] | None = None, default: Any = _REQUIRED,
             nullable: bool = False, empty: bool = False) -> str | None:
        v = self.take(key, default)
        if v is None and nullable:
            return None
        if not isinstance(v, str) or (not v and not empty) or (choices is not None and v not in choices):
            self.fail(key, f"expected {'one of ' + ', '.join(choices) if choices else 'a non-empty string'}, "
                           f"got {_show(v)}")
        return v

    def sha256(self, key: str, default: Any = _REQUIRED, nullable: bool = False) -> str | None:
        v = self.take(key, default)
        if v is None and nullable:
            return None
        if not isinstance(v, str) or not _SHA256.fullmatch(v):
            self.fail(key, f"expected a sha256 (64 lowercase hex digits), got {_show(v)}")
        return v

    def items(self, key: str, length: int | None = None, default: Any = _REQUIRED) -> list:
        v = self.take(key, default)
        if not isinstance(v, list) or (length is not None and len(v) != length):
            self.fail(key, f"expected a list{'' if length is None else f' of {length}'}, got {_show(v)}")
        return v

    def numbers(self, key: str, length: int, low: float = -math.inf) -> tuple[float, ...]:
        v = self.items(key, length)
        if not all(_is_number(x) and x >= low for x in v):
            self.fail(key, f"expected {length} numbers >= {low}, got {_show(v)}")
        return tuple(v)

    def ints(self, key: str, length: int | None = None, minimum: int = 0, default: Any = _REQUIRED,
             maximum: int = _MAX_INT) -> tuple[int, ...]:
        v = self.items(key, length, default)
        if not all(_is_int(x) and minimum <= x <= maximum for x in v):
            self.fail(key, f"expected integers in [{minimum}, {maximum}], got {_show(v)}")
        return tuple(v)

    def section(self, key: str, nullable: bool = False, default: Any = _REQUIRED) -> _Fields | None:
        v = self.take(key, default)
        return None if v is None and nullable else _Fields(v, self.where, f"{self.prefix}{key}.")

    def done(self) -> None:
        """Refuse fields this mrmae does not know: a typed schema never ignores what it cannot read."""
        unknown = sorted(k for k in self.obj if k not in self.taken)
        if unknown:
            self.fail(unknown[0], "unknown field (made by another version of mrmae?)")


def _to_json(obj: Any) -> Any:
    """A dataclass (nested ones, tuples) as the JSON value it is written as, fields in order."""
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_json(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (tuple, list)):
        return [_to_json(x) for x in obj]
    return obj


# --- manifest.json --------------------------------------------------------------------------


@dataclass(frozen=True)
class TeacherInfo:
    """manifest.json `teacher`: what computed the targets (CACHE_FORMAT.md)."""

    spec: str
    family: str  # a registered teacher kind (mrmae.shared.teachers.base.teacher_kinds(): clip, dino, ...)
    arch: str
    weights: str | None  # path or tag; None: random init with seed 0
    weights_sha256: str
    input_size: int  # pixels the teacher saw
    patch_size: int
    grid: tuple[int, int]
    dim: int  # token width C
    mean: tuple[float, ...]
    std: tuple[float, ...]
    layers: tuple[int, ...]  # blocks stored by --layers (since removed): read, never used; new caches: []

    @classmethod
    def from_fields(cls, f: _Fields) -> TeacherInfo:
        info = cls(f.text("spec"), f.text("family", teacher_kinds()), f.text("arch"), f.text("weights", nullable=True),
                   f.sha256("weights_sha256"), f.integer("input_size", 1, maximum=_MAX_SIDE),
                   f.integer("patch_size", 1, maximum=_MAX_SIDE), f.ints("grid", 2, minimum=1, maximum=_MAX_SIDE),
                   f.integer("dim", 1, maximum=_MAX_DIM), f.numbers("mean", 3),
                   f.numbers("std", 3, low=1e-12), f.ints("layers", minimum=1, default=[]))
        f.done()
        return info

    def to_json(self) -> dict:
        return _to_json(self)


def teacher_kinds() -> tuple[str, ...]:
    """The values `teacher.family` may take: every kind registered in this process, where
    the teachers are loaded (plug-in kinds included), else the kinds of the teachers
    package, one module each named after its kind, listed without importing them (reading
    a manifest, e.g. for `cache info`, then needs no torch)."""
    import importlib.util
    import pkgutil
    import sys

    if (teachers := sys.modules.get("mrmae.shared.teachers.base")) is not None:
        return teachers.teacher_kinds()
    from mrmae.shared.plugins import plugin_names

    where = importlib.util.find_spec("mrmae.shared.teachers").submodule_search_locations
    return tuple(m.name for m in pkgutil.iter_modules(where) if m.name != "base" and not m.name.startswith("_")) \
        + tuple(plugin_names("mrmae.teachers"))  # (an installed plug-in's kind is its entry point's name)


def views_from_fields(f: _Fields) -> ViewConfig:
    """manifest.json `views` as the ViewConfig that drew them (the defaults fill fields that
    older caches did not record)."""
    scale, ratio = f.numbers("scale", 2, low=0.0), f.numbers("ratio", 2, low=0.0)
    for key, (a, b) in (("scale", scale), ("ratio", ratio)):
        if not 0 < a <= b:
            f.fail(key, f"expected 0 < min <= max, got {[a, b]}")
    default = ViewConfig()
    views = ViewConfig(per_image=f.integer("per_image", 1), seed=f.integer("seed", None), scale=scale, ratio=ratio,
                       flip_p=f.number("flip_p", 0.0, 1.0),
                       interpolation=f.text("interpolation", INTERPOLATIONS, default=default.interpolation),
                       output_size=f.integer("output_size", 1, default=default.output_size),
                       decoder=f.text("decoder", DECODERS, default=default.decoder))
    f.done()
    return views


@dataclass(frozen=True)
class PcaInfo:
    """`storage.pca` of a low-rank cache: the configuration (rank, fit_views) and what the
    fit measured (None until the basis exists)."""

    rank: int
    fit_views: int
    explained_variance: float | None = None
    fitted_views: int | None = None
    sha256: str | None = None  # of pca/basis.npz

    @classmethod
    def from_fields(cls, f: _Fields) -> PcaInfo:
        info = cls(f.integer("rank", 1), f.integer("fit_views", 1),
                   f.number("explained_variance", 0.0, 1.0 + 1e-6, default=None, nullable=True),
                   f.integer("fitted_views", 0, default=None, nullable=True), f.sha256("sha256", None, nullable=True))
        f.done()
        return info

    def to_json(self) -> dict:
        return _to_json(self)


@dataclass(frozen=True)
class StorageInfo:
    """manifest.json `storage`: how the targets are stored."""

    backend: str  # a registered backend's name (backend.py; zarr when absent: caches from before the field)
    dtype: str  # int8 | float16
    pixels: str | None  # codec of stored views (--store-pixels), or None
    quantisation: str | None
    int8_group: int | None  # channels per int8 scale; None: one per token
    codec: str
    pca: PcaInfo | None
    rows_per_chunk: int | None  # a backend's own field (zarr's `Backend.storage`)

    @classmethod
    def from_fields(cls, f: _Fields) -> StorageInfo:
        pca = f.section("pca", nullable=True, default=None)
        info = cls(f.text("backend", tuple(backend_names()), default=DEFAULT_BACKEND), f.text("dtype", DTYPES),
                   f.text("pixels", tuple(PIXEL_CODECS), default=None, nullable=True),
                   f.text("quantisation", default=None, nullable=True),
                   f.integer("int8_group", 1, default=None, nullable=True), f.text("codec"),
                   PcaInfo.from_fields(pca) if pca is not None else None,
                   f.integer("rows_per_chunk", 1, default=None, nullable=True))
        f.done()
        return info

    def to_json(self) -> dict:
        d = _to_json(self)
        if self.rows_per_chunk is None:  # written by the backends that chunk rows only
            del d["rows_per_chunk"]
        return d


@dataclass(frozen=True)
class Manifest:
    """manifest.json, and under `shards` the entry of every shard, sorted by group."""

    format_version: int
    mrmae_version: str
    teacher: TeacherInfo
    views: ViewConfig
    storage: StorageInfo
    views_from: str | None = None  # a target's: its views are those of the cache two levels up (never followed)
    shards: tuple[ShardEntry, ...] = ()

    @property
    def backend(self) -> str:
        return self.storage.backend

    def row_shapes(self) -> dict[str, tuple[int, ...]]:
        """One row's shape of the arrays every shard stores: features [L, C] ([L, K]
        coefficients in a PCA cache), attention [L], cls [C]."""
        tokens, pca = self.teacher.grid[0] * self.teacher.grid[1], self.storage.pca
        return {"features": (tokens, pca.rank if pca else self.teacher.dim), "attention": (tokens,),
                "cls": (self.teacher.dim,)}

    @classmethod
    def from_json(cls, obj: Any, where: str) -> Manifest:
        """Checked configuration part of a manifest (`shards` empty); `where` names the file."""
        f = _Fields(obj, where)
        version = f.take("format_version")
        if not _is_int(version) or version not in READABLE_VERSIONS:
            raise CacheError(f"{where}: format_version {version!r}, this mrmae reads "
                             f"{' and '.join(map(str, READABLE_VERSIONS))}")
        m = cls(version, f.text("mrmae_version"), TeacherInfo.from_fields(f.section("teacher")),
                views_from_fields(f.section("views")), StorageInfo.from_fields(f.section("storage")),
                f.text("views_from", default=None, nullable=True))
        f.done()
        if m.storage.pca is not None and m.storage.pca.rank > m.teacher.dim:
            f.fail("storage.pca.rank", f"{m.storage.pca.rank} exceeds the teacher's width {m.teacher.dim}")
        return m

    def to_json(self) -> dict:
        """manifest.json as written: the configuration, never the shard entries."""
        d = {"format_version": self.format_version, "mrmae_version": self.mrmae_version,
             "teacher": self.teacher.to_json(), "views": self.views.to_json(), "storage": self.storage.to_json()}
        if self.views_from is not None:
            d["views_from"] = self.views_from
        return d


# --- shards/<name>.json ---------------------------------------------------------------------


@dataclass(frozen=True)
class Skipped:
    """A sample with no rows: its key and why."""

    key: str
    reason: str


@dataclass(frozen=True)
class FileListRef:
    """entry `file_list` (format 6): the size and sha256 of the shard's file list, the file
    `<group>.files` beside its group, so that the list is read as the shard opens, and the
    entries a run reads at start-up stay small."""

    sha256: str
    bytes: int

    @classmethod
    def from_fields(cls, f: _Fields) -> FileListRef:
        ref = cls(f.sha256("sha256"), f.integer("bytes", 1, maximum=MAX_FILE_LIST_BYTES))
        f.done()
        return ref


FILES_SUFFIX = ".files"  # a shard's file list: `<group>.files`, beside its group
# A file list takes ~110 bytes a listed file: 4 GiB would list ~40M files, far beyond any
# shard (a wds shard of 1,251 images x 2 views x 5 members lists 12,510); a larger
# `file_list.bytes` is damage or crafted, and nothing that large is ever read.
MAX_FILE_LIST_BYTES = 1 << 32


def files_path(group: str) -> str:
    """Where the file list of `group` lives (format 6): `<group>.files`, beside it."""
    return group + FILES_SUFFIX


@dataclass(frozen=True)
class ShardEntry:
    """shards/<name>.json: one complete shard (CACHE_FORMAT.md)."""

    source: str  # the input URL exactly as given at extraction
    group: str  # its stored shard, relative to the cache: shards/<name> (wds: shards/<name>.tar)
    num_samples: int
    num_views: int
    skipped: tuple[Skipped, ...]
    status: str  # "complete"
    sha256: str | None = None  # of the stored group
    bytes: int | None = None
    source_bytes: int | None = None  # the input tar's size when it was a local file
    source_sha256: str | None = None  # of the input bytes as extraction read them
    seconds: float | None = None
    files: FileList | None = None  # every file of the group, size and sha256 (format 5 inline; 6: once read)
    file_list: FileListRef | None = None  # format 6: where `files` is kept, `<group>.files`, bound by its digest

    @property
    def complete(self) -> bool:
        return self.status == "complete"

    @classmethod
    def from_json(cls, obj: Any, where: str, name: str, backend: str) -> ShardEntry:
        """Checked entry read from `name` (shards/<x>.json, relative to the cache; `where`
        names it in messages) of a cache in `backend`."""
        f = _Fields(obj, where)
        group = f.text("group")
        check_group(group, backend, where, name)
        skipped = []
        for i, s in enumerate(f.items("skipped", default=[])):
            g = _Fields(s, where, f"skipped[{i}].")
            skipped.append(Skipped(g.text("key", empty=True), g.text("reason", empty=True)))
            g.done()
        entry = cls(f.text("source"), group, f.integer("num_samples"), f.integer("num_views"), tuple(skipped),
                    f.text("status"), f.sha256("sha256", None, nullable=True),
                    f.integer("bytes", default=None, nullable=True),
                    f.integer("source_bytes", default=None, nullable=True),
                    f.sha256("source_sha256", None, nullable=True),
                    f.number("seconds", 0.0, default=None, nullable=True))
        listed, ref = f.take("files", None), f.section("file_list", nullable=True, default=None)
        f.done()
        if ref is not None:
            entry = dataclasses.replace(entry, file_list=FileListRef.from_fields(ref))
        if listed is None:
            return entry
        return dataclasses.replace(entry, files=entry.checked_files(FileList.from_json(listed, where), where, backend))

    def checked_files(self, files: FileList, where: str, backend: str) -> FileList:
        """`files` (this entry's list, read from `where`), its sizes adding up to the group's
        `bytes` where its backend lists every byte (`Backend.sizes_add_up`: a tar's sizes leave its
        headers out)."""
        if self.bytes is not None and get_backend(backend).sizes_add_up and files.total != self.bytes:
            raise CacheError(f"{where}: files: its sizes add up to {files.total:,} bytes, the entry records bytes "
                             f"{self.bytes:,}")
        return files

    def to_json(self) -> dict:
        """The entry as written: its file list by reference (`file_list`) once `record_shard`
        has put the list beside the group; never the list itself."""
        d = {f.name: _to_json(getattr(self, f.name)) for f in dataclasses.fields(self)
             if f.name not in ("files", "file_list")}
        if self.file_list is not None:
            d["file_list"] = _to_json(self.file_list)
        return d


def check_row_count(path: str, entry: ShardEntry | None, rows: int) -> None:
    """A stored shard holds exactly the rows its entry records (`entry` None or no
    ShardEntry: a writer reading back its own temporary, which has none yet)."""
    if isinstance(entry, ShardEntry) and rows != entry.num_views:
        raise CacheError(f"{path}: {rows} rows stored, its entry records num_views {entry.num_views}; "
                         "run `mrmae cache verify --repair`")


def check_group(group: str, backend: str, where: str, name: str | None = None) -> None:
    """Refuse a group path that is not a stored shard inside the cache: `shards/<safe name>`
    plus its backend's suffix (wds: `shards/<safe name>.tar`) and, when the entry's own file
    `name` is known, the shard beside it. So `../elsewhere`, `/abs/path` and URLs are never read."""
    suffix = get_backend(backend).suffix
    stem = group[len("shards/"):] if isinstance(group, str) and group.startswith("shards/") else ""
    stem = stem.removesuffix(suffix) if stem.endswith(suffix) else ""
    safe = bool(_SAFE_NAME.fullmatch(stem)) and stem.strip(".") != ""
    if not safe or (name is not None and entry_path(group) != name):
        beside = f", beside its entry: {get_backend(backend).group_of(name)!r}" if name else ""
        raise CacheError(f"{where}: group: {_show(group)} is not a stored shard inside the cache "
                         f"(expected shards/<name>{suffix}{beside})")


def runs_command(source: str) -> bool:
    """True when opening `source` would start a program rather than read a file or a URL: a
    `pipe:` command, a webdataset scheme without `//` that runs a tool (`gs:`, `ais:`, `http:`
    ...), or `-` (stdin). A cache records such sources as given; they are opened again only
    when the user gives them again on the command line."""
    if source == "-" or source.startswith("pipe:"):
        return True
    head = source.split(" ")[0]
    if "://" in head:  # read through fsspec
        return False
    scheme = urlparse(source).scheme
    return scheme not in ("", "file") and not re.fullmatch(r"[A-Za-z]", scheme)  # (a Windows drive letter)


# --- reading and writing --------------------------------------------------------------------


def group_name(source: str) -> str:
    """Stable, file-name-safe group name for an input shard URL."""
    stem = re.sub(r"\.tar(\.\w+)?$", "", source.rstrip("/").split("/")[-1].split("::")[-1])
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", stem)[:80] or "shard"
    return f"{stem}-{hashlib.sha1(source.encode()).hexdigest()[:8]}"


def new_manifest(teacher: dict, views: ViewConfig, storage: dict, version: str,
                 views_from: str | None = None) -> Manifest:
    """The configuration of a new cache, checked as a reader would check it."""
    d = {"format_version": FORMAT_VERSION, "mrmae_version": version, "teacher": teacher,
         "views": views.to_json(), "storage": storage}
    if views_from is not None:
        d["views_from"] = views_from
    return Manifest.from_json(d, "the new manifest")


def backend_of(manifest: Manifest) -> str:
    """The storage backend of a cache."""
    return manifest.storage.backend


def entry_path(group: str) -> str:
    """Where a shard's entry lives, beside its group: shards/<name>.json for the group
    shards/<name>.<sha256[:16]> plus its backend's suffix (wds: .tar), named after its bytes
    (or shards/<name>, as caches written before that were)."""
    suffixes = "|".join(re.escape(s) for s in group_suffixes())
    return re.sub(rf"(\.[0-9a-f]{{16}})?({suffixes})?$", "", group, count=1) + ".json"


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):  # json.loads would keep the last copy, silently
        raise ValueError(f"key {_show(next(k for k in keys if keys.count(k) > 1))} appears twice in one object")
    return dict(pairs)


def load_json(blob: bytes, where: str, what: str) -> Any:
    """A cache's JSON file (`where` names it) -> its value; a key repeated in one object,
    nesting too deep for the parser, or bytes that are no JSON: one CacheError."""
    try:
        return json.loads(blob, object_pairs_hook=_unique_keys)
    except RecursionError:
        raise CacheError(f"{where}: unreadable {what} (nested too deeply)") from None
    except ValueError as e:  # (JSONDecodeError, UnicodeDecodeError, a repeated key)
        raise CacheError(f"{where}: unreadable {what} ({e})") from e


def _read_json(loc: Location, name: str, what: str) -> Any:
    return load_json(loc.read_bytes(name), loc.join(name), what)


def read_manifest(root: str | os.PathLike) -> Manifest:
    """manifest.json plus, under `shards`, the entry of every shard (sorted by group), all checked."""
    loc = Location(root)
    check_inside(loc.url, loc.join(MANIFEST))
    try:
        obj = _read_json(loc, MANIFEST, "manifest")
    except FileNotFoundError:
        raise CacheError(f"{root}: not a feature cache (no {MANIFEST})") from None
    manifest = Manifest.from_json(obj, loc.join(MANIFEST))
    names = [n for n in loc.glob("shards/*.json") if n != "shards/zarr.json"]  # (the `shards` group's metadata)
    for name in names:
        check_inside(loc.url, loc.join(name))
    entries = []
    for name, blob in zip(names, loc.read_many(names)):
        entry = ShardEntry.from_json(load_json(blob, loc.join(name), "shard entry"), loc.join(name), name,
                                     manifest.backend)
        _check_entry_in(manifest, entry, loc.join(name))
        entries.append(entry)
    _check_sources_unique(loc, entries)
    return dataclasses.replace(manifest, shards=tuple(sorted(entries, key=lambda s: s.group)))


def _check_entry_in(manifest: Manifest, entry: ShardEntry, where: str) -> None:
    """An entry's counts agree with its cache: K views of each kept sample (a crafted count
    would set the length of every training epoch); a format 5 cache's entry lists its files."""
    if entry.num_views != entry.num_samples * manifest.views.per_image:
        raise CacheError(f"{where}: num_views: {entry.num_views} is not num_samples {entry.num_samples} x "
                         f"{manifest.views.per_image} views per image")
    if manifest.format_version >= LISTED_VERSION and entry.files is None and entry.file_list is None:
        field = "file_list" if manifest.format_version >= SIDECAR_VERSION else "files"
        raise CacheError(f"{where}: {field}: missing (every entry of a format {manifest.format_version} cache lists "
                         "its group's files); run `mrmae cache verify --repair`")


def _check_sources_unique(loc: Location, entries: list[ShardEntry]) -> None:
    """One entry per source: two claiming one input shard would leave readers to pick either
    group (another shard's targets), so neither is trusted."""
    seen: dict[str, ShardEntry] = {}
    for e in entries:
        if e.source in seen:
            first, second = (loc.join(entry_path(x.group)) for x in (seen[e.source], e))
            raise CacheError(f"{second}: source: {_show(e.source)} is also the source of {first}: "
                             "one entry per input shard")
        seen[e.source] = e


# A Zarr v3 group's metadata, the same bytes from every writer and every zarr version (what
# zarr 3 writes for an empty group): the root, `shards` and `targets` of a Zarr cache are
# such groups, so that zarr's own API walks the hierarchy down to each shard's arrays.
GROUP_JSON = b'{\n  "attributes": {},\n  "zarr_format": 3,\n  "node_type": "group"\n}'
GROUP_FILES = ("zarr.json", "shards/zarr.json")  # a Zarr cache's intermediate groups
TARGET_LEVEL = "../.."  # a target's `views_from`: it lives at <cache>/targets/<name>


def ensure_zarr_groups(root: str | os.PathLike, manifest: Manifest) -> None:
    """Write the group metadata of a Zarr cache's root and `shards` (and, for an added
    teacher's targets, of the `targets` folder above them) where absent.

    Create-if-absent with identical bytes: racing writers, on any machines, agree, and a
    cache written before `shards/zarr.json` existed gets it from its next writer. Never a
    shard's entry (no group is named `zarr`: group names end in 8 hex digits). The Zarr
    backend's `prepare`."""
    loc = Location(root)
    for rel in GROUP_FILES:
        loc.create_exclusive(rel, GROUP_JSON)
    if manifest.views_from == TARGET_LEVEL:  # <cache>/targets/<name>: `targets` is a group too
        above = loc.url.rsplit("/", 2)[0] if loc.remote else str(Path(loc.url).parent.parent)
        for rel in (*GROUP_FILES, "targets/zarr.json"):
            Location(above).create_exclusive(rel, GROUP_JSON)


def init_cache(root: str | os.PathLike, manifest: Manifest) -> None:
    """Create the cache's manifest if absent; the first of racing writers wins, whole.

    Its backend first writes what it keeps beside the shards (`Backend.prepare`: a Zarr cache's
    root and `shards` folder are also Zarr v3 groups; a wds cache is plain files). `shards`
    entries are never part of manifest.json: each is its own file.
    """
    loc = Location(root)
    get_backend(manifest.backend).prepare(root, manifest)
    loc.create_exclusive(MANIFEST, (json.dumps(manifest.to_json(), indent=1) + "\n").encode())


def config_mismatch(existing: Manifest, wanted: Manifest) -> str | None:
    """The first difference between two manifests' teacher/views/storage, or None.

    The teacher's spec and weights path are not compared (files move); its architecture,
    geometry and weights fingerprint are. Of `storage.pca` only the configuration (rank,
    fit_views) is: what the fit measured (explained variance, the file's sha256) is known
    only once the basis exists, and a cache keeps its first basis anyway.
    """
    old, new = existing.to_json(), wanted.to_json()
    for section in ("teacher", "views", "storage"):
        a, b = old[section], new[section]
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
    """`storage.pca` without the fields the fit measured (None: no PCA)."""
    return None if pca is None else {k: v for k, v in pca.items() if k not in MEASURED_FIELDS}


def shard_entry(manifest: Manifest, source: str) -> ShardEntry | None:
    """The manifest entry of exactly this source URL, or None."""
    return next((s for s in manifest.shards if s.source == source), None)


def shard_basename(source: str) -> str:
    return source.rstrip("/").split("/")[-1]


def find_shard(manifest: Manifest, source: str) -> ShardEntry | None:
    """The entry for `source`: the same URL, else the one entry with the same file name.

    Training often names the shards differently from extraction (a relative path, another
    mount, a `pipe:` command): the tar's file name is what identifies it.
    """
    return ShardIndex(manifest.shards).find(source)


class ShardIndex:
    """A manifest's entries by source and by file name: `find` (`find_shard`'s matching)
    in constant time, since a run looks up every one of its shards, several times, before
    its first step."""

    def __init__(self, entries: tuple[ShardEntry, ...] | list[ShardEntry]):
        self.by_source: dict[str, ShardEntry] = {}
        self.by_name: dict[str, list[ShardEntry]] = {}
        for e in entries:
            self.by_source.setdefault(e.source, e)
            self.by_name.setdefault(shard_basename(e.source), []).append(e)

    def find(self, source: str) -> ShardEntry | None:
        """The entry of exactly `source`, else the one entry with its file name, else None;
        several with its file name: a CacheError asking for the name used at extraction."""
        entry = self.by_source.get(source)
        if entry is not None:
            return entry
        same = self.by_name.get(shard_basename(source), [])
        if len(same) > 1:
            raise CacheError(f"shard {source}: {len(same)} cached shards share its file name; name it as at extraction")
        return same[0] if same else None


def file_list_bytes(files: FileList) -> bytes:
    """A file list as written beside its group: one JSON object, `{"files": {path: [size,
    sha256], ...}}`, compact, the files in the order written (the same bytes for the same group)."""
    return (json.dumps({"files": files.to_json()}, separators=(",", ":")) + "\n").encode()


def record_shard(root: str | os.PathLike, entry: ShardEntry) -> ShardEntry:
    """Mark a shard complete (after its bytes are in place): its file list first, beside the
    group (`<group>.files`, replaced whole), then its entry, bound to that list by its
    sha256 and size, the commit point. Returns the entry as written."""
    loc = Location(root)
    check_group(entry.group, backend_of_group(entry.group).name, loc.join(entry_path(entry.group)))
    if entry.files is not None:
        blob = file_list_bytes(entry.files)
        loc.write_bytes(files_path(entry.group), blob)
        entry = dataclasses.replace(entry, file_list=FileListRef(file_digest(blob), len(blob)))
    loc.write_bytes(entry_path(entry.group), (json.dumps(entry.to_json(), indent=1) + "\n").encode())
    return entry


def with_files(root: str | os.PathLike, entry: ShardEntry, backend: str) -> ShardEntry:
    """`entry` with its file list (format 6: `<group>.files` read, its size and sha256
    compared with the entry's `file_list` before it is parsed); as it is when it lists its
    files inline (format 5) or none (4). What opening a shard reads first."""
    if entry.files is not None or entry.file_list is None:
        return entry
    loc, rel, ref = Location(root), files_path(entry.group), entry.file_list
    where = loc.join(rel)
    check_inside(loc.url, where)
    fix = "run `mrmae cache verify --repair`"
    try:
        blob = loc.read_bytes(rel, limit=ref.bytes)
    except FileNotFoundError:
        raise CacheError(f"{where}: missing: the file list of {entry.group}; {fix}") from None
    if len(blob) != ref.bytes:
        size = f"{len(blob):,} bytes, fewer" if len(blob) < ref.bytes else "more bytes"
        raise CacheError(f"{where}: {size} than its entry records ({ref.bytes:,}); {fix}")
    if file_digest(blob) != ref.sha256:
        raise CacheError(f"{where}: sha256 differs from its entry's: damaged, or another shard's list; {fix}")
    f = _Fields(load_json(blob, where, "file list"), where)
    files = FileList.from_json(f.take("files"), where)
    f.done()
    return dataclasses.replace(entry, files=entry.checked_files(files, where, backend))


def forget_shard(root: str | os.PathLike, group: str) -> None:
    """Remove a shard's entry before its group is rewritten, so it never looks complete."""
    Location(root).remove(entry_path(group))

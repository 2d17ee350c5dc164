"""What a cache backend is: one class that writes a shard's rows, opens them again and checks them.

    backend.writer(root, source, ...)  -> GroupWriter: append rows, finish (named after its bytes), publish
    backend.open(path, entry, manifest, checked) -> ShardReader: rows by (key, view) or in order, each checked
    backend.check(path, entry, manifest, checked)   start-up's look at one stored shard (a few files)
    backend.verify(reader)                          `cache verify`'s look: every file, as a reader sees it
    backend.logical_bytes(manifest, entries)        `cache info`'s bytes before compression, from entries alone

A backend subclasses `Backend`, sets its `name` and its group's suffix, and registers with
`@register_backend` in its own module (zarr_store.py, wds_store.py). The manifest names a
cache's backend (`storage.backend`) and everything else asks that backend, never its name:
`get_backend(manifest.backend)`, or `backend_of_group(group)` where only a group path is known
(a published group's name ends with its backend's suffix). A module listed under the
`mrmae.backends` entry-point group is imported after the built-in ones (shared/plugins.py),
so a third backend is one file installed beside mrmae (tests/test_plugins.py has one).
Committing a shard (its entry, the commit point) is the cache's, the same for every backend
(`cache.commit_shard`).
"""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING, Iterable, Protocol

import numpy as np

from ..errors import unknown_name
from ..plugins import load_plugins
from .common import CacheError, ViewTargets

if TYPE_CHECKING:
    from .manifest import Manifest, ShardEntry

DEFAULT_BACKEND = "zarr"  # extract-features' default, and the backend of caches written before storage.backend
BUILT_IN = ("zarr_store", "wds_store")  # the modules of this package that register a backend


class ShardReader(Protocol):
    """One stored shard opened for reading, as the loader, `cache verify` and --add-teacher use it.

    path, entry                      where it is (for messages) and its manifest entry
    keys [N] str, views [N] int16    each row's sample key and view index, in stored order
    quantized                        features stored int8 with float16 scales
    read_ahead                       set True by a sequential reader: read the next blocks in threads
    row(key, view) -> i              CacheError when absent
    read(rows: slice) -> dict        keys, view, crop, flip, features (float32), attention, cls
    geometry() -> (crop [N, 4] int32, flip [N] bool, attention [N, L] float32), read once
    stored_row(i) -> (values [L, C] int8 or float16, scale or None), as stored
    image_digests() -> uint8 [N, 32] or None; image_digest(i) -> bytes or None
    stored_pixels(i) -> bytes        row i's stored view (an image file)
    get(key, view) -> ViewTargets
    """

    path: str
    keys: np.ndarray
    views: np.ndarray
    read_ahead: bool

    def __len__(self) -> int: ...
    def row(self, key: str, view: int) -> int: ...
    def read(self, rows: slice, layer: str = "features") -> dict[str, np.ndarray]: ...
    def geometry(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]: ...
    def stored_row(self, i: int, layer: str = "features") -> tuple[np.ndarray, np.ndarray | None]: ...
    def image_digests(self) -> np.ndarray | None: ...
    def image_digest(self, i: int) -> bytes | None: ...
    def stored_pixels(self, i: int) -> bytes: ...
    def get(self, key: str, view: int) -> ViewTargets: ...


class GroupWriter(Protocol):
    """One shard being written into a temporary of its writer's own (CACHE_FORMAT.md,
    "Concurrent writers"): `append` rows in order; `finish(attrs, expected)` checks what is
    stored and names the group after its bytes (sets `digest` (sha256, bytes), `files` (its
    FileList), `group_path` (the entry's `group`) and `final`); `publish` moves it there (False:
    the same bytes were there, this writer yields); `abort` removes its temporary alone."""

    root: os.PathLike | str
    tmp: os.PathLike | str
    name: str
    rows: int
    digest: tuple[str, int] | None
    group_path: str | None

    def append(self, keys: list[str], view: np.ndarray, crop: np.ndarray, flip: np.ndarray, features,
               attention: np.ndarray, cls: np.ndarray, layers: dict | None = None, pixels: list[bytes] | None = None,
               image_sha256=None) -> None:
        """Add rows (all arrays share the first dimension; features float32 [n, L, C], or
        [n, L, K] in a PCA cache, or that already quantised: an (int8, float16 scale) pair from
        `quantize_int8_torch`, as layers too; pixels: each row's encoded view, when stored;
        image_sha256: [n] 32-byte sha256 of each row's source image file, for every row or none)."""

    def finish(self, attrs: dict, expected: list[tuple[str, int]] | None = None) -> tuple[str, int]: ...
    def publish(self) -> bool: ...
    def abort(self) -> None: ...


class Backend:
    """One way of storing a cache's shards. Subclass it, set the class attributes, implement
    `codec`, `writer`, `open`, `check`, `verify` and `logical_bytes`, and register it."""

    name: str = ""  # what --format and the manifest's storage.backend say
    suffix: str = ""  # a published group's name ends with it: "" (a folder), ".tar" (one file)
    help: str = ""  # one phrase for --format's help
    checksums: str = ""  # what `cache info` says a format 4+ cache checks as rows are read
    sizes_add_up: bool = True  # an entry's listed file sizes add up to its `bytes` (a tar's headers are not listed)

    def codec(self, dtype: str) -> str:
        """The manifest's `storage.codec`: how `dtype` rows are compressed."""
        raise NotImplementedError

    def storage(self, dtype: str) -> dict:
        """Fields of the manifest's `storage` this backend adds (zarr: rows_per_chunk)."""
        return {}

    def prepare(self, root: str | os.PathLike, manifest: Manifest) -> None:
        """Create, if absent, what a cache of this backend holds beside its shards (zarr: the
        metadata of its root and `shards` groups); racing writers must agree byte for byte."""

    def writer(self, root: str | os.PathLike, source: str, max_rows: int, dim: int, grid_len: int, dtype: str,
               layers: tuple[int, ...] = (), pixels: str | None = None, feature_dim: int | None = None,
               int8_group: int | None = None) -> GroupWriter:
        """A writer of shard `source` into `root/shards` (`cache.open_shard_writer` documents the arguments)."""
        raise NotImplementedError

    def open(self, path: str, entry: ShardEntry, manifest: Manifest, checked: bool) -> ShardReader:
        """The reader of the stored shard at `path` (its entry's file list already read),
        refusing anything not as the manifest and entry say."""
        raise NotImplementedError

    def check(self, path: str, entry: ShardEntry, manifest: Manifest, checked: bool) -> None:
        """Start-up's look at one stored shard: there, and of the manifest's shapes and the
        entry's rows, from a few files (CacheError naming the shard otherwise)."""
        raise NotImplementedError

    def verify(self, reader: ShardReader) -> None:
        """Every file of an opened shard through a reader's checks (`cache verify`): the
        first problem is a CacheError."""
        raise NotImplementedError

    def logical_bytes(self, manifest: Manifest, entries: Iterable[ShardEntry]) -> int:
        """Bytes of the entries' rows before compression, from the manifest and entries alone."""
        raise NotImplementedError

    def group_of(self, entry_file: str) -> str:
        """The group an entry file names when it has no content digest (`shards/<name>.json`)."""
        return entry_file.removesuffix(".json") + self.suffix


_REGISTRY: dict[str, Backend] = {}
_LOADED = False


def register_backend(cls: type[Backend]) -> type[Backend]:
    """Class decorator: register a backend under `cls.name` (a name registered twice by two
    classes is an error; two suffixes where one ends the other would make groups ambiguous)."""
    if not cls.name:
        raise ValueError(f"{cls.__module__}.{cls.__name__}: a backend needs a name")
    old = _REGISTRY.get(cls.name)
    if old is not None and type(old) is not cls:
        raise ValueError(f"cache backend {cls.name!r} is registered twice ({type(old).__module__} and {cls.__module__})")
    for other in _REGISTRY.values():
        if other.name != cls.name and other.suffix and cls.suffix and \
                (other.suffix.endswith(cls.suffix) or cls.suffix.endswith(other.suffix)):
            raise ValueError(f"cache backend {cls.name!r}: group suffix {cls.suffix!r} overlaps {other.name}'s "
                             f"{other.suffix!r}")
    _REGISTRY[cls.name] = cls()
    return cls


def backends() -> dict[str, Backend]:
    """Every registered backend by name: the built-in ones, then the installed plug-ins'
    (imported once; registration is the import's side effect)."""
    global _LOADED
    if not _LOADED:
        _LOADED = True  # (before the imports: a built-in module asks for the registry as it loads)
        for module in BUILT_IN:
            importlib.import_module(f"{__package__}.{module}")
        load_plugins("mrmae.backends")
    return dict(_REGISTRY)


def backend_names() -> list[str]:
    """The registered backends' names, the default first (what --format accepts)."""
    return sorted(backends(), key=lambda n: (n != DEFAULT_BACKEND, n))


def get_backend(name: str) -> Backend:
    """The backend registered as `name`; one CacheError with the closest names otherwise."""
    known = backends()
    if name not in known:
        raise CacheError(unknown_name("cache format", name, backend_names()))
    return known[name]


def backend_of_group(group: str) -> Backend:
    """The backend whose published groups are named like `group` (the longest suffix that
    ends it; a folder's "" ends every name): where a path is all that is known."""
    return max((b for b in backends().values() if group.endswith(b.suffix)), key=lambda b: len(b.suffix))


def group_suffixes() -> list[str]:
    """Every registered backend's group suffix but the empty one, longest first."""
    return sorted({b.suffix for b in backends().values() if b.suffix}, key=len, reverse=True)


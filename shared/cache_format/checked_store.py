"""zarr's only door into a shard group: every key read through its entry's file list.

`CheckedStore` is the zarr Store a reader opens a group with. Each `get` of a key:

1. takes the key only from the entry's list (format 5): a key not listed is refused, never
   read as absent (zarr would fill its rows with the fill value);
2. reads it as a regular file only (`listing.read_regular`: lstat, O_NOFOLLOW | O_NONBLOCK),
   so a FIFO, device, directory or link in its place is refused, never blocks;
3. compares its size and sha256 with the list (a chunk swapped for another chunk of the
   same array, a byte flipped, a file truncated or grown);
4. for a chunk, compares the decoded size its frame declares (zstd content size, blosc
   nbytes) with what the array's spec gives (`zarr_spec`), so zarr never allocates more;
5. serves an array's zarr.json only after the opener compared it with the spec.

Any refusal is a CacheError naming the group, the file and its rows.
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator, Iterable

from zarr.abc.store import ByteRequest, RangeByteRequest, Store
from zarr.core.buffer import Buffer, BufferPrototype

from ..frames import FrameError, check_blosc, check_zstd
from .common import CacheError
from .listing import FileList, NotRegularFile, file_digest, read_regular
from .location import Location, link_out_of, local_files, local_path
from .zarr_spec import ArraySpec

_CRC_BYTES = 4  # the crc32c codec's suffix of a chunk (format 4 on)


class ListedFileError(CacheError):
    """A group's file refused by the checks above; names the group, the file and its rows."""


class CheckedStore(Store):
    """Read-only store over one group (a local directory or a URL); see the module doc."""

    supports_writes = False
    supports_deletes = False
    supports_partial_writes = False
    supports_listing = True

    def __init__(self, path: str, files: FileList | None, checked: bool):
        super().__init__(read_only=True)
        self.path, self.files, self.checked = str(path), files, checked
        self.local = local_path(self.path)
        self.location = None if self.local is not None else Location(self.path)
        self.specs: dict[str, ArraySpec] = {}  # array -> spec (chunk rows as stored), set by the opener
        self.lengths: dict[str, int] = {}  # array -> its length (rows; bytes of pixels)
        self.verified: dict[str, bytes] = {}  # zarr.json files compared with their spec by the opener
        self.bounded = True  # chunks only of arrays with a spec (False: a writer's own temporary)
        self.primed: dict[str, bytes] = {}  # files read ahead, checked (`prime`), each handed over once
        self._is_open = True

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CheckedStore) and other.path == self.path

    def __getstate__(self) -> dict:
        return dict(self.__dict__)

    # --- the checked read -----------------------------------------------------------------

    def fail(self, key: str, what: str) -> ListedFileError:
        name = key.split("/", 1)[0]
        spec = self.specs.get(name)
        rows = spec.rows_of(key.split("/", 1)[1], self.lengths.get(name, 0)) if spec and "/" in key else "all rows"
        if key.endswith("zarr.json"):
            rows = "metadata"
        return ListedFileError(f"{self.path}: file {key} ({rows}): {what}; run `mrmae cache verify --repair`")

    def prime(self, keys: list[str]) -> None:
        """Read `keys` at once (on a store: their round trips overlapped; locally nothing to
        gain, so nothing is done), each through every check of `read`, for `read` to hand
        over: a shard's opening asks for its metadata and first chunks one after the other.
        A key that fails is left for `read` to fail on, with its own message, when asked."""
        if self.location is None or self.files is None:
            return
        from .location import parallel_map

        def checked(key: str) -> bytes | None:
            try:
                return self.read(key)
            except CacheError:
                return None

        for key, data in zip(keys, parallel_map(checked, keys)):
            if data is not None:
                self.primed[key] = data

    def read(self, key: str) -> bytes | None:
        """The checked bytes of `key`; None only for a zarr.json that is not there (zarr
        probes for arrays that way)."""
        if key in self.verified:
            return self.verified[key]
        if key in self.primed:  # (checked when read ahead; metadata may be asked twice, chunks once)
            return self.primed[key] if key.endswith("zarr.json") else self.primed.pop(key)
        listed = self.files.get(key) if self.files is not None else None
        if self.files is not None and listed is None:
            if key.endswith("zarr.json"):
                return None
            raise self.fail(key, "not in the entry's file list")
        try:
            data = read_regular(f"{self.local}/{key}", limit=1 << 34) if self.local is not None \
                else self.location.read_bytes(key)
        except NotRegularFile as e:
            real = link_out_of(self.local, f"{self.local}/{key}") if self.local is not None else None
            what = f"a symbolic link out of the cache (to {real}), never followed" if real else str(e).split(": ", 1)[1]
            raise self.fail(key, what) from None
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            if key.endswith("zarr.json") and listed is None:
                return None
            raise self.fail(key, "missing" if key.endswith("zarr.json") else
                            "missing (zarr would read its rows as fill values)") from None
        if listed is not None:
            if len(data) != listed[0]:
                raise self.fail(key, f"{len(data):,} bytes, the entry lists {listed[0]:,}")
            if file_digest(data) != listed[1]:
                raise self.fail(key, "sha256 differs from the entry's: damaged, or another file in its place")
        if not key.endswith("zarr.json"):
            self._check_frame(key, data)
        return data

    def _check_frame(self, key: str, data: bytes) -> None:
        """A chunk's declared decoded size against its spec's, before zarr decodes it."""
        spec = self.specs.get(key.split("/", 1)[0])
        if spec is None:
            if self.bounded:
                raise self.fail(key, "a chunk of no array of this cache")
            return
        frame = data[:-_CRC_BYTES] if self.checked else data
        expected = spec.chunk_bytes()
        try:
            if spec.compressor == "zstd":
                check_zstd(frame, expected, at_most=spec.data_type == "string")
            elif spec.compressor == "blosc":
                check_blosc(frame, expected)
            elif len(frame) != expected:
                raise FrameError(f"{len(frame):,} bytes, a chunk holds {expected:,}")
        except FrameError as e:
            raise self.fail(key, str(e)) from None

    # --- zarr's Store interface (read-only) --------------------------------------------------

    async def get(self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None = None
                  ) -> Buffer | None:
        data = await asyncio.to_thread(self.read, key)
        if data is None:
            return None
        if byte_range is not None:
            if not isinstance(byte_range, RangeByteRequest):
                raise self.fail(key, f"a byte range {byte_range!r} asked: no reader of this cache asks one")
            data = data[byte_range.start:byte_range.end]
        return prototype.buffer.from_bytes(data)

    async def get_partial_values(self, prototype: BufferPrototype,
                                 key_ranges: Iterable[tuple[str, ByteRequest | None]]) -> list[Buffer | None]:
        return [await self.get(k, prototype, r) for k, r in key_ranges]

    async def exists(self, key: str) -> bool:
        try:
            return self.read(key) is not None
        except ListedFileError:
            return False

    async def set(self, key: str, value: Buffer) -> None:
        raise CacheError(f"{self.path}: a cache's group is never written by a reader")

    async def delete(self, key: str) -> None:
        raise CacheError(f"{self.path}: a cache's group is never written by a reader")

    def _keys(self) -> list[str]:
        if self.files is not None:
            return self.files.paths
        return [rel for rel, _ in (local_files(self.local) if self.local is not None else self.location.files(""))]

    async def list(self) -> AsyncIterator[str]:
        for k in self._keys():
            yield k

    async def list_prefix(self, prefix: str) -> AsyncIterator[str]:
        for k in self._keys():
            if k.startswith(prefix):
                yield k

    async def list_dir(self, prefix: str) -> AsyncIterator[str]:
        prefix = prefix.rstrip("/") + "/" if prefix else ""
        seen = set()
        for k in self._keys():
            if k.startswith(prefix):
                head = k[len(prefix):].split("/", 1)[0]
                if head not in seen:
                    seen.add(head)
                    yield head

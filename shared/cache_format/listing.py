"""A stored shard's file list, and reading a cache's files as regular files only.

Since format 5 a shard's entry (`shards/<name>.json`, written last: the commit point) lists
every file of its group, with its size and sha256: a Zarr group's `zarr.json` files and
chunks, a wds tar's members. Readers take a file only through that list, like a registry
takes a blob only by an image manifest's digest: a name not in it, another size, another
sha256, or anything that is not a regular file is one error naming the shard, the file and
the rows, before any byte of it is decoded (CACHE_FORMAT.md, "Integrity").

Regular files only: a cache's file is `lstat`ed before it is opened, and opened with
O_NOFOLLOW | O_NONBLOCK, so a FIFO (which would block forever), a device (read without
end), a directory or a symbolic link in its place is an error naming it, never read.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from dataclasses import dataclass

import hashlib

from .common import CacheError

# The digest of a listed file: sha256, what `sha256sum` prints. Not crc32c, fast as it is:
# a Zarr chunk ends with the crc32c of its other bytes, and the crc32c of any bytes followed
# by their own crc32c is one constant (CRC's residue), so every chunk would list the same
# digest. Its cost on the loader: BENCHMARKS.md, "File lists".
DIGEST = "sha256"
_HEX = re.compile(r"[0-9a-f]{64}")
_PATH = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,254}(/[A-Za-z0-9_-][A-Za-z0-9._-]{0,254}){0,15}")
# Upper bound of a JSON file of a cache (manifest, entry): an entry lists ~60 bytes a file,
# a few MB for the largest shards; a larger file is damage or crafted, never parsed.
MAX_JSON_BYTES = 256 << 20
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)


def file_digest(data: bytes | memoryview) -> str:
    """A listed file's digest: the sha256 of its bytes, as 64 lower-case hex digits."""
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class FileList:
    """The entry's `files`: path (relative to the group; a wds tar: member name) -> (size,
    sha256), in the order written. Kept as one tuple: a manifest holds every entry's."""

    items: tuple[tuple[str, int, str], ...]

    def __post_init__(self):
        object.__setattr__(self, "_index", {p: (s, c) for p, s, c in self.items})

    def __len__(self) -> int:
        return len(self.items)

    def __repr__(self) -> str:
        return f"FileList({len(self.items)} files, {self.total:,} bytes)"

    def __contains__(self, path: str) -> bool:
        return path in self._index

    def get(self, path: str) -> tuple[int, str] | None:
        return self._index.get(path)

    @property
    def paths(self) -> list[str]:
        return [p for p, _, _ in self.items]

    @property
    def total(self) -> int:
        return sum(s for _, s, _ in self.items)

    def to_json(self) -> dict:
        return {p: [s, c] for p, s, c in self.items}

    @staticmethod
    def from_json(obj, where: str) -> FileList:
        """`{"path": [size, sha256], ...}` checked: safe relative paths, sizes, digests;
        anything else is one CacheError naming `where` (the entry file) and the path."""
        if not isinstance(obj, dict):
            raise CacheError(f"{where}: files: expected a JSON object of path -> [size, sha256]")
        items = []
        for path, v in obj.items():
            shown = path if len(path) <= 80 else path[:77] + "..."
            if not _PATH.fullmatch(path) or ".." in path.split("/"):
                raise CacheError(f"{where}: files: {shown!r} is not a path inside the group")
            if not (isinstance(v, list) and len(v) == 2 and type(v[0]) is int and 0 <= v[0] < 2**63
                    and isinstance(v[1], str) and _HEX.fullmatch(v[1])):
                raise CacheError(f"{where}: files: {shown!r}: expected [size, sha256] (an integer, 64 hex digits), "
                                 f"got {str(v)[:60]}")
            items.append((path, v[0], v[1]))
        return FileList(tuple(items))


def kind_of(mode: int) -> str:
    """What a file system object is, in words, for a message."""
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISLNK, "a symbolic link"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


class NotRegularFile(CacheError):
    """A cache file that is a FIFO, device, directory or link: never opened or followed."""


def regular_size(path: str) -> int | None:
    """The size of the regular file `path` (lstat: a link is not followed); None when it does
    not exist; NotRegularFile naming it and what it is otherwise."""
    try:
        st = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    if not stat.S_ISREG(st.st_mode):
        raise NotRegularFile(f"{path}: {kind_of(st.st_mode)}, not a regular file; never read")
    return st.st_size


def read_regular(path: str, size: int | None = None, limit: int = MAX_JSON_BYTES, offset: int = 0) -> bytes:
    """The bytes of the regular file `path` (from `offset`, `size` of them, or all): lstat
    first, opened with O_NOFOLLOW | O_NONBLOCK (a FIFO, device or link swapped in after the
    lstat is refused too, never blocks). A file larger than `limit` is refused unread.
    FileNotFoundError when absent; NotRegularFile naming it otherwise."""
    if regular_size(path) is None:
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", path)
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise NotRegularFile(f"{path}: a symbolic link, not a regular file; never read") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegularFile(f"{path}: {kind_of(st.st_mode)}, not a regular file; never read")
        want = st.st_size - offset if size is None else size
        if want > limit:
            raise CacheError(f"{path}: {want:,} bytes, more than any such file of a cache holds ({limit:,}); "
                             "damaged or not a cache's file")
        data = os.pread(fd, want, offset) if want else b""
        while len(data) < want:  # (a short read of a large file)
            more = os.pread(fd, want - len(data), offset + len(data))
            if not more:
                break
            data += more
        return data
    finally:
        os.close(fd)


class RegularFile:
    """An open regular file for ranged reads (a wds tar): lstat'ed, opened with O_NOFOLLOW |
    O_NONBLOCK, checked regular once more on its descriptor; reads past its end are errors."""

    def __init__(self, path: str):
        if regular_size(path) is None:
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", path)
        try:
            self.fd = os.open(path, _OPEN_FLAGS)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise NotRegularFile(f"{path}: a symbolic link, not a regular file; never read") from None
            raise
        st = os.fstat(self.fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(self.fd)
            raise NotRegularFile(f"{path}: {kind_of(st.st_mode)}, not a regular file; never read")
        self.path, self.size = path, st.st_size

    def pread(self, size: int, offset: int) -> bytes:
        if offset < 0 or size < 0 or offset + size > self.size:
            raise CacheError(f"{self.path}: {size:,} bytes at {offset:,} wanted, the file has {self.size:,}")
        return os.pread(self.fd, size, offset)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __del__(self) -> None:
        if getattr(self, "fd", -1) >= 0:
            self.close()

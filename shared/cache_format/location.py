"""Where a cache lives: a local directory, or an fsspec URL (s3://, gs://, file://, memory://).

Writers only ever write local files. A shard is assembled in a local directory (the cache
itself when it is local, a staging directory when it is a URL) and then published whole;
its manifest entry is written after its bytes, as one small object. Object stores have
no rename and no locks, and a single PUT is atomic on all of them, so "a shard is
complete exactly when its entry exists" holds everywhere without a lock. Every file is
replaced whole: locally (and through fsspec's local file system) a temporary of this
writer's own is renamed into place; elsewhere one PUT.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import stat
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import IO, Iterator

import fsspec
from fsspec.implementations.local import LocalFileSystem

from .common import CacheError, remove_path, writer_token
from .listing import (_OPEN_FLAGS, MAX_JSON_BYTES, FileList, NotRegularFile, file_digest, kind_of, read_regular,
                      regular_size)

# Errors of a file system that will not take the cache's bytes: full, over quota, read-only,
# not writable. Extraction reports them as one line naming the path (`writing`).
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}


@contextlib.contextmanager
def writing(where: str | os.PathLike) -> Iterator[None]:
    """Turn a full disk, a read-only or unwritable cache into a CacheError naming the path
    (`mrmae: error: PATH: No space left on device (extracting into OUT)`), not a traceback."""
    try:
        yield
    except OSError as e:
        if e.errno not in _WRITE_ERRNOS:
            raise
        what = e.strerror or os.strerror(e.errno)
        path = e.filename or where
        msg = f"{path}: {what}" + (f" (extracting into {where})" if str(path) != str(where) else "")
        raise CacheError(msg) from e


def temp_beside(path: str) -> str:
    """A name for this writer's temporary copy of `path`, in its directory: `.<name>.<writer>.tmp`."""
    head, _, name = path.rpartition("/")
    return f"{head}/.{name}.{writer_token()}.tmp" if head else f".{name}.{writer_token()}.tmp"


def is_temp(path: str) -> bool:
    """Whether `path` names a writer's temporary: a shard's `.tmp-*` or a file's `.<name>.<writer>.tmp`."""
    name = path.rstrip("/").rsplit("/", 1)[-1]
    return name.startswith(".tmp-") or (name.startswith(".") and name.endswith(".tmp"))


def _mtime(info: dict) -> float | None:
    """A file's modification time from an fsspec `info` dict (each file system names it its own way)."""
    for key in ("mtime", "LastModified", "last_modified", "updated", "created", "timeCreated"):
        value = info.get(key)
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, datetime):
            return value.timestamp()
        if isinstance(value, str):
            try:
                return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
            except ValueError:
                continue
    return None


def is_url(root: str | os.PathLike) -> bool:
    return "://" in str(root)


def local_path(path: str | os.PathLike) -> str | None:
    """A local path, or a URL's path on the local file system (file://), else None."""
    if not is_url(path):
        return str(path)
    fs, local = fsspec.core.url_to_fs(str(path))
    return local if isinstance(fs, LocalFileSystem) else None


def link_out_of(root: str | os.PathLike, path: str | os.PathLike) -> str | None:
    """Where local `path` really is when a symbolic link on its way leads out of the
    directory `root` (both resolved, so a cache root that is itself a link is fine); None
    when it stays inside, or for URLs other than file://, whose stores have no links."""
    root, path = local_path(root), local_path(path)
    if root is None or path is None:
        return None
    real_root, real = os.path.realpath(root), os.path.realpath(path)
    return None if real == real_root or real.startswith(real_root.rstrip(os.sep) + os.sep) else real


def check_inside(root: str | os.PathLike, path: str | os.PathLike) -> None:
    """Refuse to read `path` (a cache's file or group) when a symbolic link leads it out of
    the cache `root`: nothing recorded in a cache is followed out of it."""
    real = link_out_of(root, path)
    if real is not None:
        raise CacheError(f"{path}: a symbolic link out of the cache {root} (to {real}), never followed; "
                         "put the files themselves there, or remove the link")


class Location:
    """A cache root and the file operations the cache needs, local or remote.

    Paths given to the methods are relative to the root, with `/` separators.
    """

    def __init__(self, root: str | os.PathLike):
        self.url = str(root).rstrip("/") if is_url(root) else str(Path(root))
        self.remote = is_url(root)
        try:
            self.fs, self.path = fsspec.core.url_to_fs(self.url)
        except (ImportError, ValueError) as e:  # an unknown scheme, or its package (s3fs, gcsfs) not installed
            raise CacheError(f"{self.url}: cannot open this URL ({e})") from None

    def __str__(self) -> str:
        return self.url

    def join(self, rel: str) -> str:
        """The URL (or local path) of `rel`, for messages and for zarr / fsspec openers."""
        return f"{self.url}/{rel}" if self.remote else str(Path(self.url) / rel)

    def _full(self, rel: str) -> str:
        return f"{self.path}/{rel}" if rel else self.path

    def _fresh(self, full: str) -> str:
        """`full`, with the listings this process's filesystem cached for it dropped first.

        fsspec shares one filesystem per set of options in a process, and s3fs's listing
        cache never expires: without this, a reader would not see the entries another
        process published since its first listing, nor a writer the group another uploaded.
        (Reads of an object's bytes need nothing: they are never cached.)"""
        if self.remote:
            self.fs.invalidate_cache(full)
        return full

    def exists(self, rel: str) -> bool:
        return self.fs.exists(self._fresh(self._full(rel)))

    def read_bytes(self, rel: str, limit: int | None = None) -> bytes:
        """A small file of the cache (manifest, entry, zarr.json): on a local disk (file://
        too) a regular file only, never a FIFO, device or link (`listing.read_regular`).
        `limit`: the most bytes it may hold (locally refused unread beyond; on a store at
        most `limit` + 1 are fetched, so the caller sees that it is longer)."""
        if self._renames:

            return read_regular(self._full(rel), limit=MAX_JSON_BYTES if limit is None else limit)
        if limit is not None:
            return self.fs.cat_file(self._full(rel), start=0, end=limit + 1)
        return self.fs.cat_file(self._full(rel))

    def read_many(self, rels: list[str], concurrent: bool = True) -> list[bytes]:
        """Several small files at once, in the order asked: concurrent requests on a store
        (fsspec's async ones, s3 and gcs, batch them in `cat`; a synchronous one is asked
        from READ_THREADS threads); one after the other on a local disk, and where the
        caller overlaps its own calls (`concurrent` False)."""
        if not rels:
            return []
        paths = [self._full(r) for r in rels]
        # (a synchronous fsspec filesystem's `cat` asks one file after the other: a cache's
        # 1,024 entries would wait 1,024 round trips)
        if (concurrent and len(paths) > 1 and self.remote and not self._renames
                and not getattr(self.fs, "async_impl", False)):
            return parallel_map(self.fs.cat_file, paths)
        if not concurrent or self._renames:  # (locally: regular files only, `read_bytes`)
            return [self.read_bytes(r) for r in rels]
        got = self.fs.cat(paths)
        return [got[p] for p in paths]

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Replace `rel` atomically: a local temp file renamed into place, or one PUT."""
        if self.remote:
            self.fs.makedirs(self._full(rel).rsplit("/", 1)[0], exist_ok=True)  # local-style filesystems need it
            if self._renames:
                tmp = temp_beside(self._full(rel))
                self.fs.pipe_file(tmp, data)
                self.fs.mv(tmp, self._full(rel))
            else:
                self.fs.pipe_file(self._full(rel), data)
            return
        path = Path(self.url) / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(temp_beside(str(path)))
        try:
            tmp.write_bytes(data)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    @property
    def _renames(self) -> bool:
        """Whether this URL's file system writes a file in place, visible half-written (fsspec's
        local one, for file:// URLs), so that a whole file must be renamed into place; an
        object store's PUT (and memory://) is atomic already."""
        return isinstance(self.fs, LocalFileSystem)

    def create_exclusive(self, rel: str, data: bytes) -> bool:
        """Write `rel` unless it exists; True when this call wrote it.

        Local (file:// too): a hard link of a complete temp file, which fails if the name
        exists, so the first of several racing writers wins and nobody sees a half-written
        file. A store: one conditional PUT (`If-None-Match: *` on S3, which refuses it when
        the key exists), so there too exactly one writer creates it; fsspec backends without
        conditional writes fall back to check-then-write.
        """
        if self.remote and not self._renames:
            if self.exists(rel):  # the common case, decided without a write
                return False
            self.fs.makedirs(self._full(rel).rsplit("/", 1)[0], exist_ok=True)  # (s3fs: the bucket, if missing)
            try:
                self.fs.pipe_file(self._full(rel), data, mode="create")
            except FileExistsError:
                return False
            return True
        path = Path(local_path(self.url)) / rel
        if path.exists():  # the common case, decided without writing (a read-only cache is no error here)
            return False
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(temp_beside(str(path)))
        try:
            tmp.write_bytes(data)
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def glob(self, pattern: str) -> list[str]:
        """Relative paths matching `pattern` (e.g. "shards/*.json"), sorted."""
        prefix = self.path.rstrip("/") + "/"
        self._fresh(self._full(pattern.split("*", 1)[0].rpartition("/")[0]))  # the folder listed
        return sorted(p[len(prefix):] if p.startswith(prefix) else p for p in self.fs.glob(self._full(pattern)))

    def remove(self, rel: str) -> None:
        """Delete a file or a directory tree; nothing if absent."""
        full = self._full(rel)
        if self.fs.exists(full):
            self.fs.rm(full, recursive=True)

    def open(self, rel: str, mode: str = "rb") -> IO[bytes]:
        if not self.remote:

            regular_size(str(Path(self.url) / rel))  # (a FIFO or device: refused, never opened)
            return open(Path(self.url) / rel, mode)
        return self.fs.open(self._full(rel), mode)

    def files(self, rel: str) -> list[tuple[str, int]]:
        """(path relative to `rel`, size) of every file under `rel` (or of `rel` itself, as
        ("", size), when it is a file), in `pathlib` order: by path components."""
        full = self._fresh(self._full(rel))
        if self.fs.isfile(full):
            return [("", int(self.fs.size(full)))]
        found = self.fs.find(full, detail=True)
        out = [(PurePosixPath(p).relative_to(PurePosixPath(full)).as_posix(), int(info["size"]))
               for p, info in found.items() if info.get("type") == "file"]
        return sorted(out, key=lambda f: PurePosixPath(f[0]).parts)

    def publish(self, local: Path, rel: str, digest: str) -> bool:
        """Upload a finished group (a local directory) or tar to its content-addressed `rel`;
        False when the same bytes are there already (this writer yields).

        Nothing is removed first: the name says the bytes, so a group there is either these
        bytes (another writer's, perhaps being uploaded: each file is replaced whole by the
        same bytes, so an entry's reader never sees a change) or damage, which this upload
        overwrites, files the damage added included.
        """
        if self.exists(rel) and group_digest(self.join(rel))[0] == digest:
            return False
        local = Path(local)
        pairs = [(local, self._full(rel))] if local.is_file() else [
            (f, self._full(f"{rel}/{f.relative_to(local).as_posix()}")) for f in sorted(local.rglob("*")) if f.is_file()]
        for folder in sorted({dst.rsplit("/", 1)[0] for _, dst in pairs}):
            self.fs.makedirs(folder, exist_ok=True)  # local-style filesystems need it
        # Each file is its own PUT, waiting on the store's round trip rather than a core:
        # several in flight at once. The first failure (in order) raises once all have
        # ended, so the entry, written after this returns, is never written for a group
        # with a file missing.
        parallel_map(lambda pair: self._upload(*pair), pairs, UPLOAD_THREADS)
        if local.is_dir():
            ours = {dst for _, dst in pairs}  # (another writer's temporaries are not damage)
            for extra in [p for p in self.fs.find(self._full(rel)) if p not in ours and not is_temp(p)]:
                self.fs.rm(extra)
        return True

    def _upload(self, src: Path, dst: str) -> None:
        """One local file to `dst`, replacing it whole (a temporary renamed into place through
        a local-style filesystem; one PUT on a store)."""
        if self._renames:
            tmp = temp_beside(dst)
            self.fs.put_file(str(src), tmp)
            self.fs.mv(tmp, dst)
        else:
            self.fs.put_file(str(src), dst)

    def children(self, rel: str) -> list[str]:
        """Names of the entries directly under directory `rel` (hidden ones included); [] if absent."""
        full = self._fresh(self._full(rel))
        try:
            listed = self.fs.ls(full, detail=False)
        except FileNotFoundError:
            return []
        return sorted(PurePosixPath(p).name for p in listed if p.rstrip("/") != full.rstrip("/"))

    def age_hours(self, rel: str) -> float | None:
        """Hours since anything under `rel` (a file, or any file of a directory tree) was
        last written; None when the file system does not say."""
        full = self._full(rel)
        infos = [self.fs.info(full)]
        if infos[0].get("type") == "directory":
            infos += list(self.fs.find(full, detail=True, withdirs=True).values())
        times = [t for t in map(_mtime, infos) if t is not None]
        return (time.time() - max(times)) / 3600 if times else None


# Requests in flight at once where the store is synchronous (each waits on its round trip,
# not on a core): what an async fsspec client does by default, at a smaller scale.
READ_THREADS = 64
# Files of one group uploaded at once (`publish`): a Zarr group of ImageNet's shards holds
# ~400 files, a few MB each; each PUT mostly waits on its round trip.
UPLOAD_THREADS = 16


def parallel_map(fn, items: list, threads: int = READ_THREADS) -> list:
    """[fn(x) for x in items], from up to `threads` threads (for calls that wait on a store:
    they overlap their round trips). The first item (in order) whose call raises raises."""
    if len(items) <= 1 or threads <= 1:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(min(threads, len(items))) as pool:
        return list(pool.map(fn, items))


def staging_dir() -> Path:
    """A fresh local directory to assemble one shard of a remote cache in."""
    return Path(tempfile.mkdtemp(prefix="mrmae-stage-"))


def drop_staging(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def open_file(path: str | os.PathLike, mode: str = "rb") -> IO[bytes]:
    """A local path with the builtin `open` (os.pread works on it); a URL through fsspec."""
    return fsspec.open(str(path), mode).open() if is_url(path) else open(path, mode)


def is_file(path: str | os.PathLike) -> bool:
    if not is_url(path):
        return Path(path).is_file()
    fs, p = fsspec.core.url_to_fs(str(path))
    return fs.isfile(p)


# --- a stored shard's bytes: its digest and files, read as regular files only; publishing it ---


def group_digest(path: str | os.PathLike) -> tuple[str, int]:
    """(sha256, bytes) of a stored shard, local or at an fsspec URL, as its manifest entry records.

    A tar file (wds backend): the plain sha256 of the file, what `sha256sum` prints. A
    directory (a Zarr group): sha256 over (relative path, length, bytes) of every file in
    path order. Locally only regular files are read: a FIFO, device or link in the group is
    a CacheError naming it (`listing.NotRegularFile`), never opened.
    """
    digest, size, _ = group_files(path)
    return digest, size


def group_files(path: str | os.PathLike):
    """(sha256, bytes, FileList of a directory's files or None for a tar) in one pass."""
    local = local_path(path)
    h, total, items = hashlib.sha256(), 0, []
    # (the group itself may be reached through a link inside the cache: `check_inside` judged it)
    if _stored_file(local) if local is not None else Location(path).fs.isfile(Location(path).path):
        with Location(path).open("") if local is None else open_regular(os.path.realpath(local)) as f:
            while block := f.read(1 << 20):
                h.update(block)
                total += len(block)
        return h.hexdigest(), total, None
    for rel, _ in (local_files(local) if local is not None else Location(path).files("")):
        data = read_regular(os.path.join(local, rel), limit=1 << 40) if local is not None else \
            Location(path).read_bytes(rel)
        h.update(f"{rel}\x00{len(data)}\x00".encode())
        h.update(data)
        total += len(data)
        items.append((rel, len(data), file_digest(data)))
    return h.hexdigest(), total, FileList(tuple(items))


def _stored_file(local: str) -> bool:
    """Whether a local stored shard is a file (a tar) rather than a directory; anything else
    (a FIFO, a device) is a NotRegularFile naming it."""
    mode = os.stat(local).st_mode
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise NotRegularFile(f"{local}: {kind_of(mode)}, not a stored shard; never read")
    return stat.S_ISREG(mode)


def open_regular(path: str):
    """A local regular file opened for reading (lstat first, O_NOFOLLOW | O_NONBLOCK)."""
    regular_size(path)
    fd = os.open(path, _OPEN_FLAGS)
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise NotRegularFile(f"{path}: {kind_of(mode)}, not a regular file; never read")
    return os.fdopen(fd, "rb")


def local_files(root: str) -> list[tuple[str, int]]:
    """(relative path, size) of every file under the local directory `root`, in `group_digest`'s
    order (by path components), from lstat alone: a FIFO, device or symbolic link is a
    NotRegularFile naming it (never opened nor followed)."""
    out, folders = [], [""]
    while folders:
        folder = folders.pop()
        with os.scandir(os.path.join(root, folder)) as it:
            for e in it:
                rel = f"{folder}/{e.name}" if folder else e.name
                st = e.stat(follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode):
                    folders.append(rel)
                elif stat.S_ISREG(st.st_mode):
                    out.append((rel, st.st_size))
                elif stat.S_ISLNK(st.st_mode) and (real := link_out_of(root, e.path)) is not None:
                    raise NotRegularFile(f"{e.path}: a symbolic link out of the cache (to {real}), never followed")
                else:
                    raise NotRegularFile(f"{e.path}: {kind_of(st.st_mode)}, not a regular file; never read")
    return sorted(out, key=lambda f: PurePosixPath(f[0]).parts)


def dir_bytes(path: str | os.PathLike) -> int:
    """Bytes of a stored shard: a file's size, or the sum over a directory's files."""
    return sum(size for _, size in Location(path).files(""))


def _same_bytes(path: Path, digest: str) -> bool:
    try:
        return group_digest(path)[0] == digest
    except FileNotFoundError:
        return False


def publish_local(tmp: Path, final: Path, digest: str) -> bool:
    """Move a finished temporary group (a directory) or tar to its content-addressed `final`;
    False when the same bytes are there already (this writer yields; its temp is removed).

    A tar replaces whatever holds its name in one atomic rename: the same bytes (another
    writer's; readers see no change) or damage. A directory cannot be swapped atomically,
    and POSIX (and NFS) refuse to rename one onto a non-empty directory, so the first
    writer wins; a group already there with other bytes than its name says is damage: it
    is renamed aside to a name of this writer's, then removed, and these bytes take its place.
    """
    if not tmp.is_dir():
        if _same_bytes(final, digest):
            tmp.unlink()
            return False
        os.replace(tmp, final)
        return True
    for _ in range(4):
        try:
            os.rename(tmp, final)
            return True
        except OSError as e:
            if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
        if _same_bytes(final, digest):
            remove_path(tmp)
            return False
        aside = tmp.with_name(tmp.name + "-damaged")
        try:
            os.rename(final, aside)
        except FileNotFoundError:  # another writer moved it first: try again
            continue
        remove_path(aside)
    raise CacheError(f"{final}: cannot publish the shard: the name keeps changing under this writer")

"""Where a cache lives: a local directory, or an fsspec URL (s3://, gs://, file://, memory://).

Writers only ever write local files. A shard is assembled in a local directory (the cache
itself when it is local, a staging directory when it is a URL) and then published whole;
its manifest entry is written after its bytes, as one small object. Object stores have
no rename and no locks, and a single PUT is atomic on all of them, so "a shard is
complete exactly when its entry exists" holds everywhere without a lock.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path, PurePosixPath
from typing import IO

import fsspec


def is_url(root: str | os.PathLike) -> bool:
    return "://" in str(root)


class Location:
    """A cache root and the file operations the cache needs, local or remote.

    Paths given to the methods are relative to the root, with `/` separators.
    """

    def __init__(self, root: str | os.PathLike):
        self.url = str(root).rstrip("/") if is_url(root) else str(Path(root))
        self.remote = is_url(root)
        self.fs, self.path = fsspec.core.url_to_fs(self.url)

    def __str__(self) -> str:
        return self.url

    def join(self, rel: str) -> str:
        """The URL (or local path) of `rel`, for messages and for zarr / fsspec openers."""
        return f"{self.url}/{rel}" if self.remote else str(Path(self.url) / rel)

    def _full(self, rel: str) -> str:
        return f"{self.path}/{rel}" if rel else self.path

    def exists(self, rel: str) -> bool:
        return self.fs.exists(self._full(rel))

    def read_bytes(self, rel: str) -> bytes:
        return self.fs.cat_file(self._full(rel))

    def read_many(self, rels: list[str]) -> list[bytes]:
        """Several small files at once (concurrent on async stores such as s3 and gcs)."""
        if not rels:
            return []
        got = self.fs.cat([self._full(r) for r in rels])
        return [got[self._full(r)] for r in rels]

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Replace `rel` atomically: a local temp file renamed into place, or one PUT."""
        if self.remote:
            self.fs.makedirs(self._full(rel).rsplit("/", 1)[0], exist_ok=True)  # local-style filesystems need it
            self.fs.pipe_file(self._full(rel), data)
            return
        path = Path(self.url) / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)

    def create_exclusive(self, rel: str, data: bytes) -> bool:
        """Write `rel` unless it exists; True when this call wrote it.

        Local: a hard link of a complete temp file, which fails if the name exists, so the
        first of several racing writers wins and nobody sees a half-written file. Remote:
        check then PUT; racing writers of one command write the same bytes.
        """
        if self.remote:
            if self.exists(rel):
                return False
            self.write_bytes(rel, data)
            return True
        path = Path(self.url) / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def glob(self, pattern: str) -> list[str]:
        """Relative paths matching `pattern` (e.g. "shards/*.json"), sorted."""
        prefix = self.path.rstrip("/") + "/"
        return sorted(p[len(prefix):] if p.startswith(prefix) else p for p in self.fs.glob(self._full(pattern)))

    def remove(self, rel: str) -> None:
        """Delete a file or a directory tree; nothing if absent."""
        full = self._full(rel)
        if self.fs.exists(full):
            self.fs.rm(full, recursive=True)

    def open(self, rel: str, mode: str = "rb") -> IO[bytes]:
        if not self.remote:
            return open(Path(self.url) / rel, mode)
        return self.fs.open(self._full(rel), mode)

    def files(self, rel: str) -> list[tuple[str, int]]:
        """(path relative to `rel`, size) of every file under `rel` (or of `rel` itself, as
        ("", size), when it is a file), in `pathlib` order: by path components."""
        full = self._full(rel)
        if self.fs.isfile(full):
            return [("", int(self.fs.size(full)))]
        found = self.fs.find(full, detail=True)
        out = [(PurePosixPath(p).relative_to(PurePosixPath(full)).as_posix(), int(info["size"]))
               for p, info in found.items() if info.get("type") == "file"]
        return sorted(out, key=lambda f: PurePosixPath(f[0]).parts)

    def publish(self, local: Path, rel: str) -> None:
        """Upload a local file or directory tree to `rel` (replacing what is there)."""
        self.remove(rel)
        local = Path(local)
        pairs = [(local, self._full(rel))] if local.is_file() else [
            (f, self._full(f"{rel}/{f.relative_to(local).as_posix()}")) for f in sorted(local.rglob("*")) if f.is_file()]
        for src, dst in pairs:
            self.fs.makedirs(dst.rsplit("/", 1)[0], exist_ok=True)  # local-style filesystems need it
            self.fs.put_file(str(src), dst)


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

"""An object store, simulated: fsspec's in-memory filesystem with a fixed latency per request.

`LatencyMemoryFileSystem` (protocol `latmem://`, registered on import) keeps its files in a
store of its own and answers what an object store answers, one request at a time:

- each call of `cat_file`, `_open`, `info`, `pipe_file`, `put_file`, `rm_file`, `cp_file`
  is one request (a GET, HEAD, PUT or DELETE); `exists`, `isfile`, `size` go through `info`;
- a listing (`ls`, `find`, and `glob` through it) is one request per page of 1,000 names,
  as S3 and GCS list;
- a request issued inside another (fsspec's `cat_file` opens the file, `exists` calls
  `info`) is not counted again; `mkdir`/`makedirs` cost nothing (object stores have no
  directories);
- every request sleeps `latency` seconds (20 ms by default) in the calling thread, so
  requests issued from several threads overlap as they do against a real store.

Every request is counted (`stats()`: requests, by method, the largest number in flight at
once, and each (method, path) when `record` is on), so tests can hold a reader to the
number of round trips it makes. Listings are answered from a sorted index of the store's
keys, not by scanning the whole store as fsspec's memory filesystem does: its cost must be
the latency, not the size of the bucket (a 1,024-shard cache holds ~400,000 files).
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import math
import os
import threading
import time
from collections import Counter
from pathlib import Path

import fsspec
from fsspec.implementations.memory import MemoryFile, MemoryFileSystem

PROTOCOL = "latmem"
PAGE = 1000  # names per listing request (S3 ListObjectsV2, GCS objects.list)

_local = threading.local()  # depth of nested requests in this thread


def _request(listing: bool = False):
    """Make a method one request (a listing: one per page of results), unless it is called
    from inside another request of this thread."""

    def wrap(method):
        @functools.wraps(method)
        def counted(self, path, *args, **kwargs):
            if getattr(_local, "depth", 0):
                return method(self, path, *args, **kwargs)
            _local.depth, cls, result = 1, type(self), None
            try:
                with cls._in_flight():
                    try:
                        result = method(self, path, *args, **kwargs)
                    finally:  # (a request that fails, e.g. a missing key, costs a round trip too)
                        pages = max(1, math.ceil(len(result) / PAGE)) if listing and result is not None else 1
                        cls._count(method.__name__, path, pages)
                        if cls.latency:
                            time.sleep(cls.latency * pages)
                return result
            finally:
                _local.depth = 0

        return counted

    return wrap


@contextlib.contextmanager
def _free():
    """Calls that an object store answers without a request (directories do not exist)."""
    depth = getattr(_local, "depth", 0)
    _local.depth = depth + 1
    try:
        yield
    finally:
        _local.depth = depth


class LatencyMemoryFileSystem(MemoryFileSystem):
    """fsspec's memory filesystem as an object store: `latency` seconds per request."""

    protocol = PROTOCOL
    store: dict = {}  # its own, not memory://'s
    pseudo_dirs = [""]
    latency = 0.020
    record = False
    _lock = threading.Lock()
    _stats = {"requests": 0, "by_method": Counter(), "in_flight": 0, "peak_in_flight": 0, "log": []}
    _index: list[str] = []
    _indexed_len = -1
    _dirty = True

    # --- accounting ---------------------------------------------------------------------

    @classmethod
    def _count(cls, method: str, path, pages: int) -> None:
        with cls._lock:
            cls._stats["requests"] += pages
            cls._stats["by_method"][method] += pages
            if cls.record:
                cls._stats["log"].append((method, str(path)))

    @classmethod
    @contextlib.contextmanager
    def _in_flight(cls):
        with cls._lock:
            cls._stats["in_flight"] += 1
            cls._stats["peak_in_flight"] = max(cls._stats["peak_in_flight"], cls._stats["in_flight"])
        try:
            yield
        finally:
            with cls._lock:
                cls._stats["in_flight"] -= 1

    @classmethod
    def reset_stats(cls, record: bool = False) -> None:
        with cls._lock:
            cls.record = record
            cls._stats.update(requests=0, by_method=Counter(), peak_in_flight=0, log=[])

    @classmethod
    def stats(cls) -> dict:
        """{requests, by_method, peak_in_flight, log: [(method, path)] when recording}."""
        with cls._lock:
            s = cls._stats
            return {"requests": s["requests"], "by_method": dict(s["by_method"]),
                    "peak_in_flight": s["peak_in_flight"], "log": list(s["log"])}

    @classmethod
    def clear(cls) -> None:
        """Empty the store (every latmem:// URL)."""
        cls.store.clear()
        cls.pseudo_dirs[:] = [""]
        cls._dirty = True

    @classmethod
    def upload_tree(cls, local: str | Path, url: str) -> int:
        """Copy a local directory tree to `url` without requests (setting up the store, not
        measured): returns the files copied."""
        root, fs, n = cls._strip_protocol(url), cls(), 0
        for folder, _, files in os.walk(local):
            rel = Path(folder).relative_to(local).as_posix()
            for f in files:
                name = f"{root}/{f}" if rel == "." else f"{root}/{rel}/{f}"
                cls.store[name] = MemoryFile(fs, name, (Path(folder) / f).read_bytes())
                n += 1
        cls._dirty = True
        return n

    # --- a sorted index of the keys, so that listings cost what the store returns -----------

    @classmethod
    def _strip_protocol(cls, path):
        if isinstance(path, str) and path.startswith(f"{PROTOCOL}://"):
            path = "memory://" + path[len(f"{PROTOCOL}://"):]
        return super()._strip_protocol(path)

    def _keys(self) -> list[str]:
        cls = type(self)
        if cls._dirty or cls._indexed_len != len(cls.store):
            cls._index, cls._indexed_len, cls._dirty = sorted(cls.store), len(cls.store), False
        return cls._index

    def _under(self, prefix: str):
        """Keys starting with `prefix`, in order."""
        keys = self._keys()
        i = bisect.bisect_left(keys, prefix)
        while i < len(keys) and keys[i].startswith(prefix):
            yield keys[i]
            i += 1

    def _is_dir(self, path: str) -> bool:
        if path in ("", "/") or path in self.pseudo_dirs:
            return True
        return next(self._under(path.rstrip("/") + "/"), None) is not None

    def _file_info(self, name: str) -> dict:
        f = self.store[name]
        return {"name": name, "size": f.size, "type": "file", "created": f.created.timestamp()}

    # --- requests -----------------------------------------------------------------------

    @_request()
    def info(self, path, **kwargs):
        path = self._strip_protocol(path)
        if path in self.store:
            return self._file_info(path)
        if self._is_dir(path):
            return {"name": path, "size": 0, "type": "directory"}
        raise FileNotFoundError(path)

    @_request(listing=True)
    def ls(self, path, detail=True, **kwargs):
        path = self._strip_protocol(path)
        if path in self.store:
            return [self._file_info(path)] if detail else [path]
        prefix, keys, out = path.rstrip("/") + "/", self._keys(), []
        i = bisect.bisect_left(keys, prefix)
        while i < len(keys) and keys[i].startswith(prefix):
            rest = keys[i][len(prefix):]
            if "/" in rest:  # a "directory": named once, then skipped over whole
                sub = prefix + rest.split("/", 1)[0]
                out.append({"name": sub, "size": 0, "type": "directory"})
                i = bisect.bisect_left(keys, sub + "0")  # ("0" follows "/")
            else:
                out.append(self._file_info(keys[i]))
                i += 1
        if not out and not self._is_dir(path):
            raise FileNotFoundError(path)
        return out if detail else sorted(f["name"] for f in out)

    @_request(listing=True)
    def find(self, path, maxdepth=None, withdirs=False, detail=False, **kwargs):
        path = self._strip_protocol(path)
        if path in self.store:
            return {path: self._file_info(path)} if detail else [path]
        prefix, keys, out = path.rstrip("/") + "/", self._keys(), {}
        i = bisect.bisect_left(keys, prefix)
        while i < len(keys) and keys[i].startswith(prefix):
            parts = keys[i][len(prefix):].split("/")
            if withdirs:
                for d in range(1, min(len(parts), (maxdepth or len(parts)) + 1)):
                    sub = prefix + "/".join(parts[:d])
                    out.setdefault(sub, {"name": sub, "size": 0, "type": "directory"})
            if maxdepth is not None and len(parts) > maxdepth:  # below the depth asked: skipped whole
                i = bisect.bisect_left(keys, prefix + "/".join(parts[:maxdepth]) + "0")  # ("0" follows "/")
                continue
            out[keys[i]] = self._file_info(keys[i])
            i += 1
        if withdirs and path and self._is_dir(path):
            out[path] = {"name": path, "size": 0, "type": "directory"}
        names = sorted(out)
        return {n: out[n] for n in names} if detail else names

    @_request()
    def _open(self, path, mode="rb", **kwargs):
        name = self._strip_protocol(path)
        if mode == "rb":  # a GET of the whole object (reads from the file then cost nothing)
            if name not in self.store:
                raise FileNotFoundError(name)
            f = self.store[name]
            f.seek(0)
            return f
        type(self)._dirty = True
        return super()._open(path, mode, **kwargs)

    @_request()
    def isfile(self, path):
        return self._strip_protocol(path) in self.store

    @_request()
    def cat_file(self, path, start=None, end=None, **kwargs):
        return super().cat_file(path, start=start, end=end, **kwargs)

    @_request()
    def pipe_file(self, path, value, mode="overwrite", **kwargs):
        type(self)._dirty = True
        return super().pipe_file(path, value, mode=mode, **kwargs)

    @_request()
    def put_file(self, lpath, rpath, **kwargs):
        type(self)._dirty = True
        return super().put_file(lpath, rpath, **kwargs)

    @_request()
    def rm_file(self, path):
        type(self)._dirty = True
        return super().rm_file(path)

    @_request()
    def cp_file(self, path1, path2, **kwargs):
        type(self)._dirty = True
        return super().cp_file(path1, path2, **kwargs)

    def mkdir(self, path, create_parents=True, **kwargs):
        with _free():
            return super().mkdir(path, create_parents=create_parents, **kwargs)

    def makedirs(self, path, exist_ok=False):
        with _free():
            return super().makedirs(path, exist_ok=exist_ok)


fsspec.register_implementation(PROTOCOL, LatencyMemoryFileSystem, clobber=True)

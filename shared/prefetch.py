"""Work done ahead of its reader, in threads: the next shards opened while one is read, a
stream read ahead in blocks, a cache's next block of rows fetched before it is asked for.

On an object store each new shard a loader worker opens costs round trips (the cache's
file list, its metadata, the first chunks, the tar's first bytes) before its first sample:
about as long as reading the shard itself at ImageNet scale. Done in a thread while the
worker still reads the shard before, the wait disappears. Nothing here changes what is
read or its order: a result is handed over only when its reader reaches it, and an error
raised ahead is raised where the reader would have met it (`opened_ahead`).

Threads, not processes: the work waits on round trips (the GIL is released), and a
DataLoader worker keeps one core for its decoding. Pools are made per process (a pool
forked into a DataLoader worker has no threads).
"""

from __future__ import annotations

import os
import queue
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")
R = TypeVar("R")

_pools: dict[tuple[int, str], ThreadPoolExecutor] = {}
_lock = threading.Lock()


def background(name: str, threads: int = 2) -> ThreadPoolExecutor:
    """This process's pool `name` (made at its first use in the process)."""
    key = (os.getpid(), name)
    with _lock:
        pool = _pools.get(key)
        if pool is None:
            pool = _pools[key] = ThreadPoolExecutor(threads, thread_name_prefix=f"mrmae-{name}")
        return pool


def opened_ahead(items: Iterable[T], open_fn: Callable[[T], R], depth: int,
                 close: Callable[[R], None] | None = None) -> Iterator[tuple[T, Future]]:
    """(item, future of open_fn(item)) in the order of `items`, with the next `depth` items
    already being opened while the caller works on one (depth 0: opened when reached, in
    the caller's thread). The caller takes `future.result()`: an opening's error is raised
    there, when the caller reaches its item, as without prefetch. When the caller stops
    early, what was opened ahead and not handed over is given to `close`."""
    it = iter(items)
    if depth <= 0:
        for item in it:
            done: Future = Future()
            try:
                done.set_result(open_fn(item))
            except BaseException as e:  # (raised by result(), where the caller takes it)
                done.set_exception(e)
            yield item, done
        return
    pool = ThreadPoolExecutor(depth, thread_name_prefix="mrmae-open")
    pending: deque[tuple[T, Future]] = deque()
    try:
        for item in it:
            pending.append((item, pool.submit(open_fn, item)))
            if len(pending) > depth:
                yield pending.popleft()
        while pending:
            yield pending.popleft()
    finally:
        for _, future in pending:  # opened ahead, never handed over (the caller stopped early)
            if not future.cancel() and close is not None:
                future.add_done_callback(lambda f: f.exception() is None and close(f.result()))
        pool.shutdown(wait=False)


class ReadAhead:
    """A binary stream read ahead in a thread, `block` bytes at a time, at most `depth`
    blocks waiting: the round trips of a remote or piped source overlap with the reader's
    work. `read` returns what the source gave, in order; the source's error is raised by
    the `read` that reaches it. `close` stops the thread and closes the source."""

    def __init__(self, stream, block: int = 1 << 20, depth: int = 8):
        self.stream, self.block = stream, block
        self._queue: queue.Queue = queue.Queue(depth)
        self._buffer, self._offset, self._ended = b"", 0, False  # (the block being read, and where)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, name="mrmae-read-ahead", daemon=True)
        self._thread.start()

    def _fill(self) -> None:
        try:
            while not self._stop.is_set():
                data = self.stream.read(self.block)
                self._put(data)
                if not data:
                    return
        except BaseException as e:  # handed to the reader, raised by its read
            self._put(e)

    def _put(self, item) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def _next(self) -> bool:
        """Take the next block; False at the end of the source."""
        if self._ended:
            return False
        item = self._queue.get()
        if isinstance(item, BaseException):
            self._ended = True
            raise item
        if not item:
            self._ended = True
            return False
        self._buffer, self._offset = item, 0
        return True

    def read(self, n: int = -1) -> bytes:
        parts, want = [], n
        while want != 0:
            if self._offset >= len(self._buffer) and not self._next():
                break
            left = len(self._buffer) - self._offset
            take = left if want < 0 else min(want, left)
            parts.append(self._buffer[self._offset:self._offset + take])  # (a whole block: not copied)
            self._offset += take
            want = want - take if want > 0 else want
        return b"".join(parts) if len(parts) != 1 else parts[0]

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.stream.close()

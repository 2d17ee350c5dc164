"""The DataLoader every training and evaluation command reads through, and the passes of an
epoch over it, grouped into optimiser steps for the loop."""

from __future__ import annotations

import itertools
from typing import Iterable, Iterator, TypeVar

import torch

T = TypeVar("T")


class InterruptibleLoader(torch.utils.data.DataLoader):
    """A DataLoader whose worker start-up Ctrl-C cannot cut. While `iter()` forks the
    workers, SIGINT is blocked (the workers inherit the mask and, with
    `worker_ignores_interrupt`, discard it) and a SIGINT the main process had already
    received is only noted; it is raised once the iterator is whole, where torch can stop
    its workers. Unguarded, a SIGINT landing in the fork killed a half-started worker (a
    traceback), broke the iterator half-built, or was swallowed by an at-fork handler (the
    run went on)."""

    def __iter__(self):
        import signal
        import threading

        if self.num_workers == 0 or threading.current_thread() is not threading.main_thread():
            return super().__iter__()
        noted: list[int] = []
        previous = signal.signal(signal.SIGINT, lambda signum, frame: noted.append(signum))
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            batches = super().__iter__()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)
        if noted:
            del batches  # a whole iterator: its workers are stopped
            raise KeyboardInterrupt
        return batches


def epoch_passes(stream, loader: Iterable[T], epoch: int, empty: Exception) -> Iterator[T]:
    """This rank's items for `epoch`: `stream.set_epoch(epoch, repeat)`, then the loader,
    again with the next `repeat` when its shards run out (ranks with fewer samples keep up
    with the others' step count); `empty` is raised when a pass yields nothing at all."""
    for repeat in itertools.count():
        stream.set_epoch(epoch, repeat)
        got = False
        for item in loader:
            got = True
            yield item
        if not got:
            raise empty


def grouped(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """Items -> consecutive lists of `size` (micro-batches -> one optimiser step's); a
    trailing incomplete list is dropped (it would not step the optimiser)."""
    items = iter(items)
    while len(group := list(itertools.islice(items, size))) == size:
        yield group

"""Errors both stages raise for the command line to print as one line.

Exit status: 2 for usage (`OptionError`, click's usage errors), 1 for data and runtime
errors (every other `MrmaeError`, an OSError), 130 for Ctrl-C.

`OptionError`: an option (or a combination) that cannot work, found before anything is
written; `OptionChecks` gathers a command's so that all of them are reported together. `naming(path)`: writes that fail (a full disk, a read-only or forbidden path)
raise an OSError carrying the path, which the bare write() error (ENOSPC on a file that
opened fine) does not. `one_line(exc)`: the message of an error re-raised by a DataLoader
worker, without the worker's traceback that torch folds into it.
"""

from __future__ import annotations

import contextlib
import os
import re
from typing import Callable, Iterator


class MrmaeError(Exception):
    """Base of the errors the command line prints as one line, with exit status
    `exit_code`: input that cannot work, a cache, checkpoint or teacher that does not fit.
    The CLI catches this class (and OSError) without importing the modules that raise them."""

    exit_code = 1

    @property
    def lines(self) -> list[str]:
        """What the command line prints, a line each (one, but for `OptionErrors`)."""
        return [one_line(self)]


class OptionError(MrmaeError, ValueError):
    """An option value or combination that cannot work; the message names the option."""

    exit_code = 2


class OptionErrors(OptionError):
    """Several OptionErrors of one command, reported together (a line each)."""

    def __init__(self, messages: list[str]) -> None:
        super().__init__("; ".join(messages))
        self.messages = list(messages)

    @property
    def lines(self) -> list[str]:
        return self.messages


class OptionChecks:
    """Runs a command's option checks and reports every failure at once, not the first only:
    `checks.run(check, *args)` for each, then `checks.done()` raises an OptionErrors with all
    of their messages (a user with three mistakes fixes them in one go)."""

    def __init__(self) -> None:
        self.messages: list[str] = []

    def run(self, check: Callable[..., object], *args, **kwargs) -> None:
        try:
            check(*args, **kwargs)
        except OptionError as e:
            self.messages.extend(e.lines)

    def fail(self, message: str) -> None:
        self.messages.append(message)

    def done(self) -> None:
        if len(self.messages) == 1:
            raise OptionError(self.messages[0])
        if self.messages:
            raise OptionErrors(self.messages)


@contextlib.contextmanager
def naming(path: str | os.PathLike) -> Iterator[None]:
    """Re-raise an OSError without a file name (e.g. ENOSPC from write()) as one naming `path`."""
    try:
        yield
    except OSError as e:
        if e.filename is not None or e.errno is None:
            raise
        raise type(e)(e.errno, e.strerror, str(path)) from e


# torch.utils.data._utils.ExceptionWrapper.reraise: "Caught {Type} in DataLoader worker
# process {n}.\nOriginal Traceback (most recent call last):\n  frames...\n{Type}: {message}"
_WORKER = re.compile(r"^Caught \w+ in DataLoader worker process \d+\.\nOriginal Traceback", re.S)
_EXC_LINE = re.compile(r"^[A-Za-z_][\w.]*(: |$)")


def worker_message(text: str) -> str | None:
    """The original message inside torch's re-raised worker error text, or None if `text` is
    not one. The last unindented lines after the last traceback are the final exception."""
    if not _WORKER.match(text):
        return None
    tail = text.rsplit("Traceback (most recent call last):\n", 1)[-1].splitlines()
    i = 0
    while i < len(tail) and (tail[i].startswith(" ") or not tail[i]):  # the frames, indented
        i += 1
    final = "\n".join(tail[i:]).strip()
    m = _EXC_LINE.match(final)
    return final[m.end():].strip() if m else final


def one_line(exc: BaseException) -> str:
    """`exc` as the one line the CLI prints: an OSError as 'PATH: reason', a DataLoader
    worker's error as its original message, anything else as its message's first line."""
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        other = f" -> {exc.filename2}" if exc.filename2 is not None else ""
        return f"{exc.filename}{other}: {exc.strerror}"
    text = str(exc.args[0]) if len(exc.args) == 1 else str(exc)
    text = worker_message(text) or text
    return text.strip().splitlines()[0] if text.strip() else type(exc).__name__


def worker_ignores_interrupt(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: Ctrl-C reaches the whole process group, and a worker
    that dies of it before the main process sees its own KeyboardInterrupt makes torch
    raise "DataLoader worker exited unexpectedly" with a traceback instead. Workers ignore
    SIGINT (one that arrived while the loader forked them, blocked then, is discarded); the
    main process stops them when it ends."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def unknown_name(option: str, name: str, known, hint: str = "") -> str:
    """The line for a name `option` does not know: the closest known names first ("did you
    mean"), then all of them when they are few, else where to find them (`hint`)."""
    import difflib

    known = list(known)
    score = {k: difflib.SequenceMatcher(None, name, k).ratio() for k in known}
    near = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    near = [k for k in near if score[k] >= score[near[0]] - 0.03]  # the best, and any as close
    text = f"{option} {name}: unknown" if option else f"{name}: unknown"
    if near:
        text += f"; did you mean {' or '.join(near)}?"
    if len(known) <= 12:
        text += f" (known: {', '.join(known)})"
    elif hint:
        text += f" ({hint})"
    return text

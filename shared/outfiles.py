"""Writing a command's outputs: never through a symbolic link, never half-written.

A run directory, an export's or a report's folder may hold a link planted where an output
goes (`OUT/model.safetensors -> ~/.bashrc`): opening it for writing would write through
it, and renaming over it would silently drop what the user linked. Every output file is
checked with lstat first (a link there is one error naming it) and written to a temporary
beside it created with O_EXCL | O_NOFOLLOW (so no link, planted or racing, is followed
even there), then renamed into place whole; appended files (metrics.jsonl) are opened with
O_NOFOLLOW. An OSError (a full disk, a read-only folder) names the output's path.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from pathlib import Path
from typing import IO, Iterator

from .errors import MrmaeError

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


class OutputLinkError(MrmaeError):
    """An output path that is a symbolic link (or another non-regular file): never written."""


def refuse_link(path: str | os.PathLike) -> None:
    """OutputLinkError naming `path` when it is a symbolic link, a FIFO, a device or a
    directory; nothing when it is absent or a regular file (which is replaced)."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if stat.S_ISLNK(mode):
        raise OutputLinkError(f"{path}: a symbolic link where an output goes; mrmae never writes through (nor over) "
                              "one: remove it, or give another output directory")
    if not stat.S_ISREG(mode):
        raise OutputLinkError(f"{path}: not a regular file where an output goes; remove it, or give another "
                              "output directory")


@contextlib.contextmanager
def _named(path: Path) -> Iterator[None]:
    try:
        yield
    except OSError as e:
        if isinstance(e, OutputLinkError) or e.errno is None:
            raise
        raise type(e)(e.errno, e.strerror, str(path)) from e


@contextlib.contextmanager
def new_temp(final: str | os.PathLike, mode: str = "wb") -> Iterator[tuple[Path, IO]]:
    """(temporary path, its file open for writing) beside `final`, created anew (O_EXCL |
    O_NOFOLLOW), renamed onto `final` when the block ends without error, removed otherwise.
    `final` must not be a link (`refuse_link`)."""
    final = Path(final)
    refuse_link(final)
    tmp = final.with_name(f".{final.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    with _named(final):
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o644)
    try:
        with _named(final), os.fdopen(fd, mode, **({} if "b" in mode else {"newline": ""})) as f:
            yield tmp, f
        with _named(final):
            refuse_link(final)  # (planted while this was written)
            os.replace(tmp, final)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def write_file(path: str | os.PathLike, data: bytes | str) -> None:
    """Write `data` to `path` whole or not at all, never through a link (module doc)."""
    with new_temp(path, "wb" if isinstance(data, bytes) else "w") as (_, f):
        f.write(data)


def open_append(path: str | os.PathLike) -> IO[str]:
    """`path` opened for appending text (created if absent), never through a link."""
    refuse_link(path)
    with _named(Path(path)):
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | _NOFOLLOW, 0o644)
    return os.fdopen(fd, "a")

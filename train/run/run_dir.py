"""A training run's `--out`: never overwritten, set aside only when asked.

A directory holds a run when it has a `config.json`, a `metrics.jsonl` or a `checkpoints/`.
`pretrain` and `finetune` given such an `--out` need `--resume` (continue it) or
`--overwrite` (start anew; the old run is renamed to `OUT.old-YYYYmmdd-HHMMSS`, never
deleted); otherwise one line names the run and both options. `mrmae export` treats an
`--out` holding `model.safetensors` the same way.

The check runs with the other option checks, before anything is built or written; the
old run is set aside only once every check passed, by the main process, while it holds the
old run's lock (a run still training there is not moved from under it).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from mrmae.shared.errors import MrmaeError, OptionError, naming
from mrmae.shared.outfiles import refuse_link

RUN_FILES = ("config.json", "metrics.jsonl", "checkpoints")
EXPORT_FILES = ("model.safetensors", "config.json")  # what `mrmae export` writes into its --out


def holds_run(out: str | Path, files: tuple[str, ...] = RUN_FILES) -> bool:
    """Whether `out` holds any of a run's `files` (links and special files count: never written through)."""
    return any(os.path.lexists(Path(out) / f) for f in files)


def check_out(out: str | Path, resume: bool, overwrite: bool, files: tuple[str, ...] = RUN_FILES,
              what: str = "a run") -> None:
    """OptionError unless `out` may be written: it holds no run, or `resume` continues it,
    or `overwrite` sets it aside. Checked by the main process only (process rank 0): the
    others would otherwise race with the run the main process starts in `out`."""
    from mrmae.shared.launch import process_rank

    if resume and overwrite:
        raise OptionError("--resume continues the run in --out, --overwrite sets it aside and starts anew: give one")
    if process_rank()[0] != 0 or resume or overwrite:
        return
    if os.path.lexists(out) and not os.path.isdir(out):
        raise OptionError(f"--out {out}: is a file, not a directory")
    for name in files:  # a link planted where an output goes: said as such (outfiles), not as a run
        if name != "checkpoints":
            refuse_link(Path(out) / name)
    if holds_run(out, files) and files == RUN_FILES:
        raise OptionError(f"--out {out}: holds {what} already; give --resume to continue it or --overwrite to "
                          "set it aside (renamed, never deleted) and start anew")
    if holds_run(out, files):
        raise OptionError(f"--out {out}: holds {what} already; give --overwrite to set it aside (renamed, never "
                          "deleted) and write anew")


def set_aside(out: str | Path, files: tuple[str, ...] = RUN_FILES) -> Path | None:
    """Rename the run in `out` to `OUT.old-YYYYmmdd-HHMMSS` (a free name beside it) and
    return that path; None when `out` holds no run. A run still training in `out` (it holds
    the directory's flock, `checkpoint.hold_run`) is refused, not moved."""
    import fcntl

    out = Path(out)
    if not holds_run(out, files):
        return None
    fd = os.open(out, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise MrmaeError(f"--overwrite {out}: a run is training into it (it holds its lock); stop it first or "
                             "give another --out") from None
        except OSError:  # no flock on this file system: nothing tells a live run apart
            pass
        stamp = time.strftime("%Y%m%d-%H%M%S")
        aside = out.with_name(f"{out.name}.old-{stamp}")
        n = 1
        while os.path.lexists(aside):
            n += 1
            aside = out.with_name(f"{out.name}.old-{stamp}-{n}")
        with naming(out):
            os.rename(out, aside)
    finally:
        os.close(fd)
    return aside

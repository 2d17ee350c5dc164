"""JSON-lines records: the one writer of RUN/metrics.jsonl (training) and of the eval.jsonl
files `mrmae eval` appends to, and the cut a resumed run makes.

Kept free of torch and of the training modules: `checkpoint.py` truncates a run's metrics
on resume, the loop and `evaluate.py` append, and none of them should import another's
machinery to write a line.
"""

from __future__ import annotations

import json
from pathlib import Path

from mrmae.shared.errors import naming
from mrmae.shared.outfiles import open_append, refuse_link, write_file


def append_record(path: str | Path, record: dict) -> None:
    """Append `record` as one JSON line to `path` (its folder made if missing); an OSError
    (a full disk, a read-only folder) names the file."""
    path = Path(path)
    with naming(path.parent):
        path.parent.mkdir(parents=True, exist_ok=True)
    with naming(path), open_append(path) as f:  # (never through a link planted there)
        f.write(json.dumps(record) + "\n")


def truncate_records(path: Path, last_step: int) -> None:
    """Drop records past `last_step` (a resumed run recomputes them), and lines that are no
    record: the torn last line of a run killed while appending one (or other damage)."""
    if not path.exists():
        return
    refuse_link(path)
    with naming(path):
        text = path.read_text(errors="replace")
    kept = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
            step = record["step"]
        except (ValueError, TypeError, KeyError):
            continue
        if isinstance(step, int) and step <= last_step:
            kept.append(line)
    write_file(path, "".join(ln + "\n" for ln in kept))

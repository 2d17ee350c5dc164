"""A run's records, each a dataclass written and read here only:

- RUN/config.json (`RunConfig`): the command's options and what the run resolved (the lr,
  steps, provenance, ...), one JSON object, written once when a run starts
  (`write_run_config`); readers take the fields they need as typed attributes;
- RUN/metrics.jsonl (`StepRecord`, `ValidationRecord`; read back as `MetricsLine`): one
  line per optimiser step, and for fine-tuning one per evaluated epoch;
- eval.jsonl (`EvalRecord`): one line per `mrmae eval` result, appended.

The JSON on disk is what earlier versions wrote, key for key, so old runs read. Reading
is defensive (runs are files anyone may have edited, cut short or planted): a file or
line that is not a JSON object, a key of a wrong type, a non-finite number or a line over
`LINE_LIMIT` bytes is a `RecordError` naming the file, the line and the key; a truncated
last line of a jsonl file (a run killed while appending it) is skipped with a warning.

Kept free of torch and of the training modules: the loop, `checkpoint.py` (which cuts a
resumed run's metrics), `evaluate.py`, `report`, `visualize`, `restore` and `export` all
import it, and none of them another's machinery to read or write a record.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Iterator

from mrmae.shared.errors import MrmaeError, naming
from mrmae.shared.outfiles import open_append, refuse_link, write_file

CONFIG, METRICS, EVALS = "config.json", "metrics.jsonl", "eval.jsonl"
LINE_LIMIT = 1 << 20  # bytes; a metrics record is ~200: a longer line is damage, not a record
CONFIG_LIMIT = 16 << 20  # bytes; a resolved config is a few KiB


class RecordError(MrmaeError, ValueError):
    """A run file that is not what a run writes; names the file (and line and key) (exit 1)."""


# --- fields, checked ---------------------------------------------------------------------------


def finite(record: dict, key: str, where: str) -> float | None:
    """record[key] as a float (None when absent); RecordError naming `where` and the key
    unless it is a finite number (bools are not numbers here)."""
    value = record.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RecordError(f"{where}: key {key} is {value!r}, not a finite number")
    return float(value)


def integer(record: dict, key: str, where: str) -> int | None:
    """record[key] as an int from 0 (None when absent), else RecordError naming `where` and the key."""
    value = record.get(key)
    if value is None:
        return None
    if type(value) is not int or value < 0:
        raise RecordError(f"{where}: key {key} is {value!r}, not a count (an integer from 0)")
    return value


def text(record: dict, key: str, where: str) -> str | None:
    """record[key] as a string (None when absent or null), else RecordError naming the key."""
    value = record.get(key)
    if value is not None and not isinstance(value, str):
        raise RecordError(f"{where}: key {key} is {value!r}, not a string")
    return value


def mapping(record: dict, key: str, where: str) -> dict | None:
    """record[key] as a JSON object (None when absent or null), else RecordError naming the key."""
    value = record.get(key)
    if value is not None and not isinstance(value, dict):
        raise RecordError(f"{where}: key {key} is {value!r}, not an object")
    return value


def strings(record: dict, key: str) -> tuple[str, ...]:
    """The strings of the list record[key] (notes: anything else in it, or no list, is ignored)."""
    value = record.get(key)
    return tuple(v for v in value if isinstance(v, str)) if isinstance(value, list) else ()


# --- files -------------------------------------------------------------------------------------


def read_json_object(f: Path, what: str, error: type[MrmaeError] = RecordError) -> dict:
    """A JSON object from file `f` (a run's config.json, a checkpoint's state.json, an export's
    config.json); `error` (RecordError, or the reader's own class) naming the file, as `what`
    it is not, when unreadable, too deeply nested or no object."""
    try:
        obj = json.loads(f.read_text())
    except (OSError, ValueError) as e:  # (UnicodeDecodeError is a ValueError)
        raise error(f"{f}: not {what} ({type(e).__name__}: {e})") from None
    except RecursionError:  # json's parser on "[[[[..."
        raise error(f"{f}: not {what} (nested too deeply)") from None
    if not isinstance(obj, dict):
        raise error(f"{f}: not {what} (a JSON object)")
    return obj


def read_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) of each JSON-object line of `path`, read line by line. Blank lines
    are skipped; a last line without its newline that does not parse (a kill mid-append) is
    skipped with a warning; any other bad line raises RecordError naming file and line."""
    with naming(path), open(path, "rb") as f:
        for number, line in enumerate(_lines(f, path), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)  # ValueError (UnicodeDecodeError, JSONDecodeError) for garbage
                if not isinstance(obj, dict):
                    raise ValueError(f"a JSON {type(obj).__name__}")
            except (ValueError, RecursionError) as e:  # RecursionError: nested too deeply to be a record
                if not line.endswith(b"\n"):  # only the last line can lack its newline
                    warnings.warn(f"{path} line {number}: truncated last line skipped (a run killed while "
                                  "writing it?)")
                    return
                raise RecordError(f"{path} line {number}: not a JSON object ({e})") from None
            yield number, obj


def _lines(f: IO[bytes], path: Path) -> Iterator[bytes]:
    number = 0
    while line := f.readline(LINE_LIMIT + 1):
        number += 1
        if len(line) > LINE_LIMIT:
            raise RecordError(f"{path} line {number}: longer than {LINE_LIMIT} bytes, not a record")
        yield line


def _append(path: str | Path, record: dict) -> None:
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
        text_ = path.read_text(errors="replace")
    kept = []
    for line in text_.splitlines():
        try:
            record = json.loads(line)
            step = record["step"]
        except (ValueError, TypeError, KeyError):
            continue
        if isinstance(step, int) and step <= last_step:
            kept.append(line)
    write_file(path, "".join(ln + "\n" for ln in kept))


# --- config.json -------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepOptionsRecord:
    """config.json `step_options`: how a pretraining step masked and weighed its losses."""

    mask: str | None = None
    mask_ratio: float | None = None
    mask_options: dict = field(default_factory=dict)  # as recorded; read each with `mask_option`
    recon_weight: float | None = None
    mimic_weight: float | None = None
    high_level_at: str | None = None  # "encoder" (L_M) or "decoder" (table 3 row 5)
    target_norm: str | None = None
    where: str = ""  # the file and key, for errors

    @classmethod
    def from_json(cls, opts: dict, where: str) -> StepOptionsRecord:
        where = f"{where} step_options"
        # runs from before the mask registry recorded focused masking's options in step_options itself
        options = opts.get("mask_options", opts)
        if not isinstance(options, dict):
            raise RecordError(f"{where}: key mask_options is {options!r}, not an object")
        return cls(text(opts, "mask", where), finite(opts, "mask_ratio", where), options,
                   finite(opts, "recon_weight", where), finite(opts, "mimic_weight", where),
                   text(opts, "high_level_at", where), text(opts, "target_norm", where), where)

    def mask_option(self, name: str) -> float | None:
        """A recorded option of the mask strategy (None when not recorded), a finite number."""
        return finite(self.mask_options, name, self.where)


@dataclass(frozen=True)
class RunConfig:
    """What the readers of a run take from its config.json (a pretraining run records no
    `task`). Absent keys are None (or empty): old runs recorded fewer."""

    path: Path
    task: str = "pretrain"
    model: str | None = None  # the student's registry name
    epochs: int | None = None  # planned
    workers: int | None = None
    fuse_layers: tuple[int, ...] | None = None  # None: not recorded
    feature_cache: str | None = None
    teacher: str | None = None  # a live teacher's spec
    target: str | None = None  # the cache's teachers mimicked ("main", an added one, several)
    pca_ranks: tuple[int, ...] = ()  # low-rank targets: the rank of each
    step: StepOptionsRecord = field(default_factory=StepOptionsRecord)
    model_config: Any = None  # the family's recorded config overrides (its `restored_config` reads them)
    timm_model: str | None = None  # fine-tuning: the classifier's timm model and kwargs
    timm_kwargs: dict | None = None
    checkpoint: str | None = None  # fine-tuning: what it started from
    notes: tuple[str, ...] = ()  # fine-tuning: notes on its labels

    @classmethod
    def from_json(cls, cfg: dict, path: Path) -> RunConfig:
        where = str(path)
        layers = cfg.get("fuse_layers")
        if layers is not None and not (isinstance(layers, list) and all(type(b) is int and 0 < b < 10_000
                                                                        for b in layers)):
            raise RecordError(f"{where}: key fuse_layers is {str(layers)[:80]!r}, not a list of block numbers")
        pca = cfg.get("target_pca") if isinstance(cfg.get("target_pca"), list) else []
        step = mapping(cfg, "step_options", where) or {}
        return cls(path, text(cfg, "task", where) or "pretrain", text(cfg, "model", where),
                   integer(cfg, "epochs", where), integer(cfg, "workers", where),
                   None if layers is None else tuple(layers), text(cfg, "feature_cache", where),
                   text(cfg, "teacher", where), text(cfg, "target", where),
                   tuple(p["rank"] for p in pca if isinstance(p, dict) and type(p.get("rank")) is int),
                   StepOptionsRecord.from_json(step, where), cfg.get("model_config"),
                   text(cfg, "timm_model", where), mapping(cfg, "timm_kwargs", where),
                   text(cfg, "checkpoint", where), strings(cfg, "notes"))


def read_run_config(run_dir: Path) -> RunConfig:
    """RUN/config.json as a RunConfig; RecordError naming the file when it is none."""
    path = Path(run_dir) / CONFIG
    with naming(path):
        if path.stat().st_size > CONFIG_LIMIT:
            raise RecordError(f"{path}: larger than {CONFIG_LIMIT} bytes, not a run config")
    return RunConfig.from_json(read_json_object(path, "a run config"), path)


@dataclass(frozen=True)
class Resolved:
    """What a run resolved from its options, recorded beside them in config.json."""

    lr: float  # the peak lr
    lr_rule: str  # "--lr", or "--blr B x E / 256"
    effective_batch: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    num_processes: int
    provenance: dict  # versions, revision, command line, host, devices (shared/provenance.py)
    mask_seeding: int | None = None  # pretraining only (micro_batch.MASK_SEEDING)


def write_run_config(out: Path, options: dict, resolved: Resolved) -> None:
    """OUT/config.json: the command's `options` (its config dataclass and what it added) and
    `resolved`, one object (the keys of `resolved` after the options'; `mask_seeding` only
    where there is one)."""
    record = {**options, **{k: v for k, v in resolved.__dict__.items() if k != "mask_seeding"}}
    if resolved.mask_seeding is not None:
        record["mask_seeding"] = resolved.mask_seeding
    path = Path(out) / CONFIG
    with naming(path):
        write_file(path, json.dumps(record, indent=1, default=str) + "\n")


# --- metrics.jsonl -----------------------------------------------------------------------------


@dataclass(frozen=True)
class StepRecord:
    """One optimiser step: epoch, step (done, 1-based), lr, each loss of the step function
    (`loss`, the one backpropagated, and its parts: `loss_recon`, `loss_mimic`, ...) as the
    mean over the step's micro-batches and processes, and images_per_s."""

    epoch: int
    step: int
    lr: float
    losses: dict[str, float]
    images_per_s: float

    def to_json(self) -> dict:
        return {"epoch": self.epoch, "step": self.step, "lr": self.lr, **self.losses,
                "images_per_s": self.images_per_s}


@dataclass(frozen=True)
class ValImages:
    """The validation images an accuracy is over: `n` used, of `present` in the tars (some
    skipped), of `classes` classes (None where a record from before counted none)."""

    n: int
    present: int | None = None
    classes: int | None = None

    def __str__(self) -> str:
        shown = str(self.n) if self.present is None or self.present == self.n else f"{self.n} of {self.present}"
        return shown + (f", {self.classes} classes" if self.classes is not None else "")

    @classmethod
    def from_json(cls, r: dict, where: str) -> ValImages | None:
        n = integer(r, "n_val", where)
        return None if n is None else cls(n, integer(r, "n_val_present", where), integer(r, "classes_val", where))


@dataclass(frozen=True)
class ValidationRecord:
    """A fine-tuning epoch's evaluation on --val-shards (metrics.jsonl, after its steps)."""

    epoch: int
    step: int
    train_loss: float  # the epoch's mean training loss
    top1: float
    top5: float
    val_loss: float
    n_val: int
    n_val_present: int
    classes_val: int
    val_skipped: dict  # skipped samples per reason

    def to_json(self) -> dict:
        return dict(self.__dict__)


@dataclass(frozen=True)
class MetricsLine:
    """A metrics.jsonl line as read back: a step's (`losses`) or an evaluated epoch's
    (`top1`...); absent keys None."""

    epoch: int | None
    step: int | None
    losses: dict[str, float]  # every key that starts with "loss", checked finite
    top1: float | None = None
    top5: float | None = None
    train_loss: float | None = None
    val_loss: float | None = None
    images: ValImages | None = None

    @classmethod
    def from_json(cls, r: dict, where: str) -> MetricsLine:
        losses = {k: finite(r, k, where) for k in r if k.startswith("loss")}
        return cls(integer(r, "epoch", where), integer(r, "step", where),
                   {k: v for k, v in losses.items() if v is not None}, finite(r, "top1", where),
                   finite(r, "top5", where), finite(r, "train_loss", where), finite(r, "val_loss", where),
                   ValImages.from_json(r, where))


def read_metrics(path: Path) -> Iterator[MetricsLine]:
    """Each line of a metrics.jsonl (`read_jsonl`'s rules), checked."""
    for line, r in read_jsonl(path):
        yield MetricsLine.from_json(r, f"{path} line {line}")


def append_metrics(path: Path, record: StepRecord | ValidationRecord) -> None:
    _append(path, record.to_json())


# --- eval.jsonl --------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemberResult:
    """One model of an ensemble: its checkpoint, feature, fusion and own accuracy."""

    checkpoint: str
    feature: str
    fused: bool
    top1: float
    top5: float


@dataclass(frozen=True)
class EvalRecord:
    """One `mrmae eval` result (an eval.jsonl line). `feature` and `checkpoint` are lists for
    an ensemble of members with different ones; `settings` the protocol's (k, temperature;
    or epochs, lr, batch_size, seed). Read back (`read_evals`), absent keys are None/empty:
    only protocol, feature and top1 are required of a line."""

    protocol: str
    feature: str | list[str]
    top1: float
    top5: float | None = None
    fused: bool = False
    checkpoint: str | list[str] | None = None
    train_shards: str | None = None
    val_shards: str | None = None
    counts: dict = field(default_factory=dict)  # n_train, n_val, n_*_present, classes_*, skipped, skipped_examples
    num_classes: int | None = None
    labels: dict | None = None
    notes: tuple[str, ...] = ()
    settings: dict = field(default_factory=dict)
    members: tuple[MemberResult, ...] = ()
    seconds: float | None = None

    @property
    def feature_name(self) -> str:
        return self.feature if isinstance(self.feature, str) else "/".join(self.feature)

    @property
    def images(self) -> ValImages | None:
        return ValImages.from_json(self.counts, "eval record")

    def to_json(self) -> dict:
        record = {"protocol": self.protocol, "feature": self.feature, "fused": self.fused,
                  "checkpoint": self.checkpoint, "train_shards": self.train_shards, "val_shards": self.val_shards,
                  **self.counts, "num_classes": self.num_classes, "labels": self.labels, "notes": list(self.notes),
                  **self.settings}
        if self.members:
            record["members"] = [m.__dict__ for m in self.members]
        return {**record, "top1": self.top1, "top5": self.top5, "seconds": self.seconds}

    @classmethod
    def from_json(cls, r: dict, where: str) -> EvalRecord:
        protocol, feature = r.get("protocol"), r.get("feature")
        if isinstance(feature, list) and feature and all(isinstance(f, str) for f in feature):
            feature = list(feature)  # an ensemble of members with other features
        elif not isinstance(feature, str):
            feature = None
        if not isinstance(protocol, str) or feature is None:
            raise RecordError(f"{where}: no protocol and feature (not a line `mrmae eval` writes)")
        top1 = finite(r, "top1", where)
        if top1 is None:
            raise RecordError(f"{where}: no top1 (not a line `mrmae eval` writes)")
        counts = {k: integer(r, k, where) for k in ("n_val", "n_val_present", "classes_val") if k in r}
        members = r.get("members") if isinstance(r.get("members"), list) else []
        return cls(protocol, feature, top1, finite(r, "top5", where), counts=counts, notes=strings(r, "notes"),
                   members=tuple(MemberResult(str(m.get("checkpoint")), str(m.get("feature")),
                                              bool(m.get("fused")), math.nan, math.nan)
                                 for m in members if isinstance(m, dict)))


def append_eval(path: Path, record: EvalRecord) -> None:
    _append(path, record.to_json())


def read_evals(path: Path) -> Iterator[EvalRecord]:
    """Each line of an eval.jsonl (`read_jsonl`'s rules), checked."""
    for line, r in read_jsonl(path):
        yield EvalRecord.from_json(r, f"{path} line {line}")

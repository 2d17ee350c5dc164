"""Labelled samples: the one reader of a sample's class, for `mrmae finetune` and every
`mrmae eval` protocol, and the count of what was used and what was not.

Label formats (`--label-format`; `auto`, the default, looks at the first training tar's
samples until one has a `.cls` or a `.json` member, prefers `.cls`, and the run records
what it found):

    cls     {key}.cls: a decimal integer, as in ImageNet's WebDataset shards
    json    {key}.json: a JSON object whose `--label-field` (default `label`) is an integer
            (or a string of one)

With `--class-map FILE` the value is a class name instead (the `.cls` text, or the JSON
field's string), stripped of surrounding white space and mapped to its index by FILE:

    FILE.json   an object {"name": index, ...}, or a list of names (index = position)
    any other   text, one class name per line, index = line number from 0 (as timm's
                class-map .txt files; ImageNet's synset list in the order of its labels)

A sample is used when its label is usable and its image decodes. Otherwise it is skipped
for a reason:

    label reasons     missing, unparseable, unknown-class, negative, out-of-range: the
                      command stops in one line naming the tar, the key and the value,
                      or, with --skip-bad-labels, counts and records them
    sample reasons    no-image, undecodable-image, repeated-key (a key's later copies in a
                      tar): counted and recorded, as extraction skips them

`Tally` counts one split: samples present, used, skipped per reason with the first few
(tar, key, value) in tar order, and the classes seen. Tallies of DataLoader workers and of
processes merge into the same tally whatever their number (counts add, the examples kept
are the first in (shard index, position in the tar) order).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from mrmae.shared.errors import MrmaeError, OptionError, naming
from mrmae.shared.shards import TarSample, iter_samples

LABEL_FORMATS = ("auto", "cls", "json")
LABEL_REASONS = ("missing", "unparseable", "unknown-class", "negative", "out-of-range")
SAMPLE_REASONS = ("no-image", "undecodable-image", "repeated-key")
EXAMPLES = 5  # skipped samples kept per reason, in tar order
CLASS_MAP_LIMIT = 64 << 20  # bytes; ImageNet-21k's names take ~0.5 MB
MAX_INFERRED_CLASSES = 100_000  # without --num-classes: a larger label is taken for damage
_INTEGER = re.compile(r"[+-]?[0-9]+")
_HUGE = 10**18  # a label this large is damage (and past what a label tensor holds)
_SKIP_HINT = "; fix it, or give --skip-bad-labels to count and skip such samples"


class LabelError(MrmaeError, ValueError):
    """A label or class map that cannot be used; the message names the file, the key and the value."""


@dataclass(frozen=True)
class LabelOptions:
    """What the command line asks about labels (`resolve_labels` turns it into a LabelSpec)."""

    format: str = "auto"  # LABEL_FORMATS
    field: str | None = None  # json: the label's field (default "label")
    class_map: str | None = None  # a class-name file (module docstring)
    skip_bad: bool = False  # count and skip bad labels instead of stopping
    num_classes: int | None = None  # labels must be below it; None: the class map's size, or any


@dataclass(frozen=True)
class ClassMap:
    """Class name -> index, read from `path` (its sha256 recorded with the run)."""

    path: str
    index: dict[str, int]
    sha256: str

    @property
    def size(self) -> int:
        """The classes the map spans: its largest index + 1."""
        return max(self.index.values()) + 1


@dataclass(frozen=True)
class BadLabel:
    """Why a sample's label cannot be used: a LABEL_REASONS reason, the value as read (its
    text, None when there is none) and the words of the one-line error."""

    reason: str
    value: str | None
    detail: str


@dataclass(frozen=True)
class LabelSpec:
    """The resolved label reader of a run: format, field, class map, class bound."""

    format: str  # "cls" | "json"
    field: str = "label"
    class_map: ClassMap | None = None
    num_classes: int | None = None  # None: any label from 0 (eval without --num-classes or a map)
    skip_bad: bool = False
    detected: bool = False  # format found by `auto`
    bound_by: str = "--num-classes"  # what set num_classes, for messages

    def read(self, members: dict[str, bytes]) -> int | BadLabel:
        """The class index of a sample's members (ext -> bytes), or why there is none."""
        data = members.get(self.format)
        if data is None:
            return BadLabel("missing", None, f"no .{self.format} member (its label)")
        where = ".cls" if self.format == "cls" else f".json field {self.field!r}"
        if self.format == "cls":
            try:
                value: object = data.decode("utf-8")
            except UnicodeDecodeError:
                return BadLabel("unparseable", _raw(data), f"label {_shown(data)} in .cls is not UTF-8 text")
        else:
            try:
                obj = json.loads(data)
            except (ValueError, RecursionError):
                return BadLabel("unparseable", _raw(data), f".json {_shown(data)} is not JSON")
            if not isinstance(obj, dict):
                return BadLabel("unparseable", _raw(data), f".json {_shown(data)} is not a JSON object")
            if obj.get(self.field) is None:
                return BadLabel("missing", None, f".json has no field {self.field!r} (its label; --label-field)")
            value = obj[self.field]
        return self._index(value, where)

    def _index(self, value: object, where: str) -> int | BadLabel:
        raw, shown = _raw(value), _shown(value)
        if self.class_map is not None:
            if not isinstance(value, str):
                return BadLabel("unparseable", raw, f"label {shown} in {where} is not a class name (--class-map)")
            index = self.class_map.index.get(value.strip())
            if index is None:
                return BadLabel("unknown-class", raw, f"class {shown} in {where} is not in --class-map "
                                                        f"{self.class_map.path}")
            return self._bounded(index, raw, shown, where)
        if isinstance(value, str) and _INTEGER.fullmatch(value.strip()):
            text = value.strip().lstrip("+")
            # no class count comes near 10^18; int() would even refuse 4300+ digits
            value = int(text) if len(text.lstrip("-").lstrip("0")) <= 18 else (-1 if text.startswith("-") else 1) * _HUGE
        if type(value) is not int:  # bools, floats, text, lists: not a label
            kind = "a decimal integer" if self.format == "cls" else "an integer"
            return BadLabel("unparseable", raw, f"label {shown} in {where} is not {kind}")
        if abs(value) >= _HUGE:
            return BadLabel("negative" if value < 0 else "out-of-range", raw,
                            f"label {shown} in {where} is {'negative' if value < 0 else 'too large'}")
        return self._bounded(value, raw, shown, where)

    def _bounded(self, index: int, raw: str, shown: str, where: str) -> int | BadLabel:
        if index < 0:
            return BadLabel("negative", raw, f"label {shown} in {where} is negative")
        if self.num_classes is not None and index >= self.num_classes:
            return BadLabel("out-of-range", raw, f"label {shown} in {where} is not below {self.bound_by} "
                                                   f"{self.num_classes}")
        return index

    def record(self) -> dict:
        """What the run's records say about its labels."""
        out: dict = {"format": self.format, "detected": self.detected, "skip_bad_labels": self.skip_bad,
                     "num_classes": self.num_classes}
        if self.format == "json":
            out["field"] = self.field
        if self.class_map is not None:
            out["class_map"] = {"path": self.class_map.path, "sha256": self.class_map.sha256,
                                "classes": self.class_map.size}
        return out


def _raw(value: object, limit: int = 40) -> str:
    """A label value as recorded: its text (bytes decoded with escapes, JSON values as JSON),
    stripped and cut at `limit` characters."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "backslashreplace")
    text = value.strip() if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _shown(value: object) -> str:
    """A label value as an error shows it: text quoted (repr), JSON numbers and the like bare."""
    return repr(_raw(value)) if isinstance(value, (str, bytes)) else _raw(value)


# --- class maps ---------------------------------------------------------------------------------


def read_class_map(path: str | Path) -> ClassMap:
    """A class-name file (module docstring) -> ClassMap; LabelError naming the file (and the
    line or name) for anything else: not a regular file, too large, not UTF-8, a blank or
    repeated name, a JSON index that is not an integer from 0."""
    p = Path(path)
    with naming(p):
        if not p.is_file():
            raise LabelError(f"--class-map {path}: {'not a regular file' if p.exists() else 'no such file'}")
        with open(p, "rb") as f:
            data = f.read(CLASS_MAP_LIMIT + 1)
    if len(data) > CLASS_MAP_LIMIT:
        raise LabelError(f"--class-map {path}: larger than {CLASS_MAP_LIMIT >> 20} MiB, not a class map")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise LabelError(f"--class-map {path}: not UTF-8 text (byte {e.start})") from None
    index = _json_map(text, path) if p.suffix.lower() == ".json" else _text_map(text, path)
    if not index:
        raise LabelError(f"--class-map {path}: no class names")
    return ClassMap(str(path), index, hashlib.sha256(data).hexdigest())


def _text_map(text: str, path) -> dict[str, int]:
    lines = text.splitlines()
    while lines and not lines[-1].strip():  # trailing blank lines: the file's end
        lines.pop()
    index: dict[str, int] = {}
    for number, line in enumerate(lines):
        name = line.strip()
        if not name:
            raise LabelError(f"--class-map {path} line {number + 1}: blank (one class name per line; the line "
                             "number is the index)")
        if name in index:
            raise LabelError(f"--class-map {path} line {number + 1}: {name!r} again (line {index[name] + 1})")
        index[name] = number
    return index


def _json_map(text: str, path) -> dict[str, int]:
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise LabelError(f"--class-map {path}: not JSON ({e})") from None
    if isinstance(obj, list):
        if not all(isinstance(n, str) and n.strip() for n in obj):
            raise LabelError(f"--class-map {path}: a list must hold class names (non-empty strings)")
        pairs = [(n, i) for i, n in enumerate(obj)]
    elif isinstance(obj, dict):
        pairs = list(obj.items())
    else:
        raise LabelError(f"--class-map {path}: a JSON object {{name: index}} or a list of names, not a "
                         f"{type(obj).__name__}")
    index: dict[str, int] = {}
    for name, i in pairs:
        if not name.strip():
            raise LabelError(f"--class-map {path}: a blank class name")
        if type(i) is not int or i < 0:
            raise LabelError(f"--class-map {path}: class {name!r} has index {json.dumps(i)[:40]}, not an integer "
                             "from 0")
        if name.strip() in index:
            raise LabelError(f"--class-map {path}: class {name.strip()!r} is named twice")
        index[name.strip()] = i
    return index


# --- resolving the options -----------------------------------------------------------------------


def resolve_labels(opts: LabelOptions, urls: list[str]) -> LabelSpec:
    """The label reader `opts` asks for; `auto` looks at the training tars `urls` (first
    samples only). OptionError for options that do not go together, LabelError for a class map
    that cannot be read."""
    if opts.format not in LABEL_FORMATS:
        raise OptionError(f"--label-format {opts.format}: one of {', '.join(LABEL_FORMATS)}")
    if opts.field is not None and opts.format == "cls":
        raise OptionError(f"--label-field {opts.field}: goes with --label-format json (.cls holds the label alone)")
    if opts.field is not None and not opts.field:
        raise OptionError("--label-field: give the JSON field that holds the label, e.g. label")
    class_map = read_class_map(opts.class_map) if opts.class_map is not None else None
    num_classes, bound_by = opts.num_classes, "--num-classes"
    if class_map is not None:
        if num_classes is None:
            num_classes, bound_by = class_map.size, f"--class-map {class_map.path}'s class count"
        elif class_map.size > num_classes:
            raise OptionError(f"--class-map {class_map.path}: indices up to {class_map.size - 1}, not below "
                              f"--num-classes {num_classes}")
    fmt, detected = opts.format, opts.format == "auto"
    if detected:
        fmt = "json" if opts.field is not None else detect_format(urls)
    return LabelSpec(fmt, opts.field or "label", class_map, num_classes, opts.skip_bad, detected, bound_by)


def detect_format(urls: list[str]) -> str:
    """`cls` or `json`: the label member of the first sample (in --shards order) that has
    either, `.cls` first; `cls` when none has one (every sample is then a missing label)."""
    for url in urls:
        for s in iter_samples(url, exts=()):
            if "cls" in s.members or "json" in s.members:
                return "cls" if "cls" in s.members else "json"
    return "cls"


# --- counting ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Skip:
    """A sample not used: where it is (`order`: (shard index in its list, position in the tar)),
    why (LABEL_REASONS or SAMPLE_REASONS), the value read (None: none) and the error's words."""

    order: tuple[int, int]
    reason: str
    shard: str
    key: str
    value: str | None = None
    detail: str = ""

    def line(self) -> str:
        return f"{self.shard}: sample {self.key}: {self.detail}"


@dataclass
class Tally:
    """One split's samples: present (read from the tars), used (trained on or evaluated),
    skipped per reason with the first EXAMPLES of each in tar order, classes used."""

    present: int = 0
    used: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[Skip]] = field(default_factory=dict)
    classes: set[int] = field(default_factory=set)

    def use(self, labels: Iterable[int]) -> None:
        labels = list(labels)
        self.present, self.used = self.present + len(labels), self.used + len(labels)
        self.classes.update(labels)

    def skip(self, s: Skip, skip_bad: bool) -> None:
        """Count `s`; a bad label without `skip_bad` stops here (LabelError naming tar, key, value)."""
        if s.reason in LABEL_REASONS and not skip_bad:
            raise LabelError(s.line() + _SKIP_HINT)
        self.present += 1
        self.skipped[s.reason] = self.skipped.get(s.reason, 0) + 1
        self._keep([s])

    def _keep(self, skips: list[Skip]) -> None:
        for s in skips:
            kept = self.examples.setdefault(s.reason, [])
            kept.append(s)
            kept.sort(key=lambda k: k.order)
            del kept[EXAMPLES:]

    def merge(self, other: "Tally") -> None:
        """Add `other` (another worker's or process's tally of the same split)."""
        self.present, self.used = self.present + other.present, self.used + other.used
        for reason, n in other.skipped.items():
            self.skipped[reason] = self.skipped.get(reason, 0) + n
        self._keep([s for kept in other.examples.values() for s in kept])
        self.classes |= other.classes

    def to_wire(self) -> dict:
        """Everything, as JSON values (to cross process boundaries; `from_wire` reads it back)."""
        return {"present": self.present, "used": self.used, "skipped": self.skipped, "classes": sorted(self.classes),
                "examples": [[list(s.order), s.reason, s.shard, s.key, s.value, s.detail]
                             for kept in self.examples.values() for s in kept]}

    @classmethod
    def from_wire(cls, wire: dict) -> "Tally":
        t = cls(wire["present"], wire["used"], dict(wire["skipped"]), {}, set(wire["classes"]))
        t._keep([Skip(tuple(o), *rest) for o, *rest in wire["examples"]])
        return t

    def record(self) -> dict:
        """What the run's records say of the split: images used, present, classes, skips per
        reason and their first keys."""
        return {"images": self.used, "present": self.present, "classes": len(self.classes),
                "skipped": dict(sorted(self.skipped.items())),
                "examples": {r: [{"shard": s.shard, "key": s.key, "value": s.value} for s in kept]
                             for r, kept in sorted(self.examples.items())}}

    def summary(self, split: str) -> str:
        """'val: 6 of 12 images (6 skipped: unparseable 6, e.g. a.tar k1 'cat'), 5 classes'."""
        return f"{split}: {self._images()}, {len(self.classes)} classes"

    def _images(self) -> str:
        if not self.skipped:
            return f"{self.used} images"
        parts = []
        for reason, n in sorted(self.skipped.items()):
            first = self.examples[reason][0]
            parts.append(f"{reason} {n}, e.g. {first.shard} {first.key}"
                         + (f" {first.value!r}" if first.value is not None else ""))
        return f"{self.used} of {self.present} images ({sum(self.skipped.values())} skipped: {'; '.join(parts)})"

    def check_any(self, option: str) -> None:
        """LabelError when no sample of the split can be used, naming what was wrong with them."""
        if self.used:
            return
        if not self.present:
            raise LabelError(f"{option}: no samples in the tars")
        raise LabelError(f"{option}: no usable labelled image: {self._images()}")


def class_notes(train: Tally, val: Tally, spec: LabelSpec) -> list[str]:
    """Note lines on the classes: val classes no training image has, and a training class
    count other than the one the labels are bound to (--num-classes, or the class map's)."""
    notes = []
    unseen = sorted(val.classes - train.classes)
    if unseen:
        shown = ", ".join(map(str, unseen[:8])) + (", ..." if len(unseen) > 8 else "")
        notes.append(f"{len(unseen)} of the {len(val.classes)} classes of the validation images have no training "
                     f"image ({shown}): their images can only be misclassified")
    if spec.num_classes is not None and len(train.classes) != spec.num_classes:
        notes.append(f"the training images hold {len(train.classes)} classes, {spec.bound_by} is {spec.num_classes}")
    return notes


def census(urls: list[str], spec: LabelSpec, indices: Iterable[int] | None = None) -> Tally:
    """A split's labels without its images: every sample of `urls` (shard numbers `indices`
    in the split's list, default 0, 1, ...) read for its label member alone (the image bytes
    are passed over, not kept). Images are not decoded: one that will not decode counts as
    used here (the reader that decodes it counts it as skipped)."""
    tally = Tally()
    for index, url in zip(indices if indices is not None else range(len(urls)), urls):
        for _, _, label in sample_labels(url, index, spec, iter_samples(url, exts=(spec.format,))):
            if isinstance(label, Skip):
                tally.skip(label, spec.skip_bad)
            else:
                tally.use([label])
    return tally


def sample_labels(url: str, index: int, spec: LabelSpec, samples: Iterable[TarSample]
                  ) -> Iterator[tuple[int, TarSample, int | Skip]]:
    """(position in the tar, sample, its label or why it is skipped) for each sample of the tar `url` (shard number
    `index` of its split) in tar order: the label is judged first, then the image's presence;
    a key's later copies are `repeated-key` skips (the first copy is the sample)."""
    seen: set[str] = set()
    for position, s in enumerate(samples):
        order = (index, position)
        if s.key in seen:
            yield position, s, Skip(order, "repeated-key", url, s.key,
                                    detail="repeated key in the tar (its first copy is used)")
            continue
        seen.add(s.key)
        label = spec.read(s.members)
        if isinstance(label, BadLabel):
            yield position, s, Skip(order, label.reason, url, s.key, label.value, label.detail)
        elif s.image is None:
            yield position, s, Skip(order, "no-image", url, s.key, detail="no image member")
        else:
            yield position, s, label

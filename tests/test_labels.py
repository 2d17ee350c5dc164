"""Labelled samples (train/downstream/labels.py): every sample of a real tar is used or counted, for
`finetune` and every `eval` protocol, on one process and on two."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import launch_two
from PIL import Image
from test_finetune import save_small_student

from mrmae.cli import cli
from mrmae.shared.errors import OptionError
from mrmae.shared.shards import iter_samples
from mrmae.train.downstream.labels import (LabelError, LabelOptions, LabelSpec, Tally, census, read_class_map, resolve_labels)

NUM_CLASSES = ["--num-classes", "16"]
FT = [*NUM_CLASSES, "--batch-size", "4", "--epochs", "1", "--lr", "1e-3", "--warmup-epochs", "0", "--workers", "0",
      "--augment", "light", "--mixup", "0", "--cutmix", "0", "--eval-batch-size", "4", "--no-progress", "--seed", "3"]
EVAL = ["--no-progress", "--workers", "0", "--batch-size", "4", "--k", "3"]


def jpeg(seed: int) -> bytes:
    """A small real JPEG (colour blocks and noise, 72 x 88 px)."""
    rng = np.random.default_rng(seed)
    pixels = np.kron(rng.integers(0, 256, (6, 8, 3)), np.ones((12, 11, 1))) + rng.normal(0, 12, (72, 88, 3))
    buf = io.BytesIO()
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def write_tar(path: Path, rows: list[tuple[str, dict[str, bytes]]]) -> str:
    """A tar of samples (key, {ext: bytes}) in order, as webdataset writes them."""
    import tarfile

    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for key, members in rows:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return str(path)


def ok(key: str, label: int, seed: int) -> tuple[str, dict[str, bytes]]:
    return key, {"jpg": jpeg(seed), "cls": str(label).encode()}


def bad(key: str, seed: int, cls: bytes | None = None, image: bytes | None = None) -> tuple[str, dict[str, bytes]]:
    members = {"jpg": image if image is not None else jpeg(seed)}
    return key, members if cls is None else {**members, "cls": cls}


@pytest.fixture(scope="module")
def tars(tmp_path_factory) -> dict[str, str]:
    """Clean tars (2 train of 8, 2 val of 4; classes 0-3) and mixed ones holding every kind
    of unusable sample, spread over two shards each (a process each, on two processes)."""
    d = tmp_path_factory.mktemp("labelled")
    t = {f"train-{i}": write_tar(d / f"train-{i}.tar", [ok(f"t{i}{j}", j % 4, 10 * i + j) for j in range(8)])
         for i in range(2)}
    t |= {f"val-{i}": write_tar(d / f"val-{i}.tar", [ok(f"v{i}{j}", j % 4, 100 + 10 * i + j) for j in range(4)])
          for i in range(2)}
    t["mtrain-0"] = write_tar(d / "mtrain-0.tar", [
        ok("k0", 0, 200), bad("k1", 201, b"cat"), ok("k2", 1, 202), bad("k3", 203, b"-3"), ok("k4", 2, 204),
        bad("k5", 205, b"99"), ok("k6", 3, 206), ok("k7", 0, 207)])
    t["mtrain-1"] = write_tar(d / "mtrain-1.tar", [
        ok("m0", 1, 210), bad("m1", 211), ok("m2", 2, 212), ("m3", {"cls": b"1"}), ok("m4", 3, 214),
        ok("m0", 2, 215), ok("m5", 0, 216), ok("m6", 1, 217), ok("m7", 2, 218), bad("m8", 219, b"3", b"\xff\xd8junk")])
    t["mval-0"] = write_tar(d / "mval-0.tar", [ok("v0", 0, 300), bad("v1", 301, b"dog"), ok("v2", 1, 302),
                                                ok("v3", 2, 303)])
    t["mval-1"] = write_tar(d / "mval-1.tar", [ok("w0", 3, 310), bad("w1", 311, b"0", b"not a jpeg"),
                                                bad("w2", 312, b"-1"), ok("w3", 1, 313), ok("w4", 5, 314)])
    return t


def urls(tars: dict[str, str], *names: str) -> str:
    return "::".join(tars[n] for n in names)


@pytest.fixture(scope="module")
def students(tmp_path_factory) -> list[Path]:
    """Two tiny 64 px students pretrained apart (here: two seeds), saved as pretrain runs."""
    out = [tmp_path_factory.mktemp(f"student{i}") for i in range(2)]
    for i, o in enumerate(out):
        save_small_student(o, seed=i)
    return out


def invoke(args: list[str]):
    return CliRunner().invoke(cli, args)


def error_line(r) -> str:
    """The one line a refused command prints (exit 1), without notes before it."""
    lines = [ln for ln in r.output.strip().splitlines() if not ln.startswith("mrmae: note: ")]
    assert r.exit_code == 1 and len(lines) == 1 and lines[0].startswith("mrmae: error: "), r.output
    return lines[0].removeprefix("mrmae: error: ")


# --- the reader, on its own --------------------------------------------------------------------


def test_each_label_value_is_read_or_refused_for_its_reason(tmp_path):
    cls = LabelSpec("cls", num_classes=16)
    reads = {b"3": 3, b" 7\n": 7, b"+2": 2, b"007": 7, b"cat": "unparseable", b"3.0": "unparseable",
             b"1_0": "unparseable", "\u0663".encode(): "unparseable",  # int() would take both: not decimal ASCII
             b"\xff\xfe": "unparseable", b"": "unparseable", b"-3": "negative", b"-0": 0, b"16": "out-of-range",
             b"9" * 30: "out-of-range", b"-" + b"9" * 30: "negative"}
    for data, want in reads.items():
        got = cls.read({"cls": data, "jpg": b""})
        assert (got if isinstance(got, int) else got.reason) == want, data
    assert cls.read({"jpg": b""}).reason == "missing"
    assert LabelSpec("cls").read({"cls": b"123456"}) == 123456  # no bound without --num-classes or a map

    js = LabelSpec("json", "label", num_classes=16)
    values = {b'{"label": 3}': 3, b'{"label": "4"}': 4, b'{"label": true}': "unparseable",
              b'{"label": 3.0}': "unparseable", b'{"label": [1]}': "unparseable", b'{"label": -1}': "negative",
              b'{"label": 16}': "out-of-range", b'{"other": 1}': "missing", b'{"label": null}': "missing",
              b"[1]": "unparseable", b"not json": "unparseable", b"[" * 100_000: "unparseable"}
    for data, want in values.items():
        got = js.read({"json": data})
        assert (got if isinstance(got, int) else got.reason) == want, data
    assert js.read({"cls": b"3"}).reason == "missing"  # json asked: a .cls does not stand in

    names = tmp_path / "classes.txt"
    names.write_text("tench\ngoldfish\ngreat white shark\n")
    mapped = resolve_labels(LabelOptions("cls", class_map=str(names)), [])
    assert mapped.num_classes == 3 and mapped.read({"cls": b" great white shark\n"}) == 2
    bad = mapped.read({"cls": b"zebra"})
    assert (bad.reason, bad.value) == ("unknown-class", "zebra") and str(names) in bad.detail
    assert mapped.read({"cls": b"1"}).reason == "unknown-class"  # with a map, labels are names
    jmapped = resolve_labels(LabelOptions("json", field="name", class_map=str(names)), [])
    assert jmapped.read({"json": b'{"name": "goldfish", "label": 9}'}) == 1
    assert jmapped.read({"json": b'{"name": 1}'}).reason == "unparseable"


def test_class_maps_read_as_a_user_writes_them_and_refuse_what_is_not_one(tmp_path):
    txt, js, lst = tmp_path / "a.txt", tmp_path / "b.json", tmp_path / "c.json"
    txt.write_bytes("\ufeffn01440764\r\nn01443537\n\n".encode())  # a BOM, CRLF, trailing blank lines
    js.write_text(json.dumps({"cat": 0, "dog": 2}))
    lst.write_text(json.dumps(["cat", "dog"]))
    assert read_class_map(txt).index == {"n01440764": 0, "n01443537": 1}
    assert read_class_map(js).index == {"cat": 0, "dog": 2} and read_class_map(js).size == 3
    assert read_class_map(lst).index == {"cat": 0, "dog": 1}
    fifo = tmp_path / "fifo.txt"
    os.mkfifo(fifo)
    huge = tmp_path / "huge.txt"
    with open(huge, "wb") as f:
        f.truncate((64 << 20) + 1)
    cases = {"a\n\nb\n": "line 2: blank", "a\nb\na\n": "line 3: 'a' again (line 1)", "": "no class names",
             b"\xff\xfe\x00": "not UTF-8"}
    for i, (content, message) in enumerate(cases.items()):
        p = tmp_path / f"bad{i}.txt"
        p.write_bytes(content if isinstance(content, bytes) else content.encode())
        with pytest.raises(LabelError, match=re.escape(f"--class-map {p}") + ".*" + re.escape(message)):
            read_class_map(p)
    json_cases = {'{"a": -1}': "index -1, not an integer from 0", '{"a": true}': "index true",
                  '{"a": 0, " a ": 1}': "named twice", '["a", ""]': "class names", '"a"': "not a str",
                  "{": "not JSON", '{"": 0}': "blank class name"}
    for i, (content, message) in enumerate(json_cases.items()):
        p = tmp_path / f"bad{i}.json"
        p.write_text(content)
        with pytest.raises(LabelError, match=re.escape(f"--class-map {p}") + ".*" + re.escape(message)):
            read_class_map(p)
    for path, message in ((tmp_path, "not a regular file"), (fifo, "not a regular file"), (huge, "larger than"),
                          (tmp_path / "none.txt", "no such file")):
        with pytest.raises(LabelError, match=message):
            read_class_map(path)


def test_format_detection_options_and_class_bounds(tars, tmp_path):
    jsonl = write_tar(tmp_path / "j.tar", [("a", {"jpg": jpeg(1), "json": b'{"label": 1}'})])
    nolabel = write_tar(tmp_path / "n.tar", [("b", {"jpg": jpeg(2)})])
    assert resolve_labels(LabelOptions(), [tars["train-0"]]).format == "cls"
    spec = resolve_labels(LabelOptions(), [nolabel, jsonl])  # the first sample with a label decides
    assert (spec.format, spec.detected, spec.record()["field"]) == ("json", True, "label")
    assert resolve_labels(LabelOptions(field="y"), [tars["train-0"]]).format == "json"  # a field means json
    assert resolve_labels(LabelOptions("cls"), [jsonl]).detected is False
    names = tmp_path / "m.txt"
    names.write_text("a\nb\nc\n")
    for opts, message in ((LabelOptions("cls", field="label"), "--label-field label: goes with --label-format json"),
                          (LabelOptions(class_map=str(names), num_classes=2), "not below --num-classes 2"),
                          (LabelOptions("xml"), "--label-format xml")):
        with pytest.raises(OptionError, match=re.escape(message)):
            resolve_labels(opts, [tars["train-0"]])


def test_a_census_is_the_same_however_the_shards_are_split(tars):
    spec = LabelSpec("cls", num_classes=16, skip_bad=True)
    shards = [tars[n] for n in ("mtrain-0", "mtrain-1", "mval-0", "mval-1")]
    whole = census(shards, spec)
    assert whole.record() == {
        "images": 19, "present": 27, "classes": 5,
        "skipped": {"missing": 1, "negative": 2, "no-image": 1, "out-of-range": 1, "repeated-key": 1,
                    "unparseable": 2},
        "examples": {"missing": [{"shard": shards[1], "key": "m1", "value": None}],
                     "negative": [{"shard": shards[0], "key": "k3", "value": "-3"},
                                  {"shard": shards[3], "key": "w2", "value": "-1"}],
                     "no-image": [{"shard": shards[1], "key": "m3", "value": None}],
                     "out-of-range": [{"shard": shards[0], "key": "k5", "value": "99"}],
                     "repeated-key": [{"shard": shards[1], "key": "m0", "value": None}],
                     "unparseable": [{"shard": shards[0], "key": "k1", "value": "cat"},
                                     {"shard": shards[2], "key": "v1", "value": "dog"}]}}
    merged = Tally()  # as processes would: every other shard, merged in the other order, through the wire form
    for rank in (1, 0):
        merged.merge(Tally.from_wire(json.loads(json.dumps(census(shards[rank::2], spec, range(rank, 4, 2)).to_wire()))))
    assert merged.record() == whole.record() and merged.classes == whole.classes
    with pytest.raises(LabelError, match="^" + re.escape(f"{shards[0]}: sample k1: label 'cat' in .cls is not a "
                                                         "decimal integer; fix it, or give --skip-bad-labels")):
        census(shards, LabelSpec("cls", num_classes=16))


# --- the commands: stop in one line by default --------------------------------------------------

# case: (the bad samples, what the line says); the train tar is a clean one with them put in
CASES = {
    "unparseable": ([bad("x1", 900, b"cat")], "sample x1: label 'cat' in .cls is not a decimal integer"),
    "negative": ([bad("x1", 900, b"-3")], "sample x1: label '-3' in .cls is negative"),
    "too-large": ([bad("x1", 900, b"16")], "sample x1: label '16' in .cls is not below --num-classes 16"),
    "missing": ([bad("x1", 900)], "sample x1: no .cls member (its label)"),
    "all-unparseable": ([bad(f"x{i}", 900 + i, b"cat") for i in range(8)], "sample x0: label 'cat' in .cls is not"),
    "all-missing": ([bad(f"x{i}", 900 + i) for i in range(8)], "sample x0: no .cls member"),
}
# each case also tries one eval protocol, the bad samples in the training or the validation tars
PROTOCOL = {"unparseable": ("knn", "train"), "negative": ("linear-probe", "val"), "too-large": ("ensemble", "val"),
            "missing": ("knn", "val"), "all-unparseable": ("linear-probe", "train"), "all-missing": ("ensemble", "train")}


@pytest.mark.parametrize("case", list(CASES))
def test_a_bad_label_stops_finetune_and_eval_in_one_line_naming_tar_key_and_value(case, tars, students, tmp_path):
    rows, says = CASES[case]
    clean = [s for s in iter_samples(tars["train-0"])]
    mixed = rows if case.startswith("all") else [(s.key, s.members) for s in clean[:2]] + rows + [
        (s.key, s.members) for s in clean[2:]]
    shard = write_tar(tmp_path / "bad.tar", mixed)
    good = urls(tars, "val-0", "val-1")
    r = invoke(["finetune", "--checkpoint", str(students[0]), "--shards", shard, "--val-shards", good,
                "--out", str(tmp_path / "ft"), *FT])
    assert error_line(r).startswith(f"{shard}: {says}") and "--skip-bad-labels" in r.output
    assert not (tmp_path / "ft" / "checkpoints").exists()  # stopped before a step

    protocol, where = PROTOCOL[case]
    train, val = (shard, good) if where == "train" else (tars["train-0"], shard)
    checkpoints = ["--checkpoint", str(students[0])] + (["--checkpoint", str(students[1])]
                                                         if protocol == "ensemble" else [])
    results = tmp_path / "eval.jsonl"
    r = invoke(["eval", protocol, *checkpoints, "--shards", train, "--val-shards", val, "--results", str(results),
                *NUM_CLASSES, *EVAL[:5], *(["--epochs", "2"] if protocol != "knn" else [])])
    assert error_line(r).startswith(f"{shard}: {says}")
    assert not results.exists()  # nothing recorded


def test_finetune_with_skip_bad_labels_counts_every_sample_on_one_process_and_on_two(tars, students, tmp_path):
    data = ["--checkpoint", str(students[0]), "--shards", urls(tars, "mtrain-0", "mtrain-1"),
            "--val-shards", urls(tars, "mval-0", "mval-1"), "--skip-bad-labels"]
    with pytest.warns(UserWarning, match=f"^{re.escape(tars['mtrain-1'])}: sample m8: image does not decode") as w:
        r = invoke(["finetune", *data, *FT, "--out", str(tmp_path / "one")])
    assert r.exit_code == 0, r.output + repr(r.exception)
    assert len([x for x in w if "does not decode" in str(x.message)]) == 1  # once a run, not once a pass over the tars
    lines = [ln for ln in r.stdout.splitlines() if not ln.startswith("finetune: ")]  # (the run's start line)
    assert lines[0].split()[-1] == "val_images" and lines[1].endswith("  6 of 9")
    assert lines[2] == (f"train: 12 of 18 images (6 skipped: missing 1, e.g. {tars['mtrain-1']} m1; negative 1, e.g. "
                        f"{tars['mtrain-0']} k3 '-3'; no-image 1, e.g. {tars['mtrain-1']} m3; out-of-range 1, e.g. "
                        f"{tars['mtrain-0']} k5 '99'; repeated-key 1, e.g. {tars['mtrain-1']} m0; unparseable 1, e.g. "
                        f"{tars['mtrain-0']} k1 'cat'), 4 classes")
    assert lines[3].startswith("val: 6 of 9 images (3 skipped: negative 1, ") and "undecodable-image 1, e.g. " \
        f"{tars['mval-1']} w1; unparseable 1" in lines[3] and lines[3].endswith(", 5 classes")
    notes = [ln for ln in r.stderr.splitlines() if ln.startswith("mrmae: note: ")]
    assert notes == ["mrmae: note: 1 of the 5 classes of the validation images have no training image (5): their "
                     "images can only be misclassified",
                     "mrmae: note: the training images hold 4 classes, --num-classes is 16"]
    # (the training image that does not decode is warned of: the census, reading labels alone, counted it in)

    # the same run on two processes (torchrun, gloo): each takes one train and one val tar
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    two = [*launch_two("torchrun"), "finetune", *data, *FT, "--batch-size", "2", "--out", str(tmp_path / "two")]
    p = subprocess.run(two, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert [ln for ln in p.stdout.splitlines() if not ln.startswith("finetune: ")][2:4] == lines[2:4]  # the counts
    configs = [json.loads((tmp_path / run / "config.json").read_text()) for run in ("one", "two")]
    assert configs[1]["num_processes"] == 2
    assert configs[0]["samples"] == configs[1]["samples"] and configs[0]["notes"] == configs[1]["notes"]
    assert configs[0]["samples"]["train"]["images"] == 12 and configs[0]["samples"]["val"]["images"] == 7  # not decoded
    assert configs[0]["labels"] == {"format": "cls", "detected": True, "skip_bad_labels": True, "num_classes": 16}
    assert configs[0]["steps_per_epoch"] == 3  # 12 usable images at 4 a step, not the 18 present
    evals = [[m for m in map(json.loads, (tmp_path / run / "metrics.jsonl").read_text().splitlines()) if "top1" in m]
             for run in ("one", "two")]
    counts = [{k: e[0][k] for k in ("n_val", "n_val_present", "classes_val", "val_skipped")} for e in evals]
    assert counts[0] == counts[1] == {"n_val": 6, "n_val_present": 9, "classes_val": 5,
                                      "val_skipped": {"negative": 1, "undecodable-image": 1, "unparseable": 1}}

    # without --skip-bad-labels, the process whose tar holds the bad label stops the run in one line
    stop = [*launch_two("torchrun"), "finetune", *data[:-1], *FT, "--batch-size", "2", "--out", str(tmp_path / "x")]
    stop[stop.index("--shards") + 1] = urls(tars, "train-0", "mtrain-1")
    p = subprocess.run(stop, env=env, capture_output=True, text=True, timeout=300)
    said = [ln for ln in p.stderr.splitlines() if ln.startswith("mrmae: error: ")]
    assert p.returncode != 0 and said == [f"mrmae: error: {tars['mtrain-1']}: sample m1: no .cls member (its label); "
                                          "fix it, or give --skip-bad-labels to count and skip such samples"], p.stderr


# --- eval: every protocol counts, however many loader processes --------------------------------


def test_eval_with_skip_bad_labels_records_the_same_counts_with_any_number_of_workers(tars, students, tmp_path):
    data = ["--checkpoint", str(students[0]), "--shards", urls(tars, "mtrain-0", "mtrain-1"),
            "--val-shards", urls(tars, "mval-0", "mval-1"), "--skip-bad-labels", *NUM_CLASSES]
    results = tmp_path / "r.jsonl"
    for protocol, extra in (("knn", ["--k", "3"]), ("linear-probe", ["--epochs", "2"])):
        for workers in ("0", "2"):
            r = invoke(["eval", protocol, *data, *extra, "--workers", workers, "--batch-size", "3", "--no-progress",
                        "--results", str(results)])
            assert r.exit_code == 0, r.output + repr(r.exception)
            assert r.stdout.splitlines()[1].split()[4:7] == ["11", "6", "16"]  # train, val, classes
            assert r.stdout.splitlines()[3].startswith("val: 6 of 9 images (3 skipped: ")
    knn0, knn2, lp0, lp2 = [json.loads(ln) for ln in results.read_text().splitlines()]
    for a, b in ((knn0, knn2), (lp0, lp2)):
        a.pop("seconds"), b.pop("seconds")
        assert a == b  # counts, first keys, notes, accuracy: one loader process or two (features in tar order)
    assert {k: knn0[k] for k in ("n_train", "n_val", "n_train_present", "n_val_present", "classes_train",
                                 "classes_val")} == {"n_train": 11, "n_val": 6, "n_train_present": 18,
                                                     "n_val_present": 9, "classes_train": 4, "classes_val": 5}
    assert knn0["skipped"] == {"train": {"missing": 1, "negative": 1, "no-image": 1, "out-of-range": 1,
                                         "repeated-key": 1, "undecodable-image": 1, "unparseable": 1},
                               "val": {"negative": 1, "undecodable-image": 1, "unparseable": 1}}
    assert knn0["skipped_examples"]["val"]["undecodable-image"] == [{"shard": tars["mval-1"], "key": "w1",
                                                                     "value": None}]
    assert len(knn0["notes"]) == 2 and "(5)" in knn0["notes"][0]


def test_ensemble_names_every_member_and_the_report_shows_the_denominators(tars, students, tmp_path):
    args = ["eval", "ensemble", "--checkpoint", str(students[0]), "--checkpoint", str(students[1]),
            "--shards", urls(tars, "mtrain-0", "mtrain-1"), "--val-shards", urls(tars, "mval-0", "mval-1"),
            "--skip-bad-labels", *EVAL, "--feature", "mean"]
    r = invoke(args)  # no --results: the first member's eval.jsonl
    assert r.exit_code == 0, r.output + repr(r.exception)
    rows = r.stdout.splitlines()[1:4]
    weights = [str(s / "checkpoints" / "step00000001" / "model.safetensors") for s in students]
    assert [row.split()[0] for row in rows] == ["knn", "knn", "knn-ensemble"]
    assert [row.split()[-1] for row in rows[:2]] == weights and rows[2].endswith(" + ".join(weights))
    rec = json.loads((students[0] / "eval.jsonl").read_text().splitlines()[-1])
    assert [(m["checkpoint"], m["feature"], m["fused"]) for m in rec["members"]] == [(w, "mean", False) for w in weights]
    assert all(0 <= m["top1"] <= m["top5"] <= 100 for m in rec["members"]) and rec["checkpoint"] == weights
    # without --num-classes any label from 0 is a class: k5's 99 too, so 100 classes are scored
    assert (rec["n_train"], rec["n_val"], rec["n_val_present"], rec["num_classes"]) == (12, 6, 9, 100)

    out = tmp_path / "report"
    with pytest.warns(UserWarning, match="no step logged yet"):  # a pretrain run saved without its metrics
        r = invoke(["report", str(students[0]), "--out", str(out)])
    assert r.exit_code == 0, r.output
    with open(out / "report.csv", newline="") as f:
        row = next(csv.DictReader(f))
    assert float(row["knn-ensemble mean top1"]) == pytest.approx(rec["top1"])
    assert row["knn-ensemble mean images"] == "6 of 9, 5 classes"
    md = (out / "report.md").read_text()
    assert f"knn-ensemble mean: the mean of 2 members: {', '.join(weights)}" in md
    assert "knn-ensemble mean: 1 of the 5 classes of the validation images have no training image (5)" in md


def test_json_labels_and_class_names_give_the_same_result_as_their_cls_integers(tars, students, tmp_path):
    names = ["tench", "goldfish", "great white shark", "tiger shark"]
    (tmp_path / "map.txt").write_text("".join(n + "\n" for n in names))
    (tmp_path / "map.json").write_text(json.dumps({n: i for i, n in enumerate(names)}))

    def rewrite(name: str, labels) -> str:
        rows = [(s.key, {"jpg": s.image, **labels(int(s.members["cls"]))}) for s in iter_samples(tars[name])]
        return write_tar(tmp_path / f"{name}-{len(os.listdir(tmp_path))}.tar", rows)

    variants = {  # options -> (train, val) of the same images, labelled another way
        (): ("train-0", "val-0", lambda y: {"cls": str(y).encode()}),
        ("--class-map", str(tmp_path / "map.txt")): ("train-0", "val-0", lambda y: {"cls": names[y].encode()}),
        ("--label-field", "y"): ("train-0", "val-0", lambda y: {"json": json.dumps({"y": y, "label": "x"}).encode()}),
        ("--class-map", str(tmp_path / "map.json")): ("train-0", "val-0",
                                                      lambda y: {"json": json.dumps({"label": names[y]}).encode()}),
    }
    results = tmp_path / "r.jsonl"
    for options, (train, val, labels) in variants.items():
        r = invoke(["eval", "knn", "--checkpoint", str(students[0]), "--shards", rewrite(train, labels),
                    "--val-shards", rewrite(val, labels), *options, *EVAL, "--results", str(results)])
        assert r.exit_code == 0, r.output + repr(r.exception)
    recs = [json.loads(ln) for ln in results.read_text().splitlines()]
    assert len({(r["top1"], r["top5"], r["n_train"], r["n_val"]) for r in recs}) == 1
    assert [(r["labels"]["format"], r["labels"].get("field"), r["num_classes"]) for r in recs] == [
        ("cls", None, 4), ("cls", None, 4), ("json", "y", 4), ("json", "label", 4)]
    assert recs[1]["labels"]["class_map"]["classes"] == 4 and all(r["labels"]["detected"] for r in recs)

    unknown = rewrite("val-1", lambda y: {"cls": (names[y] if y else "zebra").encode()})
    r = invoke(["eval", "knn", "--checkpoint", str(students[0]), "--shards", rewrite("train-0", variants[
        ("--class-map", str(tmp_path / "map.txt"))][2]), "--val-shards", unknown, "--class-map",
        str(tmp_path / "map.txt"), *EVAL, "--results", str(results)])
    assert error_line(r) == (f"{unknown}: sample v10: class 'zebra' in .cls is not in --class-map "
                             f"{tmp_path / 'map.txt'}; fix it, or give --skip-bad-labels to count and skip such samples")

"""Issue 12: the cache and its inputs tried as a hostile but realistic user would.

One section per case of the issue's "Why", each on real files, real tars, real Zarr
stores and real processes. Every case must end in one clear line naming the file, key
or option (or a counted, recorded skip), with nothing wrong trained on.
"""

from __future__ import annotations

import pytest

# --- 1. nothing recorded in a cache is executed or followed out of it -------------------

import json  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
from click.testing import CliRunner  # noqa: E402
from conftest import DINO_TINY, entry_files  # noqa: E402

from mrmae.cli import cli  # noqa: E402
from mrmae.shared import cache_format as cf  # noqa: E402


@pytest.fixture(scope="module")
def small_cache(demo_shards, tmp_path_factory):
    """A real one-shard cache (6 images, 2 views, ViT-Tiny), copied by each test that crafts it."""
    out = tmp_path_factory.mktemp("cache1") / "c"
    r = CliRunner().invoke(cli, ["extract-features", "--shards", str(demo_shards[0]), "--feature-cache", str(out),
                                 "--teacher", DINO_TINY, "--no-progress"])
    assert r.exit_code == 0, r.output
    return out


def _crafted(small_cache, tmp_path, **fields):
    """A copy of the cache whose one entry has `fields` replaced (None: removed); -> (root, entry file)."""
    root = tmp_path / "c"
    shutil.copytree(small_cache, root)
    entry_file = entry_files(root / "shards")[0]
    entry = json.loads(entry_file.read_text())
    for k, v in fields.items():
        entry.pop(k) if v is None else entry.__setitem__(k, v)
    entry_file.write_text(json.dumps(entry))
    return root, entry_file


def _one_line_error(r, *words):
    """One error line (after a training run's own start line, where it started)."""
    lines = [x for x in r.output.splitlines() if x.strip() and not x.startswith(("pretrain: ", "finetune: "))]
    assert r.exit_code not in (0, None) and len(lines) == 1 and lines[0].startswith("mrmae: error: "), r.output
    assert all(w in lines[0] for w in words), lines[0]
    return lines[0]


def _verify_damaged(root, *words) -> str:
    """`cache verify` (integrity only) names the shard damaged in one line with `words`
    (`cache info` reads the manifest and entries alone: it opens no shard)."""
    r = CliRunner().invoke(cli, ["cache", "verify", "--feature-cache", str(root), "--recompute", "0", "--no-progress"])
    damaged = [x for x in r.output.splitlines() if x.startswith("mrmae: damaged: ")]
    assert r.exit_code == 1 and len(damaged) == 1 and all(w in damaged[0] for w in words), r.output
    return damaged[0]


def test_a_recorded_pipe_source_is_never_run(small_cache, demo_shards, tmp_path):
    """verify (default --recompute, and --sources) and --add-teacher without --shards refuse a
    recorded `pipe:` source in one line asking for --shards; the command never runs. With
    --shards (matched by file name) they work."""
    marker = tmp_path / "MARKER"
    shard = demo_shards[0]
    root, entry_file = _crafted(small_cache, tmp_path, source=f"pipe:touch {marker} && cat {shard}")
    runner = CliRunner()
    for args in (["cache", "verify", "--feature-cache", str(root)], ["extract-features", "--feature-cache", str(root), "--add-teacher", DINO_TINY,
                                                  "--name", "t", "--no-progress"]):
        line = _one_line_error(runner.invoke(cli, args), "--shards", str(entry_file), "command")
        assert not marker.exists(), (args, line)
    r = subprocess.run([sys.executable, "-m", "mrmae", "cache", "verify", "--feature-cache", str(root), "--recompute", "0", "--sources"],
                       capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "--shards" in r.stderr and not r.stdout, r.stderr
    assert str(entry_file) in r.stderr and not marker.exists()
    # the same shard named on the command line: read from there, matched by its file name
    r = runner.invoke(cli, ["cache", "verify", "--feature-cache", str(root), "--sources", "--recompute", "2", "--shards", str(shard)])
    assert r.exit_code == 0 and "integrity: OK" in r.output and "checked 2 views" in r.output, r.output
    r = runner.invoke(cli, ["extract-features", "--feature-cache", str(root), "--add-teacher", DINO_TINY, "--name", "t",
                            "--shards", str(shard), "--no-progress"])
    assert r.exit_code == 0 and "1 shards extracted" in r.output, r.output
    assert len(cf.FeatureCache(root, "t").complete_shards) == 1 and not marker.exists()
    r = runner.invoke(cli, ["cache", "verify", "--feature-cache", str(root), "--recompute", "0", "--sources", "--shards",
                            str(demo_shards[1])])
    _one_line_error(r, "--shards", str(demo_shards[1]), "not a complete shard")


@pytest.mark.parametrize("group", ["../elsewhere", "ABSOLUTE", "shards/../../elsewhere", "file:///tmp/x",
                                   "shards/other"])
def test_a_group_outside_the_cache_is_refused(small_cache, demo_shards, tmp_path, group):
    """An entry whose group is not the stored shard beside it is refused in one line naming
    the entry file, by info, verify and pretraining; the real group copied there is never read."""
    outside = tmp_path / "elsewhere"
    shutil.copytree(next(p for p in (small_cache / "shards").iterdir() if p.is_dir()), outside)  # readable bait
    group = str(outside) if group == "ABSOLUTE" else group
    root, entry_file = _crafted(small_cache, tmp_path, group=group)
    runner = CliRunner()
    for args in (["cache", "info", "--feature-cache", str(root)], ["cache", "verify", "--feature-cache", str(root), "--recompute", "0"],
                 ["pretrain", "--shards", str(demo_shards[0]), "--feature-cache", str(root), "--out",
                  str(tmp_path / "run"), "--model", "mrmae_vit_tiny_patch16", "--no-progress"]):
        _one_line_error(runner.invoke(cli, args), str(entry_file), "group", "not a stored shard inside the cache")
    assert not (tmp_path / "run" / "config.json").exists()


@pytest.mark.parametrize("fields, key", [({"num_views": "abc"}, "num_views"), ({"num_samples": -1}, "num_samples"),
                                         ({"num_samples": None}, "num_samples"), ({"sha256": "xyz"}, "sha256"),
                                         ({"skipped": [{"key": 3}]}, "skipped[0].key"), ({"bytes": True}, "bytes"),
                                         ({"surprise": 1}, "surprise")])
def test_a_wrong_field_in_an_entry_is_one_line_naming_file_and_key(small_cache, tmp_path, fields, key):
    root, entry_file = _crafted(small_cache, tmp_path, **fields)
    with pytest.raises(cf.CacheError, match="^" + re.escape(f"{entry_file}: {key}: ")):
        cf.FeatureCache(root)
    _one_line_error(CliRunner().invoke(cli, ["cache", "info", "--feature-cache", str(root)]), str(entry_file), f"{key}: ")


@pytest.mark.parametrize("section, key, value", [("teacher", "dim", "x"), ("teacher", "grid", [14]),
                                                  ("teacher", "dim", 10**9), ("teacher", "grid", [14, 2**40]),
                                                  ("storage", "dtype", "int4"), ("storage", "backend", "tar"),
                                                  ("views", "per_image", 0), ("teacher", "weights_sha256", "ab")])
def test_a_wrong_field_in_the_manifest_is_one_line_naming_the_key(small_cache, tmp_path, section, key, value):
    root = tmp_path / "c"
    shutil.copytree(small_cache, root)
    manifest = json.loads((root / cf.MANIFEST).read_text())
    manifest[section][key] = value
    (root / cf.MANIFEST).write_text(json.dumps(manifest))
    _one_line_error(CliRunner().invoke(cli, ["cache", "info", "--feature-cache", str(root)]), str(root / cf.MANIFEST),
                    f"{section}.{key}: ")


def test_runs_command_knows_what_would_start_a_program():
    for source in ("pipe:cat a.tar", "-", "gs:bucket/a.tar", "ais:a.tar", "http:a.tar"):
        assert cf.runs_command(source), source
    for source in ("/data/a.tar", "a.tar", "file:///data/a.tar", "s3://b/a.tar", "https://h/a.tar", "C:/a.tar"):
        assert not cf.runs_command(source), source


# hostile1: links out of the cache, crafted JSON and counts, crafted wds meta.json


def _link_out(root, tmp_path, what):
    """Move one of the cache's files (the group, a chunk of it, an entry) out of the cache
    and leave a symbolic link to it in its place; -> the outside copy."""
    group = next(p for p in (root / "shards").iterdir() if p.is_dir())
    inside = {"group": group, "chunk": group / "features" / "c" / "0" / "0" / "0",
              "entry": entry_files(root / "shards")[0]}[what]
    outside = tmp_path / "outside" / what
    outside.parent.mkdir(exist_ok=True)
    shutil.move(inside, outside)
    inside.symlink_to(outside, target_is_directory=outside.is_dir())
    return outside


@pytest.mark.parametrize("what, url", [("group", False), ("chunk", False), ("entry", False), ("group", True),
                                       ("chunk", True)])
def test_a_symbolic_link_out_of_the_cache_is_never_followed(small_cache, demo_shards, tmp_path, what, url):
    """A group, one of its chunk files or an entry that is a link out of the cache (the
    same bytes, readable) is refused in one line naming it, by info and pretraining, also
    at a file:// URL (fsspec follows links); `verify --repair` removes the link and never
    what it points to. A cache root that is itself a link reads as usual.

    A chunk file is never looked at before its group is opened (1,024 groups hold ~1.1M
    chunk paths: start-up reads a few zarr.json a group): `cache info`, which reads no
    chunk, follows none and says nothing; pretraining refuses it as the loader opens the
    group, before any row of it is read and so before any step."""
    root = tmp_path / "c"
    shutil.copytree(small_cache, root)
    outside = _link_out(root, tmp_path, what)
    runner = CliRunner()
    given = root.as_uri() if url else str(root)
    for args in (["cache", "info", "--feature-cache", given],
                 ["pretrain", "--shards", str(demo_shards[0]), "--feature-cache", given, "--out",
                  str(tmp_path / "run"), "--model", "mrmae_vit_tiny_patch16", "--no-progress", "--batch-size", "4"]):
        if what == "chunk" and args[0] == "cache":
            assert runner.invoke(cli, args).exit_code == 0
            continue
        _one_line_error(runner.invoke(cli, args), "symbolic link out of the cache", str(outside))
    assert not (tmp_path / "run" / ("checkpoints" if what == "chunk" else "config.json")).exists()
    assert not (tmp_path / "run" / "metrics.jsonl").exists() or not (tmp_path / "run" / "metrics.jsonl").read_text()
    if what != "entry":  # (an entry link stops every reader of the manifest, repair included)
        r = runner.invoke(cli, ["cache", "verify", "--feature-cache", given, "--recompute", "0", "--repair"])
        assert r.exit_code == 1 and "symbolic link out of the cache" in r.output, r.output
        assert not cf.read_manifest(root).shards and outside.exists()
    (tmp_path / "link").symlink_to(small_cache, target_is_directory=True)
    r = runner.invoke(cli, ["cache", "verify", "--feature-cache", str(tmp_path / "link"), "--recompute", "0"])
    assert r.exit_code == 0 and "integrity: OK" in r.output, r.output


@pytest.mark.parametrize("text, what", [
    ('{"num_views": 12, "num_views": 99', "unreadable shard entry (key 'num_views' appears twice"),
    ("[" * 100000, "unreadable shard entry (nested too deeply)")])
def test_a_repeated_key_or_deep_nesting_in_an_entry_is_one_line(small_cache, tmp_path, text, what):
    """json.loads would keep the last of two copies of a key silently, and nesting deep
    enough raises a RecursionError traceback: both are one line naming the entry file."""
    root, entry_file = _crafted(small_cache, tmp_path)
    body = entry_file.read_text()
    entry_file.write_text(text + ", " + body[1:] if text.startswith("{") else text)
    _one_line_error(CliRunner().invoke(cli, ["cache", "info", "--feature-cache", str(root)]), str(entry_file), what)


@pytest.mark.parametrize("fields, key", [({"bytes": 10**400}, "bytes"), ({"num_samples": 10**30}, "num_samples"),
                                         ({"num_views": 13}, "num_views"), ({"num_views": 0}, "num_views")])
def test_a_huge_or_inconsistent_count_in_an_entry_is_refused(small_cache, demo_shards, tmp_path, fields, key):
    """Counts set the length of every training epoch (num_samples) and the sizes `cache
    info` divides: a count beyond 64 bits, or num_views other than num_samples x views per
    image, is one line naming the entry file and the key, in info and pretraining."""
    root, entry_file = _crafted(small_cache, tmp_path, **fields)
    for args in (["cache", "info", "--feature-cache", str(root)],
                 ["pretrain", "--shards", str(demo_shards[0]), "--feature-cache", str(root), "--out",
                  str(tmp_path / "run"), "--model", "mrmae_vit_tiny_patch16", "--no-progress"]):
        _one_line_error(CliRunner().invoke(cli, args), f"{entry_file}: {key}: ")


def test_consistent_counts_other_than_the_stored_rows_are_refused(small_cache, demo_shards, tmp_path):
    """num_samples 5 and num_views 10 agree with each other but not with the 12 rows the
    group holds: the reader says so, naming the group, before any step."""
    root, entry_file = _crafted(small_cache, tmp_path, num_samples=5, num_views=10)
    r = CliRunner().invoke(cli, ["pretrain", "--shards", str(demo_shards[0]), "--feature-cache", str(root), "--out",
                                 str(tmp_path / "run"), "--model", "mrmae_vit_tiny_patch16", "--no-progress"])
    _one_line_error(r, "12 rows stored, its entry records num_views 10")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_two_entries_claiming_one_source_are_refused(small_cache, tmp_path):
    """A second entry (another group's name) whose source is the first one's: readers would
    pick either group for that shard; info, verify and extraction refuse it naming both."""
    root = tmp_path / "c"
    shutil.copytree(small_cache, root)
    first = entry_files(root / "shards")[0]
    group = next(p for p in (root / "shards").iterdir() if p.is_dir())
    twin = group.with_name("twin-00000000." + group.name.split(".")[-1])
    shutil.copytree(group, twin)
    entry = json.loads(first.read_text())
    (root / "shards" / "twin-00000000.json").write_text(json.dumps({**entry, "group": f"shards/{twin.name}"}))
    for args in (["cache", "info", "--feature-cache", str(root)], ["cache", "verify", "--feature-cache", str(root), "--recompute", "0"],
                 ["extract-features", "--shards", entry["source"], "--feature-cache", str(root), "--teacher", DINO_TINY,
                  "--no-progress"]):
        _one_line_error(CliRunner().invoke(cli, args), "is also the source of", str(first),
                        str(root / "shards" / "twin-00000000.json"))


@pytest.mark.parametrize("fmt", ["zarr", "wds"])
def test_a_manifest_width_other_than_the_stored_rows_is_one_line(small_cache, small_wds_cache, demo_shards, tmp_path,
                                                                 fmt):
    """manifest.json says teacher.dim 384, the groups hold 192-wide rows (another cache's
    manifest copied over, or an edit): the reader names the group and both shapes, never a
    shape error in a training step; a Zarr group says so before pretraining writes anything."""
    root = tmp_path / "c"
    shutil.copytree(small_cache if fmt == "zarr" else small_wds_cache, root)
    manifest = json.loads((root / cf.MANIFEST).read_text())
    manifest["teacher"]["dim"] = 384
    (root / cf.MANIFEST).write_text(json.dumps(manifest))
    group = root / cf.read_manifest(root).shards[0].group
    _verify_damaged(root, str(group), "192]", "384]")
    r = CliRunner().invoke(cli, ["pretrain", "--shards", str(demo_shards[0]), "--feature-cache", str(root), "--out",
                                 str(tmp_path / "run"), "--model", "mrmae_vit_tiny_patch16", "--no-progress",
                                 "--batch-size", "4"])  # (an epoch of 6 samples: the loader must be reached)
    _one_line_error(r, str(group), "192]", "384]")
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert fmt == "wds" or not (tmp_path / "run").exists()


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="needs a character device")
def test_a_recorded_source_that_is_a_device_is_never_read(small_cache, tmp_path):
    """An entry whose source is /dev/zero (or a FIFO): `verify --sources` hashed it forever,
    `--add-teacher` read it; both now refuse in one line asking for --shards."""
    root, entry_file = _crafted(small_cache, tmp_path, source="/dev/zero")
    r = subprocess.run([sys.executable, "-m", "mrmae", "cache", "verify", "--feature-cache", str(root), "--recompute", "0", "--sources"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "not a regular file" in r.stderr, r.stderr
    assert str(entry_file) in r.stderr and "--shards" in r.stderr
    _one_line_error(CliRunner().invoke(cli, ["extract-features", "--feature-cache", str(root), "--add-teacher", DINO_TINY,
                                             "--name", "t", "--no-progress"]), "not a regular file", "--shards")


@pytest.fixture(scope="module")
def small_pca_cache(demo_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("pca1") / "c"
    r = CliRunner().invoke(cli, ["extract-features", "--shards", str(demo_shards[0]), "--feature-cache", str(out),
                                 "--teacher", DINO_TINY, "--pca", "8", "--pca-fit-views", "8", "--no-progress"])
    assert r.exit_code == 0, r.output
    return out


@pytest.mark.parametrize("damage", ["complex mean", "nan basis", "float fit_views"])
def test_a_crafted_pca_basis_with_a_matching_sha256_is_refused(small_pca_cache, demo_shards, tmp_path, damage):
    """pca/basis.npz rewritten with a complex mean (cast to float32 silently), a NaN in the
    basis, or a float count, and its sha256 updated in the manifest: pretraining refuses it
    in one line naming the file and the member, before writing anything."""
    import hashlib
    import io

    import numpy as np

    root = tmp_path / "c"
    shutil.copytree(small_pca_cache, root)
    with np.load(root / "pca" / "basis.npz", allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    member = {"complex mean": "mean", "nan basis": "basis", "float fit_views": "fit_views"}[damage]
    if damage == "complex mean":
        arrays["mean"] = arrays["mean"].astype(np.complex64)
    elif damage == "nan basis":
        arrays["basis"][0, 0] = np.nan
    else:
        arrays["fit_views"] = np.array(8.5)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    (root / "pca" / "basis.npz").write_bytes(buf.getvalue())
    manifest = json.loads((root / cf.MANIFEST).read_text())
    manifest["storage"]["pca"]["sha256"] = hashlib.sha256(buf.getvalue()).hexdigest()
    (root / cf.MANIFEST).write_text(json.dumps(manifest))
    r = CliRunner().invoke(cli, ["pretrain", "--shards", str(demo_shards[0]), "--feature-cache", str(root), "--out",
                                 str(tmp_path / "run"), "--model", "mrmae_vit_tiny_patch16", "--batch-size", "4",
                                 "--no-progress"])  # (an epoch of 6 samples: a step of 64 is refused first)
    _one_line_error(r, str(root / "pca" / "basis.npz"), f"{member}.npy")
    assert not (tmp_path / "run" / "config.json").exists()


@pytest.fixture(scope="module")
def small_wds_cache(demo_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("wds1") / "c"
    r = CliRunner().invoke(cli, ["extract-features", "--shards", str(demo_shards[0]), "--feature-cache", str(out),
                                 "--teacher", DINO_TINY, "--format", "wds", "--no-progress"])
    assert r.exit_code == 0, r.output
    return out


@pytest.mark.parametrize("change, what", [
    (lambda m: "a string", "expected a JSON object"), (lambda m: {**m, "key": 5}, "key: wrong type"),
    (lambda m: {**m, "flip": "yes"}, "flip: wrong type"), (lambda m: {**m, "crop": [0, 0, 10**30, 1]}, "crop: wrong"),
    (lambda m: {**m, "crop": [[1, 2], [3, 4]]}, "crop: wrong"), (lambda m: {**m, "extra": {}}, "'extra': unknown"),
    (lambda m: {**m, "checksums": "x"}, "checksums: wrong"), (lambda m: None, "nested too deeply")])
def test_a_crafted_wds_meta_json_is_one_line(small_wds_cache, tmp_path, change, what):
    """A meta.json whose fields have other types or ranges than the writer's, sealed with a
    matching crc32c (and the tar's new sha256 recorded, so only the reader stands in the
    way), is one line naming the tar and the member, never a traceback or a wrong flip."""
    import io
    import tarfile

    from mrmae.shared.cache_format.wds_store import _seal

    root = tmp_path / "c"
    shutil.copytree(small_wds_cache, root)
    entry = cf.read_manifest(root).shards[0]
    tar = root / entry.group
    with tarfile.open(tar) as tf:
        members = [(m, tf.extractfile(m).read()) for m in tf.getmembers()]
    meta = json.loads(members[0][1])
    meta.pop("crc32c")
    new = change(meta)
    members[0] = (members[0][0], b"[" * 60000 if new is None else _seal(new) if isinstance(new, dict)
                  else json.dumps(new).encode())
    with tarfile.open(tar, "w", format=tarfile.GNU_FORMAT) as tf:
        for m, data in members:
            m.size = len(data)
            tf.addfile(m, io.BytesIO(data))
    digest, size = cf.group_digest(tar)
    cf.record_shard(root, cf.ShardEntry(**{**entry.__dict__, "sha256": digest, "bytes": size,
                                           "files": cf.tar_files(tar)}))
    _verify_damaged(root, f"{tar}: member {members[0][0].name}", what)


# --- 2. concurrent writers on one --out lose nothing -----------------------------------

import contextlib  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from click.testing import CliRunner  # noqa: E402
from conftest import DINO_TINY  # noqa: E402

from mrmae.cli import cli  # noqa: E402
from mrmae.demo import write_demo_shards  # noqa: E402
from mrmae.extract.config import ExtractConfig  # noqa: E402
from mrmae.extract.runner import run_extraction  # noqa: E402
from mrmae.shared import cache_format as cf  # noqa: E402
from mrmae.shared.views import ViewConfig  # noqa: E402

_GATE = "MRMAE_TEST_GATE"


def _gated(tar: Path) -> str:
    """A `pipe:` source that reads `tar` at once, or, in a process whose environment names a
    gate file, only once that file exists: the same URL (so the same shard) for both writers,
    while the test decides when the second one may start on it."""
    return (f'pipe:sh -c \'while [ -n "${_GATE}" ] && [ ! -e "${_GATE}" ]; do sleep 0.02; done; '
            f"exec cat {tar}'")


def _extract_cmd(urls: list[str], out: Path, backend: str) -> list[str]:
    return [sys.executable, "-m", "mrmae", "extract-features", "--shards", "::".join(urls), "--feature-cache", str(out),
            "--teacher", DINO_TINY, "--views", "2", "--batch-size", "4", "--workers", "0", "--format", backend,
            "--no-progress"]


def _writing_rows(out: Path, backend: str) -> bool:
    """Whether a writer's temporary on `out` already holds rows (a features chunk, or a few
    views of a tar)."""
    shards = out / "shards"
    if backend == "zarr":
        return bool(list(shards.glob(".tmp-*/features/c"))) if shards.exists() else False
    return any(p.stat().st_size > 100_000 for p in shards.glob(".tmp-*.tar")) if shards.exists() else False


def _cache_rows(root: Path) -> dict[str, dict[str, np.ndarray]]:
    cache = cf.FeatureCache(root)
    return {s.source: cache.shard(s.source).read(slice(None)) for s in cache.complete_shards}


def test_a_run_that_loses_the_manifest_race_to_another_configuration_writes_nothing(demo_shards, tmp_path):
    """Two runs with other --views started on one new --out: both find no manifest; the
    first to create it wins. The other (held in its PCA fit by a gated source, past its
    first check) used to write its 2-view shards into the 3-view cache, making every later
    read fail; it now refuses in one line and writes nothing."""
    out, gate = tmp_path / "c", tmp_path / "gate"
    cmd = lambda views, url: [sys.executable, "-m", "mrmae", "extract-features", "--shards", url,  # noqa: E731
                              "--feature-cache", str(out), "--teacher", DINO_TINY, "--views", views, "--pca", "8",
                              "--pca-fit-views", "8", "--no-progress"]
    held = subprocess.Popen(cmd("2", _gated(demo_shards[0])), env={**os.environ, _GATE: str(gate)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not _gate_waiting(demo_shards[0]):  # its PCA fit reads the shard: past its first check
            assert time.time() < deadline and held.poll() is None, held.communicate()
            time.sleep(0.2)
        first = subprocess.run(cmd("3", str(demo_shards[1])), capture_output=True, text=True, timeout=300)
        assert first.returncode == 0, first.stderr
        gate.touch()
        _, err = held.communicate(timeout=300)
    finally:
        held.kill()
    assert held.returncode == 1 and "views.per_image: cache has 3, asked for 2" in err, err
    assert [e.num_views for e in cf.read_manifest(out).shards] == [18]


def _gate_waiting(tar: Path) -> bool:
    """Whether a gated `pipe:` of `tar` runs (its shell waits for the gate)."""
    for p in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if b"exec cat " + str(tar).encode() in p.read_bytes():
                return True
        except OSError:
            continue
    return False


@pytest.mark.parametrize("backend", cf.BACKENDS)
def test_two_extractions_racing_on_one_shard_both_succeed_and_publish_one_whole_group(tmp_path, backend):
    """Writer A is stopped (SIGSTOP) with rows in its temporary; writer B, started with it,
    then extracts the same shards to the end; A resumes and finishes. Before the fix, B
    deleted A's temporary and A published a group with blank rows (zarr) or crashed (wds)."""
    race = write_demo_shards(tmp_path / "in", num_images=16, shard_size=16, seed=3, prefix="race")[0]
    urls = [_gated(race)]
    out, gate = tmp_path / "c", tmp_path / "gate"
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    a = subprocess.Popen(_extract_cmd(urls, out, backend), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    b = subprocess.Popen(_extract_cmd(urls, out, backend), env={**env, _GATE: str(gate)},
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not _writing_rows(out, backend) and a.poll() is None:
            time.sleep(0.005)
        a.send_signal(signal.SIGSTOP)
        assert _writing_rows(out, backend), "writer A should be stopped with rows in its temporary"
        (a_temp,) = (out / "shards").glob(".tmp-*")
        gate.touch()  # B now reads the shard, extracts it and publishes it
        assert b.wait(120) == 0, b.stderr.read().decode()
        assert a_temp.exists()  # B never removed A's temporary: A is alive (if stopped)
        a.send_signal(signal.SIGCONT)
        assert a.wait(120) == 0, a.stderr.read().decode()  # A finds B's identical group there and yields
    finally:
        for p in (a, b):
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGCONT)
            p.kill() if p.poll() is None else None
    entries = cf.read_manifest(out).shards
    assert len(entries) == 1 and all(e.status == "complete" for e in entries)
    stored = sorted(p.name for p in (out / "shards").iterdir())
    assert stored == sorted([Path(e.group).name for e in entries] + [Path(cf.manifest.entry_path(e.group)).name
                                                                       for e in entries]
                            + [Path(cf.files_path(e.group)).name for e in entries]
                            + (["zarr.json"] if backend == "zarr" else []))  # no temps, no strays
    rows = _cache_rows(out)
    for e in entries:  # exactly its rows, each with its key, views 0, 1 in order
        keys, views = [str(k) for k in rows[e.source]["keys"]], list(rows[e.source]["view"])
        assert len(keys) == e.num_views == 2 * e.num_samples and all(keys)
        assert keys[::2] == keys[1::2] and views == [0, 1] * e.num_samples
    r = CliRunner().invoke(cli, ["cache", "verify", "--feature-cache", str(out), "--recompute", "0"])
    assert r.exit_code == 0 and "integrity: OK" in r.output, r.output
    single = tmp_path / "single"  # the same shards, one process, nobody racing
    run_extraction(ExtractConfig(shards=urls, out=str(single), teacher=DINO_TINY, views=ViewConfig(per_image=2),
                                 format=backend, batch_size=4, progress=False))
    same = lambda m: sorted((e.source, e.group, e.sha256) for e in m.shards)  # noqa: E731
    assert same(cf.read_manifest(out)) == same(cf.read_manifest(single))  # the same bytes, named alike
    for src, cols in _cache_rows(single).items():
        for col, value in cols.items():
            np.testing.assert_array_equal(rows[src][col], value, err_msg=col)


def test_a_writer_leaves_foreign_temps_and_cache_clean_removes_only_leftovers(demo_shards, tmp_path):
    out = tmp_path / "c"
    extract = lambda: run_extraction(ExtractConfig(  # noqa: E731
        shards=str(demo_shards[0]), out=str(out), teacher=DINO_TINY, views=ViewConfig(per_image=2), batch_size=4,
        progress=False))
    extract()
    (entry,) = cf.read_manifest(out).shards
    name, shards = cf.group_name(entry.source), out / "shards"
    live = shards / f".tmp-{name}-otherhost-4242-0badcafe"  # a writer on another machine, writing now
    (live / "features").mkdir(parents=True)
    (live / "features" / "zarr.json").write_text("{}")
    dead = shards / f".tmp-{name}-thishost-17-deadbeef.tar"  # a writer killed two days ago
    dead.write_bytes(b"half a tar")
    stray = shards / f"{name}.0123456789abcdef"  # published by a writer killed before its entry
    shutil.copytree(out / entry.group, stray)
    stray_list = shards / f"{name}.0123456789abcdef.files"  # ... with its file list (format 6)
    stray_list.write_text('{"files":{}}')
    old = time.time() - 48 * 3600
    for p in [dead, stray, stray_list, *stray.rglob("*")]:
        os.utime(p, (old, old))
    (out / entry.group).rename(out / "gone")  # recorded complete but missing: redone by the next run
    shutil.rmtree(out / "gone")
    assert extract()["extracted"] == 1
    assert live.exists() and dead.exists() and stray.exists()  # a writer removes nothing but its own temp
    runner = CliRunner()
    r = runner.invoke(cli, ["cache", "clean", "--feature-cache", str(out), "--dry-run"])
    assert r.exit_code == 0 and dead.exists() and str(dead) in r.output and str(live) not in r.output, r.output
    r = runner.invoke(cli, ["cache", "clean", "--feature-cache", str(out)])  # default: leftovers untouched for 24 h
    assert r.exit_code == 0 and "3 leftovers removed" in r.output, r.output
    assert live.exists() and not dead.exists() and not stray.exists() and not stray_list.exists()
    r = runner.invoke(cli, ["cache", "clean", "--feature-cache", str(out), "--older-than", "0"])  # no writer running now
    assert r.exit_code == 0 and not live.exists(), r.output
    assert sorted(p.name for p in shards.iterdir()) == sorted([Path(entry.group).name, Path(cf.files_path(entry.group)).name,
                                                               f"{name}.json", "zarr.json"])
    assert cf.check_integrity(out) == [] and cf.read_manifest(out).shards[0].sha256 == entry.sha256


def test_cache_clean_never_removes_the_input_tars_beside_the_groups(demo_shards, tmp_path):
    """--out DATA with the inputs in DATA/shards/ (as many datasets lay them out): the cache
    and the tars share shards/. `cache clean --older-than 0` removes only what writers name
    (temporaries, groups named after their bytes), never the tars no entry points to."""
    data = tmp_path / "data"
    (data / "shards").mkdir(parents=True)
    tars = [Path(shutil.copy(p, data / "shards")) for p in demo_shards[:2]]
    r = CliRunner().invoke(cli, ["extract-features", "--shards", "::".join(map(str, tars)), "--feature-cache", str(data),
                                 "--teacher", DINO_TINY, "--format", "wds", "--no-progress"])
    assert r.exit_code == 0, r.output
    stray = data / "shards" / "x-01234567.0123456789abcdef.tar"  # a killed writer's group, published
    stray.write_bytes(b"a tar")
    r = CliRunner().invoke(cli, ["cache", "clean", "--feature-cache", str(data), "--older-than", "0"])
    assert r.exit_code == 0 and "1 leftovers removed" in r.output and not stray.exists(), r.output
    assert all(t.exists() for t in tars) and cf.check_integrity(data) == []


@pytest.mark.parametrize("backend", cf.BACKENDS)
def test_a_group_whose_rows_were_lost_under_its_writer_is_never_published(tmp_path, backend):
    rng = np.random.default_rng(0)
    writer = cf.open_shard_writer(backend, tmp_path, "/data/s.tar", 40, 8, 196, "int8")

    def append(first: int, n: int) -> None:
        keys = [f"k{(first + i) // 2}" for i in range(n)]
        writer.append(keys, np.arange(first, first + n) % 2, np.tile([0, 0, 8, 8], (n, 1)), np.zeros(n, bool),
                      rng.normal(size=(n, 196, 8)).astype(np.float32), np.ones((n, 196)), np.ones((n, 8)))

    append(0, 16)
    cf.common.remove_path(writer.tmp)  # what a racing writer's cleanup did before the fix
    append(16, 8)
    expected = [(f"k{i}", v) for i in range(12) for v in (0, 1)]
    with pytest.raises(cf.CacheError, match=r"/data/s\.tar not published"):
        writer.finish({"source": "/data/s.tar", "num_samples": 12}, expected)
    writer.abort()
    assert not list(tmp_path.glob("shards/*"))  # nothing published, nothing left

    writer = cf.open_shard_writer(backend, tmp_path, "/data/s.tar", 40, 8, 196, "int8")
    append(0, 24)
    with pytest.raises(cf.CacheError, match=r"24 rows written, 26 expected.*/data/s\.tar not published"):
        writer.finish({"source": "/data/s.tar", "num_samples": 13}, expected + [("k12", 0), ("k12", 1)])
    writer.abort()
    assert not list(tmp_path.glob("shards/*"))


def _synthetic_writer(backend: str, root: str, source: str = "/data/s.tar"):
    """A writer of one shard holding 6 samples x 2 views of fixed rows."""
    rng = np.random.default_rng(1)
    w = cf.open_shard_writer(backend, root, source, 12, 8, 196, "int8")
    w.append([f"k{i // 2}" for i in range(12)], np.arange(12) % 2, np.tile([0, 0, 8, 8], (12, 1)), np.zeros(12, bool),
             rng.normal(size=(12, 196, 8)).astype(np.float32), np.ones((12, 196)), np.ones((12, 8)))
    return w


def _entry(w, digest: str, size: int) -> cf.ShardEntry:
    return cf.ShardEntry(w.source, w.group_path, 6, 12, (), "complete", digest, size, files=w.files)


@pytest.mark.parametrize("backend", cf.BACKENDS)
@pytest.mark.parametrize("where", ["local", "file-url", "memory-url"])
def test_the_second_writer_of_the_same_bytes_yields_and_damage_under_the_name_is_replaced(tmp_path, backend, where):
    import uuid

    import fsspec

    root = {"local": str(tmp_path / "c"), "file-url": f"file://{tmp_path}/c",
            "memory-url": f"memory://mrmae-race-{uuid.uuid4().hex}/c"}[where]
    teacher = {"spec": "dino:synthetic", "family": "dino", "arch": "synthetic", "weights": None,
               "weights_sha256": "0" * 64, "input_size": 224, "patch_size": 16, "grid": [14, 14], "dim": 8,
               "mean": [0.5] * 3, "std": [0.5] * 3, "layers": []}
    cf.init_cache(root, cf.new_manifest(teacher, ViewConfig(per_image=2),
                                        cf.storage_section(backend, "int8"), "test"))
    first, second = _synthetic_writer(backend, root), _synthetic_writer(backend, root)  # both writing at once
    a, b = first.finish({"source": first.source, "num_samples": 6}), second.finish({"source": first.source,
                                                                                     "num_samples": 6})
    assert a == b and first.group_path == second.group_path and first.tmp != second.tmp
    assert cf.commit_shard(root, first, _entry(first, *a)) is True
    assert cf.commit_shard(root, second, _entry(second, *b)) is False  # same bytes there: it yields
    loc = cf.Location(root)
    assert [e.group for e in cf.read_manifest(root).shards] == [first.group_path]
    group_meta = ["zarr.json"] if backend == "zarr" else []  # the `shards` group's own metadata
    published = [first.group_path.split("/")[1], cf.files_path(first.group_path).split("/")[1], f"{first.name}.json"]
    assert loc.children("shards") == sorted([*published, *group_meta])
    assert cf.check_integrity(root) == []
    # Damage under the group's name (a flipped byte; for Zarr a stray file too): a writer of
    # those bytes puts them back instead of yielding to it.
    fs, path = fsspec.core.url_to_fs(loc.join(first.group_path))
    victim = sorted(p for p in fs.find(path) if "features" in p or p.endswith(".tar"))[-1]
    data = bytearray(fs.cat_file(victim))
    data[len(data) // 2] ^= 0xFF
    fs.pipe_file(victim, bytes(data))
    if backend == "zarr":
        fs.pipe_file(f"{path}/features/stray", b"x")
    assert len(cf.check_integrity(root)) == 1
    third = _synthetic_writer(backend, root)
    assert cf.commit_shard(root, third, _entry(third, *third.finish({"source": third.source, "num_samples": 6})))
    assert cf.check_integrity(root) == [] and loc.children("shards") == sorted([*published, *group_meta])


@contextlib.contextmanager
def _tmpfs(path: Path, options: str):
    """A small tmpfs at `path` (root with CAP_SYS_ADMIN only: chmod means nothing to root)."""
    path.mkdir(parents=True)
    if shutil.which("mount") is None or subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                                                       capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN): no way to fill or freeze a disk")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _extract_cli(shards: list[Path], out: Path):
    return CliRunner().invoke(cli, ["extract-features", "--shards", "::".join(map(str, shards)), "--feature-cache", str(out),
                                    "--teacher", DINO_TINY, "--views", "2", "--batch-size", "4", "--no-progress"])


def test_a_full_disk_during_extraction_is_one_line_naming_the_path(demo_shards, tmp_path):
    with _tmpfs(tmp_path / "small", "size=160k") as out:  # the manifest fits, a shard group does not
        r = _extract_cli(demo_shards[:1], out)
        assert r.exit_code == 1, r.output
        (line,) = [ln for ln in r.output.splitlines() if ln.startswith("mrmae: error:")]
        assert "No space left on device" in line and str(out) in line and "Traceback" not in r.output
        assert cf.read_manifest(out).shards == () and not list((out / "shards").glob(".tmp-*"))


def test_a_read_only_out_is_one_line_naming_the_path(demo_shards, tmp_path):
    with _tmpfs(tmp_path / "ro", "size=8m") as out:
        assert _extract_cli(demo_shards[:1], out).exit_code == 0
        if os.geteuid() == 0:
            assert subprocess.run(["mount", "-o", "remount,ro", str(out)]).returncode == 0
        else:
            os.chmod(out / "shards", 0o555)
        r = _extract_cli(demo_shards[:2], out)  # the first shard is complete; the second cannot be written
        assert r.exit_code == 1, r.output
        (line,) = [ln for ln in r.output.splitlines() if ln.startswith("mrmae: error:")]
        assert ("Read-only file system" in line or "Permission denied" in line) and str(out / "shards") in line
        assert "Traceback" not in r.output and len(cf.read_manifest(out).shards) == 1


# --- 3. every chunk read is checked; damage is found and repaired ----------------------

import io  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tarfile  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


def _extract3(shards, out, fmt="zarr", **kw):
    from conftest import DINO_TINY

    from mrmae.extract.config import ExtractConfig
    from mrmae.extract.runner import run_extraction
    from mrmae.shared.views import ViewConfig

    return run_extraction(ExtractConfig(shards=shards, out=str(out), teacher=DINO_TINY, format=fmt,
                                        views=ViewConfig(per_image=2, seed=3), batch_size=12, progress=False, **kw))


@pytest.fixture(scope="module")
def caches3(demo_shards, tmp_path_factory) -> dict:
    """One undamaged cache of the first demo shard per backend, copied by each test that damages it."""
    root = tmp_path_factory.mktemp("s3")
    out = {fmt: root / fmt for fmt in ("zarr", "wds")}
    for fmt, path in out.items():
        _extract3(str(demo_shards[0]), path, fmt)
    return out


def _group3(cache) -> Path:
    from mrmae.shared import cache_format as cf

    return Path(cache) / cf.read_manifest(cache).shards[0].group


def _flip3(path, offset: int) -> None:
    data = bytearray(Path(path).read_bytes())
    data[offset] ^= 0x5A
    Path(path).write_bytes(bytes(data))


def _chunk3(group, array: str) -> Path:
    return next(f for f in sorted((group / array / "c").rglob("*")) if f.is_file())


def _members3(tar_path, suffix: str) -> list[tuple[int, int]]:
    """(data offset, size) of every member of a tar whose name ends with `suffix`."""
    with tarfile.open(tar_path) as tf:
        return [(i.offset_data, i.size) for i in tf if i.name.endswith(suffix)]


def _pretrain3(shards, cache, out) -> list[str]:
    """`mrmae pretrain` (in this process: the CLI as a user runs it) -> the lines it prints,
    asserting exit status 1."""
    from click.testing import CliRunner
    from test_pretrain import TINY

    from mrmae.cli import cli

    r = CliRunner().invoke(cli, ["pretrain", "--shards", shards, "--feature-cache", str(cache), "--out", str(out), *TINY])
    assert r.exit_code == 1, r.output + repr(r.exception)
    return [ln for ln in r.output.splitlines() if ln.strip() and "RANDOM WEIGHTS" not in ln
            and not ln.startswith("pretrain: ")]  # (the run's start line)


def _nothing_trained3(out) -> bool:
    return not (Path(out) / "checkpoints").exists() or not any((Path(out) / "checkpoints").iterdir())


@pytest.mark.parametrize("damage", ["missing features chunk", "features", "features_scale", "crop"])
def test_s3_damaged_zarr_chunk_stops_pretraining_in_one_line(demo_shards, caches3, tmp_path, damage):
    """A deleted chunk file, or one flipped byte in a features, scale or crop chunk: one
    line naming the group and the array, nothing trained (before format 4: zeros, targets
    off by up to 19.5, or a 129 GB allocation)."""
    cache = tmp_path / "c"
    shutil.copytree(caches3["zarr"], cache)
    group = _group3(cache)
    array = "features" if damage.startswith("missing") else damage
    chunk = _chunk3(group, array)
    if damage.startswith("missing"):
        chunk.unlink()
    else:
        _flip3(chunk, chunk.stat().st_size // 2)
    lines = _pretrain3(str(demo_shards[0]), cache, tmp_path / "o")
    assert len(lines) == 1 and lines[0].startswith("mrmae: error: "), lines
    assert str(group) in lines[0] and f"file {array}/c/0/" in lines[0] and "(rows 0-11)" in lines[0], lines[0]
    assert ("missing" if damage.startswith("missing") else "sha256 differs from the entry's") in lines[0], lines[0]
    assert _nothing_trained3(tmp_path / "o")


@pytest.mark.parametrize("member", ["features.npy.zst", "scale.npy.zst", "meta.json", "missing features"])
def test_s3_damaged_wds_member_stops_pretraining_in_one_line(demo_shards, caches3, tmp_path, member):
    """The same on a wds tar: a flipped byte in a features or scale member (zstd frame
    checksum) or in meta.json's crop (its own crc32c), or a sample without its features
    member: one line naming the tar and the member, nothing trained."""
    cache = tmp_path / "c"
    shutil.copytree(caches3["wds"], cache)
    tar = _group3(cache)
    if member.startswith("missing"):  # rewrite the tar without the first features member
        with tarfile.open(tar) as tf:
            kept = [(i, tf.extractfile(i).read()) for i in tf]
        drop = next(i.name for i, _ in kept if i.name.endswith(".features.npy.zst"))
        with tarfile.open(tar, "w", format=tarfile.PAX_FORMAT) as tf:
            for info, data in kept:
                if info.name != drop:
                    tf.addfile(info, io.BytesIO(data))
    elif member == "meta.json":  # a digit of the first crop box: still a valid JSON, a valid box
        offset, size = _members3(tar, member)[0]
        data = bytearray(Path(tar).read_bytes())
        at = offset + data[offset:offset + size].index(b'"crop": [') + len(b'"crop": [')
        data[at] = ord("1") if data[at] != ord("1") else ord("2")
        Path(tar).write_bytes(bytes(data))
    else:  # every row's member: training reads one view per sample, whichever it draws
        for offset, size in _members3(tar, member):
            _flip3(tar, offset + size // 2)
    lines = _pretrain3(str(demo_shards[0]), cache, tmp_path / "o")
    assert len(lines) == 1 and lines[0].startswith("mrmae: error: "), lines
    assert str(tar) in lines[0], lines[0]
    want = "member demo_00000000_v0.features.npy.zst (row 0): listed in the entry, not in the tar" \
        if member.startswith("missing") else f".{member.split('.')[0]}"
    assert want in lines[0], lines[0]
    assert _nothing_trained3(tmp_path / "o")


def _downgrade3(cache: Path) -> None:
    """Make a cache what format 3 wrote: no crc32c codec on any array, chunks equal to the
    fill value not written, manifest format_version 3."""
    import zarr
    from zarr.codecs import Crc32cCodec

    from mrmae.shared import cache_format as cf

    for entry in cf.read_manifest(cache).shards:
        group = zarr.open_group(str(cache / entry.group), mode="r+")
        for name, arr in list(group.arrays()):
            data, chunks, attrs = arr[:], arr.chunks, dict(arr.attrs)
            compressors = [c for c in arr.compressors if not isinstance(c, Crc32cCodec)]
            del group[name]
            group.create_array(name, data=data, chunks=chunks, compressors=compressors or None).attrs.update(attrs)
    manifest = json.loads((cache / cf.MANIFEST).read_text())
    manifest["format_version"] = 3
    (cache / cf.MANIFEST).write_text(json.dumps(manifest))
    for entry_file in (cache / "shards").glob("*.json"):  # (format 3 entries list no files)
        entry = json.loads(entry_file.read_text())
        if "file_list" in entry:
            entry.pop("file_list")
            entry_file.write_text(json.dumps(entry))


def _set_crops3(cache: Path, change) -> Path:
    """Rewrite the first group's crop boxes (through zarr: an unchecked cache shows nothing)."""
    import zarr

    group = _group3(cache)
    crop = zarr.open_array(str(group / "crop"), mode="r+")
    boxes = crop[:]
    change(boxes)
    crop[:] = boxes
    _reseal3(cache)  # (the entry lists the new bytes: only the crop checks stand in the way)
    return group


def _reseal3(cache: Path) -> None:
    """Record each group's bytes as they are now in its entry (files, sha256, bytes): a cache
    crafted whole, whose entries agree with its groups."""
    import dataclasses

    from mrmae.shared import cache_format as cf

    for entry in cf.read_manifest(cache).shards:
        digest, size, files = cf.group_files(cache / entry.group)
        cf.record_shard(cache, dataclasses.replace(entry, sha256=digest, bytes=size, files=files))


def test_s3_format_3_cache_trains_with_one_warning_and_checked_crops(demo_shards, tmp_path):
    """A format 3 cache (no checksums) of two shards still trains, with exactly one warning
    for the process, not one per shard or per cache opened; its crop boxes are still
    checked: against the decoded image when rendered, and for absurd values when read."""
    import warnings

    from click.testing import CliRunner
    from test_pretrain import TINY

    from mrmae.cli import cli
    from mrmae.shared import cache_format as cf
    from mrmae.shared.cache_format import common

    cache = tmp_path / "c"
    shards = "::".join(str(p) for p in demo_shards[:2])
    _extract3(shards, cache)
    _downgrade3(cache)
    common._warned_unchecked = False  # a fresh process, as far as this warning goes
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        r = CliRunner().invoke(cli, ["pretrain", "--shards", shards, "--feature-cache", str(cache),
                                     "--out", str(tmp_path / "o"), *TINY])
        for _ in range(2):  # more caches and shards opened: still the one warning
            c = cf.FeatureCache(cache)
            for entry in c.complete_shards:
                c.shard(entry.source).read(slice(None))
    assert r.exit_code == 0, r.output + repr(r.exception)
    unchecked = [w for w in seen if issubclass(w.category, common.UncheckedCacheWarning)]
    assert len(unchecked) == 1 and "format 3 cache" in str(unchecked[0].message), [str(w.message) for w in seen]

    def outside(boxes):  # a box below the image: torchvision would pad it
        boxes[:, 0] = 5000

    group = _set_crops3(cache, outside)
    lines = _pretrain3(shards, cache, tmp_path / "o2")
    assert len(lines) == 1 and str(group) in lines[0] and "key demo_" in lines[0], lines
    assert "is not inside the" in lines[0] and _nothing_trained3(tmp_path / "o2")

    def absurd(boxes):  # what a flipped high bit makes of a height: 129 GB asked for, before
        boxes[0, 2] = 1 << 30

    group = _set_crops3(cache, absurd)
    lines = _pretrain3(shards, cache, tmp_path / "o3")
    assert len(lines) == 1 and str(group) in lines[0] and "is not a box in any image" in lines[0], lines
    assert _nothing_trained3(tmp_path / "o3")


def test_s3_a_cached_crop_outside_its_image_stops_add_teacher_in_one_line(demo_shards, caches3, tmp_path):
    """--add-teacher replays the cache's views: a box that does not fit the decoded image
    (here written through zarr, so its checksum is valid) is one line naming the key."""
    from click.testing import CliRunner
    from conftest import DINO_TINY

    from mrmae.cli import cli

    cache = tmp_path / "c"
    shutil.copytree(caches3["zarr"], cache)

    def wide(boxes):
        boxes[:, 3] = 100_000

    _set_crops3(cache, wide)
    r = CliRunner().invoke(cli, ["extract-features", "--feature-cache", str(cache), "--add-teacher", DINO_TINY, "--name", "again",
                                 "--shards", str(demo_shards[0]), "--no-progress"])
    lines = [ln for ln in r.output.splitlines() if ln.startswith("mrmae: error")]
    assert r.exit_code == 1 and len(lines) == 1, r.output
    assert "key demo_" in lines[0] and "is not inside the" in lines[0], lines[0]


@pytest.mark.parametrize("fmt", ["zarr", "wds"])
def test_s3_verify_repair_then_extraction_redoes_only_the_damaged_shard(demo_shards, tmp_path, fmt):
    """`cache verify --repair` marks the damaged shard incomplete; the next extraction
    redoes that shard alone, and the cache then verifies and holds the bytes of an
    undamaged extraction."""
    from click.testing import CliRunner

    from mrmae.cli import cli
    from mrmae.shared import cache_format as cf

    cache = tmp_path / "c"
    shards = "::".join(str(p) for p in demo_shards[:2])
    _extract3(shards, cache, fmt)
    before = {e.group: e.sha256 for e in cf.read_manifest(cache).shards}
    damaged = cache / sorted(before)[1]
    _flip3(_chunk3(damaged, "features") if fmt == "zarr" else damaged, 3000)

    r = CliRunner().invoke(cli, ["cache", "verify", "--feature-cache", str(cache), "--recompute", "0", "--repair"])
    repaired = [ln for ln in r.output.splitlines() if ln.startswith("mrmae: repaired")]
    assert r.exit_code == 1 and len(repaired) == 1 and str(damaged) in repaired[0], r.output
    assert not damaged.exists() and [e.group for e in cf.read_manifest(cache).shards] == [sorted(before)[0]]

    summary = _extract3(shards, cache, fmt)
    assert summary["extracted"] == 1 and summary["skipped_complete"] == 1, summary
    r = CliRunner().invoke(cli, ["cache", "verify", "--feature-cache", str(cache), "--recompute", "0"])
    assert r.exit_code == 0 and "integrity: OK" in r.output, r.output
    assert {e.group: e.sha256 for e in cf.read_manifest(cache).shards} == before


# --- 4. a truncated tar is an error, never a shorter complete shard -------------------

def _cut_at(data: bytes, where: str) -> bytes:
    """A tar cut inside its 2nd member's data, exactly after it, or inside the 3rd header."""
    import io
    import tarfile

    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        second, third = tf.getmembers()[1:3]
    return data[:{"mid-member": second.offset_data + second.size // 2, "boundary": third.offset,
                  "in-header": third.offset + 100}[where]]


def _error_line(r) -> str:
    """The one `mrmae: error:` line of a failed CliRunner run (exit 1, no traceback)."""
    lines = [ln for ln in r.output.splitlines() if ln.startswith("mrmae: error:")]
    assert r.exit_code == 1 and len(lines) == 1 and "Traceback" not in r.output, r.output + repr(r.exception)
    return lines[0]


@pytest.mark.parametrize("where", ["mid-member", "boundary", "in-header"])
def test_4_truncated_shard_stops_extraction_and_pretraining_naming_it(demo_shards, tmp_path, where):
    from click.testing import CliRunner
    from conftest import DINO_TINY

    from mrmae.cli import cli
    from mrmae.shared import cache_format as cf

    cut = tmp_path / "demo-000000.tar"
    cut.write_bytes(_cut_at(demo_shards[0].read_bytes(), where))
    for url in (str(cut), f"pipe:cat {cut}"):
        out = tmp_path / ("c-pipe" if url.startswith("pipe:") else "c-path")
        r = CliRunner().invoke(cli, ["extract-features", "--shards", f"{demo_shards[1]}::{url}", "--feature-cache", str(out),
                                     "--teacher", DINO_TINY, "--views", "1", "--no-progress"])
        assert _error_line(r).startswith(f"mrmae: error: {url}: truncated tar")
        entries = cf.read_manifest(out).shards  # the whole shard before it is kept; the cut one is not
        assert [e.source for e in entries if e.status == "complete"] == [str(demo_shards[1])]
        r = CliRunner().invoke(cli, ["pretrain", "--shards", url, "--out", str(tmp_path / "p"), "--model",
                                     "mrmae_vit_tiny_patch16", "--workers", "0", "--no-progress"])  # plain: counts samples first
        assert _error_line(r).startswith(f"mrmae: error: {url}: truncated tar")


def test_4_truncated_pipe_shard_is_one_line_from_a_real_process(demo_shards, tmp_path):
    import subprocess
    import sys

    from conftest import DINO_TINY

    cut = tmp_path / "demo-000000.tar"
    cut.write_bytes(_cut_at(demo_shards[0].read_bytes(), "boundary"))
    r = subprocess.run([sys.executable, "-m", "mrmae", "extract-features", "--shards", f"pipe:cat {cut}", "--feature-cache",
                        str(tmp_path / "c"), "--teacher", DINO_TINY, "--views", "1", "--no-progress"],
                       capture_output=True, text=True, timeout=120)
    errors = [ln for ln in r.stderr.splitlines() if "error" in ln.lower()]
    assert r.returncode == 1 and len(errors) == 1 and "Traceback" not in r.stderr, r.stderr
    assert errors[0].startswith(f"mrmae: error: pipe:cat {cut}: truncated tar: ends without its end-of-archive")

# --- 5. shard identity: the bytes trained on are the bytes extracted -------------------

TINY_PRETRAIN = ["--model", "mrmae_vit_tiny_patch16", "--decoder-depth", "1", "--decoder-dim", "64",
                 "--batch-size", "6", "--workers", "0", "--no-progress", "--seed", "3", "--lr", "1e-3"]


def test_5_plain_live_and_finetune_count_pipe_and_url_shards(demo_shards, tmp_path):
    """`count_samples` reads `pipe:` and fsspec shards as it reads local ones; plain and live
    pretraining and fine-tuning run on them."""
    import json

    import fsspec
    from click.testing import CliRunner
    from conftest import DINO_TINY
    from test_finetune import FT, save_small_student

    from mrmae.cli import cli
    from mrmae.train.pretrain import count_samples

    with fsspec.open("memory://faults-5/demo-000001.tar", "wb") as f:
        f.write(demo_shards[1].read_bytes())
    shards = f"pipe:cat {demo_shards[0]}::memory://faults-5/demo-000001.tar"
    assert count_samples([f"pipe:cat {demo_shards[0]}", "memory://faults-5/demo-000001.tar",
                          f"file://{demo_shards[2]}"], None) == 18
    for mode, extra in (("plain", []), ("live", ["--teacher", DINO_TINY])):
        r = CliRunner().invoke(cli, ["pretrain", "--shards", shards, "--out", str(tmp_path / mode), *TINY_PRETRAIN,
                                     *extra])
        assert r.exit_code == 0, r.output + repr(r.exception)
        steps = [json.loads(ln) for ln in (tmp_path / mode / "metrics.jsonl").read_text().splitlines()]
        assert len(steps) == 2  # 12 samples counted, batch 6
    save_small_student(tmp_path / "student")
    r = CliRunner().invoke(cli, ["finetune", "--checkpoint", str(tmp_path / "student"), "--shards", shards,
                                 "--val-shards", f"file://{demo_shards[2]}", "--out", str(tmp_path / "ft"), *FT,
                                 "--epochs", "1"])
    assert r.exit_code == 0, r.output + repr(r.exception)
    assert [m["step"] for m in map(json.loads, (tmp_path / "ft" / "metrics.jsonl").read_text().splitlines())
            if "loss" in m] == [1, 2, 3]  # 12 images / batch 4


def _other_images(tmp_path, n: int = 12):
    """(shard A, shard B, cache of A): B has A's file name and keys, other images."""
    from conftest import DINO_TINY

    from mrmae.demo import write_demo_shards
    from mrmae.extract.config import ExtractConfig
    from mrmae.extract.runner import run_extraction
    from mrmae.shared.views import ViewConfig

    a = write_demo_shards(tmp_path / "a", num_images=n, shard_size=n, seed=0)[0]
    b = write_demo_shards(tmp_path / "b", num_images=n, shard_size=n, seed=1)[0]
    assert a.name == b.name and a.read_bytes() != b.read_bytes()
    cache = tmp_path / "cache"
    run_extraction(ExtractConfig(shards=str(a), out=str(cache), teacher=DINO_TINY, views=ViewConfig(per_image=1),
                                 batch_size=12, progress=False))
    return a, b, cache


def test_5_other_images_behind_the_same_name_stop_pretraining_before_any_step(tmp_path):
    """A cache extracted from shard A; pretraining (a real process) on `pipe:cat B`, B holding
    the same file and key names with other images: one line naming the shard and its FIRST
    key, before any step (no metrics line, no checkpoint; with the shard-level sha256 alone,
    a batch of B's images trained before the shard's end). At a URL alike."""
    import io
    import subprocess
    import sys
    import tarfile

    import fsspec
    from click.testing import CliRunner

    from mrmae.cli import cli

    a, b, cache = _other_images(tmp_path)
    args = ["pretrain", "--feature-cache", str(cache), *TINY_PRETRAIN, "--shuffle-buffer", "0",
            "--save-every-steps", "1"]
    r = CliRunner().invoke(cli, [*args, "--shards", f"pipe:cat {a}", "--out", str(tmp_path / "ok")])
    assert r.exit_code == 0, r.output + repr(r.exception)  # the extracted bytes, piped: trains
    assert len((tmp_path / "ok" / "metrics.jsonl").read_text().splitlines()) == 2
    out = tmp_path / "other"
    r = subprocess.run([sys.executable, "-m", "mrmae", *args, "--shards", f"pipe:cat {b}", "--out", str(out)],
                       capture_output=True, text=True, timeout=120)
    errors = [ln for ln in r.stderr.splitlines() if "error" in ln.lower()]
    assert r.returncode != 0 and len(errors) == 1 and "Traceback" not in r.stderr, r.stderr
    assert errors[0].startswith(f"mrmae: error: pipe:cat {b}: key demo_00000000: image differs from the one "
                                f"extracted into {cache}"), errors[0]
    written = {p.relative_to(out).as_posix(): p for p in out.rglob("*") if p.is_file()}
    assert set(written) <= {"config.json", "metrics.jsonl"}, sorted(written)  # no checkpoint
    assert "metrics.jsonl" not in written or written["metrics.jsonl"].read_text() == ""  # no step
    with fsspec.open(f"memory://faults-5b/{b.name}", "wb") as f:  # a URL: no size to compare, only bytes
        f.write(b.read_bytes())
    r = CliRunner().invoke(cli, [*args, "--shards", f"memory://faults-5b/{b.name}", "--out", str(tmp_path / "url")])
    assert _error_line(r).startswith(f"mrmae: error: memory://faults-5b/{b.name}: key demo_00000000: image differs")
    # A's images, another label member: the images pass, the shard's sha256 stops it
    relabelled = tmp_path / "c" / a.name
    relabelled.parent.mkdir()
    with tarfile.open(a) as src, tarfile.open(relabelled, "w") as dst:
        for m in src.getmembers():
            data = src.extractfile(m).read()
            data = b"99" if m.name.endswith(".cls") else data
            m.size = len(data)
            dst.addfile(m, io.BytesIO(data))
    r = CliRunner().invoke(cli, [*args, "--shards", f"pipe:cat {relabelled}", "--out", str(tmp_path / "cls")])
    assert _error_line(r).startswith(f"mrmae: error: pipe:cat {relabelled}: not the shard extracted into {cache}")


def test_5_add_teacher_verify_and_visualize_refuse_other_images_behind_the_same_name(tmp_path):
    """--add-teacher --shards B replays A's views: B's first image is refused before any view
    is rendered, one line naming the shard and key; no target shard is written. `cache
    verify --shards B` and `visualize --shards B` alike."""
    from click.testing import CliRunner
    from conftest import DINO_TINY

    from mrmae.cli import cli

    a, b, cache = _other_images(tmp_path, n=6)
    r = CliRunner().invoke(cli, ["extract-features", "--feature-cache", str(cache), "--add-teacher", DINO_TINY, "--name", "t",
                                 "--shards", str(b), "--no-progress"])
    assert _error_line(r).startswith(f"mrmae: error: {b}: key demo_00000000: image differs from the one extracted "
                                     f"into {cache}")
    assert [p.name for p in (cache / "targets" / "t").glob("shards/*")] in ([], ["zarr.json"])  # no shard written
    # cache verify's re-rendering and visualize replay views from B alike: refused, naming the key
    r = CliRunner().invoke(cli, ["cache", "verify", "--feature-cache", str(cache), "--recompute", "2", "--shards", str(b)])
    assert f"{b}: key demo_0000000" in _error_line(r) and "image differs from the one extracted" in _error_line(r)
    r = CliRunner().invoke(cli, ["visualize", "--feature-cache", str(cache), "--shards", str(b), "--num", "1",
                                 "--out", str(tmp_path / "v")])
    assert _error_line(r).startswith(f"mrmae: error: {b}: key demo_00000000: image differs from the one extracted")


@pytest.mark.parametrize("backend", ["zarr", "wds"])
def test_5_rows_record_their_image_sha256(demo_shards, tmp_path, backend):
    """Every row records the sha256 of the image file its view was rendered from (Zarr:
    array image_sha256 [N, 32] uint8 with a crc32c; wds: sealed meta.json field); a damaged
    digest is one line naming the shard."""
    import dataclasses
    import hashlib
    import json
    from pathlib import Path

    import numpy as np
    from conftest import DINO_TINY

    from mrmae.extract.config import ExtractConfig
    from mrmae.extract.runner import run_extraction
    from mrmae.shared import cache_format as cf
    from mrmae.shared.shards import read_shard
    from mrmae.shared.views import ViewConfig

    cache = tmp_path / "cache"
    run_extraction(ExtractConfig(shards=str(demo_shards[0]), out=str(cache), teacher=DINO_TINY, format=backend,
                                 views=ViewConfig(per_image=2), batch_size=12, progress=False))
    group = cf.FeatureCache(str(cache)).shard(str(demo_shards[0]))
    images = {s.key: hashlib.sha256(s.image).digest() for s in read_shard(str(demo_shards[0]))}
    digests = group.image_digests()
    assert digests.dtype == np.uint8 and digests.shape == (12, 32)
    assert [group.image_digest(i) for i in range(12)] == [images[str(k)] for k in group.keys]
    if backend == "zarr":
        meta = json.loads((Path(group.path) / "image_sha256" / "zarr.json").read_text())
        assert "crc32c" in [c["name"] for c in meta["codecs"]]
        chunk = Path(group.path) / "image_sha256" / "c" / "0" / "0"
        data = bytearray(chunk.read_bytes())
        data[len(data) // 2] ^= 0xFF
        chunk.write_bytes(bytes(data))
        with pytest.raises(cf.CacheError, match=r"file image_sha256/c/0/0 \(all rows\): sha256 differs"):
            cf.ShardGroup(group.path, group.entry).image_digests()  # (its entry lists the file's sha256)
        with pytest.raises(cf.CacheError, match=r"array image_sha256, all rows: unreadable chunk"):
            cf.ShardGroup(group.path, dataclasses.replace(group.entry, files=None)).image_digests()  # format 4
    else:  # the field is sealed: another digest fails meta.json's crc32c
        import tarfile

        with tarfile.open(group.path) as tf:
            first = next(m for m in tf.getmembers() if m.name.endswith(".meta.json"))
            assert json.loads(tf.extractfile(first).read())["image_sha256"] == images[str(group.keys[0])].hex()
        raw = bytearray(Path(group.path).read_bytes())
        at = raw.index(images[str(group.keys[0])].hex().encode())
        raw[at] = ord("0") if raw[at] != ord("0") else ord("1")
        Path(group.path).write_bytes(bytes(raw))
        with pytest.raises(cf.CacheError, match=r"meta.json, row 0: sha256 differs from the entry's"):
            cf.WdsShard(group.path, group.entry).image_digests()
        with pytest.raises(cf.CacheError, match=r"meta.json, row 0: checksum mismatch"):  # format 4: its own seal
            cf.WdsShard(group.path, dataclasses.replace(group.entry, files=None)).image_digests()


# --- 6. --resume refuses another cache, teacher, model or data -------------------------

import json  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from click.testing import CliRunner  # noqa: E402
from conftest import DINO_TINY, url_list  # noqa: E402

from mrmae.cli import cli  # noqa: E402
from mrmae.extract.config import ExtractConfig  # noqa: E402
from mrmae.extract.runner import run_extraction  # noqa: E402
from mrmae.shared.views import ViewConfig  # noqa: E402

TINY_RUN = ["--model", "mrmae_vit_tiny_patch16", "--decoder-depth", "1", "--decoder-dim", "32", "--batch-size", "6",
            "--workers", "0", "--no-progress", "--seed", "3", "--lr", "1e-3"]


def _mrmae(args: list[str]):
    """The real CLI in this process -> (exit code, stderr lines that are not warnings, result)."""
    r = CliRunner().invoke(cli, args)
    errors = [ln for ln in r.stderr.splitlines() if ln.strip() and not ln.startswith(("mrmae: warning", "mrmae: note"))]
    return r.exit_code, errors, r


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def two_shard_caches(demo_shards, tmp_path_factory):
    """(shards, cache a, cache b: a's teacher and width with other views, wide: a 384-wide teacher)."""
    root = tmp_path_factory.mktemp("resume")
    shards = url_list(demo_shards[:2])
    for name, teacher, seed in (("a", DINO_TINY, 3), ("b", DINO_TINY, 4), ("wide", "dino:vit_small_patch16_224", 3)):
        run_extraction(ExtractConfig(shards=shards, out=str(root / name), teacher=teacher,
                                     views=ViewConfig(per_image=2, seed=seed), batch_size=12, progress=False))
    return shards, root / "a", root / "b", root / "wide"


@pytest.fixture(scope="module")
def trained_on_a(two_shard_caches, tmp_path_factory) -> Path:
    """One epoch (2 steps) of the tiny student on cache a."""
    shards, a, _, _ = two_shard_caches
    out = tmp_path_factory.mktemp("run") / "run"
    code, errors, r = _mrmae(["pretrain", "--shards", shards, "--feature-cache", str(a), "--out", str(out), *TINY_RUN])
    assert code == 0, r.output + repr(r.exception)
    return out


@pytest.mark.parametrize("other", ["b", "wide"])
def test_resume_with_another_cache_is_refused_before_anything_is_written(two_shard_caches, trained_on_a, tmp_path,
                                                                         other):
    shards, a, b, wide = two_shard_caches
    run = tmp_path / "run"
    shutil.copytree(trained_on_a, run)
    before = _files(run)
    cache = {"b": b, "wide": wide}[other]
    code, errors, r = _mrmae(["pretrain", "--shards", shards, "--feature-cache", str(cache), "--out", str(run),
                              *TINY_RUN, "--epochs", "2", "--resume"])
    assert code == 1 and len(errors) == 1, r.output + repr(r.exception)
    assert errors[0].startswith("mrmae: error: --resume: the checkpoint") and errors[0].endswith("field cache")
    assert f"trained on cache {a} (fingerprint " in errors[0] and f"this run gives {cache} (" in errors[0]
    assert _files(run) == before  # config.json, metrics and checkpoints untouched


@pytest.mark.parametrize("change, field", [
    (["--decoder-dim", "64"], "model"), (["--fuse-layers", "6,12"], "model"), (["--seed", "4"], "data"),
    (["--target", "main,main2"], None), (["--pixels-from-cache"], None)])
def test_resume_with_another_model_or_data_is_refused_naming_the_field(two_shard_caches, trained_on_a, tmp_path,
                                                                       change, field):
    shards, a, _, _ = two_shard_caches
    run = tmp_path / "run"
    shutil.copytree(trained_on_a, run)
    before = _files(run)
    code, errors, r = _mrmae(["pretrain", "--shards", shards, "--feature-cache", str(a), "--out", str(run),
                              *TINY_RUN, *change, "--epochs", "2", "--resume"])
    assert code != 0 and len(errors) == 1, r.output + repr(r.exception)
    if field:  # the others are refused earlier, as on a fresh run (no such target; no stored views)
        assert errors[0].startswith("mrmae: error: --resume:") and errors[0].endswith(f"field {field}"), errors
    assert _files(run) == before


def test_resume_with_the_same_cache_moved_elsewhere_continues(two_shard_caches, trained_on_a, tmp_path):
    shards, a, _, _ = two_shard_caches
    run, moved = tmp_path / "run", tmp_path / "moved" / "a"
    shutil.copytree(trained_on_a, run)
    shutil.copytree(a, moved)
    code, errors, r = _mrmae(["pretrain", "--shards", shards, "--feature-cache", str(moved), "--out", str(run),
                              *TINY_RUN, "--epochs", "2", "--resume"])
    assert code == 0 and not errors, r.output + repr(r.exception)
    steps = [json.loads(ln)["step"] for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_checkpoint_from_before_fingerprints_resumes_with_one_warning(two_shard_caches, trained_on_a, tmp_path):
    shards, a, _, _ = two_shard_caches
    run = tmp_path / "run"
    shutil.copytree(trained_on_a, run)
    state = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip() / "state.json"
    old = json.loads(state.read_text())
    assert old["fingerprint"]["cache"]["shown"] == str(a)
    state.write_text(json.dumps({k: v for k, v in old.items() if k != "fingerprint"}))
    with pytest.warns(UserWarning) as caught:  # the CLI prints each as one `mrmae: warning:` line
        code, errors, r = _mrmae(["pretrain", "--shards", shards, "--feature-cache", str(a), "--out", str(run),
                                  *TINY_RUN, "--epochs", "2", "--resume"])
    assert code == 0 and not errors, r.output + repr(r.exception)
    warned = [str(w.message) for w in caught if "before run fingerprints" in str(w.message)]
    assert len(warned) == 1 and warned[0].startswith(f"{state.parent}: checkpoint from before run fingerprints")
    assert [json.loads(ln)["step"] for ln in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


def test_finetune_resume_with_another_head_or_data_is_refused(demo_shards, tmp_path):
    from test_finetune import FT, save_small_student

    save_small_student(tmp_path / "student")
    data = ["--checkpoint", str(tmp_path / "student"), "--shards", str(demo_shards[0]),
            "--val-shards", str(demo_shards[0]), "--out", str(tmp_path / "ft")]
    ft = [*FT[:FT.index("--epochs")], "--epochs", "1", *FT[FT.index("--epochs") + 2:]]
    code, errors, r = _mrmae(["finetune", *data, *ft])
    assert code == 0, r.output + repr(r.exception)
    before = _files(tmp_path / "ft")
    for change, field in ((["--num-classes", "20"], "model"), (["--seed", "4"], "data")):  # (the demo's labels < 14)
        args = [*data, *ft, *change, "--epochs", "2", "--resume"]
        code, errors, r = _mrmae(["finetune", *args])
        assert code == 1 and len(errors) == 1 and errors[0].endswith(f"field {field}"), r.output
    assert _files(tmp_path / "ft") == before


# hostile2: the checkpoint's own files, crafted or damaged, and a second run on one --out

import os  # noqa: E402

def _resumable(trained_on_a, tmp_path) -> tuple[Path, Path]:
    """A copy of the trained run -> (run dir, its latest checkpoint dir)."""
    run = tmp_path / "run"
    shutil.copytree(trained_on_a, run)
    return run, run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()


def _resume_a(two_shard_caches, run):
    shards, a, _, _ = two_shard_caches
    return _mrmae(["pretrain", "--shards", shards, "--feature-cache", str(a), "--out", str(run), *TINY_RUN,
                   "--epochs", "2", "--resume"])


@pytest.mark.parametrize("pointer", ["../../outside/checkpoints/step00000002", "/etc", "step00000001", "step0000\n2"])
def test_6_a_latest_pointer_elsewhere_is_refused_never_followed_nor_a_fresh_start(two_shard_caches, trained_on_a,
                                                                                   tmp_path, pointer):
    """`latest` naming a checkpoint outside the run (another run beside it, /etc), one that
    is gone or garbage: --resume, export and eval stop in one line naming it; the run is
    neither trained from the other checkpoint nor restarted from scratch (metrics kept)."""
    run, _ = _resumable(trained_on_a, tmp_path)
    shutil.copytree(trained_on_a, tmp_path / "outside")  # a real checkpoint that `..` would reach
    (run / "checkpoints" / "latest").write_text(pointer)
    before = _files(run)
    code, errors, r = _resume_a(two_shard_caches, run)
    assert code == 1 and len(errors) == 1, r.output + repr(r.exception)
    assert errors[0].startswith(f"mrmae: error: {run}/checkpoints/latest: names "), errors
    assert _files(run) == before
    code, errors, r = _mrmae(["export", "--checkpoint", str(run), "--out", str(tmp_path / "e")])
    assert code == 1 and len(errors) == 1 and f"{run}/checkpoints/latest: names" in errors[0], r.output
    assert not (tmp_path / "e").exists()


@pytest.mark.parametrize("key, value", [("epoch", "1"), ("epoch", -5), ("step", 10**18), ("step_in_epoch", True),
                                        ("step", 1.5), ("step_in_epoch", None)])
def test_6_a_crafted_state_json_is_one_line_naming_the_key(two_shard_caches, trained_on_a, tmp_path, key, value):
    run, last = _resumable(trained_on_a, tmp_path)
    state = json.loads((last / "state.json").read_text())
    state[key] = value
    (last / "state.json").write_text(json.dumps(state))
    before = _files(run)
    code, errors, r = _resume_a(two_shard_caches, run)
    assert code == 1 and errors == [f"mrmae: error: {last}/state.json: key {key} is {value!r}, not a step count "
                                    "(an integer from 0)"], r.output + repr(r.exception)
    assert _files(run) == before


def test_6_an_optimizer_pt_that_is_a_pickle_is_refused_unpickled(two_shard_caches, trained_on_a, tmp_path):
    """A pickle whose loading would run a command, and a real torch file whose moment
    tensors do not fit the parameters: one line naming optimizer.pt; nothing runs."""
    import pickle

    import torch

    run, last = _resumable(trained_on_a, tmp_path)
    marker = tmp_path / "ran"

    class Bomb:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (last / "optimizer.pt").write_bytes(pickle.dumps({"optimizer": Bomb()}))
    code, errors, r = _resume_a(two_shard_caches, run)
    assert code == 1 and errors == [f"mrmae: error: {last}/optimizer.pt: holds more than tensors and plain "
                                    "containers; refused, not unpickled (an optimizer.pt that mrmae wrote never does)"]
    assert not marker.exists() and "weights_only=False" not in r.output
    run, last = _resumable(trained_on_a, tmp_path / "b")
    blob = torch.load(last / "optimizer.pt", weights_only=True)
    for s in blob["optimizer"]["state"].values():
        s["exp_avg"] = torch.zeros(1)  # would broadcast into the update, or fail mid-step
    torch.save(blob, last / "optimizer.pt")
    code, errors, r = _resume_a(two_shard_caches, run)
    assert code == 1 and len(errors) == 1, r.output + repr(r.exception)
    assert errors[0].startswith(f"mrmae: error: {last}/optimizer.pt: optimiser state exp_avg (1,) for a parameter")


@pytest.mark.parametrize("change, words", [("extra", "unexpected evil"), ("missing", "missing cls_token"),
                                           ("misshaped", "misshaped cls_token (1, 1, 7)"), ("header", "header too large")])
def test_6_model_safetensors_not_this_model_names_the_tensor(two_shard_caches, trained_on_a, tmp_path, change, words):
    import struct

    import torch
    from safetensors.torch import load_file, save_file

    run, last = _resumable(trained_on_a, tmp_path)
    weights = last / "model.safetensors"
    tensors = load_file(str(weights))
    if change == "header":  # a header length of 4 EiB: refused, never allocated
        weights.write_bytes(struct.pack("<Q", 2**62) + weights.read_bytes()[8:])
    else:
        if change == "extra":
            tensors["evil"] = torch.zeros(3)
        elif change == "missing":
            del tensors["cls_token"]
        else:
            tensors["cls_token"] = torch.zeros(1, 1, 7)
        save_file(tensors, str(weights))
    before = _files(run)
    code, errors, r = _resume_a(two_shard_caches, run)
    assert code == 1 and len(errors) == 1, r.output + repr(r.exception)
    assert errors[0].startswith(f"mrmae: error: {weights}: ") and words in errors[0], errors
    assert _files(run) == before


def test_6_a_metrics_line_torn_by_a_kill_resumes(two_shard_caches, trained_on_a, tmp_path):
    """SIGKILL while appending a metrics line leaves half a JSON line; --resume drops it."""
    run, _ = _resumable(trained_on_a, tmp_path)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 1, "step": 3, "lo')
    code, errors, r = _resume_a(two_shard_caches, run)
    assert code == 0 and not errors, r.output + repr(r.exception)
    assert [json.loads(ln)["step"] for ln in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


def test_6_a_second_run_on_the_same_out_is_refused_while_the_first_trains(two_shard_caches, tmp_path):
    """Two pretrain runs on one --out would interleave metrics and checkpoints and both
    exit 0; the second stops in one line and touches nothing of the first."""
    import time

    shards, a, _, _ = two_shard_caches
    run = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "mrmae", "pretrain", "--shards", shards, "--feature-cache", str(a),
                              "--out", str(run), *TINY_RUN, "--epochs", "200"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 120
        while not (run / "metrics.jsonl").exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert first.poll() is None, "the first run ended early"
        code, errors, r = _mrmae(["pretrain", "--shards", shards, "--feature-cache", str(a), "--out", str(run),
                                  *TINY_RUN, "--seed", "9", "--resume"])
        assert code == 1 and errors == [f"mrmae: error: {run}: another run is training into this --out (it holds "
                                        "its lock); wait for it or give another --out"], r.output + repr(r.exception)
        code, errors, r = _mrmae(["pretrain", "--shards", shards, "--feature-cache", str(a), "--out", str(run),
                                  *TINY_RUN, "--seed", "9", "--overwrite"])  # not moved from under the live run
        assert code == 1 and errors == [f"mrmae: error: --overwrite {run}: a run is training into it (it holds its "
                                        "lock); stop it first or give another --out"], r.output + repr(r.exception)
        assert json.loads((run / "config.json").read_text())["seed"] == 3  # the first run's, not overwritten
    finally:
        first.kill()
        first.wait()
    code, errors, r = _mrmae(["pretrain", "--shards", shards, "--feature-cache", str(a), "--out", str(run), *TINY_RUN,
                              "--overwrite"])
    assert code == 0, r.output + repr(r.exception)  # the killed run's lock went with it


def test_6_resume_with_another_effective_batch_is_refused_the_same_one_continues(two_shard_caches, trained_on_a,
                                                                                   tmp_path):
    """Steps, the lr schedule and the data position (batches skipped) are in the
    checkpoint's images per step: --batch-size 3 is refused naming the field; 3 x
    --accum-steps 2 is the same 6 images per step and continues."""
    shards, a, _, _ = two_shard_caches
    run, _ = _resumable(trained_on_a, tmp_path)
    before = _files(run)
    args = ["pretrain", "--shards", shards, "--feature-cache", str(a), "--out", str(run), *TINY_RUN, "--epochs", "2",
            "--resume", "--batch-size", "3"]
    code, errors, r = _mrmae(args)
    assert code == 1 and len(errors) == 1 and errors[0].endswith("field batch"), r.output + repr(r.exception)
    assert "this run gives 3 images per step (--batch-size 3 x --accum-steps 1 x 1 processes)" in errors[0]
    assert _files(run) == before
    code, errors, r = _mrmae([*args, "--accum-steps", "2"])
    assert code == 0 and not errors, r.output + repr(r.exception)
    assert [json.loads(ln)["step"] for ln in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]

def test_6_ctrl_c_during_pretraining_is_one_line_and_resumes(two_shard_caches, tmp_path):
    """Ctrl-C (SIGINT to the process group: the run and its DataLoader workers) prints one
    line naming the checkpoint to resume from, exit 130; the rerun with --resume removes
    what an interrupted save left (a whole model and optimiser) and finishes."""
    import signal
    import time

    shards, a, _, _ = two_shard_caches
    run = tmp_path / "run"
    args = ["pretrain", "--shards", shards, "--feature-cache", str(a), "--out", str(run), *TINY_RUN, "--workers", "2"]
    p = subprocess.Popen([sys.executable, "-m", "mrmae", *args, "--epochs", "200"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 120
        while not (run / "checkpoints" / "latest").exists() and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        os.killpg(p.pid, signal.SIGINT)
        _, stderr = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    errors = [ln for ln in stderr.splitlines() if ln.strip() and not ln.startswith("mrmae: warning")]
    assert p.returncode == 130 and len(errors) == 1 and "Traceback" not in stderr, stderr
    assert re.fullmatch(f"mrmae: interrupted: the last checkpoint is {run}/checkpoints/step\\d{{8}}; rerun the same "
                        "command with --resume to continue", errors[0]), errors
    (run / "checkpoints" / ".tmp-step00000999-12345").mkdir()  # what a save cut short leaves
    (run / "checkpoints" / ".tmp-step00000999-12345" / "optimizer.pt").write_bytes(b"half")
    last = int(errors[0].split("/checkpoints/step")[1][:8])
    epochs = last // 2 + 1
    code, errors, r = _mrmae([*args, "--workers", "0", "--epochs", str(epochs), "--resume"])
    assert code == 0 and not errors, r.output + repr(r.exception)
    assert sorted(p.name for p in (run / "checkpoints").iterdir())[-1] == "step" + f"{2 * epochs:08d}"
    assert not list((run / "checkpoints").glob(".tmp-*"))

# --- 7. repeated keys and 16-bit images ------------------------------------------------

def _jpeg(width: int, height: int, colour: tuple[int, int, int]) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buf, format="JPEG")
    return buf.getvalue()


def _repeats_tar(path, layout: str) -> dict[str, bytes]:
    """A tar with key `a` twice, the copies of different sizes (their views differ):
    adjacent a a b c (webdataset's group_by_keys raises there) or apart a b a c.
    Returns the first copy's image per key."""
    import io
    import tarfile

    first, second = _jpeg(64, 48, (200, 30, 30)), _jpeg(300, 200, (30, 30, 200))
    order = {"adjacent": [("a", first), ("a", second), ("b", _jpeg(80, 80, (0, 90, 0))), ("c", _jpeg(70, 90, (9, 9, 9)))],
             "apart": [("a", first), ("b", _jpeg(80, 80, (0, 90, 0))), ("a", second), ("c", _jpeg(70, 90, (9, 9, 9)))]}
    with tarfile.open(path, "w") as tf:
        for key, image in order[layout]:
            for ext, data in (("jpg", image), ("cls", b"1")):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return {key: image for key, image in reversed(order[layout])}


@pytest.mark.parametrize("layout", ["adjacent", "apart"])
def test_7_repeated_key_later_copy_skipped_warned_listed_strict_stops(tmp_path, layout):
    from click.testing import CliRunner
    from conftest import DINO_TINY

    from mrmae.cli import cli
    from mrmae.extract.config import ExtractConfig
    from mrmae.extract.runner import run_extraction
    from mrmae.shared import cache_format as cf
    from mrmae.shared.shards import REPEATED_KEY
    from mrmae.shared.views import ViewConfig, sample_views

    shard = tmp_path / "rep-000.tar"
    _repeats_tar(shard, layout)
    with pytest.warns(UserWarning, match=f"skipping {shard} key a: repeated key"):
        run_extraction(ExtractConfig(shards=str(shard), out=str(tmp_path / "c"), teacher=DINO_TINY,
                                     views=ViewConfig(per_image=2), batch_size=4, progress=False))
    cache = cf.FeatureCache(tmp_path / "c")
    group = cache.shard(str(shard))
    assert group.entry.skipped == (cf.Skipped("a", REPEATED_KEY),) and group.entry.num_samples == 3
    assert list(map(str, group.keys)) == ["a", "a", "b", "b", "c", "c"]
    crop, _, _ = group.geometry()
    views = sample_views("a", 48, 64, ViewConfig(per_image=2))  # the first copy is 64x48
    assert [tuple(int(c) for c in crop[i]) for i in (0, 1)] == [v.box for v in views]
    r = CliRunner().invoke(cli, ["extract-features", "--shards", str(shard), "--feature-cache", str(tmp_path / "strict"),
                                 "--teacher", DINO_TINY, "--views", "1", "--strict", "--no-progress"])
    assert _error_line(r) == f"mrmae: error: {shard}: key a: {REPEATED_KEY}"
    assert not [e for e in cf.read_manifest(tmp_path / "strict").shards if e.status == "complete"]


@pytest.mark.parametrize("layout", ["adjacent", "apart"])
def test_7_pretraining_keeps_the_first_copy_of_a_repeated_key(tmp_path, layout):
    from conftest import DINO_TINY

    from mrmae.extract.config import ExtractConfig
    from mrmae.extract.runner import run_extraction
    from mrmae.shared import cache_format as cf
    from mrmae.shared.views import ViewConfig
    from mrmae.train.stream import DataConfig, StudentStream, ViewJoiner

    shard = tmp_path / "rep-000.tar"
    first = _repeats_tar(shard, layout)
    with pytest.warns(UserWarning, match="repeated key"):
        run_extraction(ExtractConfig(shards=str(shard), out=str(tmp_path / "c"), teacher=DINO_TINY,
                                     views=ViewConfig(per_image=2), batch_size=4, progress=False))
    cache = cf.FeatureCache(tmp_path / "c")
    for url in (str(shard), f"pipe:cat {shard}"):
        for c in (cache, None):  # cached and live/plain
            cfg = DataConfig(shards=[url], batch_size=3, img_size=32)
            joined = list(ViewJoiner(cfg, c)(iter([url]), 0))
            assert [(s.key, s.image) for s in joined] == [(k, first[k]) for k in ("a", "b", "c")]
        batches = list(StudentStream(DataConfig(shards=[url], batch_size=3, img_size=32), cache))
        assert sorted(k for b in batches for k in b.keys) == ["a", "b", "c"]
        assert all(b.targets[0].values.shape[0] == 3 for b in batches)


def test_7_sixteen_bit_and_other_modes_are_scaled_to_8_bits():
    import io
    import warnings

    import numpy as np
    from PIL import Image

    from mrmae.shared.views import decode_image

    def encoded(im: Image.Image, fmt: str = "PNG", **kw) -> bytes:
        buf = io.BytesIO()
        im.save(buf, format=fmt, **kw)
        return buf.getvalue()

    rng = np.random.default_rng(0)
    source = rng.integers(0, 65536, (48, 64), dtype=np.uint16)  # a full-range 16-bit image
    png = encoded(Image.fromarray(source))
    assert Image.open(io.BytesIO(png)).mode.startswith("I")
    decoded = decode_image(png).numpy().astype(int)
    assert decoded.shape == (3, 48, 64)
    assert np.abs(decoded - np.round(source / 257.0)[None]).max() <= 1
    assert (decoded == 255).mean() < 0.01  # clipped, 99.6% of them would be 255
    wide = rng.integers(0, 65536, (8, 8)).astype(np.int32)  # mode I (32-bit) holding 16-bit values
    assert np.abs(decode_image(encoded(Image.fromarray(wide), "TIFF")).numpy()[0] - wide / 257.0).max() <= 1
    unit = rng.random((8, 8)).astype(np.float32)  # mode F in 0..1
    assert np.abs(decode_image(encoded(Image.fromarray(unit), "TIFF")).numpy()[0] - unit * 255).max() <= 1
    grey = rng.integers(0, 256, (8, 8), dtype=np.uint8)
    la = Image.merge("LA", [Image.fromarray(grey), Image.fromarray(grey[::-1].copy())])
    assert (decode_image(encoded(la)).numpy() == grey[None]).all()  # alpha dropped, grey kept
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # pure red
    assert tuple(decode_image(encoded(cmyk, "JPEG")).numpy()[:, 4, 4]) in [(r, g, b) for r in range(250, 256)
                                                                        for g in range(6) for b in range(6)]
    palette = Image.fromarray(grey).convert("P")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PIL warns when a palette's transparency is dropped unasked
        assert decode_image(encoded(palette, transparency=0)).shape == (3, 8, 8)

# --- 8. one line for every user error and environment fault ----------------------------

import io  # noqa: E402
import os  # noqa: E402
import tarfile  # noqa: E402


def _mrmae_process(args: list[str], sandbox: str = "", timeout: int = 300) -> tuple[int, list[str], str]:
    """`python -m mrmae ARGS` as a real process (in a private mount namespace running `sandbox`
    first, when given) -> (exit code, stderr lines that are not warnings, stderr)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "mrmae", *args]
    if sandbox:
        script = f"{sandbox} && exec " + " ".join(f"'{c}'" for c in cmd)
        cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    errors = [ln for ln in p.stderr.splitlines() if ln.strip() and not ln.startswith("mrmae: warning")]
    return p.returncode, errors, p.stderr


def _can_mount() -> bool:
    """Root in a kernel that lets it make a private mount namespace (to mount a full or read-only tmpfs)."""
    if os.geteuid() != 0 or not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                            "mount -t tmpfs -o size=64k tmpfs /mnt"], capture_output=True)
    return probe.returncode == 0


needs_mount = pytest.mark.skipif(not _can_mount(), reason="needs root and mount namespaces for a full/read-only fs")


@pytest.mark.parametrize("bad, option", [
    (["--views", "0"], "--views"), (["--batch-size", "0"], "--batch-size"), (["--workers", "-1"], "--workers"),
    (["--device", "gpu"], "--device"), (["--layers", "4"], "--layers")])  # --layers: removed (stored unread blocks)
def test_extract_options_are_refused_before_anything_is_written(demo_shards, tmp_path, bad, option):
    out = tmp_path / "cache"
    code, errors, r = _mrmae(["extract-features", "--shards", str(demo_shards[0]), "--feature-cache", str(out),
                              "--teacher", DINO_TINY, "--no-progress", *bad])
    assert code != 0 and len(errors) == 1 and errors[0].startswith("mrmae: error: "), r.output
    assert option in errors[0] and "Traceback" not in r.output
    assert not out.exists()  # no manifest.json: the corrected rerun is not refused


def test_int8_group_not_dividing_the_teacher_then_corrected_rerun_succeeds(demo_shards, tmp_path):
    out = tmp_path / "cache"
    args = ["extract-features", "--shards", str(demo_shards[0]), "--feature-cache", str(out), "--teacher", DINO_TINY,
            "--no-progress", "--batch-size", "12"]
    code, errors, _ = _mrmae([*args, "--int8-group", "7"])  # the teacher is known only once built
    assert code == 1 and len(errors) == 1 and errors[0].startswith("mrmae: error: --int8-group 7 does not divide "
                                                                   f"the 192 channels of {DINO_TINY}")
    assert not out.exists()
    code, errors, r = _mrmae([*args, "--int8-group", "64"])
    assert code == 0 and not errors, r.output
    assert json.loads((out / "manifest.json").read_text())["teacher"]["layers"] == []


@pytest.mark.parametrize("bad, option", [
    (["--batch-size", "0"], "--batch-size"), (["--epochs", "0"], "--epochs"), (["--accum-steps", "0"], "--accum-steps"),
    (["--mask-ratio", "1.5"], "--mask-ratio"), (["--fuse-layers", "0"], "--fuse-layers"),
    (["--fuse-layers", "4,13"], "--fuse-layers"), (["--fuse-layers", "4,x"], "--fuse-layers"),
    (["--workers", "-1"], "--workers"), (["--model", "mrmae_vit_nope"], "--model")])
def test_pretrain_options_are_refused_before_anything_is_written(demo_shards, tmp_path, bad, option):
    out = tmp_path / "run"
    code, errors, r = _mrmae(["pretrain", "--shards", str(demo_shards[0]), "--out", str(out), *TINY_RUN, *bad])
    assert code != 0 and len(errors) == 1 and errors[0].startswith("mrmae: error: "), r.output
    assert option in errors[0]
    assert not out.exists()


def _rename_one_key(src: Path, dst: Path) -> str:
    """A copy of tar `src` with one sample's key changed (same length: the same size), as a
    shard replaced since extraction would be; returns the new key."""
    with tarfile.open(src) as tin, tarfile.open(dst, "w", format=tarfile.USTAR_FORMAT) as tout:
        members = tin.getmembers()
        old = members[0].name.split(".", 1)[0]
        new = ("x" if old[0] != "x" else "y") + old[1:]  # a key no shard has
        for m in members:
            data = tin.extractfile(m).read()
            if m.name.split(".", 1)[0] == old:
                m.name = new + "." + m.name.split(".", 1)[1]
            tout.addfile(m, io.BytesIO(data))
    assert dst.stat().st_size == src.stat().st_size
    return new


def test_an_error_in_a_dataloader_worker_is_one_line(demo_shards, two_shard_caches, tmp_path):
    _, a, _, _ = two_shard_caches
    (tmp_path / "moved").mkdir()
    damaged = tmp_path / "moved" / demo_shards[1].name
    shutil.copy(demo_shards[0], tmp_path / "moved" / demo_shards[0].name)
    _rename_one_key(demo_shards[1], damaged)
    shards = url_list([tmp_path / "moved" / demo_shards[0].name, damaged])
    out = tmp_path / "run"
    code, errors, stderr = _mrmae_process(["pretrain", "--shards", shards, "--feature-cache", str(a), "--out", str(out),
                                           *TINY_RUN[:TINY_RUN.index("--workers")], "--workers", "2", "--no-progress"])
    assert code == 1 and len(errors) == 1, stderr
    assert errors[0].startswith("mrmae: error: ") and demo_shards[1].name in errors[0], errors
    assert "Traceback" not in stderr and "DataLoader worker" not in stderr


@needs_mount
def test_full_disk_and_read_only_out_are_one_line_naming_the_path(demo_shards, tmp_path):
    from _tiny_student import save_tiny_student

    save_tiny_student(tmp_path / "student")
    full, ro = tmp_path / "full", tmp_path / "ro"
    full.mkdir(), ro.mkdir()
    encoder = full / "model.safetensors"  # 22 MB of tensors on a 1 MB file system
    code, errors, stderr = _mrmae_process(["export", "--checkpoint", str(tmp_path / "student"), "--out", str(full)],
                                          sandbox=f"mount -t tmpfs -o size=1m tmpfs {full}")
    assert code == 1 and errors == [f"mrmae: error: {encoder}: No space left on device"], stderr
    run = ro / "run"
    code, errors, stderr = _mrmae_process(["pretrain", "--shards", str(demo_shards[0]), "--out", str(run),
                                           *TINY_RUN], sandbox=f"mount -t tmpfs -o ro tmpfs {ro}")
    assert code == 1 and errors == [f"mrmae: error: {run}: Read-only file system"], stderr


@needs_mount
def test_a_full_disk_during_pretraining_is_one_line_naming_the_checkpoint(demo_shards, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    code, errors, stderr = _mrmae_process(["pretrain", "--shards", str(demo_shards[0]), "--out", str(out),
                                           *TINY_RUN], sandbox=f"mount -t tmpfs -o size=2m tmpfs {out}")
    assert code == 1 and len(errors) == 1, stderr
    assert errors[0] == f"mrmae: error: {out}/checkpoints/step00000001/model.safetensors: No space left on device"


@pytest.mark.parametrize("kind", ["random file", "empty dir", "truncated", "another model"])
def test_a_checkpoint_that_is_not_one_is_one_line_naming_it(demo_shards, two_shard_caches, tmp_path, kind):
    import torch
    from _tiny_student import save_tiny_student
    from safetensors.torch import save_file

    if kind == "random file":
        bad = tmp_path / "notes.txt"
        bad.write_bytes(os.urandom(5000))
    elif kind == "empty dir":
        bad = tmp_path / "empty"
        bad.mkdir()
    elif kind == "truncated":
        save_tiny_student(tmp_path / "student")
        bad = tmp_path / "cut.safetensors"
        whole = next((tmp_path / "student" / "checkpoints").glob("step*/model.safetensors")).read_bytes()
        bad.write_bytes(whole[: len(whole) // 2])
    else:
        bad = tmp_path / "other.safetensors"
        save_file({"conv.weight": torch.zeros(4, 3, 3, 3), "fc.weight": torch.zeros(10, 4)}, str(bad))
    shards, a, _, _ = two_shard_caches
    commands = {
        "export": ["export", "--checkpoint", str(bad), "--out", str(tmp_path / "e")],
        "eval": ["eval", "knn", "--checkpoint", str(bad), "--shards", str(demo_shards[0]), "--val-shards",
                 str(demo_shards[0]), "--results", str(tmp_path / "eval.jsonl")],
        "visualize": ["visualize", "--feature-cache", str(a), "--shards", shards, "--out", str(tmp_path / "v"),
                      "--checkpoint", str(bad)],
        "finetune": ["finetune", "--checkpoint", str(bad), "--shards", str(demo_shards[0]), "--val-shards",
                     str(demo_shards[0]), "--out", str(tmp_path / "ft"), "--no-progress"],
    }
    for name, args in commands.items():
        code, errors, r = _mrmae(args)
        assert code == 1 and len(errors) == 1 and errors[0].startswith(f"mrmae: error: {bad}"), (name, r.output,
                                                                                                 r.exception)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in [bad, *tmp_path.glob("student")])



# hostile2: float options (NaN passes click's ranges), shard lists, eval and finetune options

@pytest.mark.parametrize("bad, option", [
    (["--lr", "nan"], "--lr nan"), (["--lr", "-1"], "--lr -1.0"), (["--blr", "inf"], "--blr inf"),
    (["--min-lr", "nan"], "--min-lr nan"), (["--weight-decay", "nan"], "--weight-decay nan"),
    (["--warmup-epochs", "nan"], "--warmup-epochs nan"), (["--warmup-epochs", "10"], "--warmup-epochs 10: must be below --epochs 1"),
    (["--mask-ratio", "0"], "--mask-ratio 0.0: masks none of"), (["--mask-ratio", "nan"], "--mask-ratio nan"),
    (["--focus-temperature", "0"], "--focus-temperature 0.0"), (["--focus-uniform-mix", "2"], "--focus-uniform-mix 2.0"),
    (["--recon-weight", "-1"], "--recon-weight -1.0"), (["--recon-weight", "0", "--mimic-weight", "0"], "loss would be zero"),
    (["--recon-weight", "0"], "--recon-weight 0 without a teacher: the loss would be zero"),
    (["--shards", "::"], "--shards '::': names no shard"), (["--shards", "TWICE"], "is listed twice")])
def test_8_pretrain_numbers_and_shard_lists_are_refused_before_anything_is_written(demo_shards, tmp_path, bad, option):
    out = tmp_path / "run"
    bad = [url_list([demo_shards[0], demo_shards[1], demo_shards[0]]) if b == "TWICE" else b for b in bad]
    code, errors, r = _mrmae(["pretrain", "--shards", str(demo_shards[0]), "--out", str(out), *TINY_RUN, *bad])
    assert code == 2 and len(errors) == 1 and errors[0].startswith("mrmae: error: ") and option in errors[0], r.output
    assert not out.exists()


@pytest.mark.parametrize("bad, option", [
    (["--lr", "nan"], "--lr nan"), (["--drop-path", "1.5"], "--drop-path 1.5"), (["--layer-decay", "-1"], "--layer-decay"),
    (["--smoothing", "nan"], "--smoothing nan"), (["--re-prob", "2"], "--re-prob 2.0"), (["--mixup", "nan"], "--mixup nan"),
    (["--rand-augment", "garbage"], "--rand-augment garbage: not a timm RandAugment policy")])
def test_8_finetune_numbers_are_refused_before_anything_is_written(demo_shards, tmp_path, bad, option):
    from _tiny_student import save_tiny_student

    save_tiny_student(tmp_path / "student")
    out = tmp_path / "ft"
    code, errors, r = _mrmae(["finetune", "--checkpoint", str(tmp_path / "student"), "--shards", str(demo_shards[0]),
                              "--val-shards", str(demo_shards[1]), "--out", str(out), "--no-progress", *bad])
    assert code == 2 and len(errors) == 1 and errors[0].startswith("mrmae: error: ") and option in errors[0], r.output
    assert not out.exists()


@pytest.mark.parametrize("protocol, bad, option", [
    ("knn", ["--k", "0"], "'--k'"), ("knn", ["--temperature", "nan"], "'--temperature'"),
    ("knn", ["--temperature", "0"], "'--temperature'"), ("linear-probe", ["--epochs", "0"], "'--epochs'"),
    ("linear-probe", ["--lr", "nan"], "'--lr'"), ("linear-probe", ["--probe-batch-size", "0"], "'--probe-batch-size'")])
def test_8_eval_options_that_would_record_a_meaningless_result_are_refused(demo_shards, tmp_path, protocol, bad, option):
    from _tiny_student import save_tiny_student

    save_tiny_student(tmp_path / "student")
    results = tmp_path / "eval.jsonl"
    code, errors, r = _mrmae(["eval", protocol, "--checkpoint", str(tmp_path / "student"), "--shards",
                              str(demo_shards[0]), "--val-shards", str(demo_shards[1]), "--results", str(results), *bad])
    assert code == 2 and len(errors) == 1 and errors[0].startswith("mrmae: error: ") and option in errors[0], r.output
    assert not results.exists()


# hostile1: extract-features options

def test_add_teacher_name_main_and_name_without_add_teacher_are_refused(small_cache, tmp_path):
    """`--target main` is the teacher that drew the views, so targets added under the name
    main could never be trained on; and --name without --add-teacher would be ignored.
    Both are one line naming the option, before anything is written."""
    root = tmp_path / "c"
    shutil.copytree(small_cache, root)
    runner = CliRunner()
    r = runner.invoke(cli, ["extract-features", "--feature-cache", str(root), "--add-teacher", DINO_TINY, "--name", "main",
                            "--no-progress"])
    assert r.exit_code == 2 and "--name main" in r.output and not (root / "targets").exists(), r.output
    r = runner.invoke(cli, ["extract-features", "--shards", "x.tar", "--feature-cache", str(tmp_path / "new"), "--teacher",
                            DINO_TINY, "--name", "t", "--no-progress"])
    assert r.exit_code == 2 and "--name goes with --add-teacher" in r.output and not (tmp_path / "new").exists()


@pytest.mark.parametrize("shards, what", [("TWICE", "is listed twice"), ("::", "names no shard"),
                                          ("WIDE", "more than 1,000,000 shards")])
def test_extract_shard_lists_listed_twice_empty_or_too_wide_are_refused(demo_shards, tmp_path, shards, what):
    """A shard listed twice was extracted twice and counted twice; `::` names nothing; a
    brace range of 10^8 (a typo) made braceexpand build 10^8 strings (~10 GB, minutes)
    before anything was said: each is one line, before anything is written."""
    given = {"TWICE": f"{demo_shards[0]}::{demo_shards[0]}",
             "WIDE": str(demo_shards[0]).replace("000000.tar", "{0000000000..0099999999}.tar")}.get(shards, shards)
    for args in (["extract-features", "--shards", given, "--feature-cache", str(tmp_path / "c"), "--teacher", DINO_TINY,
                  "--no-progress"], ["pretrain", "--shards", given, "--out", str(tmp_path / "r"), "--model",
                                     "mrmae_vit_tiny_patch16", "--no-progress"]):
        r = CliRunner().invoke(cli, args)
        _one_line_error(r, what)
    assert not (tmp_path / "c").exists() and not (tmp_path / "r").exists()


def test_a_cache_url_of_an_unknown_or_uninstalled_scheme_is_one_line(demo_shards, tmp_path):
    """`--out s3://...` without s3fs (or a scheme fsspec does not know) was a traceback from
    fsspec; it is one line naming the URL, for extraction, info and pretraining."""
    url = "nosuchscheme://bucket/cache"
    for args in (["extract-features", "--shards", str(demo_shards[0]), "--feature-cache", url, "--teacher", DINO_TINY,
                  "--no-progress"], ["cache", "info", "--feature-cache", url],
                 ["pretrain", "--shards", str(demo_shards[0]), "--feature-cache", url, "--out", str(tmp_path / "r"),
                  "--model", "mrmae_vit_tiny_patch16", "--no-progress"]):
        _one_line_error(CliRunner().invoke(cli, args), url, "cannot open this URL")
    assert not (tmp_path / "r").exists()


def test_8_export_and_visualize_never_write_over_the_checkpoint_or_the_cache(two_shard_caches, trained_on_a, tmp_path):
    """`export --out` onto the checkpoint's own model.safetensors replaced the run's weights
    with the encoder, and `visualize --out CACHE/manifest.json` the manifest with a PNG,
    both exiting 0; each is one line naming --out now (a directory since: the checkpoint's,
    the cache), and nothing is written."""
    shards, a, _, _ = two_shard_caches
    run = tmp_path / "run"
    shutil.copytree(trained_on_a, run)
    cache = tmp_path / "cache"
    shutil.copytree(a, cache)
    before = {**_files(run), **_files(cache)}
    weights = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip() / "model.safetensors"
    code, errors, r = _mrmae(["export", "--checkpoint", str(run), "--out", str(weights.parent)])
    assert code == 1 and errors == [f"mrmae: error: --out {weights.parent}: the checkpoint {weights.parent}, whose "
                                    "files it would replace; write the encoder elsewhere"], r.output
    code, errors, r = _mrmae(["visualize", "--feature-cache", str(cache), "--shards", shards, "--out", str(cache)])
    assert code == 2 and errors == [f"mrmae: error: --out {cache}: inside the cache {cache}, whose "
                                    "files it would replace; write the picture elsewhere"], r.output
    assert {**_files(run), **_files(cache)} == before


def test_8_a_fresh_run_over_older_checkpoints_keeps_its_own_and_finetune_keeps_off_the_pretrain_run(
        two_shard_caches, trained_on_a, tmp_path):
    """A run started without --resume on an --out holding a longer run's checkpoints saves
    lower step numbers; pruning by name deleted the one `latest` had just been pointed
    at. And `finetune --out` the pretrain run it reads would replace that run's config and
    checkpoints: one line naming --out."""
    shards, a, _, _ = two_shard_caches
    run = tmp_path / "run"
    shutil.copytree(trained_on_a, run)
    for step in (7, 9):  # an older run's later checkpoints
        shutil.copytree(run / "checkpoints" / "step00000002", run / "checkpoints" / f"step{step:08d}")
    older = _files(run)
    code, errors, r = _mrmae(["pretrain", "--shards", shards, "--feature-cache", str(a), "--out", str(run), *TINY_RUN,
                              "--save-every-steps", "1"])  # a fresh run on it: refused, the older run untouched
    assert code == 2 and errors == [f"mrmae: error: --out {run}: holds a run already; give --resume to continue it or "
                                    "--overwrite to set it aside (renamed, never deleted) and start anew"], r.output
    assert _files(run) == older
    code, errors, r = _mrmae(["pretrain", "--shards", shards, "--feature-cache", str(a), "--out", str(run), *TINY_RUN,
                              "--save-every-steps", "1", "--overwrite"])
    assert code == 0 and not errors, r.output + repr(r.exception)
    assert (run / "checkpoints" / "latest").read_text() == "step00000002"
    assert (run / "checkpoints" / "step00000002" / "state.json").is_file()
    aside = list(tmp_path.glob("run.old-*"))  # the older run, whole, beside the new one
    assert len(aside) == 1 and _files(aside[0]) == older
    before = _files(run)
    code, errors, r = _mrmae(["finetune", "--checkpoint", str(run), "--shards", str(shards),
                              "--val-shards", str(shards), "--out", str(run), "--no-progress"])
    assert code == 2 and errors == [f"mrmae: error: --out {run}: holds the --checkpoint {run} (its config.json, metrics "
                                    "and checkpoints would be replaced); give the fine-tuning its own --out"], r.output
    assert _files(run) == before

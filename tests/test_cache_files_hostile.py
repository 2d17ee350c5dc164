"""The cache's own files crafted, linked or lying: nothing recorded in a cache is executed or
followed out of it, and every crafted entry, manifest, basis or meta.json is one line
naming the file and key.

"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import DINO_TINY, entry_files, one_line_error

from mrmae.cli import cli
from mrmae.shared import cache_format as cf


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
        line = one_line_error(runner.invoke(cli, args), "--shards", str(entry_file), "command")
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
    one_line_error(r, "--shards", str(demo_shards[1]), "not a complete shard")


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
        one_line_error(runner.invoke(cli, args), str(entry_file), "group", "not a stored shard inside the cache")
    assert not (tmp_path / "run" / "config.json").exists()


@pytest.mark.parametrize("fields, key", [({"num_views": "abc"}, "num_views"), ({"num_samples": -1}, "num_samples"),
                                         ({"num_samples": None}, "num_samples"), ({"sha256": "xyz"}, "sha256"),
                                         ({"skipped": [{"key": 3}]}, "skipped[0].key"), ({"bytes": True}, "bytes"),
                                         ({"surprise": 1}, "surprise")])
def test_a_wrong_field_in_an_entry_is_one_line_naming_file_and_key(small_cache, tmp_path, fields, key):
    root, entry_file = _crafted(small_cache, tmp_path, **fields)
    with pytest.raises(cf.CacheError, match="^" + re.escape(f"{entry_file}: {key}: ")):
        cf.FeatureCache(root)
    one_line_error(CliRunner().invoke(cli, ["cache", "info", "--feature-cache", str(root)]), str(entry_file), f"{key}: ")


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
    one_line_error(CliRunner().invoke(cli, ["cache", "info", "--feature-cache", str(root)]), str(root / cf.MANIFEST),
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

    A group is never looked at before a reader opens it (10,240 groups: start-up reads the
    manifest and the entries alone), nor a chunk file: `cache info`, which opens no group,
    follows none and says nothing; pretraining refuses either as the loader opens the
    group, before any row of it is read and so before any step."""
    root = tmp_path / "c"
    shutil.copytree(small_cache, root)
    outside = _link_out(root, tmp_path, what)
    runner = CliRunner()
    given = root.as_uri() if url else str(root)
    for args in (["cache", "info", "--feature-cache", given],
                 ["pretrain", "--shards", str(demo_shards[0]), "--feature-cache", given, "--out",
                  str(tmp_path / "run"), "--model", "mrmae_vit_tiny_patch16", "--no-progress", "--batch-size", "4"]):
        if what in ("group", "chunk") and args[0] == "cache":
            assert runner.invoke(cli, args).exit_code == 0
            continue
        one_line_error(runner.invoke(cli, args), "symbolic link out of the cache", str(outside))
    assert not (tmp_path / "run" / ("config.json" if what == "entry" else "checkpoints")).exists()
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
    one_line_error(CliRunner().invoke(cli, ["cache", "info", "--feature-cache", str(root)]), str(entry_file), what)


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
        one_line_error(CliRunner().invoke(cli, args), f"{entry_file}: {key}: ")


def test_consistent_counts_other_than_the_stored_rows_are_refused(small_cache, demo_shards, tmp_path):
    """num_samples 5 and num_views 10 agree with each other but not with the 12 rows the
    group holds: the reader says so, naming the group, before any step."""
    root, entry_file = _crafted(small_cache, tmp_path, num_samples=5, num_views=10)
    r = CliRunner().invoke(cli, ["pretrain", "--shards", str(demo_shards[0]), "--feature-cache", str(root), "--out",
                                 str(tmp_path / "run"), "--model", "mrmae_vit_tiny_patch16", "--no-progress"])
    one_line_error(r, "12 rows stored, its entry records num_views 10")
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
        one_line_error(CliRunner().invoke(cli, args), "is also the source of", str(first),
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
    one_line_error(r, str(group), "192]", "384]")
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
    one_line_error(CliRunner().invoke(cli, ["extract-features", "--feature-cache", str(root), "--add-teacher", DINO_TINY,
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
    one_line_error(r, str(root / "pca" / "basis.npz"), f"{member}.npy")
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

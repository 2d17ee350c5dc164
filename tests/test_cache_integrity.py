"""Every byte read is a byte the writer wrote (issue 23): the entry's file list, metadata as
the writer writes it, bounded decoding, regular files only, counts tied together.

Each case crafts a real cache (copied from conftest's `tiny_caches`: 6 images x 4 views, two
features chunks) the way a damaged disk or a hostile user would, then runs the real
command a new user runs: pretraining stops in one line naming the shard, the file and the
rows before anything is trained, and `mrmae cache verify` finds the same case. Crafts that
keep the entry consistent (`_reseal`: its files, sha256 and bytes recomputed) leave only
the reader's own checks in the way.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import stat
import subprocess
import sys
import warnings
from pathlib import Path

import google_crc32c
import pytest
from click.testing import CliRunner
from conftest import entry_files, put_hostile

from mrmae.cli import cli
from mrmae.shared import cache_format as cf

TINY = ["--model", "mrmae_vit_tiny_patch16", "--decoder-depth", "1", "--decoder-dim", "32", "--batch-size", "6",
        "--workers", "0", "--no-progress", "--seed", "3"]
GIB4 = 4 << 30


def _copy(tiny_caches, backend: str, tmp_path: Path) -> tuple[Path, Path]:
    """(a copy of the tiny cache of `backend`, its one stored shard)."""
    root = tmp_path / "c"
    shutil.copytree(tiny_caches[backend], root)
    return root, root / cf.read_manifest(root).shards[0].group


def _reseal(root: Path) -> None:
    """Record every stored shard's bytes as they are now in its entry (files, sha256, bytes)."""
    for entry in cf.read_manifest(root).shards:
        group = root / entry.group
        if group.is_dir():
            digest, size, files = cf.group_files(group)
        else:
            (digest, size), files = cf.group_digest(group), cf.tar_files(str(group))
        cf.record_shard(root, dataclasses.replace(entry, sha256=digest, bytes=size, files=files))


def _lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.strip() and not ln.startswith(("mrmae: warning", "verify ", "pretrain: "))
            and "RANDOM WEIGHTS" not in ln and "\r" not in ln]  # (less a run's start line)


def _run(args: list[str], data_limit: int | None = None, timeout: int = 240) -> tuple[int, list[str]]:
    """`python -m mrmae ARGS` in a real process (a FIFO can never hang the test run; with
    `data_limit`, under RLIMIT_DATA: an allocation past it is a MemoryError) -> (exit code,
    its lines less warnings and bars)."""
    def limit() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_DATA, (data_limit, data_limit))

    r = subprocess.run([sys.executable, "-m", "mrmae", *args], capture_output=True, text=True, timeout=timeout,
                       preexec_fn=limit if data_limit else None, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    return r.returncode, _lines(r.stdout + r.stderr)


def _pretrain(demo_shards, root: Path, out: Path) -> list[str]:
    """`mrmae pretrain` in this process; asserts exit 1 and that nothing was trained."""
    r = CliRunner().invoke(cli, ["pretrain", "--shards", str(demo_shards[0]), "--feature-cache", str(root),
                                 "--out", str(out), *TINY])
    assert r.exit_code == 1, r.output + repr(r.exception)
    assert not (out / "checkpoints").exists() and not (out / "metrics.jsonl").exists()
    return _lines(r.output)


def _verify_finds(root: Path, *words: str) -> str:
    """`mrmae cache verify` (integrity only) reports the shard damaged, in one line with `words`."""
    r = CliRunner().invoke(cli, ["cache", "verify", "--feature-cache", str(root), "--recompute", "0", "--no-progress"])
    damaged = [ln for ln in r.output.splitlines() if ln.startswith("mrmae: damaged: ")]
    assert r.exit_code == 1 and len(damaged) == 1 and all(w in damaged[0] for w in words), r.output
    return damaged[0]


def _zarr_json(group: Path, array: str, change) -> None:
    path = group / array / "zarr.json"
    meta = json.loads(path.read_text())
    change(meta)
    path.write_text(json.dumps(meta, indent=2))


def four_gib_zstd_frame() -> bytes:
    """A valid zstd frame that declares (and would decompress to) 4 GiB of zeros, in 131 KB:
    32,768 RLE blocks of 128 KiB (RFC 8878), with the content-checksum flag (its value is
    checked only after decompressing, which never happens)."""
    block = 128 << 10
    head = b"\x28\xb5\x2f\xfd" + bytes([0xC4, 0x38]) + GIB4.to_bytes(8, "little")  # FCS 8 bytes, checksum, 2^17 window
    rle = [((block << 3) | (1 << 1) | (i == GIB4 // block - 1)).to_bytes(3, "little") + b"\0"
           for i in range(GIB4 // block)]
    return head + b"".join(rle) + b"\0\0\0\0"


# --- Zarr: metadata, special files, swaps, declared sizes ---------------------------------


@pytest.mark.parametrize("array, change, words", [
    ("features", lambda m: m.update(data_type="uint8"), ["features/zarr.json: data_type: uint8", "writes int8"]),
    ("features", lambda m: m["codecs"].insert(0, {"name": "transpose", "configuration": {"order": [0, 2, 1]}}),
     ["features/zarr.json: codecs: ['transpose'"]),
    ("features_scale", lambda m: m["codecs"].insert(1, {"name": "numcodecs.fixedscaleoffset", "configuration": {
        "offset": 0, "scale": 1000, "dtype": "<f2", "astype": "<f2"}}), ["features_scale/zarr.json: codecs:"]),
    ("keys", lambda m: (m.update(shape=[10**12]), m["chunk_grid"]["configuration"].update(chunk_shape=[1])),
     ["10**12 rows"]),
])
def test_zarr_metadata_other_than_the_writers_is_refused_naming_file_and_field(demo_shards, tiny_caches, tmp_path,
                                                                               array, change, words):
    """A `zarr.json` crafted with its entry resealed (so only the reader stands in the way):
    another dtype, an added transpose or fixedscaleoffset codec, a shape of 10^12 rows.
    Before format 5 these trained with exit 0 (mimic loss 12.05 or 749,424 instead of 1.64),
    or grew memory until a MemoryError."""
    root, group = _copy(tiny_caches, "zarr", tmp_path)
    _zarr_json(group, array, change)
    _reseal(root)
    words = [w.replace("10**12 rows", "1000000000000 rows stored, its entry records num_views 24") for w in words]
    lines = _pretrain(demo_shards, root, tmp_path / "run")
    assert len(lines) == 1 and lines[0].startswith(f"mrmae: error: {group}") and all(w in lines[0] for w in words), \
        lines
    _verify_finds(root, str(group), *words)


@pytest.mark.parametrize("kind", ["fifo", "directory", "link inside", "device"])
def test_a_chunk_that_is_no_regular_file_is_one_line_never_read(demo_shards, tiny_caches, tmp_path, kind):
    """A FIFO (pretraining hung forever), a directory (rows 16-23 trained on zeros), a link
    or a device (read until memory ran out) in place of the second features chunk: refused
    by lstat before it is opened, one line naming the file and its rows, in a real process."""
    root, group = _copy(tiny_caches, "zarr", tmp_path)
    chunk = group / "features" / "c" / "1" / "0" / "0"
    chunk.unlink()
    if kind == "fifo":
        os.mkfifo(chunk)
    elif kind == "directory":
        chunk.mkdir()
    elif kind == "link inside":
        chunk.symlink_to(group / "features" / "c" / "0" / "0" / "0")
    else:
        try:
            os.mknod(chunk, stat.S_IFCHR | 0o444, os.makedev(1, 5))  # /dev/zero's numbers
        except PermissionError:
            pytest.skip("no CAP_MKNOD here")
    what = {"fifo": "a FIFO", "directory": "a directory", "link inside": "a symbolic link",
            "device": "a character device"}[kind]
    code, lines = _run(["pretrain", "--shards", str(demo_shards[0]), "--feature-cache", str(root),
                        "--out", str(tmp_path / "run"), *TINY])
    assert code == 1 and len(lines) == 1, lines
    assert f"{group}" in lines[0] and "file features/c/1/0/0 (rows 16-23)" in lines[0] and what in lines[0], lines
    assert not (tmp_path / "run" / "checkpoints").exists()
    _verify_finds(root, str(group), "features/c/1/0/0", what)


def test_a_chunk_swapped_for_another_of_the_same_array_is_found_as_read(demo_shards, tiny_caches, tmp_path):
    """Two chunks of `features` swapped: each keeps a valid crc32c of its own bytes (format
    4 trained on them), the entry's list binds each file to its place."""
    root, group = _copy(tiny_caches, "zarr", tmp_path)
    a, b = group / "features/c/0/0/0", group / "features/c/1/0/0"
    data_a, data_b = a.read_bytes(), b.read_bytes()
    a.write_bytes(data_b)
    b.write_bytes(data_a)
    lines = _pretrain(demo_shards, root, tmp_path / "run")
    # (zarr reads a block's chunks at once: the first refused, in time, is named)
    named = [(f"file features/c/0/0/0 (rows 0-15): {len(data_b):,} bytes, the entry lists {len(data_a):,}"),
             (f"file features/c/1/0/0 (rows 16-23): {len(data_a):,} bytes, the entry lists {len(data_b):,}")]
    assert len(lines) == 1 and any(n in lines[0] for n in named), lines
    _verify_finds(root, "features/c/0/0/0")


def test_a_file_the_entry_does_not_list_is_never_read_and_verify_names_it(tiny_caches, tmp_path):
    root, group = _copy(tiny_caches, "zarr", tmp_path)
    extra = group / "features" / "c" / "7" / "0" / "0"
    extra.parent.mkdir(parents=True)
    shutil.copy(group / "features/c/0/0/0", extra)
    shard = cf.FeatureCache(root).shard(cf.read_manifest(root).shards[0].source)
    assert shard.stored_row(17)[0].shape == (196, 192)  # the reader takes only what is listed
    with pytest.raises(cf.CacheError, match="features/c/7/0/0 .*not in the entry's file list"):
        shard.store.read("features/c/7/0/0")
    _verify_finds(root, "file features/c/7/0/0: in the group, not in its entry's file list")


def test_a_zstd_chunk_declaring_4_gib_is_refused_with_memory_flat(demo_shards, tiny_caches, tmp_path):
    """A valid zstd frame (131 KB) declaring 4 GiB, with its crc32c, as a features chunk, the
    entry resealed: refused from the frame's header, in a process whose data segment is
    limited to 1.5 GiB (the decoder's allocation would be a MemoryError). Before: 4.99 GB."""
    root, group = _copy(tiny_caches, "zarr", tmp_path)
    frame = four_gib_zstd_frame()
    (group / "features/c/1/0/0").write_bytes(frame + google_crc32c.value(frame).to_bytes(4, "little"))
    _reseal(root)
    want = f"file features/c/1/0/0 (rows 16-23): zstd frame declares {GIB4:,} bytes decompressed, 602,112 expected"
    code, lines = _run(["pretrain", "--shards", str(demo_shards[0]), "--feature-cache", str(root),
                        "--out", str(tmp_path / "run"), *TINY], data_limit=3 << 29)
    assert code == 1 and len(lines) == 1 and want in lines[0], lines
    code, lines = _run(["cache", "verify", "--feature-cache", str(root), "--recompute", "0", "--no-progress"],
                       data_limit=3 << 29)
    assert code == 1 and [ln for ln in lines if ln.startswith("mrmae: damaged:")] == [
        next(ln for ln in lines if want in ln)], lines


def test_a_huge_count_crafted_consistently_is_refused_before_any_allocation(tiny_caches, tmp_path):
    """Entry, group attributes and every array's shape agree on 10^12 rows, entries resealed:
    the entry lists two features chunks where the shape needs 62.5 billion; refused from
    the counts alone (under a 1.5 GiB data limit), never by enumerating them."""
    root, group = _copy(tiny_caches, "zarr", tmp_path)
    rows = 10**12
    for array in ("keys", "view", "crop", "flip", "attention", "cls", "features", "features_scale", "image_sha256"):
        _zarr_json(group, array, lambda m: m["shape"].__setitem__(0, rows))
    for array in ("keys", "view", "crop", "flip", "image_sha256"):
        _zarr_json(group, array, lambda m: m["chunk_grid"]["configuration"]["chunk_shape"].__setitem__(0, rows))
    top = json.loads((group / "zarr.json").read_text())
    top["attributes"].update(rows=rows, num_samples=rows // 4)
    (group / "zarr.json").write_text(json.dumps(top))
    entry_file = entry_files(root / "shards")[0]
    entry = json.loads(entry_file.read_text())
    entry.update(num_samples=rows // 4, num_views=rows)
    entry_file.write_text(json.dumps(entry))
    _reseal(root)
    code, lines = _run(["cache", "verify", "--feature-cache", str(root), "--recompute", "0", "--no-progress"],
                       data_limit=3 << 29, timeout=120)
    damaged = [ln for ln in lines if ln.startswith("mrmae: damaged:")]
    assert code == 1 and len(damaged) == 1 and "array attention: 1 chunk files listed" in damaged[0], lines


# --- counts tied together ------------------------------------------------------------------


def test_counts_that_agree_with_each_other_but_not_with_the_rows_are_refused(demo_shards, tiny_caches, tmp_path):
    """views.per_image 4 -> 2 and every entry's num_samples doubled (num_views unchanged):
    before, an epoch trained twice the steps and `cache verify` said integrity OK."""
    root, group = _copy(tiny_caches, "zarr", tmp_path)
    manifest = json.loads((root / cf.MANIFEST).read_text())
    manifest["views"]["per_image"] = 2
    (root / cf.MANIFEST).write_text(json.dumps(manifest))
    entry_file = entry_files(root / "shards")[0]
    entry = json.loads(entry_file.read_text())
    entry["num_samples"] *= 2
    entry_file.write_text(json.dumps(entry))
    lines = _pretrain(demo_shards, root, tmp_path / "run")
    assert len(lines) == 1 and "file zarr.json (metadata): attribute num_samples: '6', its entry gives 12" in lines[0]
    _verify_finds(root, str(group), "attribute num_samples")


def test_rows_whose_views_are_not_0_to_k_in_order_are_refused(tiny_caches, tmp_path):
    """A `view` array rewritten (through zarr, entry resealed) to show a view index >= K."""
    import zarr

    root, group = _copy(tiny_caches, "zarr", tmp_path)
    view = zarr.open_array(str(group / "view"), mode="r+")
    values = view[:]
    values[5] = 7
    view[:] = values
    _reseal(root)
    with pytest.raises(cf.CacheError, match=r"row 5 holds view 7, expected 1 \(views 0..3 of each sample"):
        cf.FeatureCache(root).shard(cf.read_manifest(root).shards[0].source)
    _verify_finds(root, "row 5 holds view 7")


# --- wds ---------------------------------------------------------------------------------


def _rewrite_tar(tar: Path, change) -> None:
    """The tar's members (TarInfo, bytes) through `change`, written back as a tar."""
    import io
    import tarfile

    with tarfile.open(tar) as tf:
        members = [(m, tf.extractfile(m).read()) for m in tf.getmembers()]
    members = change(members)
    with tarfile.open(tar, "w", format=tarfile.PAX_FORMAT) as tf:
        for m, data in members:
            m.size = len(data)
            tf.addfile(m, io.BytesIO(data))


def test_a_wds_member_declaring_4_gib_is_refused_with_memory_flat(demo_shards, tiny_caches, tmp_path):
    """Row 0's features member replaced by a checksummed zstd frame declaring 4 GiB (134 KB
    on disk), entry resealed. Before: trained with exit 0 after 4.98 GB of RSS, on zeros."""
    root, tar = _copy(tiny_caches, "wds", tmp_path)
    frame = four_gib_zstd_frame()
    _rewrite_tar(tar, lambda ms: [(m, frame if m.name.endswith("features.npy.zst") else d) for m, d in ms])
    _reseal(root)
    code, lines = _run(["pretrain", "--shards", str(demo_shards[0]), "--feature-cache", str(root),
                        "--out", str(tmp_path / "run"), *TINY], data_limit=3 << 29)
    assert code == 1 and len(lines) == 1, lines
    assert f"{tar}: key demo_" in lines[0] and f"zstd frame declares {GIB4:,} bytes decompressed" in lines[0], lines
    _verify_finds(root, "member demo_00000000_v0.features, row 0", f"declares {GIB4:,} bytes")


@pytest.mark.parametrize("case", ["extra member", "swapped rows", "npy of another dtype"])
def test_wds_members_other_than_the_entry_lists_are_one_line(tiny_caches, tmp_path, case):
    import numpy as np
    from numcodecs import Zstd

    root, tar = _copy(tiny_caches, "wds", tmp_path)
    if case == "extra member":
        _rewrite_tar(tar, lambda ms: [*ms[:3], (_renamed(ms[2][0], "demo_00000000_v0.extra.npy"), ms[2][1]), *ms[3:]])
        words = ["member demo_00000000_v0.extra.npy (row 0): not in the entry's file list"]
    elif case == "swapped rows":
        def swap(ms):
            feats = [i for i, (m, _) in enumerate(ms) if m.name.endswith("features.npy.zst")]
            i, j = feats[0], feats[1]
            ms[i], ms[j] = (ms[i][0], ms[j][1]), (ms[j][0], ms[i][1])
            return ms
        _rewrite_tar(tar, swap)
        words = ["member demo_00000000_v0.features.npy.zst (row 0)"]
    else:
        fake = io_npy(np.zeros((196, 192), np.uint8))
        _rewrite_tar(tar, lambda ms: [(m, bytes(Zstd(checksum=True).encode(fake))
                                       if m.name.endswith("v0.features.npy.zst") else d) for m, d in ms])
        _reseal(root)
        words = ["member demo_00000000_v0.features, row 0", ".npy uint8 [196, 192]: the manifest's teacher gives int8"]
    cache = cf.FeatureCache(root)
    with pytest.raises(cf.CacheError) as e:
        shard = cache.shard(cache.manifest.shards[0].source)
        shard.stored_row(0)
    assert str(e.value).startswith(str(tar)) and all(w in str(e.value) for w in words), str(e.value)
    _verify_finds(root, *words)


def _renamed(info, name: str):
    import copy

    new = copy.copy(info)
    new.name = name
    return new


def io_npy(arr) -> bytes:
    import io

    import numpy as np

    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


# --- the cache's own JSON files, special files there ---------------------------------------


@pytest.mark.parametrize("which", ["manifest.json", "entry", "zarr.json of keys", "the tar"])
def test_a_fifo_where_a_cache_file_belongs_is_one_line_never_a_hang(tiny_caches, tmp_path, which):
    backend = "wds" if which == "the tar" else "zarr"
    root, group = _copy(tiny_caches, backend, tmp_path)
    path = {"manifest.json": root / cf.MANIFEST, "entry": entry_files(root / "shards")[0],
            "zarr.json of keys": group / "keys" / "zarr.json", "the tar": group}[which]
    path.unlink()
    os.mkfifo(path)
    # (`cache info` reads the manifest and the entries; a group's files are read by `verify`)
    command = "info" if which in ("manifest.json", "entry") else "verify"
    code, lines = _run(["cache", command, "--feature-cache", str(root), "--recompute", "0"][:4 if command == "info"
                                                                                           else 6], timeout=120)
    lines = [ln for ln in lines if not ln.startswith("integrity:")]
    assert code == 1 and len(lines) == 1 and "a FIFO" in lines[0], lines
    assert str(path.relative_to(root)).split("/")[-1] in lines[0] or str(group) in lines[0], lines


def test_a_format_4_cache_reads_with_one_warning(demo_shards, tiny_caches, tmp_path):
    """Format 4 (entries without a file list): read and trained on, with one warning that a
    chunk replaced by another whole one is found only by `cache verify`."""
    root, _ = _copy(tiny_caches, "zarr", tmp_path)
    manifest = json.loads((root / cf.MANIFEST).read_text())
    manifest["format_version"] = 4
    (root / cf.MANIFEST).write_text(json.dumps(manifest))
    for f in entry_files(root / "shards"):
        entry = json.loads(f.read_text())
        del entry["file_list"]
        f.write_text(json.dumps(entry))
    import mrmae.shared.cache_format.common as common

    common._warned_unlisted = False
    with pytest.warns(cf.UnlistedCacheWarning, match="format 4 cache: its entries list no files") as caught:
        r = CliRunner().invoke(cli, ["pretrain", "--shards", str(demo_shards[0]), "--feature-cache", str(root),
                                     "--out", str(tmp_path / "run"), *TINY])
    assert r.exit_code == 0, r.output + repr(r.exception)
    assert len([w for w in caught if issubclass(w.category, cf.UnlistedCacheWarning)]) == 1
    assert cf.check_integrity(str(root)) == []


# --- format 6: each shard's file list beside its group, bound by the entry -------------------


def _file_list(root: Path) -> Path:
    """The one shard's file list, `<group>.files` beside its group."""
    return root / cf.files_path(cf.read_manifest(root).shards[0].group)


@pytest.mark.parametrize("backend", cf.backend_names())
@pytest.mark.parametrize("how", ["missing", "another shard's", "truncated", "huge", "a FIFO", "a link out"])
def test_a_file_list_other_than_the_entry_binds_is_one_line_and_repair_removes_it(demo_shards, tiny_caches, tmp_path,
                                                                                  backend, how):
    """The entry holds the list's sha256 and size: a list missing, swapped for another
    shard's (an entry resealed over other bytes), cut, grown to 3 GiB, a FIFO or a link out
    of the cache stops pretraining in one line naming the list, before any row is read
    (under a 1.5 GiB data limit: never read whole); `cache verify --repair` removes entry,
    group and list, nothing outside the cache."""
    root, group = _copy(tiny_caches, backend, tmp_path)
    listed = _file_list(root)
    text = listed.read_bytes()
    outside = tmp_path / "elsewhere.files"
    listed.unlink()
    if how == "another shard's":  # a valid list of the same size, another file's digest in it
        at = text.index(b'"]') - 1
        listed.write_bytes(text[:at] + (b"0" if text[at:at + 1] != b"0" else b"1") + text[at + 1:])
    else:
        put_hostile(listed, how, text, outside)
    code, lines = _run(["pretrain", "--shards", str(demo_shards[0]), "--feature-cache", str(root),
                        "--out", str(tmp_path / "run"), *TINY], data_limit=3 << 29, timeout=240)
    want = {"missing": "missing: the file list of", "another shard's": "sha256 differs from its entry's",
            "truncated": "bytes, fewer than its entry records", "huge": "more than", "a FIFO": "a FIFO",
            "a link out": "a symbolic link out of the cache"}[how]
    assert code == 1 and len(lines) == 1 and listed.name in lines[0] and want in lines[0], lines
    assert not (tmp_path / "run" / "checkpoints").exists()
    code, lines = _run(["cache", "verify", "--feature-cache", str(root), "--recompute", "0", "--repair",
                        "--no-progress"], timeout=120)
    assert code == 1 and any(ln.startswith("mrmae: damaged:") and listed.name in ln for ln in lines), lines
    assert not group.exists() and not listed.is_symlink() and not listed.exists() and cf.read_manifest(root).shards == ()
    assert how != "a link out" or outside.read_bytes() == text  # (a link's target is never touched)


@pytest.mark.parametrize("backend", cf.backend_names())
def test_start_up_reads_no_file_list_and_the_shard_reads_its_own(demo_shards, tiny_caches, tmp_path, backend):
    """What a run does before step 1 (the cache's entries, every group's metadata proven, the
    epoch counted) reads entries only: with the shard's list a FIFO, it passes; opening the
    shard is what reads the list (and here refuses the FIFO, naming it)."""
    from mrmae.train.pretrain import count_samples

    root, _ = _copy(tiny_caches, backend, tmp_path)
    listed = _file_list(root)
    listed.unlink()
    os.mkfifo(listed)
    cache = cf.FeatureCache(root)
    url = str(demo_shards[0])
    assert [e.files for e in cache.check_shards([url])] == [None]  # (the list is not read at start-up)
    assert count_samples([url], cache) == 6
    with pytest.raises(cf.CacheError, match=f"{listed.name}: a FIFO"):
        cache.shard(url)


@pytest.mark.parametrize("backend", cf.backend_names())
def test_a_format_5_cache_with_its_lists_in_the_entries_still_reads(demo_shards, tiny_caches, tmp_path, backend):
    """Format 5 (never released) kept each list inside the entry: read as it is, checked the
    same way (a chunk or member swapped is refused), no warning; its list file is not needed."""
    root, group = _copy(tiny_caches, backend, tmp_path)
    manifest = json.loads((root / cf.MANIFEST).read_text())
    manifest["format_version"] = 5
    (root / cf.MANIFEST).write_text(json.dumps(manifest))
    listed = _file_list(root)
    for f in entry_files(root / "shards"):
        entry = json.loads(f.read_text())
        del entry["file_list"]
        entry["files"] = json.loads(listed.read_text())["files"]
        f.write_text(json.dumps(entry, indent=1))
    listed.unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        shard = cf.FeatureCache(root).shard(str(demo_shards[0]))
        assert len(shard.read(slice(None))["keys"]) == 24
    assert cf.check_integrity(str(root)) == []
    if backend == "zarr":
        chunk = bytearray((group / "features/c/1/0/0").read_bytes())
        chunk[100] ^= 1
        (group / "features/c/1/0/0").write_bytes(bytes(chunk))
        _verify_finds(root, "file features/c/1/0/0 (rows 16-23)", "sha256 differs from the entry's")

"""Every chunk read is checked: damage in a Zarr chunk or a wds member stops pretraining in
one line, old formats warn, `cache verify --repair` then extraction redoes only the damage.

"""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import DINO_TINY

from mrmae.cli import cli
from mrmae.extract.config import ExtractConfig
from mrmae.extract.runner import run_extraction
from mrmae.shared import cache_format as cf
from mrmae.shared.views import ViewConfig


def _extract3(shards, out, fmt="zarr", **kw):
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
    from test_pretrain import TINY


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


    for entry in cf.read_manifest(cache).shards:
        digest, size, files = cf.group_files(cache / entry.group)
        cf.record_shard(cache, dataclasses.replace(entry, sha256=digest, bytes=size, files=files))


def test_s3_format_3_cache_trains_with_one_warning_and_checked_crops(demo_shards, tmp_path):
    """A format 3 cache (no checksums) of two shards still trains, with exactly one warning
    for the process, not one per shard or per cache opened; its crop boxes are still
    checked: against the decoded image when rendered, and for absurd values when read."""
    import warnings

    from test_pretrain import TINY

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

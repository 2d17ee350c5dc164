"""shared/shards.py: URL lists, sources (local, pipe:, fsspec), the tar reader, counting.

Every test reads real tars written with Python's tarfile (ustar, GNU and pax headers) or
webdataset's TarWriter (the demo shards).
"""

from __future__ import annotations

import hashlib
import io
import tarfile

import fsspec
import pytest

from mrmae.shared import shards as sh


def write_tar(path, members: list[tuple[str, bytes]], fmt=tarfile.USTAR_FORMAT) -> bytes:
    """A tar of `members` (name, data) in order, also returned as bytes."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


def test_expand_urls_braces_and_lists():
    assert sh.expand_urls("a-{000..002}.tar::b.tar") == ["a-000.tar", "a-001.tar", "a-002.tar", "b.tar"]
    assert sh.expand_urls(["x-{a,b}.tar", "pipe:cat y.tar"]) == ["x-a.tar", "x-b.tar", "pipe:cat y.tar"]
    assert sh.expand_urls("s3://bucket/t-{0..1}.tar") == ["s3://bucket/t-0.tar", "s3://bucket/t-1.tar"]


def test_samples_keys_follow_webdataset(tmp_path):
    """Key = path up to the first dot of the base name, extension (lower-case) the rest;
    meta files, names without a dot and directories are skipped; the hash is of every byte."""
    data = write_tar(tmp_path / "s.tar", [
        ("__meta__", b"m"), ("a.jpg", b"A"), ("a.CLS", b"1"), ("dir/b.seg.png", b"B"), ("noext", b"x"),
        ("c.jpg", b"C")])
    reader = sh.ShardReader(str(tmp_path / "s.tar"))
    got = [(s.key, s.members) for s in reader]
    assert got == [("a", {"jpg": b"A", "cls": b"1"}), ("dir/b", {"seg.png": b"B"}), ("c", {"jpg": b"C"})]
    assert reader.sha256 == hashlib.sha256(data).hexdigest() and reader.size == len(data)
    unhashed = sh.ShardReader(str(tmp_path / "s.tar"), hashed=False)
    assert len(list(unhashed)) == 3 and unhashed.sha256 is None and unhashed.size == len(data)
    assert sh.count_samples(str(tmp_path / "s.tar")) == 3


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_long_names(tmp_path, fmt):
    long = "d/" + "x" * 150
    write_tar(tmp_path / "l.tar", [(long + ".jpg", b"1"), (long + ".cls", b"2"), ("é.jpg", b"3")], fmt)
    assert [(s.key, sorted(s.members)) for s in sh.iter_samples(str(tmp_path / "l.tar"))] == [
        (long, ["cls", "jpg"]), ("é", ["jpg"])]


def test_demo_shard_through_every_source(demo_shards, tmp_path):
    """A local path, pipe:, file:// and memory:// give the same samples and the same sha256."""
    path = str(demo_shards[0])
    data = demo_shards[0].read_bytes()
    with fsspec.open("memory://shards-test/demo.tar", "wb") as f:
        f.write(data)
    results = []
    for url in (path, f"pipe:cat {path}", f"file://{path}", "memory://shards-test/demo.tar"):
        reader = sh.ShardReader(url)
        results.append(([(s.key, s.image, s.label) for s in reader], reader.sha256))
        assert sh.count_samples(url) == 6
    assert all(r == results[0] for r in results)
    assert results[0][1] == hashlib.sha256(data).hexdigest() == sh.source_digest(f"pipe:cat {path}")
    assert len(results[0][0]) == 6 and all(image and label is not None for _, image, label in results[0][0])


def test_unopenable_sources_name_the_shard(tmp_path):
    for url in (str(tmp_path / "missing.tar"), f"pipe:cat {tmp_path / 'missing.tar'}", "memory://nowhere/x.tar"):
        with pytest.raises(sh.ShardReadError, match="^" + url.replace("|", r"\|")):
            list(sh.iter_samples(url))
    (tmp_path / "junk.tar").write_bytes(b"not a tar at all" * 64)
    with pytest.raises(sh.ShardReadError, match="junk.tar: not a tar, or damaged"):
        sh.count_samples(str(tmp_path / "junk.tar"))


def cut_points(data: bytes) -> dict[str, int]:
    """Where to cut a tar of >= 2 members: inside the 2nd member's data, exactly at the
    boundary after it, inside the 3rd member's header."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        members = tf.getmembers()
    second, third = members[1], members[2]
    return {"mid-member": second.offset_data + second.size // 2,
            "boundary": third.offset, "in-header": third.offset + 100}


@pytest.mark.parametrize("where", ["mid-member", "boundary", "in-header"])
@pytest.mark.parametrize("via", ["path", "pipe"])
def test_truncated_tar_is_an_error_naming_the_shard(demo_shards, tmp_path, where, via):
    data = demo_shards[0].read_bytes()
    cut = tmp_path / f"cut-{where}.tar"
    cut.write_bytes(data[:cut_points(data)[where]])
    url = str(cut) if via == "path" else f"pipe:cat {cut}"
    for read in (lambda: list(sh.iter_samples(url)), lambda: sh.count_samples(url), lambda: sh.read_shard(url)):
        with pytest.raises(sh.ShardReadError, match=f"^{url}: truncated tar"):
            read()
    if where != "mid-member":  # tarfile itself takes these for a complete, shorter archive
        with tarfile.open(cut, "r|*") as tf:
            assert len([m for m in tf]) < 12


def test_end_of_archive_block_is_required_but_padding_is_not(tmp_path):
    data = write_tar(tmp_path / "full.tar", [("a.jpg", b"x" * 700), ("b.jpg", b"y")])
    end = 3 * 512 + 2 * 512  # two headers, 2 + 1 data blocks: the end-of-archive block follows
    (tmp_path / "one-zero-block.tar").write_bytes(data[:end + 512])
    assert sh.count_samples(str(tmp_path / "one-zero-block.tar")) == 2
    (tmp_path / "no-zero-block.tar").write_bytes(data[:end])
    with pytest.raises(sh.ShardReadError, match="without its end-of-archive block"):
        sh.count_samples(str(tmp_path / "no-zero-block.tar"))


def test_data_after_the_end_of_archive_is_an_error(tmp_path):
    """`cat a.tar b.tar`: tarfile (and GNU tar without -i) stop at a.tar's end, dropping b."""
    a = write_tar(tmp_path / "a.tar", [("a.jpg", b"1")])
    b = write_tar(tmp_path / "b.tar", [("b.jpg", b"2")])
    (tmp_path / "ab.tar").write_bytes(a + b)
    with pytest.raises(sh.ShardReadError, match="ab.tar: data after the tar's end-of-archive block"):
        sh.count_samples(str(tmp_path / "ab.tar"))
    (tmp_path / "padded.tar").write_bytes(a + bytes(10240))  # zeros after the end: record padding
    assert sh.count_samples(str(tmp_path / "padded.tar")) == 1


def test_repeated_keys_are_separate_samples_and_first_copies_keeps_the_first(tmp_path):
    """Adjacent (a a) and later (a b a) repeats: each copy is a sample (webdataset would stop
    at the adjacent one); `first_copies` keeps the first and reports the rest."""
    write_tar(tmp_path / "r.tar", [("a.jpg", b"1"), ("a.cls", b"1"), ("a.jpg", b"2"), ("a.cls", b"2"),
                                   ("b.jpg", b"3"), ("a.jpg", b"4")])
    samples = list(sh.iter_samples(str(tmp_path / "r.tar")))
    assert [(s.key, s.image) for s in samples] == [("a", b"1"), ("a", b"2"), ("b", b"3"), ("a", b"4")]
    repeats = []
    kept = list(sh.first_copies(samples, repeats.append))
    assert [(s.key, s.image) for s in kept] == [("a", b"1"), ("b", b"3")]
    assert [s.image for s in repeats] == [b"2", b"4"]
    assert sh.count_samples(str(tmp_path / "r.tar")) == 2


def test_a_failing_pipe_command_is_an_error_and_an_early_stop_is_not(demo_shards):
    with pytest.raises(sh.ShardReadError, match="exited with status 3"):
        list(sh.iter_samples(f"pipe:cat {demo_shards[0]}; exit 3"))
    it = sh.iter_samples(f"pipe:cat {demo_shards[0]}")
    assert next(it).key
    it.close()  # the command is stopped and reaped, no error

"""Shard reading in one room: URL lists, opening sources, tar samples, counting, identity.

Both stages read their input tars here, and only here:

    "a-{000..009}.tar::b.tar"    expand_urls        -> ["a-000.tar", ..., "b.tar"]
    URL                          open_source        -> binary stream (local path, `pipe:CMD`,
                                                       fsspec `scheme://` URL)
    stream                       HashingReader      -> same bytes, sha256 + size as they pass
    stream                       _members           -> (name, bytes) of each regular file
    members                      _samples           -> TarSample {key, members: {ext: bytes}}
    URL                          ShardReader        -> TarSample..., then .sha256 of the whole shard

Keys follow webdataset's conventions: a member's key is its path up to the first dot of
its base name, the extension (lower-cased) the rest; names without a dot and webdataset's
`__meta__` files are skipped, as are directories, links and other non-regular members.
Consecutive members of one key are one sample. A key that comes back (adjacent, as in
a.jpg a.cls a.jpg, or later in the tar) starts another sample with the same key: callers
keep the first copy (`first_copies`); extraction also lists the later ones as skipped.

The tar reader is written here rather than taken from `tarfile` because `tarfile` reads a
tar cut at a member boundary or inside a header as a complete, shorter archive. Here an
archive ends only at its end-of-archive zero block; a stream that ends before it, inside
a header or inside a member's data is a ShardReadError naming the shard, so a cut shard
can never pass as a complete one with fewer samples. Nothing read is ever executed,
unpickled or written anywhere: member names only become keys.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
from dataclasses import dataclass, field
from typing import BinaryIO, Callable, Iterable, Iterator

import braceexpand

from .errors import OptionError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
BLOCK = 512
_ZERO_BLOCK = bytes(BLOCK)
_SKIP_META = re.compile(r"__[^/]*__($|/)")  # webdataset's default `skip_meta`
_REGULAR = (b"0", b"\0", b"7")  # tar type flags of regular files (7: contiguous)
REPEATED_KEY = "repeated key in shard (its first copy is kept)"


class ShardReadError(OSError):
    """A shard that cannot be opened or read to its end; the message starts with its URL."""


@dataclass
class TarSample:
    """One sample: consecutive tar members of one key. `members`: ext (lower-case) -> bytes."""

    key: str
    members: dict[str, bytes] = field(default_factory=dict)

    @property
    def image_members(self) -> list[str]:
        """The extensions of its members that are image files (`jpg`, and `b.jpg` of a
        member `a.b.jpg` beside `a.jpg`: webdataset makes both one sample's)."""
        return [e for e in self.members if e.rsplit(".", 1)[-1] in IMAGE_EXTS]

    @property
    def image(self) -> bytes | None:
        """The sample's image file (the first of IMAGE_EXTS present), or None: none, or
        several (`problem` says which: no one of them is the sample's image)."""
        if len(self.image_members) > 1:
            return None
        return next((self.members[e] for e in IMAGE_EXTS if e in self.members), None)

    @property
    def problem(self) -> str | None:
        """Why the sample has no image, when it has several (else None)."""
        images = self.image_members
        if len(images) <= 1:
            return None
        return f"{len(images)} images in one sample ({', '.join(f'{self.key}.{e}' for e in images)})"

    @property
    def label(self) -> int | None:
        """The integer in the `.cls` member, or None (absent, or not an integer)."""
        data = self.members.get("cls")
        if data is None:
            return None
        try:
            return int(data.decode().strip())
        except (ValueError, UnicodeDecodeError):
            return None


@dataclass
class RawSample:
    """What extraction needs of a sample: its key, image bytes and label."""

    key: str
    image: bytes | None  # None: the sample has no image member (or several: `problem`)
    label: int | None
    problem: str | None = None  # why `image` is None when it is not for lack of one


# --- URLs and sources -------------------------------------------------------------------

MAX_URLS = 1_000_000  # shards in one list: 1000x ImageNet's usual 1024; a range past it is a typo


def expand_urls(urls: str | list[str]) -> list[str]:
    """A webdataset-style URL list -> shard URLs: items separated by `::`, each with brace
    ranges and alternatives expanded ('a-{000..002}.tar::b.tar' -> a-000, a-001, a-002, b).
    More than MAX_URLS is an OptionError (`{0..99999999}` would take minutes and ~10 GB)."""
    items = urls if isinstance(urls, list) else [urls]
    out: list[str] = []
    for item in items:
        for part in str(item).split("::"):
            if not part:
                continue
            # (braceexpand builds a numeric range whole, however wide: count before expanding)
            if len(out) + _range_product(part) > MAX_URLS:
                shown = part if len(part) <= 80 else part[:77] + "..."
                raise OptionError(f"shard list {shown!r}: more than {MAX_URLS:,} shards (a brace range too wide?)")
            out.extend(braceexpand.braceexpand(part))
    return out


def _range_product(part: str) -> int:
    """How many URLs the numeric brace ranges of `part` make together ({000..999}: 1000)."""
    n = 1
    for a, b, step in re.findall(r"\{(-?\d+)\.\.(-?\d+)(?:\.\.(-?\d+))?\}", part):
        n *= abs(int(b) - int(a)) // max(abs(int(step or 1)), 1) + 1
    return n


def is_url(url: str) -> bool:
    """True for an fsspec `scheme://` URL (file://, s3://, memory://...), not for `pipe:`."""
    return not url.startswith("pipe:") and "://" in url.split(" ")[0]


def local_path(url: str) -> str | None:
    """The local file behind `url` (a plain path or file://), or None (pipe: or remote)."""
    if url.startswith("file://"):
        return url[len("file://"):]
    return None if url.startswith("pipe:") or is_url(url) else url


def local_file_size(url: str) -> int | None:
    """The size of a shard that is a local file (to notice one changed since); else None."""
    path = local_path(url)
    return os.path.getsize(path) if path is not None and os.path.isfile(path) else None


class _Pipe:
    """The standard output of `pipe:CMD` (run by the shell, as webdataset does). Its end of
    file is only an end when the command exited 0; otherwise a ShardReadError naming it."""

    def __init__(self, url: str):
        self.url = url
        self.proc = subprocess.Popen(url[len("pipe:"):], shell=True, stdout=subprocess.PIPE, bufsize=1 << 20)

    def read(self, n: int = -1) -> bytes:
        data = self.proc.stdout.read(n)
        if not data and n != 0 and self.proc.wait() != 0:
            raise ShardReadError(f"{self.url}: command exited with status {self.proc.returncode}")
        return data

    def close(self) -> None:
        """Stop the command if it is still writing (a reader that stopped early), then reap it."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.stdout.close()
        self.proc.wait()


def open_source(url: str) -> BinaryIO:
    """A binary stream of the shard at `url`: a local path, `pipe:CMD` (stdout of CMD) or an
    fsspec URL (file://, s3://, gs://, memory://...; the backend must be installed).
    A source that cannot be opened is a ShardReadError naming it."""
    try:
        if url.startswith("pipe:"):
            return _Pipe(url)
        if is_url(url):
            import fsspec

            return fsspec.open(url, "rb").open()
        return open(url, "rb")
    except ShardReadError:
        raise
    except (OSError, ValueError, ImportError) as e:
        raise ShardReadError(f"{url}: cannot read shard ({type(e).__name__}: {e})") from e


class HashingReader:
    """A read-only stream that hashes every byte read through it: a shard's identity is known
    after one pass, with no second read of (possibly remote or piped) bytes. With
    hashed=False it only counts them (sha256 costs ~1 ms a 1 MB; plain readers skip it)."""

    def __init__(self, stream: BinaryIO, hashed: bool = True):
        self.stream, self.hasher, self.size = stream, hashlib.sha256() if hashed else None, 0

    def read(self, n: int = -1) -> bytes:
        data = self.stream.read(n)
        if self.hasher is not None:
            self.hasher.update(data)
        self.size += len(data)
        return data

    def drain(self, url: str | None = None) -> str | None:
        """Read what is left; the sha256 of all (None when not hashed). With `url` (after a
        tar's end-of-archive block) what is left must be zeros, the record padding: data
        there (`cat a.tar b.tar`) would be samples silently dropped, so it is an error."""
        while data := self.read(1 << 20):
            if url is not None and data.count(0) != len(data):
                raise ShardReadError(f"{url}: data after the tar's end-of-archive block (concatenated tars?): "
                                     "those samples would be lost; repack it as one tar")
        return self.hasher.hexdigest() if self.hasher is not None else None

    def close(self) -> None:
        self.stream.close()


# --- the tar reader ---------------------------------------------------------------------

def _read_exact(stream, n: int, keep: bool = True) -> tuple[bytes, int]:
    """(bytes, count) of up to `n` bytes, fewer only at the end of the stream; with
    keep=False the bytes are counted and dropped (counting samples keeps no data)."""
    parts, got = [], 0
    while got < n:
        chunk = stream.read(min(n - got, 1 << 22))
        if not chunk:
            break
        got += len(chunk)
        if keep:
            parts.append(chunk)
    return b"".join(parts), got


def _octal(field_: bytes, url: str, offset: int) -> int:
    """A numeric header field: octal text, or GNU base-256 when the high bit is set."""
    if field_[:1] and field_[0] & 0x80:
        return int.from_bytes(bytes([field_[0] & 0x7F]) + field_[1:], "big")
    text = field_.split(b"\0", 1)[0].strip(b" \0")
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise ShardReadError(f"{url}: not a tar, or damaged: bad header at byte {offset}") from None


def _check_header(block: bytes, url: str, offset: int) -> None:
    """A header's checksum (unsigned, or signed as some old tars wrote it) must hold."""
    stored = _octal(block[148:156], url, offset)
    unsigned = sum(block[:148]) + 8 * 32 + sum(block[156:])
    if stored != unsigned and stored != unsigned - 2 * sum(b for b in block[:148] + block[156:] if b > 127):
        raise ShardReadError(f"{url}: not a tar, or damaged: bad header checksum at byte {offset}")


def _pax_records(data: bytes) -> dict[str, str]:
    """A pax extended header's `LEN key=value\\n` records."""
    out, pos = {}, 0
    while pos < len(data):
        space = data.find(b" ", pos)
        if space < 0:
            break
        length = int(data[pos:space] or b"0")
        if length <= 0:
            break
        key, _, value = data[space + 1:pos + length - 1].partition(b"=")
        out[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return out


def _header_name(block: bytes) -> str:
    name = block[:100].split(b"\0", 1)[0]
    if block[257:263] == b"ustar\0":  # POSIX ustar: a 155-byte prefix (GNU uses it otherwise)
        prefix = block[345:500].split(b"\0", 1)[0]
        name = prefix + b"/" + name if prefix else name
    return name.decode("utf-8", "surrogateescape")


Keep = bool | Callable[[str], bool]  # whether a member's data is kept: always, never, or by its name


def _members(stream, url: str, keep: Keep = True) -> Iterator[tuple[str, bytes]]:
    """(name, data) of each regular file in tar order (data b"" where `keep` says no). Ends
    only at the end-of-archive zero block: any earlier end is a ShardReadError naming the shard."""
    offset, count, long_name, pax = 0, 0, None, {}
    while True:
        block, got = _read_exact(stream, BLOCK)
        if got < BLOCK:
            where = "inside a header" if got else "without its end-of-archive block"
            raise ShardReadError(f"{url}: truncated tar: ends {where} at byte {offset + got}, after {count} "
                                 "members (an incomplete copy or download?)")
        if block == _ZERO_BLOCK:
            return
        _check_header(block, url, offset)
        size, kind = _octal(block[124:136], url, offset), block[156:157]
        if "size" in pax:
            size = int(pax["size"])
        name = pax.get("path") or long_name or _header_name(block)
        special = kind in (b"L", b"x")  # metadata of the next member: kept whatever `keep` says
        data, got = _read_exact(stream, size, special or (keep if isinstance(keep, bool) else keep(name)))
        padding = -size % BLOCK
        got += _read_exact(stream, padding, False)[1]
        if got < size + padding:
            raise ShardReadError(f"{url}: truncated tar: member {name!r} cut at byte {offset + BLOCK + got} "
                                 f"({min(got, size)} of {size} bytes)")
        offset += BLOCK + size + padding
        if kind == b"L":  # GNU long name of the next member
            long_name = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            continue
        if kind == b"x":  # pax extended header of the next member
            pax = _pax_records(data)
            continue
        long_name, pax = None, {}
        if kind in _REGULAR:
            count += 1
            yield name, data


def _split_name(name: str) -> tuple[str, str] | None:
    """webdataset's `base_plus_ext`: (path up to the first dot of the base name, rest)."""
    match = re.match(r"^((?:.*/|)[^.]+)[.]([^/]*)$", name)
    return (match.group(1), match.group(2)) if match else None


def _samples(members: Iterable[tuple[str, bytes]]) -> Iterator[TarSample]:
    """Group members into samples as webdataset does, except that an extension seen twice
    in a row of one key starts a new sample of that key instead of stopping the stream."""
    current: TarSample | None = None
    for name, data in members:
        if "/" not in name and name.startswith("__") and name.endswith("__") or _SKIP_META.match(name):
            continue
        split = _split_name(name)
        if split is None:
            continue
        key, ext = split[0], split[1].lower()
        if current is None or key != current.key or ext in current.members:
            if current is not None:
                yield current
            current = TarSample(key)
        current.members[ext] = data
    if current is not None:
        yield current


class ShardReader:
    """One pass over a shard: iterate its samples in tar order; when the iteration has ended
    normally, `size` is the shard's byte count and (with `hashed`) `sha256` their digest.

    Errors (cannot open, truncated, damaged, a `pipe:` command that failed) are
    ShardReadErrors whose message starts with the URL.
    """

    def __init__(self, url: str, hashed: bool = True, source: BinaryIO | None = None):
        """`source`: the shard's stream, opened already (a loader opens the next shard's
        while it reads one: `shared.prefetch`); by default `open_source(url)` when iterated."""
        self.url, self.hashed, self.source = url, hashed, source
        self.sha256: str | None = None
        self.size: int | None = None

    def __iter__(self) -> Iterator[TarSample]:
        return self._iter(keep=True)

    def _iter(self, keep: Keep) -> Iterator[TarSample]:
        stream = HashingReader(self.source if self.source is not None else open_source(self.url), self.hashed)
        try:
            yield from _samples(_members(stream, self.url, keep))
            self.sha256, self.size = stream.drain(self.url), stream.size
        except ShardReadError:
            raise
        except (OSError, ValueError) as e:  # the source's own error (network, fsspec...)
            raise ShardReadError(f"{self.url}: cannot read shard ({type(e).__name__}: {e})") from e
        finally:
            stream.close()


def iter_samples(url: str, exts: Iterable[str] | None = None) -> Iterator[TarSample]:
    """A shard's samples in tar order, streamed (a caller may stop early); not hashed. With
    `exts`, only members of those extensions (lower-case) hold their bytes and the others
    hold b"" (present, not read into memory): a pass over labels that leaves the images."""
    if exts is None:
        return iter(ShardReader(url, hashed=False))
    wanted = frozenset(exts)

    def keep(name: str) -> bool:
        split = _split_name(name)
        return split is not None and split[1].lower() in wanted

    return ShardReader(url, hashed=False)._iter(keep)


def first_copies(samples: Iterable[TarSample], on_repeat: Callable[[TarSample], None] | None = None
                 ) -> Iterator[TarSample]:
    """The first sample of each key; a later copy (adjacent or not) goes to `on_repeat`."""
    seen: set[str] = set()
    for s in samples:
        if s.key in seen:
            if on_repeat is not None:
                on_repeat(s)
            continue
        seen.add(s.key)
        yield s


def count_samples(url: str) -> int:
    """The number of distinct keys in a shard (what training reads of it), reading headers
    and dropping data; a truncated or unreadable shard raises as reading it would."""
    return len({s.key for s in ShardReader(url, hashed=False)._iter(keep=False)})


def read_shard_with_digest(url: str) -> tuple[list[RawSample], str]:
    """All samples of one shard in tar order (repeats included), and the sha256 of its bytes."""
    reader = ShardReader(url)
    samples = [RawSample(s.key, s.image, s.label, s.problem) for s in reader]
    return samples, reader.sha256


def read_shard(url: str) -> list[RawSample]:
    """All samples of one shard, in tar order (repeats included)."""
    return read_shard_with_digest(url)[0]


def source_digest(url: str) -> str:
    """sha256 of a shard's bytes, however it is reached (the tar is not parsed)."""
    stream = HashingReader(open_source(url))
    try:
        return stream.drain()
    except ShardReadError:
        raise
    except (OSError, ValueError) as e:
        raise ShardReadError(f"{url}: cannot read shard ({type(e).__name__}: {e})") from e
    finally:
        stream.close()

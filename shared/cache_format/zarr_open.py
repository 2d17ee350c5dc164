"""Opening a shard's Zarr group: what must be proven before zarr reads a byte of it.

`open_checked` reads the group's `zarr.json` and each array's through a `CheckedStore`
(regular files only; format 5: only files its entry lists, of their size and sha256),
compares them with the group's spec (`zarr_spec.group_spec`: exactly the arrays, dtypes,
shapes, chunks and codecs the writer writes for this manifest and entry, and the group's
attributes: source, samples, rows), then proves the chunks: format 5 by the list itself
(each array's chunk files listed, exactly as many as its shape needs: counted before any
key is made, so a shape of 10^12 rows costs nothing), format 4 with one `lstat` a chunk
file and directory (counted first too, from one directory listing an array). Only then is
the group handed to zarr, whose every later read goes through the same store.
"""

from __future__ import annotations

import itertools
import json
import os
import stat

from .checked_store import CheckedStore
from .common import CacheError
from .listing import NotRegularFile, kind_of
from .location import Location, check_inside, local_path
from .manifest import ShardEntry, check_row_count
from .zarr_spec import GroupSpec, check_array_meta


def group_listing(path: str) -> set[str]:
    """Every file under a group, relative to it ("/"-separated): os.scandir locally (twice as
    fast as fsspec's find), one fsspec listing at a URL. Locally a link out of the group is
    refused (`check_inside`), and so is a FIFO or device (never opened)."""
    local = local_path(path)  # (file:// URLs too: fsspec would follow a link without saying)
    if local is None:
        return {rel for rel, _ in Location(path).files("")}
    out, folders = set(), [""]
    while folders:
        folder = folders.pop()
        with os.scandir(os.path.join(local, folder)) as it:
            for e in it:
                rel = f"{folder}/{e.name}" if folder else e.name
                if e.is_symlink():
                    check_inside(local, e.path)
                mode = e.stat(follow_symlinks=False).st_mode
                if stat.S_ISDIR(mode):
                    folders.append(rel)
                elif stat.S_ISREG(mode) or stat.S_ISLNK(mode):
                    out.add(rel)
                else:
                    raise NotRegularFile(f"{e.path}: {kind_of(mode)}, not a regular file; never read")
    return out


def chunk_keys(shape: list[int], chunks: list[int]) -> list[str]:
    """Every chunk's store key relative to its array (`c/0/0`: encoding "default", "/")."""
    grid = itertools.product(*[range(-(-n // c)) for n, c in zip(shape, chunks)])
    return ["/".join(["c", *map(str, coords)]) for coords in grid]


def _chunk_count(shape: list[int], chunks: list[int]) -> int:
    n = 1
    for s, c in zip(shape, chunks):
        n *= -(-s // c)
    return n


def _array_names(store: CheckedStore) -> list[str]:
    """The arrays of the group: those whose zarr.json the entry lists (format 5), else the
    folders holding one (locally links out of the group refused), else a store listing."""
    if store.files is not None:
        return sorted({p.split("/")[0] for p in store.files.paths if p.count("/") == 1 and p.endswith("/zarr.json")})
    if store.local is not None:
        names = []
        with os.scandir(store.local) as it:
            for e in it:
                if e.is_symlink():
                    check_inside(store.local, e.path)
                if e.is_dir() and _is_file_inside(store.local, f"{e.name}/zarr.json"):
                    names.append(e.name)
        return sorted(names)
    return sorted(rel.split("/")[0] for rel in group_listing(store.path)
                  if rel.count("/") == 1 and rel.endswith("/zarr.json"))


def _is_file_inside(group: str, rel: str) -> bool:
    """Whether `rel` exists in the local group (lstat: a link out of it is refused)."""
    try:
        st = os.lstat(os.path.join(group, rel))
    except (FileNotFoundError, NotADirectoryError):
        return False
    if stat.S_ISLNK(st.st_mode):
        check_inside(group, os.path.join(group, rel))
    return True


def _load(store: CheckedStore, key: str):
    blob = store.read(key)
    if blob is None:
        raise store.fail(key, "missing")
    try:
        return blob, json.loads(blob)
    except (ValueError, RecursionError) as e:
        raise store.fail(key, f"not JSON ({type(e).__name__})") from None


def check_group_attributes(store: CheckedStore, spec: GroupSpec) -> None:
    """The group's zarr.json: a group whose attributes are its entry's samples and rows,
    `complete`, and a `source` (as given at extraction: not compared, a recorded source may
    be renamed in the entry); format 4 on exactly those, older caches those they have."""
    _, meta = _load(store, "zarr.json")
    attrs = meta.get("attributes") if isinstance(meta, dict) else None
    if not isinstance(meta, dict) or meta.get("node_type") != "group" or not isinstance(attrs, dict):
        raise store.fail("zarr.json", "not a Zarr group's metadata")
    want = {k: v for k, v in spec.attributes.items() if k != "source"}
    if spec.checked and (set(attrs) != set(spec.attributes) or not isinstance(attrs.get("source"), str)):
        odd = sorted(set(attrs) ^ set(spec.attributes)) or ["source"]
        raise store.fail("zarr.json", f"attribute {odd[0]}: not as this cache's writer writes a group's attributes")
    for k in sorted(set(want) & (set(want) if spec.checked else set(attrs))):
        if attrs.get(k) != want[k]:
            raise store.fail("zarr.json", f"attribute {k}: {str(attrs.get(k))[:80]!r}, its entry gives {want[k]!r}")


def read_array_metas(store: CheckedStore, names: list[str], spec: GroupSpec | None,
                     entry: ShardEntry | None = None) -> dict[str, dict]:
    """Each array's zarr.json, compared with its spec (when known) and kept as verified in
    `store`, with the array's length and stored chunk rows; CacheError naming the field
    (`keys` of another length than the entry's rows: named as such first)."""
    metas = {}
    for name in names:
        blob, meta = _load(store, f"{name}/zarr.json")
        if name == "keys" and isinstance(meta, dict) and isinstance(meta.get("shape"), list) and meta["shape"]:
            check_row_count(store.path, entry, meta["shape"][0])
        if spec is not None:
            want = spec.arrays.get(name)
            if want is None:
                raise store.fail(f"{name}/zarr.json", "an array this cache's writer never writes")
            store.lengths[name], store.specs[name] = check_array_meta(f"{store.path}/{name}", want, meta,
                                                                      spec.checked, spec.checked)
        elif store.checked and "crc32c" not in [c.get("name") for c in meta.get("codecs", [])]:
            raise CacheError(f"{store.path}: array {name} has no crc32c codec, as every array of a format 4 "
                             "cache has: damaged or rewritten; run `mrmae cache verify --repair`")
        store.verified[f"{name}/zarr.json"] = blob
        metas[name] = meta
    return metas


def _check_listed_chunks(store: CheckedStore, metas: dict[str, dict]) -> None:
    """Format 5: the entry lists exactly the group's zarr.json files and every chunk of
    every array (as many as its shape needs, counted before a key is made), nothing else."""
    listed: dict[str, list[str]] = {}
    for p in store.files.paths:
        head, _, rest = p.partition("/")
        if p == "zarr.json" or rest == "zarr.json":
            continue
        if head not in metas:
            raise store.fail(p, "listed, but of no array of the group")
        listed.setdefault(head, []).append(rest)
    for name, meta in metas.items():
        shape, chunks = meta["shape"], meta["chunk_grid"]["configuration"]["chunk_shape"]
        got, need = listed.get(name, []), _chunk_count(shape, chunks)
        if len(got) != need:
            raise CacheError(f"{store.path}: array {name}: {len(got)} chunk files listed, its shape "
                             f"{shape} needs {need}; run `mrmae cache verify --repair`")
        extra = sorted(set(got) - set(chunk_keys(shape, chunks)))
        if extra:
            raise store.fail(f"{name}/{extra[0]}", f"not a chunk of an array of shape {shape}")


def _check_present_chunks(store: CheckedStore, metas: dict[str, dict]) -> None:
    """Format 4: every chunk of every array present (a missing one would read as fill
    values), none linked out of the group: one listing at a URL; locally the chunk rows
    counted from one directory listing an array first, then one lstat a file and folder."""
    stored = group_listing(store.path) if store.local is None else None
    for name, meta in metas.items():
        shape, chunks = meta["shape"], meta["chunk_grid"]["configuration"]["chunk_shape"]
        need = _chunk_count(shape, chunks)
        if store.local is not None and need:  # (a shape of 10^12 rows: refused before its keys are made)
            row_chunks = -(-shape[0] // chunks[0])
            try:
                present = len(os.listdir(f"{store.local}/{name}/c"))
            except (FileNotFoundError, NotADirectoryError):
                present = 0
            if present < row_chunks:
                raise CacheError(f"{store.path}: array {name}: {need - present * (need // row_chunks):,} of {need:,} "
                                 "chunks missing; run `mrmae cache verify --repair`")
        keys = chunk_keys(shape, chunks)
        missing = (sum(f"{name}/{key}" not in stored for key in keys) if store.local is None
                   else _missing_local(store.local, name, keys))
        if missing:
            raise CacheError(f"{store.path}: array {name}: {missing} of {len(keys)} chunks missing; "
                             "run `mrmae cache verify --repair`")


def _missing_local(group: str, name: str, keys: list[str]) -> int:
    """Chunk files of array `name` absent from the local group, each chunk file and each of
    their directories lstat'ed once (a link out of the group is refused)."""
    base, lstat, is_link = f"{group}/{name}/", os.lstat, stat.S_ISLNK
    folders = set()
    for head in {key.rpartition("/")[0] for key in keys}:
        while head and head not in folders:  # (its directories: one of them may be a link)
            folders.add(head)
            head = head.rpartition("/")[0]
    missing = 0
    for rel in [*folders, *keys]:
        try:
            mode = lstat(base + rel).st_mode
        except (FileNotFoundError, NotADirectoryError):
            missing += rel not in folders  # (a missing folder: its chunks count)
            continue
        if is_link(mode):
            check_inside(group, base + rel)
        if rel not in folders and not stat.S_ISREG(mode) and not is_link(mode):
            raise NotRegularFile(f"{base + rel}: {kind_of(mode)}, not a regular file; never read")
    return missing


def open_checked(path: str, entry: ShardEntry | None, spec: GroupSpec | None, checked: bool) -> CheckedStore:
    """The store of `entry`'s group, its metadata proven (see the module doc); `spec` None:
    a writer reading back its own temporary (no entry yet): only checksummed and whole."""
    store = CheckedStore(path, entry.files if entry is not None else None, checked)
    store.bounded = spec is not None
    names = _array_names(store)
    store.prime(["zarr.json", *[f"{name}/zarr.json" for name in names]])  # (a store: in one round trip)
    if spec is not None:
        missing = sorted(set(spec.arrays) - set(names) - spec.optional)
        if missing:
            raise CacheError(f"{path}: array {missing[0]} missing; run `mrmae cache verify --repair`")
        check_group_attributes(store, spec)
    metas = read_array_metas(store, names, spec, entry)
    if store.files is not None:
        _check_listed_chunks(store, metas)
    elif checked:
        _check_present_chunks(store, metas)
    if entry is not None and "keys" in metas:
        check_row_count(path, entry, metas["keys"]["shape"][0])
    # what opening reads next (keys, views) and a reader's first use (geometry, image digests)
    store.prime([p for p in (store.files.paths if store.files is not None and spec is not None else [])
                 if p.split("/")[0] in FIRST_READ and not p.endswith("zarr.json")])
    return store


FIRST_READ = ("keys", "view", "crop", "flip", "attention", "image_sha256")  # whole arrays an opened group reads


def check_group_arrays(path: str, entry: ShardEntry, spec: GroupSpec, checked: bool, names: list[str]) -> dict:
    """What start-up proves of a group from a few zarr.json (`names`, one read each),
    without listing it or reading a row: each there, as its spec says (dtype, shape,
    chunks, codecs), `keys` of the entry's rows, nothing read through a link out of the
    group. Every chunk waits for the group's opening (`open_checked`). Returns the metas."""
    store = CheckedStore(path, entry.files, checked)
    try:
        if store.local is not None and store.files is None:
            for name in names:  # (the folder and the file: either may be a link)
                if not (_is_file_inside(store.local, name) and _is_file_inside(store.local, f"{name}/zarr.json")):
                    raise store.fail(f"{name}/zarr.json", "missing")
        metas = read_array_metas(store, names, spec, entry)
        check_row_count(path, entry, metas["keys"]["shape"][0])
        return metas
    except CacheError:
        raise
    except Exception as e:  # a missing group or array
        raise CacheError(f"{path}: unreadable shard group ({type(e).__name__}: {e})") from e


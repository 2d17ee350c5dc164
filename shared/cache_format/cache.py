"""A cache as a whole: which backend stores it, its writers, its readers, its integrity."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re

import numpy as np

from .backend import DEFAULT_BACKEND, Backend, GroupWriter, ShardReader, backend_of_group, get_backend
from .deep import shard_problem
from .common import CONTENT_DIGITS, CacheError, ViewTargets, warn_if_unchecked, warn_if_unlisted
from .location import (READ_THREADS, Location, check_inside, dir_bytes, drop_staging, group_digest, is_temp, is_url,
                       link_out_of, local_path, parallel_map, staging_dir)
from .manifest import (FILES_SUFFIX, Manifest, PcaInfo, ShardEntry, ShardIndex, check_group, entry_path, files_path,
                       forget_shard, read_manifest, record_shard, runs_command, with_files)
from .pca import PCA_FILE, PcaBasis, decode_basis, pca_storage, reconstruct


def codec_description(dtype: str, backend: str = DEFAULT_BACKEND) -> str:
    return get_backend(backend).codec(dtype)


def storage_section(backend: str, dtype: str, pixels: str | None = None, pca: tuple[int, int] | None = None,
                    int8_group: int | None = None) -> dict:
    """The manifest's `storage` for a new cache (what `config_mismatch` compares);
    `pixels`: the codec of stored views (`--store-pixels`), or None; `pca`: (rank K, fit
    views N) when features are stored as K PCA coefficients (`dtype` then applies to them);
    `int8_group`: channels per int8 scale, None for one per token."""
    group = int8_group if dtype == "int8" else None
    quantisation = None if dtype != "int8" else (
        f"absmax int8 per {group} channels of a token (one per token where {group} does not divide the width), "
        "value = int8 x scale" if group else "per-token absmax int8, value = int8 x scale")
    b = get_backend(backend)
    return {"backend": b.name, "dtype": dtype, "pixels": pixels, "quantisation": quantisation, "int8_group": group,
            "codec": b.codec(dtype), "pca": pca_storage(*pca) if pca else None, **b.storage(dtype)}


def open_shard_writer(backend: str, root: str | os.PathLike, source: str, max_rows: int, dim: int, grid_len: int,
                      dtype: str, layers: tuple[int, ...] = (), pixels: str | None = None,
                      feature_dim: int | None = None, int8_group: int | None = None) -> GroupWriter:
    """The writer of one input shard for `backend` (`backend.GroupWriter`): append / finish / publish /
    close / abort, `name`, `rows`, and once finished `digest`, `group_path` (the manifest
    entry's `group`, named after the bytes) and `final` (where the group is published).

    For a cache at a URL the writer works in a local staging directory; `commit_shard`
    uploads what it wrote. `pixels`: the file extension of stored views, when stored.
    `feature_dim`: the width of the stored `features` when it is not the teacher's `dim`
    (K PCA coefficients); cls and layer<i> stay `dim` wide. `int8_group`: channels per
    int8 scale (the manifest's `storage.int8_group`), None for one per token.
    """
    local_root = staging_dir() if is_url(root) else root
    writer = get_backend(backend).writer(local_root, source, max_rows, dim, grid_len, dtype, layers, pixels,
                                         feature_dim=feature_dim, int8_group=int8_group)
    if is_url(root):
        abort = writer.abort

        def abort_and_drop() -> None:
            abort()
            drop_staging(local_root)

        writer.abort = abort_and_drop
    return writer


def commit_shard(root: str | os.PathLike, writer: GroupWriter, entry: ShardEntry) -> bool:
    """Make a finished writer's shard part of the cache: its group first, then its entry.

    The group goes to its content-addressed name (a local rename, or an upload for a cache
    at a URL); when the same bytes are there already this writer yields. The entry, written
    last in one atomic replace, is the commit point: until it exists the shard is not in the
    cache, whatever a kill leaves behind. An entry already recording this very group is left
    as it is. Returns False when this writer yielded both. CACHE_FORMAT.md, "Concurrent writers".
    """
    if is_url(root):
        try:
            published = Location(root).publish(writer.tmp, writer.group_path, writer.digest[0])
        finally:
            drop_staging(writer.root)
    else:
        published = writer.publish()
    loc = Location(root)
    try:  # (read as plain JSON: whatever is there, only this source, group and sha256 make it a yield)
        recorded = json.loads(loc.read_bytes(entry_path(entry.group)))
    except (FileNotFoundError, ValueError, RecursionError):
        recorded = None
    mine = (entry.source, entry.group, entry.sha256)
    if isinstance(recorded, dict) and tuple(recorded.get(k) for k in ("source", "group", "sha256")) == mine:
        return published
    record_shard(root, entry)
    return True


def clean_cache(root: str | os.PathLike, older_than_hours: float = 24.0, dry_run: bool = False) -> list[str]:
    """Remove what no entry points to and no writer has touched for `older_than_hours`:
    temporaries of killed writers (`shards/.tmp-*`, `.<file>.<writer>.tmp`) and published
    groups no entry records (a shard redone with other bytes, a writer killed between its
    group and its entry), by their names alone: nothing else in `shards/` is touched (a user
    whose --out is the parent of the input tars keeps them). Also in the caches of added
    teachers (`targets/<name>/`).

    Writers never remove anything but their own temporary, since a temporary of another
    may belong to a live writer on another machine; this explicit command is how the rest
    goes. A live writer writes into its temporary at every batch, so an age of hours is
    safe; age 0 removes everything unreferenced (only when no writer runs). Returns the
    paths removed (with `dry_run`, that would be). Also writes what its backend keeps beside
    the shards where absent (`Backend.prepare`: the group metadata a Zarr cache from before
    `shards/zarr.json` lacks; not with `dry_run`).
    """
    removed = []
    for r in [str(root)] + [target_root(root, t) for t in list_targets(root)]:
        loc = Location(r)
        manifest = read_manifest(r)  # (also: refuse what is not a cache)
        if not dry_run:
            get_backend(manifest.backend).prepare(r, manifest)
        referenced = {s.group for s in manifest.shards} | {files_path(s.group) for s in manifest.shards}
        # only what a writer names: temporaries, groups named after their bytes and their file
        # lists; anything else in shards/ (the input tars, when --out was their parent) is the user's
        suffix = re.escape(get_backend(manifest.backend).suffix)
        published = re.compile(rf"[A-Za-z0-9._-]+\.[0-9a-f]{{{CONTENT_DIGITS}}}{suffix}({re.escape(FILES_SUFFIX)})?")
        candidates = [rel for rel in (f"shards/{n}" for n in loc.children("shards"))
                      if rel not in referenced and (is_temp(rel) or published.fullmatch(rel[len("shards/"):]))]
        candidates += [rel for d in ("", "pca") for rel in (f"{d}/{n}".lstrip("/") for n in loc.children(d))
                       if is_temp(rel)]
        for rel in candidates:
            age = loc.age_hours(rel)
            if (age is None and older_than_hours > 0) or (age is not None and age < older_than_hours):
                continue
            if not dry_run:
                loc.remove(rel)
            removed.append(loc.join(rel))
    return removed


def check_integrity(root: str | os.PathLike) -> list[str]:
    """Problems with the stored shards, without running any teacher: one line each.

    Compares every complete shard's stored bytes (a Zarr group's files, or a tar) with the
    sha256 recorded when it was written (bit rot, truncation, a replaced chunk) and
    notices missing ones.
    """
    loc = Location(root)
    problems = []
    manifest = read_manifest(root)
    pca = manifest.storage.pca
    if pca:  # the coefficients mean nothing without the basis they were projected on
        try:
            digest = hashlib.sha256(loc.read_bytes(PCA_FILE)).hexdigest()
        except FileNotFoundError:
            problems.append(f"{loc.join(PCA_FILE)}: PCA basis is missing")
        else:
            if pca.sha256 and digest != pca.sha256:
                problems.append(f"{loc.join(PCA_FILE)}: sha256 differs from the one the manifest records: "
                                "damaged or replaced")
    return problems + [line for _, line in damaged_shards(root, manifest)]


def damaged_shards(root: str | os.PathLike, manifest: Manifest | None = None) -> list[tuple[ShardEntry, str]]:
    """(entry, one line) of every complete shard that a reader would refuse (`deep.shard_problem`:
    metadata, counts, every file of its list) or whose stored bytes differ from the sha256
    recorded when it was written."""
    loc = Location(root)
    damaged = []
    manifest = manifest or read_manifest(root)
    for entry in manifest.shards:
        if not entry.complete:
            continue
        path = loc.join(entry.group)
        if not loc.exists(entry.group):
            damaged.append((entry, f"{path}: group of {entry.source} is missing"))
            continue
        if (real := link_out_of(loc.url, path)) is not None:  # never read: repair removes the link alone
            damaged.append((entry, f"{path}: a symbolic link out of the cache (to {real}), never followed"))
            continue
        problem = shard_problem(str(root), manifest, entry)  # (every file as a reader sees it; links out refused)
        if problem is not None:
            damaged.append((entry, problem))
            continue
        digest, size = group_digest(path)
        if entry.sha256 is not None and digest != entry.sha256:
            what = f"{size} bytes, recorded {entry.bytes}" if size != entry.bytes else "same size"
            damaged.append((entry, f"{path}: sha256 differs from the one recorded at write time ({what}): "
                                   f"damaged or changed"))
    return damaged


def mark_incomplete(root: str | os.PathLike, entry: ShardEntry) -> None:
    """Make a damaged shard incomplete, so the next `extract-features` redoes just it: its
    entry first (the shard then no longer counts), then its bytes (read_manifest proved the
    entry's group is the shard's own place, `shards/<name>` plus its backend's suffix)."""
    forget_shard(root, entry.group)
    check_group(entry.group, backend_of_group(entry.group).name, str(root))
    Location(root).remove(entry.group)
    Location(root).remove(files_path(entry.group))


def target_root(root: str | os.PathLike, name: str) -> str:
    """Where the targets of teacher `name`, added to the cache at `root`, live: a cache of
    its own (same layout, same views) at `root/targets/<name>`."""
    if not re.fullmatch(r"[A-Za-z0-9._-]+", name) or name in (".", ".."):
        raise CacheError(f"target name {name!r}: use letters, digits, '.', '_' and '-' only")
    return Location(root).join(f"targets/{name}")


def target_name(spec: str) -> str:
    """The default name of an added teacher's targets: its spec without the weights, e.g.
    `clip:ViT-B-16@/w/b16.safetensors` -> `clip-ViT-B-16`."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", spec.split("@")[0].replace(":", "-"))


def list_targets(root: str | os.PathLike) -> list[str]:
    """Names of the teachers added to a cache (the one that drew the views not included)."""
    return [p.split("/")[1] for p in Location(root).glob("targets/*/manifest.json")]


class FeatureCache:
    """A cache, local or at an fsspec URL: its manifest and its complete shards, in either backend."""

    def __init__(self, root: str | os.PathLike, target: str | None = None):
        """`target`: the targets of a teacher added with `extract-features --add-teacher`
        (None: those of the teacher that drew the views)."""
        if target is not None:
            if target not in list_targets(root):
                known = ", ".join(list_targets(root)) or "none"
                raise CacheError(f"{root}: no target {target!r} (added teachers: {known})")
            root = target_root(root, target)
        self.location = Location(root)
        self.root = str(self.location)
        self.manifest: Manifest = read_manifest(self.root)
        self.backend: Backend = get_backend(self.manifest.backend)
        # format 4: every chunk or member is checked as it is read; older: one warning
        self.checked = warn_if_unchecked(self.root, self.manifest.format_version)
        warn_if_unlisted(self.root, self.manifest.format_version)
        self._pca: PcaBasis | None = None
        self._index = ShardIndex(self.manifest.shards)

    @property
    def complete_shards(self) -> list[ShardEntry]:
        return [s for s in self.manifest.shards if s.complete]

    def entry(self, source: str) -> ShardEntry:
        """The complete shard of `source` (matched as `find_shard` matches), from the
        manifest alone: what counting an epoch or fingerprinting a run needs of each shard,
        without the round trips of opening its group (`shard`)."""
        entry = self._index.find(source)
        if entry is None or not entry.complete:
            raise CacheError(f"{self.root}: shard {source} is not in the cache (or not complete)")
        return entry

    def check_shards(self, sources: list[str]) -> list[ShardEntry]:
        """The entries of `sources`, each group proven there and of the manifest's rows from
        a few files of metadata, concurrently on a store, so that a run refuses a cache of
        other shapes or counts before it writes anything (`Backend.check`; zarr: `keys`,
        `features`, `attention` and `cls` there, checksummed, of the manifest's row shapes and
        the entry's row count, every chunk present and none linked out of the cache proven as
        the loader opens each group; wds: the tar exists, its index read at its first use).
        The first damaged shard, in `sources` order, raises."""
        entries = [self.entry(s) for s in sources]
        self._map(self._check_arrays, entries)
        return entries

    def _map(self, fn, entries: list[ShardEntry]) -> list:
        """fn over `entries`, overlapped where each call waits on a store's round trips."""
        return parallel_map(fn, entries, READ_THREADS if self.location.remote else 1)

    def _check_arrays(self, entry: ShardEntry) -> None:
        """One shard's `check_shards`."""
        check_group(entry.group, self.manifest.backend, self.root)
        path = self.location.join(entry.group)
        check_inside(self.root, path)
        self.backend.check(path, entry, self.manifest, self.checked)

    def _open(self, entry: ShardEntry) -> ShardReader:
        check_group(entry.group, self.manifest.backend, self.root)  # read_manifest checked it; never read outside
        check_inside(self.root, self.location.join(entry.group))  # (nor through a symbolic link)
        entry = with_files(self.root, entry, self.manifest.backend)  # (format 6: its list, read as it opens)
        return self.backend.open(self.location.join(entry.group), entry, self.manifest, self.checked)

    def row_shapes(self) -> dict[str, tuple[int, ...]]:
        """One row's shape of the arrays every shard stores (`Manifest.row_shapes`)."""
        return self.manifest.row_shapes()

    def shard(self, source: str) -> ShardReader:
        """The reader of `source`'s group, opened (Zarr: its metadata read and checked, its
        keys read)."""
        return self._open(self.entry(source))

    def recorded_source(self, entry: ShardEntry) -> str:
        """`entry.source`, to be opened again (`cache verify`, `--add-teacher`). Refused, in
        one line asking for --shards, when opening it would run a program (`runs_command`):
        mrmae runs a command only when the user gives it on the command line."""
        shown = entry.source if len(entry.source) <= 60 else entry.source[:57] + "..."
        if runs_command(entry.source):
            raise CacheError(f"{self.location.join(entry_path(entry.group))}: the recorded source {shown!r} is a "
                             "command, which mrmae runs only when given on the command line: give the shards "
                             "with --shards")
        path = local_path(entry.source)  # a device or a FIFO (/dev/zero) would be read, and hashed, forever
        if path is not None and os.path.exists(path) and not os.path.isfile(path):
            raise CacheError(f"{self.location.join(entry_path(entry.group))}: the recorded source {shown!r} is not "
                             "a regular file: give the shards with --shards")
        return entry.source

    def get(self, source: str, key: str, view: int) -> ViewTargets:
        """One view's targets with features [L, C] float32 (a PCA cache's reconstructed)."""
        t = self.shard(source).get(key, view)
        return dataclasses.replace(t, features=self.reconstruct(t.features))

    @property
    def pca_config(self) -> PcaInfo | None:
        """The manifest's `storage.pca` (rank, fit_views, explained_variance, ...), or None."""
        return self.manifest.storage.pca

    def pca_basis(self) -> PcaBasis | None:
        """The cache's fitted basis (read once, checked against the manifest), or None
        when features are stored whole."""
        cfg = self.pca_config
        if cfg is None:
            return None
        if self._pca is None:
            where = self.location.join(PCA_FILE)
            try:
                data = self.location.read_bytes(PCA_FILE)
            except FileNotFoundError:
                raise CacheError(f"{where}: PCA basis is missing (the manifest says rank {cfg.rank})") from None
            if cfg.sha256 and hashlib.sha256(data).hexdigest() != cfg.sha256:
                raise CacheError(f"{where}: sha256 differs from the one the manifest records; run `mrmae cache verify`")
            b = decode_basis(data, where)
            if (b.rank, b.dim) != (cfg.rank, self.manifest.teacher.dim):
                raise CacheError(f"{where}: basis [{b.rank}, {b.dim}] does not fit the manifest's rank {cfg.rank} "
                                 f"and teacher width {self.manifest.teacher.dim}")
            self._pca = b
        return self._pca

    def pca(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(mean [C] float32, basis [K, C] float32) of a PCA cache, or None: stored
        coefficients c [..., K] stand for the features c @ basis + mean [..., C]."""
        b = self.pca_basis()
        return None if b is None else (b.mean, b.basis)

    def reconstruct(self, stored: np.ndarray) -> np.ndarray:
        """Stored (dequantised) features [..., K or C] -> teacher features [..., C] float32:
        a PCA cache's coefficients reconstructed, anything else as it is."""
        b = self.pca_basis()
        return stored if b is None else reconstruct(stored, b)

    def stored_bytes(self) -> int:
        """Bytes on disk of the complete shards (temporaries and lock files not counted)."""
        return sum(s.bytes or dir_bytes(self.location.join(s.group)) for s in self.complete_shards)

    def logical_bytes(self) -> int:
        """Bytes of all complete shards' arrays before compression, from the manifest and the
        entries alone (`Backend.logical_bytes`: the writer's shapes and dtypes for each entry's
        rows, which every group's metadata must be as it opens), so `cache info` reads no group
        (10,240 shards: no request beyond the entries)."""
        return self.backend.logical_bytes(self.manifest, self.complete_shards)

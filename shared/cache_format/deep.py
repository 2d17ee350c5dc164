"""`mrmae cache verify`'s look at one stored shard, file by file, as a reader would see it.

A reader stops at the first file it refuses; verify looks at all of them before any is
trained on: the shard opened as the loader opens it (metadata as its spec says, counts
tied to the manifest and entry, the entry's list of files complete), every listed file
read through the same checks (a regular file, its size and sha256, its frames' declared
sizes), and (format 5) no file in the group that its entry does not list. The first
problem is the shard's one line.
"""

from __future__ import annotations

from .common import CHECKED_VERSION, CacheError, local_files
from .location import Location, local_path
from .manifest import Manifest, ShardEntry, with_files
from .wds_store import WdsShard, member_spec
from .zarr_open import chunk_keys
from .zarr_spec import group_spec
from .zarr_store import ShardGroup


def open_reader(root: str, manifest: Manifest, entry: ShardEntry) -> ShardGroup | WdsShard:
    """The shard's reader as `FeatureCache` opens it, from a manifest already read."""
    entry = with_files(root, entry, manifest.backend)
    path, checked = Location(root).join(entry.group), manifest.format_version >= CHECKED_VERSION
    if manifest.backend == "zarr":
        return ShardGroup(path, entry, checked=checked, spec=group_spec(manifest, entry))
    return WdsShard(path, entry, checked=checked, spec=member_spec(manifest))


def shard_problem(root: str, manifest: Manifest, entry: ShardEntry) -> str | None:
    """The first thing a reader would refuse in `entry`'s stored shard, in one line; None
    when every file passes (the group's sha256 is compared apart)."""
    try:
        reader = open_reader(root, manifest, entry)
        if isinstance(reader, ShardGroup):
            _check_zarr_files(reader)
        else:
            _check_wds_members(reader)
    except CacheError as e:
        return str(e)
    return None


def _check_zarr_files(group: ShardGroup) -> None:
    """Every file of the group through its store's checks: the listed ones (format 5; and
    nothing unlisted there), or each array's chunks as its metadata gives them."""
    store = group.store
    local = local_path(group.path)
    if store.files is not None:
        if local is not None:
            extra = sorted({rel for rel, _ in local_files(local)} - set(store.files.paths))
            if extra:
                raise CacheError(f"{group.path}: file {extra[0]}: in the group, not in its entry's file list "
                                 f"({len(extra)} such); run `mrmae cache verify --repair`")
        keys = store.files.paths
    else:
        keys = ["zarr.json"] + [f"{name}/{k}" for name, spec in store.specs.items()
                                for k in chunk_keys([store.lengths[name], *spec.chunks[1:]], list(spec.chunks))]
    for key in keys:
        store.read(key)


def _check_wds_members(shard: WdsShard) -> None:
    """Every member of every row: its listed sha256 (format 5) or checksum, and each `.npy`
    member decoded as the loader decodes it (its zstd frame's declared size first, then its
    content checksum and its exact `.npy` header)."""
    from ..frames import FrameError

    shard._load()
    for member, index in shard._index.items():
        npy = shard._spec.members.get(member) if shard._spec is not None else None
        for row, (offset, size, compressed) in enumerate(index.tolist()):
            data = shard._pread(offset, size)
            try:
                if member == "pixels":
                    shard.stored_pixels(row)
                elif member != "meta" and (shard.checked or offset in shard._digests):
                    shard._verify(data, compressed, row, member, offset)
                if npy is not None:
                    npy.decode(data, compressed)
            except (ValueError, FrameError) as e:
                if isinstance(e, CacheError):
                    raise
                raise CacheError(f"{shard.path}: member {shard._names[row]}.{member}, row {row}: {e}; "
                                 "run `mrmae cache verify --repair`") from None

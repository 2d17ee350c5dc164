"""`mrmae cache verify`'s look at one stored shard, file by file, as a reader would see it.

A reader stops at the first file it refuses; verify looks at all of them before any is
trained on: the shard opened as the loader opens it (metadata as its spec says, counts
tied to the manifest and entry, the entry's list of files complete), every listed file
read through the same checks (its backend's `verify`: a regular file, its size and sha256,
its frames' declared sizes), and (format 5) no file in the group that its entry does not
list. The first problem is the shard's one line.
"""

from __future__ import annotations

from .backend import ShardReader, get_backend
from .common import CHECKED_VERSION, CacheError
from .location import Location
from .manifest import Manifest, ShardEntry, with_files


def open_reader(root: str, manifest: Manifest, entry: ShardEntry) -> ShardReader:
    """The shard's reader as `FeatureCache` opens it, from a manifest already read."""
    entry = with_files(root, entry, manifest.backend)
    path, checked = Location(root).join(entry.group), manifest.format_version >= CHECKED_VERSION
    return get_backend(manifest.backend).open(path, entry, manifest, checked)


def shard_problem(root: str, manifest: Manifest, entry: ShardEntry) -> str | None:
    """The first thing a reader would refuse in `entry`'s stored shard, in one line; None
    when every file passes (the group's sha256 is compared apart)."""
    try:
        get_backend(manifest.backend).verify(open_reader(root, manifest, entry))
    except CacheError as e:
        return str(e)
    return None

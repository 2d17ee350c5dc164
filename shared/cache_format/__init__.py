"""Cache format 6: the one package that reads and writes a teacher-feature cache.

A cache is a directory, local or at an fsspec URL, with `manifest.json` (what made the
cache), one stored shard per input shard and, beside each complete one, its entry
`shards/<name>.json`. The backend is named by the manifest's `storage.backend`, a class
registered in `backend` (CACHE_FORMAT.md says the same for people); built in:

- `zarr` (default, `zarr_store`): a Zarr v3 store, one group `shards/<name>.<sha>/` per
  shard (named after its bytes), one array per column;
- `wds` (`wds_store`): one tar `shards/<name>.<sha>.tar` per shard, one tar sample per view;

and any a plug-in registers under the `mrmae.backends` entry point.

Rows follow the source tar's sample order, views 0..K-1 per sample. A shard's writer
works under a temporary name of its own, checks its rows, and publishes the group under
its content-addressed name (renamed locally, uploaded to a URL; a writer that finds the
same bytes there yields); its entry is written last, so a killed writer never leaves a
shard that looks finished, and concurrent writers need no lock.
`FeatureCache(root).shard(url)` reads any backend through one interface (`backend.ShardReader`), checking every
chunk or member as it is read (format 4: crc32c codec on every Zarr array, every chunk
present; zstd frame checksums and sealed meta.json in a wds tar); a format 2 or 3 cache
reads unchecked, with one warning per process.

With `extract-features --pca K` the stored `features` are K coefficients on a basis
fitted before the first shard and kept in `pca/basis.npz` (`pca`); `FeatureCache.pca()`
returns it, and the features are `coefficients @ basis + mean`.
"""

from .backend import (DEFAULT_BACKEND, Backend, GroupWriter, ShardReader, backend_names, backends, get_backend,
                      register_backend)
from .cache import (FeatureCache, check_integrity, codec_description, commit_shard, clean_cache,
                    damaged_shards, list_targets, mark_incomplete, open_shard_writer, storage_section, target_name, target_root)
from .common import (FORMAT_VERSION, ROWS_PER_CHUNK, CacheError, UncheckedCacheWarning, UnlistedCacheWarning, ViewTargets, dequantize,
                     quantize_int8, quantize_int8_torch, INT8_GROUP, int8_groups)
from .common import check_image, image_sha256
from .manifest import (MANIFEST, FileListRef, Manifest, PcaInfo, ShardEntry, Skipped, StorageInfo, TeacherInfo, backend_of,
                       check_group, config_mismatch, entry_path, files_path, find_shard, group_name, forget_shard,
                       init_cache, new_manifest, read_manifest, record_shard, runs_command, shard_basename, shard_entry,
                       with_files)
from .pca import (PCA_FILE, PcaBasis, basis_from_covariance, decode_basis, encode_basis, project, read_basis_file,
                  reconstruct, store_basis, wait_for_basis)
from .wds_store import WdsShard, WdsShardWriter, sample_name, tar_files
from .location import Location, dir_bytes, group_digest, group_files, is_url, writing
from .zarr_store import ShardGroup, ShardWriter, compressor_for

__all__ = [
    "check_image", "image_sha256",
    "DEFAULT_BACKEND", "Backend", "GroupWriter", "ShardReader", "backend_names", "backends", "get_backend",
    "register_backend", "clean_cache", "writing", "FORMAT_VERSION", "MANIFEST", "ROWS_PER_CHUNK", "CacheError", "FeatureCache", "Location", "ShardGroup",
    "ShardWriter", "UncheckedCacheWarning", "UnlistedCacheWarning", "ViewTargets", "WdsShard", "WdsShardWriter", "backend_of", "check_integrity",
    "codec_description", "commit_shard", "damaged_shards", "mark_incomplete", "compressor_for", "config_mismatch", "dequantize", "dir_bytes", "find_shard",
    "group_digest", "group_files", "group_name", "is_url", "list_targets", "forget_shard", "init_cache", "new_manifest", "open_shard_writer",
    "quantize_int8", "quantize_int8_torch", "INT8_GROUP", "int8_groups", "read_manifest", "record_shard",
    "sample_name", "shard_basename", "shard_entry", "tar_files",
    # the schema: manifest.json and shards/<name>.json as checked dataclasses
    "Manifest", "PcaInfo", "ShardEntry", "Skipped", "StorageInfo", "TeacherInfo", "check_group", "entry_path",
    "runs_command", "FileListRef", "files_path", "with_files",
    "storage_section", "target_name", "target_root",
    # low-rank (PCA) targets
    "PCA_FILE", "PcaBasis", "basis_from_covariance", "decode_basis", "encode_basis", "project", "read_basis_file",
    "reconstruct", "store_basis", "wait_for_basis",
]

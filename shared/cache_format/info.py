"""`mrmae cache info`: what a cache holds, from its manifest and entries alone.

Reading it needs neither torch nor a teacher, so the command answers at the speed of its
file reads (a remote cache: its listing and the JSON files)."""

from __future__ import annotations

from .cache import FeatureCache, list_targets


def cache_info(root: str) -> dict:
    """The rows `mrmae cache info` prints: teacher, views, dtype and checksums, shards complete
    of recorded, samples, views and bytes stored, compression, PCA and added teachers."""
    cache = FeatureCache(root)
    m = cache.manifest
    done = cache.complete_shards
    views = sum(s.num_views for s in done)
    stored, logical = cache.stored_bytes(), cache.logical_bytes()
    pca = cache.pca_config
    return {
        "cache": str(root), "teacher": m.teacher.spec, "weights_sha256": m.teacher.weights_sha256[:16],
        "input_size": m.teacher.input_size, "grid": list(m.teacher.grid), "dim": m.teacher.dim,
        "views_per_image": m.views.per_image, "seed": m.views.seed,
        "dtype": m.storage.dtype, "codec": m.storage.codec, "format_version": m.format_version,
        "checksums": ("none: chunks are not checked as they are read (format 2 and 3)" if not cache.checked
                      else cache.backend.checksums),
        "pca": (f"rank {pca.rank} of {m.teacher.dim}, explained variance {pca.explained_variance} "
                f"(fitted on {pca.fitted_views} views)") if pca else "none",
        "shards_complete": len(done), "shards_total": len(m.shards),
        "samples": sum(s.num_samples for s in done), "samples_skipped": sum(len(s.skipped) for s in done),
        "views": views, "bytes": stored, "bytes_per_view": round(stored / views) if views else 0,
        "compression_ratio": round(logical / stored, 3) if stored else 0.0,
        "added_teachers": ", ".join(f"{t} ({FeatureCache(root, t).manifest.teacher.spec})"
                                    for t in list_targets(root)) or "none",
    }

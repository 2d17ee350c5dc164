"""Codec choices for the cached features, measured on arrays as the cache stores them.

Data: a random-weight teacher (default clip:ViT-S-16; no model hub here, so these
activations are a stand-in for a trained teacher's) run on demo views rendered by the
extraction mapper (default 64 views), features [N, 196, C] float32, then stored as
- int8: `mrmae.shared.cache_format.quantize_int8` values (+ float16 scales [N, 196, C / 64],
  one per --int8-group channels as new caches store them; "int8_per_token": one per token),
- float16: a plain cast.

Measured, for int8 and float16 values, compressing each chunk of 16 rows (the cache's
ROWS_PER_CHUNK) on its own as zarr does:
- numcodecs: Zstd levels 1/3/9; Blosc zstd clevel 3 with noshuffle / byte shuffle /
  bitshuffle; Blosc lz4 (clevel 5) byte shuffle; and, as a diagnostic, Blosc zstd byte
  shuffle with 1 MiB blocks instead of Blosc's automatic block size. Ratio = raw bytes / compressed bytes;
  compress and decompress MB/s = raw MB (1e6 bytes) / seconds, median of --reps, one thread
  (blosc set to 1 thread);
- real zarr v3 arrays on disk (chunks of 16 rows) with zarr.codecs.ZstdCodec(level=3) and
  BloscCodec(cname="zstd", clevel=3, shuffle="shuffle"): bytes on disk (all files);
- bytes per view: int8 (values + scale, codecs as the cache writes them) vs float16;
- the order-0 entropy bound: Shannon entropy of the stored bytes (int8 values; float16's
  low and high byte planes apart, as byte shuffle separates them), so 8 / H is the best
  ratio any coder that models bytes one at a time can reach, and the int8 / float16 bytes
  per view that bound allows (int8 scales counted raw);
- quantisation error per token: relative L2 ||deq - x|| / ||x|| (max, mean), worst cosine;
- low-rank (PCA) targets (`extract-features --pca K`), for each K of --pca-ranks: a basis
  fitted as extraction fits it (`cf.basis_from_covariance`, float64) on the tokens of the
  first --pca-fit-views views (default half of them), coefficients stored int8 or float16
  exactly as the cache stores features; bytes per view (coefficients + scale, cache codecs)
  against whole int8 features, and the error of the reconstruction
  (coefficients @ basis + mean) against the float32 features, on the held-out views (the
  ones the fit did not see, as nearly all of a real cache's views are) and on the fitted
  ones; the basis itself (K x C float32) is stored once per cache, not per view.

Run (about a minute on 2 cores):

    .venv/bin/python benchmarks/codecs.py [--teacher clip:ViT-B-16] [--images 32 --views 2]

Writes benchmarks/results/codecs.json (or --name, or --out PATH).
"""

from __future__ import annotations

import tempfile
import time
import warnings
from pathlib import Path

import numcodecs
import numcodecs.blosc
import numpy as np
import torch
import zarr
from numcodecs import Blosc, Zstd
from zarr.codecs import BloscCodec, ZstdCodec

from _common import (RANDOM_WEIGHTS_NOTE, ForeignCpu, codec_parser, median_seconds, machine_facts, make_shards, render_views, table, warn_if_busy,
                     write_json)
from mrmae.shared import cache_format as cf
from mrmae.shared.teachers.base import build_teacher
from mrmae.shared.views import ViewConfig, normalize

ROWS = cf.ROWS_PER_CHUNK

NUMCODECS: dict[str, numcodecs.abc.Codec] = {
    "zstd-1": Zstd(level=1),
    "zstd-3": Zstd(level=3),
    "zstd-9": Zstd(level=9),
    "blosc-zstd3-noshuffle": Blosc(cname="zstd", clevel=3, shuffle=Blosc.NOSHUFFLE),
    "blosc-zstd3-shuffle": Blosc(cname="zstd", clevel=3, shuffle=Blosc.SHUFFLE),
    "blosc-zstd3-bitshuffle": Blosc(cname="zstd", clevel=3, shuffle=Blosc.BITSHUFFLE),
    "blosc-lz4-5-shuffle": Blosc(cname="lz4", clevel=5, shuffle=Blosc.SHUFFLE),
    # Blosc's automatic block (128 KiB here) fits in one zstd block (max 128 KiB), so zstd codes the
    # shuffled byte planes with one Huffman table and shuffle gains nothing; 1 MiB blocks separate them.
    "blosc-zstd3-shuffle-1MiB": Blosc(cname="zstd", clevel=3, shuffle=Blosc.SHUFFLE, blocksize=1 << 20),
}

ZARR_CODECS = {
    "zarr-zstd3": lambda: ZstdCodec(level=3),
    "zarr-blosc-zstd3-shuffle": lambda: BloscCodec(cname="zstd", clevel=3, shuffle="shuffle"),
}


def teacher_features(spec: str, images: int, views: int) -> np.ndarray:
    """Features [N, 196, C] float32 of a random-weight teacher on rendered demo views."""
    with tempfile.TemporaryDirectory(prefix="mrmae-codecs-") as tmp:
        teacher = build_teacher(spec)
        pixels = render_views(make_shards(tmp, images, images), ViewConfig(per_image=views), teacher.input_size)
    x = normalize(pixels, teacher.mean, teacher.std)
    return torch.cat([teacher(b).features for b in x.split(32)]).numpy()


def bench_codec(codec: numcodecs.abc.Codec, values: np.ndarray, reps: int) -> dict:
    chunks = [np.ascontiguousarray(values[i:i + ROWS]) for i in range(0, len(values), ROWS)]
    encoded = [codec.encode(c) for c in chunks]
    for c, e in zip(chunks, encoded):  # round trip is exact
        assert np.array_equal(np.frombuffer(codec.decode(e), dtype=c.dtype).reshape(c.shape), c)
    raw = values.nbytes
    comp_s = median_seconds(lambda: [codec.encode(c) for c in chunks], reps)
    decomp_s = median_seconds(lambda: [codec.decode(e) for e in encoded], reps)
    stored = sum(len(e) for e in encoded)
    return {"raw_bytes": raw, "compressed_bytes": stored, "ratio": raw / stored,
            "compress_MBps": raw / 1e6 / comp_s, "decompress_MBps": raw / 1e6 / decomp_s}


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def zarr_array_bytes(path: Path, values: np.ndarray, compressors: list, chunk_rows: int) -> dict:
    """Write `values` as a zarr v3 array; bytes on disk and write/read MB/s (one pass)."""
    t0 = time.perf_counter()
    arr = zarr.create_array(store=str(path), shape=values.shape, dtype=values.dtype,
                            chunks=(chunk_rows,) + values.shape[1:], compressors=compressors, fill_value=0)
    arr[:] = values
    write_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    back = zarr.open_array(str(path), mode="r")[:]
    read_s = time.perf_counter() - t0
    assert np.array_equal(back, values)
    disk = dir_bytes(path)
    return {"raw_bytes": values.nbytes, "disk_bytes": disk, "ratio": values.nbytes / disk,
            "write_MBps": values.nbytes / 1e6 / write_s, "read_MBps": values.nbytes / 1e6 / read_s}


def token_error(x: np.ndarray, y: np.ndarray) -> dict:
    """Per-token relative L2 error and cosine between reference x and stored y, [N, L, C]."""
    nx, ny = np.linalg.norm(x, axis=-1), np.linalg.norm(y, axis=-1)
    rel = np.linalg.norm(y - x, axis=-1) / np.maximum(nx, 1e-12)
    cos = (x * y).sum(-1) / np.maximum(nx * ny, 1e-12)
    return {"rel_l2_max": float(rel.max()), "rel_l2_mean": float(rel.mean()), "cos_min": float(cos.min()),
            "cos_mean": float(cos.mean())}


def byte_entropy(values: np.ndarray) -> float:
    """Order-0 Shannon entropy, bits per byte, of an array's bytes."""
    counts = np.bincount(np.ascontiguousarray(values).view(np.uint8).ravel(), minlength=256)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum())


def entropy_bound(q: np.ndarray, scale: np.ndarray, f16: np.ndarray) -> dict:
    """Best bytes an order-0 coder can reach: int8 values + raw scales against float16."""
    planes = f16.view(np.uint8).reshape(-1, 2)  # little-endian: [low byte, high byte (sign, exponent)]
    h_int8, h_lo, h_hi = byte_entropy(q), byte_entropy(planes[:, 0]), byte_entropy(planes[:, 1])
    int8_bytes = q.size * h_int8 / 8 + scale.nbytes
    f16_bytes = f16.size * (h_lo + h_hi) / 8
    return {"int8_bits_per_byte": h_int8, "float16_low_bits": h_lo, "float16_high_bits": h_hi,
            "int8_best_ratio": 8 / h_int8, "float16_best_ratio": 16 / (h_lo + h_hi),
            "int8_over_float16": int8_bytes / f16_bytes}


def pca_rows(x: np.ndarray, ranks: list[int], fit_views: int, tmp: Path, group: int | None = None) -> list[dict]:
    """Bytes per view and reconstruction error of PCA coefficients, x [N, L, C] float32.

    The basis is fitted on x[:fit_views] (its tokens' mean and float64 covariance), the
    error measured on x[fit_views:] (held out) and x[:fit_views] (fitted).
    """
    n, L, C = x.shape
    fit = x[:fit_views].reshape(-1, C).astype(np.float64)
    mean, cov = fit.mean(axis=0), np.cov(fit, rowvar=False, bias=True)  # bias: population, as extraction
    out = []
    for k in ranks:
        if not 1 <= k <= C:
            continue
        b = cf.basis_from_covariance(mean, cov, k, fit_views, fit_views)
        coeffs = cf.project(x, b)  # [N, L, K]
        for dtype in ("int8", "float16"):
            if dtype == "int8":
                q, scale = cf.quantize_int8(coeffs, group)  # as the cache stores coefficients
                stored, deq = q, cf.dequantize(q, scale)
            else:
                stored, scale = coeffs.astype(np.float16), None
                deq = stored.astype(np.float32)
            disk = zarr_array_bytes(tmp / f"pca{k}-{dtype}", stored, cf.compressor_for(dtype), ROWS)["disk_bytes"]
            if scale is not None:
                disk += zarr_array_bytes(tmp / f"pca{k}-scale", scale, [ZstdCodec(level=3)], ROWS * 16)["disk_bytes"]
            recon = cf.reconstruct(deq, b)
            row = {"rank": k, "dtype": dtype, "explained_variance_fit": b.explained_variance,
                   "raw_bytes_per_view": (stored.nbytes + (scale.nbytes if scale is not None else 0)) / n,
                   "disk_bytes_per_view": disk / n, "basis_bytes": b.basis.nbytes + b.mean.nbytes,
                   "error_held_out": token_error(x[fit_views:], recon[fit_views:]) if fit_views < n else None,
                   "error_fitted": token_error(x[:fit_views], recon[:fit_views]),
                   # the rank's own loss, before any storage rounding
                   "projection_error_held_out": (token_error(x[fit_views:], cf.reconstruct(coeffs[fit_views:], b))
                                                 if fit_views < n else None)}
            out.append(row)
    return out


def main() -> None:
    parser = codec_parser(__doc__, "codecs")
    parser.add_argument("--int8-group", type=int, default=cf.INT8_GROUP,
                        help="channels per int8 scale, as extract-features --int8-group (0: per token)")
    parser.add_argument("--pca-ranks", default="64,128", help="PCA ranks K to measure (comma-separated; '' for none)")
    parser.add_argument("--pca-fit-views", type=int, default=None, help="views the basis is fitted on "
                        "(default: the first half); the rest are held out")
    parser.add_argument("--out", default=None, help="write the JSON here instead of results/<name>.json")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message=".*HAS RANDOM WEIGHTS.*")
    numcodecs.blosc.set_nthreads(1)
    warn_if_busy()
    facts = machine_facts()
    other = ForeignCpu()
    t_start = time.perf_counter()

    x = teacher_features(args.teacher, args.images, args.views)
    n, L, C = x.shape
    q, scale = cf.quantize_int8(x, args.int8_group or None)
    q_token, scale_token = cf.quantize_int8(x)
    stored = {"int8": q, "float16": x.astype(np.float16)}

    codec_rows = []
    for dtype, values in stored.items():
        for name, codec in NUMCODECS.items():
            codec_rows.append({"dtype": dtype, "codec": name, **bench_codec(codec, values, args.reps)})

    zarr_rows, per_view = [], {}
    with tempfile.TemporaryDirectory(prefix="mrmae-zarr-") as tmp:
        tmp = Path(tmp)
        for dtype, values in stored.items():
            for name, make in ZARR_CODECS.items():
                zarr_rows.append({"dtype": dtype, "codec": name,
                                  **zarr_array_bytes(tmp / f"{dtype}-{name}", values, [make()], ROWS)})
            # as the cache writes them: cf.compressor_for(dtype); scale zstd-3 in chunks of 256 rows
            feats = zarr_array_bytes(tmp / f"{dtype}-cache", values, cf.compressor_for(dtype), ROWS)
            total = feats["disk_bytes"]
            if dtype == "int8":
                total += zarr_array_bytes(tmp / "scale", scale, [ZstdCodec(level=3)], ROWS * 16)["disk_bytes"]
            raw = values.nbytes + (scale.nbytes if dtype == "int8" else 0)
            per_view[dtype] = {"codec": cf.codec_description(dtype), "raw_bytes_per_view": raw / n,
                               "disk_bytes_per_view": total / n}
        token_scale_disk = zarr_array_bytes(tmp / "scale-token", scale_token, [ZstdCodec(level=3)], ROWS * 16)
        per_view["int8_per_token"] = {  # the same int8 codec; only the scales differ in size
            "codec": cf.codec_description("int8"), "raw_bytes_per_view": (q_token.nbytes + scale_token.nbytes) / n,
            "disk_bytes_per_view": (zarr_array_bytes(tmp / "int8-token", q_token, cf.compressor_for("int8"), ROWS)
                                    ["disk_bytes"] + token_scale_disk["disk_bytes"]) / n}

        ranks = [int(r) for r in args.pca_ranks.split(",") if r.strip()]
        fit_views = min(n, args.pca_fit_views or max(1, n // 2))
        pca = pca_rows(x, ranks, fit_views, tmp, args.int8_group or None)

    bound = entropy_bound(q, scale, stored["float16"])
    errors = {"int8": token_error(x, cf.dequantize(q, scale)),
              "int8_per_token": token_error(x, cf.dequantize(q_token, scale_token)),
              "float16": token_error(x, stored["float16"].astype(np.float32))}
    total_s = time.perf_counter() - t_start
    foreign_s = other.seconds()

    payload = {"benchmark": "codecs", "note": RANDOM_WEIGHTS_NOTE, "machine": facts,
               "params": {**vars(args), "shape": [n, L, C], "chunk_rows": ROWS, "blosc_threads": 1},
               "numcodecs": codec_rows, "zarr": zarr_rows, "bytes_per_view": per_view, "entropy_bound": bound, "error": errors,
               "pca": {"fit_views": fit_views, "held_out_views": n - fit_views, "rows": pca},
               "foreign_cpu_seconds": foreign_s, "total_seconds": total_s}
    path = write_json(args.name, payload, args.out)

    print(f"\n{args.teacher}: features [{n}, {L}, {C}], chunks of {ROWS} rows compressed one by one; "
          f"median of {args.reps} reps, 1 thread; {facts['cpu_count']} CPUs")
    print(f"note: {RANDOM_WEIGHTS_NOTE}\n")
    print(table(["dtype", "codec", "ratio", "comp MB/s", "decomp MB/s", "bytes"],
                [[r["dtype"], r["codec"], f"{r['ratio']:.3f}", f"{r['compress_MBps']:.0f}",
                  f"{r['decompress_MBps']:.0f}", f"{r['compressed_bytes']:,}"] for r in codec_rows]))
    print()
    print(table(["dtype", "zarr v3 array", "ratio", "disk bytes", "write MB/s", "read MB/s"],
                [[r["dtype"], r["codec"], f"{r['ratio']:.3f}", f"{r['disk_bytes']:,}", f"{r['write_MBps']:.0f}",
                  f"{r['read_MBps']:.0f}"] for r in zarr_rows]))
    print()
    print(table(["dtype", "as cached (features codec)", "raw B/view", "disk B/view"],
                [[d, v["codec"] + (" + scale zstd(3)" if d.startswith("int8") else ""), f"{v['raw_bytes_per_view']:,.0f}",
                  f"{v['disk_bytes_per_view']:,.0f}"] for d, v in per_view.items()]))
    print(f"int8 / float16 disk bytes per view: "
          f"{per_view['int8']['disk_bytes_per_view'] / per_view['float16']['disk_bytes_per_view']:.3f}; "
          f"at the order-0 entropy bound {bound['int8_over_float16']:.3f} (int8 {bound['int8_bits_per_byte']:.2f} "
          f"bits/byte, best ratio {bound['int8_best_ratio']:.3f}; float16 {bound['float16_low_bits']:.2f} + "
          f"{bound['float16_high_bits']:.2f} bits, best ratio {bound['float16_best_ratio']:.3f})\n")
    print(table(["stored", "rel L2 max", "rel L2 mean", "worst cos", "mean cos"],
                [[d, f"{e['rel_l2_max']:.2e}", f"{e['rel_l2_mean']:.2e}", f"{e['cos_min']:.6f}",
                  f"{e['cos_mean']:.6f}"] for d, e in errors.items()]))
    if pca:
        full = per_view["int8"]["disk_bytes_per_view"]
        print(f"\nPCA coefficients: basis fitted on the first {fit_views} views' tokens, errors on the other "
              f"{n - fit_views} (held out) against float32 features; whole int8 features: {full:,.0f} B/view on disk")
        print(table(["K", "stored", "expl. var (fit)", "disk B/view", "vs int8", "rel L2 mean", "rel L2 max",
                     "worst cos", "mean cos", "proj. only: mean cos"],
                    [[r["rank"], r["dtype"], f"{r['explained_variance_fit']:.4f}", f"{r['disk_bytes_per_view']:,.0f}",
                      f"{r['disk_bytes_per_view'] / full:.3f}"]
                     + ([f"{e['rel_l2_mean']:.3f}", f"{e['rel_l2_max']:.3f}", f"{e['cos_min']:.4f}",
                         f"{e['cos_mean']:.4f}", f"{r['projection_error_held_out']['cos_mean']:.4f}"]
                        if (e := r["error_held_out"]) else ["-"] * 5)
                     for r in pca]))
    print(f"\nother processes used {foreign_s:.1f} CPU-s meanwhile; total {total_s:.0f} s -> {path}")


if __name__ == "__main__":
    main()

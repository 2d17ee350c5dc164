"""Low-rank (PCA) targets: the basis a cache's coefficients are stored in.

With `extract-features --pca K`, each stored token is not the teacher's C-wide feature x
but its K coefficients on a fixed basis fitted before any shard was written:

    coefficients = (x - mean) @ basis.T        [L, K]   (stored as int8 + scale, or float16)
    x ~= coefficients @ basis + mean           [L, C]   (the reconstruction training uses)

`basis` [K, C] holds the top-K principal directions (orthonormal rows, largest variance
first) of the teacher's last-layer tokens over the first `fit_views` views of the input;
`mean` [C] is their mean. Both live in ONE file, `pca/basis.npz` (an uncompressed zip of
`.npy` members, readable with `numpy.load(..., allow_pickle=False)`), because the file is
published with `Location.create_exclusive`: one file is the only thing a first-writer-wins
create makes atomic, so racing processes can never end up with the mean of one fit and
the basis of another. Its bytes are a function of its arrays alone (fixed member order
and zip timestamps), so the same fit gives the same file and the same sha256, which the
manifest records (`storage.pca.sha256`).
"""

from __future__ import annotations

import hashlib
import io
import os
import time
import zipfile
from dataclasses import dataclass

import numpy as np

from .common import CacheError
from .location import Location

PCA_FILE = "pca/basis.npz"
# Members of pca/basis.npz, in the order they are written.
_MEMBERS = ("mean", "basis", "variance", "total_variance", "fit_views", "fitted_views")
# storage.pca fields that are measured by the fit, not chosen: config_mismatch ignores them.
MEASURED_FIELDS = ("explained_variance", "fitted_views", "sha256")
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)  # the earliest zip timestamp: the same bytes whenever written


@dataclass(frozen=True)
class PcaBasis:
    """A fitted basis (see the module docstring for the formulas)."""

    mean: np.ndarray  # [C] float32
    basis: np.ndarray  # [K, C] float32, orthonormal rows, decreasing variance
    variance: np.ndarray  # [K] float64: the variance of the fit's tokens along each row of `basis`
    total_variance: float  # the fit's total variance (trace of its covariance)
    fit_views: int  # views asked for (--pca-fit-views): configuration
    fitted_views: int  # views the fit actually saw (fewer when the input has fewer)

    @property
    def rank(self) -> int:
        return int(self.basis.shape[0])

    @property
    def dim(self) -> int:
        return int(self.basis.shape[1])

    @property
    def explained_variance(self) -> float:
        """Share of the fit's total variance the K directions keep (1.0 at K = C)."""
        return float(self.variance.sum() / self.total_variance) if self.total_variance > 0 else 1.0


def pca_storage(rank: int, fit_views: int) -> dict:
    """The configuration part of the manifest's `storage.pca` (what config_mismatch compares);
    `measured_fields` adds the rest once the basis exists."""
    return {"rank": int(rank), "fit_views": int(fit_views)}


def measured_fields(basis: PcaBasis, digest: str) -> dict:
    return {"explained_variance": round(basis.explained_variance, 6), "fitted_views": basis.fitted_views,
            "sha256": digest}


def basis_from_covariance(mean: np.ndarray, cov: np.ndarray, rank: int, fit_views: int,
                          fitted_views: int) -> PcaBasis:
    """Top-`rank` principal directions of a covariance [C, C] (float64, on the CPU).

    eigh is exact for a symmetric matrix and cheap at C <= 1280. Each direction's sign is
    fixed (its largest-magnitude entry positive) so that a refit on the same data gives the
    same bytes rather than an arbitrary sign per row.
    """
    cov = np.asarray(cov, dtype=np.float64)
    c = cov.shape[0]
    if not 1 <= rank <= c:
        raise CacheError(f"--pca {rank}: the rank must be between 1 and the teacher width {c}")
    cov = (cov + cov.T) / 2  # exactly symmetric, whatever the accumulation order did
    values, vectors = np.linalg.eigh(cov)  # ascending
    order = np.argsort(values)[::-1][:rank]
    rows = vectors[:, order].T  # [K, C]
    pivot = np.abs(rows).argmax(axis=1)
    rows = rows * np.where(rows[np.arange(rank), pivot] < 0, -1.0, 1.0)[:, None]
    return PcaBasis(mean=np.asarray(mean, np.float64).astype(np.float32), basis=rows.astype(np.float32),
                    variance=np.clip(values[order], 0.0, None), total_variance=float(np.clip(values, 0.0, None).sum()),
                    fit_views=int(fit_views), fitted_views=int(fitted_views))


# --- the file -----------------------------------------------------------------------------


def encode_basis(b: PcaBasis) -> bytes:
    """pca/basis.npz bytes: an uncompressed zip of .npy members with fixed timestamps."""
    arrays = {"mean": b.mean.astype(np.float32), "basis": b.basis.astype(np.float32),
              "variance": np.asarray(b.variance, np.float64), "total_variance": np.float64(b.total_variance),
              "fit_views": np.int64(b.fit_views), "fitted_views": np.int64(b.fitted_views)}
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for name in _MEMBERS:
            member = io.BytesIO()
            np.save(member, np.array(arrays[name], order="C"), allow_pickle=False)  # (0-d stays 0-d)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_EPOCH)
            info.external_attr = 0o444 << 16
            zf.writestr(info, member.getvalue())
    return buf.getvalue()


def decode_basis(data: bytes, where: str = PCA_FILE) -> PcaBasis:
    """Read pca/basis.npz bytes (never unpickles); CacheError naming `where` if malformed."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            a = {name: z[name] for name in _MEMBERS}
    except (OSError, ValueError, KeyError, MemoryError, zipfile.BadZipFile) as e:
        raise CacheError(f"{where}: unreadable PCA basis ({type(e).__name__}: {e})") from e
    basis, mean = a["basis"], a["mean"]
    if basis.ndim != 2 or mean.shape != (basis.shape[1],) or a["variance"].shape != (basis.shape[0],):
        raise CacheError(f"{where}: PCA basis of shape {basis.shape} with mean {mean.shape}: inconsistent")
    for name in ("mean", "basis", "variance", "total_variance"):  # (a complex mean cast to float32 silently)
        if a[name].dtype.kind != "f" or not np.isfinite(a[name]).all():
            raise CacheError(f"{where}: {name}.npy: expected finite real numbers, got {a[name].dtype} "
                             f"{'with non-finite values' if a[name].dtype.kind == 'f' else ''}".rstrip())
    for name in ("fit_views", "fitted_views"):
        if a[name].dtype.kind not in "iu" or a[name].shape != ():
            raise CacheError(f"{where}: {name}.npy: expected one integer, got {a[name].dtype} {a[name].shape}")
    return PcaBasis(mean=mean.astype(np.float32), basis=basis.astype(np.float32), variance=a["variance"],
                    total_variance=float(a["total_variance"]), fit_views=int(a["fit_views"]),
                    fitted_views=int(a["fitted_views"]))


def read_basis_file(root: str | os.PathLike) -> tuple[PcaBasis, str] | None:
    """(basis, sha256 of the file) of the cache at `root`, or None when it has no basis file."""
    loc = Location(root)
    try:
        data = loc.read_bytes(PCA_FILE)
    except FileNotFoundError:
        return None
    return decode_basis(data, loc.join(PCA_FILE)), hashlib.sha256(data).hexdigest()


def store_basis(root: str | os.PathLike, b: PcaBasis) -> bool:
    """Publish a fitted basis unless one is there already; True when this call wrote it.

    First writer wins (a hard link locally, see Location.create_exclusive): every process
    then reads back the stored file and uses that, not its own fit.
    """
    return Location(root).create_exclusive(PCA_FILE, encode_basis(b))


def wait_for_basis(root: str | os.PathLike, timeout_s: float, poll_s: float = 2.0) -> tuple[PcaBasis, str]:
    """The stored basis, waiting up to `timeout_s` for another process to publish it."""
    deadline = time.monotonic() + timeout_s
    while True:
        got = read_basis_file(root)
        if got is not None:
            return got
        if time.monotonic() > deadline:
            raise CacheError(f"{Location(root).join(PCA_FILE)}: no PCA basis after {timeout_s:.0f} s "
                             "(the process that fits it, rank 0, did not publish it)")
        time.sleep(poll_s)


# --- using it -----------------------------------------------------------------------------


def project(x: np.ndarray, b: PcaBasis) -> np.ndarray:
    """Features [..., C] -> coefficients [..., K] float32: (x - mean) @ basis.T."""
    return ((np.asarray(x, np.float32) - b.mean) @ b.basis.T).astype(np.float32)


def reconstruct(coefficients: np.ndarray, b: PcaBasis) -> np.ndarray:
    """Coefficients [..., K] -> features [..., C] float32: coefficients @ basis + mean."""
    return (np.asarray(coefficients, np.float32) @ b.basis + b.mean).astype(np.float32)

"""The PCA target mode's basis (`extract-features --pca K`): fitted once per cache, before any
shard is written, on the teacher's float32 tokens of a fixed sample of views.

The sample is the first `--pca-fit-views` views in input-URL order (tar order within a
shard), rendered, batched and run by the teacher stage extraction uses
(extract/teacher_stage.py), so every rank and every resumed run would fit the same basis;
the stored file is what all of them use.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from mrmae.extract.config import ExtractConfig
from mrmae.extract.teacher_stage import render_loader, teacher_batches, teacher_outputs, unique_samples
from mrmae.shared.shards import read_shard
from mrmae.shared import cache_format as cf
from mrmae.shared.teachers.base import Teacher
from mrmae.shared.views import View

PCA_WAIT_S = 2 * 3600  # object stores: how long ranks > 0 wait for rank 0's basis


class CovarianceAccumulator:
    """Streaming mean and covariance of token rows, in float64 on the rows' device.

    Rows are shifted by the first batch's mean before they are summed, so the covariance
    does not come out as the small difference of two large sums (ViT tokens carry a large
    common offset on a few channels).
    """

    def __init__(self) -> None:
        self.n = 0
        self.shift: torch.Tensor | None = None  # [C]
        self.sum: torch.Tensor | None = None  # [C]: sum of shifted rows
        self.sq: torch.Tensor | None = None  # [C, C]: sum of their outer products

    def add(self, rows: torch.Tensor) -> None:
        """rows: [n, C], any float dtype."""
        x = rows.double()
        if self.shift is None:
            self.shift = x.mean(dim=0)
            self.sum = torch.zeros_like(self.shift)
            self.sq = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=x.device)
        d = x - self.shift
        self.sum += d.sum(dim=0)
        self.sq += d.T @ d
        self.n += x.shape[0]

    def finish(self) -> tuple[np.ndarray, np.ndarray]:
        """(mean [C], covariance [C, C]) as float64 numpy arrays (population covariance)."""
        if not self.n:
            raise cf.CacheError("no tokens to fit a PCA basis on")
        m = self.sum / self.n
        cov = self.sq / self.n - torch.outer(m, m)
        return (self.shift + m).cpu().numpy(), cov.cpu().numpy()


def fit_pca_basis(urls: list[str], teacher: Teacher, cfg: ExtractConfig,
                  geometry_of: Callable[[str, list], dict[str, list[View]] | None]) -> cf.PcaBasis:
    """Fit the cache's basis on the teacher's float32 tokens of the first `cfg.pca_fit_views`
    views, in input-URL order and tar order within a shard (the same views on every rank and
    every run: a fixed, deterministic sample). Samples that do not render are left out here;
    extraction reports them."""
    want = cfg.pca_fit_views
    cfg = replace(cfg, store_pixels=None)  # the fit needs the teacher's input only
    acc, views = CovarianceAccumulator(), 0
    bar = tqdm(total=want, unit="view", desc="fit pca", disable=not cfg.progress, dynamic_ncols=True)
    loader = render_loader(cfg, teacher.input_size)
    try:
        for url in urls:
            if views >= want:
                break
            samples = read_shard(url)
            geometry = geometry_of(url, samples)  # (replayed views: their images proven first)
            unique, _ = unique_samples(samples, geometry)
            for batch in teacher_batches(unique, loader, cfg, geometry, on_error=lambda key, reason: None):
                batch = batch[:want - views]  # exactly N views, whatever the batch size
                features = teacher_outputs(batch, teacher, cfg.device).features.float()
                acc.add(features.reshape(-1, features.shape[-1]))
                views += len(batch)
                bar.update(len(batch))
                if views >= want:
                    break
    finally:
        bar.close()
    if acc.n <= cfg.pca:
        raise cf.CacheError(f"--pca {cfg.pca}: the first {views} views hold {acc.n} tokens, too few to fit "
                            f"{cfg.pca} directions")
    mean, cov = acc.finish()
    return cf.basis_from_covariance(mean, cov, cfg.pca, want, views)


def ensure_pca_basis(cfg: ExtractConfig, teacher: Teacher, urls: list[str], rank: int,
                     geometry_of: Callable[[str, list], dict[str, list[View]] | None]) -> tuple[cf.PcaBasis, str]:
    """The cache's stored basis and its sha256, fitting and storing it first if absent.

    Every process of a local cache fits and offers its basis; the first to finish wins
    (Location.create_exclusive), and every process reads back and uses the stored file,
    never its own fit. On an object store (no exclusive create) rank 0 alone fits and
    writes, the others wait for its file. A resumed or growing run finds the file and never
    refits: the basis is the cache's, like its teacher.
    """
    c = teacher.dim
    if not 1 <= cfg.pca <= c:
        raise cf.CacheError(f"--pca {cfg.pca}: the rank must be between 1 and the teacher width {c}")
    if cfg.pca_fit_views < 1:
        raise cf.CacheError(f"--pca-fit-views {cfg.pca_fit_views}: must be at least 1")
    got = cf.read_basis_file(cfg.out)
    if got is None:
        if not cf.is_url(cfg.out) or rank == 0:
            cf.store_basis(cfg.out, fit_pca_basis(urls, teacher, cfg, geometry_of))
        got = cf.wait_for_basis(cfg.out, PCA_WAIT_S)
    basis, digest = got
    if (basis.rank, basis.fit_views, basis.dim) != (cfg.pca, cfg.pca_fit_views, c):
        raise cf.CacheError(f"{cfg.out}: refusing to add to a cache made with another configuration (storage.pca: "
                            f"the stored basis has rank {basis.rank} of width {basis.dim} fitted on {basis.fit_views} "
                            f"views, asked for rank {cfg.pca} of width {c} on {cfg.pca_fit_views})")
    return basis, digest

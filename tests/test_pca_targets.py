"""Low-rank (PCA) targets: the stored basis, the stored coefficients, training and checks.

A float16 cache and a rank-16 PCA cache of the same two shards and views, and a rank
C = 192 one of the first shard; the float16 one is the reference the coefficients are
compared with. One view per image keeps the teacher's work (the test's cost) small.
"""

from __future__ import annotations

from functools import partial

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
import conftest
from conftest import DINO_TINY, rows, url_list

from mrmae.cli import cli
from mrmae.extract import pca_fit, runner
from mrmae.shared.cache_format.info import cache_info
from mrmae.extract.verify import pca_tolerance, verify_cache
from mrmae.shared import cache_format as cf

extract = partial(conftest.extract, views=1, batch_size=6)

K, FIT = 16, 4  # rank and fit views of the low-rank cache (FIT < the 6 views of the first shard)
C = 192  # DINO_TINY's width
F16_EPS = 2.0 ** -11  # float16's relative rounding: the reference features' own error






def stored_scales(root: Path) -> dict[str, np.ndarray]:
    """Each token's largest int8 scale [N, L] as stored (its coarsest quantisation step: the
    one scale per token, or the largest of its groups' scales)."""
    cache = cf.FeatureCache(root)
    out = {}
    for s in cache.complete_shards:
        g = cache.shard(s.source)
        scales = np.stack([g.stored_row(i)[1] for i in range(len(g))]).astype(np.float32)
        out[s.source] = scales if scales.ndim == 2 else scales.max(axis=-1)
    return out


@pytest.fixture(scope="module", autouse=True)
def _one_teacher():
    """Build the (random-weight, fixed-seed) teacher once for the module: building it costs
    more than extracting a shard, and these tests are about what is done with its outputs."""
    from mrmae.extract import verify
    from mrmae.shared.teachers.base import build_teacher

    built = {}

    def cached(spec):
        if str(spec) not in built:
            built[str(spec)] = build_teacher(spec)
        return built[str(spec)]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(runner, "build_teacher", cached)
        mp.setattr(verify, "build_teacher", cached)
        yield


@pytest.fixture(scope="module")
def caches(demo_shards, tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("pca")
    urls = url_list(demo_shards[:2])
    out = {"full": tmp / "full", "low": tmp / "low", "exact": tmp / "exact"}
    extract(urls, out["full"], dtype="float16")
    extract(urls, out["low"], pca=K, pca_fit_views=FIT)
    extract(str(demo_shards[0]), out["exact"], pca=C, pca_fit_views=FIT)
    return out


def test_basis_is_orthonormal_recorded_and_fitted_on_the_first_views(caches):
    cache = cf.FeatureCache(caches["low"])
    mean, basis = cache.pca()
    assert mean.shape == (C,) and basis.shape == (K, C) and mean.dtype == basis.dtype == np.float32
    np.testing.assert_allclose(basis @ basis.T, np.eye(K), atol=1e-5)
    pca = cache.manifest.storage.pca
    data = (caches["low"] / cf.PCA_FILE).read_bytes()
    assert pca.rank == K and pca.fit_views == FIT and pca.fitted_views == FIT
    assert pca.sha256 == hashlib.sha256(data).hexdigest() and cache.manifest.storage.dtype == "int8"
    with np.load(caches["low"] / cf.PCA_FILE, allow_pickle=False) as z:  # plain numpy reads it
        np.testing.assert_array_equal(z["basis"], basis)
    # The fit's variance is that of the first FIT views of the first shard, as extracted:
    # recomputed from the float16 reference cache, the recorded explained variance agrees.
    first = cf.FeatureCache(caches["full"]).complete_shards[0].source
    x = rows(caches["full"])[first]["features"][:FIT].reshape(-1, C).astype(np.float64) - mean
    kept = ((x @ basis.T.astype(np.float64)) ** 2).sum()
    assert kept / (x ** 2).sum() == pytest.approx(pca.explained_variance, abs=1e-3)
    assert 0.5 < pca.explained_variance < 1.0
    info = cache_info(str(caches["low"]))
    assert info["pca"].startswith(f"rank {K} of {C}, explained variance {pca.explained_variance}")
    assert cache_info(str(caches["full"]))["pca"] == "none"


def test_coefficients_are_the_projection_of_the_teachers_features(caches):
    full, low, scales = rows(caches["full"]), rows(caches["low"]), stored_scales(caches["low"])
    b = cf.FeatureCache(caches["low"]).pca_basis()
    for src in full:
        x = full[src]["features"]  # float16 reference [N, L, C]
        c = low[src]["features"]  # stored coefficients, dequantised [N, L, K]
        assert c.shape == x.shape[:2] + (K,)
        for col in ("keys", "view", "crop", "flip", "attention", "cls"):  # all else as in a plain cache
            np.testing.assert_array_equal(low[src][col], full[src][col])
        norm = np.linalg.norm(x, axis=-1, keepdims=True)
        # int8 rounds each coefficient by at most half its step; the reference's float16
        # rounding moves a projection by at most ||x32 - x16|| <= 2^-11 ||x||
        bound = scales[src][..., None] / 2 + F16_EPS * norm + 1e-5
        assert np.all(np.abs(c - cf.project(x, b)) <= bound)
        # reconstructing loses what rank K leaves out, and no more than int8 adds to it
        lost = np.linalg.norm(cf.reconstruct(cf.project(x, b), b) - x, axis=-1)
        err = np.linalg.norm(cf.reconstruct(c, b) - x, axis=-1)
        assert np.all(err <= lost + np.sqrt(K) * scales[src] / 2 + F16_EPS * norm[..., 0] + 1e-4)
        # and the K directions hold part of every shard's variance, not only of the fitted views
        assert (err ** 2).mean() < 0.9 * (np.linalg.norm(x - b.mean, axis=-1) ** 2).mean()


def test_full_rank_basis_reconstructs_the_plain_cache_within_quantisation(caches):
    full, exact, scales = rows(caches["full"]), rows(caches["exact"]), stored_scales(caches["exact"])
    cache = cf.FeatureCache(caches["exact"])
    assert cache.manifest.storage.pca.explained_variance == pytest.approx(1.0, abs=1e-6)
    for src in exact:
        x, y = full[src]["features"], cache.reconstruct(exact[src]["features"])
        norm = np.linalg.norm(x, axis=-1)
        err = np.linalg.norm(y - x, axis=-1)
        assert np.all(err <= np.sqrt(C) * scales[src] / 2 + F16_EPS * norm + 1e-4)  # the int8 bound on C values
        cos = (x * y).sum(-1) / (norm * np.linalg.norm(y, axis=-1))
        assert cos.mean() >= 0.9995 and cos.min() >= pca_tolerance("int8", C)
    # FeatureCache.get hands out the features, reconstructed
    src = next(iter(exact))
    t = cache.get(src, str(full[src]["keys"][3]), int(full[src]["view"][3]))
    assert t.features.shape == (196, C)
    np.testing.assert_allclose(t.features, cache.reconstruct(exact[src]["features"][3]), rtol=1e-6, atol=1e-6)


def test_a_rerun_keeps_the_stored_basis_and_extracts_the_same_bytes(caches, demo_shards, tmp_path, monkeypatch):
    """Deterministic: the first shard alone gives the basis bytes two shards gave. A growing
    (or resumed) run reuses the stored basis and never fits again."""
    out = tmp_path / "c"
    extract(str(demo_shards[0]), out, pca=K, pca_fit_views=FIT)
    assert (out / cf.PCA_FILE).read_bytes() == (caches["low"] / cf.PCA_FILE).read_bytes()

    def no_fit(*a, **k):
        raise AssertionError("the basis was fitted again")

    monkeypatch.setattr(pca_fit, "fit_pca_basis", no_fit)
    stamp = (out / cf.PCA_FILE).stat().st_mtime_ns
    # another order puts the other shard first: a refit would see other views
    summary = extract(url_list([demo_shards[1], demo_shards[0]]), out, pca=K, pca_fit_views=FIT)
    assert summary["extracted"] == 1 and summary["skipped_complete"] == 1
    assert (out / cf.PCA_FILE).stat().st_mtime_ns == stamp
    grown, low = rows(out), rows(caches["low"])
    for col in grown[str(demo_shards[1])]:  # the second shard: the same coefficients, bit for bit
        np.testing.assert_array_equal(grown[str(demo_shards[1])][col], low[str(demo_shards[1])][col])
    # a damaged or replaced basis is found by the integrity check, and refused by readers
    data = bytearray((out / cf.PCA_FILE).read_bytes())
    data[-200] ^= 0x01
    (out / cf.PCA_FILE).write_bytes(bytes(data))
    problems = cf.check_integrity(out)
    assert len(problems) == 1 and cf.PCA_FILE in problems[0] and "sha256 differs" in problems[0]
    with pytest.raises(cf.CacheError, match="sha256 differs"):
        cf.FeatureCache(out).pca()


def test_first_stored_basis_wins(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 12))
    a = cf.basis_from_covariance(x.mean(0), np.cov(x.T), 4, 10, 10)
    b = cf.basis_from_covariance(x.mean(0) + 1, np.cov(x.T) + np.eye(12), 4, 10, 10)
    assert cf.store_basis(tmp_path, a) and not cf.store_basis(tmp_path, b)
    got, _ = cf.read_basis_file(tmp_path)
    np.testing.assert_array_equal(got.basis, a.basis)
    np.testing.assert_array_equal(got.mean, a.mean)
    assert cf.encode_basis(a) == cf.encode_basis(got)  # bytes are a function of the arrays


def test_mixing_pca_and_plain_configurations_is_refused_in_one_line(caches, demo_shards):
    cli_runner = CliRunner()
    base = ["extract-features", "--shards", str(demo_shards[2]), "--teacher", DINO_TINY, "--views", "1",
            "--no-progress"]
    for out, extra in ((caches["low"], []),  # plain asked of a PCA cache
                       (caches["low"], ["--pca", "8", "--pca-fit-views", str(FIT)]),  # another rank
                       (caches["full"], ["--dtype", "float16", "--pca", str(K)])):  # PCA asked of a plain one
        before = sorted(p.name for p in Path(out).rglob("*"))
        r = cli_runner.invoke(cli, [*base, "--out", str(out), *extra])
        lines = [ln for ln in r.output.splitlines() if ln.startswith("mrmae: error")]
        assert r.exit_code == 1 and len(lines) == 1, r.output
        assert "refusing to add" in lines[0] and "storage.pca" in lines[0] and str(out) in lines[0]
        assert sorted(p.name for p in Path(out).rglob("*")) == before  # nothing fitted, nothing written
    r = cli_runner.invoke(cli, [*base, "--out", str(caches["full"]), "--pca", str(C + 1), "--dtype", "float16"])
    assert r.exit_code == 1


def test_verify_judges_the_coefficients_and_reports_the_reconstruction(caches):
    report = verify_cache(str(caches["low"]), recompute=2, seed=2)
    assert report.ok and report.checked == 2 and report.pca_rank == K
    assert report.worst_cosine >= report.tolerance == 0.999  # the plain floor: below the int8 bound at K = 16
    # lossy by construction: never better than the live features' own projection
    assert report.reconstruction_worst_cosine <= report.projection_worst_cosine + 1e-3
    assert 0.3 < report.reconstruction_worst_cosine < 1.0
    r = CliRunner().invoke(cli, ["cache", "verify", "--feature-cache", str(caches["low"]), "--recompute", "1"])
    assert r.exit_code == 0 and "worst coefficient cosine" in r.output and f"PCA rank {K}" in r.output


def test_engine_reconstructs_the_gathered_visible_coefficients():
    from mrmae.train.engine import pca_reconstruct, visible_float_targets
    from mrmae.train.masks.random import random_masking
    from mrmae.train.student import gather_visible

    rng = np.random.default_rng(1)
    x = rng.normal(size=(200, 24))
    b = cf.basis_from_covariance(x.mean(0), np.cov(x.T), 6, 1, 1)
    q, scale = cf.quantize_int8(rng.normal(size=(3, 196, 6)).astype(np.float32))
    ids_keep, _, _ = random_masking(3, 196, 0.75, generator=torch.Generator().manual_seed(0))
    mean, basis = torch.from_numpy(b.mean), torch.from_numpy(b.basis)
    got = pca_reconstruct(visible_float_targets(torch.from_numpy(q), torch.from_numpy(scale), ids_keep,
                                                torch.device("cpu")), mean, basis)
    want = gather_visible(torch.from_numpy(cf.reconstruct(cf.dequantize(q, scale), b)), ids_keep)
    assert got.shape == (3, 49, 24)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["zarr", "wds"])
def test_writers_store_k_wide_features_beside_full_width_cls_and_layers(tmp_path, backend):
    rng = np.random.default_rng(2)
    n, L, width = 5, 196, 24
    w = cf.open_shard_writer(backend, tmp_path, "/d/s.tar", n, width, L, "int8", layers=(2,), feature_dim=6)
    w.append([f"k{i}" for i in range(n)], np.zeros(n), np.tile([0, 0, 8, 8], (n, 1)), np.zeros(n, bool),
             rng.normal(size=(n, L, 6)), rng.random((n, L)), rng.normal(size=(n, width)),
             {2: rng.normal(size=(n, L, width))})
    path, _, _ = w.close({"source": "/d/s.tar", "num_samples": n})
    g = (cf.ShardGroup if backend == "zarr" else cf.WdsShard)(path, {"source": "/d/s.tar"})
    block = g.read(slice(None))
    assert block["features"].shape == (n, L, 6) and block["cls"].shape == (n, width)
    assert g.read(slice(None), "layer2")["features"].shape == (n, L, width)


def _pretrain(args: list[str]) -> list[dict]:
    r = CliRunner().invoke(cli, ["pretrain", *args])
    assert r.exit_code == 0, r.output + repr(r.exception)
    out = Path(args[args.index("--out") + 1])
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]


def test_training_from_a_pca_cache_mimics_the_reconstructed_features(caches, demo_shards, tmp_path):
    args = ["--shards", str(demo_shards[0]), "--model", "mrmae_vit_tiny_patch16", "--decoder-depth", "1",
            "--decoder-dim", "64", "--batch-size", "6", "--workers", "0", "--no-progress", "--seed", "3",
            "--lr", "1e-3"]
    m = {name: _pretrain([*args, "--feature-cache", str(caches[name]), "--out", str(tmp_path / name)])
         for name in ("full", "exact", "low")}
    assert all(len(v) == 1 for v in m.values())  # one step: the first loss is the comparison
    # same views, masks and weights: reconstruction identical, mimicking as close as the targets
    for name in ("exact", "low"):
        assert m[name][0]["loss_recon"] == pytest.approx(m["full"][0]["loss_recon"], rel=1e-6)
    assert m["exact"][0]["loss_mimic"] == pytest.approx(m["full"][0]["loss_mimic"], rel=2e-3)  # int8 only
    assert m["low"][0]["loss_mimic"] == pytest.approx(m["full"][0]["loss_mimic"], rel=0.1)  # what rank 16 drops
    assert m["low"][0]["loss_mimic"] != m["exact"][0]["loss_mimic"]
    cfg = json.loads((tmp_path / "low" / "config.json").read_text())
    assert cfg["target_pca"][0]["rank"] == K and cfg["teacher_dim"] == C

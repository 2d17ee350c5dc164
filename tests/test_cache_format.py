"""The cache format module: int8 error bound, writer/reader round trip, atomic groups."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from mrmae.shared import cache_format as cf


def test_int8_error_bound_on_activation_like_tokens():
    rng = np.random.default_rng(0)
    # heavy-tailed tokens with a few large channels, as in ViT activations
    x = rng.standard_t(4, size=(64, 196, 384)).astype(np.float32)
    x[..., :3] *= 5
    q, scale = cf.quantize_int8(x)
    assert q.dtype == np.int8 and scale.dtype == np.float16 and scale.shape == (64, 196)
    y = cf.dequantize(q, scale)
    err = np.abs(y - x)
    assert np.all(err <= scale.astype(np.float32)[..., None] / 2 + 1e-6)
    cos = (x * y).sum(-1) / (np.linalg.norm(x, axis=-1) * np.linalg.norm(y, axis=-1))
    assert cos.min() >= 0.999
    rel = np.linalg.norm(y - x, axis=-1) / np.linalg.norm(x, axis=-1)
    assert rel.max() <= 0.05
    # an all-zero token stays zero (no division by zero)
    q0, s0 = cf.quantize_int8(np.zeros((1, 8), np.float32))
    assert not q0.any() and not s0.any()


def test_device_quantisation_is_bit_identical_to_the_numpy_one():
    """The extraction quantises on the teacher's device with quantize_int8_torch; a cache must
    not depend on which of the two ran: same int8 values and float16 scales, ties, zeros,
    a float16 subnormal scale and an exact +-127 included."""
    import torch

    rng = np.random.default_rng(1)
    x = rng.standard_t(4, size=(8, 196, 96)).astype(np.float32)
    x[0, 0] = 0.0  # an all-zero token
    x[1, 0] = np.arange(96, dtype=np.float32) - 47.5  # ties: scale 1 (absmax 127), so x / scale ends in .5
    x[1, 0, 0] = -127.0
    x[2, 0] *= 1e-6  # a scale that is subnormal in float16
    q_np, s_np = cf.quantize_int8(x)
    q_t, s_t = cf.quantize_int8_torch(torch.from_numpy(x))
    assert q_t.dtype == torch.int8 and s_t.dtype == torch.float16
    np.testing.assert_array_equal(q_t.numpy(), q_np)
    np.testing.assert_array_equal(s_t.numpy(), s_np)
    assert np.abs(q_np).max() == 127 and not q_np[0, 0].any()
    # bfloat16 teacher outputs (CUDA autocast) are upcast first, as the runner gives them
    xb = torch.from_numpy(x).bfloat16()
    q_b, _ = cf.quantize_int8_torch(xb)
    np.testing.assert_array_equal(q_b.numpy(), cf.quantize_int8(xb.float().numpy())[0])


def test_group_scales_confine_an_outlier_channel_to_its_group():
    """--int8-group 64: a token whose one channel is 50x the rest keeps the others' steps
    fine (per-token scaling spends them all on the outlier); numpy, torch and dequantize agree."""
    import torch

    rng = np.random.default_rng(2)
    x = rng.normal(size=(4, 196, 384)).astype(np.float32)
    x[..., 7] *= 50  # one massive channel, as CLIP teachers have
    errs = {}
    for group in (None, 64):
        q, scale = cf.quantize_int8(x, group)
        assert scale.shape == ((4, 196) if group is None else (4, 196, 6))
        q_t, s_t = cf.quantize_int8_torch(torch.from_numpy(x), group)
        np.testing.assert_array_equal(q_t.numpy(), q)
        np.testing.assert_array_equal(s_t.numpy(), scale)
        y = cf.dequantize(q, scale)
        if group:  # each element within half of its own group's step
            assert np.all(np.abs(y - x) <= np.repeat(scale.astype(np.float32), group, axis=-1) / 2 + 1e-6)
        errs[group] = (np.linalg.norm(y - x, axis=-1) / np.linalg.norm(x, axis=-1)).max()
    assert errs[64] < errs[None] / 2, errs
    # a group that does not divide the width, or covers it whole: one scale per token
    assert cf.int8_groups(384, 100) is None and cf.int8_groups(64, 64) is None and cf.int8_groups(128, 64) == 2


@pytest.mark.parametrize("dtype", ["int8", "float16"])
@pytest.mark.parametrize("rows", [5, 16, 37])
def test_writer_reader_round_trip_across_chunk_boundaries(tmp_path, dtype, rows):
    rng = np.random.default_rng(rows)
    L, C = 196, 24
    feats = rng.normal(size=(rows, L, C)).astype(np.float32)
    extra = rng.normal(size=(rows, L, C)).astype(np.float32)
    att = rng.random((rows, L)).astype(np.float32)
    cls = rng.normal(size=(rows, C)).astype(np.float32)
    keys = [f"k{i // 2}" for i in range(rows)]
    view = np.arange(rows) % 2
    crop = rng.integers(1, 500, size=(rows, 4))  # boxes: at least 1 px
    flip = rng.random(rows) < 0.5
    w = cf.ShardWriter(tmp_path, "/data/train-000.tar", rows + 7, C, L, dtype, layers=(3,))
    for a in range(0, rows, 3):  # uneven appends
        b = min(rows, a + 3)
        w.append(keys[a:b], view[a:b], crop[a:b], flip[a:b], feats[a:b], att[a:b], cls[a:b], {3: extra[a:b]})
    path, digest, size = w.close({"source": "/data/train-000.tar"})
    assert (digest, size) == cf.group_digest(path) and size == sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    assert path.name == f"{cf.group_name('/data/train-000.tar')}.{digest[:16]}"  # named after its bytes
    assert not list(tmp_path.glob("shards/.tmp-*"))
    g = cf.ShardGroup(path, {"source": "/data/train-000.tar"})
    assert len(g) == rows and list(g.keys) == keys
    block = g.read(slice(0, rows))
    tol = 0.05 if dtype == "int8" else 5e-3
    np.testing.assert_allclose(block["features"], feats, atol=tol * np.abs(feats).max())
    np.testing.assert_allclose(g.read(slice(0, rows), layer="layer3")["features"], extra, atol=tol * np.abs(extra).max())
    np.testing.assert_array_equal(block["crop"], crop)
    np.testing.assert_array_equal(block["flip"], flip)
    t = g.get(keys[-1], int(view[-1]))
    assert t.crop == tuple(crop[-1]) and t.flip == bool(flip[-1])
    np.testing.assert_allclose(t.attention, att[-1], atol=1e-3)
    raw = zarr.open_group(str(path), mode="r")  # plain zarr reads it
    assert raw["features"].dtype == np.dtype(dtype) and raw.attrs["status"] == "complete"


def test_aborted_writer_leaves_nothing(tmp_path):
    w = cf.ShardWriter(tmp_path, "a.tar", 4, 8, 196, "int8")
    w.append(["x"], np.zeros(1), np.zeros((1, 4)), np.zeros(1), np.ones((1, 196, 8)), np.ones((1, 196)), np.ones((1, 8)))
    w.abort()
    assert not list((tmp_path / "shards").iterdir())


def _manifest(weights: str = "/a", sha: str = "ab" * 32, dtype: str = "int8") -> cf.Manifest:
    from mrmae.shared.views import ViewConfig

    teacher = {"spec": f"clip:ViT-B-16@{weights}", "family": "clip", "arch": "ViT-B-16", "weights": weights,
               "weights_sha256": sha, "input_size": 224, "patch_size": 16, "grid": [14, 14], "dim": 768,
               "mean": [0.5] * 3, "std": [0.5] * 3, "layers": []}
    return cf.new_manifest(teacher, ViewConfig(), cf.storage_section("zarr", dtype), "0")


def test_config_mismatch_names_the_field_and_ignores_weight_paths():
    m = _manifest()
    assert cf.config_mismatch(m, _manifest(weights="/moved")) is None
    assert "teacher.weights_sha256" in cf.config_mismatch(m, _manifest(sha="cd" * 32))
    assert "storage.dtype" in cf.config_mismatch(m, _manifest(dtype="float16"))


def test_group_names_are_safe_and_distinct():
    a = cf.group_name("pipe:curl -s https://x/train-{0001}.tar")
    b = cf.group_name("/other/dir/train-0001.tar")
    assert a != b and "/" not in a and " " not in a
    assert cf.group_name("/data/../../etc/passwd.tar").startswith("passwd-")

"""Masking: counts, consistency of the triple, seeding, and focused draws following the weights."""

from __future__ import annotations

import pytest
import torch

from mrmae.train.masks.focused import focus_weights, focused_masking
from mrmae.train.masking import masks_from_keep, num_visible
from mrmae.train.masks.random import random_masking

N = 196


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def check_triple(ids_keep, mask, ids_restore, n_keep):
    b = ids_keep.shape[0]
    assert ids_keep.shape == (b, n_keep) and ids_keep.dtype == torch.long
    assert mask.shape == (b, N) and mask.dtype == torch.bool
    assert ids_restore.shape == (b, N) and ids_restore.dtype == torch.long
    assert (mask.sum(1) == N - n_keep).all()
    assert (torch.diff(ids_keep, dim=1) > 0).all()  # sorted ascending, hence no duplicates
    assert not mask.gather(1, ids_keep).any()  # kept tokens are the unmasked ones
    # The decoder's layout (visible tokens, then masked tokens) unshuffles to patch order.
    masked = torch.stack([torch.nonzero(m).flatten() for m in mask])
    shuffled = torch.cat([ids_keep, masked], dim=1)
    assert torch.equal(shuffled.gather(1, ids_restore), torch.arange(N).expand(b, N))
    assert torch.equal(ids_restore >= n_keep, mask)


@pytest.mark.parametrize("ratio,n_keep", [(0.75, 49), (0.5, 98), (0.9, 19), (0.0, 196)])
def test_random_masking_counts_and_consistency(ratio, n_keep):
    assert num_visible(N, ratio) == n_keep
    check_triple(*random_masking(8, N, ratio, generator=gen(0)), n_keep)


def test_num_visible_guards_round_off_and_range():
    assert num_visible(10, 0.9) == 1  # 10 * (1 - 0.9) = 0.999...
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError):
            num_visible(N, bad)


def test_random_masking_seeded_and_uniform():
    a = random_masking(4, N, 0.75, generator=gen(1))
    b = random_masking(4, N, 0.75, generator=gen(1))
    c = random_masking(4, N, 0.75, generator=gen(2))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])
    assert not torch.equal(a[0][0], a[0][1])  # rows differ
    freq = (~random_masking(4000, N, 0.75, generator=gen(3))[1]).float().mean(0)
    assert (freq - 0.25).abs().max() < 0.04  # 6 sd of a binomial(4000, 0.25) share


def test_masks_from_keep_any_order_and_rejects_duplicates():
    ids = torch.tensor([[5, 0, 3], [195, 1, 2]])
    keep, mask, restore = masks_from_keep(ids, N)
    assert torch.equal(keep, ids.sort(1).values)
    check_triple(keep, mask, restore, 3)
    with pytest.raises(ValueError):
        masks_from_keep(torch.tensor([[1, 1, 2]]), N)


def hot_attention(batch: int, hot: int = 60) -> tuple[torch.Tensor, torch.Tensor]:
    g = gen(7)
    hot_ids = torch.randperm(N, generator=g)[:hot]
    att = torch.full((batch, N), 1e-3)
    att[:, hot_ids] = 1.0
    return att, hot_ids


def test_focused_masking_prefers_salient_tokens():
    att, hot_ids = hot_attention(500)
    keep, mask, restore = focused_masking(att, 0.75, generator=gen(0))
    check_triple(keep, mask, restore, 49)
    in_hot = torch.isin(keep, hot_ids).float().sum(1).mean()
    assert in_hot > 45  # uniform draws would give 49 * 60 / 196 = 15
    # Lower temperature sharpens, the uniform mix flattens.
    softer = torch.isin(focused_masking(att, 0.75, temperature=4.0, generator=gen(0))[0], hot_ids).float().sum(1).mean()
    mixed = torch.isin(focused_masking(att, 0.75, uniform_mix=0.5, generator=gen(0))[0], hot_ids).float().sum(1).mean()
    assert 15 + 3 < softer < in_hot - 3 and 15 + 3 < mixed < in_hot - 3


def test_focused_masking_is_not_top_k_and_is_seeded():
    att, _ = hot_attention(4)
    a = focused_masking(att, 0.75, generator=gen(0))
    b = focused_masking(att, 0.75, generator=gen(0))
    c = focused_masking(att, 0.75, generator=gen(1))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])
    assert not torch.equal(a[0][0], a[0][1])  # same attention, different rows


def uniformity_chi2(keep: torch.Tensor) -> float:
    counts = torch.bincount(keep.flatten(), minlength=N).double()
    draws, p = keep.shape[0], keep.shape[1] / N
    return float(((counts - draws * p) ** 2 / (draws * p * (1 - p))).sum())


@pytest.mark.parametrize("kw", [dict(uniform_mix=1.0), dict(temperature=1e6)])
def test_focused_masking_flattens_to_uniform(kw):
    att, _ = hot_attention(4000)
    keep = focused_masking(att, 0.75, generator=gen(0), **kw)[0]
    # ~chi-square with 195 dof (mean 195, sd ~20) under uniformity; concentrated draws give >> 10^4.
    assert uniformity_chi2(keep) < 320
    assert uniformity_chi2(focused_masking(att, 0.75, generator=gen(0))[0]) > 1e4


def test_focus_weights_formula_and_sparse_attention():
    att = torch.rand(3, N)
    w = focus_weights(att, temperature=2.0, uniform_mix=0.2)
    expected = 0.8 * (att.double() + 1e-6).sqrt() / (att.double() + 1e-6).sqrt().sum(1, keepdim=True) + 0.2 / N
    torch.testing.assert_close(w, expected)
    torch.testing.assert_close(w.sum(1), torch.ones(3, dtype=torch.float64))
    # Fewer non-zero attention values than visible slots: all of them are kept, no error.
    sparse = torch.zeros(2, N)
    sparse[:, :10] = 1.0
    keep = focused_masking(sparse, 0.75, temperature=0.05, generator=gen(0))[0]
    assert torch.isin(torch.arange(10), keep[0]).all() and torch.isin(torch.arange(10), keep[1]).all()


# --- the registry (train/masks/) ---------------------------------------------------------------

def test_registry_finds_every_module_and_refuses_unknown_names():
    from mrmae.train.masking import get_mask, mask_names, mask_strategies

    names = mask_names()
    assert {"random", "focused"} <= set(names) and names == sorted(names)
    focused = mask_strategies()["focused"]
    assert focused.needs_attention and not get_mask("random").needs_attention
    assert [o.name for o in focused.options] == ["focus_temperature", "focus_uniform_mix"]
    assert focused.resolve({"focus_temperature": 0.5, "other_strategy_option": 3}) == \
        {"focus_temperature": 0.5, "focus_uniform_mix": 0.0}
    with pytest.raises(ValueError, match="unknown masking strategy 'nope'; known: .*focused"):
        get_mask("nope")
    with pytest.raises(ValueError, match="focused masking needs teacher attention"):
        focused(torch.rand(2, 16), 0.5)


def test_a_name_registered_twice_is_refused():
    from mrmae.train.masking import register_mask

    with pytest.raises(ValueError, match="'random' is registered twice"):
        register_mask("random")(lambda noise, mask_ratio, attention: None)


@pytest.mark.parametrize("mask", ["random", "focused"])
def test_the_engine_draws_what_it_drew_before_the_registry(mask):
    """draw_masks: the noise of (seed, micro-step) (the old sha256 formula, inline), this rank's
    rows of it, then the strategy's pure function: the masks of runs before the registry."""
    import hashlib

    from mrmae.train.config import StepOptions
    from mrmae.train.engine import draw_masks

    opts = StepOptions(mask=mask, mask_ratio=0.75, seed=5, mask_options={"focus_temperature": 0.5,
                                                                          "focus_uniform_mix": 0.1})
    attention = hot_attention(4)[0]
    digest = hashlib.sha256(f"mask\x005\x0011".encode()).digest()
    old = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    noise = torch.rand(3 * 4, 196, generator=old)[4:8]  # rank 1 of 3
    if mask == "random":
        expected = masks_from_keep(torch.argsort(noise, dim=1)[:, :49], 196)
    else:
        expected = focused_masking(attention, 0.75, 0.5, 0.1, noise=noise)
    for got, want in zip(draw_masks(4, 196, attention, opts, 11, 1, 3), expected):
        assert torch.equal(got, want)


def test_mask_and_its_options_are_checked_by_name_and_range():
    from click.testing import CliRunner

    from mrmae.cli import cli
    from mrmae.shared.errors import OptionError
    from mrmae.train.config import StepOptions
    from mrmae.train.pretrain import check_mask

    check_mask(StepOptions(mask="random", mask_options={"focus_temperature": 0.5, "focus_uniform_mix": 1.0}))
    for opts, message in ((StepOptions(mask="nope"), r"--mask nope: unknown \(known: .*random"),
                          (StepOptions(mask="blok"), r"--mask blok: unknown; did you mean block\?"),
                          (StepOptions(mask_options={"bogus": 1.0}), "--mask-option bogus: unknown"),
                          (StepOptions(mask_options={"focus_temperature": 0.0}),
                           "--focus-temperature 0.0: must be a finite number above 0")):
        with pytest.raises(OptionError, match=message):
            check_mask(opts)
    for given in ("bogus", "x=one", "=1"):  # refused while the command line is parsed
        r = CliRunner().invoke(cli, ["pretrain", "--shards", "x.tar", "--out", "o", "--mask-option", given])
        assert r.exit_code == 2 and "--mask-option" in r.output and "give NAME=NUMBER" in r.output, r.output
    r = CliRunner().invoke(cli, ["pretrain", "--shards", "x.tar", "--out", "o", "--mask", "nope"])
    assert r.exit_code == 2 and "nope: unknown (known: " in r.output and "focused" in r.output, r.output
    r = CliRunner().invoke(cli, ["pretrain", "--shards", "x.tar", "--out", "o", "--mask", "focussed"])
    assert r.exit_code == 2 and "focussed: unknown; did you mean focused?" in r.output, r.output

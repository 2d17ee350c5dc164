"""Block-wise masking (train/masks/block.py), the strategy added as one file: exact counts,
rectangles rather than scattered tokens, a function of the noise alone, and `mrmae pretrain
--mask block` end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner
from conftest import url_list

from mrmae.cli import cli
from mrmae.train.masking import get_mask, mask_names
from mrmae.train.masks import block

TINY = ["--model", "mrmae_vit_tiny_patch16", "--decoder-depth", "1", "--decoder-dim", "64",
        "--batch-size", "6", "--workers", "0", "--no-progress", "--seed", "3", "--lr", "1e-3"]


def noise(rows: int, seed: int) -> torch.Tensor:
    return torch.rand(rows, 196, generator=torch.Generator().manual_seed(seed))


def neighbours_masked(mask: torch.Tensor) -> float:
    """Of the masked tokens with a right-hand neighbour, the share whose neighbour is masked too."""
    grid = mask.reshape(-1, 14, 14)
    left, right = grid[:, :, :-1], grid[:, :, 1:]
    return float((left & right).sum() / left.sum())


@pytest.mark.parametrize("ratio", [0.4, 0.75, 0.9])
def test_exact_counts_and_a_consistent_triple(ratio):
    keep, mask, restore = get_mask("block")(noise(8, 0), ratio)
    n_keep = int(196 * (1 - ratio) + 1e-9)
    assert keep.shape == (8, n_keep) and (~mask).sum(1).tolist() == [n_keep] * 8
    assert torch.equal(torch.sort(keep, 1).values, keep) and not mask.gather(1, keep).any()
    layout = torch.cat([keep, torch.nonzero(mask)[:, 1].reshape(8, -1)], 1)  # visible, then masked, ascending
    assert torch.equal(layout.gather(1, restore), torch.arange(196).expand(8, -1))


def test_masked_tokens_come_in_blocks():
    """At BEiT's 40%, a masked token's neighbour is masked far more often than under random
    masking (where it is the ratio, 0.4)."""
    rows = noise(64, 1)
    block = get_mask("block")(rows, 0.4)[1]
    uniform = get_mask("random")(rows, 0.4)[1]
    assert neighbours_masked(uniform) == pytest.approx(0.4, abs=0.05)
    assert neighbours_masked(block) > 0.75
    # the strategy's option reaches the draw: other blocks, still blocks
    coarse = get_mask("block")(rows, 0.4, options={"block_min_patches": 40})[1]
    assert not torch.equal(coarse, block) and neighbours_masked(coarse) > 0.75


def test_a_row_is_a_function_of_its_noise_row():
    rows = noise(6, 2)
    whole = get_mask("block")(rows, 0.75)[1]
    assert torch.equal(get_mask("block")(rows[3:5], 0.75)[1], whole[3:5])  # a rank's slice: the same rows
    assert torch.equal(get_mask("block")(rows.clone(), 0.75)[1], whole)
    assert not torch.equal(get_mask("block")(noise(6, 3), 0.75)[1], whole)
    # rows are placed together: a row alone, or among 63 others that need more tries, is the same row
    many = get_mask("block")(noise(64, 4), 0.75)[1]
    assert all(torch.equal(get_mask("block")(noise(64, 4)[i:i + 1], 0.75)[1], many[i:i + 1]) for i in (0, 17, 63))
    # the seed hashes each value with its place: the same values in another order are another row
    assert not torch.equal(get_mask("block")(rows.flip(1), 0.75)[1], whole.flip(1))
    with pytest.raises(ValueError, match="square token grid"):
        get_mask("block")(torch.rand(2, 10), 0.5)


def one_row_beit(seeds, row: int, g: int, to_mask: int, min_patches: float, max_aspect: float) -> torch.Tensor:
    """BEiT's placement loop written plainly for one row, fed the same candidate draws."""
    grid, masked, fails, k = torch.zeros(g, g, dtype=torch.bool), 0, 0, 0
    while masked < to_mask and fails < block.TRIES:
        u_area, u_aspect, u_top, u_left = block.candidate(seeds[row:row + 1], k)[0].tolist()
        k += 1
        left_over = to_mask - masked
        low = min(min_patches, left_over)
        area = low + u_area * (left_over - low)
        aspect = math.exp(math.log(max_aspect) * (2 * u_aspect - 1))
        h, w = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 1 <= h <= g and 1 <= w <= g:
            top, left = int(u_top * (g - h + 1)), int(u_left * (g - w + 1))
            window = grid[top:top + h, left:left + w]
            added = h * w - int(window.sum())
            if 0 < added <= left_over:
                window[...] = True
                masked, fails = masked + added, 0
                continue
        fails += 1
    return grid


@pytest.mark.parametrize("to_mask, min_patches", [(79, 16.0), (147, 16.0), (177, 16.0), (147, 40.0), (20, 1.0)])
def test_rows_placed_together_are_beits_loop_row_by_row(to_mask, min_patches):
    """The batch-wide placement is BEiT's sequential loop, row by row, on the same draws;
    the rectangles alone never pass the count and cover nearly all of it (blocks, not a
    scatter of top-up tokens)."""
    seeds = block.row_seeds(noise(48, 5))
    together = torch.from_numpy(block.block_maps(seeds, 14, to_mask, min_patches, 1 / 0.3))
    for row in range(48):
        assert torch.equal(together[row], one_row_beit(seeds, row, 14, to_mask, min_patches, 1 / 0.3)), row
    covered = together.sum((1, 2))
    assert int(covered.max()) <= to_mask and float(covered.double().mean()) > 0.95 * to_mask


def test_pretrain_with_block_masking_end_to_end(demo_shards, tmp_path):
    assert "block" in mask_names()
    out = tmp_path / "run"
    r = CliRunner().invoke(cli, ["pretrain", "--shards", url_list(demo_shards), "--out", str(out), *TINY,
                                 "--mask", "block", "--mask-option", "block_min_patches=8"])
    assert r.exit_code == 0, r.output + repr(r.exception)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 3 and all(torch.isfinite(torch.tensor(rec["loss"])) for rec in records)
    opts = json.loads((out / "config.json").read_text())["step_options"]
    assert opts["mask"] == "block" and opts["mask_options"]["block_min_patches"] == 8.0
    assert opts["mask_options"]["block_max_aspect"] == pytest.approx(1 / 0.3)
    bad = CliRunner().invoke(cli, ["pretrain", "--shards", url_list(demo_shards), "--out", str(tmp_path / "bad"),
                                   *TINY, "--mask", "block", "--mask-option", "block_min_patches=0"])
    assert bad.exit_code == 2 and "--mask-option block_min_patches 0.0: must be a finite number from 1" in bad.output

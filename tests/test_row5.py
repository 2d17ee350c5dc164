"""Table 3 row 5: the decoder reconstructs the teacher's features of the masked tokens beside
their pixels (a second linear head on the decoder, weighted as the mimic loss), from the same
cache; its recipe trains on demo data, restores, exports, and shows in `mrmae report`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import DINO_TINY
from test_config import cache  # noqa: F401  (the fixture: DINO-tiny targets of the first demo shard)

from mrmae.cli import cli
from mrmae.train.masks.random import random_masking
from mrmae.train.models import create_model
from mrmae.train.student import gather_visible, masked_ids

RECIPE = Path(__file__).parents[1] / "recipes" / "table3-row5-joint-decoder.yaml"


def test_masked_ids_are_the_masked_tokens_in_patch_order():
    keep, mask, _ = random_masking(3, 16, 0.75, generator=torch.Generator().manual_seed(0))
    ids = masked_ids(mask)
    assert ids.shape == (3, 12)
    for row in range(3):
        assert ids[row].tolist() == torch.nonzero(mask[row]).flatten().tolist()
        assert not set(ids[row].tolist()) & set(keep[row].tolist())


@pytest.mark.parametrize("name", ["mrmae_vit_tiny_patch16", "mrmae_convvit_tiny"])
def test_the_decoder_feature_head_loss(name):
    torch.manual_seed(0)
    m = create_model(name, img_size=64, decoder_teacher_dim=24, decoder_embed_dim=32, decoder_depth=1,
                     decoder_num_heads=2)
    assert m.mimic_head is None and m.decoder_feature_pred.out_features == 24
    g = torch.Generator().manual_seed(1)
    imgs = torch.randn(2, 3, 64, 64, generator=g)
    keep, mask, restore = random_masking(2, 16, 0.75, generator=g)
    targets = torch.randn(2, 12, 24, generator=g)  # the masked tokens' features
    out = m(imgs, keep, restore, mask, recon_weight=0.3, mimic_weight=0.7, decoder_targets=targets)
    assert set(out) == {"loss", "loss_recon", "loss_recon_features"}
    latent, _ = m.forward_encoder(imgs, keep)
    decoded = m.decode(latent, restore)
    by_hand = (m.decoder_feature_pred(gather_visible(decoded, masked_ids(mask))) - targets).pow(2).mean()
    torch.testing.assert_close(out["loss_recon_features"], by_hand)
    torch.testing.assert_close(out["loss_recon"], m.recon_loss(imgs, m.decoder_pred(decoded), mask))
    torch.testing.assert_close(out["loss"], 0.3 * out["loss_recon"] + 0.7 * by_hand)
    out["loss"].backward()
    dead = [n for n, p in m.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not dead, dead
    with pytest.raises(ValueError, match="replaces the mimic heads"):
        create_model(name, teacher_dim=24, decoder_teacher_dim=24)
    with pytest.raises(ValueError, match="masked tokens"):
        m(imgs, keep, restore, mask, decoder_targets=targets[:, :4])


def test_the_row5_recipe_trains_on_demo_data_and_shows_in_the_report(demo_shards, cache, tmp_path):
    out = tmp_path / "row5"
    tiny = ["--model", "mrmae_vit_tiny_patch16", "--fuse-layers", "4,8,12", "--decoder-dim", "64", "--decoder-depth",
            "1", "--epochs", "2", "--warmup-epochs", "0", "--effective-batch", "6", "--batch-size", "3", "--workers",
            "0", "--lr", "1e-3", "--no-progress"]
    r = CliRunner().invoke(cli, ["pretrain", "--config", str(RECIPE), "--shards", str(demo_shards[0]),
                                 "--feature-cache", str(cache), "--out", str(out), *tiny])
    assert r.exit_code == 0, r.output + repr(r.exception)
    steps = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [1, 2] and all("loss_mimic" not in s for s in steps)
    for s in steps:
        assert s["loss_recon_features"] > 0 and s["loss"] == pytest.approx(
            0.5 * s["loss_recon"] + 0.5 * s["loss_recon_features"], rel=1e-5)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["step_options"]["high_level_at"] == "decoder" and cfg["step_options"]["mask"] == "focused"

    from mrmae.train.restore import load_student

    student = load_student(out).model  # restored from its shapes: the decoder's feature head, no mimic head
    assert student.mimic_head is None and student.decoder_feature_pred.out_features == 192
    r = CliRunner().invoke(cli, ["export", "--checkpoint", str(out), "--out", str(tmp_path / "e")])
    assert r.exit_code == 0 and "vit_tiny_patch16_224" in r.stdout, r.output

    # beside row 4 (L_M on the encoder) in the report: its own targets cell, weights and feature loss
    row4 = tmp_path / "row4"
    r = CliRunner().invoke(cli, ["pretrain", "--config", str(RECIPE.with_name("table3-row4-fusion.yaml")), "--shards",
                                 str(demo_shards[0]), "--feature-cache", str(cache), "--out", str(row4), *tiny])
    assert r.exit_code == 0, r.output + repr(r.exception)
    r = CliRunner().invoke(cli, ["report", str(row4), str(out), "--out", str(tmp_path / "report")])
    assert r.exit_code == 0, r.output + repr(r.exception)
    import csv

    rows = {row["run"]: row for row in csv.DictReader((tmp_path / "report" / "report.csv").open())}
    assert rows["row5"]["targets"] == f"main @ {cache}, at the decoder (masked tokens)"
    assert rows["row5"]["loss weights (recon/mimic)"] == "0.5/0.5" and rows["row5"]["final L_M"] == ""
    assert float(rows["row5"]["final L_R features"]) == pytest.approx(steps[-1]["loss_recon_features"], rel=1e-9)
    assert rows["row4"]["final L_R features"] == "" and float(rows["row4"]["final L_M"]) > 0
    assert "final L_R features" in (tmp_path / "report" / "report.md").read_text()


def test_row5_needs_one_teachers_targets_and_a_weight(demo_shards, tmp_path):
    base = ["pretrain", "--shards", str(demo_shards[0]), "--out", str(tmp_path / "o"), "--high-level-at", "decoder",
            "--model", "mrmae_vit_tiny_patch16", "--no-progress"]
    for extra, words in (([], "give --feature-cache or --teacher"),
                         (["--teacher", DINO_TINY, "--mimic-weight", "0"], "--mimic-weight 0"),
                         (["--feature-cache", str(tmp_path / "cache"), "--target", "main,dino"], "one teacher's features")):
        r = CliRunner().invoke(cli, [*base, *extra])
        assert r.exit_code == 2 and words in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.output
    assert not (tmp_path / "o").exists()

"""Layer-wise lr decay as MAE and ConvMAE assign it (`util/lr_decay.py` in both), parameter by
parameter, and the per-stage assignment kept as `--layer-decay-groups stages`."""

from __future__ import annotations

import re

import pytest
import timm
import torch

import mrmae  # noqa: F401  (registers mrmae_convvit_*)
from mrmae.train.downstream.layer_decay import layer_ids, param_groups_layer_decay


def convmae_layer(name: str, blocks: int) -> int:
    """ConvMAE's rule, written from its description in mrmae's names: the stage embeddings, the
    conv stages, the stage-3 projection and the position embedding are layer 0; transformer block
    i is layer i + 1; everything else (norm, fc_norm, head) the top, blocks + 1."""
    if re.match(r"(embed[123]|stage[12]|token_proj)\.|pos_embed$", name):
        return 0
    if m := re.match(r"blocks\.(\d+)\.", name):
        return int(m.group(1)) + 1
    return blocks + 1


def mae_layer(name: str, blocks: int) -> int:
    """MAE's: cls_token, pos_embed and the patch embedding layer 0, block i layer i + 1, the rest on top."""
    if name in ("cls_token", "pos_embed") or name.startswith("patch_embed."):
        return 0
    if m := re.match(r"blocks\.(\d+)\.", name):
        return int(m.group(1)) + 1
    return blocks + 1


def scales(groups: list[dict], model: torch.nn.Module) -> dict[str, tuple[float, float]]:
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: (g["lr_scale"], g["weight_decay"]) for g in groups for p in g["params"]}


@pytest.mark.parametrize("fc_norm", [True, False])
def test_convvit_layers_are_convmaes(fc_norm):
    with torch.device("meta"):
        model = timm.create_model("mrmae_convvit_tiny", num_classes=10 if fc_norm else 0, fc_norm=fc_norm)
    ids = layer_ids(model)
    assert ids == {n: convmae_layer(n, 11) for n, _ in model.named_parameters()}
    assert ids["stage1.0.dwconv.weight"] == ids["embed2.norm.weight"] == ids["token_proj.weight"] == 0
    got = scales(param_groups_layer_decay(model, 0.05, 0.6), model)
    for name, (scale, wd) in got.items():
        assert scale == pytest.approx(0.6 ** (12 - convmae_layer(name, 11)), rel=1e-12), name
        p = dict(model.named_parameters())[name]
        assert wd == (0.0 if p.ndim <= 1 or name == "pos_embed" else 0.05), name
    top = "fc_norm.weight" if fc_norm else "norm.weight"  # without fc_norm the final norm trains at the full lr
    assert got[top][0] == 1.0 and got["blocks.10.mlp.fc1.weight"][0] == pytest.approx(0.6)
    assert got["embed1.proj.weight"][0] == pytest.approx(0.6 ** 12)


def test_vit_layers_are_maes():
    with torch.device("meta"):
        model = timm.create_model("vit_tiny_patch16_224", num_classes=10, global_pool="token")
    assert layer_ids(model) == {n: mae_layer(n, 12) for n, _ in model.named_parameters()}
    got = scales(param_groups_layer_decay(model, 0.05, 0.65), model)
    assert got["norm.weight"][0] == 1.0 and got["cls_token"] == (pytest.approx(0.65 ** 13), 0.0)


def test_the_per_stage_assignment_is_timms_group_matcher():
    """`stages`: each conv stage its own layer, the final norm with the last block, as timm's
    param_groups_layer_decay assigns them (so runs made with it keep their lrs)."""
    from timm.optim import param_groups_layer_decay as timms

    with torch.device("meta"):
        model = timm.create_model("mrmae_convvit_tiny", num_classes=10)
    ids = layer_ids(model, "stages")
    assert (ids["embed1.proj.weight"], ids["stage1.1.pw1.weight"], ids["embed2.proj.weight"],
            ids["stage2.0.norm1.weight"], ids["embed3.proj.weight"], ids["token_proj.weight"], ids["pos_embed"],
            ids["blocks.0.attn.qkv.weight"], ids["blocks.10.mlp.fc2.bias"], ids["norm.weight"],
            ids["head.weight"]) == (0, 0, 1, 1, 2, 2, 2, 3, 13, 13, 14)
    ours = scales(param_groups_layer_decay(model, 0.05, 0.6, "stages"), model)
    assert ours == scales(timms(model, 0.05, model.no_weight_decay(), layer_decay=0.6), model)
    with pytest.raises(ValueError, match="official"):
        layer_ids(model, "per-block")

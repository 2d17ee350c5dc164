"""Layer-wise lr decay for fine-tuning: the layer of each parameter, and AdamW's groups.

With L transformer blocks and decay d, a parameter in layer l trains at lr x d^(L + 1 - l).
Two assignments (`--layer-decay-groups`):

- `official` (default): MAE's and ConvMAE's (`util/lr_decay.py` in both): everything before
  the first transformer block is layer 0 (a ViT's patch embedding, [CLS] and position
  tokens; a ConvViT's three stage embeddings, both conv stages, the stage-3 projection and
  its position embedding), block i is layer i + 1, and everything after (the final norm,
  `fc_norm`, the head) is the top layer L + 1, at the full lr.
- `stages`: the encoder's own `group_matcher` through timm's `param_groups_layer_decay`: a
  ConvViT's conv stages are a layer each (stage 1 then trains at d^2 of `official`'s lr,
  stage 2 at d), and the final norm goes with the last block.

Weight decay as both official codes and timm: none on 1-D tensors (norms, biases) and on
the model's `no_weight_decay()` names (position, [CLS] tokens).
"""

from __future__ import annotations

import re

import torch

RULES = ("official", "stages")


def layer_ids(model: torch.nn.Module, rule: str = "official") -> dict[str, int]:
    """Parameter name -> layer (0 = the input side), for every parameter of `model` (a timm
    encoder with `group_matcher`: timm's VisionTransformer or mrmae's ConvViT)."""
    if rule == "stages":
        from timm.models import group_parameters

        ids = group_parameters(model, model.group_matcher(coarse=False), reverse=True)
        top = max(ids.values()) + 1  # unmatched names (the head): timm puts them past every group
        return {n: ids.get(n, top) for n, _ in model.named_parameters()}
    if rule != "official":
        raise ValueError(f"layer decay groups must be one of {RULES}, got {rule!r}")
    stem = re.compile(model.group_matcher(coarse=True)["stem"])
    block = re.compile(r"^blocks\.(\d+)\.")
    depth = len(model.blocks)
    ids = {}
    for name, _ in model.named_parameters():
        if m := block.match(name):
            ids[name] = int(m.group(1)) + 1
        else:
            ids[name] = 0 if stem.match(name) else depth + 1
    return ids


def param_groups_layer_decay(model: torch.nn.Module, weight_decay: float, layer_decay: float,
                             rule: str = "official") -> list[dict]:
    """AdamW parameter groups, one per (layer, decay or not), each with its `lr_scale`
    (layer_decay ^ (top - layer), top = the highest layer of `rule`) and `weight_decay`."""
    ids = layer_ids(model, rule)
    top = max(ids.values()) if rule == "stages" else len(model.blocks) + 1
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decays = not (p.ndim <= 1 or name in skip)
        layer = ids[name]
        group = groups.setdefault((layer, decays), {"params": [], "lr_scale": layer_decay ** (top - layer),
                                                    "weight_decay": weight_decay if decays else 0.0})
        group["params"].append(p)
    return [groups[k] for k in sorted(groups)]

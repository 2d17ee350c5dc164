"""Teacher kind `dino`: a timm VisionTransformer (DINO, DINOv2 and relatives;
`dino:TIMM_NAME[@WEIGHTS]`, WEIGHTS a local file or a timm pretrained tag). Tokens are the
final norm's output.
"""

from __future__ import annotations

import importlib

import torch
import torch.nn as nn

from mrmae.shared.errors import unknown_name

from .base import (STUDENT_GRID, Teacher, TeacherError, TeacherOutput, TeacherSpec, capture_input, cls_attention,
                   first_line, load_weights_file, random_init_warning, register_teacher)
from ._hub import from_hub


@register_teacher("dino", "dino:TIMM_NAME[@WEIGHTS]", small="vit_tiny_patch16_224")
class TimmTeacher(Teacher):
    """A timm VisionTransformer (DINO and relatives) at the student's grid."""

    def __init__(self, spec: TeacherSpec):
        super().__init__()
        import timm

        base = spec.arch.split(".")[0]
        if base not in timm.list_models():
            raise TeacherError(unknown_name(f"teacher {spec}: timm architecture", spec.arch, timm.list_models(),
                                            "timm.list_models('vit_*')"))
        if spec.weights is not None and not spec.weights_is_file and f"{base}.{spec.weights}" not in (
                tags := timm.list_pretrained(f"{base}.*")):
            raise TeacherError(unknown_name(f"teacher {spec}: timm weights tag", spec.weights,
                                            [t.split(".", 1)[1] for t in tags], f"timm.list_pretrained('{base}.*')"))
        with torch.device("meta"):  # only to read the patch size; draws no random numbers
            patch = timm.create_model(base, pretrained=False, num_classes=0).patch_embed.patch_size[0]
        kwargs: dict = dict(num_classes=0, img_size=STUDENT_GRID * patch)
        name = spec.arch
        if spec.weights is None:
            random_init_warning(spec)
            kwargs["pretrained"] = False
        elif spec.weights_is_file:
            # Built empty, then loaded strictly by us: timm's own pretrained path only warns
            # about keys that do not fit, which would give silently random targets.
            kwargs["pretrained"] = False
        else:
            name, kwargs["pretrained"] = f"{base}.{spec.weights}", True
        def build():
            torch.manual_seed(0)
            return timm.create_model(name, **kwargs)

        with torch.random.fork_rng(devices=[]):
            try:
                model = from_hub(spec, build) if kwargs["pretrained"] else build()
            except (RuntimeError, KeyError) as e:
                raise TeacherError(f"teacher weights {spec.weights!r} do not fit {spec.arch}: {first_line(e)}") from e
        if spec.weights_is_file:
            _load_file(model, spec)
        if not hasattr(model, "blocks") or not hasattr(model.blocks[-1].attn, "qkv"):
            raise TeacherError(f"teacher {spec}: only timm VisionTransformer-style models are supported")
        self.spec, self.patch_size = spec, patch
        self.model = model
        self.num_prefix_tokens = model.num_prefix_tokens
        self.dim = model.embed_dim
        self.depth = len(model.blocks)
        cfg = model.pretrained_cfg
        self.mean = tuple(float(m) for m in cfg.get("mean", (0.485, 0.456, 0.406)))
        self.std = tuple(float(s) for s in cfg.get("std", (0.229, 0.224, 0.225)))
        self._finish_init(self.model)

    def weights_state(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> TeacherOutput:
        """images [B, 3, S, S] normalised -> TeacherOutput (see module docstring)."""
        attn_mod = self.model.blocks[-1].attn
        captured: dict[str, torch.Tensor] = {}
        hook = attn_mod.register_forward_pre_hook(capture_input(captured))
        try:
            final, _ = self.model.forward_intermediates(
                images, indices=1, norm=False, output_fmt="NLC", return_prefix_tokens=False
            )
        finally:
            hook.remove()
        x = captured["x"]
        B, N, _ = x.shape
        qkv = attn_mod.qkv(x).reshape(B, N, 3, attn_mod.num_heads, attn_mod.head_dim).permute(2, 0, 3, 1, 4)
        q, k = attn_mod.q_norm(qkv[0]), attn_mod.k_norm(qkv[1])
        p = self.num_prefix_tokens
        attention = cls_attention(q, k, attn_mod.scale, p)
        return TeacherOutput(final[:, p:], attention, final[:, 0])


def _load_file(model: nn.Module, spec: TeacherSpec) -> None:
    """Strictly load a local weights file (`load_weights_file`: nothing unpickled) into a timm model."""
    state = load_weights_file(spec.weights, spec.arch)
    try:
        # timm's per-family filter converts original checkpoints (e.g. DINO's) and resizes
        # position embeddings to the student grid.
        family = importlib.import_module(type(model).__module__)
        if hasattr(family, "checkpoint_filter_fn"):
            state = family.checkpoint_filter_fn(state, model)
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
        model.load_state_dict(state, strict=True)
    except Exception as e:
        raise TeacherError(f"teacher weights {spec.weights} do not fit {spec.arch}: {first_line(e)}") from e

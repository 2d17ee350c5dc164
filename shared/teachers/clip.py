"""Teacher kind `clip`: an open_clip vision tower (`clip:ARCH[@WEIGHTS]`; WEIGHTS a local
file or an open_clip pretrained tag). Tokens are `ln_post`'s output, before the projection.
"""

from __future__ import annotations

import contextlib
import logging

import torch
import torch.nn as nn
import torch.nn.functional as F

from mrmae.shared.errors import unknown_name

from .base import (STUDENT_GRID, Teacher, TeacherError, TeacherOutput, TeacherSpec, capture_input, cls_attention,
                   first_line, load_weights_file, random_init_warning, register_teacher)
from ._hub import from_hub

# open_clip logs this on the root logger when it builds a model without weights; mrmae's own
# random-weights warning (random_init_warning) has said so already, in words that say why.
_OPEN_CLIP_NO_WEIGHTS = "No pretrained weights loaded for model "


class _DropLine(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not (isinstance(record.msg, str) and record.msg.startswith(self.prefix))


@contextlib.contextmanager
def _without_open_clip_no_weights_line():
    """Drop open_clip's "No pretrained weights loaded" record while the block runs, nothing else
    (it is logged with `logging.warning`, on the root logger, so the filter sits there)."""
    root, line = logging.getLogger(), _DropLine(_OPEN_CLIP_NO_WEIGHTS)
    root.addFilter(line)
    try:
        yield
    finally:
        root.removeFilter(line)


@register_teacher("clip", "clip:ARCH[@WEIGHTS]", small="ViT-S-16")
class ClipTeacher(Teacher):
    """open_clip vision tower. Only `model.visual` is kept; the text tower is dropped."""

    def __init__(self, spec: TeacherSpec):
        super().__init__()
        import open_clip

        if spec.arch not in open_clip.list_models():
            raise TeacherError(unknown_name(f"teacher {spec}: open_clip architecture", spec.arch,
                                            open_clip.list_models(), "open_clip.list_models()"))
        cfg = open_clip.get_model_config(spec.arch)
        patch = cfg["vision_cfg"].get("patch_size")
        if not isinstance(patch, int):
            raise TeacherError(f"teacher {spec}: only ViT vision towers are supported")
        tagged = spec.weights is not None and not spec.weights_is_file
        if tagged and spec.weights not in open_clip.list_pretrained_tags_by_model(spec.arch):
            raise TeacherError(unknown_name(f"teacher {spec}: open_clip weights tag", spec.weights,
                                            open_clip.list_pretrained_tags_by_model(spec.arch),
                                            f"open_clip.list_pretrained_tags_by_model({spec.arch!r})"))
        if tagged and open_clip.get_pretrained_cfg(spec.arch, spec.weights).get("quick_gelu", False) != \
                cfg.get("quick_gelu", False):  # open_clip only warns; the targets would come from another activation
            other = [a for a in open_clip.list_models() if a.startswith(spec.arch.removesuffix("-quickgelu"))
                     and spec.weights in open_clip.list_pretrained_tags_by_model(a) and a != spec.arch]
            raise TeacherError(f"teacher {spec}: the {spec.weights!r} weights were trained with"
                               f"{'' if not cfg.get('quick_gelu') else 'out'} QuickGELU, {spec.arch} is built "
                               f"{'without' if not cfg.get('quick_gelu') else 'with'} it"
                               + (f"; give clip:{other[0]}@{spec.weights}" if other else ""))
        if spec.weights is None:
            random_init_warning(spec)

        visual_only = spec.weights_is_file and _holds_visual_only(spec.weights)

        def build():
            torch.manual_seed(0)
            with _without_open_clip_no_weights_line():
                return open_clip.create_model(spec.arch, pretrained=None if visual_only else spec.weights,
                                              force_image_size=STUDENT_GRID * patch, device="cpu")

        with torch.random.fork_rng(devices=[]):
            try:
                model = from_hub(spec, build) if tagged else build()
            except (RuntimeError, KeyError) as e:
                raise TeacherError(f"teacher weights {spec.weights!r} do not fit {spec.arch}: {first_line(e)}") from e
        if visual_only:
            _load_visual(model.visual, spec)
        self.spec, self.patch_size, self.num_prefix_tokens = spec, patch, 1
        self.visual = model.visual
        self.dim = self.visual.ln_post.normalized_shape[0]
        self.depth = len(self.visual.transformer.resblocks)
        mean = getattr(self.visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN
        std = getattr(self.visual, "image_std", None) or open_clip.OPENAI_DATASET_STD
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self._finish_init(self.visual)

    def weights_state(self) -> dict[str, torch.Tensor]:
        """The vision tower's tensors under open_clip's names (`visual.*`): a file of these
        loads strictly into the tower alone (`_load_visual`); the text tower is not kept."""
        return {f"visual.{k}": v for k, v in self.visual.state_dict().items()}

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> TeacherOutput:
        """images [B, 3, S, S] normalised -> TeacherOutput (see module docstring)."""
        blocks = self.visual.transformer.resblocks
        captured: dict[str, torch.Tensor] = {}
        # The last block calls its nn.MultiheadAttention on ln_1(x): capture that input.
        hook = blocks[-1].attn.register_forward_pre_hook(capture_input(captured))
        try:
            out = self.visual.forward_intermediates(
                images, indices=1, intermediates_only=True, output_fmt="NLC", output_extra_tokens=True
            )
        finally:
            hook.remove()
        last = torch.cat([out["image_intermediates_prefix"][-1], out["image_intermediates"][-1]], dim=1)
        normed = self.visual.ln_post(last)
        attn_mod: nn.MultiheadAttention = blocks[-1].attn
        x = captured["x"]
        if not attn_mod.batch_first:
            x = x.transpose(0, 1)
        q, k, _ = F.linear(x, attn_mod.in_proj_weight, attn_mod.in_proj_bias).chunk(3, dim=-1)
        B, N, C = q.shape
        H = attn_mod.num_heads
        q = q.view(B, N, H, C // H).transpose(1, 2)
        k = k.view(B, N, H, C // H).transpose(1, 2)
        attention = cls_attention(q, k, (C // H) ** -0.5, 1)
        return TeacherOutput(normed[:, 1:], attention, normed[:, 0])


def _holds_visual_only(path: str) -> bool:
    """Whether a local weights file holds the vision tower alone (every name `visual.*`, as
    `mrmae save-teacher` writes it) rather than a whole open_clip checkpoint."""
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        try:
            with safe_open(path, "pt") as f:
                names = list(f.keys())
        except Exception as e:
            raise TeacherError(f"teacher weights {path}: not a safetensors file ({first_line(e)})") from e
    else:
        names = list(load_weights_file(path, "an open_clip model"))
    return bool(names) and all(k.startswith("visual.") for k in names)


def _load_visual(visual: nn.Module, spec: TeacherSpec) -> None:
    """Strictly load a vision-tower-only file into open_clip's `model.visual`."""
    state = {k.removeprefix("visual."): v for k, v in load_weights_file(spec.weights, spec.arch).items()}
    try:
        visual.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise TeacherError(f"teacher weights {spec.weights} do not fit {spec.arch}: {first_line(e)}") from e

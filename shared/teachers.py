"""Teacher specs and the frozen teachers that produce mimic targets.

A spec is `clip:ARCH[@WEIGHTS]` (open_clip) or `dino:TIMM_NAME[@WEIGHTS]` (timm), where
WEIGHTS is a local file or a pretrained tag. Every teacher returns, per view:

- `features` [B, L, C]: last-layer patch tokens (CLIP: after `ln_post`, before the
  projection; timm: after the final norm),
- `attention` [B, L]: the last block's [CLS]->patch attention, averaged over heads,
  recomputed from that block's q and k (fused attention never materialises it),
- `cls` [B, C]: the [CLS] token under the same final norm,
- `layers` {i: [B, L, C]}: raw (un-normed) patch tokens after block i (1-based), on request.

The input size is chosen so the token grid matches the student's (14 x 14): a /16
teacher sees 224 px, a /14 teacher 196 px.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

STUDENT_GRID = 14


class TeacherError(ValueError):
    """A spec that names no known teacher, or weights that do not fit it."""


@dataclass(frozen=True)
class TeacherSpec:
    family: str  # "clip" | "dino"
    arch: str
    weights: str | None = None

    @classmethod
    def parse(cls, spec: str) -> "TeacherSpec":
        family, sep, rest = spec.partition(":")
        if not sep or family not in ("clip", "dino") or not rest:
            raise TeacherError(f"unknown teacher spec {spec!r}: expected clip:ARCH[@WEIGHTS] or dino:TIMM_NAME[@WEIGHTS]")
        arch, _, weights = rest.partition("@")
        return cls(family, arch, weights or None)

    def __str__(self) -> str:
        return f"{self.family}:{self.arch}" + (f"@{self.weights}" if self.weights else "")

    @property
    def weights_is_file(self) -> bool:
        return self.weights is not None and (os.sep in self.weights or os.path.exists(self.weights))


@dataclass
class TeacherOutput:
    features: torch.Tensor
    attention: torch.Tensor
    cls: torch.Tensor
    layers: dict[int, torch.Tensor] = field(default_factory=dict)


def state_dict_sha256(module: nn.Module) -> str:
    """sha256 over (name, dtype, shape, bytes) of every tensor, in sorted-name order."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")  # 0-d safe
    return h.hexdigest()


def _cls_attention(q: torch.Tensor, k: torch.Tensor, scale: float, num_prefix: int) -> torch.Tensor:
    """q, k [B, H, N, D] -> [CLS]->patch attention [B, L] averaged over heads (L = N - prefix)."""
    logits = (q[:, :, :1].float() * scale) @ k.float().transpose(-2, -1)  # [B, H, 1, N]
    return logits.softmax(dim=-1)[:, :, 0, num_prefix:].mean(dim=1)


class Teacher(nn.Module):
    """A frozen teacher; subclasses wrap open_clip or timm. Call `forward(images)`."""

    spec: TeacherSpec
    patch_size: int
    num_prefix_tokens: int
    dim: int
    depth: int  # transformer blocks: --layers counts them 1..depth
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def grid(self) -> int:
        return STUDENT_GRID

    @property
    def input_size(self) -> int:
        return STUDENT_GRID * self.patch_size

    def describe(self) -> dict:
        """The manifest's `teacher` entry (layers added by the caller)."""
        return {
            "spec": str(self.spec), "family": self.spec.family, "arch": self.spec.arch,
            "weights": self.spec.weights, "weights_sha256": self.fingerprint,
            "input_size": self.input_size, "patch_size": self.patch_size, "grid": [self.grid, self.grid],
            "dim": self.dim, "mean": list(self.mean), "std": list(self.std),
        }

    def _finish_init(self, trunk: nn.Module) -> None:
        trunk.eval().requires_grad_(False)
        self.fingerprint = state_dict_sha256(trunk)


def _random_init_warning(spec: TeacherSpec) -> None:
    warnings.warn(
        f"TEACHER {spec} HAS RANDOM WEIGHTS (fixed seed): its targets are meaningless except for "
        "testing. Give weights as SPEC@/path/to/weights.safetensors or SPEC@TAG.",
        stacklevel=3,
    )


class ClipTeacher(Teacher):
    """open_clip vision tower. Only `model.visual` is kept; the text tower is dropped."""

    def __init__(self, spec: TeacherSpec):
        super().__init__()
        import open_clip

        if spec.arch not in open_clip.list_models():
            raise TeacherError(f"unknown open_clip architecture {spec.arch!r} in teacher spec {spec}")
        cfg = open_clip.get_model_config(spec.arch)
        patch = cfg["vision_cfg"].get("patch_size")
        if not isinstance(patch, int):
            raise TeacherError(f"teacher {spec}: only ViT vision towers are supported")
        if spec.weights is None:
            _random_init_warning(spec)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            try:
                model = open_clip.create_model(
                    spec.arch, pretrained=spec.weights, force_image_size=STUDENT_GRID * patch, device="cpu"
                )
            except (RuntimeError, KeyError) as e:
                raise TeacherError(f"teacher weights {spec.weights!r} do not fit {spec.arch}: {_first_line(e)}") from e
        self.spec, self.patch_size, self.num_prefix_tokens = spec, patch, 1
        self.visual = model.visual
        self.dim = self.visual.ln_post.normalized_shape[0]
        self.depth = len(self.visual.transformer.resblocks)
        mean = getattr(self.visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN
        std = getattr(self.visual, "image_std", None) or open_clip.OPENAI_DATASET_STD
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self._finish_init(self.visual)

    @torch.no_grad()
    def forward(self, images: torch.Tensor, layers: tuple[int, ...] = ()) -> TeacherOutput:
        """images [B, 3, S, S] normalised -> TeacherOutput (see module docstring)."""
        blocks = self.visual.transformer.resblocks
        captured: dict[str, torch.Tensor] = {}
        # The last block calls its nn.MultiheadAttention on ln_1(x): capture that input.
        hook = blocks[-1].attn.register_forward_pre_hook(_capture_input(captured))
        try:
            out = self.visual.forward_intermediates(
                images, indices=None, intermediates_only=True, output_fmt="NLC", output_extra_tokens=True
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
        attention = _cls_attention(q, k, (C // H) ** -0.5, 1)
        extra = {i: out["image_intermediates"][i - 1] for i in layers}
        return TeacherOutput(normed[:, 1:], attention, normed[:, 0], extra)


class TimmTeacher(Teacher):
    """A timm VisionTransformer (DINO and relatives) at the student's grid."""

    def __init__(self, spec: TeacherSpec):
        super().__init__()
        import timm

        base = spec.arch.split(".")[0]
        if base not in timm.list_models():
            raise TeacherError(f"unknown timm architecture {spec.arch!r} in teacher spec {spec}")
        with torch.device("meta"):  # only to read the patch size; draws no random numbers
            patch = timm.create_model(base, pretrained=False, num_classes=0).patch_embed.patch_size[0]
        kwargs: dict = dict(num_classes=0, img_size=STUDENT_GRID * patch)
        name = spec.arch
        if spec.weights is None:
            _random_init_warning(spec)
            kwargs["pretrained"] = False
        elif spec.weights_is_file:
            # Built empty, then loaded strictly by us: timm's own pretrained path only warns
            # about keys that do not fit, which would give silently random targets.
            kwargs["pretrained"] = False
        else:
            name, kwargs["pretrained"] = f"{base}.{spec.weights}", True
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            try:
                model = timm.create_model(name, **kwargs)
            except (RuntimeError, KeyError) as e:
                raise TeacherError(f"teacher weights {spec.weights!r} do not fit {spec.arch}: {_first_line(e)}") from e
        if spec.weights_is_file:
            _load_timm_file(model, spec)
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

    @torch.no_grad()
    def forward(self, images: torch.Tensor, layers: tuple[int, ...] = ()) -> TeacherOutput:
        """images [B, 3, S, S] normalised -> TeacherOutput (see module docstring)."""
        attn_mod = self.model.blocks[-1].attn
        captured: dict[str, torch.Tensor] = {}
        hook = attn_mod.register_forward_pre_hook(_capture_input(captured))
        try:
            final, inter = self.model.forward_intermediates(
                images, indices=None, norm=False, output_fmt="NLC", return_prefix_tokens=False
            )
        finally:
            hook.remove()
        x = captured["x"]
        B, N, _ = x.shape
        qkv = attn_mod.qkv(x).reshape(B, N, 3, attn_mod.num_heads, attn_mod.head_dim).permute(2, 0, 3, 1, 4)
        q, k = attn_mod.q_norm(qkv[0]), attn_mod.k_norm(qkv[1])
        p = self.num_prefix_tokens
        attention = _cls_attention(q, k, attn_mod.scale, p)
        extra = {i: inter[i - 1] for i in layers}
        return TeacherOutput(final[:, p:], attention, final[:, 0], extra)


def _load_timm_file(model: nn.Module, spec: TeacherSpec) -> None:
    """Strictly load a local .safetensors (or .pth/.bin, weights_only) file into a timm model."""
    import importlib

    from safetensors.torch import load_file

    path = spec.weights
    try:
        if path.endswith(".safetensors"):
            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            state = state.get("model", state.get("state_dict", state)) if isinstance(state, dict) else state
        # timm's per-family filter converts original checkpoints (e.g. DINO's) and resizes
        # position embeddings to the student grid.
        family = importlib.import_module(type(model).__module__)
        if hasattr(family, "checkpoint_filter_fn"):
            state = family.checkpoint_filter_fn(state, model)
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
        model.load_state_dict(state, strict=True)
    except Exception as e:
        raise TeacherError(f"teacher weights {path} do not fit {spec.arch}: {_first_line(e)}") from e


def _capture_input(store: dict[str, torch.Tensor]):
    """A forward pre-hook that keeps the module's first input (and changes nothing)."""

    def hook(module: nn.Module, args: tuple) -> None:
        store["x"] = args[0]

    return hook


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


def build_teacher(spec: str | TeacherSpec) -> Teacher:
    """Build a frozen teacher from a spec string; raises TeacherError with one clear line."""
    spec = TeacherSpec.parse(spec) if isinstance(spec, str) else spec
    if spec.weights_is_file and not os.path.isfile(spec.weights):
        raise TeacherError(f"teacher weights file not found: {spec.weights}")
    teacher = ClipTeacher(spec) if spec.family == "clip" else TimmTeacher(spec)
    return teacher.eval()

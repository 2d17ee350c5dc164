"""What every teacher kind shares: the spec, the output, the `Teacher` base class, the kind
registry (`register_teacher`), and the strict loading of a local weights file.

A spec is `KIND:ARCH[@WEIGHTS]`, where KIND names a registered teacher kind (`clip`, `dino`,
one file each beside this one) and WEIGHTS is a local file or a pretrained tag. Every
teacher returns, per view:

- `features` [B, L, C]: last-layer patch tokens (CLIP: after `ln_post`, before the
  projection; timm: after the final norm),
- `attention` [B, L]: the last block's [CLS]->patch attention, averaged over heads,
  recomputed from that block's q and k (fused attention never materialises it),
- `cls` [B, C]: the [CLS] token under the same final norm.

The input size is chosen so the token grid matches the student's (14 x 14): a /16
teacher sees 224 px, a /14 teacher 196 px.
"""

from __future__ import annotations

import difflib
import hashlib
import os
import re
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from mrmae.shared.errors import MrmaeError

STUDENT_GRID = 14


class TeacherError(MrmaeError, ValueError):
    """A spec that names no known teacher, or weights that do not fit it."""


@dataclass(frozen=True)
class TeacherSpec:
    family: str  # a registered teacher kind (`teacher_kinds()`): "clip", "dino", ...
    arch: str
    weights: str | None = None

    @classmethod
    def parse(cls, spec: str) -> "TeacherSpec":
        family, sep, rest = spec.partition(":")
        if not sep or family not in _KINDS or not rest:
            usages = " or ".join(k.usage for k in _KINDS.values())
            near = difflib.get_close_matches(family, list(_KINDS), n=1) if sep and family not in _KINDS else []
            hint = f" (did you mean {near[0]}:{rest}?)" if near else ""
            raise TeacherError(f"unknown teacher spec {spec!r}: expected {usages}{hint}")
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


def state_dict_sha256(module: nn.Module) -> str:
    """sha256 over (name, dtype, shape, bytes) of every tensor, in sorted-name order."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")  # 0-d safe
    return h.hexdigest()


def cls_attention(q: torch.Tensor, k: torch.Tensor, scale: float, num_prefix: int) -> torch.Tensor:
    """q, k [B, H, N, D] -> [CLS]->patch attention [B, L] averaged over heads (L = N - prefix)."""
    logits = (q[:, :, :1].float() * scale) @ k.float().transpose(-2, -1)  # [B, H, 1, N]
    return logits.softmax(dim=-1)[:, :, 0, num_prefix:].mean(dim=1)


class Teacher(nn.Module):
    """A frozen teacher. A kind subclasses it, is built as `Kind(spec)` (raising TeacherError,
    one line, for an architecture or weights it cannot use), sets the attributes below and
    calls `_finish_init(trunk)`, and implements `forward(images [B, 3, S, S] normalised) ->
    TeacherOutput` (see the module docstring) under `torch.no_grad()`."""

    kind: str  # set by register_teacher
    usage: str  # the spec's form, for messages: "clip:ARCH[@WEIGHTS]"
    small_arch: str | None  # a small architecture of the kind (tests build one per registered kind)
    spec: TeacherSpec
    patch_size: int
    num_prefix_tokens: int
    dim: int
    depth: int  # transformer blocks
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def grid(self) -> int:
        return STUDENT_GRID

    @property
    def input_size(self) -> int:
        return STUDENT_GRID * self.patch_size

    def describe(self) -> dict:
        """The manifest's `teacher` entry."""
        return {
            "spec": str(self.spec), "family": self.spec.family, "arch": self.spec.arch,
            "weights": self.spec.weights, "weights_sha256": self.fingerprint,
            "input_size": self.input_size, "patch_size": self.patch_size, "grid": [self.grid, self.grid],
            "dim": self.dim, "mean": list(self.mean), "std": list(self.std),
        }

    def _finish_init(self, trunk: nn.Module) -> None:
        trunk.eval().requires_grad_(False)
        self.fingerprint = state_dict_sha256(trunk)

    def weights_state(self) -> dict[str, torch.Tensor]:
        """The tensors of a local weights file that `KIND:ARCH@FILE` loads strictly into this
        teacher (`save_weights`, `mrmae save-teacher`)."""
        raise NotImplementedError(f"teacher kind {self.kind} cannot write its weights to a file")


def random_init_warning(spec: TeacherSpec) -> None:
    """mrmae's one warning that a teacher built without weights gives meaningless targets."""
    warnings.warn(
        f"TEACHER {spec} HAS RANDOM WEIGHTS (fixed seed): its targets are meaningless except for "
        "testing. Give weights as SPEC@/path/to/weights.safetensors or SPEC@TAG.",
        stacklevel=3,
    )


def capture_input(store: dict[str, torch.Tensor]):
    """A forward pre-hook that keeps the module's first input (and changes nothing)."""

    def hook(module: nn.Module, args: tuple) -> None:
        store["x"] = args[0]

    return hook


def first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


# --- the kind registry -----------------------------------------------------------------------

_KINDS: dict[str, type[Teacher]] = {}
_KIND_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")


def register_teacher(kind: str, usage: str | None = None, *,
                     small: str | None = None) -> Callable[[type[Teacher]], type[Teacher]]:
    """Class decorator: `@register_teacher("clip", "clip:ARCH[@WEIGHTS]", small="ViT-S-16")`
    makes specs `clip:...` build that Teacher subclass, and caches recording
    `teacher.family = "clip"` readable. `usage` is the spec's form shown when a spec names no
    kind; `small` a small architecture of the kind, what tests iterating the registry build."""

    def register(cls: type[Teacher]) -> type[Teacher]:
        if not (isinstance(cls, type) and issubclass(cls, Teacher)):
            raise TypeError(f"register_teacher({kind!r}): {cls!r} is not a Teacher subclass")
        if not _KIND_NAME.fullmatch(kind):
            raise ValueError(f"teacher kind {kind!r}: lower-case letters, digits and _, starting with a letter")
        known = _KINDS.get(kind)
        if known is not None and (known.__module__, known.__qualname__) != (cls.__module__, cls.__qualname__):
            raise ValueError(f"teacher kind {kind!r} is registered twice: {known.__module__}.{known.__qualname__} "
                             f"and {cls.__module__}.{cls.__qualname__}")
        cls.kind, cls.usage, cls.small_arch = kind, usage or f"{kind}:ARCH[@WEIGHTS]", small
        _KINDS[kind] = cls
        return cls

    return register


def teacher_kinds() -> tuple[str, ...]:
    """The registered kinds, in registration order (the values a manifest's `teacher.family` may take)."""
    return tuple(_KINDS)


def teacher_class(kind: str) -> type[Teacher]:
    """The Teacher subclass registered as `kind`; TeacherError naming the known kinds."""
    if kind not in _KINDS:
        raise TeacherError(f"unknown teacher kind {kind!r}; known: {', '.join(_KINDS)}")
    return _KINDS[kind]


def load_weights_file(path: str, arch: str) -> dict[str, torch.Tensor]:
    """The tensors of a local weights file: .safetensors, else a torch file read with
    `weights_only=True` (nothing unpickled), unwrapped from a `model` / `state_dict` entry.
    TeacherError naming the file when it cannot be read as tensors."""
    from safetensors.torch import load_file

    try:
        if path.endswith(".safetensors"):
            return load_file(path)
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise TeacherError(f"teacher weights {path} do not fit {arch}: {first_line(e)}") from e
    if isinstance(state, dict):
        state = state.get("model", state.get("state_dict", state))
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise TeacherError(f"teacher weights {path} do not fit {arch}: not a dict of tensors")
    return state


def save_weights(teacher: Teacher, out_dir: str) -> tuple[str, str]:
    """Write `teacher`'s weights to OUT_DIR/KIND-ARCH-TAG.safetensors (safetensors, written
    under a temporary name and renamed; an existing file is refused, never replaced) ->
    (the file, the spec that loads it: `KIND:ARCH@FILE`)."""
    from safetensors.torch import save_file

    spec = teacher.spec
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{spec.family}-{spec.arch}-{spec.weights or 'random'}")
    path = os.path.join(out_dir, f"{name}.safetensors")
    if os.path.lexists(path):
        raise TeacherError(f"{path}: exists; remove it or give another --out")
    os.makedirs(out_dir, exist_ok=True)
    tmp = os.path.join(out_dir, f".{name}.{os.getpid()}.tmp")
    state = {k: v.detach().cpu().contiguous() for k, v in teacher.weights_state().items()}
    try:
        save_file(state, tmp, metadata={"mrmae_teacher": str(spec), "weights_sha256": teacher.fingerprint})
        os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)
    return path, f"{spec.family}:{spec.arch}@{path}"


def build_teacher(spec: str | TeacherSpec) -> Teacher:
    """Build a frozen teacher from a spec string; raises TeacherError with one clear line."""
    spec = TeacherSpec.parse(spec) if isinstance(spec, str) else spec
    if spec.weights_is_file and not os.path.isfile(spec.weights):
        raise TeacherError(f"teacher weights file not found: {spec.weights}")
    return teacher_class(spec.family)(spec).eval()

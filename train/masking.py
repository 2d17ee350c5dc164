"""Which patch tokens the student encoder sees: the registry of masking strategies and
what they share.

A masking strategy is one module of `mrmae.train.masks` (random.py: MAE's uniform masking,
focused.py: attention-focused masking, ...): a function registered with `@register_mask`,

    @register_mask("name", needs_attention=False, options=(MaskOption(...), ...))
    def draw(noise, mask_ratio, attention, **options) -> Masks

noise [B, N] float32 uniform in [0, 1): the step's only randomness for these B rows (the
engine draws one tensor per global batch and gives each process its rows, so a row's mask
depends on its place in the global batch, not on the process count); attention [B, N]
(the teacher's [CLS]->patch attention, on the CPU) when the strategy `needs_attention`,
else None; `options` the strategy's declared options (`MaskOption`; `--mask-option
NAME=VALUE` on the command line). A row's mask must be a function of its noise row (and
attention row) alone. Every module of the package is imported when the registry is first
asked (`mask_strategies`), and so is every installed plug-in's (entry-point group
`mrmae.masks`), so a new strategy is one new file: `mrmae pretrain --mask NAME` (with a flag
for each option whose `MaskOption.flag` names one), `mrmae visualize`, `mrmae report` and the
run's config.json pick it up.

Every strategy returns the same triple, on the device of its inputs:

    ids_keep     [B, n_keep] long   indices of the visible tokens, sorted ascending per row
    mask         [B, N]      bool   True = masked (hidden from the encoder), False = visible
    ids_restore  [B, N]      long   unshuffle index: a sequence laid out as
                                    cat(visible tokens in ids_keep order, masked tokens in
                                    ascending index order) is put back into patch order by
                                    seq.gather(1, ids_restore) (what the decoder does)

n_keep = int(N * (1 - mask_ratio)) (MAE's rule: ratio 0.75 keeps 49 of 196), computed
with a 1e-9 guard against float round-off (1 - 0.7 = 0.30000000000000004 is fine, but
10 * (1 - 0.9) = 0.9999999999999998 would give 0). Masking is drawn outside the model so
that the same masks can be replayed in cached, live and plain modes.

Hybrid (ConvViT) students draw the same token mask; `blockwise_visible_maps` blows it up
to the higher-resolution grids of their convolution stages.
"""

from __future__ import annotations

import math
import importlib
import pkgutil
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch

from mrmae.shared.plugins import load_plugins

Masks = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
STRATEGIES_PACKAGE = "mrmae.train.masks"


def num_visible(num_tokens: int, mask_ratio: float) -> int:
    """Number of visible tokens for `mask_ratio` in [0, 1); at least 1."""
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    return max(1, int(num_tokens * (1.0 - mask_ratio) + 1e-9))


def masks_from_keep(ids_keep: torch.Tensor, num_tokens: int) -> Masks:
    """Visible indices ids_keep [B, n_keep] (any order, no duplicates) -> the triple.

    The returned ids_keep is sorted ascending; the masked tokens follow in ascending order
    in the shuffled layout that ids_restore undoes.
    """
    if ids_keep.ndim != 2:
        raise ValueError(f"ids_keep must be [B, n_keep], got {tuple(ids_keep.shape)}")
    batch, n_keep = ids_keep.shape
    mask = torch.ones(batch, num_tokens, dtype=torch.bool, device=ids_keep.device)
    mask.scatter_(1, ids_keep.long(), False)
    if int((~mask).sum()) != batch * n_keep:
        raise ValueError("ids_keep has duplicate indices in a row")
    # Stable sort of 0 (visible) before 1 (masked) keeps ascending index order in each group.
    ids_shuffle = torch.sort(mask.to(torch.uint8), dim=1, stable=True).indices
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    return ids_shuffle[:, :n_keep].contiguous(), mask, ids_restore


def blockwise_visible_maps(mask: torch.Tensor, scales: Sequence[int] = (4, 2)) -> tuple[torch.Tensor, ...]:
    """Block-wise multi-scale masking (ConvMAE): one token mask at every stage resolution.

    mask [B, N] bool (True = masked) on a square g x g token grid (N = g * g, row-major as
    in patchify) -> for each scale s in `scales`, a visible map [B, 1, g*s, g*s] float32
    (1 = visible, 0 = masked) in which token (r, c) covers exactly the s x s block of rows
    r*s .. r*s+s-1 and columns c*s .. c*s+s-1. The default (4, 2) gives the 56x56 and 28x28
    maps of a 224-px ConvViT's stages 1 and 2 (scale 16 gives the pixel map). Every stage
    thus hides the same image region, which keeps the visible fraction 1 - N_masked / N at
    every scale, and a block never straddles a visible and a masked token.
    """
    if mask.ndim != 2:
        raise ValueError(f"mask must be [B, N], got {tuple(mask.shape)}")
    b, n = mask.shape
    g = math.isqrt(n)
    if g * g != n:
        raise ValueError(f"{n} tokens do not form a square grid")
    visible = (~mask.bool()).float().reshape(b, 1, g, g)
    return tuple(visible.repeat_interleave(s, dim=2).repeat_interleave(s, dim=3) for s in scales)


# --- the registry ------------------------------------------------------------------------------

@dataclass(frozen=True)
class MaskOption:
    """A number a strategy's draw takes as a keyword argument (`name`), with its default,
    its valid range ([low, high], or (low, high] with low_open), the short `label` a
    report shows it under when it is not the default, and the command-line `flag` that
    sets it when it has one of its own (focused masking's); others are set with
    `--mask-option NAME=VALUE`."""

    name: str
    default: float
    help: str
    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    label: str = ""
    flag: str | None = None


@dataclass(frozen=True)
class MaskStrategy:
    """A registered masking strategy (module docstring); call it to draw."""

    name: str
    draw: Callable[..., Masks]
    needs_attention: bool
    options: tuple[MaskOption, ...]
    help: str  # the first line of the draw function's docstring

    def resolve(self, given: Mapping[str, float] | None = None) -> dict[str, float]:
        """This strategy's options: the defaults, overridden by those in `given` (other
        strategies' options there are ignored, so one mapping serves every strategy)."""
        given = given or {}
        return {o.name: float(given.get(o.name, o.default)) for o in self.options}

    def __call__(self, noise: torch.Tensor, mask_ratio: float, attention: torch.Tensor | None = None,
                 options: Mapping[str, float] | None = None) -> Masks:
        """noise [B, N], attention [B, N] or None -> (ids_keep [B, n_keep], mask [B, N], ids_restore [B, N])."""
        if self.needs_attention and attention is None:
            raise ValueError(f"{self.name} masking needs teacher attention: give --feature-cache or --teacher")
        return self.draw(noise, mask_ratio, attention if self.needs_attention else None, **self.resolve(options))


_REGISTRY: dict[str, MaskStrategy] = {}
_LOADED = False


def register_mask(name: str, *, needs_attention: bool = False,
                  options: Sequence[MaskOption] = ()) -> Callable[[Callable[..., Masks]], Callable[..., Masks]]:
    """Decorator: register `draw(noise, mask_ratio, attention, **options) -> Masks` as
    masking strategy `name` (module docstring). A name registered twice is an error."""
    def add(draw: Callable[..., Masks]) -> Callable[..., Masks]:
        if name in _REGISTRY and _REGISTRY[name].draw is not draw:
            raise ValueError(f"masking strategy {name!r} is registered twice ({_REGISTRY[name].draw.__module__} "
                             f"and {draw.__module__})")
        doc = (draw.__doc__ or name).strip().splitlines()[0]
        _REGISTRY[name] = MaskStrategy(name, draw, needs_attention, tuple(options), doc)
        return draw
    return add


def mask_strategies() -> dict[str, MaskStrategy]:
    """Every registered strategy by name, after importing each module of `mrmae.train.masks`
    once (registration is the import's side effect)."""
    global _LOADED
    if not _LOADED:
        package = importlib.import_module(STRATEGIES_PACKAGE)
        for module in sorted(m.name for m in pkgutil.iter_modules(package.__path__)):
            if not module.startswith("_"):
                importlib.import_module(f"{STRATEGIES_PACKAGE}.{module}")
        load_plugins("mrmae.masks")  # strategies installed outside mrmae (shared/plugins.py)
        _LOADED = True
    return dict(_REGISTRY)


def flagged_mask_options() -> list[MaskOption]:
    """The strategies' options that their registration gives a command-line flag of their own
    (`MaskOption.flag`: focused masking's --focus-temperature, ...), each once, by flag."""
    return list({o.flag: o for s in mask_strategies().values() for o in s.options if o.flag}.values())


def mask_names() -> list[str]:
    """The registered strategies' names, sorted (what `--mask` accepts)."""
    return sorted(mask_strategies())


def get_mask(name: str) -> MaskStrategy:
    """The strategy registered as `name`; ValueError naming the known ones otherwise."""
    strategies = mask_strategies()
    if name not in strategies:
        raise ValueError(f"unknown masking strategy {name!r}; known: {', '.join(sorted(strategies))}")
    return strategies[name]


def all_mask_options() -> dict[str, MaskOption]:
    """Every registered strategy's options by name (an option name belongs to one strategy)."""
    return {o.name: o for s in mask_strategies().values() for o in s.options}


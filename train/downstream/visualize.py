"""`mrmae visualize`: a PNG grid of cached views, teacher attention, masks and reconstructions.

One row per sample, one column per panel, each panel S x S pixels (S = the cache's view
size, 224 by default):

    view | teacher [CLS] attention | focused mask | random mask | [other masks] | [reconstruction]

- view: replayed from the source image with the cached crop and flip (the render
  pretraining uses), so it is exactly what the teacher and the student saw;
- attention: the cached [CLS]->patch attention, min-max scaled, as a colour map blended
  over the view;
- masks: one draw of each registered masking strategy (train/masks/; focused and random
  first, the others by name, each with the run's options); masked patches grey, visible
  ones as they are;
- reconstruction (with --checkpoint): MAE's picture. Visible patches are the input, masked
  patches are the decoder's prediction; with norm-pix targets the prediction is mapped
  back to pixels with each patch's true mean and std (as MAE's own visualisation does).
  The mask is the draw shown in the column of the mask kind the run trained with.

Layout (PAD = 8, HEADER = 24): width = PAD + cols * (S + PAD), height = HEADER + rows * (S + PAD).
Drawn with PIL only (no matplotlib dependency).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from mrmae.shared.shards import expand_urls, first_copies, iter_samples
from mrmae.shared import cache_format as cf
from mrmae.shared.errors import OptionError
from mrmae.shared.outfiles import write_file
from mrmae.shared.views import View, ViewError, decode_image, normalize, render_view_uint8
from mrmae.shared.views import IMAGENET_MEAN, IMAGENET_STD
from mrmae.train.masking import MaskStrategy, mask_strategies

PAD, HEADER = 8, 24
FIRST_MASKS = ("focused", "random")  # the paper's two, in the columns (and draw order) they have always had
GREY = 110
# A dark-blue -> cyan -> yellow -> red colour map as (position, RGB) control points.
_CMAP = np.array([[0.0, 20, 20, 90], [0.35, 30, 150, 200], [0.65, 240, 220, 60], [1.0, 210, 30, 30]])


def canvas_size(rows: int, cols: int, cell: int) -> tuple[int, int]:
    """(width, height) in pixels of a grid of rows x cols panels of cell x cell pixels."""
    return PAD + cols * (cell + PAD), HEADER + rows * (cell + PAD)


def heat_overlay(view: np.ndarray, attention: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    """view uint8 [S, S, 3], attention [g*g] -> uint8 [S, S, 3]: colour-mapped attention over the view."""
    g = int(round(attention.size ** 0.5))
    a = attention.reshape(g, g).astype(np.float32)
    a = (a - a.min()) / max(float(a.max() - a.min()), 1e-12)
    s = view.shape[0]
    a = np.asarray(Image.fromarray(a).resize((s, s), Image.Resampling.BILINEAR)).clip(0, 1)
    rgb = np.stack([np.interp(a, _CMAP[:, 0], _CMAP[:, c]) for c in (1, 2, 3)], axis=-1)
    return (alpha * rgb + (1 - alpha) * view).round().astype(np.uint8)


def masked_picture(view: np.ndarray, mask: torch.Tensor) -> np.ndarray:
    """view uint8 [S, S, 3], mask [g*g] bool (True = masked) -> the view with masked patches grey."""
    g = int(round(mask.numel() ** 0.5))
    p = view.shape[0] // g
    m = mask.reshape(g, g).numpy().repeat(p, 0).repeat(p, 1)
    out = view.copy()
    out[: g * p, : g * p][m] = GREY
    return out


@torch.no_grad()
def reconstruction(model: torch.nn.Module, view: np.ndarray, ids_keep: torch.Tensor, ids_restore: torch.Tensor,
                   mask: torch.Tensor) -> np.ndarray:
    """view uint8 [S, S, 3], ids_keep [1, n], ids_restore [1, N], mask [1, N] -> uint8 [S, S, 3]:
    visible patches from the input, masked patches from the decoder (un-normalised per patch)."""
    device = next(model.parameters()).device
    pixels = normalize(torch.from_numpy(view).permute(2, 0, 1), IMAGENET_MEAN, IMAGENET_STD)[None]
    latent, _ = model.forward_encoder(pixels.to(device), ids_keep.to(device))
    pred = model.forward_decoder(latent, ids_restore.to(device)).float().cpu()  # [1, N, P]
    patches = model.patchify(pixels)  # [1, N, P]
    if model.cfg.norm_pix_loss:  # the decoder predicts (patch - mean) / std: undo with the true stats
        mean, var = patches.mean(-1, keepdim=True), patches.var(-1, keepdim=True)
        pred = pred * (var + 1e-6).sqrt() + mean
    merged = torch.where(mask[..., None], pred, patches)
    img = model.unpatchify(merged)[0]
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    img = ((img * std + mean) * 255).round().clamp(0, 255).to(torch.uint8)
    return img.permute(1, 2, 0).numpy()


def _has_row(group, key: str, view: int) -> bool:
    try:
        group.row(key, view)
    except cf.CacheError:
        return False
    return True


def _samples(cache: cf.FeatureCache, shards: str, view_index: int, num: int):
    """Yield (key, uint8 view [S, S, 3], attention [L]) of the first `num` cached samples of `shards`."""
    size = cache.manifest.views.output_size
    found = 0
    for url in expand_urls(shards):
        group = cache.shard(url)  # one line naming the shard when it is not in the cache
        skipped = {s.key for s in group.entry.skipped}
        for s in first_copies(iter_samples(url)):  # streamed: a few rows need not read a whole shard
            key, image = s.key, s.image
            if image is None or (key in skipped and not _has_row(group, key, view_index)):
                continue  # no rows: skipped at extraction (a repeated key's first copy has them)
            t = group.get(key, view_index)
            # the image its view was rendered from (a cache without per-row digests: not checked)
            cf.check_image(url, key, image, group.image_digest(group.row(key, view_index)), str(cache.root))
            try:
                view = render_view_uint8(decode_image(image), View(*t.crop, flip=t.flip), size)
            except ViewError as e:  # the cached box does not fit its image: damage, or another image
                raise cf.CacheError(f"{group.path}: key {key}: cached {e}; run `mrmae cache verify`") from None
            yield key, view.permute(1, 2, 0).numpy(), t.attention
            found += 1
            if found == num:
                return


def mask_columns() -> list[MaskStrategy]:
    """The registered strategies in column order: FIRST_MASKS, then the others by name."""
    registry = mask_strategies()
    names = [n for n in FIRST_MASKS if n in registry] + sorted(set(registry) - set(FIRST_MASKS))
    return [registry[n] for n in names]


def render_grid(feature_cache: str, shards: str, out: str | Path, checkpoint: str | None = None, num: int = 4,
                view_index: int = 0, mask_ratio: float | None = None, seed: int = 0, device: str = "cpu",
                progress: bool = False, checkpoint_format: str = "auto") -> Path:
    """Draw the figure (module docstring) for the first `num` samples and write it as PNG to
    `out`; the student's reconstructions run on `device`; `progress`: a bar on stderr, in
    steps (a view replayed, a reconstruction), closed before an error is raised."""
    import contextlib

    from tqdm import tqdm

    with contextlib.ExitStack() as stack:  # the bar starts with the work and is closed before any error shows
        def new_bar(total: int) -> tqdm:
            return stack.enter_context(tqdm(total=total, desc="visualize", unit="step", disable=not progress,
                                            dynamic_ncols=True))
        return _render_grid(feature_cache, shards, out, checkpoint, num, view_index, mask_ratio, seed, device,
                            new_bar, checkpoint_format)


def _render_grid(feature_cache: str, shards: str, out: str | Path, checkpoint: str | None, num: int,
                 view_index: int, mask_ratio: float | None, seed: int, device: str, new_bar,
                 checkpoint_format: str = "auto") -> Path:
    if "://" not in str(feature_cache) and Path(out).resolve().is_relative_to(Path(feature_cache).resolve()):
        raise OptionError(f"--out {Path(out).parent}: inside the cache {feature_cache}, whose files it would "
                          "replace; write the picture elsewhere")
    cache = cf.FeatureCache(feature_cache)
    model, train_mask, mask_options = None, "random", {}
    if checkpoint is not None:
        from mrmae.train.restore import load_student

        restored = load_student(checkpoint, checkpoint_format)
        model = restored.model.to(device)
        if restored.run_config is not None:
            opts = restored.run_config.step
            train_mask = opts.mask or "random"
            mask_options = opts.mask_options  # (older runs: focused's options in step_options itself)
            mask_ratio = opts.mask_ratio if mask_ratio is None else mask_ratio
    mask_ratio = 0.75 if mask_ratio is None else mask_ratio
    strategies = mask_columns()
    bar = new_bar(num * (2 if model is not None else 1))
    rows = []
    for row in _samples(cache, shards, view_index, num):
        rows.append(row)
        bar.update()
    bar.total = len(rows) * (2 if model is not None else 1)  # (fewer samples than --num: the first pass is done)
    if not rows:
        raise FileNotFoundError(f"no cached samples in {shards}")
    cell = rows[0][1].shape[0]
    if model is not None and (model.cfg.img_size, model.num_patches) != (cell, rows[0][2].size):
        raise cf.CacheError(f"the checkpoint's {model.cfg.img_size} px / {model.num_patches} tokens do not fit the "
                            f"cache's {cell} px views with {rows[0][2].size} attention tokens")
    titles = ["view", "teacher [CLS] attention", *(f"{s.name} mask {mask_ratio:.0%}" for s in strategies)]
    shown = train_mask if any(s.name == train_mask for s in strategies) else "random"  # (a strategy since removed)
    if model is not None:
        titles.append(f"reconstruction ({shown} mask)")
    canvas = Image.new("RGB", canvas_size(len(rows), len(titles), cell), "white")
    draw = ImageDraw.Draw(canvas)
    for c, title in enumerate(titles):
        draw.text((PAD + c * (cell + PAD), 6), title, fill="black")
    gen = torch.Generator().manual_seed(seed)
    for r, (key, view, attention) in enumerate(rows):
        att = torch.from_numpy(np.asarray(attention, dtype=np.float32))[None]
        draws = {s.name: s(torch.rand(att.shape, generator=gen), mask_ratio, att, mask_options) for s in strategies}
        panels = [view, heat_overlay(view, att[0].numpy()), *(masked_picture(view, d[1][0]) for d in draws.values())]
        if model is not None:
            ids_keep, mask, ids_restore = draws[shown]
            panels.append(reconstruction(model, view, ids_keep, ids_restore, mask))
            bar.update()
        y = HEADER + r * (cell + PAD)
        for c, panel in enumerate(panels):
            canvas.paste(Image.fromarray(panel), (PAD + c * (cell + PAD), y))
        draw.text((PAD + 4, y + 4), key, fill="white", stroke_width=1, stroke_fill="black")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    png = io.BytesIO()
    canvas.save(png, format="PNG")
    write_file(out, png.getvalue())  # never through a link; a full disk: an OSError naming `out`
    return out

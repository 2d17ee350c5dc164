"""An independent checker: zarr, tarfile, torchvision and open_clip alone, no mrmae code.

It reads the store as a stranger would, from CACHE_FORMAT.md: the manifest, a shard's
group, its rows; decodes the source JPEG from the tar, renders the stored crop/flip with
torchvision, runs open_clip from the same weights file, and compares token by token.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import open_clip
import torch
import zarr
from PIL import Image
from safetensors.torch import save_file
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF


def _clip_tokens(model, x: torch.Tensor) -> torch.Tensor:
    """Last-layer patch tokens after ln_post, before the projection."""
    v = model.visual
    out = v.forward_intermediates(x, intermediates_only=True, output_fmt="NLC", output_extra_tokens=True)
    last = torch.cat([out["image_intermediates_prefix"][-1], out["image_intermediates"][-1]], dim=1)
    return v.ln_post(last)[:, 1:]


def test_independent_checker_agrees_with_the_cache(demo_shards, tmp_path):
    torch.manual_seed(123)
    model = open_clip.create_model("ViT-S-16", pretrained=None)
    weights = tmp_path / "clip-s16.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    cache = tmp_path / "cache"
    subprocess.run([sys.executable, "-m", "mrmae", "extract-features", "--shards", str(demo_shards[1]),
                    "--feature-cache", str(cache), "--teacher", f"clip:ViT-S-16@{weights}", "--views", "2",
                    "--dtype", "int8", "--batch-size", "5", "--no-progress"], check=True, capture_output=True)

    manifest = json.loads((cache / "manifest.json").read_text())
    teacher = manifest["teacher"]
    # one input shard, one entry beside its group (every shards/*.json but the group's own zarr.json)
    (entry_file,) = [p for p in (cache / "shards").glob("*.json") if p.name != "zarr.json"]
    entry = json.loads(entry_file.read_text())
    group = zarr.open_group(str(cache / entry["group"]), mode="r")
    keys = [str(k) for k in group["keys"][:]]
    # int8 x float16 scale, one scale per `storage.int8_group` channels of a token (CACHE_FORMAT.md)
    values, scale = group["features"][:].astype(np.float32), group["features_scale"][:].astype(np.float32)
    per = manifest["storage"]["int8_group"]
    assert scale.shape == values.shape[:-1] + (values.shape[-1] // per,)
    features = (values.reshape(*scale.shape, per) * scale[..., None]).reshape(values.shape)
    with tarfile.open(entry["source"]) as tf:
        jpgs = {Path(m.name).stem: tf.extractfile(m).read() for m in tf.getmembers() if m.name.endswith(".jpg")}

    checker = open_clip.create_model("ViT-S-16", pretrained=str(weights)).eval()
    mean = torch.tensor(teacher["mean"]).view(3, 1, 1)
    std = torch.tensor(teacher["std"]).view(3, 1, 1)
    size = teacher["input_size"]
    images = []
    for row, key in enumerate(keys):
        top, left, h, w = (int(c) for c in group["crop"][row])
        img = torch.from_numpy(np.asarray(Image.open(io.BytesIO(jpgs[key])).convert("RGB")).copy()).permute(2, 0, 1)
        view = TF.resized_crop(img, top, left, h, w, [size, size], interpolation=InterpolationMode.BICUBIC,
                               antialias=True)
        if bool(group["flip"][row]):
            view = TF.horizontal_flip(view)
        images.append((view.float() / 255 - mean) / std)
    with torch.no_grad():
        live = _clip_tokens(checker, torch.stack(images))
    cos = torch.nn.functional.cosine_similarity(live, torch.from_numpy(features), dim=-1)
    assert len(keys) == 12 and cos.min().item() >= 0.999, cos.min().item()
    # and the stored geometry is really used: a wrong flip no longer matches
    with torch.no_grad():
        wrong = _clip_tokens(checker, torch.stack(images[:2]).flip(-1))
    assert torch.nn.functional.cosine_similarity(wrong, torch.from_numpy(features[:2]), dim=-1).mean() < 0.99

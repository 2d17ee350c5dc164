"""`mrmae export`: the encoder loads strictly into timm and gives the student's features."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from _tiny_student import save_tiny_student
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mrmae.cli import cli
from mrmae.train.restore import encode_all_tokens, load_student


def _timm_model(path, name, kwargs):
    return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path), num_classes=0),
                             **kwargs).eval()


def test_exported_encoder_gives_the_students_features_in_timm(tmp_path):
    model = save_tiny_student(tmp_path / "run")
    out = tmp_path / "encoder.safetensors"
    r = CliRunner().invoke(cli, ["export", "--checkpoint", str(tmp_path / "run"), "--out", str(out)])
    assert r.exit_code == 0, r.output + repr(r.exception)
    assert "timm model: vit_tiny_patch16_224" in r.output and "load with: timm.create_model(" in r.output
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    name, kwargs = meta["timm_model"], json.loads(meta["timm_kwargs"])
    assert kwargs["num_classes"] == 0 and kwargs["global_pool"] == "token"
    assert not any(k.startswith(("decoder", "mask_token", "mimic_head", "head")) for k in load_file(str(out)))

    vit = _timm_model(out, name, kwargs)
    x = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = encode_all_tokens(model, x), vit.forward_features(x)
        pooled = vit.forward_head(theirs)
    assert theirs.shape == (3, 197, 192)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
    torch.testing.assert_close(pooled, ours[:, 0], atol=1e-5, rtol=0)  # global_pool='token': the [CLS] token
    # the loaded student (from the run dir) is the model that was saved
    torch.testing.assert_close(encode_all_tokens(load_student(tmp_path / "run").model, x), ours, atol=0, rtol=0)

    # the load is strict: a file lacking a tensor is refused, not silently half-loaded
    partial = {k: v for k, v in load_file(str(out)).items() if k != "blocks.3.mlp.fc1.bias"}
    save_file(partial, str(tmp_path / "partial.safetensors"))
    with pytest.raises(RuntimeError, match="blocks.3.mlp.fc1.bias"):
        _timm_model(tmp_path / "partial.safetensors", name, kwargs)


def test_fused_student_is_refused_in_one_line(tmp_path):
    save_tiny_student(tmp_path / "run", fuse_layers=(4, 8, 12))
    r = CliRunner().invoke(cli, ["export", "--checkpoint", str(tmp_path / "run" / "checkpoints" / "step00000001"),
                                 "--out", str(tmp_path / "e.safetensors")])
    lines = r.output.strip().splitlines()
    assert r.exit_code == 1 and len(lines) == 1, r.output
    assert lines[0].startswith("mrmae: error: this student fuses blocks 4,8,12")
    assert not (tmp_path / "e.safetensors").exists()

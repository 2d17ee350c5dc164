"""`mrmae export`: every student's encoder loads strictly into timm under its mrmae_* name,
with the preprocessing the student trained with, and gives the student's features."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from _tiny_student import save_tiny_convvit, save_tiny_student
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mrmae.cli import cli
from mrmae.train.models import create_model
from mrmae.train.restore import encode_all_tokens, load_student

X = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))


def _export(run: Path, out: Path) -> tuple[str, str]:
    """(stdout, stderr) of a successful `mrmae export` writing `out` (DIR/model.safetensors)."""
    assert out.name == "model.safetensors"
    r = CliRunner().invoke(cli, ["export", "--checkpoint", str(run), "--out", str(out.parent)])
    assert r.exit_code == 0, r.output + repr(r.exception)
    return r.stdout, r.stderr


def _printed_model(stdout: str) -> torch.nn.Module:
    """The model the printed `load with:` line builds (it must run as printed)."""
    line = next(ln for ln in stdout.splitlines() if ln.startswith("load with: "))
    call = line.split("model = ", 1)[1]
    return eval(call, {"timm": timm}).eval()  # our own output, in a test


def test_vit_export_loads_by_the_printed_call_with_the_students_preprocessing(tmp_path, monkeypatch):
    model = save_tiny_student(tmp_path / "run")
    out = tmp_path / "rel" / "model.safetensors"
    monkeypatch.chdir(tmp_path)  # a relative --out: the printed path must still be absolute
    stdout, stderr = _export(tmp_path / "run", Path("rel/model.safetensors"))
    assert "timm model: mrmae_vit_tiny_patch16" in stdout and "note:" not in stderr
    assert f"file={str(out.resolve())!r}" in stdout
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["load_with"] in stdout and meta["timm_model"] == "mrmae_vit_tiny_patch16"
    assert not any(k.startswith(("decoder", "mask_token", "mimic_head", "head")) for k in load_file(str(out)))

    vit = _printed_model(stdout)
    cfg = timm.data.resolve_data_config({}, model=vit)
    assert cfg["mean"] == (0.485, 0.456, 0.406) and cfg["std"] == (0.229, 0.224, 0.225)
    assert cfg["interpolation"] == "bicubic" and cfg["crop_pct"] == 0.875 and cfg["input_size"] == (3, 224, 224)
    with torch.no_grad():
        ours, theirs = encode_all_tokens(model, X), vit.forward_features(X)
        pooled = vit.forward_head(theirs)
    assert theirs.shape == (2, 197, 192) and vit.num_classes == 0
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
    torch.testing.assert_close(pooled, ours[:, 0], atol=1e-5, rtol=0)  # global_pool='token': the [CLS] token

    # the load is strict: a file lacking a tensor is refused, not silently half-loaded
    partial = {k: v for k, v in load_file(str(out)).items() if k != "blocks.3.mlp.fc1.bias"}
    save_file(partial, str(tmp_path / "partial.safetensors"))
    with pytest.raises(RuntimeError, match="blocks.3.mlp.fc1.bias"):
        timm.create_model("mrmae_vit_tiny_patch16", pretrained=True,
                          pretrained_cfg_overlay=dict(file=str(tmp_path / "partial.safetensors")))


def test_fused_vit_exports_its_last_block_and_says_so(tmp_path):
    fused = save_tiny_student(tmp_path / "run", fuse_layers=(4, 8, 12))
    out = tmp_path / "e" / "model.safetensors"
    stdout, stderr = _export(tmp_path / "run" / "checkpoints" / "step00000001", out)
    notes = [ln for ln in stderr.splitlines() if ln.startswith("mrmae: note: ")]
    assert len(notes) == 1 and "blocks 4,8,12" in notes[0] and "last block, then the final norm" in notes[0]
    vit = _printed_model(stdout)
    unfused = create_model("mrmae_vit_tiny_patch16", teacher_dim=192, decoder_embed_dim=64, decoder_depth=1)
    unfused.load_state_dict(fused.state_dict())
    with torch.no_grad():
        theirs = vit.forward_features(X)
        torch.testing.assert_close(theirs, encode_all_tokens(unfused.eval(), X), atol=1e-5, rtol=0)
        assert (theirs - encode_all_tokens(fused, X)).abs().max() > 1e-2  # the fused latent is another feature


def test_convvit_export_is_the_students_backbone_in_timm(tmp_path):
    student = save_tiny_convvit(tmp_path / "run", fuse_layers=(4, 8, 11))
    out = tmp_path / "conv" / "model.safetensors"
    stdout, stderr = _export(tmp_path / "run", out)
    assert "timm model: mrmae_convvit_tiny" in stdout and "the stage-1/2 maps and blocks 4,8,11" in stderr
    keys = set(load_file(str(out)))
    assert "pos_embed" in keys and not any(k.startswith(("fuse1", "fuse2", "decoder", "mimic")) for k in keys)
    conv = _printed_model(stdout)
    assert timm.data.resolve_data_config({}, model=conv)["mean"] == (0.485, 0.456, 0.406)

    # with the fusion convs zeroed and only the last block fused, the student's latent is the backbone's output
    plain = create_model("mrmae_convvit_tiny", teacher_dim=192, decoder_embed_dim=64, decoder_depth=1)
    plain.load_state_dict(student.state_dict())
    with torch.no_grad():
        for p in (*plain.fuse1.parameters(), *plain.fuse2.parameters()):
            p.zero_()
        tokens = conv.forward_features(X)
        torch.testing.assert_close(tokens, encode_all_tokens(plain.eval(), X), atol=1e-5, rtol=0)
        maps = conv.forward_intermediates(X, intermediates_only=True)
    assert [tuple(m.shape) for m in maps] == [(2, 64, 56, 56), (2, 128, 28, 28), (2, 192, 14, 14)]
    torch.testing.assert_close(conv.forward_head(tokens, pre_logits=True), tokens.mean(1))


def test_import_mrmae_registers_the_models_for_plain_timm(tmp_path):
    """In a fresh interpreter, `import mrmae` before timm (the hook) loads an export strictly."""
    save_tiny_convvit(tmp_path / "run")
    out = tmp_path / "conv" / "model.safetensors"
    _export(tmp_path / "run", out)
    code = ("import mrmae, timm, torch\n"
            f"m = timm.create_model('mrmae_convvit_tiny', pretrained=True, pretrained_cfg_overlay=dict(file={str(out)!r}))\n"
            "c = timm.data.resolve_data_config({}, model=m)\n"
            "print(m.num_classes, c['mean'], c['std'], m(torch.zeros(1, 3, 224, 224)).shape[-1])\n")
    import mrmae  # the package under test, wherever it is (a checkout on PYTHONPATH or the installed one)

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(mrmae.__file__).parents[1])}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n")[0] == "0 (0.485, 0.456, 0.406) (0.229, 0.224, 0.225) 192"


@pytest.mark.parametrize("meta, message", [
    ({"timm_model": "resnet50", "timm_kwargs": "{}"}, "not an mrmae encoder"),
    ({"timm_model": "mrmae_vit_tiny_patch16", "timm_kwargs": json.dumps({"checkpoint_path": "/etc/passwd"})},
     "not a set of architecture arguments"),
    ({"timm_model": "mrmae_vit_tiny_patch16", "timm_kwargs": "[1, 2"}, "not a set of architecture arguments"),
    ({"timm_model": "mrmae_vit_tiny_patch16", "timm_kwargs": json.dumps({"depth": 10 ** 9})}, "out of range"),
    ({"timm_model": "mrmae_vit_tiny_patch16", "timm_kwargs": json.dumps({"depth": "deep"})}, "cannot be built"),
    ({"timm_model": "mrmae_vit_tiny_patch16", "timm_kwargs": "{}"}, "tensor w (1,) is not in timm"),
])
def test_an_export_file_asks_timm_for_nothing_but_an_mrmae_encoder(tmp_path, meta, message):
    """What the metadata names is built: only our encoders and their architecture arguments
    pass (a `checkpoint_path` would make timm read another file)."""
    save_file({"w": torch.zeros(1)}, str(tmp_path / "e.safetensors"), metadata=meta)
    r = CliRunner().invoke(cli, ["eval", "knn", "--checkpoint", str(tmp_path / "e.safetensors"),
                                 "--shards", "x.tar", "--val-shards", "x.tar"])
    assert r.exit_code == 1 and message in r.stderr and str(tmp_path / "e.safetensors") in r.stderr, r.output
    assert len(r.stderr.strip().splitlines()) == 1


def test_the_loaded_student_is_the_saved_one(tmp_path):
    model = save_tiny_student(tmp_path / "run")
    torch.testing.assert_close(encode_all_tokens(load_student(tmp_path / "run").model, X),
                               encode_all_tokens(model, X), atol=0, rtol=0)

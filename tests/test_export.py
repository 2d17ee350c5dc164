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
from safetensors.torch import load_file, save_file

from mrmae.cli import cli
from mrmae.train.models import create_model
from mrmae.train.restore import encode_all_tokens, load_student

X = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))


def _export(run: Path, out: Path, *extra: str) -> tuple[str, str]:
    """(stdout, stderr) of a successful `mrmae export --out out` (a folder)."""
    r = CliRunner().invoke(cli, ["export", "--checkpoint", str(run), "--out", str(out), *extra])
    assert r.exit_code == 0, r.output + repr(r.exception)
    return r.stdout, r.stderr


def _printed_model(stdout: str, prefix: str = "load with: ") -> torch.nn.Module:
    """The model a printed load line builds (it must run as printed)."""
    line = next(ln for ln in stdout.splitlines() if ln.startswith(prefix))
    call = line.split("model = ", 1)[1]
    return eval(call, {"timm": timm}).eval()  # our own output, in a test


def _no_absolute_path(folder: Path, *paths: Path) -> None:
    for f in folder.iterdir():
        data = f.read_bytes()
        for p in paths:
            assert str(p).encode() not in data, f"{f} holds {p}"


IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def _mean_std(model) -> tuple:
    cfg = timm.data.resolve_data_config({}, model=model)
    return tuple(cfg["mean"]), tuple(cfg["std"])


def test_vit_export_is_timms_own_vit_in_the_hub_layout(tmp_path, monkeypatch):
    from mrmae.train.downstream.export import export_source_run

    model = save_tiny_student(tmp_path / "run")
    monkeypatch.chdir(tmp_path)  # a relative --out: the printed path must still be absolute
    stdout, stderr = _export(tmp_path / "run", Path("rel"))
    out = tmp_path / "rel"
    assert "timm model: vit_tiny_patch16_224, no head" in stdout and "note:" not in stderr
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == "vit_tiny_patch16_224" and config["num_classes"] == 0
    assert config["mrmae"]["source_run"] == "../run" and config["mrmae"]["student"] == "mrmae_vit_tiny_patch16"
    assert (out / config["mrmae"]["source_checkpoint"]).is_file() and export_source_run(out) == (out / "../run").resolve()
    _no_absolute_path(out, tmp_path, Path("/tmp"))
    assert not any(k.startswith(("decoder", "mask_token", "mimic_head", "head")) for k in load_file(out / "model.safetensors"))

    vit = timm.create_model(f"local-dir:{out}", pretrained=True).eval()  # timm's own class, from the folder alone
    assert type(vit).__name__ == "VisionTransformer" and vit.num_classes == 0
    assert _mean_std(vit) == IMAGENET
    cfg = timm.data.resolve_data_config({}, model=vit)
    assert cfg["interpolation"] == "bicubic" and cfg["crop_pct"] == 0.875 and tuple(cfg["input_size"]) == (3, 224, 224)
    with torch.no_grad():
        ours, theirs = encode_all_tokens(model, X), vit.forward_features(X)
        pooled = vit.forward_head(theirs)
    assert theirs.shape == (2, 197, 192)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
    torch.testing.assert_close(pooled, ours[:, 0], atol=1e-5, rtol=0)  # global_pool='token': the [CLS] token
    for printed in ("load with: ", "or the file: "):
        torch.testing.assert_close(_printed_model(stdout, printed).forward_features(X), theirs, atol=0, rtol=0)
    headed = timm.create_model(f"local-dir:{out}", pretrained=True, num_classes=5).eval()
    assert headed.head.out_features == 5
    torch.testing.assert_close(headed.forward_features(X), theirs, atol=0, rtol=0)
    for classes in (0, 5):  # the plain call under the mrmae name (`import mrmae`), without and with a head
        plain = timm.create_model("mrmae_vit_tiny_patch16", pretrained=True, num_classes=classes,
                                  pretrained_cfg_overlay=dict(file=str(out / "model.safetensors"))).eval()
        assert plain.num_classes == classes and _mean_std(plain) == IMAGENET
        torch.testing.assert_close(plain.forward_features(X), theirs, atol=0, rtol=0)

    # the file's load is strict: one lacking a tensor is refused, not silently half-loaded
    partial = {k: v for k, v in load_file(out / "model.safetensors").items() if k != "blocks.3.mlp.fc1.bias"}
    save_file(partial, str(out / "model.safetensors"))
    with pytest.raises(RuntimeError, match="blocks.3.mlp.fc1.bias"):
        timm.create_model(f"local-dir:{out}", pretrained=True)


def test_fused_vit_exports_its_last_block_and_says_so(tmp_path):
    fused = save_tiny_student(tmp_path / "run", fuse_layers=(4, 8, 12))
    stdout, stderr = _export(tmp_path / "run" / "checkpoints" / "step00000001", tmp_path / "e")
    notes = [ln for ln in stderr.splitlines() if ln.startswith("mrmae: note: ")]
    assert len(notes) == 1 and "blocks 4,8,12" in notes[0] and "last block, then the final norm" in notes[0]
    assert "blocks 4,8,12" in json.loads((tmp_path / "e" / "config.json").read_text())["mrmae"]["fusion_note"]
    vit = _printed_model(stdout)
    unfused = create_model("mrmae_vit_tiny_patch16", teacher_dim=192, decoder_embed_dim=64, decoder_depth=1)
    unfused.load_state_dict(fused.state_dict())
    with torch.no_grad():
        theirs = vit.forward_features(X)
        torch.testing.assert_close(theirs, encode_all_tokens(unfused.eval(), X), atol=1e-5, rtol=0)
        assert (theirs - encode_all_tokens(fused, X)).abs().max() > 1e-2  # the fused latent is another feature


def test_convvit_export_is_the_students_backbone_in_timm(tmp_path):
    student = save_tiny_convvit(tmp_path / "run", fuse_layers=(4, 8, 11))
    out = tmp_path / "conv"
    stdout, stderr = _export(tmp_path / "run", out)
    assert "timm model: mrmae_convvit_tiny" in stdout and "the stage-1/2 maps and blocks 4,8,11" in stderr
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == "mrmae_convvit_tiny" and config["model_args"]["conv_norm_eps"] == 1e-5
    keys = set(load_file(out / "model.safetensors"))
    assert "pos_embed" in keys and not any(k.startswith(("fuse1", "fuse2", "decoder", "mimic")) for k in keys)
    conv = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    assert _mean_std(conv) == IMAGENET and conv.embed1.norm.eps == 1e-5

    # with the fusion convs zeroed and only the last block fused, the student's latent is the backbone's output
    plain = create_model("mrmae_convvit_tiny", teacher_dim=192, decoder_embed_dim=64, decoder_depth=1)
    plain.load_state_dict(student.state_dict())
    with torch.no_grad():
        for p in (*plain.fuse1.parameters(), *plain.fuse2.parameters()):
            p.zero_()
        tokens = conv.forward_features(X)
        torch.testing.assert_close(tokens, encode_all_tokens(plain.eval(), X), atol=1e-5, rtol=0)
        maps = conv.forward_intermediates(X, intermediates_only=True)
        # timm's plain call from the file, without a head and with a new one
        filed = _printed_model(stdout, "or the file: ")
        torch.testing.assert_close(filed.forward_features(X), tokens, atol=0, rtol=0)
        headed = timm.create_model("mrmae_convvit_tiny", pretrained=True, num_classes=7,
                                   pretrained_cfg_overlay=dict(file=str(out / "model.safetensors")))
        assert headed(X).shape == (2, 7)
    assert [tuple(m.shape) for m in maps] == [(2, 64, 56, 56), (2, 128, 28, 28), (2, 192, 14, 14)]
    torch.testing.assert_close(conv.forward_head(tokens, pre_logits=True), tokens.mean(1))


def test_import_mrmae_registers_the_models_for_plain_timm(tmp_path):
    """In a fresh interpreter, `import mrmae` before timm (the hook) loads an export strictly."""
    save_tiny_convvit(tmp_path / "run")
    out = tmp_path / "conv"
    _export(tmp_path / "run", out)
    code = ("import mrmae, timm, torch\n"
            f"m = timm.create_model('local-dir:{out}', pretrained=True)\n"
            "c = timm.data.resolve_data_config({}, model=m)\n"
            "print(m.num_classes, tuple(c['mean']), tuple(c['std']), m(torch.zeros(1, 3, 224, 224)).shape[-1])\n")
    import mrmae  # the package under test, wherever it is (a checkout on PYTHONPATH or the installed one)

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(mrmae.__file__).parents[1])}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n")[0] == "0 (0.485, 0.456, 0.406) (0.229, 0.224, 0.225) 192"


def test_an_export_before_the_hub_layout_still_reads_and_keeps_its_eps(tmp_path):
    """A lone model.safetensors whose metadata names the timm model (mrmae's exports before
    config.json): a ConvViT's conv stages had LayerNorm eps 1e-6 then, and keep it."""
    from mrmae.train.downstream.export import read_encoder

    student = save_tiny_convvit(tmp_path / "run")
    tensors = {k: v.contiguous() for k, v in student.state_dict().items()
               if k.startswith(("embed", "stage", "token_proj", "blocks", "norm", "pos_embed"))}
    kwargs = dict(img_size=224, embed_dims=[64, 128, 192], depths=[2, 2, 11], num_heads=3, mlp_ratios=[4.0] * 3,
                  kernel_size=5)
    old = tmp_path / "old" / "model.safetensors"
    old.parent.mkdir()
    save_file(tensors, str(old), metadata={"format": "pt", "timm_model": "mrmae_convvit_tiny",
                                           "timm_kwargs": json.dumps(kwargs)})
    encoder = read_encoder(old.parent)
    assert encoder.timm_kwargs["conv_norm_eps"] == 1e-6
    model = encoder.load()
    assert {m.eps for n, m in model.named_modules() if n.startswith(("embed", "stage")) and
            isinstance(m, torch.nn.LayerNorm)} == {1e-6}
    _export(old.parent, tmp_path / "new")  # re-exported in the hub layout, the eps recorded
    assert json.loads((tmp_path / "new" / "config.json").read_text())["model_args"]["conv_norm_eps"] == 1e-6


def test_a_run_from_before_the_eps_was_recorded_restores_with_its_own(tmp_path):
    """config.json without model_config: a ConvViT pretrained before mrmae matched ConvMAE's
    conv-stage eps (1e-6 then); a new run records 1e-5."""
    student = save_tiny_convvit(tmp_path / "run")
    assert student.embed1.norm.eps == 1e-5 and student.stage2[0].norm2.eps == 1e-5 and student.norm.eps == 1e-6
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert load_student(tmp_path / "run").model.stage1[0].norm1.eps == 1e-5
    del config["model_config"]
    (tmp_path / "run" / "config.json").write_text(json.dumps(config))
    old = load_student(tmp_path / "run").model
    assert old.embed1.norm.eps == old.stage1[0].norm1.eps == 1e-6 and old.blocks[0].norm1.eps == 1e-6
    config["model_config"] = {"conv_norm_eps": "big"}
    (tmp_path / "run" / "config.json").write_text(json.dumps(config))
    r = CliRunner().invoke(cli, ["export", "--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "e")])
    assert r.exit_code == 1 and "conv_norm_eps" in r.stderr and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("config, message", [
    ({"architecture": "resnet50"}, "not an mrmae encoder"),
    ({"architecture": "vit_tiny_patch16_224", "model_args": {"checkpoint_path": "/etc/passwd"}},
     "not a set of architecture arguments"),
    ({"architecture": "vit_tiny_patch16_224", "model_args": {"in_chans": 1}}, "in_chans 1"),
    ({"architecture": "vit_tiny_patch16_224", "model_args": {"depth": 10 ** 9}}, "out of range"),
    ({"architecture": "vit_tiny_patch16_224", "model_args": {}}, "tensor w (1,) is not in timm"),
    ([1, 2], "not a timm model config"),
])
def test_a_hub_config_asks_timm_for_nothing_but_an_mrmae_encoder(tmp_path, config, message):
    (tmp_path / "config.json").write_text(json.dumps(config))
    save_file({"w": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
    r = CliRunner().invoke(cli, ["eval", "knn", "--checkpoint", str(tmp_path), "--shards", "x.tar",
                                 "--val-shards", "x.tar"])
    assert r.exit_code == 1 and message in r.stderr and str(tmp_path) in r.stderr, r.output
    assert len(r.stderr.strip().splitlines()) == 1


def test_push_to_hub_offline_is_one_line_at_once_and_writes_nothing(tmp_path, monkeypatch):
    import time

    save_tiny_student(tmp_path / "run")
    for env in ({"HF_HUB_OFFLINE": "1"}, {"HF_ENDPOINT": "http://127.0.0.1:9"}):  # port 9: nobody listens
        code = ("import sys; from mrmae.cli import main; main(sys.argv[1:])")
        t = time.monotonic()
        r = subprocess.run([sys.executable, "-c", code, "export", "--checkpoint", str(tmp_path / "run"), "--out",
                            str(tmp_path / "e"), "--push-to-hub", "someone/mrmae-tiny"],
                           capture_output=True, text=True, env={**os.environ, **env}, timeout=120)
        assert r.returncode == 1, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("mrmae: error: --push-to-hub someone/mrmae-tiny: "), lines
        assert time.monotonic() - t < 60 and not (tmp_path / "e").exists()


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


def test_a_vit_export_loads_in_timm_without_mrmae(tmp_path):
    """The hub layout as timm alone reads it: in a virtualenv where mrmae is not importable,
    `timm.create_model("local-dir:OUT", pretrained=True)` builds timm's ViT with the student's
    weights and resolves the ImageNet mean/std it was trained with."""
    from _venv import venv_without_mrmae
    from safetensors.torch import save_file as save

    model = save_tiny_student(tmp_path / "run")
    _export(tmp_path / "run", tmp_path / "e")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": "", "HF_HUB_OFFLINE": "1"}
    python = venv_without_mrmae(tmp_path / "venv", env)
    save({"x": X}, str(tmp_path / "x.safetensors"))
    code = ("import json, sys, timm, torch\n"
            "from safetensors.torch import load_file, save_file\n"
            f"m = timm.create_model('local-dir:{tmp_path / 'e'}', pretrained=True).eval()\n"
            "c = timm.data.resolve_data_config({}, model=m)\n"
            f"x = load_file('{tmp_path / 'x.safetensors'}')['x']\n"
            "with torch.no_grad():\n"
            f"    save_file({{'y': m.forward_features(x)}}, '{tmp_path / 'y.safetensors'}')\n"
            "print(json.dumps([type(m).__module__, list(c['mean']), list(c['std']), c['interpolation'], c['crop_pct'],"
            " 'mrmae' in sys.modules]))\n")
    r = subprocess.run([str(python), "-c", code], capture_output=True, text=True, env=env, timeout=300,
                       cwd=tmp_path / "venv")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.splitlines()[-1]) == ["timm.models.vision_transformer", [0.485, 0.456, 0.406],
                                                     [0.229, 0.224, 0.225], "bicubic", 0.875, False]
    with torch.no_grad():
        torch.testing.assert_close(load_file(tmp_path / "y.safetensors")["y"], encode_all_tokens(model, X),
                                   atol=1e-5, rtol=0)


def test_export_never_writes_over_a_runs_config(tmp_path):
    save_tiny_student(tmp_path / "run")
    before = (tmp_path / "run" / "config.json").read_bytes()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text('{"model": "mine"}')
    for out, words in ((tmp_path / "run", "a training run"), (tmp_path / "other", "not an export's")):
        r = CliRunner().invoke(cli, ["export", "--checkpoint", str(tmp_path / "run"), "--out", str(out)])
        assert r.exit_code == 1 and words in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.output
    assert (tmp_path / "run" / "config.json").read_bytes() == before and not (tmp_path / "run" / "model.safetensors").exists()
    assert (tmp_path / "other" / "config.json").read_text() == '{"model": "mine"}'
    _export(tmp_path / "run", tmp_path / "e")
    first = {p.name: p.read_bytes() for p in (tmp_path / "e").iterdir()}
    r = CliRunner().invoke(cli, ["export", "--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "e")])
    assert r.exit_code == 2 and r.stderr.strip().splitlines() == [
        f"mrmae: error: --out {tmp_path / 'e'}: holds an export already; give --overwrite to set it aside (renamed, "
        "never deleted) and write anew"], r.output
    r = CliRunner().invoke(cli, ["export", "--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "e"),
                                 "--overwrite"])  # an earlier export is set aside whole, the new one written
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in (tmp_path / "e").iterdir()) == ["config.json", "model.safetensors"]
    aside = list(tmp_path.glob("e.old-*"))
    assert len(aside) == 1 and {p.name: p.read_bytes() for p in aside[0].iterdir()} == first

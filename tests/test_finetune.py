"""`mrmae finetune`: a tiny student fine-tuned on the demo shards, resumed, refused when it must be."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _tiny_student import NAME, save_tiny_convvit, save_tiny_student
from click.testing import CliRunner
from conftest import url_list
from safetensors.torch import load_file, save_file

from mrmae.cli import cli
from mrmae.train.run import checkpoint as ckpt
from mrmae.train.run.checkpoint import TrainState, save_checkpoint
from mrmae.train.downstream.finetune import FinetuneError, build_classifier
from mrmae.train.models import create_model
from mrmae.train.restore import encode_all_tokens

# The demo labels are photograph indices < 16. At 64 px (16 patches) a step costs a twelfth
# of one at 224 px, which keeps this file well inside a minute on 2 CPU cores.
FT = ["--num-classes", "16", "--batch-size", "4", "--epochs", "2", "--lr", "1e-3", "--warmup-epochs", "0.5",
      "--workers", "0", "--seed", "3", "--eval-batch-size", "8", "--no-progress", "--save-every-steps", "2"]


def save_small_student(out: Path, seed: int = 0):
    """The tiny student of _tiny_student.py at 64 px, saved as a pretrain run saves it."""
    torch.manual_seed(seed)
    model = create_model(NAME, img_size=64, teacher_dim=192, decoder_embed_dim=64, decoder_depth=1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    save_checkpoint(out, model, torch.optim.AdamW(model.parameters()), TrainState(epoch=1, step=1))
    (out / "config.json").write_text(json.dumps({"model": NAME, "fuse_layers": []}))
    return model.eval()


@pytest.fixture(scope="module")
def student(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("student")
    save_small_student(out)
    return out


def finetune(args: list[str]):
    return CliRunner().invoke(cli, ["finetune", *args])


def records(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]


class _Killed(Exception):
    pass


def test_finetune_resumes_to_the_uninterrupted_run(student, demo_shards, tmp_path, monkeypatch):
    data = ["--checkpoint", str(student), "--shards", url_list(demo_shards[:2]),
            "--val-shards", str(demo_shards[2]), *FT]
    r = finetune([*data, "--out", str(tmp_path / "whole")])
    assert r.exit_code == 0, r.output + repr(r.exception)
    lines = r.stdout.splitlines()  # the start line, the table of epochs, the images, the end summary
    assert lines[0].startswith("finetune: ") and " 2 epochs x 3 steps = 6 steps of 4 images " in lines[0]
    assert lines[1].split() == ["epoch", "step", "train_loss", "val_loss", "top1", "top5", "val_images"]
    assert [ln.split()[-1] for ln in lines[2:4]] == ["6", "6"]  # over the 6 validation images, none skipped
    assert lines[4].startswith("train: 12 images, ") and lines[5].startswith("val: 6 images, ")
    assert lines[-2].startswith("6 steps done;") and lines[-1].startswith(f"run: {tmp_path / 'whole'} (config.json")
    whole = records(tmp_path / "whole")
    steps = [m for m in whole if "loss" in m]
    evals = [m for m in whole if "top1" in m]
    assert [m["step"] for m in steps] == [1, 2, 3, 4, 5, 6]  # 12 images / batch 4, 2 epochs
    assert [(m["epoch"], m["step"], m["n_val"]) for m in evals] == [(0, 3, 6), (1, 6, 6)]
    assert all(0 <= m["top1"] <= m["top5"] <= 100 and m["val_loss"] > 0 for m in evals)

    # Kill right after the checkpoint at the end of epoch 0, resume; kill again after the
    # mid-epoch checkpoint at step 4 (--save-every-steps 2), resume to the end.
    save = ckpt.save_checkpoint
    for kill_at in (3, 4, None):
        def killing_save(out, model, optimizer, state, extra=None, _at=kill_at):
            path = save(out, model, optimizer, state, extra)
            if state.step == _at:
                raise _Killed(state.step)
            return path

        monkeypatch.setattr(ckpt, "save_checkpoint", killing_save)
        r = finetune([*data, "--out", str(tmp_path / "killed"), "--resume"])
        if kill_at is None:
            assert r.exit_code == 0, r.output + repr(r.exception)
        else:
            assert isinstance(r.exception, _Killed) and records(tmp_path / "killed")[-1]["step"] == kill_at
    resumed = records(tmp_path / "killed")
    line = _one_error_line(finetune([*data, "--out", str(tmp_path / "killed"), "--resume", "--skip-bad-labels"]))
    assert line.endswith("field labels")  # other labels would be other samples: refused
    assert [(m["epoch"], m["step"], "top1" in m) for m in resumed] == [(m["epoch"], m["step"], "top1" in m)
                                                                       for m in whole]
    for a, b in zip(whole, resumed):
        for k in ("loss", "lr", "train_loss", "val_loss", "top1", "top5"):
            if k in a:
                assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-7), (a["step"], k)

    # the encoder was loaded whole, and training moved both the new head and the encoder
    init, _ = build_classifier(student, 16, seed=3)
    start, final = init.state_dict(), load_file(str(ckpt.latest_checkpoint(tmp_path / "whole") / "model.safetensors"))
    encoder = load_file(str(student / "checkpoints" / "step00000001" / "model.safetensors"))
    assert torch.equal(start["blocks.0.attn.qkv.weight"], encoder["blocks.0.attn.qkv.weight"])
    assert not torch.equal(start["head.weight"], final["head.weight"])
    assert not torch.equal(start["blocks.11.mlp.fc2.weight"], final["blocks.11.mlp.fc2.weight"])
    cfg = json.loads((tmp_path / "whole" / "config.json").read_text())
    assert cfg["timm_kwargs"]["global_pool"] == "avg" and cfg["steps_per_epoch"] == 3

    # exported with its head: timm's own ViT, mean-pooled with fc_norm, as it was trained
    import timm

    r = CliRunner().invoke(cli, ["export", "--checkpoint", str(tmp_path / "whole"), "--out", str(tmp_path / "e")])
    assert r.exit_code == 0 and "timm model: vit_tiny_patch16_224, head of 16 classes" in r.stdout, r.output
    vit = timm.create_model(f"local-dir:{tmp_path / 'e'}", pretrained=True)
    assert type(vit).__name__ == "VisionTransformer" and vit.global_pool == "avg"
    assert vit.state_dict().keys() == final.keys() and all(torch.equal(v, final[k]) for k, v in vit.state_dict().items())


def test_exported_encoder_loads_and_only_head_keys_may_be_missing(student, tmp_path):
    r = CliRunner().invoke(cli, ["export", "--checkpoint", str(student), "--out", str(tmp_path / "e")])
    assert r.exit_code == 0, r.output
    from_run, _ = build_classifier(student, 5, seed=1)
    from_file, encoder = build_classifier(tmp_path / "e", 5, seed=1)
    assert encoder.timm_model == "vit_tiny_patch16_224" and encoder.timm_kwargs["img_size"] == 64  # timm's own ViT
    assert from_file.num_classes == 5
    a, b = from_run.state_dict(), from_file.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "norm.weight" not in a and "fc_norm.weight" in a  # 'avg': fc_norm replaces the final norm

    # --global-pool token keeps the final norm: the features are the student's own
    token, _ = build_classifier(student, 5, global_pool="token")
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    from mrmae.train.restore import load_student

    with torch.no_grad():
        torch.testing.assert_close(token.eval().forward_features(x), encode_all_tokens(load_student(student).model, x),
                                   atol=1e-5, rtol=0)

    partial = {k: v for k, v in load_file(str(tmp_path / "e" / "model.safetensors")).items() if k != "blocks.3.mlp.fc1.bias"}
    save_file(partial, str(tmp_path / "partial.safetensors"), metadata={"timm_model": encoder.timm_model,
                                                                        "timm_kwargs": json.dumps(encoder.timm_kwargs)})
    with pytest.raises(FinetuneError, match=r"missing \['blocks.3.mlp.fc1.bias'\]"):
        build_classifier(tmp_path / "partial.safetensors", 5)


def _one_error_line(r, code: int = 1) -> str:
    """The one error line (exit `code`: 2 for options, 1 for data), after the run's start line if it started."""
    lines = [ln for ln in r.output.strip().splitlines() if not ln.startswith("finetune: ")]
    assert r.exit_code == code and len(lines) == 1 and lines[0].startswith("mrmae: error: "), r.output
    return lines[0]


def test_unusable_students_and_options_are_refused_in_one_line(student, demo_shards, tmp_path):
    data = ["--shards", str(demo_shards[0]), "--val-shards", str(demo_shards[1]), "--out", str(tmp_path / "o")]
    line = _one_error_line(finetune(["--checkpoint", str(student), *data, *FT, "--batch-size", "3"]), code=2)
    assert "--batch-size 3 is odd" in line
    line = _one_error_line(finetune(["--checkpoint", str(student), *data, *FT, "--num-classes", "1"]))
    assert line.startswith(f"mrmae: error: {demo_shards[0]}: sample demo_") and "is not below --num-classes 1" in line


def save_small_convvit(out: Path, fuse_layers: tuple[int, ...] = (4, 8, 11)):
    """A tiny ConvViT student at 64 px with --fuse-layers, saved as a pretrain run saves it."""
    return save_tiny_convvit(out, fuse_layers, img_size=64)


def test_a_fused_convvit_student_fine_tunes_and_says_what_it_keeps(demo_shards, tmp_path):
    """The paper's main student (ConvViT, fused) fine-tunes: stage and block weights come from
    the student, fc_norm and the head are new, the fusion convs are left out with one note."""
    student = save_small_convvit(tmp_path / "conv")
    data = ["--shards", url_list(demo_shards[:2]), "--val-shards", str(demo_shards[2])]
    ft = [a if a != "2" or i == 0 or FT[i - 1] != "--epochs" else "1" for i, a in enumerate(FT)]  # one epoch
    r = finetune(["--checkpoint", str(tmp_path / "conv"), *data, *ft, "--out", str(tmp_path / "ft")])
    assert r.exit_code == 0, r.output + repr(r.exception)
    notes = [ln for ln in r.stderr.splitlines() if ln.startswith("mrmae: note: ")]
    assert [n for n in notes if "stage-1/2 maps and blocks 4,8,11" in n] == notes[:1]
    assert notes[-1].endswith("classes, --num-classes is 16")  # the demo's 12 training images hold fewer
    evals = [m for m in records(tmp_path / "ft") if "top1" in m]
    assert [(m["epoch"], m["n_val"]) for m in evals] == [(0, 6)]

    model, encoder = build_classifier(tmp_path / "conv", 16, seed=3)
    assert type(model).__name__ == "ConvViT" and encoder.timm_model == "mrmae_convvit_tiny"
    state = model.state_dict()
    assert torch.equal(state["stage1.0.dwconv.weight"], student.stage1[0].dwconv.weight)
    assert torch.equal(state["blocks.10.attn.qkv.weight"], student.blocks[10].attn.qkv.weight)
    assert "fc_norm.weight" in state and "norm.weight" not in state and not any(k.startswith("fuse") for k in state)
    line = _one_error_line(finetune(["--checkpoint", str(tmp_path / "conv"), *data, *ft, "--global-pool", "token",
                                     "--out", str(tmp_path / "tok")]))
    assert "no [CLS] token" in line

    # layer-wise lr decay, ConvMAE's: the conv stages with the embeddings in layer 0, then each block,
    # the head not at all; per stage (--layer-decay-groups stages): stage 1 decays most
    from mrmae.train.downstream.layer_decay import param_groups_layer_decay

    names = {id(p): n for n, p in model.named_parameters()}
    for rule, stage1, stage2 in (("official", 0.5 ** 12, 0.5 ** 12), ("stages", 0.5 ** 14, 0.5 ** 13)):
        groups = param_groups_layer_decay(model, 0.05, 0.5, rule)
        scale = {names[id(p)]: g["lr_scale"] for g in groups for p in g["params"]}
        assert scale["head.weight"] == 1.0 and scale["blocks.10.attn.qkv.weight"] == 0.5
        assert scale["stage2.0.pw1.weight"] == stage2 and scale["embed1.proj.weight"] == stage1

    # the fine-tuned run exports with its head and fc_norm, loads in timm by its folder and by
    # the plain file call, and gives the run's own validation top-1
    import timm
    from accelerate import Accelerator

    from mrmae.train.downstream.finetune import evaluate
    from mrmae.train.downstream.labels import LabelOptions, resolve_labels

    r = CliRunner().invoke(cli, ["export", "--checkpoint", str(tmp_path / "ft"), "--out", str(tmp_path / "ft-e")])
    assert r.exit_code == 0, r.output + repr(r.exception)
    assert "timm model: mrmae_convvit_tiny, head of 16 classes" in r.stdout
    config = json.loads((tmp_path / "ft-e" / "config.json").read_text())
    assert config["mrmae"]["source"] == "finetune" and config["mrmae"]["source_run"] == "../ft"
    assert (config["num_classes"], config["model_args"]["fc_norm"], config["model_args"]["global_pool"]) == \
        (16, True, "avg")
    exported = timm.create_model(f"local-dir:{tmp_path / 'ft-e'}", pretrained=True).eval()
    assert exported.num_classes == 16 and "norm.weight" not in exported.state_dict()
    trained = load_file(str(ckpt.latest_checkpoint(tmp_path / "ft") / "model.safetensors"))
    assert exported.state_dict().keys() == trained.keys()
    assert all(torch.equal(v, trained[k]) for k, v in exported.state_dict().items())
    call = next(ln for ln in r.stdout.splitlines() if ln.startswith("or the file: ")).split("model = ", 1)[1]
    filed = eval(call, {"timm": timm})  # our own printed line
    assert all(torch.equal(v, trained[k]) for k, v in filed.state_dict().items())
    spec = resolve_labels(LabelOptions(num_classes=16), [str(demo_shards[2])])
    result, _ = evaluate(exported, str(demo_shards[2]), 64, spec, Accelerator(cpu=True))
    assert (result["top1"], result["n_val"]) == (evals[-1]["top1"], 6)
    assert result["val_loss"] == pytest.approx(evals[-1]["val_loss"], rel=1e-5)


def test_a_fused_vit_fine_tunes_its_last_block_with_a_note(demo_shards, tmp_path):
    save_tiny_student(tmp_path / "fused", fuse_layers=(4, 8, 12))
    model, encoder = build_classifier(tmp_path / "fused", 16)
    assert encoder.note and "blocks 4,8,12" in encoder.note and model.num_classes == 16

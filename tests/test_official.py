"""Official checkpoints in: MAE's and ConvMAE's `.pth` files give, in mrmae, the outputs their own
code gives. The reference forwards below are written here from the published architecture
descriptions (the MAE and ConvMAE papers, and the tensor names and shapes of the checkpoints the
two repositories publish), with torch.nn.functional only: no mrmae model code and no timm model
class, so they check mrmae's students and timm encoders rather than repeat them. The state dicts
are written in the official names at tiny sizes (the sizes of mrmae's registered tiny models,
at 64 px), saved as `{"model": state_dict}` and read back through mrmae's own loaders."""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from mrmae.cli import cli

S = 64  # input size: a 4 x 4 token grid
CONV = dict(dims=(64, 128, 192), depths=(2, 2, 11), heads=3)  # mrmae_convvit_tiny's sizes
VIT = dict(dim=192, depth=12, heads=3, patch=16)  # mrmae_vit_tiny_patch16's (MAE's ViT-Ti shape)
DEC = dict(dim=64, depth=2, heads=16)  # MAE's and ConvMAE's decoders have 16 heads
CONV_LN_EPS, LN_EPS = 1e-5, 1e-6  # ConvMAE: nn.LayerNorm(dim) in the conv stages; 1e-6 everywhere else


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --- the reference: the published architectures, functionally -------------------------------


def sincos_2d(dim: int, grid: int, cls: bool) -> torch.Tensor:
    """MAE's fixed 2-D sin-cos embedding: half the channels encode the column (the first
    meshgrid axis), half the row; each half [sin(p w), cos(p w)], w_k = 1 / 10000^(k / (dim/4))."""
    def one_axis(d: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    gw, gh = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64))
    emb = np.concatenate([one_axis(dim // 2, gw), one_axis(dim // 2, gh)], axis=1)
    if cls:
        emb = np.concatenate([np.zeros([1, dim]), emb], axis=0)
    return torch.from_numpy(emb).float()[None]


def ln(x, sd, p, eps):
    return F.layer_norm(x, x.shape[-1:], sd[f"{p}.weight"], sd[f"{p}.bias"], eps)


def ln_channels(x, sd, p, eps):  # LayerNorm over the channels of [B, C, H, W]
    return ln(x.permute(0, 2, 3, 1), sd, p, eps).permute(0, 3, 1, 2)


def lin(x, sd, p):
    return F.linear(x, sd[f"{p}.weight"], sd[f"{p}.bias"])


def conv(x, sd, p, stride=1, padding=0, groups=1):
    return F.conv2d(x, sd[f"{p}.weight"], sd[f"{p}.bias"], stride=stride, padding=padding, groups=groups)


def vit_block(x, sd, p, heads):
    """Pre-norm transformer block: multi-head self-attention (qkv Linear, scale d_head^-1/2),
    then a GELU MLP, each with a residual; LayerNorm eps 1e-6."""
    b, n, d = x.shape
    qkv = lin(ln(x, sd, f"{p}.norm1", LN_EPS), sd, f"{p}.attn.qkv").reshape(b, n, 3, heads, d // heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    att = ((q @ k.transpose(-2, -1)) * (d // heads) ** -0.5).softmax(-1)
    x = x + lin((att @ v).transpose(1, 2).reshape(b, n, d), sd, f"{p}.attn.proj")
    return x + lin(F.gelu(lin(ln(x, sd, f"{p}.norm2", LN_EPS), sd, f"{p}.mlp.fc1")), sd, f"{p}.mlp.fc2")


def conv_embed(x, sd, p, k):
    """ConvMAE's PatchEmbed: k x k conv of stride k, LayerNorm over channels (eps 1e-5), GELU."""
    return F.gelu(ln_channels(conv(x, sd, f"{p}.proj", stride=k), sd, f"{p}.norm", CONV_LN_EPS))


def conv_block(x, sd, p, visible=None):
    """ConvMAE's CBlock: x + conv2(dw5x5(visible * conv1(LN(x)))), then x + MLP(LN(x)) with 1x1
    convs; LayerNorms eps 1e-5."""
    h = conv(ln_channels(x, sd, f"{p}.norm1", CONV_LN_EPS), sd, f"{p}.conv1")
    if visible is not None:
        h = h * visible
    x = x + conv(conv(h, sd, f"{p}.attn", padding=2, groups=x.shape[1]), sd, f"{p}.conv2")
    h = ln_channels(x, sd, f"{p}.norm2", CONV_LN_EPS)
    return x + conv(F.gelu(conv(h, sd, f"{p}.mlp.fc1")), sd, f"{p}.mlp.fc2")


def masking(b: int, n: int, seed: int):
    """MAE's per-sample random masking of 75%: (ids_keep, mask [B, N] 1 = masked, ids_restore)."""
    noise = torch.rand(b, n, generator=torch.Generator().manual_seed(seed))
    shuffle = noise.argsort(dim=1)
    restore = shuffle.argsort(dim=1)
    keep = shuffle[:, :n // 4]
    mask = torch.ones(b, n)
    mask[:, :n // 4] = 0
    return keep, torch.gather(mask, 1, restore), restore


def gather(x, ids):
    return torch.gather(x, 1, ids[..., None].expand(-1, -1, x.shape[-1]))


def decoder(latent, sd, restore, prefix: int):
    """MAE's decoder: embed, mask tokens appended, unshuffled, + pos, blocks, norm, pixel head."""
    x = lin(latent, sd, "decoder_embed")
    b, n = restore.shape
    seq = torch.cat([x[:, prefix:], sd["mask_token"].expand(b, n - (x.shape[1] - prefix), -1)], dim=1)
    x = torch.cat([x[:, :prefix], gather(seq, restore)], dim=1) + sd["decoder_pos_embed"]
    for i in range(DEC["depth"]):
        x = vit_block(x, sd, f"decoder_blocks.{i}", DEC["heads"])
    return lin(ln(x, sd, "decoder_norm", LN_EPS), sd, "decoder_pred")[:, prefix:]


def pixel_loss(imgs, pred, mask, p=16):
    """MAE's loss with norm_pix_loss: per-patch normalised pixels, MSE on the masked patches."""
    b, c, h, w = imgs.shape
    t = imgs.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1).reshape(b, -1, p * p * c)
    t = (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6) ** 0.5
    return (((pred - t) ** 2).mean(-1) * mask).sum() / mask.sum()


def convmae_encoder(sd, imgs, keep=None, mask=None):
    """ConvMAE's encoder. Masked (pretraining): the 4x4 mask blown up block-wise to the stage-1
    and stage-2 grids gates the depth-wise convs, the stage-1/2 maps (strided convs to the token
    grid) are added to the last block's visible tokens before the final norm; unmasked
    (fine-tuning): no gate, no stage maps, the tokens before the final norm."""
    g = S // 16
    vis1 = vis2 = None
    if mask is not None:
        grid = (1 - mask).reshape(-1, 1, g, g)
        vis1, vis2 = grid.repeat_interleave(4, 2).repeat_interleave(4, 3), grid.repeat_interleave(2, 2).repeat_interleave(2, 3)
    x = conv_embed(imgs, sd, "patch_embed1", 4)
    for i in range(CONV["depths"][0]):
        x = conv_block(x, sd, f"blocks1.{i}", vis1)
    s1 = conv(x, sd, "stage1_output_decode", stride=4).flatten(2).transpose(1, 2) if mask is not None else None
    x = conv_embed(x, sd, "patch_embed2", 2)
    for i in range(CONV["depths"][1]):
        x = conv_block(x, sd, f"blocks2.{i}", vis2)
    s2 = conv(x, sd, "stage2_output_decode", stride=2).flatten(2).transpose(1, 2) if mask is not None else None
    x = lin(conv_embed(x, sd, "patch_embed3", 2).flatten(2).transpose(1, 2), sd, "patch_embed4") + sd["pos_embed"]
    if keep is not None:
        x = gather(x, keep)
    for i in range(CONV["depths"][2]):
        x = vit_block(x, sd, f"blocks3.{i}", CONV["heads"])
    if mask is None:
        return x
    return ln(x + gather(s1, keep) + gather(s2, keep), sd, "norm", LN_EPS)


def mae_encoder(sd, imgs, keep=None):
    """MAE's encoder: 16x16 patches + pos, the visible ones, [CLS] + its pos, blocks (un-normed)."""
    x = conv(imgs, sd, "patch_embed.proj", stride=VIT["patch"]).flatten(2).transpose(1, 2) + sd["pos_embed"][:, 1:]
    if keep is not None:
        x = gather(x, keep)
    cls = (sd["cls_token"] + sd["pos_embed"][:, :1]).expand(x.shape[0], -1, -1)
    x = torch.cat([cls, x], dim=1)
    for i in range(VIT["depth"]):
        x = vit_block(x, sd, f"blocks.{i}", VIT["heads"])
    return x


def classify(tokens, sd):
    """Both fine-tuning heads with global pooling: mean token, fc_norm, head."""
    return lin(ln(tokens.mean(1), sd, "fc_norm", LN_EPS), sd, "head")


# --- state dicts in the official names ----------------------------------------------------------


def _weights(shapes: dict[str, tuple], seed: int) -> dict[str, torch.Tensor]:
    """Random tensors: weights ~ N(0, 1/fan_in), LayerNorm scales 1 + N(0, 0.1), biases N(0, 0.02)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, shape in shapes.items():
        if name.endswith(".bias"):
            sd[name] = torch.randn(shape, generator=g) * 0.02
        elif name.endswith(".weight") and "norm" in name.split(".")[-2]:
            sd[name] = 1 + torch.randn(shape, generator=g) * 0.1
        else:
            fan_in = math.prod(shape[1:]) or 1
            sd[name] = torch.randn(shape, generator=g) / math.sqrt(fan_in)
    return sd


def _ln(p, d):
    return {f"{p}.weight": (d,), f"{p}.bias": (d,)}


def _lin(p, out, inp, k=()):
    return {f"{p}.weight": (out, inp, *k), f"{p}.bias": (out,)}


def _vit_block_shapes(p, d):
    return {**_ln(f"{p}.norm1", d), **_lin(f"{p}.attn.qkv", 3 * d, d), **_lin(f"{p}.attn.proj", d, d),
            **_ln(f"{p}.norm2", d), **_lin(f"{p}.mlp.fc1", 4 * d, d), **_lin(f"{p}.mlp.fc2", d, 4 * d)}


def _decoder_shapes(d, pixels):
    dd = DEC["dim"]
    shapes = {**_lin("decoder_embed", dd, d), "mask_token": (1, 1, dd), **_ln("decoder_norm", dd),
              **_lin("decoder_pred", pixels, dd)}
    for i in range(DEC["depth"]):
        shapes.update(_vit_block_shapes(f"decoder_blocks.{i}", dd))
    return shapes


def convmae_state(stage: str, seed: int = 0, classes: int = 10) -> dict[str, torch.Tensor]:
    """A ConvMAE checkpoint's state dict: `pretrain` (models_convmae) or `finetune` (models_convvit
    with global pooling: fc_norm in place of norm, and a head)."""
    (d1, d2, d), n = CONV["dims"], (S // 16) ** 2
    shapes = {**_lin("patch_embed1.proj", d1, 3, (4, 4)), **_ln("patch_embed1.norm", d1),
              **_lin("patch_embed2.proj", d2, d1, (2, 2)), **_ln("patch_embed2.norm", d2),
              **_lin("patch_embed3.proj", d, d2, (2, 2)), **_ln("patch_embed3.norm", d),
              **_lin("patch_embed4", d, d)}
    for stage_i, c, depth in ((1, d1, CONV["depths"][0]), (2, d2, CONV["depths"][1])):
        for i in range(depth):
            p = f"blocks{stage_i}.{i}"
            shapes.update({**_ln(f"{p}.norm1", c), **_lin(f"{p}.conv1", c, c, (1, 1)),
                           **_lin(f"{p}.attn", c, 1, (5, 5)), **_lin(f"{p}.conv2", c, c, (1, 1)),
                           **_ln(f"{p}.norm2", c), **_lin(f"{p}.mlp.fc1", 4 * c, c, (1, 1)),
                           **_lin(f"{p}.mlp.fc2", c, 4 * c, (1, 1))})
    for i in range(CONV["depths"][2]):
        shapes.update(_vit_block_shapes(f"blocks3.{i}", d))
    if stage == "pretrain":
        shapes.update({**_ln("norm", d), **_lin("stage1_output_decode", d, d1, (4, 4)),
                       **_lin("stage2_output_decode", d, d2, (2, 2)), **_decoder_shapes(d, 768)})
    else:
        shapes.update({**_ln("fc_norm", d), **_lin("head", classes, d), "pos_embed": (1, n, d)})
    sd = _weights(shapes, seed)
    if stage == "pretrain":  # fixed sin-cos position embeddings, without a [CLS] slot
        sd["pos_embed"], sd["decoder_pos_embed"] = sincos_2d(d, S // 16, False), sincos_2d(DEC["dim"], S // 16, False)
    return sd


def mae_state(stage: str, seed: int = 0, classes: int = 10) -> dict[str, torch.Tensor]:
    """A MAE checkpoint's state dict: `pretrain` (models_mae) or `finetune` (models_vit, global pool)."""
    d, p, n = VIT["dim"], VIT["patch"], (S // VIT["patch"]) ** 2
    shapes = {**_lin("patch_embed.proj", d, 3, (p, p)), "cls_token": (1, 1, d)}
    for i in range(VIT["depth"]):
        shapes.update(_vit_block_shapes(f"blocks.{i}", d))
    if stage == "pretrain":
        shapes.update({**_ln("norm", d), **_decoder_shapes(d, p * p * 3)})
    else:
        shapes.update({**_ln("fc_norm", d), **_lin("head", classes, d), "pos_embed": (1, n + 1, d)})
    sd = _weights(shapes, seed)
    if stage == "pretrain":
        sd["pos_embed"], sd["decoder_pos_embed"] = sincos_2d(d, S // p, True), sincos_2d(DEC["dim"], S // p, True)
    return sd


def save_pth(sd: dict, path: Path, **extra) -> Path:
    torch.save({"model": sd, **extra}, path)
    return path


def images(seed: int = 0) -> torch.Tensor:
    """Two normalised images and a low-contrast one (a mid-grey, all but flat), on which the conv
    stages' LayerNorm eps shows."""
    g = torch.Generator().manual_seed(seed)
    ordinary = torch.randn(2, 3, S, S, generator=g)
    flat = 1e-3 * torch.randn(1, 3, S, S, generator=g)
    return torch.cat([ordinary, flat])


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 2e-5) -> float:
    err = float((a - b).abs().max())
    assert err <= tol * max(1.0, float(b.abs().max())), err
    return err


# --- the tests ----------------------------------------------------------------------------------


def test_convmae_pretraining_checkpoint_gives_convmaes_latent_predictions_and_loss(tmp_path):
    from mrmae.train.models import create_model
    from mrmae.train.restore import load_student

    sd = convmae_state("pretrain")
    path = save_pth(sd, tmp_path / "convmae_pretrain.pth")
    student = load_student(path).model  # the kind from the tensor names
    assert type(student).__name__ == "MRConvViT" and student.cfg.conv_norm_eps == CONV_LN_EPS
    assert len(student.state_dict()) == len(sd)  # every tensor landed (the load is strict too)

    imgs = images()
    keep, mask, restore = masking(3, (S // 16) ** 2, seed=1)
    with torch.no_grad():
        latent = convmae_encoder(sd, imgs, keep, mask)
        pred = decoder(latent, sd, restore, prefix=0)
        loss = pixel_loss(imgs, pred, mask)
        ours_latent, _ = student.forward_encoder(imgs, keep)
        ours_pred = student.forward_decoder(ours_latent, restore)
        ours = student(imgs, keep, restore, mask.bool())
    _close(ours_latent, latent)
    _close(ours_pred, pred)
    _close(ours["loss_recon"], loss, 1e-5)

    # the counter-check: the conv stages at mrmae's former eps (1e-6) miss on the low-contrast image
    old = create_model("mrmae_convvit_tiny", img_size=S, teacher_dim=0, decoder_embed_dim=DEC["dim"],
                       decoder_depth=DEC["depth"], conv_norm_eps=1e-6)
    old.load_state_dict(student.state_dict())
    with torch.no_grad():
        old_pred = old.forward_decoder(old.forward_encoder(imgs, keep)[0], restore)
    assert (old_pred[2] - pred[2]).abs().max() > 1e-3 > 100 * (ours_pred[2] - pred[2]).abs().max()

    # its encoder in timm (export / finetune / eval): ConvMAE's fine-tuning trunk, unmasked
    from mrmae.train.downstream.export import read_encoder

    encoder = read_encoder(path)
    assert "decoder_blocks.* (" in encoder.note and "fuse1.* (2)" in encoder.note and "mask_token" in encoder.note
    unused = {k for k in sd if k.startswith(("decoder", "mask_token", "stage1_output", "stage2_output"))}
    assert len(encoder.tensors) == len(sd) - len(unused)
    with torch.no_grad():
        tokens = encoder.load().forward_features(imgs)
    _close(tokens, ln(convmae_encoder(sd, imgs), sd, "norm", LN_EPS))


def test_convmae_finetuned_checkpoint_gives_convmaes_logits(tmp_path):
    from mrmae.train.downstream.export import read_encoder

    sd = convmae_state("finetune", seed=3)
    path = save_pth(sd, tmp_path / "convmae_finetuned.pth")
    encoder = read_encoder(path, "convmae")
    assert encoder.num_classes == 10 and encoder.timm_kwargs["fc_norm"] is True and len(encoder.tensors) == len(sd)
    imgs = images(1)
    with torch.no_grad():
        logits = encoder.load()(imgs)
    _close(logits, classify(convmae_encoder(sd, imgs), sd))


def test_mae_pretraining_checkpoint_gives_maes_latent_predictions_and_loss(tmp_path):
    from mrmae.train.downstream.export import read_encoder
    from mrmae.train.restore import load_student

    sd = mae_state("pretrain", seed=5)
    # a training checkpoint as main_pretrain.py saves it: the run's args (a Namespace) and more beside the model
    path = save_pth(sd, tmp_path / "checkpoint-399.pth", epoch=399, args=argparse.Namespace(model="mae_vit_base"))
    student = load_student(path).model
    assert type(student).__name__ == "MRMAE" and len(student.state_dict()) == len(sd)
    imgs = images(2)
    keep, mask, restore = masking(3, (S // 16) ** 2, seed=2)
    with torch.no_grad():
        latent = ln(mae_encoder(sd, imgs, keep), sd, "norm", LN_EPS)
        pred = decoder(latent, sd, restore, prefix=1)
        loss = pixel_loss(imgs, pred, mask)
        ours_latent, _ = student.forward_encoder(imgs, keep)
        ours = student(imgs, keep, restore, mask.bool())
        ours_pred = student.forward_decoder(ours_latent, restore)
    _close(ours_latent, latent)
    _close(ours_pred, pred)
    _close(ours["loss_recon"], loss, 1e-5)

    encoder = read_encoder(path)  # timm's own VisionTransformer, every patch visible
    assert encoder.timm_model == "mrmae_vit_tiny_patch16" and "decoder_embed.* (2)" in encoder.note
    with torch.no_grad():
        _close(encoder.load().forward_features(imgs), ln(mae_encoder(sd, imgs), sd, "norm", LN_EPS))


def test_mae_finetuned_checkpoint_gives_maes_logits(tmp_path):
    from mrmae.train.downstream.export import read_encoder

    sd = mae_state("finetune", seed=7)
    encoder = read_encoder(save_pth(sd, tmp_path / "mae_finetuned_vit.pth"), "mae")
    assert encoder.num_classes == 10 and encoder.timm_kwargs["global_pool"] == "avg"
    imgs = images(3)
    with torch.no_grad():
        logits = encoder.load()(imgs)
    tokens = mae_encoder(sd, imgs)[:, 1:]  # MAE's global pool leaves the [CLS] token out
    _close(logits, classify(tokens, sd))


def test_official_checkpoints_export_evaluate_and_fine_tune(demo_shards, tmp_path):
    """export writes them in the hub layout (a fine-tuned one with its head); finetune starts
    from one (its head replaced, fc_norm kept); eval probes one."""
    import timm

    ft = save_pth(convmae_state("finetune", seed=3, classes=10), tmp_path / "convmae_ft.pth")
    r = CliRunner().invoke(cli, ["export", "--checkpoint", str(ft), "--out", str(tmp_path / "e")])
    assert r.exit_code == 0, r.output + repr(r.exception)
    assert "head of 10 classes" in r.stdout and "a ConvMAE fine-tuned checkpoint" in r.stderr
    config = json.loads((tmp_path / "e" / "config.json").read_text())
    assert config["num_classes"] == 10 and config["model_args"]["fc_norm"] is True
    assert config["mrmae"]["source_checkpoint"] == "../convmae_ft.pth" and config["mrmae"]["source_run"] is None
    model = timm.create_model(f"local-dir:{tmp_path / 'e'}", pretrained=True).eval()
    imgs = images(1)
    sd = convmae_state("finetune", seed=3)
    with torch.no_grad():
        _close(model(imgs), classify(convmae_encoder(sd, imgs), sd))

    from mrmae.train.downstream.finetune import build_classifier

    clf, _ = build_classifier(ft, 16)
    state = clf.state_dict()
    assert torch.equal(state["fc_norm.weight"], sd["fc_norm.weight"]) and state["head.weight"].shape == (16, 192)
    assert torch.equal(state["stage1.0.dwconv.weight"], sd["blocks1.0.attn.weight"])

    pre = save_pth(mae_state("pretrain"), tmp_path / "mae_pretrain.pth")
    r = CliRunner().invoke(cli, ["eval", "knn", "--checkpoint", str(pre), "--shards", str(demo_shards[1]),
                                 "--val-shards", str(demo_shards[2]), "--k", "3", "--no-progress"])
    assert r.exit_code == 0, r.output + repr(r.exception)
    assert json.loads((tmp_path / "eval.jsonl").read_text())["feature"] == "cls"


def test_pretrain_init_from_maes_checkpoint_uses_encoder_and_decoder(demo_shards, tmp_path):
    from mrmae.train.models import create_model
    from mrmae.train.restore import init_from

    sd = mae_state("pretrain")
    pth = save_pth(sd, tmp_path / "mae.pth")
    model = create_model("mrmae_vit_tiny_patch16", img_size=S, teacher_dim=24, decoder_embed_dim=DEC["dim"],
                         decoder_depth=DEC["depth"])
    note = init_from(model, "mrmae_vit_tiny_patch16", pth)
    assert f"{len(sd)} tensors loaded" in note and "kept at their initialisation: mimic_head.* (2)" in note
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in sd.items())

    ft = save_pth(mae_state("finetune"), tmp_path / "mae_ft.pth")
    note = init_from(model, "mrmae_vit_tiny_patch16", ft)
    assert "not used: fc_norm.* (2), head.* (2)" in note and "norm.* (2)" in note and "decoder_embed.* (2)" in note

    # MAE's published pretrained encoders leave the decoder out: the student's stays at its init
    encoder_only = {k: v for k, v in sd.items() if not k.startswith(("decoder", "mask_token"))}
    released = save_pth(encoder_only, tmp_path / "mae_pretrain_vit.pth")
    note = init_from(model, "mrmae_vit_tiny_patch16", released)
    assert "a MAE pretrained encoder checkpoint" in note and "decoder_blocks.* (" in note and "not used" not in note
    from mrmae.train.restore import load_student

    with pytest.raises(Exception, match="has no decoder"):
        load_student(released)

    small = create_model("mrmae_vit_tiny_patch16", img_size=S, decoder_embed_dim=32, decoder_depth=DEC["depth"])
    with pytest.raises(Exception, match="decoder_embed.weight .*--decoder-dim"):
        init_from(small, "mrmae_vit_tiny_patch16", pth)

    # through the command line: the note, then training from those weights (plain MAE, 64 px)
    out = tmp_path / "run"
    r = CliRunner().invoke(cli, ["pretrain", "--shards", str(demo_shards[0]), "--out", str(out), "--init", str(pth),
                                 "--model", "mrmae_vit_tiny_patch16", "--decoder-dim", "64", "--decoder-depth", "2",
                                 "--batch-size", "6", "--epochs", "1", "--workers", "0", "--no-progress"])
    assert r.exit_code == 1 and "pos_embed" in r.stderr, r.output  # the checkpoint is 64 px, the model 224 px
    conv = save_pth(convmae_state("pretrain"), tmp_path / "convmae.pth")
    r = CliRunner().invoke(cli, ["pretrain", "--shards", str(demo_shards[0]), "--out", str(out), "--init", str(conv),
                                 "--model", "mrmae_vit_tiny_patch16", "--no-progress"])
    assert r.exit_code == 1 and "a convvit encoder; --model mrmae_vit_tiny_patch16 is a vit" in r.stderr, r.output
    assert not out.exists()


def _crafted(tmp_path: Path, kind: str) -> Path:
    path = tmp_path / f"{kind}.pth"
    sd = mae_state("finetune")
    if kind == "extra tensor":
        save_pth({**sd, "dist_token": torch.zeros(1, 1, 192)}, path)
    elif kind == "object":
        torch.save({"model": sd, "hook": argparse.ArgumentParser}, path)
    elif kind == "truncated":
        save_pth(sd, path)
        path.write_bytes(path.read_bytes()[:5000])
    elif kind == "not a state dict":
        torch.save({"model": [1, 2]}, path)
    elif kind == "neither":
        save_pth({"conv.weight": torch.zeros(1)}, path)
    elif kind == "gap in blocks":
        save_pth({k: v for k, v in sd.items() if not k.startswith("blocks.3.")}, path)
    elif kind == "fifo":
        os.mkfifo(path)
    return path


@pytest.mark.parametrize("kind, words", [
    ("extra tensor", "tensors that a mae checkpoint does not have: dist_token"),
    ("object", "refused, not unpickled"), ("truncated", "not a readable torch checkpoint"),
    ("not a state dict", "no state dict"), ("neither", "neither a MAE checkpoint"),
    ("gap in blocks", "not a whole mae finetune checkpoint"), ("fifo", "not a regular file"),
    ("named wrongly", "--checkpoint-format convmae, but its tensor names are mae's")])
def test_an_official_checkpoint_that_is_not_one_is_one_line(tmp_path, kind, words):
    path = _crafted(tmp_path, "extra tensor" if kind == "named wrongly" else kind)
    if kind == "named wrongly":
        path = save_pth(mae_state("finetune"), tmp_path / "ok.pth")
    fmt = ["--checkpoint-format", "convmae"] if kind == "named wrongly" else ["--checkpoint-format", "auto"]
    if kind == "fifo":
        fmt = ["--checkpoint-format", "mae"]
    r = CliRunner().invoke(cli, ["export", "--checkpoint", str(path), *fmt, "--out", str(tmp_path / "e")])
    assert r.exit_code == 1 and words in r.stderr and str(path) in r.stderr, r.output
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "e").exists()

"""The ConvViT student: block-wise masking, registry and sizes, no leaks (both students), fusion,
focused masking with a real teacher's attention, and `mrmae pretrain` end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import DINO_TINY, url_list
from safetensors.torch import load_file

from mrmae.cli import cli, main
from mrmae.train.students.convvit import CONVVIT_ARCHS, ConvViTConfig, MaskedConvBlock, MRConvViT
from mrmae.train.masking import blockwise_visible_maps
from mrmae.train.masks.focused import focused_masking
from mrmae.train.masks.random import random_masking
from mrmae.train.models import PAPER_BASE_PARAMS, create_model, model_config
from mrmae.train.students.vit import MRMAE
from mrmae.train.student import gather_visible

SMALL_DECODER = dict(decoder_depth=1, decoder_embed_dim=64, decoder_num_heads=2)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These models are small: on a busy 2-core machine two OpenMP threads mostly wait at
    barriers (measured 5x slower than one), so this module runs single-threaded."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def inputs(model, b: int = 2, seed: int = 0, teacher_dim: int = 0):
    g = gen(seed)
    s = model.img_size
    imgs = torch.randn(b, 3, s, s, generator=g)
    keep, mask, restore = random_masking(b, model.num_patches, 0.75, generator=g)
    targets = torch.randn(b, keep.shape[1], teacher_dim, generator=g) if teacher_dim else None
    return imgs, keep, mask, restore, targets


# --- block-wise multi-scale masking ----------------------------------------------------------

@pytest.mark.parametrize("ratio", [0.75, 0.5])
def test_blockwise_maps_cover_exactly_their_blocks(ratio):
    keep, mask, _ = random_masking(3, 196, ratio, generator=gen(0))
    m56, m28, m14, px = blockwise_visible_maps(mask, (4, 2, 1, 16))
    assert m56.shape == (3, 1, 56, 56) and m28.shape == (3, 1, 28, 28) and px.shape == (3, 1, 224, 224)
    assert m56.dtype == torch.float32
    grid = (~mask).float().reshape(3, 14, 14)
    assert torch.equal(m14[:, 0], grid)
    for s, m in ((4, m56), (2, m28), (16, px)):
        blocks = m[:, 0].reshape(3, 14, s, 14, s)  # [b, row, dy, col, dx]
        # each token cell is one constant s x s block holding that token's visibility
        assert torch.equal(blocks, grid[:, :, None, :, None].expand_as(blocks))
        assert torch.equal(m.mean((1, 2, 3)), (~mask).float().mean(1))  # visible fraction kept
    assert torch.equal(m56.mean((1, 2, 3)), torch.full((3,), keep.shape[1] / 196))
    r, c = divmod(int(keep[1, 0]), 14)  # one visible token by hand
    assert m56[1, 0, 4 * r:4 * r + 4, 4 * c:4 * c + 4].eq(1).all() and m56[1].sum() == 16 * keep.shape[1]
    with pytest.raises(ValueError):
        blockwise_visible_maps(torch.zeros(2, 195, dtype=torch.bool))


# --- registry and sizes ----------------------------------------------------------------------

def hand_count(dims, depths, ratios, k: int = 5) -> tuple[int, int]:
    """(backbone, fusion convs) parameter counts written out layer by layer."""
    d1, d2, d = dims

    def embed(cin: int, cout: int, s: int) -> int:  # conv + LayerNorm
        return cin * cout * s * s + cout + 2 * cout

    def conv_block(c: int, r: float) -> int:  # LN, 1x1, kxk depth-wise, 1x1, LN, 1x1 up, 1x1 down
        h = int(c * r)
        return 2 * c + (c * c + c) + (k * k * c + c) + (c * c + c) + 2 * c + (c * h + h) + (h * c + c)

    def vit_block(c: int, r: float) -> int:  # LN, qkv, proj, LN, fc1, fc2
        h = int(c * r)
        return 2 * c + (3 * c * c + 3 * c) + (c * c + c) + 2 * c + (c * h + h) + (h * c + c)

    backbone = (embed(3, d1, 4) + depths[0] * conv_block(d1, ratios[0]) + embed(d1, d2, 2)
                + depths[1] * conv_block(d2, ratios[1]) + embed(d2, d, 2) + (d * d + d)
                + depths[2] * vit_block(d, ratios[2]) + 2 * d)
    return backbone, (d1 * d * 16 + d) + (d2 * d * 4 + d)


@pytest.mark.parametrize("name", list(CONVVIT_ARCHS))
def test_registry_geometry_and_counts(name):
    with torch.device("meta"):
        m = create_model(name)
    c = m.cfg
    assert isinstance(m, MRConvViT) and isinstance(c, ConvViTConfig) and model_config(name) == c
    assert (m.img_size, m.patch_size, m.grid_size, m.num_patches) == (224, 16, 14, 196)
    assert (m.patch_embed.grid_size[0], m.patch_embed.img_size[0], m.patch_embed.num_patches) == (14, 224, 196)
    assert (c.decoder_embed_dim, c.decoder_depth, c.embed_dim, c.depth) == (512, 8, c.embed_dims[2], c.depths[2])
    backbone, fusion = hand_count(c.embed_dims, c.depths, c.mlp_ratios)
    assert m.backbone_num_params() == backbone and m.encoder_num_params() == backbone + fusion


def test_base_sizes_match_the_papers():
    """ConvMAE and MR-MAE list 88M for every base encoder. Counted here as what computes the latent
    (no decoder, no mimic head, fixed pos-embeds out): ViT-B 85.6M, ConvViT-B 88.8M (84.5M backbone +
    4.3M stage-1/2 fusion convs, which only pre-training has)."""
    with torch.device("meta"):
        vit, conv = create_model("mrmae_vit_base_patch16"), create_model("mrmae_convvit_base")
    assert vit.encoder_num_params() == 85_647_360
    assert conv.encoder_num_params() == 88_782_208 and conv.backbone_num_params() == 84_455_296
    for n in (vit.encoder_num_params(), conv.encoder_num_params()):
        assert abs(n / PAPER_BASE_PARAMS - 1) < 0.04


def test_config_validation():
    assert ConvViTConfig(fuse_layers=(11, 4, 8, 4)).fuse_layers == (4, 8, 11)
    for bad in [dict(fuse_layers=(4, 8, 12)), dict(fuse_layers=(4,)), dict(img_size=100), dict(depths=(2, 11)),
                dict(kernel_size=4)]:
        with pytest.raises(ValueError):
            ConvViTConfig(**bad)
    with pytest.raises(TypeError):
        model_config("mrmae_convvit_tiny", patch_size=8)  # fixed by the stage strides


# --- forward, fusion, gradients -------------------------------------------------------------

@pytest.mark.parametrize("name", ["mrmae_convvit_tiny", "mrmae_convvit_small"])
def test_forward_shapes_and_every_parameter_trains(name):
    torch.manual_seed(0)
    m = create_model(name, img_size=64, teacher_dim=24, **SMALL_DECODER)
    imgs, keep, mask, restore, targets = inputs(m, teacher_dim=24)
    latent, visible = m.forward_encoder(imgs, keep)
    assert latent.shape == visible.shape == (2, 4, m.cfg.embed_dims[2])  # 16 tokens, 4 visible, no cls
    assert m.forward_decoder(latent, restore).shape == (2, 16, 768)
    assert m.forward_mimic(visible).shape == (2, 4, 24)
    out = m(imgs, keep, restore, mask, targets, recon_weight=0.3, mimic_weight=0.7)
    recon = m.recon_loss(imgs, m.forward_decoder(latent, restore), mask)
    torch.testing.assert_close(out["loss"], 0.3 * recon + 0.7 * m.mimic_loss(m.forward_mimic(visible), targets))
    out["loss"].backward()
    dead = [n for n, p in m.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not dead, dead
    assert m.no_weight_decay() <= set(m.state_dict())


@pytest.mark.parametrize("fuse", [(), (2, 7, 11)])
def test_fusion_adds_stage_outputs_then_norms_once(fuse):
    torch.manual_seed(0)
    m = create_model("mrmae_convvit_tiny", img_size=64, fuse_layers=fuse, **SMALL_DECODER)
    imgs, keep, mask, restore, _ = inputs(m)
    seen: dict = {}
    mods = {**{i: blk for i, blk in enumerate(m.blocks, start=1)}, "f1": m.fuse1, "f2": m.fuse2}
    hooks = [mod.register_forward_hook(lambda mod, a, o, k=k: seen.__setitem__(k, o)) for k, mod in mods.items()]
    latent, _ = m.forward_encoder(imgs, keep)
    for h in hooks:
        h.remove()
    stage3 = sum(seen[i] for i in (fuse or (11,)))
    multi = gather_visible((seen["f1"] + seen["f2"]).flatten(2).transpose(1, 2), keep)
    assert seen["f1"].shape == seen["f2"].shape == (2, 192, 4, 4)
    torch.testing.assert_close(latent, m.norm(stage3 + multi))


# --- no information from masked pixels: both students ---------------------------------------

STUDENTS = {
    "vit": lambda: create_model("mrmae_vit_tiny_patch16", img_size=96, **SMALL_DECODER),
    "convvit": lambda: create_model("mrmae_convvit_tiny", img_size=96, fuse_layers=(3, 11), **SMALL_DECODER),
}


@pytest.mark.parametrize("student", list(STUDENTS))
def test_masked_pixels_do_not_reach_the_encoder(student):
    torch.manual_seed(0)
    m = STUDENTS[student]().eval()
    imgs, keep, mask, restore, _ = inputs(m, seed=1)  # 36 tokens, 9 visible: masked ones border visible ones
    patches = m.patchify(imgs)
    with torch.no_grad():
        latent, visible = m.forward_encoder(imgs, keep)
        leaked = patches.clone()
        leaked[mask] = torch.randn(int(mask.sum()), patches.shape[-1], generator=gen(2)) * 10
        latent2, visible2 = m.forward_encoder(m.unpatchify(leaked), keep)
        torch.testing.assert_close(latent2, latent, rtol=0, atol=1e-6)
        torch.testing.assert_close(visible2, visible, rtol=0, atol=1e-6)
        changed = patches.clone()
        changed[0, keep[0, 0]] += 1.0  # a visible patch: the test must be able to see a change
        assert not torch.allclose(m.forward_encoder(m.unpatchify(changed), keep)[1][0], visible[0], atol=1e-4)


@pytest.mark.parametrize("where", ["masked", "visible"])
def test_masked_positions_inside_the_conv_stages_stay_unread(where):
    """The pixel mask alone already hides masked pixels; this checks the later guards: noise
    written into the masked cells of the stage-1/2 feature maps must not move a visible output."""
    torch.manual_seed(0)
    m = STUDENTS["convvit"]().eval()
    imgs, keep, mask, _, _ = inputs(m, seed=1)
    maps = dict(zip(("embed1", "embed2"), blockwise_visible_maps(mask, (4, 2))))
    region = {k: (1 - v) if where == "masked" else v for k, v in maps.items()}
    g = gen(3)

    def poke(name):
        return lambda mod, args, out: out + 10 * torch.randn(out.shape, generator=g) * region[name]

    with torch.no_grad():
        base = m.forward_encoder(imgs, keep)[0]
        hooks = [getattr(m, name).register_forward_hook(poke(name)) for name in maps]
        poked = m.forward_encoder(imgs, keep)[0]
        for h in hooks:
            h.remove()
    if where == "masked":
        torch.testing.assert_close(poked, base, rtol=0, atol=1e-6)
    else:  # the counter-check: the same noise on visible cells does arrive
        assert not torch.allclose(poked, base, atol=1e-4)


def test_the_visible_map_is_what_stops_the_depthwise_conv_leaking():
    torch.manual_seed(0)
    blk = MaskedConvBlock(8, 4.0).eval()
    x = torch.randn(1, 8, 8, 8)
    visible = torch.zeros(1, 1, 8, 8)
    visible[..., :4, :] = 1.0  # top half visible
    poked = x.clone()
    poked[..., 4, :] += 5 * torch.randn(8, 8)  # the first masked row, next to the visible rows (not a
    # per-position constant, which the LayerNorm would remove)
    with torch.no_grad():
        same = blk(poked, visible)[..., :4, :] - blk(x, visible)[..., :4, :]
        mixed = blk(poked, torch.ones_like(visible))[..., :4, :] - blk(x, torch.ones_like(visible))[..., :4, :]
    assert same.abs().max() == 0
    assert mixed.abs().max() > 1e-3  # without the mask the 5x5 conv would carry it across


# --- focused masking from a real teacher's 14x14 attention -----------------------------------

def test_focused_masking_with_teacher_attention_trains_the_convvit():
    from mrmae.shared.teachers.base import build_teacher

    teacher = build_teacher(DINO_TINY).eval()
    torch.manual_seed(0)
    m = create_model("mrmae_convvit_tiny", teacher_dim=teacher.dim, **SMALL_DECODER)
    imgs = torch.randn(2, 3, 224, 224, generator=gen(0))
    with torch.no_grad():
        out = teacher(imgs)
    assert out.attention.shape == (2, m.num_patches)
    keep, mask, restore = focused_masking(out.attention.float(), 0.75, generator=gen(1))
    seen = {}
    h = m.stage1[0].register_forward_pre_hook(lambda mod, a: seen.__setitem__("vis", a[1]))
    losses = m(imgs, keep, restore, mask, gather_visible(out.features.float(), keep))
    h.remove()
    assert torch.equal(seen["vis"], blockwise_visible_maps(mask, (4,))[0])  # the 14x14 draw, blown up to 56x56
    losses["loss"].backward()
    assert losses["loss_mimic"] > 0 and torch.isfinite(losses["loss"])
    for p in (m.embed1.proj.weight, m.stage1[0].dwconv.weight, m.fuse1.weight, m.mimic_head.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0


# --- `mrmae pretrain --model mrmae_convvit_tiny` end to end ------------------------------------

TINY = ["--model", "mrmae_convvit_tiny", "--decoder-depth", "1", "--decoder-dim", "64", "--batch-size", "6",
        "--workers", "0", "--no-progress", "--seed", "3", "--lr", "1e-3"]


def metrics(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]


def test_pretrain_plain_mae_through_main(demo_shards, tmp_path):
    out = tmp_path / "plain"
    with pytest.raises(SystemExit) as e:
        main(["pretrain", "--shards", url_list(demo_shards), "--out", str(out), *TINY])
    assert e.value.code == 0
    rows = metrics(out)
    assert len(rows) == 3  # 18 images / batch 6
    assert all(r["loss_mimic"] == 0 and r["loss"] == r["loss_recon"] and 0 < r["loss"] < 10 for r in rows)
    assert json.loads((out / "config.json").read_text())["model"] == "mrmae_convvit_tiny"
    state = load_file(str(next((out / "checkpoints").glob("step*")) / "model.safetensors"))
    fresh = create_model("mrmae_convvit_tiny", decoder_depth=1, decoder_embed_dim=64)
    fresh.load_state_dict(state, strict=True)
    assert not isinstance(fresh, MRMAE) and "fuse1.weight" in state


def test_paper_model_end_to_end_cache_focused_fused_pretrain_export_knn_finetune(demo_shards, tmp_path):
    from mrmae.extract.config import ExtractConfig
    from mrmae.extract.runner import run_extraction
    from mrmae.shared.views import ViewConfig

    cache = tmp_path / "cache"
    run_extraction(ExtractConfig(shards=str(demo_shards[0]), out=str(cache), teacher=DINO_TINY,
                                 views=ViewConfig(per_image=2, seed=3), progress=False))
    out = tmp_path / "cached"
    r = CliRunner().invoke(cli, ["pretrain", "--shards", str(demo_shards[0]), "--feature-cache", str(cache),
                                 "--out", str(out), *TINY, "--mask", "focused", "--fuse-layers", "4,8,11",
                                 "--target-norm", "layernorm"])
    assert r.exit_code == 0, r.output + repr(r.exception)
    rows = metrics(out)
    assert rows and all(0 < r["loss_mimic"] < 10 and 0 < r["loss_recon"] < 10 for r in rows)
    for row in rows:
        assert row["loss"] == pytest.approx(0.5 * row["loss_recon"] + 0.5 * row["loss_mimic"], rel=1e-5)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["fuse_layers"] == [4, 8, 11] and cfg["teacher_dim"] == 192

    # ... and on to the end, as issue 13 asks of the paper's main model: export, plain timm
    # with the students' preprocessing, kNN from the export, one epoch of fine-tuning.
    import timm

    r = CliRunner().invoke(cli, ["export", "--checkpoint", str(out), "--out", str(tmp_path / "enc")])
    assert r.exit_code == 0, r.output
    assert "mrmae: note: pretraining fused the stage-1/2 maps and blocks 4,8,11" in r.stderr
    call = next(ln for ln in r.stdout.splitlines() if ln.startswith("load with: ")).split("model = ", 1)[1]
    model = eval(call, {"timm": timm})  # the printed call, as printed
    data_cfg = timm.data.resolve_data_config({}, model=model)
    assert (tuple(data_cfg["mean"]), tuple(data_cfg["std"])) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert model(torch.zeros(1, 3, 224, 224)).shape == (1, 192)  # a backbone: num_classes 0

    knn = ["eval", "knn", "--checkpoint", str(tmp_path / "enc"), "--shards", str(demo_shards[1]),
           "--val-shards", str(demo_shards[2]), "--k", "3", "--results", str(tmp_path / "eval.jsonl")]
    r = CliRunner().invoke(cli, knn)
    assert r.exit_code == 0, r.output
    rec = json.loads((tmp_path / "eval.jsonl").read_text())
    assert (rec["feature"], rec["n_train"], rec["n_val"]) == ("mean", 6, 6) and 0 <= rec["top1"] <= 100

    ft = ["finetune", "--checkpoint", str(tmp_path / "enc" / "model.safetensors"), "--shards", str(demo_shards[1]),
          "--val-shards", str(demo_shards[2]), "--out", str(tmp_path / "ft"), "--num-classes", "16", "--epochs", "1",
          "--batch-size", "2", "--warmup-epochs", "0", "--workers", "0", "--no-progress"]
    r = CliRunner().invoke(cli, ft)
    assert r.exit_code == 0, r.output + repr(r.exception)
    evals = [m for m in metrics(tmp_path / "ft") if "top1" in m]
    assert len(evals) == 1 and evals[0]["n_val"] == 6
    assert json.loads((tmp_path / "ft" / "config.json").read_text())["timm_model"] == "mrmae_convvit_tiny"


def test_a_run_from_before_the_conv_eps_was_recorded_resumes_with_its_own(demo_shards, tmp_path):
    """A ConvViT run whose config.json records no model_config had eps 1e-6 in its conv stages:
    --resume goes on with it (and records it); a new run records ConvMAE's 1e-5."""
    out = tmp_path / "run"
    args = ["pretrain", "--shards", str(demo_shards[0]), "--out", str(out), *TINY]
    r = CliRunner().invoke(cli, [*args, "--epochs", "1"])
    assert r.exit_code == 0, r.output + repr(r.exception)
    config = json.loads((out / "config.json").read_text())
    assert config["model_config"] == {"conv_norm_eps": 1e-5}
    del config["model_config"]  # as a run from before wrote it
    (out / "config.json").write_text(json.dumps(config))
    r = CliRunner().invoke(cli, [*args, "--epochs", "2", "--resume"])
    assert r.exit_code == 0, r.output + repr(r.exception)
    assert json.loads((out / "config.json").read_text())["model_config"] == {"conv_norm_eps": 1e-6}
    assert len(metrics(out)) == 2

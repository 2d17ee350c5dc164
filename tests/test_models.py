"""The MR-MAE student: registry, shapes, losses against hand computations, fusion, no leaks."""

from __future__ import annotations

import re

import pytest
import timm
import torch

from mrmae.train.masks.random import random_masking
from mrmae.train.students.vit import MRMAE, MRMAEConfig
from mrmae.train.models import create_model, describe_models
from mrmae.train.student import gather_visible, sincos_pos_embed
from mrmae.train.students.registry import families, family_of, student_names

SMALL = dict(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, decoder_embed_dim=32,
             decoder_depth=1, decoder_num_heads=2, teacher_dim=24)  # N = 16 tokens


def small_model(seed: int = 0, **kw) -> MRMAE:
    torch.manual_seed(seed)
    return MRMAE(MRMAEConfig(**{**SMALL, **kw}))


def batch(model: MRMAE, b: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    s = model.cfg.img_size
    imgs = torch.randn(b, 3, s, s, generator=g)
    keep, mask, restore = random_masking(b, model.num_patches, 0.75, generator=g)
    targets = torch.randn(b, keep.shape[1], max(model.cfg.teacher_dim, 1), generator=g)
    return imgs, keep, mask, restore, targets


def test_registry_names():
    sizes = ("tiny", "small", "base", "large", "huge")
    assert student_names() == [f"mrmae_vit_{s}_patch16" for s in sizes] + [f"mrmae_convvit_{s}" for s in sizes]
    rows = describe_models()
    assert len(rows) == 11 and rows[0].startswith("params: ")  # how counting works, then one row per model
    assert all(row.startswith(f"{name}: ") for row, name in zip(rows[1:], student_names()))
    with pytest.raises(KeyError):
        create_model("mrmae_vit_giant_patch16")
    with pytest.raises(TypeError):
        create_model("mrmae_vit_tiny_patch16", decoder_width=3)


@pytest.fixture(scope="module")
def printed_sizes() -> dict[str, tuple[float, float]]:
    """`mrmae models` as a user reads it: name -> (encoder, with decoder) in millions."""
    from click.testing import CliRunner

    from mrmae.cli import cli

    r = CliRunner().invoke(cli, ["models"])
    assert r.exit_code == 0, r.output
    found = re.findall(r"^(mrmae_\w+): .*?; encoder ([\d.]+)M.*with decoder 512-d x 8: ([\d.]+)M$", r.output, re.M)
    return {name: (float(enc), float(total)) for name, enc, total in found}


@pytest.mark.parametrize("name", student_names())
def test_every_registered_student_trains_and_becomes_its_timm_encoder_at_a_tiny_size(name, printed_sizes):
    """timm-style: each name of each family, at its family's `tiny` sizes: one loss and its
    gradients, then the encoder's tensors load strictly into `timm.create_model(name)`; at
    its registered size (on the meta device), the parameter counts `mrmae models` prints."""
    family = family_of(name)
    torch.manual_seed(0)
    m = create_model(name, **family.tiny, teacher_dim=8, decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)
    assert isinstance(m, family.student) and isinstance(m.cfg, family.config)
    imgs, keep, mask, restore, targets = batch(m)
    out = m(imgs, keep, restore, mask, targets)
    out["loss"].backward()
    assert all(torch.isfinite(v) for v in out.values())
    assert all(p.grad is not None for p in m.parameters() if p.requires_grad)
    encoder = timm.create_model(name, **family.encoder_kwargs(m.cfg)).eval()
    tensors = {k: v for k, v in m.state_dict().items() if k.startswith(family.encoder_keys)}
    encoder.load_state_dict(tensors, strict=True)
    with torch.no_grad():
        tokens = encoder.forward_features(imgs)
    assert tokens.shape == (2, int(family.cls_token) + m.num_patches, m.cfg.embed_dim)
    with torch.device("meta"):  # the registered default sizes, built without memory
        full, student = timm.create_model(name), create_model(name)
    assert timm.data.resolve_data_config({}, model=full)["crop_pct"] == 0.875
    assert full.state_dict().keys() == {k for k in student.state_dict() if k.startswith(family.encoder_keys)}
    # counted here from the parameter names: the encoder is all but the decoder, mask token and mimic heads
    sizes = {n: p.numel() for n, p in student.named_parameters()}
    encoder = sum(v for n, v in sizes.items() if not n.startswith(("decoder", "mask_token", "mimic_head", "joint")))
    assert printed_sizes[name] == (round(encoder / 1e6, 1), round(sum(sizes.values()) / 1e6, 1))


def test_families_register_their_names_once():
    assert list(families()) == ["vit", "convvit"]
    assert sum(len(f.archs) for f in families().values()) == len(student_names()) == len(set(student_names()))
    assert set(timm.list_models("mrmae_*")) == set(student_names())


@pytest.mark.parametrize("name", ["mrmae_vit_tiny_patch16", "mrmae_vit_small_patch16"])
def test_registry_models_run(name):
    torch.manual_seed(0)
    m = create_model(name, teacher_dim=48)
    c = m.cfg
    assert (c.decoder_embed_dim, c.decoder_depth, c.decoder_num_heads, c.patch_size) == (512, 8, 16, 16)
    imgs, keep, mask, restore, targets = batch(m)
    latent, visible = m.forward_encoder(imgs, keep)
    assert latent.shape == (2, 50, c.embed_dim) and visible.shape == (2, 49, c.embed_dim)
    assert m.forward_decoder(latent, restore).shape == (2, 196, 768)
    assert m.forward_mimic(visible).shape == (2, 49, 48)
    out = m(imgs, keep, restore, mask, targets)
    assert all(torch.isfinite(v) for v in out.values())


@pytest.mark.parametrize("name,timm_name,dim,depth,heads", [
    ("mrmae_vit_base_patch16", "vit_base_patch16_224", 768, 12, 12),
    ("mrmae_vit_large_patch16", "vit_large_patch16_224", 1024, 24, 16),
    ("mrmae_vit_huge_patch16", "vit_huge_patch14_224", 1280, 32, 16),
])
def test_registry_encoder_sizes_match_timm(name, timm_name, dim, depth, heads):
    with torch.device("meta"):
        m = create_model(name)
        ref = timm.create_model(timm_name, patch_size=16, num_classes=0)
    assert (m.cfg.embed_dim, m.cfg.depth, m.cfg.num_heads, m.num_patches) == (dim, depth, heads, 196)
    n_ref = sum(p.numel() for p in ref.parameters()) - ref.pos_embed.numel()  # timm's pos-embed is learned
    assert m.encoder_num_params() == n_ref == 12 * dim * dim * depth + 13 * dim * depth + 768 * dim + 4 * dim
    if name == "mrmae_vit_base_patch16":
        assert n_ref + ref.pos_embed.numel() == 85_798_656  # ViT-B/16: "86M"


def test_patchify_order_and_inverse():
    m = small_model(patch_size=4, img_size=8)
    imgs = torch.randn(2, 3, 8, 8)
    x = m.patchify(imgs)
    assert x.shape == (2, 4, 48)
    for b, t, y, xx, c in [(0, 0, 0, 0, 0), (1, 1, 2, 3, 1), (0, 2, 1, 0, 2), (1, 3, 3, 3, 2)]:
        row, col = divmod(t, 2)
        assert x[b, t, (y * 4 + xx) * 3 + c] == imgs[b, c, row * 4 + y, col * 4 + xx]
    assert torch.equal(m.unpatchify(x), imgs)


def test_recon_loss_by_hand():
    m = small_model(patch_size=4, img_size=8)
    g = torch.Generator().manual_seed(1)
    imgs, pred = torch.randn(1, 3, 8, 8, generator=g), torch.randn(1, 4, 48, generator=g)
    mask = torch.tensor([[True, False, True, False]])
    patches = m.patchify(imgs)[0].tolist()
    for norm_pix in (True, False):
        m.cfg = MRMAEConfig(**{**SMALL, "patch_size": 4, "img_size": 8, "norm_pix_loss": norm_pix})
        per_patch = []
        for t in (0, 2):
            v = patches[t]
            mean = sum(v) / 48
            var = sum((a - mean) ** 2 for a in v) / 47
            tgt = [(a - mean) / (var + 1e-6) ** 0.5 for a in v] if norm_pix else v
            per_patch.append(sum((p - q) ** 2 for p, q in zip(pred[0, t].tolist(), tgt)) / 48)
        got = m.recon_loss(imgs, pred, mask)
        assert got.item() == pytest.approx(sum(per_patch) / 2, rel=1e-5)


def test_mimic_loss_by_hand():
    pred = torch.zeros(1, 2, 2)
    target = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    # per-token squared L2: 5 and 25; divided by C = 2: 2.5 and 12.5; mean over tokens: 7.5
    assert MRMAE.mimic_loss(pred, target).item() == pytest.approx(7.5)
    with pytest.raises(ValueError):
        MRMAE.mimic_loss(pred, target[:, :1])


def test_loss_combination_and_plain_mode():
    m = small_model()
    imgs, keep, mask, restore, targets = batch(m)
    latent, visible = m.forward_encoder(imgs, keep)
    recon = m.recon_loss(imgs, m.forward_decoder(latent, restore), mask)
    mimic = m.mimic_loss(m.forward_mimic(visible), targets)
    out = m(imgs, keep, restore, mask, targets, recon_weight=0.3, mimic_weight=0.7)
    torch.testing.assert_close(out["loss"], 0.3 * recon + 0.7 * mimic)
    torch.testing.assert_close(out["loss_mimic"], mimic)
    for w in (0.5, 0.1):  # plain MAE: loss = loss_recon whatever the weights
        plain = m(imgs, keep, restore, mask, None, recon_weight=w)
        assert plain["loss_mimic"].item() == 0.0
        torch.testing.assert_close(plain["loss"], recon)
    no_head = small_model(teacher_dim=0)
    assert no_head.mimic_head is None
    assert no_head(imgs, keep, restore, mask)["loss_mimic"].item() == 0.0
    with pytest.raises(ValueError):
        no_head(imgs, keep, restore, mask, targets)
    with pytest.raises(ValueError):  # all-token targets must be gathered first
        m(imgs, keep, restore, mask, torch.randn(2, 16, 24))


def test_joint_heads_mimic_one_teacher_each_and_average_their_losses():
    m = small_model(joint_teacher_dims=(16, 8))
    imgs, keep, mask, restore, targets = batch(m)
    g = torch.Generator().manual_seed(1)
    more = [torch.randn(2, keep.shape[1], c, generator=g) for c in (16, 8)]
    _, visible = m.forward_encoder(imgs, keep)
    each = [m.mimic_loss(h(visible), t) for h, t in zip([m.mimic_head, *m.joint_heads], [targets, *more])]
    out = m(imgs, keep, restore, mask, [targets, *more], recon_weight=0.5, mimic_weight=0.5)
    torch.testing.assert_close(out["loss_mimic"], sum(each) / 3)
    assert len({round(float(e), 4) for e in each}) == 3  # three different heads and targets
    with pytest.raises(ValueError, match="2 target sets for 3 mimic heads"):
        m(imgs, keep, restore, mask, [targets, more[0]])
    with pytest.raises(ValueError, match="needs a first teacher"):
        small_model(teacher_dim=0, joint_teacher_dims=(8,))


@pytest.mark.parametrize("fuse", [(2, 4), (1, 3, 4), ()])
def test_fusion_sums_block_outputs_then_norms_once(fuse):
    m = small_model(fuse_layers=fuse)
    imgs, keep, mask, restore, targets = batch(m)
    seen: dict = {}
    hooks = [blk.register_forward_hook(lambda mod, a, o, i=i: seen.__setitem__(i, o))
             for i, blk in enumerate(m.blocks, start=1)]
    hooks.append(m.mimic_head.register_forward_pre_hook(lambda mod, a: seen.__setitem__("mimic", a[0])))
    hooks.append(m.decoder_embed.register_forward_pre_hook(lambda mod, a: seen.__setitem__("dec", a[0])))
    m(imgs, keep, restore, mask, targets)
    for h in hooks:
        h.remove()
    expected = m.norm(sum(seen[i] for i in (fuse or (4,))))
    assert expected.shape == (2, 5, 32)
    torch.testing.assert_close(seen["dec"], expected)
    torch.testing.assert_close(seen["mimic"], expected[:, 1:])
    if fuse:
        assert not torch.allclose(seen["dec"], m.norm(seen[4]))


def test_fuse_layers_validated():
    assert MRMAEConfig(depth=12, fuse_layers=(12, 4, 8)).fuse_layers == (4, 8, 12)
    for bad in [(0, 12), (4, 8), (4, 13)]:
        with pytest.raises(ValueError):
            MRMAEConfig(depth=12, fuse_layers=bad)


def test_decoder_puts_tokens_back_in_patch_order():
    m = small_model()
    imgs, keep, mask, restore, _ = batch(m)
    latent, _ = m.forward_encoder(imgs, keep)
    seen = {}
    h = m.decoder_blocks[0].register_forward_pre_hook(lambda mod, a: seen.__setitem__("x", a[0]))
    m.forward_decoder(latent, restore)
    h.remove()
    x = seen["x"] - m.decoder_pos_embed
    emb = m.decoder_embed(latent)
    torch.testing.assert_close(x[:, 0], emb[:, 0])
    torch.testing.assert_close(gather_visible(x[:, 1:], keep), emb[:, 1:])
    torch.testing.assert_close(x[:, 1:][mask], m.mask_token[0].expand(int(mask.sum()), -1))


def test_gradients_reach_mimic_head_decoder_and_encoder():
    m = small_model()
    imgs, keep, mask, restore, targets = batch(m)
    m(imgs, keep, restore, mask, targets)["loss"].backward()
    for p in (m.mimic_head.weight, m.decoder_pred.weight, m.mask_token, m.decoder_blocks[0].attn.qkv.weight,
              m.blocks[0].attn.qkv.weight, m.patch_embed.proj.weight, m.cls_token):
        assert p.grad is not None and p.grad.abs().sum() > 0
    m.zero_grad(set_to_none=True)
    m(imgs, keep, restore, mask)["loss"].backward()
    assert m.mimic_head.weight.grad is None


def test_deterministic_given_seed():
    a, b = small_model(seed=3), small_model(seed=3)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["blocks.0.attn.qkv.weight"], small_model(seed=4).state_dict()["blocks.0.attn.qkv.weight"])
    data = batch(a)
    assert torch.equal(a(*data[:4], data[4])["loss"], b(*data[:4], data[4])["loss"])


def test_init_pos_embed_and_no_weight_decay():
    m = small_model()
    assert "pos_embed" in m.state_dict() and "pos_embed" not in dict(m.named_parameters())
    torch.testing.assert_close(m.pos_embed[0], sincos_pos_embed(32, 4))
    pe = sincos_pos_embed(32, 4)
    assert pe.shape == (17, 32) and pe[0].abs().sum() == 0 and pe.abs().max() <= 1
    assert torch.unique(pe[1:], dim=0).shape[0] == 16  # every patch position distinct
    names = set(m.state_dict())
    assert m.no_weight_decay() <= names
    assert m.cls_token.std() < 0.05 and m.mask_token.std() < 0.05
    assert torch.all(m.decoder_pred.bias == 0) and torch.all(m.blocks[0].mlp.fc1.bias == 0)
    w = m.blocks[0].mlp.fc1.weight  # xavier-uniform bound sqrt(6 / (fan_in + fan_out))
    assert w.abs().max() <= (6 / sum(w.shape)) ** 0.5


def test_gather_visible():
    tokens = torch.arange(2 * 6 * 3).reshape(2, 6, 3)
    ids = torch.tensor([[0, 4], [5, 1]])
    out = gather_visible(tokens, ids)
    assert torch.equal(out, torch.stack([tokens[0, [0, 4]], tokens[1, [5, 1]]]))
    assert torch.equal(gather_visible(tokens[..., 0], ids), out[..., 0])

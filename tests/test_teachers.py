"""Teachers: real open_clip and timm architectures, their outputs, attention and weights."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from mrmae.shared.teachers import TeacherError, TeacherSpec, build_teacher

SPECS = ["clip:ViT-S-16", "dino:vit_tiny_patch16_224", "dino:vit_small_patch14_dinov2"]


def test_spec_parsing():
    s = TeacherSpec.parse("clip:ViT-B-16-quickgelu@/w/openai.safetensors")
    assert (s.family, s.arch, s.weights) == ("clip", "ViT-B-16-quickgelu", "/w/openai.safetensors")
    assert s.weights_is_file
    assert TeacherSpec.parse("dino:vit_base_patch16_224@dino").weights == "dino"
    assert not TeacherSpec.parse("dino:vit_base_patch16_224@dino").weights_is_file
    for bad in ("vit_base", "sam:vit_b", "clip:"):
        with pytest.raises(TeacherError, match="unknown teacher spec"):
            TeacherSpec.parse(bad)


@pytest.mark.parametrize("spec", SPECS)
def test_teacher_outputs_at_the_student_grid(spec):
    t = build_teacher(spec)
    assert t.grid == 14 and t.input_size == 14 * t.patch_size  # a /14 teacher gets 196 px
    x = torch.randn(2, 3, t.input_size, t.input_size)
    out = t(x, layers=(1, 2))
    assert out.features.shape == (2, 196, t.dim) and out.cls.shape == (2, t.dim)
    assert out.attention.shape == (2, 196) and (out.attention >= 0).all()
    assert torch.all(out.attention.sum(-1) <= 1.0 + 1e-5)
    assert sorted(out.layers) == [1, 2] and out.layers[2].shape == (2, 196, t.dim)
    # same weights every time without a weights file (fixed seed), and the fingerprint says so
    assert build_teacher(spec).fingerprint == t.fingerprint


def test_clip_tokens_are_ln_post_before_projection_and_attention_is_the_real_one():
    t = build_teacher("clip:ViT-S-16")
    v = t.visual
    x = torch.randn(2, 3, 224, 224)
    out = t(x)
    # Reference: open_clip's own forward with tokens; its pooled output = ln_post(cls) @ proj.
    v.output_tokens = True
    pooled, tokens = v(x)
    v.output_tokens = False
    torch.testing.assert_close(out.cls @ v.proj, pooled, rtol=1e-4, atol=1e-5)
    # Reference attention: nn.MultiheadAttention asked for its weights on the last block input.
    last = v.transformer.resblocks[-1]
    seen = {}
    h = last.register_forward_pre_hook(lambda m, a: seen.update(x=a[0]))
    v(x)
    h.remove()
    y = last.ln_1(seen["x"])
    _, w = last.attn(y, y, y, need_weights=True, average_attn_weights=True)
    torch.testing.assert_close(out.attention, w[:, 0, 1:], rtol=1e-4, atol=1e-6)
    assert out.features.shape[1] == tokens.shape[1] == 196


def test_timm_attention_matches_unfused_attention_weights():
    t = build_teacher("dino:vit_small_patch14_dinov2")
    attn = t.model.blocks[-1].attn
    attn.fused_attn = False  # timm then materialises softmax(qk^T) and passes it to attn_drop
    seen = {}
    h = attn.attn_drop.register_forward_hook(lambda m, a, o: seen.update(a=o))
    x = torch.randn(2, 3, 196, 196)
    out = t(x)
    h.remove()
    p = t.num_prefix_tokens
    torch.testing.assert_close(out.attention, seen["a"][:, :, 0, p:].mean(1), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out.features, t.model.forward_features(x)[:, p:], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("spec", ["clip:ViT-S-16", "dino:vit_tiny_patch16_224"])
def test_local_weights_file_loads_and_changes_the_fingerprint(spec, tmp_path):
    base = build_teacher(spec)
    trunk = base.visual if spec.startswith("clip") else base.model
    with torch.no_grad():
        for p in trunk.parameters():
            p.add_(0.01 * torch.randn_like(p))
    state = {k: v.contiguous() for k, v in trunk.state_dict().items()}
    if spec.startswith("clip"):  # open_clip expects a whole CLIP state dict: fill the text tower
        import open_clip

        full = open_clip.create_model("ViT-S-16", pretrained=None).state_dict()
        full.update({f"visual.{k}": v for k, v in state.items()})
        state = {k: v.contiguous() for k, v in full.items()}
    path = tmp_path / "weights.safetensors"
    save_file(state, str(path))
    loaded = build_teacher(f"{spec}@{path}")
    assert loaded.fingerprint != base.fingerprint
    x = torch.randn(1, 3, 224, 224)
    torch.testing.assert_close(loaded(x).features, base(x).features, rtol=1e-4, atol=1e-4)


def test_bad_weights_and_unknown_arch_are_one_clear_error(tmp_path):
    path = tmp_path / "wrong.safetensors"
    save_file({"not.a.weight": torch.zeros(3)}, str(path))
    with pytest.raises(TeacherError, match="do not fit"):
        build_teacher(f"dino:vit_tiny_patch16_224@{path}")
    with pytest.raises(TeacherError, match="do not fit"):
        build_teacher(f"clip:ViT-S-16@{path}")
    with pytest.raises(TeacherError, match="not found"):
        build_teacher(f"clip:ViT-S-16@{tmp_path}/missing.safetensors")
    with pytest.raises(TeacherError, match="unknown open_clip architecture"):
        build_teacher("clip:ViT-Q-99")
    with pytest.raises(TeacherError, match="unknown timm architecture"):
        build_teacher("dino:not_a_model")

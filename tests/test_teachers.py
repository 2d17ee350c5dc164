"""Teachers: real open_clip and timm architectures, their outputs, attention and weights."""

from __future__ import annotations

import importlib
import os
import subprocess
import logging
import sys
import warnings

import pytest
import torch
from conftest import DINO_TINY
from safetensors.torch import save_file

from mrmae.extract.config import ExtractConfig
from mrmae.extract.runner import run_extraction
from mrmae.extract.verify import verify_cache
from mrmae.shared import cache_format as cf
from mrmae.shared.teachers import base as teacher_base
from mrmae.shared.teachers.base import (Teacher, TeacherError, TeacherSpec, build_teacher, load_weights_file,
                                        register_teacher, teacher_class, teacher_kinds)
from mrmae.shared.views import ViewConfig

# a small teacher of each registered kind, and DINOv2's /14 patches
KIND_SPECS = [f"{kind}:{teacher_class(kind).small_arch}" for kind in teacher_kinds()]
SPECS = [*KIND_SPECS, "dino:vit_small_patch14_dinov2"]


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
    out = t(x)
    assert out.features.shape == (2, 196, t.dim) and out.cls.shape == (2, t.dim)
    assert out.attention.shape == (2, 196) and (out.attention >= 0).all()
    assert torch.all(out.attention.sum(-1) <= 1.0 + 1e-5)
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
    with pytest.raises(TeacherError, match="open_clip architecture ViT-Q-99: unknown"):
        build_teacher("clip:ViT-Q-99")
    with pytest.raises(TeacherError, match="timm architecture not_a_model: unknown"):
        build_teacher("dino:not_a_model")


def test_unknown_names_say_what_was_meant():
    """A typo in a kind, an architecture or a weights tag names the closest known ones."""
    for spec, near in (("clip:ViT-B16", "did you mean ViT-B-16"), ("dino:vit_smal_patch16_224", "did you mean "
                       "vit_small_patch16_224"), ("clip:ViT-B-16@opnai", "weights tag opnai: unknown; did you mean "
                       "openai"), ("dino:vit_small_patch16_224@dnio", "did you mean dino"),
                       ("dnio:vit_small_patch16_224", "did you mean dino:vit_small_patch16_224")):
        with pytest.raises(TeacherError, match=near):
            build_teacher(spec)


def test_openai_weights_need_quickgelu():
    """open_clip only warns when a tag trained with QuickGELU goes into a GELU model: the
    targets would come from another activation. Refused, naming the architecture to use."""
    with pytest.raises(TeacherError, match=r"trained with QuickGELU, ViT-B-16 is built without it; give "
                                           r"clip:ViT-B-16-quickgelu@openai"):
        build_teacher("clip:ViT-B-16@openai")


@pytest.mark.parametrize("spec", ["clip:ViT-B-16-quickgelu@openai", "dino:vit_small_patch16_224@dino"])
def test_a_pretrained_tag_offline_fails_at_once_in_one_line(spec, tmp_path):
    """Offline (HF_HUB_OFFLINE, an empty hub cache), a tag is one line saying so and how to
    make a local file, with no retries: huggingface_hub would otherwise try for about a minute."""
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "mrmae", "save-teacher", "--teacher", spec, "--out", str(tmp_path / "w")],
                       capture_output=True, text=True, env=env, timeout=120)
    errors = [ln for ln in r.stderr.splitlines() if not ln.startswith("mrmae: warning")]
    assert r.returncode == 1 and errors == [
        f"mrmae: error: teacher {spec}: the weights '{spec.split('@')[1]}' are not in the local hub cache and "
        f"HF_HUB_OFFLINE is set; make a local file where a hub is reachable (`mrmae save-teacher --teacher {spec} "
        "--out DIR`, README \"Teacher weights\") and give the spec it prints"], r.stderr
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("spec", KIND_SPECS)
def test_save_teacher_writes_a_file_the_printed_spec_loads(spec, tmp_path):
    """`mrmae save-teacher` keeps a teacher's weights as a local file (a tag where a hub is
    reachable; here, random weights): the spec it prints builds the same teacher (fingerprint
    and outputs), strictly loaded; a second save to the same file is refused."""
    r = subprocess.run([sys.executable, "-m", "mrmae", "save-teacher", "--teacher", spec, "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    use = r.stdout.splitlines()[-1]
    assert use.startswith(f"use: --teacher {spec}@{tmp_path}/")
    saved = build_teacher(use.split("--teacher ", 1)[1])
    base = build_teacher(spec)
    assert saved.fingerprint == base.fingerprint
    x = torch.randn(1, 3, 224, 224)
    assert torch.equal(saved(x).features, base(x).features) and torch.equal(saved(x).attention, base(x).attention)
    again = subprocess.run([sys.executable, "-m", "mrmae", "save-teacher", "--teacher", spec, "--out", str(tmp_path)],
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 1 and again.stderr.splitlines()[-1].endswith(": exists; remove it or give another --out")


def test_the_kinds_are_a_registry():
    assert teacher_kinds()[:2] == ("clip", "dino")
    with pytest.raises(TeacherError, match=r"expected clip:ARCH\[@WEIGHTS\] or dino:TIMM_NAME\[@WEIGHTS\]"):
        TeacherSpec.parse("sam:vit_b")
    with pytest.raises(TypeError, match="not a Teacher subclass"):
        register_teacher("odd")(dict)
    with pytest.raises(ValueError, match="registered twice"):
        register_teacher("clip")(type("OtherClip", (Teacher,), {}))
    assert teacher_kinds()[:2] == ("clip", "dino")
    assert all(teacher_class(kind).small_arch for kind in teacher_kinds()), "the tests build each kind's small arch"


def test_random_clip_teacher_warns_once_and_open_clip_says_nothing(caplog):
    caplog.set_level(logging.DEBUG)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        build_teacher("clip:ViT-S-16")
    ours = [w for w in seen if "HAS RANDOM WEIGHTS" in str(w.message)]
    assert len(ours) == 1 and "clip:ViT-S-16" in str(ours[0].message)
    assert not [r for r in caplog.records if "No pretrained weights loaded" in r.getMessage()]
    # scoped: the filter is gone afterwards, open_clip's other lines and anyone else's pass
    assert not logging.getLogger().filters
    logging.warning("No pretrained weights loaded for model 'x'. Model initialized randomly.")
    assert [r for r in caplog.records if "No pretrained weights loaded" in r.getMessage()]


UNPICKLED = []


class _Payload:
    """Runs code when unpickled (what a hostile weights file would do)."""

    def __reduce__(self):
        return UNPICKLED.append, ("ran",)


def test_local_weights_are_never_unpickled(tmp_path):
    state = {"w": torch.ones(2)}
    torch.save({"model": state}, tmp_path / "plain.pth")  # tensors only: weights_only reads it
    assert torch.equal(load_weights_file(str(tmp_path / "plain.pth"), "x")["w"], state["w"])
    torch.save({"model": state, "extra": _Payload()}, tmp_path / "pickled.pth")
    with pytest.raises(TeacherError, match="pickled.pth do not fit x"):
        load_weights_file(str(tmp_path / "pickled.pth"), "x")
    with pytest.raises(TeacherError, match="pickled.pth do not fit vit_tiny_patch16_224"):
        build_teacher(f"{DINO_TINY}@{tmp_path / 'pickled.pth'}")
    assert UNPICKLED == []


# A teacher kind written outside mrmae, as a user would: one file, nothing else touched.
TOY_KIND = '''
import torch
import timm

from mrmae.shared.teachers.base import Teacher, TeacherOutput, load_weights_file, random_init_warning, register_teacher


@register_teacher("toy", "toy:TIMM_VIT[@WEIGHTS]", small="vit_tiny_patch16_224")
class ToyTeacher(Teacher):
    """A timm ViT's un-normed last tokens; attention: their softmaxed norms (a kind decides)."""

    def __init__(self, spec):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.model = timm.create_model(spec.arch, pretrained=False, num_classes=0)
        if spec.weights is None:
            random_init_warning(spec)
        else:
            self.model.load_state_dict(load_weights_file(spec.weights, spec.arch), strict=True)
        self.spec, self.patch_size, self.num_prefix_tokens = spec, 16, 1
        self.dim, self.depth = self.model.embed_dim, len(self.model.blocks)
        self.mean, self.std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
        self._finish_init(self.model)

    @torch.no_grad()
    def forward(self, images):
        x = self.model.forward_features(images)
        return TeacherOutput(x[:, 1:], x[:, 1:].norm(dim=-1).softmax(-1), x[:, 0])
'''


@pytest.fixture
def toy_kind(tmp_path, monkeypatch):
    (tmp_path / "mrmae_toy_teacher.py").write_text(TOY_KIND)
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("mrmae_toy_teacher")
    yield module
    teacher_base._KINDS.pop("toy", None)  # other tests see the two built-in kinds only
    sys.modules.pop("mrmae_toy_teacher", None)


@pytest.mark.parametrize("backend", cf.backend_names())
def test_a_kind_in_one_file_extracts_a_cache_through_the_public_api(toy_kind, demo_shards, tmp_path, backend):
    assert "toy" in teacher_kinds()
    weights = tmp_path / "toy.safetensors"
    trunk = build_teacher(DINO_TINY.replace("dino:", "toy:")).model
    with torch.no_grad():
        for p in trunk.parameters():
            p.add_(0.01 * torch.randn_like(p))
    save_file({k: v.contiguous() for k, v in trunk.state_dict().items()}, str(weights))
    spec = f"toy:vit_tiny_patch16_224@{weights}"
    out = tmp_path / "cache"
    run_extraction(ExtractConfig(shards=str(demo_shards[0]), out=str(out), teacher=spec, format=backend,
                                 views=ViewConfig(per_image=2), batch_size=4, progress=False))
    m = cf.read_manifest(out)  # the manifest's family check reads the registry
    assert (m.teacher.family, m.teacher.arch, m.teacher.dim) == ("toy", "vit_tiny_patch16_224", 192)
    assert m.teacher.weights_sha256 == build_teacher(spec).fingerprint  # the file's weights, strictly loaded
    assert m.teacher.layers == ()
    report = verify_cache(str(out), recompute=4)  # the stored targets are the kind's, recomputed
    assert report.ok and report.checked == 4, report


def test_a_manifest_knows_the_teacher_kinds_without_importing_them():
    """A fresh interpreter reading manifests (`cache info`) lists the kinds by the package's
    module names, without torch; once the teachers are loaded, the registry answers. The two
    agree because each kind's module is named after the kind it registers."""
    import subprocess
    import sys

    code = ("import sys\nfrom mrmae.shared.cache_format.manifest import teacher_kinds\nnames = teacher_kinds()\n"
            "print('torch' in sys.modules)\nimport mrmae.shared.teachers.base as t\n"
            "print(sorted(names) == sorted(t.teacher_kinds()) == sorted(teacher_kinds()), sorted(names))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[0] == "False" and out[1].startswith("True ['clip', 'dino'"), out

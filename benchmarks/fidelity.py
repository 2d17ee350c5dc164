"""Fidelity at toy scale: do MR-MAE's students give better frozen features than plain MAE's?

Needs scikit-learn for its bundled digits set: `.venv/bin/pip install scikit-learn` (or the
`bench` extra); nothing is downloaded. All on CPU, one torch thread, sized for ~30 minutes on 2 shared cores:

1. Data: scikit-learn's digits (1797 real 8x8 handwritten digits, 10 classes), upscaled
   bicubically to --source-px, RGB, written as WebDataset tars (.png + .cls). Stratified,
   disjoint splits: teacher 1/2, student 1/4 (pretraining, and the probe's training labels),
   val 1/4 (probe evaluation only; no network trains on it).
2. Teacher: timm's registered `test_vit` (64-d, 6 blocks, /16, 0.3M params) trained
   supervised on the teacher split only, saved as safetensors and used as
   `dino:test_vit@FILE` (loaded strictly by shared/teachers/dino.py). It stands in for CLIP/DINO
   (no hub is reachable here) because it is what MR-MAE needs of a teacher: a frozen
   network, trained on other images than the student's, whose patch tokens and [CLS]
   attention carry class semantics that the student's pixel loss alone does not ask for.
3. One cache: `run_extraction` over the student split, once; every MR-MAE run reads it.
4. Students (`mrmae_vit_tiny_patch16`, small decoder), one budget for all: plain MAE (no
   cache), MR-MAE random masking, MR-MAE focused masking, mimic-only (L_R weight 0), per
   seed (the seed sets the init, the sample order, which cached view, the masks).
5. Frozen features of the encoder `mrmae export` writes and `mrmae eval` probes (MAE's eval
   transform, the [CLS] token and the mean patch token, after the final norm; a ConvViT has
   no [CLS]), then the package's linear probe and kNN (train/downstream/evaluate.py), trained on the
   student split, scored on val. References: the untrained students and the teacher.
6. With --finetune-epochs N, each pretrained student is also fine-tuned end to end for N
   epochs (`run_finetune`, the paper's recipe at this scale) on the student split and
   scored on val.

Writes benchmarks/results/fidelity.json (every run) and prints the table last.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
import webdataset as wds
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_facts, table, write_json  # noqa: E402

from mrmae.shared.shards import read_shard  # noqa: E402
from mrmae.extract.config import ExtractConfig  # noqa: E402
from mrmae.extract.runner import run_extraction  # noqa: E402
from mrmae.shared.teachers.base import build_teacher  # noqa: E402
from mrmae.shared.views import View, ViewConfig, decode_image, render_view, sample_view, view_rng  # noqa: E402
from mrmae.shared.views import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from mrmae.train.config import StepOptions  # noqa: E402
from mrmae.train.downstream.evaluate import LabelledImages, class_probabilities, topk_accuracy  # noqa: E402
from mrmae.train.downstream.labels import LabelSpec  # noqa: E402
from mrmae.train.models import create_model  # noqa: E402
from mrmae.train.config import PretrainConfig  # noqa: E402
from mrmae.train.pretrain import run_pretrain  # noqa: E402
from mrmae.train.restore import encode_all_tokens  # noqa: E402

STUDENT = "mrmae_vit_tiny_patch16"
TEACHER_ARCH = "test_vit"  # a timm registry name: the same spec works from the CLI
VARIANTS: dict[str, tuple[bool, dict, dict]] = {  # name -> (reads the cache, StepOptions, PretrainConfig fields)
    "plain MAE": (False, {}, {}),
    "MR-MAE random": (True, {"mask": "random"}, {}),
    "MR-MAE focused": (True, {"mask": "focused"}, {}),
    "mimic-only": (True, {"mask": "random", "recon_weight": 0.0, "mimic_weight": 1.0}, {}),
    # the paper's main model (table 3, last row) at tiny size: masked conv stages, focused, fused
    "MR-MAE ConvViT focused+fused": (True, {"mask": "focused"},
                                     {"model": "mrmae_convvit_tiny", "fuse_layers": (4, 8, 11)}),
}
METRICS = ("linear-probe/mean", "linear-probe/cls", "knn/mean", "knn/cls")
Encoder = Callable[[torch.Tensor], torch.Tensor]  # normalised pixels [B,3,224,224] -> tokens [B,1+N,D]
T0 = time.time()


def log(msg: str) -> None:
    print(f"[{time.time() - T0:7.1f}s] {msg}", flush=True)


def write_splits(root: Path, source_px: int, shards: int) -> dict[str, list[str]]:
    """Digits -> stratified, disjoint teacher/student/val tars; returns split -> shard paths."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(0)
    split_of = np.empty(len(digits.target), dtype=object)
    for c in range(10):  # each class: 1/2 teacher, 1/4 student, 1/4 val
        idx = rng.permutation(np.flatnonzero(digits.target == c))
        a, b = len(idx) // 2, len(idx) // 2 + len(idx) // 4
        split_of[idx[:a]], split_of[idx[a:b]], split_of[idx[b:]] = "teacher", "student", "val"
    root.mkdir(parents=True, exist_ok=True)
    out: dict[str, list[str]] = {}
    for split in ("teacher", "student", "val"):
        paths = [root / f"{split}-{s:06d}.tar" for s in range(shards)]  # several: shard shuffling has work
        sinks = [wds.TarWriter(str(p), mtime=0) for p in paths]
        for j, i in enumerate(np.flatnonzero(split_of == split)):
            # ink 0..16 -> 0..255; bicubic upscaling gives smooth strokes, not 8x8 blocks
            im = Image.fromarray((digits.images[i] * (255 / 16)).astype(np.uint8))
            buf = io.BytesIO()
            im.resize((source_px, source_px), Image.BICUBIC).convert("RGB").save(buf, format="PNG")
            sinks[j % shards].write({"__key__": f"digit_{i:05d}", "png": buf.getvalue(),
                                     "cls": str(int(digits.target[i])).encode()})
        for s in sinks:
            s.close()
        out[split] = [str(p) for p in paths]
    return out


def labelled(urls: list[str]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """(uint8 images [3, H, W], labels) of shards, read and decoded by the package."""
    samples = [s for u in urls for s in read_shard(u)]
    return [decode_image(s.image) for s in samples], torch.tensor([s.label for s in samples])


def train_teacher(urls: list[str], val_urls: list[str], out: Path, epochs: int, full_epochs: int,
                  lr: float) -> tuple[str, float]:
    """Supervised test_vit on the teacher split -> (spec, val top-1 of its [CLS] head).

    Views come from the package's view code (RandomResizedCrop + flip), as the cache's do.
    Two losses: the [CLS] head (so the [CLS] attention that focused masking reads is trained)
    and an auxiliary head on the mean patch token (so the patch tokens, the mimic targets,
    are class-discriminative themselves). A ViT learns slowly from ~900 images, so to buy
    epochs all but the last `full_epochs` run at 112 px (7x7 tokens; test_vit interpolates
    its position embedding), the last ones at lr/10 at 224 px, the size extraction uses.
    """
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model(TEACHER_ARCH, num_classes=10, img_size=224)
    aux = torch.nn.Linear(model.embed_dim, 10)  # not saved: only the trunk is the teacher
    mean, std = model.pretrained_cfg["mean"], model.pretrained_cfg["std"]
    images, labels = labelled(urls)
    vcfg, batch = ViewConfig(scale=(0.35, 1.0)), 32  # milder crops than the cache's 0.2: faster to learn
    opt = torch.optim.AdamW([*model.parameters(), *aux.parameters()], lr=lr, weight_decay=0.05)
    low = epochs - full_epochs
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=max(1, low * -(-len(images) // batch)))
    for epoch in range(epochs):
        px, total = (112 if epoch < low else 224), 0.0
        model.train()
        order = torch.randperm(len(images)).tolist()
        for s in range(0, len(images), batch):
            idx = order[s:s + batch]
            x = torch.stack([render_view(images[i], sample_view(*images[i].shape[1:], view_rng(epoch, str(i), 0),
                                                                vcfg), px, mean, std) for i in idx])
            f = model.forward_features(x)
            loss = F.cross_entropy(model.forward_head(f), labels[idx]) + F.cross_entropy(aux(f[:, 1:].mean(1)),
                                                                                          labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            if epoch < low:
                sched.step()
            else:
                for g in opt.param_groups:
                    g["lr"] = lr / 10
            total += loss.item() * len(idx)
        if epoch % 10 == 9 or epoch >= low:
            log(f"teacher epoch {epoch + 1}/{epochs} at {px} px: loss {total / len(images):.3f}")
    model.eval()
    vimg, vlab = labelled(val_urls)
    with torch.no_grad():  # whole image at 224 px
        x = torch.stack([render_view(im, View(0, 0, im.shape[1], im.shape[2], False), 224, mean, std) for im in vimg])
        acc = 100.0 * float((model(x).argmax(1) == vlab).float().mean())
    path = out / "teacher.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if not k.startswith("head.")}, str(path))
    return f"dino:{TEACHER_ARCH}@{path}", acc


def eval_pixels(urls: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """MAE's eval transform of every labelled image (train/downstream/evaluate.py's LabelledImages), once:
    all models see the same tensors and only the encoder runs per model. The benchmark's own
    tars hold no unusable sample: one would stop it, naming the sample."""
    items = list(LabelledImages(urls, 224, LabelSpec("cls")))
    if skipped := [skip for _, _, skip, _, _ in items if skip is not None]:
        raise SystemExit(f"fidelity: {skipped[0].line()}")
    return torch.stack([p for p, *_ in items]), torch.tensor([y for _, y, *_ in items])


@torch.no_grad()
def probe(encode: Encoder, train: tuple[torch.Tensor, torch.Tensor], val: tuple[torch.Tensor, torch.Tensor],
          probe_epochs: int) -> dict[str, float]:
    """Top-1 (%) of the package's linear probe and kNN on [CLS] and mean-patch features."""
    feats = []
    for pixels, _ in (train, val):  # as evaluate.extract_features, both pools from one pass
        tokens = torch.cat([encode(pixels[i:i + 64]) for i in range(0, len(pixels), 64)])
        k = tokens.shape[1] - 196  # prefix tokens: 1 [CLS] for the ViT, none for the ConvViT (224 px, 14 x 14)
        feats.append({"cls": tokens[:, 0].float() if k else None, "mean": tokens[:, k:].mean(1).float()})
    out = {}
    for m in METRICS:
        proto, feat = m.split("/")
        if feats[0][feat] is None:
            out[m] = None
            continue
        with torch.enable_grad():  # the probe trains
            p = class_probabilities(proto, feats[0][feat], train[1], feats[1][feat], 10, epochs=probe_epochs,
                                    lr=0.1, seed=0)
        out[m] = topk_accuracy(p, val[1], (1,))[0]
    return out


def _mean_std(values: list) -> tuple[float, float] | None:
    """(mean, sample std) of the measured values; None when none was measured (n/a)."""
    values = [v for v in values if v is not None]
    if not values:
        return None
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def pretrain_and_score(variant: str, seed: int, a: argparse.Namespace, root: Path, shards: dict, cache: str,
                       train_px: tuple, val_px: tuple) -> dict:
    """Pretrain one variant with one seed, probe its exported encoder, fine-tune it (--finetune-epochs)."""
    from mrmae.train.downstream.export import read_encoder

    cached, opts, fields = VARIANTS[variant]
    out = root / "runs" / f"{variant.replace(' ', '_').replace('+', '_')}-s{seed}"
    cfg = PretrainConfig(shards=shards["student"], out=str(out), model=fields.get("model", STUDENT),
                         fuse_layers=fields.get("fuse_layers", ()), feature_cache=cache if cached else None,
                         epochs=a.epochs, batch_size=a.batch_size, lr=a.lr, warmup_epochs=a.warmup_epochs,
                         decoder_dim=a.decoder_dim, decoder_depth=a.decoder_depth, views_per_image=a.views,
                         seed=seed, progress=False, step_options=StepOptions(seed=seed, **opts))
    t = time.time()
    res = run_pretrain(cfg)
    train_s = time.time() - t
    last = json.loads(Path(res["metrics"]).read_text().splitlines()[-1])
    encoder = read_encoder(res["checkpoint"]).load()  # what `mrmae export` writes and `mrmae eval` probes
    row = {"variant": variant, "seed": seed, "steps": res["steps"], "pretrain_s": round(train_s, 1),
           **{k: last.get(k) for k in ("loss", "loss_recon", "loss_mimic")},
           **probe(encoder.forward_features, train_px, val_px, a.probe_epochs), "finetune": None}
    if a.finetune_epochs:
        row["finetune"], row["finetune_s"] = finetune_top1(res["checkpoint"], out, seed, a, shards)
    return row


def finetune_top1(checkpoint: str, run: Path, seed: int, a: argparse.Namespace, shards: dict) -> tuple[float, float]:
    """Val top-1 (%) after --finetune-epochs of the paper's fine-tuning recipe (layer decay 0.6,
    drop path 0.2 with Mixup/CutMix/RandAugment off: 445 images), and the seconds it took."""
    from mrmae.train.downstream.config import FinetuneConfig
    from mrmae.train.downstream.finetune import run_finetune

    cfg = FinetuneConfig(checkpoint=checkpoint, train_shards="::".join(shards["student"]),
                         val_shards="::".join(shards["val"]), out=str(run.with_name(run.name + "-ft")),
                         num_classes=10, epochs=a.finetune_epochs, batch_size=a.batch_size, lr=a.lr,
                         warmup_epochs=min(1.0, a.finetune_epochs / 4), mixup=0.0, cutmix=0.0, smoothing=0.1,
                         augment="light", seed=seed, progress=False)
    t = time.time()
    res = run_finetune(cfg)
    evals = [json.loads(ln) for ln in Path(res["metrics"]).read_text().splitlines() if '"top1"' in ln]
    return evals[-1]["top1"], round(time.time() - t, 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", default=None, help="keep shards, teacher, cache and runs here (default: a temp dir)")
    p.add_argument("--source-px", type=int, default=64)
    p.add_argument("--teacher-epochs", type=int, default=60)
    p.add_argument("--teacher-full-epochs", type=int, default=2, help="last teacher epochs at 224 px")
    p.add_argument("--teacher-lr", type=float, default=3e-3)
    p.add_argument("--views", type=int, default=2, help="cached views per image")
    p.add_argument("--epochs", type=int, default=4, help="pretraining epochs, every variant")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup-epochs", type=float, default=0.25)
    p.add_argument("--decoder-dim", type=int, default=128)
    p.add_argument("--decoder-depth", type=int, default=1)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--probe-epochs", type=int, default=100)
    p.add_argument("--finetune-epochs", type=int, default=0, help="also fine-tune each student N epochs (0: no)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads; with a test suite on the other core, 2 threads ran 1.4-8x slower than 1")
    p.add_argument("--out", default=None, help="results JSON (default benchmarks/results/fidelity.json)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    seeds = [int(s) for s in a.seeds.split(",")]
    variants = [v.strip() for v in a.variants.split(",")]
    tmp = None if a.work else tempfile.TemporaryDirectory(prefix="mrmae-fidelity-")
    root = Path(a.work or tmp.name)
    facts = machine_facts()

    shards = write_splits(root / "shards", a.source_px, shards=4)
    train_px, val_px = eval_pixels(shards["student"]), eval_pixels(shards["val"])
    sizes = {"teacher": len(labelled(shards["teacher"])[1]), "student": len(train_px[1]), "val": len(val_px[1])}
    log(f"digits splits {sizes} in {root / 'shards'}")
    spec, teacher_acc = train_teacher(shards["teacher"], shards["val"], root, a.teacher_epochs,
                                      a.teacher_full_epochs, a.teacher_lr)
    log(f"teacher {spec}: its own [CLS] head, top-1 on val {teacher_acc:.1f}%")
    t = time.time()
    cache = str(root / "cache")
    run_extraction(ExtractConfig(shards=shards["student"], out=cache, teacher=spec, dtype="float16",
                                 views=ViewConfig(per_image=a.views, seed=0), batch_size=64, progress=False))
    extract_s = time.time() - t
    log(f"cache: {sizes['student']} images x {a.views} views in {extract_s:.0f}s")

    teacher = build_teacher(spec)
    shift = [torch.tensor(v).view(3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD, teacher.mean, teacher.std)]

    def teacher_encode(x: torch.Tensor) -> torch.Tensor:  # ImageNet-normalised -> the teacher's own normalisation
        o = teacher((x * shift[1] + shift[0] - shift[2]) / shift[3])
        return torch.cat([o.cls[:, None], o.features], 1)

    ref_teacher = probe(teacher_encode, train_px, val_px, a.probe_epochs)
    log(f"teacher's frozen features: {ref_teacher}")
    rows: list[dict] = []
    for seed in seeds:  # the floor: the same student, untrained
        torch.manual_seed(seed)
        m = create_model(STUDENT, decoder_embed_dim=a.decoder_dim, decoder_depth=a.decoder_depth).eval()
        rows.append({"variant": "untrained student", "seed": seed, "finetune": None,
                     **probe(lambda x: encode_all_tokens(m, x), train_px, val_px, a.probe_epochs)})
        log(f"untrained seed {seed}: {rows[-1]}")

    for variant in variants:
        for seed in seeds:
            rows.append(pretrain_and_score(variant, seed, a, root, shards, cache, train_px, val_px))
            log(f"{variant} seed {seed}: {rows[-1]}")

    columns = (*METRICS, "finetune")
    summary, table_rows = {}, []
    for variant in ["untrained student"] + variants:
        runs = [r for r in rows if r["variant"] == variant]
        stats = {m: _mean_std([r[m] for r in runs]) for m in columns}
        summary[variant] = {m: None if st is None else {"mean": st[0], "std": st[1]} for m, st in stats.items()}
        table_rows.append([variant, len(runs)] + ["n/a" if st is None else f"{st[0]:.1f} ± {st[1]:.1f}"
                                                  for st in stats.values()])
    table_rows.append(["teacher (frozen, reference)", 1] + [f"{ref_teacher[m]:.1f}" for m in METRICS] + ["n/a"])
    payload = {"machine": facts, "args": vars(a), "splits": sizes, "extract_s": round(extract_s, 1),
               "teacher": {"arch": TEACHER_ARCH, "head_val_top1": teacher_acc, "frozen_features": ref_teacher},
               "runs": rows, "summary": summary, "wall_s": round(time.time() - T0, 1)}
    log(f"wrote {write_json('fidelity', payload, a.out)}")
    print(table(["variant", "seeds"] + [f"{m} top-1 %" for m in METRICS]
                + [f"fine-tuned {a.finetune_epochs} ep top-1 %"], table_rows))
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()

"""`mrmae eval knn | linear-probe`: frozen features of a tiny student on the demo shards."""

from __future__ import annotations

import json

import pytest
import torch
from _tiny_student import save_tiny_student
from click.testing import CliRunner
from conftest import url_list

from mrmae.cli import cli
from mrmae.shared.shards import iter_samples
from mrmae.train.downstream.evaluate import eval_transform, knn_scores, topk_accuracy, train_linear_probe


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    save_tiny_student(out)
    return out


def _eval(args: list[str]) -> str:
    r = CliRunner().invoke(cli, ["eval", *args])
    assert r.exit_code == 0, r.output + repr(r.exception)
    return r.stdout


def test_knn_and_linear_probe_print_and_append_results(run_dir, demo_shards, tmp_path):
    results = tmp_path / "results.jsonl"
    common = ["--checkpoint", str(run_dir), "--shards", url_list(demo_shards[:2]),
              "--val-shards", str(demo_shards[2]), "--results", str(results)]
    out = _eval(["knn", *common, "--feature", "mean"])
    assert out.splitlines()[0].split() == ["protocol", "feature", "setting", "train", "val", "classes", "top1", "top5",
                                           "checkpoint"]
    assert out.splitlines()[1].split()[:6] == ["knn", "mean", "k=20", "T=0.07", "12", "6"]
    assert out.splitlines()[1].endswith("model.safetensors")
    classes = [len({s.label for p in paths for s in iter_samples(str(p))}) for paths in (demo_shards[:2], demo_shards[2:])]
    assert out.splitlines()[2:4] == [f"train: 12 images, {classes[0]} classes", f"val: 6 images, {classes[1]} classes"]
    _eval(["linear-probe", *common, "--epochs", "3", "--batch-size", "8"])
    records = [json.loads(line) for line in results.read_text().splitlines()]
    assert [(r["protocol"], r["feature"]) for r in records] == [("knn", "mean"), ("linear-probe", "cls")]
    for r in records:
        assert (r["n_train"], r["n_val"]) == (12, 6) and r["checkpoint"].endswith("model.safetensors")
        assert 0 <= r["top1"] <= r["top5"] <= 100
    # without --results: appended to the run directory's eval.jsonl
    _eval(["knn", "--checkpoint", str(run_dir), "--shards", str(demo_shards[2]), "--val-shards",
           str(demo_shards[2]), "--k", "5"])
    assert json.loads((run_dir / "eval.jsonl").read_text().splitlines()[-1])["k"] == 5


def test_eval_shows_its_progress_in_shards_with_the_images_read(run_dir, demo_shards, tmp_path):
    """A bar per split on stderr: shards done of the known total (hence an ETA), images so
    far; none with --no-progress, and stdout is the table either way."""
    args = ["eval", "knn", "--checkpoint", str(run_dir), "--shards", url_list(demo_shards[:2]),
            "--val-shards", str(demo_shards[2]), "--results", str(tmp_path / "r.jsonl")]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    lines = r.stderr.replace("\r", "\n").splitlines()
    train = [ln for ln in lines if ln.startswith("eval train:")]
    val = [ln for ln in lines if ln.startswith("eval val:")]
    assert train[0].startswith("eval train:   0%") and "0/2" in train[0], r.stderr
    assert "100%" in train[-1] and "2/2" in train[-1] and "12 images" in train[-1], r.stderr
    assert "100%" in val[-1] and "1/1" in val[-1] and "6 images" in val[-1], r.stderr
    assert r.stdout.startswith("protocol")
    quiet = CliRunner().invoke(cli, [*args, "--no-progress"])
    assert quiet.exit_code == 0 and not any(ln.startswith("eval") for ln in quiet.stderr.splitlines())
    assert quiet.stdout.splitlines()[1].split()[-2:] == r.stdout.splitlines()[1].split()[-2:]


def test_knn_on_its_own_training_set_with_k1_is_perfect(run_dir, demo_shards, tmp_path):
    # each image's nearest neighbour is itself (cosine 1), so k=1 must recover every label
    shards = url_list(demo_shards)
    out = _eval(["knn", "--checkpoint", str(run_dir), "--shards", shards, "--val-shards", shards,
                 "--k", "1", "--results", str(tmp_path / "r.jsonl")])
    r = json.loads((tmp_path / "r.jsonl").read_text())
    assert (r["n_train"], r["n_val"], r["top1"], r["top5"]) == (18, 18, 100.0, 100.0), out


def test_knn_votes_are_temperature_weighted():
    # one very close neighbour of class 1 outweighs two farther ones of class 0 (a plain
    # majority vote would say 0); a high temperature flattens the weights back to a majority
    train = torch.tensor([[1.0, 0.05], [1.0, 0.5], [1.0, 0.5], [-1.0, 0.0]])
    labels = torch.tensor([1, 0, 0, 2])
    query = torch.tensor([[1.0, 0.0]])
    assert knn_scores(train, labels, query, 3, k=3, temperature=0.07).argmax().item() == 1
    assert knn_scores(train, labels, query, 3, k=3, temperature=100.0).argmax().item() == 0
    scores = knn_scores(train, labels, query, 3, k=3, temperature=0.07)
    assert scores[0, 2] == 0  # the 4th training point is not among the 3 nearest


def test_topk_accuracy_and_linear_probe():
    scores = torch.tensor([[0.1, 0.7, 0.2], [0.5, 0.1, 0.4], [0.2, 0.3, 0.5]])
    assert topk_accuracy(scores, torch.tensor([1, 2, 0]), ks=(1, 2)) == pytest.approx([100 / 3, 200 / 3])
    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 16, generator=gen) * 3
    labels = torch.arange(4).repeat(25)
    feats = centres[labels] + torch.randn(100, 16, generator=gen) + 50  # an offset the BatchNorm removes
    head = train_linear_probe(feats, labels, 4, epochs=10, lr=0.1, batch_size=20)
    with torch.no_grad():
        assert topk_accuracy(head(feats), labels, ks=(1,)) == [100.0]
    assert not any(isinstance(m, torch.nn.BatchNorm1d) and m.affine for m in head.modules())


def test_eval_transform_resizes_shorter_side_and_centre_crops():
    img = torch.zeros(3, 300, 600, dtype=torch.uint8)
    img[:, :, 280:320] = 255  # a white stripe in the middle column band survives the centre crop
    img[:, :, :100] = 255  # the left edge is cut away (256 x 512 after resize; the crop starts at 144)
    x = eval_transform(img)
    assert x.shape == (3, 224, 224)
    white = (1 - 0.485) / 0.229
    assert x[0, :, 112].min() > white - 0.1 and x[0, :, :60].max() < 0


@pytest.mark.parametrize("cmd", [["eval"], ["eval", "knn"], ["eval", "linear-probe"], ["export"], ["visualize"]],
                         ids=" ".join)
def test_help(cmd):
    r = CliRunner().invoke(cli, [*cmd, "--help"])
    assert r.exit_code == 0 and "Usage:" in r.output


def test_ensemble_averages_the_members_probabilities(demo_shards, tmp_path):
    # Two students pretrained apart (here: two seeds). With k=1 on the training set each
    # member is perfect, so the ensemble is too; on held-out images the ensemble's record
    # carries both members' own top-1 and its own.
    a, b = tmp_path / "a", tmp_path / "b"
    save_tiny_student(a, seed=1)
    save_tiny_student(b, seed=2)
    shards = url_list(demo_shards)
    r = CliRunner().invoke(cli, ["eval", "ensemble", "--checkpoint", str(a), "--checkpoint", str(b),
                                 "--shards", shards, "--val-shards", shards, "--k", "1",
                                 "--results", str(tmp_path / "r.jsonl")])
    assert r.exit_code == 0, r.output
    rec = json.loads((tmp_path / "r.jsonl").read_text().splitlines()[-1])
    assert rec["protocol"] == "knn-ensemble" and [m["top1"] for m in rec["members"]] == [100.0, 100.0]
    assert rec["top1"] == 100.0 and len(rec["checkpoint"]) == 2

    from mrmae.train.downstream.evaluate import class_probabilities

    xtr = torch.randn(20, 8, generator=torch.Generator().manual_seed(0))
    ytr = torch.arange(20) % 4
    for protocol in ("knn", "linear-probe"):  # both protocols give rows of probabilities
        p = class_probabilities(protocol, xtr, ytr, xtr[:5], 4, k=3, epochs=2)
        assert p.shape == (5, 4) and (p >= 0).all()
        torch.testing.assert_close(p.sum(1), torch.ones(5))
    r = CliRunner().invoke(cli, ["eval", "ensemble", "--checkpoint", str(a), "--shards", shards,
                                 "--val-shards", shards])
    assert r.exit_code != 0 and "two or more --checkpoint" in r.output


def test_eval_takes_an_export_a_run_or_a_checkpoint_alike_and_fused_on_request(demo_shards, tmp_path):
    """A fused ConvViT student: `eval knn` on its export equals `eval knn` on its run (the
    encoder: last block, final norm; mean feature, there is no [CLS]); `--fused` probes the
    pretraining latent instead, which only a student checkpoint holds."""
    from test_finetune import save_small_convvit

    save_small_convvit(tmp_path / "run")
    r = CliRunner().invoke(cli, ["export", "--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "e")])
    assert r.exit_code == 0, r.output
    data = ["--shards", url_list(demo_shards[:2]), "--val-shards", str(demo_shards[2]), "--k", "3",
            "--results", str(tmp_path / "r.jsonl")]
    for source in (tmp_path / "e", tmp_path / "run", tmp_path / "run" / "checkpoints" / "step00000001",
                   tmp_path / "run" / "checkpoints" / "step00000001" / "model.safetensors"):
        _eval(["knn", "--checkpoint", str(source), *data])
    _eval(["knn", "--checkpoint", str(tmp_path / "run"), "--fused", *data])
    recs = [json.loads(ln) for ln in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert [(r["feature"], r["fused"]) for r in recs] == [("mean", False)] * 4 + [("mean", True)]
    assert len({(r["top1"], r["top5"]) for r in recs[:4]}) == 1  # the same encoder, whatever the source

    from mrmae.train.downstream.evaluate import extract_features, load_frozen

    shard = str(demo_shards[2])
    plain = extract_features(load_frozen(tmp_path / "e" / "model.safetensors"), shard).features
    torch.testing.assert_close(extract_features(load_frozen(tmp_path / "run"), shard).features, plain)
    assert (extract_features(load_frozen(tmp_path / "run", fused=True), shard).features - plain).abs().max() > 1e-3

    for args, message in ((["--fused"], "an exported encoder keeps no fusion"), (["--feature", "cls"], "no [CLS]")):
        r = CliRunner().invoke(cli, ["eval", "knn", "--checkpoint", str(tmp_path / "e"), *data, *args])
        assert r.exit_code == 1 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.output


def test_eval_of_an_export_appends_to_the_run_it_came_from(run_dir, demo_shards, tmp_path):
    """An export names its run (relative, in its config.json): eval on the export appends to
    that run's eval.jsonl, so `mrmae report RUN` shows it. Moved away from its run (or with
    the run gone), the export keeps its results beside itself."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    (run / "eval.jsonl").unlink(missing_ok=True)
    r = CliRunner().invoke(cli, ["export", "--checkpoint", str(run), "--out", str(tmp_path / "enc")])
    assert r.exit_code == 0, r.output
    data = ["--shards", str(demo_shards[0]), "--val-shards", str(demo_shards[1]), "--k", "3", "--no-progress"]
    out = _eval(["knn", "--checkpoint", str(tmp_path / "enc"), *data])
    assert out.splitlines()[-1] == f"appended to {run / 'eval.jsonl'} (the run the export came from)"
    assert json.loads((run / "eval.jsonl").read_text().splitlines()[-1])["k"] == 3
    r = CliRunner().invoke(cli, ["report", str(run), "--out", str(tmp_path / "report")])
    assert r.exit_code == 0 and "knn cls top1" in (tmp_path / "report" / "report.md").read_text(), r.output
    (tmp_path / "elsewhere").mkdir()
    shutil.move(tmp_path / "enc", tmp_path / "elsewhere" / "enc")
    out = _eval(["knn", "--checkpoint", str(tmp_path / "elsewhere" / "enc"), *data])
    assert out.splitlines()[-1] == f"appended to {tmp_path / 'elsewhere' / 'enc' / 'eval.jsonl'} (beside the weights)"

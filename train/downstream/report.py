"""`mrmae report RUN... --out DIR`: an ablation's runs side by side, as a table and a picture.

Reads what the runs wrote (never their checkpoints):

- RUN/config.json: the resolved options (model, mask, fusion, targets, loss weights);
- RUN/metrics.jsonl: one record per optimiser step (`epoch`, `step`, `loss_recon`,
  `loss_mimic`, `loss_recon_features` for table 3 row 5's decoder feature head, ...), and for
  fine-tuning runs one per epoch with `top1`/`top5`;
- RUN/eval.jsonl (when present): the results `mrmae eval` appended.

Writes, each under a temporary name and then renamed (a half-written file never takes
the final name):

- DIR/report.md: a header line saying how the columns are computed, one markdown table
  (one row per run, columns as `RunSummary` describes them), a link to the picture;
- DIR/report.csv: the same columns and rows (csv module), numbers at full precision;
- DIR/curves.png: L_R and the high-level loss (L_M, or row 5's feature reconstruction) per
  step, one line per run, two panels (matplotlib, Agg).

The files are read as `records.py` reads them: line by line, a line at most
`records.LINE_LIMIT` bytes; a truncated last line (a run killed while appending it) is
skipped with one warning; any other line that is not a JSON object, or a key of a wrong
type, is refused (`records.RecordError`), naming the file, the line and the key.
"""

from __future__ import annotations

import contextlib
import csv
import os
import warnings
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from mrmae.shared.errors import MrmaeError, OptionError, naming
from mrmae.shared.outfiles import refuse_link
from mrmae.train.masking import mask_strategies
from mrmae.train.run.records import (EVALS, METRICS, RunConfig, StepOptionsRecord, read_evals, read_metrics,
                                 read_run_config)

FINAL_LOSS_NOTE = ("final L_R / final L_M: the mean of loss_recon / loss_mimic over the logged steps of the run's "
                   "last epoch in metrics.jsonl (final L_R features, where a run has it: loss_recon_features, the "
                   "teacher's features reconstructed at the decoder, table 3 row 5)")
FEATURES_COLUMN = "final L_R features"
EVAL_NOTE = ("eval columns: top-1 (%) from RUN/eval.jsonl, the last line per protocol and feature; finetune "
             "top1/top5: the last evaluated epoch in metrics.jsonl; `images`: the validation images each is over "
             "('N of M' when M were present and some skipped) and their classes; blank: not measured")


class ReportError(MrmaeError, ValueError):
    """A RUN that is none; names the path (exit 1). (A run file that is wrong: RecordError.)"""


@dataclass(frozen=True)
class ReportConfig:
    runs: tuple[str, ...]  # run directories (each with a config.json), as given
    out: str  # the directory the report goes to (created)


@dataclass(frozen=True)
class ReportPaths:
    markdown: Path
    csv: Path
    curves: Path


@dataclass
class Curve:
    """One run's logged losses: recon [T] at recon_steps [T], mimic [U] at mimic_steps [U]
    (U = 0 when the run mimicked nothing). Compact arrays: a long run logs 10^6 steps."""

    recon_steps: array = field(default_factory=lambda: array("d"))
    recon: array = field(default_factory=lambda: array("d"))
    mimic_steps: array = field(default_factory=lambda: array("d"))
    mimic: array = field(default_factory=lambda: array("d"))
    features_steps: array = field(default_factory=lambda: array("d"))  # loss_recon_features (row 5)
    features: array = field(default_factory=lambda: array("d"))


@dataclass
class RunSummary:
    """One row of the report. None is a blank cell (not measured, not recorded, not applicable)."""

    run: str  # a short unique name: the shortest tail of the run's path that no other run shares
    path: str  # the run directory as given on the command line
    task: str  # "pretrain" or "finetune" (config.json `task`; pretrain runs record none)
    model: str | None  # registry name; fine-tuning: the timm model and the checkpoint it started from
    mask: str | None  # "random 0.75" / "focused 0.75" (+ T and uniform mix when not 1 and 0)
    fusion: str | None  # fused encoder blocks, "last" when none; ConvViT: "stages+" (stage-1/2 always fused)
    targets: str | None  # "TARGET @ CACHE" (cached), "live SPEC", "none (MAE)"; + target norm, PCA rank
    weights: str | None  # recon/mimic loss weights; plain MAE and mimic weight 0 train on L_R alone: "1/0"
    epochs: str | None  # epochs with logged steps; "N of M" when the run stopped before its M epochs
    steps: int | None  # the last logged optimiser step
    final_recon: float | None  # FINAL_LOSS_NOTE
    final_mimic: float | None  # FINAL_LOSS_NOTE; None for runs that mimic nothing
    results: dict[str, float | str] = field(default_factory=dict)  # eval column name -> value (EVAL_NOTE)
    final_features: float | None = None  # FINAL_LOSS_NOTE; runs reconstructing features at the decoder
    notes: list[str] = field(default_factory=list)  # the runs' own notes on their evaluations (classes, members)


FIXED_COLUMNS = ("run", "task", "model", "mask", "fusion", "targets", "loss weights (recon/mimic)", "epochs",
                 "steps", "final L_R", "final L_M")


def row_cells(s: RunSummary, eval_columns: list[str], features: bool = False) -> list:
    """The row's values in column order (FIXED_COLUMNS, FEATURES_COLUMN when `features`, eval
    columns, "path"); None for blank."""
    fixed = [s.run, s.task, s.model, s.mask, s.fusion, s.targets, s.weights, s.epochs, s.steps,
             s.final_recon, s.final_mimic, *([s.final_features] if features else [])]
    return [*fixed, *(s.results.get(c) for c in eval_columns), s.path]


# --- reading ---------------------------------------------------------------------------------


@dataclass
class _Metrics:
    """What the report takes from one metrics.jsonl."""

    last_epoch: int | None = None
    last_step: int | None = None
    per_epoch: dict[int, list[float]] = field(default_factory=dict)  # epoch -> [n, sum] of recon, mimic, features
    top: tuple[float | None, float | None] = (None, None)  # the last evaluated epoch's (top1, top5)
    images: str | None = None  # the images that epoch's top-1 is over (EVAL_NOTE)
    curve: Curve = field(default_factory=Curve)

    def final(self) -> tuple[float | None, float | None, float | None]:
        """(mean loss_recon, loss_mimic, loss_recon_features) over the last epoch with logged
        losses (FINAL_LOSS_NOTE)."""
        if not self.per_epoch:
            return None, None, None
        sums = self.per_epoch[max(self.per_epoch)]
        return tuple(sums[i + 1] / sums[i] if sums[i] else None for i in (0, 2, 4))


def summarise_metrics(path: Path, mimics: bool) -> _Metrics:
    """Epochs, last step, per-epoch loss sums, final top-1/top-5 and the loss curves of a
    metrics.jsonl; `mimics` False: loss_mimic is ignored (a plain run logs a placeholder 0)."""
    m = _Metrics()
    for r in read_metrics(path):
        if r.epoch is not None:
            m.last_epoch = r.epoch if m.last_epoch is None else max(r.epoch, m.last_epoch)
        if r.step is not None:
            m.last_step = r.step if m.last_step is None else max(r.step, m.last_step)
        if r.top1 is not None:  # a fine-tuning epoch's evaluation
            m.top, m.images = (r.top1, r.top5), None if r.images is None else str(r.images)
        if r.epoch is None or r.step is None:
            continue
        c = m.curve
        for slot, key, steps, values in ((0, "loss_recon", c.recon_steps, c.recon),
                                         (2, "loss_mimic", c.mimic_steps, c.mimic),
                                         (4, "loss_recon_features", c.features_steps, c.features)):
            value = r.losses.get(key)
            if value is None or (key == "loss_mimic" and not mimics):
                continue
            sums = m.per_epoch.setdefault(r.epoch, [0, 0.0] * 3)
            sums[slot], sums[slot + 1] = sums[slot] + 1, sums[slot + 1] + value
            steps.append(r.step)
            values.append(value)
    return m


def eval_columns(path: Path) -> tuple[dict[str, float | str | None], list[str]]:
    """'PROTOCOL FEATURE top1' -> top-1 and 'PROTOCOL FEATURE images' -> the images it is over
    of an eval.jsonl, the last line per protocol and feature winning (keys in the order they
    first appear); and those lines' notes, an ensemble's members among them."""
    results: dict[str, float | str | None] = {}
    notes: dict[str, list[str]] = {}
    for r in read_evals(path):
        name = f"{r.protocol} {r.feature_name}"
        results[f"{name} top1"], results[f"{name} images"] = r.top1, None if r.images is None else str(r.images)
        notes[name] = [f"{name}: {n}" for n in r.notes]
        if r.members:
            shown = [m.checkpoint for m in r.members]
            notes[name].insert(0, f"{name}: the mean of {len(shown)} members: {', '.join(shown)}")
    return results, [n for kept in notes.values() for n in kept]


# --- what a run is, from its config.json ------------------------------------------------------


@dataclass(frozen=True)
class _Setup:
    """The config.json columns of a row (see RunSummary) and whether the run mimics."""

    task: str
    model: str | None
    mask: str | None = None
    fusion: str | None = None
    targets: str | None = None
    weights: str | None = None
    epochs: int | None = None  # planned
    mimics: bool = False
    notes: tuple[str, ...] = ()  # a fine-tuning run's notes on its labels (config.json `notes`)


def describe_config(cfg: RunConfig) -> _Setup:
    """A run's setup from its resolved config.json."""
    if cfg.task == "finetune":
        start = cfg.checkpoint
        return _Setup(cfg.task, f"{cfg.timm_model or '?'} from {start}" if start else cfg.timm_model,
                      epochs=cfg.epochs, notes=cfg.notes)
    opts = cfg.step
    recon_w, mimic_w = opts.recon_weight, opts.mimic_weight
    at_decoder = opts.high_level_at == "decoder"  # row 5: no L_M, features at the decoder
    high_level = bool(cfg.feature_cache or cfg.teacher) and mimic_w != 0  # else the loss is L_R alone (student.py)
    weights = "1/0" if not high_level else None if recon_w is None or mimic_w is None else f"{recon_w:g}/{mimic_w:g}"
    mimics = high_level and not at_decoder
    targets = describe_targets(cfg) + (", at the decoder (masked tokens)" if at_decoder else "")
    return _Setup(cfg.task, cfg.model, describe_mask(opts), describe_fusion(cfg), targets, weights, cfg.epochs,
                  mimics)


def describe_mask(opts: StepOptionsRecord) -> str | None:
    """'random 0.75', 'focused 0.75', with the strategy's options that are not at their
    defaults under their labels ('focused 0.75 T=0.5 mix=0.1')."""
    if opts.mask is None:
        return None
    shown = opts.mask if opts.mask_ratio is None else f"{opts.mask} {opts.mask_ratio:g}"
    strategy = mask_strategies().get(opts.mask)
    if strategy is None:  # a strategy this version lacks: its name says it
        return shown
    for option in strategy.options:
        value = opts.mask_option(option.name)
        shown += f" {option.label or option.name}={value:g}" if value not in (None, option.default) else ""
    return shown


def describe_fusion(cfg: RunConfig) -> str | None:
    """Fused encoder blocks ('4,8,12'), 'last' when none, after what the student's family
    always fuses (a ConvViT its stage-1/2 outputs: 'stages+4,8,11', 'stages+last')."""
    if cfg.fuse_layers is None:
        return None
    blocks = ",".join(map(str, cfg.fuse_layers)) or "last"
    return fusion_prefix(cfg.model) + blocks


def fusion_prefix(model: str | None) -> str:
    """What the student family of `model` fuses besides the listed blocks, as the report shows
    it (`StudentFamily.fusion_label`); '' for an unknown name (a family this version lacks)."""
    from mrmae.train.students.registry import families

    family = next((f for f in families().values() if model in f.archs), None)
    return family.fusion_label if family is not None else ""


def describe_targets(cfg: RunConfig) -> str:
    """'TARGET @ CACHE' (cached; TARGET 'main' = the teacher that drew the views), 'live SPEC',
    'none (MAE)'; then the target norm when not none and the PCA rank of low-rank caches."""
    if not cfg.feature_cache and not cfg.teacher:
        return "none (MAE)"
    shown = f"{cfg.target or 'main'} @ {cfg.feature_cache}" if cfg.feature_cache else f"live {cfg.teacher}"
    norm = cfg.step.target_norm
    shown += f", {norm} norm" if norm not in (None, "none") else ""
    ranks = [str(r) for r in cfg.pca_ranks]
    return shown + (f", PCA rank {'/'.join(ranks)}" if ranks else "")


# --- runs -------------------------------------------------------------------------------------


def check_runs(runs: tuple[str, ...], out: str) -> list[Path]:
    """The run directories, refused (ReportError naming the path) when one is not a run, is
    given twice, or when `out` lies inside a run's checkpoints."""
    if not runs:
        raise OptionError("give at least one RUN directory")
    seen: dict[Path, str] = {}
    for run in runs:
        path = Path(run)
        if not path.is_dir():
            raise ReportError(f"{run}: not a run directory ({'a file' if path.exists() else 'no such directory'})")
        if not (path / "config.json").is_file():
            raise ReportError(f"{run}: not a run directory (no config.json)")
        if path.resolve() in seen:
            raise OptionError(f"{run}: the same run as {seen[path.resolve()]}, given twice")
        seen[path.resolve()] = run
    target = Path(out).resolve()
    for resolved, run in seen.items():
        if target.is_relative_to(resolved / "checkpoints"):
            raise OptionError(f"--out {out}: inside the checkpoints of run {run}; give another directory")
    return [Path(r) for r in runs]


def short_names(paths: list[Path]) -> list[str]:
    """The shortest tails of the (resolved) paths that tell the runs apart: r/mae, r/focused ->
    mae, focused; a/run, b/run -> a/run, b/run."""
    parts = [p.resolve().parts for p in paths]
    for k in range(1, max(map(len, parts)) + 1):
        names = ["/".join(pp[-k:]) for pp in parts]
        if len(set(names)) == len(names):
            return names
    return [str(p) for p in paths]  # (resolved paths of distinct runs always differ before this)


def load_run(path: Path, name: str) -> tuple[RunSummary, Curve]:
    """The row and the loss curves of the run directory `path`."""
    setup = describe_config(read_run_config(path))
    metrics = path / METRICS
    if metrics.is_file():
        m = summarise_metrics(metrics, setup.mimics)
    else:
        m = _Metrics()
        warnings.warn(f"{metrics}: no such file (no step logged yet); the row of {path} has no losses")
    results, notes = eval_columns(path / EVALS) if (path / EVALS).is_file() else ({}, [])
    if setup.task == "finetune" and m.top[0] is not None:
        results.update({"finetune top1": m.top[0], "finetune top5": m.top[1], "finetune images": m.images})
        notes += [f"finetune: {n}" for n in setup.notes]
    reached = None if m.last_epoch is None else m.last_epoch + 1
    epochs = (None if reached is None else
              f"{reached} of {setup.epochs}" if setup.epochs is not None and reached < setup.epochs else str(reached))
    final_recon, final_mimic, final_features = m.final()
    summary = RunSummary(name, str(path), setup.task, setup.model, setup.mask, setup.fusion, setup.targets,
                         setup.weights, epochs, m.last_step, final_recon, final_mimic, results, final_features,
                         notes)
    return summary, m.curve


# --- writing ----------------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """A temporary path beside `final`, renamed to it when the block ends without error (and
    removed when it does not): a report file is whole or absent, never half-written."""
    refuse_link(final)  # (a link where a report file goes: never written through)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()  # (a leftover, or a link planted at the temporary's name: removed, never followed)
    try:
        yield tmp
        with naming(final):
            os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def _cell(column: str, value) -> str:
    """A markdown cell: blank for None, losses to 4 significant digits, accuracies to 2 decimals."""
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}" if column.startswith("final ") else f"{value:.2f}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown(header: list[str], rows: list[list], notes: list[str] = ()) -> str:
    """report.md: what the columns mean, the table, the runs' notes on their evaluations, the picture."""
    lines = [f"# mrmae report: {len(rows)} runs", "", f"{FINAL_LOSS_NOTE}. {EVAL_NOTE}.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c, v) for c, v in zip(header, row)) + " |" for row in rows]
    if notes:
        lines += ["", "Notes:", "", *(f"- {n}".replace("\n", " ") for n in notes)]
    return "\n".join([*lines, "", "![L_R and L_M per step](curves.png)", ""])


def write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    """report.csv: the same columns; numbers at full precision, blank cells empty."""
    with atomic_path(path) as tmp, naming(tmp), open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows([["" if v is None else v for v in row] for row in rows])


def write_text(path: Path, content: str) -> None:
    with atomic_path(path) as tmp, naming(tmp):
        tmp.write_text(content)


def draw_curves(path: Path, names: list[str], curves: list[Curve]) -> None:
    """curves.png: L_R (left) and L_M (right) against the step, one line per run (a run's
    colour is the same in both panels); log y when every drawn value is positive."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # lazily: `mrmae --help` stays fast
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    fig = Figure(figsize=(13, 5), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)  # the Agg canvas, whatever backend matplotlib would pick
    for ax, kind in zip(fig.subplots(1, 2), ("recon", "mimic")):
        drawn = []
        for i, (name, c) in enumerate(zip(names, curves)):
            lines = [(c.recon_steps, c.recon, name)] if kind == "recon" else \
                [(c.mimic_steps, c.mimic, name), (c.features_steps, c.features, f"{name} (features, decoder)")]
            for steps, values, label in lines:
                if values:
                    ax.plot(steps, values, color=f"C{i % 10}", linestyle=("-", "--", ":", "-.")[i // 10 % 4],
                            marker="o" if len(values) <= 50 else None, markersize=3, linewidth=1.2, label=label)
                    drawn.append(min(values))
        title = "reconstruction loss L_R" if kind == "recon" else \
            "mimic loss L_M (row 5: teacher features at the decoder)"
        ax.set(xlabel="optimiser step", ylabel=f"loss_{kind} (metrics.jsonl)", title=title)
        ax.grid(True, which="both", alpha=0.3)
        if drawn:
            if min(drawn) > 0:
                ax.set_yscale("log")
                for axis in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):  # 1.05, not 1.05x10^0
                    axis(FuncFormatter(lambda v, _: f"{v:.3g}"))
            ax.legend(fontsize="small")
        else:
            ax.text(0.5, 0.5, "no run logged this loss", transform=ax.transAxes, ha="center", va="center")
    with atomic_path(path) as tmp, naming(tmp):
        fig.savefig(tmp, format="png")


def run_report(cfg: ReportConfig) -> ReportPaths:
    """Read every run (all checks before anything is written), then write report.md,
    report.csv and curves.png into cfg.out; returns their paths."""
    paths = check_runs(cfg.runs, cfg.out)
    loaded = [load_run(p, n) for p, n in zip(paths, short_names(paths))]
    summaries, curves = [s for s, _ in loaded], [c for _, c in loaded]
    eval_columns = list(dict.fromkeys(k for s in summaries for k in s.results))  # first-seen order
    features = any(s.final_features is not None for s in summaries)  # a row-5 run among them
    header = [*FIXED_COLUMNS, *([FEATURES_COLUMN] if features else []), *eval_columns, "path"]
    rows = [row_cells(s, eval_columns, features) for s in summaries]
    out = Path(cfg.out)
    with naming(out):
        out.mkdir(parents=True, exist_ok=True)
    written = ReportPaths(out / "report.md", out / "report.csv", out / "curves.png")
    draw_curves(written.curves, [s.run for s in summaries], curves)
    write_csv(written.csv, header, rows)
    write_text(written.markdown, markdown(header, rows, [f"{s.run}: {n}" for s in summaries for n in s.notes]))
    return written

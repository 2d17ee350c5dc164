"""The options every training command shares (`RunOptions`: what `loop.TrainRun` reads), each
declared once (`shared/options.py`), and the start checks both commands make with them.

`PretrainConfig` (train/config.py) and `FinetuneConfig` (train/downstream/config.py) extend
`RunOptions`; a command whose default differs (fine-tuning's 100 epochs) re-declares the
field with `like`, keeping the help, type and range. Kept free of torch: the command line
builds its options from these classes before anything heavy is imported.
"""

from __future__ import annotations

from dataclasses import dataclass

import click

from mrmae.shared.errors import OptionChecks, OptionError
from mrmae.shared.options import check_declared, option, progress


def _accelerate_device(ctx: click.Context, param: click.Parameter, value: str) -> str:
    if value == "cuda":
        from mrmae.shared.options import check_device

        check_device(ctx, param, value)
    return value


@dataclass(kw_only=True)
class RunOptions:
    out: str = option("Run directory: config.json, metrics.jsonl, checkpoints/ (created).",
                      type=click.Path(file_okay=False))
    epochs: int = option("Passes over the data.", 1, type=click.IntRange(min=1))
    batch_size: int = option("Per process and micro-batch.", 64, type=click.IntRange(min=1))
    accum_steps: int | None = option("Gradient accumulation (default 1, or what --effective-batch asks).", None,
                                     type=click.IntRange(min=1))
    effective_batch: int | None = option("Images per optimiser step (the paper's 1024): --accum-steps = N / "
                                         "(--batch-size x processes).", None, type=click.IntRange(min=1))
    blr: float = option("lr = blr x effective batch / 256.", 1.5e-4, low=0.0, low_open=True)
    lr: float | None = option("Absolute peak lr (overrides --blr).", None, type=float, low=0.0, low_open=True)
    min_lr: float = option("Where the cosine schedule ends.", 0.0, low=0.0)
    warmup_epochs: float = option("Linear lr warm-up, in epochs (a fraction is fine; 0: none).", 0.0, low=0.0)
    weight_decay: float = option("AdamW's, except on norms, biases and position/cls/mask tokens.", 0.05, low=0.0)
    shuffle_buffer: int = option("Samples a loader shuffles among.", 1000, type=click.IntRange(min=0))
    # --resume stays a flag (`--resume --epochs 4` keeps parsing); where to resume from is an
    # option of its own, so no value can be mistaken for the flag's (`--resume auto`).
    resume: bool = option("Continue the run in --out from OUT/checkpoints/latest.", False, is_flag=True)
    resume_from: str | None = option("Continue from the newest complete checkpoint (auto) or from the checkpoint "
                                     "OUT/checkpoints/stepN given, whatever OUT/checkpoints/latest says.", None,
                                     metavar="auto|PATH")
    overwrite: bool = option("--out holds a run: rename it to OUT.old-DATE-TIME (never deleted) and start anew. "
                             "Without --resume or this, such an --out is refused.", False, is_flag=True)
    save_every_steps: int = option("0: at each epoch's end only.", 0, type=click.IntRange(min=0))
    device: str = option("auto: accelerate's choice (a GPU per process where there are GPUs, bf16); cpu: CPU even "
                         "where there are GPUs (fp32).", "auto", type=click.Choice(["auto", "cpu", "cuda"]),
                         callback=_accelerate_device)
    progress: bool = progress()
    samples_per_epoch: int | None = None  # default: counted (the cache, the tars); not on the command line


def check_run_options(cfg: RunOptions, checks: OptionChecks) -> None:
    """What every training run refuses before anything is written, each failure added to
    `checks`: the declared types and ranges (`shared.options.check_declared`: NaN, --lr 0,
    --batch-size 0 from Python), then a warm-up as long as the run."""
    check_declared(cfg, checks)
    checks.run(check_warmup, cfg.warmup_epochs, cfg.epochs)


def check_warmup(warmup_epochs: float, epochs: int) -> None:
    """A warm-up as long as the run never reaches the peak lr, and a longer one trains the
    whole run at a fraction of it: refused (0, no warm-up, is fine). A warm-up the user did
    not give is shortened to fit before this check (`loop.fit_warmup`)."""
    if warmup_epochs > 0 and warmup_epochs >= epochs:
        raise OptionError(f"--warmup-epochs {warmup_epochs:g}: must be below --epochs {epochs} (a warm-up of the "
                          "whole run or longer never reaches the peak lr)")


def check_shard_list(text: str, option: str = "--shards") -> None:
    """`option` (a shard list) names at least one shard, each once."""
    from mrmae.shared.shards import expand_urls

    urls = expand_urls(text)
    if not urls:
        raise OptionError(f"{option} {text!r}: names no shard")
    if len(set(urls)) != len(urls):  # e.g. overlapping brace ranges: those samples would count twice an epoch
        twice = next(u for u in urls if urls.count(u) > 1)
        raise OptionError(f"{option}: {twice} is listed twice")

"""The command line's shared conventions: `--help` in sections with an example, the old
spellings of renamed options.

Every `mrmae` command is a `Command` (groups a `Group`): its options are listed under
the headings of `SECTIONS`, found by parameter name in `SECTION_OF` (one table, since the
commands share one vocabulary) or in the command's own `sections`, and its help ends with
the command's `example`. Options are declared once, where their value lands (a config
dataclass's field: `shared/options.py`); this module only lays them out. An option's old spelling stays accepted as a second name of the
option (`click.option("--feature-cache", "--out", ...)`) listed in the command's
`renamed`: it is left out of `--help` and using it prints one warning line. A positional
argument kept for old scripts is listed there by its parameter name (and left out of the
usage line); `renamed_argument` warns about it.
"""

from __future__ import annotations

import click

from mrmae.shared.options import click_field, progress, warn_renamed, workers

# Help headings, in the order they are shown.
SECTIONS = ("Data", "Teacher", "Cache storage", "Model", "Masking", "Losses", "Augmentation", "Optimisation",
            "Protocol", "Output and run", "Performance")

# The section of each parameter name, whatever the command (its `sections` may override one).
SECTION_OF = {
    **dict.fromkeys(("shards", "val_shards", "feature_cache", "target", "views_per_image", "num_views", "seed",
                     "image_size", "shuffle_buffer", "data_split", "pixels_from_cache", "num_classes", "num_images",
                     "shard_size", "view_index", "num", "sources", "strict", "runs", "out_dir", "cache_dir",
                     "train_shards", "label_format", "label_field", "class_map", "skip_bad_labels"), "Data"),
    **dict.fromkeys(("teacher", "add_teacher", "layers"), "Teacher"),
    **dict.fromkeys(("dtype", "int8_group", "cache_format", "store_pixels", "pca_rank", "pca_fit_views"),
                    "Cache storage"),
    **dict.fromkeys(("model", "decoder_dim", "decoder_depth", "fuse_layers", "checkpoint", "drop_path", "global_pool",
                     "feature", "fused", "checkpoint_format", "init"), "Model"),
    **dict.fromkeys(("mask", "mask_ratio", "focus_temperature", "focus_uniform_mix", "mask_option"), "Masking"),
    **dict.fromkeys(("recon_weight", "mimic_weight", "target_norm", "smoothing", "high_level_at"), "Losses"),
    **dict.fromkeys(("mixup", "cutmix", "mixup_prob", "mixup_switch_prob", "augment", "rand_augment", "re_prob"),
                    "Augmentation"),
    **dict.fromkeys(("epochs", "batch_size", "accum_steps", "effective_batch", "blr", "lr", "min_lr", "warmup_epochs",
                     "weight_decay", "layer_decay", "layer_decay_groups"), "Optimisation"),
    **dict.fromkeys(("protocol", "k", "temperature", "probe_batch_size"), "Protocol"),
    **dict.fromkeys(("out", "config_file", "resume", "resume_from", "overwrite", "save_every_steps", "results",
                     "as_json", "recompute", "repair", "older_than", "dry_run", "version", "push_to_hub"), "Output and run"),
    **dict.fromkeys(("device", "workers", "eval_batch_size", "render_on_device", "decode_on_device", "compile",
                     "no_progress"), "Performance"),
}


def workers_option(help_text: str):
    """The `--workers` option of a command without a config class (`shared.options.workers`)."""
    return click_field("workers", workers(help_text))


def no_progress_option(f):
    return click_field("progress", progress())(f)


def example_epilog(*commands: str) -> str:
    """An epilog showing `commands` as they are written (click keeps a \\b paragraph's lines)."""
    head = "Example:" if len(commands) == 1 else "Examples:"
    return "\b\n" + head + "\n" + "\n".join(f"  {c}" for c in commands)


class _Sectioned:
    """Options under section headings; renamed spellings hidden and warned about."""

    def __init__(self, *args, sections: dict[str, str] | None = None, renamed: dict[str, str] | None = None,
                 example: str | tuple[str, ...] | None = None, **kwargs) -> None:
        if example is not None:
            kwargs["epilog"] = example_epilog(*((example,) if isinstance(example, str) else example))
        super().__init__(*args, **kwargs)
        self.sections = {**SECTION_OF, **(sections or {})}
        self.renamed = dict(renamed or {})  # old spelling -> the one to use

    def section_of(self, ctx: click.Context, param: click.Parameter) -> str | None:
        if set(getattr(param, "opts", ())) & set(ctx.help_option_names):  # --help, whatever click calls it
            return "Output and run"
        return self.sections.get(param.name or "")

    def help_record(self, ctx: click.Context, param: click.Parameter) -> tuple[str, str] | None:
        """`param`'s help line without its old spellings."""
        opts = list(getattr(param, "opts", []))
        shown = [o for o in opts if o not in self.renamed]
        if shown == opts:
            return param.get_help_record(ctx)
        param.opts = shown
        try:
            return param.get_help_record(ctx)
        finally:
            param.opts = opts

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        groups: dict[str, list[tuple[str, str]]] = {}
        for param in self.get_params(ctx):
            if isinstance(param, click.Argument) or (record := self.help_record(ctx, param)) is None:
                continue
            groups.setdefault(self.section_of(ctx, param) or "Options", []).append(record)
        for name in (*SECTIONS, "Options"):
            if name in groups:
                with formatter.section(name):
                    formatter.write_dl(groups[name])
        if isinstance(self, click.Group):
            self.format_commands(ctx, formatter)

    def collect_usage_pieces(self, ctx: click.Context) -> list[str]:
        """Usage without the positional arguments kept only for old scripts."""
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if not (isinstance(param, click.Argument) and param.name in self.renamed):
                pieces.extend(param.get_usage_pieces(ctx))
        return pieces

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        """click's parsing, with every bad or missing option of the command line reported
        together (click stops at the first): each parameter's `handle_parse_result` is
        wrapped for the parse to record its BadParameter instead of raising it."""
        for token in args:
            if token == "--":
                break
            name = token.split("=", 1)[0]
            if name.startswith("-") and name in self.renamed:
                warn_renamed(name, self.renamed[name])
        if isinstance(self, click.Group):  # a group's own options only; its command parses the rest
            return super().parse_args(ctx, args)
        failed: list[click.UsageError] = []
        params = self.get_params(ctx)
        for param in params:
            param.handle_parse_result = _recording(param.handle_parse_result, failed)
        try:
            rest = super().parse_args(ctx, args)
        finally:
            for param in params:
                del param.handle_parse_result  # (the instance attribute: the class's method again)
        if len(failed) > 1:
            raise UsageErrors(failed)
        if failed:
            raise failed[0]
        return rest


class UsageErrors(click.UsageError):
    """Several bad options of one command line; the CLI prints a line each (`lines`)."""

    def __init__(self, errors: list[click.UsageError]) -> None:
        self.lines = [" ".join(e.format_message().split()) for e in errors]
        super().__init__("; ".join(self.lines), errors[0].ctx)


def _recording(handle, failed: list):
    """`handle` (a parameter's handle_parse_result) that records a BadParameter or
    MissingParameter in `failed` and goes on, leaving that parameter out of ctx.params."""
    def handle_parse_result(ctx: click.Context, opts, args):
        try:
            return handle(ctx, opts, args)
        except click.BadParameter as e:  # (MissingParameter is one)
            failed.append(e)
            return None, args
    return handle_parse_result


class Command(_Sectioned, click.Command):
    """A command whose --help lists its options by section and ends with an example."""


class Group(_Sectioned, click.Group):
    """A group whose subcommands are `Command`s and `Group`s, with sectioned --help."""

    command_class = Command
    group_class = type


def renamed_argument(old: str, new: str, value, option_value):
    """The value of an option that used to be a positional argument: the option's, or the
    argument's with a warning; a UsageError when both or neither are given."""
    if value is not None and option_value is not None:
        raise click.UsageError(f"give {new} once (the positional {old} is its old spelling)")
    if value is not None:
        warn_renamed(f"a positional {old}", f"{new} {old}")
        return value
    if option_value is None:
        raise click.UsageError(f"Missing option '{new}'.")
    return option_value

"""`--config FILE.yaml` for `mrmae pretrain` and `mrmae finetune` (recipes/ holds the paper's).

The file is a flat YAML mapping of option names, spelled as on the command line
(`fuse-layers`) or with underscores (`fuse_layers`), to scalars or lists of scalars (a list
is what the comma-separated options take: `fuse-layers: [4, 8, 11]`). It is read with
`yaml.safe_load` only (no tag builds an object) and becomes the command's click
`default_map`, so each value passes its option's type and callback and an option given on
the command line overrides it. Everything is checked while the command line is parsed,
before anything is written; a bad file is one line naming it (a click UsageError).
"""

from __future__ import annotations

import difflib
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import click
import yaml

MAX_BYTES = 1 << 20  # a recipe is a few dozen lines; a bigger file is a mistake (or hostile)
SCALARS = (str, int, float, bool)


@dataclass(frozen=True)
class RecipeFile:
    """The --config file a run read: its resolved path and the sha256 of its bytes (config.json)."""

    path: str
    sha256: str


def config_option(f):
    """Decorator: the eager `--config FILE.yaml` option of a training command. Its value (a
    RecipeFile or None) reaches the command as `config_file`."""
    return click.option("--config", "config_file", is_eager=True, callback=_load_into_context, metavar="FILE|NAME",
                        help="Options from a flat YAML mapping: a file, or the name of a recipe mrmae ships (`mrmae "
                             "recipes`, e.g. paper-pretrain-convvit-base); options on the command line override it.")(f)


def _load_into_context(ctx: click.Context, param: click.Parameter, value: str | None) -> RecipeFile | None:
    """click callback: check the file and make its options the command's defaults."""
    if value is None:
        return None
    path = find_recipe(value)
    data = _read(path)
    defaults = options_from(path, data, ctx, exclude=param)
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    return RecipeFile(str(Path(path).resolve()), hashlib.sha256(data).hexdigest())


def recipes_folder() -> Path:
    """The recipes the installed package ships (`mrmae/recipes/*.yaml`)."""
    from importlib.resources import files

    return Path(str(files("mrmae.recipes")))


def find_recipe(value: str) -> str:
    """--config's file: `value` where such a path exists; else a recipe shipped with mrmae
    named by `value` (`table3-row2-mimic`, with or without `.yaml`, or as the repository
    writes it, `recipes/table3-row2-mimic.yaml`), so the README's commands work from an
    installed wheel in any directory. A name neither is left for `_read` to refuse."""
    if os.path.lexists(value):
        return value
    name = Path(value).name if Path(value).parent in (Path("."), Path("recipes")) else None
    if name:
        shipped = recipes_folder() / (name if name.endswith(".yaml") else f"{name}.yaml")
        if shipped.is_file():
            return str(shipped)
    return value


def list_recipes() -> list[tuple[str, str]]:
    """(name, first line of its header comment) of each shipped recipe, by name."""
    rows = []
    for f in sorted(recipes_folder().glob("*.yaml")):
        first = next((ln.lstrip("# ").strip() for ln in f.read_text().splitlines() if ln.startswith("#")), "")
        rows.append((f.stem, first))
    return rows


def _fail(path: str, message: str, line: int | None = None) -> click.UsageError:
    return click.UsageError(f"{path}: {f'line {line}: ' if line else ''}{message}")


def _read(path: str) -> bytes:
    """The file's bytes, at most MAX_BYTES (read with a bound: a FIFO or /dev/zero never ends)."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_BYTES + 1)
    except FileNotFoundError:
        near = difflib.get_close_matches(Path(path).stem, [n for n, _ in list_recipes()], n=1)
        hint = f" (did you mean the recipe {near[0]}? `mrmae recipes` lists them)" if near else \
            " (`mrmae recipes` lists the recipes mrmae ships)"
        raise _fail(path, f"no such file, and no recipe of that name{hint}") from None
    except IsADirectoryError:
        raise _fail(path, "is a directory, not a YAML file") from None
    except OSError as e:
        raise _fail(path, f"cannot read ({e.strerror or e})") from None
    if len(data) > MAX_BYTES:
        raise _fail(path, f"over {MAX_BYTES >> 20} MiB; a config file is a short mapping of options")
    return data


def _mapping(path: str, data: bytes) -> tuple[dict, dict[str, int]]:
    """(the file's top-level mapping, the 1-based line of each key). Keys repeated verbatim,
    which yaml.safe_load silently collapses to the last, are refused here."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _fail(path, f"not UTF-8 text (byte {e.start})") from None
    try:
        loaded = yaml.safe_load(text)
        # The node tree (no object is built) gives each key's line and its repeats.
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        what = " ".join(str(x) for x in (getattr(e, "context", None), getattr(e, "problem", None)) if x) or str(e)
        raise _fail(path, f"not YAML: {' '.join(what.split())}", mark.line + 1 if mark else None) from None
    except RecursionError:  # (a value nested thousands deep: the parser's recursion, not a traceback)
        raise _fail(path, "nested too deeply to read; a config file is a flat mapping of options "
                          "(e.g. `epochs: 400`)") from None
    if not isinstance(loaded, dict) or not isinstance(node, yaml.MappingNode):
        kind = "empty" if loaded is None else f"a {type(loaded).__name__}"
        raise _fail(path, f"is {kind}, not a mapping of options (e.g. `epochs: 400`)")
    lines: dict[str, int] = {}
    for key_node, _ in node.value:
        key, line = str(key_node.value), key_node.start_mark.line + 1
        if key in lines:
            raise _fail(path, f"{key}: given twice (also on line {lines[key]})", line)
        lines[key] = line
    return loaded, lines


def _command_options(ctx: click.Context, exclude: click.Parameter) -> dict[str, click.Option]:
    """The command's options by their long name without dashes ('fuse-layers'), --help and
    --config itself left out."""
    names = {}
    for p in ctx.command.get_params(ctx):
        if isinstance(p, click.Option) and p.expose_value and p is not exclude:
            names.update({o[2:]: p for o in p.opts if o.startswith("--")})
    return names


def options_from(path: str, data: bytes, ctx: click.Context, exclude: click.Parameter) -> dict:
    """{parameter name: value} of a config file's bytes for the command of `ctx`, each value
    checked by its option's type and callback; UsageError (one line naming the file, the
    line and the key) for anything else."""
    loaded, lines = _mapping(path, data)
    options, seen, defaults = _command_options(ctx, exclude), {}, {}
    for key, raw in loaded.items():
        line = lines.get(str(key))
        name = str(key).replace("_", "-")
        if not isinstance(key, str) or name not in options:
            if name == "config":
                raise _fail(path, "config: a config file cannot name another (no includes)", line)
            near = difflib.get_close_matches(name, list(options), n=1)
            hint = f" (did you mean {near[0]}?)" if near else ""
            raise _fail(path, f"{key}: not an option of mrmae {ctx.command.name}{hint}", line)
        option = options[name]
        name = _current_spelling(ctx, name)
        if name in seen:
            raise _fail(path, f"{key}: given twice (also as {seen[name]} on line {lines.get(seen[name])})", line)
        seen[name] = key
        value = _flat_value(path, key, raw, line)
        try:
            option.process_value(ctx, value)  # click's own type check and callback, so its message
        except click.BadParameter as e:
            raise _fail(path, " ".join(e.format_message().split()), line) from None
        defaults[option.name] = value
    return defaults


def _current_spelling(ctx: click.Context, name: str) -> str:
    """An option's name as the command spells it now ('shards' for the old 'train-shards',
    with a warning), so the old and new spellings of one option count as the same key."""
    from mrmae.shared.options import warn_renamed

    new = getattr(ctx.command, "renamed", {}).get(f"--{name}")
    if new is None:
        return name
    warn_renamed(f"the config key {name}", new[2:])
    return new[2:]


def _flat_value(path: str, key: str, raw: object, line: int | None) -> object:
    """A scalar as it is; a list of scalars as the comma-separated text the option takes."""
    if isinstance(raw, SCALARS):
        return raw
    if isinstance(raw, list) and all(isinstance(x, SCALARS) for x in raw):
        return ",".join(str(x) for x in raw)
    if raw is None:
        raise _fail(path, f"{key}: has no value (leave the key out for the command's default)", line)
    kind = "a nested mapping" if isinstance(raw, dict) else f"a {type(raw).__name__}"
    raise _fail(path, f"{key}: {kind}; give a number, a string, true/false or a list of them (the file is flat)",
                line)

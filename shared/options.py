"""Each command-line option declared once, where its value lands: a config dataclass's field.

    epochs: int = option("Passes over the data.", 1, type=click.IntRange(min=1))

declares the field's default (a config built in Python gets it too), the help text, the click
type and, for a float, its range (`low`, `high`, `low_open`). From that one declaration:

- `click_options(Config)` decorates a command with an option per declared field, in field
  order (a field holding a config dataclass of declared fields is flattened into its own);
- `config_from(Config, params)` builds the config from click's parsed parameters;
- `check_declared(cfg, checks)` refuses, a line each, an integer below its IntRange and a
  float out of its declared range or not finite (NaN passes click's FloatRange), when the
  run is set up: from the command line or from Python alike, before anything is written.

A subclass that gives an inherited option another default re-declares it with
`like(Base, "name", default)`: the help, type and range stay the base's. The option's
`--help` section is the field's name in `cli_help.SECTION_OF`. The machine-dependent default
of `--workers` (`default_workers`) and the warning for an old spelling live here too, since
both the command line and `--config` files (train/run/recipe.py) use them.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import MISSING, Field, dataclass, field
from typing import Any, Callable

import click

from mrmae.shared.errors import OptionChecks, OptionError

UNSET = object()  # (dataclasses' MISSING means "no default" to a dataclass field)


@dataclass(frozen=True)
class Option:
    """How a config field is set on the command line (see `option`)."""

    help: str
    flags: tuple[str, ...] = ()  # its spellings, the current one first; () : --field-name
    type: Any = None
    low: float | None = None  # a float option's range: [low, high], (low, high] with low_open
    high: float = math.inf
    low_open: bool = False
    cli_default: Any = UNSET  # the command line's default where it is not the field's (a callable: click calls it)
    invert: bool = False  # a flag (--no-progress) that sets the field to the flag's negation
    click: dict = field(default_factory=dict)  # anything else click.option takes (is_flag, callback, metavar, ...)


def option(help: str, default: Any = MISSING, *, flags: tuple[str, ...] = (), type: Any = None,
           low: float | None = None, high: float = math.inf, low_open: bool = False, cli_default: Any = UNSET,
           invert: bool = False, **click_kwargs) -> Any:
    """A dataclass field that is also a command-line option (module docstring); no `default`:
    the field is required, and so is the option."""
    spec = Option(help, tuple(flags), type, low, high, low_open, cli_default, invert, click_kwargs)
    return field(default=default, metadata={"option": spec}) if default is not MISSING else \
        field(metadata={"option": spec})


def like(cls: type, name: str, default: Any, help: str | None = None) -> Any:
    """The declaration of `cls`'s option `name` with another default (a subclass's field), and
    another help where the subclass's meaning is narrower; type and range stay."""
    spec = next(f for f in dataclasses.fields(cls) if f.name == name).metadata["option"]
    if help is not None:
        spec = dataclasses.replace(spec, help=help)
    return field(default=default, metadata={"option": spec})


def declared(cls: type) -> list[tuple[str, Field, Option]]:
    """(parameter name, field, option) of every declared field of the config class `cls`,
    nested config dataclasses flattened, in field order."""
    out = []
    for f in dataclasses.fields(cls):
        if "option" in f.metadata:
            out.append((f.name, f, f.metadata["option"]))
        elif (nested := _nested(f)) is not None:
            out += declared(nested)
    return out


def _nested(f: Field) -> type | None:
    """The config dataclass a field holds by default (default_factory), if it declares options."""
    factory = f.default_factory
    if factory is MISSING or not (isinstance(factory, type) and dataclasses.is_dataclass(factory)):
        return None
    return factory if any("option" in g.metadata for g in dataclasses.fields(factory)) else None


def flags_of(name: str, spec: Option) -> tuple[str, ...]:
    return spec.flags or (f"--{name.replace('_', '-')}",)


def click_option(name: str, f: Field, spec: Option) -> Callable:
    """The click.option of one declared field."""
    kwargs = dict(spec.click)
    default = spec.cli_default if spec.cli_default is not UNSET else f.default
    required = f.default is MISSING and f.default_factory is MISSING and spec.cli_default is UNSET
    if required:
        kwargs.setdefault("required", True)
    elif default is not MISSING and not spec.invert:
        kwargs.setdefault("default", default)
        is_flag = kwargs.get("is_flag") or (spec.type is None and isinstance(default, bool))
        if default not in (None, "") and not is_flag and "show_default" not in kwargs:
            kwargs["show_default"] = True
    if spec.invert:
        kwargs.setdefault("is_flag", True)
    if spec.type is not None:
        kwargs["type"] = spec.type
    param = f"no_{name}" if spec.invert else name
    return click.option(*flags_of(name, spec), param, help=spec.help, **kwargs)


class RegistryChoice(click.Choice):
    """A choice among a registry's names (`names()`: masks, cache backends, plug-ins
    included), listed at first use rather than at import, so that `mrmae --help` imports
    neither torch nor every registered module; an unknown name is one line with the
    closest names first."""

    def __init__(self, names: Callable[[], list[str]]) -> None:
        self._lister, self._names = names, None
        super().__init__(())

    @property
    def choices(self) -> tuple[str, ...]:
        if self._names is None:
            self._names = tuple(self._lister())
        return self._names

    @choices.setter
    def choices(self, _value) -> None:  # click.Choice.__init__ assigns (); the registry decides
        pass

    def convert(self, value, param, ctx):
        if value not in self.choices:
            from mrmae.shared.errors import unknown_name

            self.fail(unknown_name("", value, self.choices), param, ctx)
        return value


def click_field(name: str, f: Field) -> Callable:
    """The click.option of a declared field made outside a config class (`option(...)`'s
    value), for a command without one: one declaration, several commands."""
    return click_option(name, f, f.metadata["option"])


def progress() -> Any:
    """The `progress` field (`--no-progress`) of every command that shows bars."""
    return option("No progress bars (they go to stderr).", True, flags=("--no-progress",), invert=True)


def click_options(cls: type, skip: tuple[str, ...] = ()) -> Callable:
    """Decorator: a click option per declared field of `cls` (but `skip`), in field order."""
    options = [click_option(n, f, s) for n, f, s in declared(cls) if n not in skip]

    def decorate(command):
        for o in reversed(options):
            command = o(command)
        return command
    return decorate


def config_from(cls: type, params: dict, **given) -> Any:
    """`cls` built from click's parsed `params` (its fields by name, a nested config's declared
    ones) and `given` (fields set otherwise); a parameter no field takes is a TypeError."""
    params, kwargs = dict(params), dict(given)
    kwargs.update(_take(cls, params, nested_only=False, given=given))
    if params:
        raise TypeError(f"{cls.__name__}: no field takes {', '.join(sorted(params))}")
    return cls(**kwargs)


def _take(cls: type, params: dict, nested_only: bool, given: dict) -> dict:
    """The fields of `cls` in `params` (popped): all by name, or only the declared ones."""
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in given:
            continue
        if (nested := _nested(f)) is not None:
            kwargs[f.name] = nested(**_take(nested, params, nested_only=True, given={}))
            continue
        spec = f.metadata.get("option")
        if spec is None and nested_only:
            continue
        if spec is not None and spec.invert and f"no_{f.name}" in params:
            kwargs[f.name] = not params.pop(f"no_{f.name}")
        elif f.name in params:
            kwargs[f.name] = params.pop(f.name)
    return kwargs


def check_declared(cfg: Any, checks: OptionChecks) -> None:
    """What click's types and ranges refuse on the command line, for a config however built:
    an integer below its IntRange's minimum, a float that is not finite or out of its
    declared range; a failure per option added to `checks`."""
    for name, f, spec in declared(type(cfg)):
        value = _value(cfg, name)
        if value is None:
            continue
        flag = flags_of(name, spec)[0]
        if spec.low is not None:
            checks.run(number_option, flag[2:], value, spec.low, spec.high, low_open=spec.low_open)
        elif isinstance(spec.type, click.IntRange) and spec.type.min is not None and value < spec.type.min:
            checks.fail(f"{flag} {value}: must be at least {spec.type.min}")


def _value(cfg: Any, name: str) -> Any:
    """The value of the declared field `name` in `cfg` or one of its nested configs."""
    if hasattr(cfg, name):
        return getattr(cfg, name)
    for f in dataclasses.fields(cfg):
        nested = getattr(cfg, f.name)
        if dataclasses.is_dataclass(nested) and hasattr(nested, name):
            return getattr(nested, name)
    return None


def number_option(option: str, value: float | None, low: float, high: float = math.inf, *,
                  low_open: bool = False) -> None:
    """OptionError naming `option` unless `value` (when given) is a finite number in
    [low, high] (or (low, high] with `low_open`): NaN passes click's ranges and every
    comparison, and trains on NaN or records a meaningless result."""
    if value is None:
        return
    if not math.isfinite(value) or value < low or value > high or (low_open and value == low):
        where = (f"above {low:g}" if low_open else f"from {low:g}") if high == math.inf else \
            f"in {'(' if low_open else '['}{low:g}, {high:g}]"
        raise OptionError(f"--{option} {value}: must be a finite number {where}")


# --- callbacks, defaults and spellings the command line and --config files share -------------------


def check_device(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """A click callback: a torch device this machine has (cpu, cuda, cuda:N, mps; auto: cuda
    where there is one, else cpu), or BadParameter naming the option."""
    import torch

    if value == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(value)
    except RuntimeError:
        raise click.BadParameter(f"{value!r} is not a torch device (auto, cpu, cuda, cuda:0, ...)", param=param) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise click.BadParameter(f"{value!r}: this machine has no CUDA device", param=param)
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise click.BadParameter(f"{value!r}: this machine has {torch.cuda.device_count()} CUDA devices", param=param)
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise click.BadParameter(f"{value!r}: MPS is not available here", param=param)
    return value


def device(what: str) -> Any:
    """The `device` field of a command that runs one model on one device."""
    return option(f"Where {what} runs: auto (cuda where there is one, else cpu), cpu, cuda, cuda:N, mps.", "auto",
                  callback=check_device)


def default_workers() -> int:
    """DataLoader workers per process: the CPU cores this process may run on (its affinity,
    which a container or `taskset` narrows) shared by the processes of this machine
    (LOCAL_WORLD_SIZE, which torchrun and accelerate set), at least 1 and at most 8.
    PyTorch warns when a loader has more workers than the cores it may use."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # (not on Linux)
        cores = os.cpu_count() or 1
    try:
        local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        local = 1
    return max(1, min(8, cores // local))


def workers(help_text: str) -> Any:
    """The `workers` field of a command that loads data: 0 in Python, `default_workers()` on
    the command line (shown as the rule and its value here)."""
    return option(f"{help_text} 0: none (the main process does it).", 0, type=click.IntRange(min=0),
                  cli_default=default_workers, show_default=f"cores per process, here {default_workers()}")


def warn_renamed(old: str, new: str) -> None:
    """One line on stderr, once per process group (rank 0 under torchrun / accelerate)."""
    if os.environ.get("RANK", "0") == "0":
        click.echo(f"mrmae: warning: {old} is now {new}", err=True)

"""Declaring settings: a command's settings are a dataclass whose fields carry their
default, help and parser (:func:`setting`). From that one declaration come the click
options (:func:`click_options`), the checks of ``--config`` values (:func:`config_value`),
the settings from parsed values (:func:`settings_from`), and the way back: the command-line
arguments that give a settings object again (:func:`to_args`, read by :func:`from_args`).
The settings classes themselves are in :mod:`spl.settings`.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable, Iterable, Sequence
from dataclasses import field
from pathlib import Path
from typing import Any

import click

from spl.data.common import SplError

# --------------------------------------------------------------------------- parsers
# Each takes the command-line text (or a --config value) and the option's name, and
# returns the value or raises SplError naming the option.


def _numbers(text: Any, option: str, cast: type) -> list:
    kind = "integers" if cast is int else "numbers"
    items = text if isinstance(text, list | tuple) else str(text).split(",")
    try:
        values = [_cast(cast, v) for v in items if str(v).strip()]
    except (TypeError, ValueError):
        raise SplError(f"{option} takes comma-separated {kind}, got {text!r}") from None
    if not values:
        raise SplError(f"{option} needs at least one value")
    return values


def _cast(cast: type, value: Any):
    if isinstance(value, bool):
        raise TypeError("a boolean is not a number")
    if cast is int and isinstance(value, float) and not value.is_integer():
        raise ValueError("not an integer")
    return cast(str(value).strip()) if isinstance(value, str) else cast(value)


def positive_floats(text: Any, option: str) -> list[float]:
    """Comma-separated numbers, each finite and > 0 (learning rates)."""
    values = _numbers(text, option, float)
    bad = [v for v in values if not math.isfinite(v) or v <= 0]
    if bad:
        raise SplError(f"{option} must be positive finite numbers, got {bad[0]!r}")
    return values


def positive_ints(text: Any, option: str) -> list[int]:
    values = _numbers(text, option, int)
    bad = [v for v in values if v < 1]
    if bad:
        raise SplError(f"{option} must be positive integers, got {bad[0]}")
    return values


def ints(text: Any, option: str) -> list[int]:
    return _numbers(text, option, int)


def names(text: Any, option: str) -> list[str]:
    items = text if isinstance(text, list | tuple) else str(text).split(",")
    values = [str(v).strip() for v in items if str(v).strip()]
    if not values:
        raise SplError(f"{option} needs at least one value")
    return values


def at_least(minimum: float) -> Callable[[Any, str], Any]:
    def check(value: Any, option: str):
        if value is not None and not value >= minimum:  # NaN fails too
            raise SplError(f"{option} must be >= {minimum:g}, got {value!r}")
        return value

    return check


def positive(value: Any, option: str):
    if value is not None and not (math.isfinite(value) and value > 0):
        raise SplError(f"{option} must be a positive finite number, got {value!r}")
    return value


def loss_options(items: Any, option: str) -> dict[str, dict[str, Any]]:
    from spl.fit.losses import parse_loss_options

    if isinstance(items, dict):
        return parse_loss_options(items, where=option)
    return parse_loss_options(list(items or ()), where=option)


# --------------------------------------------------------------------------- declaring


def setting(
    default: Any = None,
    *,
    help: str,  # noqa: A002 - click's name
    parse: Callable[[Any, str], Any] | None = None,
    choices: Iterable[str] | None = None,
    flag: str | None = None,
    multiple: bool = False,
    cli: bool = True,
    show_default: bool | str = True,
    factory: Callable[[], Any] | None = None,
    path: str | None = None,
    exists: bool = False,
    required: bool = False,
    hidden: bool = False,
) -> Any:
    """A settings field: its default, help and parser (for text from the command line or a
    --config file), and how it shows on the command line (``flag``; ``path`` "file" or
    "dir" for a path, ``exists`` to require it; ``cli=False`` for a setting only code
    sets)."""
    metadata = {
        "help": help,
        "parse": parse,
        "choices": tuple(choices) if choices is not None else None,
        "flag": flag,
        "multiple": multiple,
        "cli": cli,
        "show_default": show_default,
        "path": path,
        "exists": exists,
        "required": required,
        "hidden": hidden,
    }
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def cli_fields(cls: type) -> list[dataclasses.Field]:
    """The fields shown on the command line, those named in ``cli_order`` first."""
    fields = [f for f in dataclasses.fields(cls) if f.metadata.get("cli")]
    order = list(getattr(cls, "cli_order", ()))
    return sorted(fields, key=lambda f: order.index(f.name) if f.name in order else len(order))


def _flag(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _kind(cls: type, f: dataclasses.Field) -> Any:
    kind = typing.get_type_hints(cls)[f.name]
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
    return kind


def _shown(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return ",".join(number_text(v) for v in value)
    return value


def number_text(value: Any) -> str:
    """A number as the command line writes it: short (``1e-05``, ``3``), and exact: a float
    that ``:g`` would round (``1.2345678e-05``) keeps every digit."""
    if isinstance(value, float) and not isinstance(value, bool):
        short = f"{value:g}"
        return short if float(short) == value else repr(value)
    return str(value)


def click_options(cls: type) -> Callable:
    """Decorate a click command with one option per CLI field of the settings ``cls``."""

    def decorate(command: Callable) -> Callable:
        defaults = cls()
        for f in reversed(cli_fields(cls)):
            meta, kind = f.metadata, _kind(cls, f)
            default = getattr(defaults, f.name)
            kwargs: dict[str, Any] = {
                "help": meta["help"],
                "show_default": meta["show_default"],
                "hidden": meta["hidden"],
            }
            flag = _flag(f)
            if kind is bool:
                names_ = [f"{flag}/--no-{flag[2:]}"] if default else [flag]
                kwargs.update(default=bool(default), is_flag=True)
                if not default:
                    kwargs["show_default"] = False
                command = click.option(*names_, f.name, **kwargs)(command)
                continue
            if meta["path"]:
                kind_ok = {"file_okay": meta["path"] == "file", "dir_okay": meta["path"] == "dir"}
                path_type = click.Path(exists=meta["exists"], path_type=Path, **kind_ok)
                kwargs.update(type=path_type, default=default, required=meta["required"])
            elif meta["multiple"]:
                kwargs.update(multiple=True, default=(), show_default=False)
            elif meta["choices"]:
                kwargs.update(type=click.Choice(meta["choices"]), default=default)
            elif kind in (int, float, str):
                kwargs.update(type=kind, default=default)
            else:
                kwargs.update(type=str, default=_shown(default))
            if default is None and not meta["multiple"]:
                kwargs["show_default"] = (
                    meta["show_default"] if meta["show_default"] is not True else False
                )
            command = click.option(flag, f.name, **kwargs)(command)
        return command

    return decorate


def parse_value(cls: type, name: str, value: Any, where: str | None = None) -> Any:
    """One field's value from the command line or a --config file, parsed and checked.
    ``where`` names the source in errors (the config file and key); the flag otherwise."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    option = where or _flag(f)
    meta, kind = f.metadata, _kind(cls, f)
    if meta.get("multiple") and value == ():
        return getattr(cls(), name)
    if value is None:
        return None
    if kind is bool:
        if not isinstance(value, bool):
            raise SplError(f"{option} takes true or false, got {value!r}")
        return value
    if meta.get("choices") and str(value) not in meta["choices"]:
        raise SplError(f"{option}: {value!r} is not one of {', '.join(meta['choices'])}")
    if meta.get("path"):
        value = Path(value)
    elif kind in (int, float):
        try:
            value = _cast(kind, value)
        except (TypeError, ValueError):
            kind_name = "an integer" if kind is int else "a number"
            raise SplError(f"{option} takes {kind_name}, got {value!r}") from None
    parse = meta.get("parse")
    if parse is not None:
        value = parse(value, option)
    return value


def settings_from(cls: type, values: dict[str, Any], sources: dict[str, str] | None = None):
    """``cls`` from click's values (strings parsed, checked; other keys ignored)."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.name in values:
            out[f.name] = parse_value(cls, f.name, values[f.name], (sources or {}).get(f.name))
    return cls(**out)


def config_value(cls: type, name: str, value: Any, where: str) -> Any:
    """A --config value checked as the command line's would be, the error naming the file
    and key; returned in the form click expects as a default."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    parse_value(cls, name, value, where)
    if f.metadata.get("multiple"):
        if isinstance(value, dict):  # a [loss_options.<key>] table
            return tuple(f"{k}.{o}={v}" for k, table in value.items() for o, v in table.items())
        return tuple(value)
    return _shown(value)


# --------------------------------------------------------------------------- the way back


def to_args(settings: Any, *, always: Iterable[str] = ()) -> list[str]:
    """The command-line arguments that give ``settings`` back (``from_args(type(settings),
    to_args(settings)) == settings``): a flag for each command-line field whose value is not
    its default, and for those named in ``always`` (a job's command that shows its grid),
    in the order the command lists its options."""
    cls = type(settings)
    defaults = cls()
    fields = cli_fields(cls)
    always = set(always)
    unknown = always - {f.name for f in fields}
    if unknown:
        raise ValueError(f"{cls.__name__} has no command-line setting {sorted(unknown)[0]!r}")
    for f in dataclasses.fields(cls):
        if not f.metadata.get("cli") and getattr(settings, f.name) != getattr(defaults, f.name):
            raise SplError(
                f"{cls.__name__}.{f.name} is set ({getattr(settings, f.name)!r}) but is not a "
                "command-line setting: no command line gives it back"
            )
    args: list[str] = []
    for f in fields:
        value, default = getattr(settings, f.name), getattr(defaults, f.name)
        if value != default or f.name in always:
            args += _field_args(cls, f, value, default)
    return args


def _field_args(cls: type, f: dataclasses.Field, value: Any, default: Any) -> list[str]:
    flag, kind = _flag(f), _kind(cls, f)
    if kind is bool:
        if value:
            return [flag]
        # `--no-x` exists where the default is True; False is then the only other value
        return [f"--no-{flag[2:]}"] if default else []
    if value is None:
        if default is None:
            return []
        raise SplError(f"{flag} cannot be given as None on the command line (default {default!r})")
    if f.metadata.get("multiple"):
        if isinstance(value, dict):  # --loss-option LOSS.OPTION=VALUE, one per option
            items = [
                f"{k}.{o}={option_text(v)}" for k, table in value.items() for o, v in table.items()
            ]
        else:
            items = [str(v) for v in value]
        return [part for item in items for part in (flag, item)]
    if isinstance(value, list | tuple):
        texts = [number_text(v) for v in value]
        if any("," in t for t in texts):
            raise SplError(f"{flag}: an item of {value!r} holds a comma, which splits the list")
        return [flag, ",".join(texts)]
    return [flag, number_text(value)]


def option_text(value: Any) -> str:
    """A loss option's value as ``--loss-option`` reads it back (spl.fit.losses.coerce_option)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    if isinstance(value, list | tuple):
        return ",".join(option_text(v) for v in value)
    return number_text(value)


def from_args(cls: type, args: Sequence[str]) -> Any:
    """``cls`` from command-line arguments, parsed and checked as its command parses them."""

    @click.command()
    @click_options(cls)
    def command(**values: Any) -> dict[str, Any]:
        return values

    try:
        values = command.main([str(a) for a in args], prog_name=cls.__name__, standalone_mode=False)
    except click.ClickException as exc:
        raise SplError(exc.format_message()) from None
    return settings_from(cls, values)

"""Loss options: each declared with its valid range beside its default (:func:`option`),
and one typing and range check for every value, however it was set (command line,
--config TOML, ``--loss-option``, Python): :func:`coerce_option`, :func:`check_option`.

The functions take a loss class (a :class:`~spl.fit.losses.base.Loss` subclass, whose
``Options`` dataclass declares the fields) and read only its ``key``, ``Options`` and
``dataset_options``; :mod:`.base` imports them, not the other way round.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import types
import typing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from spl.data.common import SplError

if TYPE_CHECKING:
    from spl.fit.losses.base import Loss

_INTERVAL = re.compile(r"^([\[(])\s*([^,\s]+)\s*,\s*([^\])\s]+)\s*([\])])$")


@dataclass(frozen=True)
class Interval:
    """A number's valid range, written as in mathematics: ``[0, 1)``, ``(0, inf)``,
    ``[1, inf)``. An open bound at ``inf`` means no bound (values are finite already)."""

    low: float
    high: float
    low_closed: bool
    high_closed: bool

    @classmethod
    def parse(cls, text: str) -> Interval:
        match = _INTERVAL.match(text.strip())
        if not match:
            raise ValueError(f"not an interval: {text!r} (write e.g. '[0, 1)' or '(0, inf)')")
        low, high = float(match.group(2)), float(match.group(3))
        if not low <= high:
            raise ValueError(f"empty interval: {text!r}")
        return cls(low, high, match.group(1) == "[", match.group(4) == "]")

    def __contains__(self, value: object) -> bool:
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False
        above = value >= self.low if self.low_closed else value > self.low
        below = value <= self.high if self.high_closed else value < self.high
        return bool(above and below)  # NaN is in no interval

    def __str__(self) -> str:
        return (
            f"{'[' if self.low_closed else '('}{_number(self.low)}, "
            f"{_number(self.high)}{']' if self.high_closed else ')'}"
        )


def option(default: Any, valid: str | tuple[str, ...]) -> Any:
    """An Options field: its default and its valid range beside it, e.g. ``gamma: float =
    option(2.0, "[0, inf)")``. For a tuple option, one interval for every item, or one per
    item (``("[0, 1]", "(0, inf)", ...)``). None, where the type allows it, is always valid
    (it means "the dataset's" or "computed")."""
    parsed: Interval | tuple[Interval, ...]
    if isinstance(valid, str):
        parsed = Interval.parse(valid)
    else:
        parsed = tuple(Interval.parse(v) for v in valid)
    return field(default=default, metadata={"range": parsed})


def option_range(loss: type[Loss], name: str) -> Interval | tuple[Interval, ...] | None:
    """The declared range of ``loss.Options.<name>`` (None: none declared)."""
    for f in dataclasses.fields(loss.Options):
        if f.name == name:
            return f.metadata.get("range")
    return None


def range_text(valid: Interval | tuple[Interval, ...]) -> str:
    if isinstance(valid, Interval):
        return str(valid)
    return "(" + ", ".join(str(v) for v in valid) + ")"


def check_option(loss: type[Loss], name: str, value: Any) -> None:
    """The one range check of every option value, however it was set: an SplError naming
    the loss, the option, the value and its range."""
    valid = option_range(loss, name)
    if valid is None or value is None:
        return
    if isinstance(value, tuple):
        ranges = (valid,) * len(value) if isinstance(valid, Interval) else valid
        bad = [i for i, (v, r) in enumerate(zip(value, ranges, strict=True)) if v not in r]
        if not bad:
            return
        where = f" (item {bad[0] + 1} is {_number(value[bad[0]])})"
    elif value in valid:
        return
    else:
        where = ""
    each = " each" if isinstance(value, tuple) and isinstance(valid, Interval) else ""
    raise SplError(
        f"{loss.key}.{name} = {_shown(value)} is outside its range{each} {range_text(valid)}"
        f"{where}; `spl losses` lists every option's range"
    )


def _number(value: Any) -> str:
    if isinstance(value, float) and (value.is_integer() or math.isinf(value)):
        return f"{value:g}"
    return repr(value)


def _shown(value: Any) -> str:
    if isinstance(value, tuple):
        return "(" + ", ".join(_number(v) for v in value) + ")"
    return _number(value)


def describe_options(loss: type[Loss]) -> str:
    fields = dataclasses.fields(loss.Options)
    if not fields:
        return "none"
    out = []
    for f in fields:
        per_dataset = {d: v[f.name] for d, v in loss.dataset_options.items() if f.name in v}
        if per_dataset:
            values = ", ".join(f"{d} {v!r}" for d, v in per_dataset.items())
            text = f"{f.name} ({_type_name(f)}, default per dataset: {values}; others voc12's)"
        else:
            text = f"{f.name} ({_type_name(f)}, default {_default(f)!r})"
        valid = f.metadata.get("range")
        if valid is not None:
            each = " each" if isinstance(_default(f), tuple) and isinstance(valid, Interval) else ""
            text = f"{text}{each} in {range_text(valid)}"
        out.append(text)
    return ", ".join(out)


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


@functools.cache
def _type_hints(owner: type) -> dict[str, Any]:
    return typing.get_type_hints(owner)  # read once per Options class: loss() runs per batch


def _field_type(owner: type, f: dataclasses.Field) -> Any:
    return _type_hints(owner)[f.name]


def _type_name(f: dataclasses.Field) -> str:
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    return str(kind).replace("typing.", "")


def coerce_option(loss: type[Loss], name: str, value: Any) -> Any:
    """``value`` (a string from the command line, or a TOML/Python value) as the type of
    ``loss.Options.<name>``; a clear error naming the loss and its options otherwise."""
    fields = {f.name: f for f in dataclasses.fields(loss.Options)}
    if name not in fields:
        raise SplError(
            f"loss {loss.key!r} has no option {name!r}; its options: {describe_options(loss)}"
        )
    kind = _field_type(loss.Options, fields[name])
    try:
        coerced = _coerce(kind, value)
    except (TypeError, ValueError) as exc:
        raise SplError(
            f"option {loss.key}.{name}: {value!r} is not a {_type_name(fields[name])} ({exc}); "
            f"{loss.key}'s options: {describe_options(loss)}"
        ) from None
    check_option(loss, name, coerced)
    return coerced


def _coerce(kind: Any, value: Any) -> Any:
    origin = typing.get_origin(kind)
    args = typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and (value is None or str(value).strip().lower() == "none"):
            return None
        others = [a for a in args if a is not type(None)]
        return _coerce(others[0], value)
    if origin is tuple:
        items = value
        if isinstance(value, str):
            # "(a, b)", "a,b" or "[a, b]": a --config TOML list reaches here as its text
            text = value.strip()
            if text[:1] + text[-1:] in ("()", "[]"):
                text = text[1:-1]
            items = [v for v in text.split(",") if v.strip()]
        if not isinstance(items, list | tuple):
            raise TypeError("expected a list")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v) for v in items)
        if len(items) != len(args):
            raise ValueError(f"expected {len(args)} values, got {len(items)}")
        return tuple(_coerce(a, v) for a, v in zip(args, items, strict=True))
    if kind is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise ValueError("expected true or false")
    if kind is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise TypeError("expected an integer")
        return int(str(value).strip()) if isinstance(value, str) else int(value)
    if kind is float:
        if isinstance(value, bool):
            raise TypeError("expected a number")
        number = float(str(value).strip()) if isinstance(value, str) else float(value)
        if not math.isfinite(number):
            raise ValueError("not finite")
        return number
    if kind is str:
        return str(value)
    raise TypeError(f"unsupported option type {kind}")

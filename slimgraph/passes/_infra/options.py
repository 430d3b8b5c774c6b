"""Typed pass options: text ↔ Python values, driven by the dataclass field types.

Supported field types: bool, int, float, str, Literal[...] of those, optional (`X | None`)
and lists/tuples of them. Lists are written `[a,b]` in pipeline text. `convert` reads text
(and YAML/TOML scalars); `check_type` holds values given from Python to the same types,
without converting them (only a list becomes a tuple, and an int a float), and a Literal
to its choices. A number's range is declared on its field, `ratio: float = option(0.5, low=0,
high=1, high_open=True)`, and `check_bounds` holds every value (each item of a list) to it:
passes write no range checks of their own.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from typing import Any, Literal, get_args, get_origin

from slimgraph.errors import SlimgraphError

BOUNDS_KEY = "slimgraph.bounds"


@dataclasses.dataclass(frozen=True)
class Bounds:
    """The interval a number option lives in; None: unbounded on that side."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def holds(self, value: float) -> bool:
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below

    def describe(self) -> str:
        """`in [0, 1)`, `at least 1`, `above 0`, `at most 8`."""
        if self.low is not None and self.high is not None:
            return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{'above' if self.low_open else 'at least'} {self.low:g}"
        return f"{'below' if self.high_open else 'at most'} {self.high:g}"


def option(default: Any = dataclasses.MISSING, *, low: float | None = None, high: float | None = None, low_open: bool = False,
           high_open: bool = False) -> Any:
    """A pass option with the range its value (or each item of its list) must lie in."""
    bounds = Bounds(low, high, low_open, high_open)
    return dataclasses.field(default=default, metadata={BOUNDS_KEY: bounds})


def check_bounds(pass_name: str, field: dataclasses.Field, value: Any) -> None:
    """Raise a `SlimgraphError` naming the option when `value` lies outside the field's declared range."""
    bounds = field.metadata.get(BOUNDS_KEY)
    if bounds is None or value is None:
        return
    for item in value if isinstance(value, (list, tuple)) else (value,):
        if not bounds.holds(item):
            raise SlimgraphError(f"{pass_name}: {field.name} must be {bounds.describe()}, got {format_value(item)}")


@functools.cache
def option_types(pass_cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(pass_cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(pass_cls)}


def describe_type(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "|".join(format_value(a) for a in get_args(tp))
    if origin in (list, tuple):
        return f"[{describe_type(get_args(tp)[0])},...]"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe_type(a) for a in get_args(tp))
    if tp is type(None):
        return "none"
    return getattr(tp, "__name__", str(tp))


def format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    if value is None:
        return "none"
    return str(value)


def convert(pass_name: str, option: str, tp: Any, value: Any) -> Any:
    """Convert `value` (text from a pipeline, or a YAML/TOML scalar) to the option's type."""
    try:
        return _convert(tp, value)
    except (TypeError, ValueError):
        raise SlimgraphError(
            f"{pass_name}: option {option}={format_value(value)} is not a valid "
            f"{describe_type(tp)}"
        ) from None


_UNCHECKED = object()


def check_type(pass_name: str, option: str, tp: Any, value: Any) -> Any:
    """`value` if it is of type `tp` (a list given for a tuple comes back as a tuple);
    otherwise a `SlimgraphError` that names the option, the type given and the one expected."""
    checked = _checked(tp, value)
    if checked is _UNCHECKED and _checked(_literal_types(tp), value) is not _UNCHECKED:
        raise SlimgraphError(f"{pass_name}: {option} must be one of {describe_type(tp)}, got {format_value(value)}")
    if checked is _UNCHECKED:
        given = type(value).__name__
        article = "an" if given[:1] in "aeiou" else "a"
        raise SlimgraphError(f"{pass_name}: option {option}={value!r} is {article} {given}; expected {describe_type(tp)}")
    return checked


def _checked(tp: Any, value: Any) -> Any:
    """`value` (or its tuple form), or _UNCHECKED when it does not have type `tp`. Types this
    module does not know are accepted as they are: the pass validates them itself."""
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in get_args(tp):
            checked = _checked(arg, value)
            if checked is not _UNCHECKED:
                return checked
        return _UNCHECKED
    if tp is type(None):
        return value if value is None else _UNCHECKED
    if origin is Literal:
        return value if any(type(value) is type(c) and value == c for c in get_args(tp)) else _UNCHECKED
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return _UNCHECKED
        (item_type, *_) = get_args(tp) or (Any,)
        items = [_checked(item_type, item) for item in value]
        if any(item is _UNCHECKED for item in items):
            return _UNCHECKED
        return tuple(items) if origin is tuple else list(items)
    if tp is bool:
        return value if isinstance(value, bool) else _UNCHECKED
    if tp is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else _UNCHECKED
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return _UNCHECKED
        return value
    if tp is str:
        return value if isinstance(value, str) else _UNCHECKED
    return value


def _literal_types(tp: Any) -> Any:
    """`tp` with each Literal replaced by the types of its choices: what a value of the right type
    but not one of the choices still matches (for the error message)."""
    origin = get_origin(tp)
    if origin is Literal:
        return typing.Union[tuple({type(c) for c in get_args(tp)})]  # noqa: UP007 (built from a tuple)
    if origin in (typing.Union, types.UnionType):
        return typing.Union[tuple(_literal_types(a) for a in get_args(tp))]  # noqa: UP007
    if origin in (list, tuple):
        return origin[_literal_types(get_args(tp)[0]), ...] if origin is tuple else list[_literal_types(get_args(tp)[0])]
    return tp


def _convert(tp: Any, value: Any) -> Any:
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if type(None) in args and (value is None or (isinstance(value, str) and value.lower() == "none")):
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value)
            except (TypeError, ValueError):
                continue
        raise ValueError(value)
    if origin is Literal:
        for choice in get_args(tp):
            try:
                if _convert(type(choice), value) == choice:
                    return choice
            except (TypeError, ValueError):
                continue
        raise ValueError(value)
    if origin in (list, tuple):
        (item_type, *_) = get_args(tp)
        items = split_list(value) if isinstance(value, str) else list(value)
        converted = [_convert(item_type, item) for item in items]
        return tuple(converted) if origin is tuple else converted
    if tp is bool:
        if isinstance(value, bool):
            return value
        lowered = str(value).lower()
        if lowered in ("true", "1", "yes", "on"):
            return True
        if lowered in ("false", "0", "no", "off"):
            return False
        raise ValueError(value)
    if tp is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError(value)
        return int(value)
    if tp is float:
        if isinstance(value, bool):
            raise ValueError(value)
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise TypeError(value)
        return value
    raise TypeError(f"unsupported option type {tp!r}")


def split_list(text: str) -> list[str]:
    text = text.strip()
    if not (text.startswith("[") and text.endswith("]")):
        return [text] if text else []
    inner = text[1:-1].strip()
    return [item.strip() for item in split_top_level(inner, ",")] if inner else []


def split_top_level(text: str, sep: str) -> list[str]:
    """Split on `sep` outside of {...} and [...]."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
            if depth < 0:
                raise SlimgraphError(f"unbalanced '{ch}' in {text!r}")
        elif ch == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth != 0:
        raise SlimgraphError(f"unbalanced brackets in {text!r}")
    parts.append(text[start:])
    return parts

"""model.json's schema, read off the config dataclasses' own annotations: every value has the type its field
declares, and every count is positive, checked before anything is built from it, with one line naming the field.

    check_fields(UNet2DConfig, {"block_out_channels": [32, "64"]}, "model.json component 'decoder'")
    -> Dalle2Error: model.json component 'decoder': block_out_channels must be a list of integers, got [32, '64']

An integer field that is a size or a count (by its name: *_size, *_dim, *heads, *layers, *steps, ...) must be
positive, any other integer (ids, enums, offsets) not negative; floats must be finite. JSON has no tuples: a list stands for one.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from typing import Any, Union

from .errors import Dalle2Error

FIX = "re-convert the model with `dalle2 convert`"


def expect_object(value, where: str) -> dict:
    if not isinstance(value, dict):
        raise Dalle2Error(f"{where} must be a JSON object, got {_show(value)}; {FIX}")
    return value


def check_fields(cls, d: dict[str, Any], where: str) -> None:
    """Each key of `d` that names a field of the dataclass `cls` holds a value of the field's type and range."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name not in d:
            continue
        value, hint = d[f.name], hints[f.name]
        if not _conforms(value, hint):
            raise Dalle2Error(f"{where}: {f.name} must be {_describe(hint)}, got {_show(value)}; {FIX}")
        floor = _floor(f)
        if floor is not None and isinstance(value, int) and not isinstance(value, bool) and value < floor:
            raise Dalle2Error(f"{where}: {f.name} must be {'positive' if floor else 'at least 0'}, got {value}; {FIX}")


# integer fields that are sizes or counts (a zero divides or builds nothing); every other integer is an id, an
# enum (PIL's resample 0 is NEAREST) or an offset, and must only not be negative
_POSITIVE = re.compile(r"(size|_dim|heads|layers|channels|groups|timesteps|steps|length|_block|_edge|height|width)$")


def _floor(f: dataclasses.Field) -> int | None:
    default = f.default
    if isinstance(default, bool) or not isinstance(default, (int, type(None))):
        return None
    if default is None and "int" not in str(f.type):
        return None
    return 1 if _POSITIVE.search(f.name) else 0


def _conforms(value, hint) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if origin in (Union, types.UnionType):
        return any(_conforms(value, a) for a in args)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_conforms(v, args[0]) for v in value)
        return len(value) == len(args) and all(_conforms(v, a) for v, a in zip(value, args))
    if origin is dict:
        return isinstance(value, dict) and all(_conforms(k, args[0]) and _conforms(v, args[1])
                                               for k, v in value.items())
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return isinstance(value, hint) if isinstance(hint, type) else True


def _describe(hint) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is type(None):
        return "null"
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_describe(args[0]).removeprefix('an ').removeprefix('a ')}s"
        return f"a list of {len(args)} values"
    if origin is dict:
        return "a JSON object"
    return {bool: "true or false", int: "an integer", float: "a finite number", str: "a string"}.get(
        hint, getattr(hint, "__name__", str(hint)))


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."

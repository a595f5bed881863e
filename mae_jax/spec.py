"""Value specs: what a config key or a public function's argument must be, written once as a
short string and checked (`require`) and said in words (`expected`) from it. Used by the config
schema (`mae_jax.schema`) and by the Python APIs that callers reach without a config; errors are
quoted in messages by their first line (`first_line`).

A spec is a tuple of choices, or `[?]KIND[BOUNDS]`: KIND one of int, num, bool, str, seq;
BOUNDS `>=x`, `>x` or an interval such as `[0,1)`; `?`: None is accepted too. Booleans are not
numbers here, and numbers are finite.
"""

from __future__ import annotations

import math
import numbers
import re

import numpy as np

_SPEC = re.compile(
    r"(\??)(int|num|bool|str|seq)(?:(>=?)(-?[\d.]+)|([\[(])(-?[\d.]+),(-?[\d.]+)([\])]))?"
)
_KINDS = {"int": int, "num": float, "bool": bool, "str": str, "seq": tuple}
_WORDS = {"int": "an integer", "num": "a number", "bool": "True or False", "str": "a string"}


def kind(spec) -> type:
    """The Python type of `spec`'s values (str for choices)."""
    return str if isinstance(spec, tuple) else _KINDS[_SPEC.fullmatch(spec)[2]]


def expected(spec) -> str:
    """What a value of `spec` must be, in words ('a positive integer', 'a number in [0, 1)')."""
    if isinstance(spec, tuple):
        return f"one of {spec}"
    none, kind_, op, x, lo, a, b, hi = _SPEC.fullmatch(spec).groups()
    what = _WORDS.get(kind_, "a sequence")
    if op:
        what = "a positive integer" if (kind_, op, x) == ("int", ">=", "1") else f"{what} {op} {x}"
    elif lo:
        what += f" in {lo}{a}, {b}{hi}"
    return what + (" or None" if none else "")


def ok(spec, v) -> bool:
    """Whether `v` is a value of `spec`."""
    if isinstance(spec, tuple) or v is None:
        return v in spec if isinstance(spec, tuple) else spec.startswith("?")
    _, kind_, op, x, lo, a, b, hi = _SPEC.fullmatch(spec).groups()
    if kind_ not in ("int", "num"):
        return isinstance(v, {"bool": bool | np.bool_, "str": str, "seq": tuple | list}[kind_])
    number = numbers.Integral if kind_ == "int" else numbers.Real
    if isinstance(v, bool | np.bool_) or not isinstance(v, number) or not math.isfinite(v):
        return False
    low, closed = (x or a), op != ">" and lo != "("
    return (low is None or v > float(low) or (closed and v == float(low))) and (
        b is None or v < float(b) or (hi == "]" and v == float(b))
    )


def first_line(error: BaseException) -> str:
    """The first line of `error`'s message (its type's name when the message is empty)."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def require(name: str, value, spec, error: type[Exception] = ValueError):
    """`value` if it is a value of `spec`, else `error('NAME must be EXPECTED, got VALUE')`."""
    if not ok(spec, value):
        raise error(f"{name} must be {expected(spec)}, got {value!r}")
    return value

"""Typed reads of untrusted data (plan JSON, checkpoint metadata): each failure is one line
that says where the value sits and what was expected, raised as the caller's error class.

JSON gives dicts, lists, str, int, float (inf for 1e999), bool and None, and bool is an int in
Python: these checks say exactly which they accept, so a tampered file is refused before any
of it is used.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from kshare.errors import KShareError, TrainingError, param

T = TypeVar("T")
_REQUIRED: Any = object()
MAX_ITEMS = 1_000_000  # no model kshare handles has a million convolutions or tensors


class Reader:
    """Reads typed fields of one mapping; `where` names it in messages (e.g. `plan group g3`).
    A field without a default is required."""

    def __init__(self, data: Any, where: str, error: type[KShareError]) -> None:
        self.error, self.where = error, where
        if not isinstance(data, Mapping):
            raise error(f"{where} is {describe(data)}, not a mapping")
        self.data = data

    def fail(self, key: str, expected: str) -> KShareError:
        return self.error(f"{self.where}: {key!r} is {describe(self.data.get(key))}, expected {expected}")

    def _get(self, key: str, default: Any) -> tuple[Any, bool]:
        """(value, whether it is the default)."""
        if key not in self.data or (self.data[key] is None and default is not _REQUIRED):
            if default is _REQUIRED:
                raise self.error(f"{self.where}: {key!r} is missing")
            return default, True
        return self.data[key], False

    def str(self, key: str, default: Any = _REQUIRED, *, choices: tuple[str, ...] = ()) -> Any:
        value, given = self._get(key, default)
        if not given and (not isinstance(value, str) or (choices and value not in choices)):
            raise self.fail(key, f"one of {', '.join(choices)}" if choices else "a string")
        return value

    def bool(self, key: str, default: Any = _REQUIRED) -> Any:
        value, given = self._get(key, default)
        if not given and not isinstance(value, bool):
            raise self.fail(key, "true or false")
        return value

    def int(self, key: str, default: Any = _REQUIRED, *, low: int = 0, high: int = 2**62) -> Any:
        value, given = self._get(key, default)
        if not given and (not is_int(value) or not low <= value <= high):
            raise self.fail(key, f"a whole number from {low} to {high}")
        return value

    def float(self, key: str, default: Any = _REQUIRED, *, low: float = -math.inf, high: float = math.inf) -> Any:
        value, given = self._get(key, default)
        if given:
            return value
        if not is_number(value) or not math.isfinite(value) or not low <= value <= high:
            raise self.fail(key, f"a finite number from {low:g} to {high:g}")
        return float(value)

    def list(self, key: str, item: Callable[[Any, str], T], default: Any = _REQUIRED, *, low: int = 0,
             high: int = MAX_ITEMS) -> Any:
        value, given = self._get(key, default)
        if given:
            return value
        if not isinstance(value, (list, tuple)) or not low <= len(value) <= high:
            raise self.fail(key, f"a list of {low} to {high} items")
        return [item(v, f"{self.where}: {key}[{i}]") for i, v in enumerate(value)]

    def mapping(self, key: str) -> Reader:
        return Reader(self._get(key, _REQUIRED)[0], f"{self.where}: {key}", self.error)


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def describe(value: Any) -> str:
    """A short, safe description of an untrusted value for a message."""
    if value is None:
        return "missing"
    if isinstance(value, bool):
        return f"the boolean {value}"
    if isinstance(value, (int, float)):
        return f"the number {value!r}"[:60]
    if isinstance(value, str):
        return f"the string {value[:40]!r}"
    return f"a {type(value).__name__}"


def items(kind: str, test: Callable[[Any], bool], error: type[KShareError]) -> Callable[[Any, str], Any]:
    """An item check for `Reader.list`: `test(value)` must hold."""

    def check(value: Any, where: str) -> Any:
        if not test(value):
            raise error(f"{where} is {describe(value)}, expected {kind}")
        return value

    return check


def finite_number(name: str, value: object, low: float, high: float, low_open: bool = False,
                  high_open: bool = False) -> None:
    """A setting that must be a finite number in a range (a `TrainingError` naming it otherwise)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
        and (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        left, right = "(" if low_open else "[", ")" if high_open else "]"
        raise TrainingError(f"{param(name)} must be a finite number in {left}{low:g}, {high:g}{right}, got {value!r}")


def whole_number(name: str, value: object, low: int, high: int) -> None:
    """A setting that must be a whole number in [low, high] (a `TrainingError` naming it otherwise)."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise TrainingError(f"{param(name)} must be a whole number from {low:,} to {high:,}, got {value!r}")

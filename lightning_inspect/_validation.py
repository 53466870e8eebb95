"""Argument checks of every public constructor: a ConfigError names the argument, the value and
what is allowed (with the closest valid names)::

    >>> check_positive_int("ActivationMonitor", "every_n_steps", 0)
    Traceback (most recent call last):
    ...
    lightning_inspect.errors.ConfigError: ActivationMonitor(every_n_steps=0): expected an integer >= 1.
"""

from __future__ import annotations

import difflib
import fnmatch
import math
import re
from collections.abc import Iterable, Sequence
from typing import Any

from lightning_inspect.errors import ConfigError


def closest(value: str, candidates: Iterable[str], n: int = 5, cutoff: float = 0.5) -> list[str]:
    """The ``n`` candidates most similar to ``value`` (difflib ratio >= ``cutoff``), best first."""
    scored = [(difflib.SequenceMatcher(None, c, value).ratio(), c) for c in candidates]
    ranked = sorted((item for item in scored if item[0] >= cutoff), key=lambda item: -item[0])
    return [c for _, c in ranked[:n]]  # sorted() is stable: equals keep their order


def suggestion(value: Any, candidates: Iterable[str]) -> str:
    """A ``" Did you mean ...?"`` sentence, or ``""`` when nothing is close."""
    near = closest(value, candidates, n=3) if isinstance(value, str) else []
    return f" Did you mean {', '.join(repr(c) for c in near)}?" if near else ""


def check_positive_int(
    owner: str, name: str, value: Any, minimum: int = 1, maximum: int | None = None
) -> int:
    """``value`` if it is an integer in ``[minimum, maximum]``."""
    too_big = maximum is not None and isinstance(value, int) and value > maximum
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum or too_big:
        bound = f">= {minimum}" + (f" and <= {maximum}" if maximum is not None else "")
        raise ConfigError(f"{owner}({name}={value!r}): expected an integer {bound}.")
    return value


def check_optional_int(owner: str, name: str, value: Any, minimum: int = 0) -> int | None:
    return None if value is None else check_positive_int(owner, name, value, minimum)


def check_number(
    owner: str, name: str, value: Any, low: float, high: float, bounds: str = "[]"
) -> float:
    """``value`` if it is a finite number in ``bounds`` (``"(]"``: open at ``low``).

    >>> check_number("M", "p", 0, 0, 1, "(]")
    Traceback (most recent call last):
    ...
    lightning_inspect.errors.ConfigError: M(p=0): expected a number in (0, 1].
    """
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    above = ok and (value > low if bounds[0] == "(" else value >= low)
    if not (above and (value < high if bounds[1] == ")" else value <= high)):
        raise ConfigError(
            f"{owner}({name}={value!r}): expected a number in {bounds[0]}{low:g}, {high:g}{bounds[1]}."
        )
    return value


def check_bool(owner: str, name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{owner}({name}={value!r}): expected true or false.")
    return value


def check_choice(owner: str, name: str, value: Any, allowed: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise ConfigError(
            f"{owner}({name}={value!r}): expected one of {', '.join(map(repr, allowed))}."
            + suggestion(value, allowed)
        )
    return value


def check_choices(
    owner: str, name: str, values: Any, allowed: Sequence[str], default: Sequence[str]
) -> tuple[str, ...]:
    """A tuple of distinct allowed strings; ``None`` gives ``default``; a string is one choice.

    >>> try:
    ...     check_choices("M", "stats", ["mean", "median"], ["mean", "std"], ["mean"])
    ... except ConfigError as exc:
    ...     print(exc)
    M(stats=['mean', 'median']): 'median' is not one of 'mean', 'std'. Did you mean 'mean'?
    """
    if values is None:
        return tuple(default)
    iterable = isinstance(values, Iterable)
    items = [values] if isinstance(values, str) else list(values) if iterable else []
    if not items:
        raise ConfigError(f"{owner}({name}={values!r}): expected one or more of {list(allowed)}.")
    for value in items:
        if not isinstance(value, str) or value not in allowed:
            raise ConfigError(
                f"{owner}({name}={values!r}): {value!r} is not one of "
                f"{', '.join(map(repr, allowed))}.{suggestion(value, allowed)}"
            )
    return tuple(dict.fromkeys(items))


def as_str_list(owner: str, name: str, value: Any) -> list[str]:
    """A pattern argument (None, a string or strings) as a list."""
    if value is None or isinstance(value, str):
        return [] if value is None else [value]
    if isinstance(value, Iterable):
        items = list(value)
        if all(isinstance(v, str) and v for v in items):
            return items
    raise ConfigError(
        f"{owner}({name}={value!r}): expected a non-empty string or a list of non-empty strings "
        "(shell-style globs such as 'encoder.*', or regular expressions prefixed 're:')."
    )


def compile_pattern(text: str, kind: str = "module", where: str = "") -> re.Pattern[str]:
    """A glob, or a regex written ``re:<regex>``, as a regex over whole names (``where``: the
    error message's prefix)."""
    if not text.startswith("re:"):
        return re.compile(fnmatch.translate(text))
    try:
        return re.compile(text[3:])
    except re.error as exc:
        message = f"{where}{kind} pattern {text!r} is not a valid regular expression: {exc}"
        raise ConfigError(message) from None


def check_patterns(owner: str, name: str, value: Any, kind: str = "module") -> list[str]:
    """:func:`as_str_list`, every regex checked now."""
    patterns = as_str_list(owner, name, value)
    for text in patterns:
        compile_pattern(text, kind, f"{owner}({name}={patterns!r}): ")
    return patterns

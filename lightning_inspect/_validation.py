"""Argument checks shared by the public constructors.

Every check raises :class:`~lightning_inspect.errors.ConfigError` with a message that names the
argument, repeats the value received and says what is allowed, e.g.::

    >>> check_positive_int("ActivationMonitor", "every_n_steps", 0)
    Traceback (most recent call last):
    ...
    lightning_inspect.errors.ConfigError: ActivationMonitor(every_n_steps=0): expected an integer >= 1.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable, Sequence
from typing import Any

from lightning_inspect.errors import ConfigError


def closest(value: str, candidates: Iterable[str], n: int = 5, cutoff: float = 0.5) -> list[str]:
    """The ``n`` candidates most similar to ``value`` (difflib ratio >= ``cutoff``), best first.

    Equally similar candidates keep their given order.

    >>> closest("encoder", ["features", "classifier", "classifier.0"], n=2, cutoff=0.0)
    ['classifier', 'classifier.0']
    """
    scored = [(difflib.SequenceMatcher(None, c, value).ratio(), c) for c in candidates]
    ranked = sorted((item for item in scored if item[0] >= cutoff), key=lambda item: -item[0])
    return [c for _, c in ranked[:n]]


def suggestion(value: str, candidates: Iterable[str]) -> str:
    """A ``" Did you mean ...?"`` sentence, or ``""`` when nothing is close."""
    near = closest(value, candidates, n=3)
    return f" Did you mean {', '.join(repr(c) for c in near)}?" if near else ""


def check_positive_int(
    owner: str, name: str, value: Any, minimum: int = 1, maximum: int | None = None
) -> int:
    """``value`` if it is an integer in ``[minimum, maximum]``; otherwise a ConfigError."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or value < minimum
        or (maximum is not None and value > maximum)
    ):
        bound = f">= {minimum}" + (f" and <= {maximum}" if maximum is not None else "")
        raise ConfigError(f"{owner}({name}={value!r}): expected an integer {bound}.")
    return value


def check_optional_int(owner: str, name: str, value: Any, minimum: int = 0) -> int | None:
    """Like :func:`check_positive_int` but ``None`` passes through."""
    return None if value is None else check_positive_int(owner, name, value, minimum)


def check_number(
    owner: str, name: str, value: Any, low: float, high: float, bounds: str = "[]"
) -> float:
    """``value`` if it is a finite number in the interval ``bounds`` (``"(]"``: open at ``low``).

    >>> check_number("M", "p", 0, 0, 1, "(]")
    Traceback (most recent call last):
    ...
    lightning_inspect.errors.ConfigError: M(p=0): expected a number in (0, 1].
    """
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not (
        ok
        and (value > low if bounds[0] == "(" else value >= low)
        and (value < high if bounds[1] == ")" else value <= high)
    ):
        raise ConfigError(
            f"{owner}({name}={value!r}): expected a number in {bounds[0]}{low:g}, {high:g}{bounds[1]}."
        )
    return value


def check_bool(owner: str, name: str, value: Any) -> bool:
    """``value`` if it is a bool; otherwise a ConfigError."""
    if not isinstance(value, bool):
        raise ConfigError(f"{owner}({name}={value!r}): expected true or false.")
    return value


def check_choice(owner: str, name: str, value: Any, allowed: Sequence[str]) -> str:
    """``value`` if it is one of ``allowed``; otherwise a ConfigError listing them."""
    if not isinstance(value, str) or value not in allowed:
        hint = suggestion(value, allowed) if isinstance(value, str) else ""
        raise ConfigError(
            f"{owner}({name}={value!r}): expected one of {', '.join(map(repr, allowed))}.{hint}"
        )
    return value


def check_choices(
    owner: str, name: str, values: Any, allowed: Sequence[str], default: Sequence[str]
) -> tuple[str, ...]:
    """A tuple of distinct allowed strings; ``None`` gives ``default``; a string is one choice.

    A bad element is named in a message that repeats the value as given:

    >>> try:
    ...     check_choices("M", "stats", ["mean", "median"], ["mean", "std"], ["mean"])
    ... except ConfigError as exc:
    ...     print(exc)
    M(stats=['mean', 'median']): 'median' is not one of 'mean', 'std'. Did you mean 'mean'?
    """
    if values is None:
        return tuple(default)
    items = [values] if isinstance(values, str) else values
    if not isinstance(items, Iterable):
        raise ConfigError(
            f"{owner}({name}={values!r}): expected a list of names from {list(allowed)}."
        )
    out: list[str] = []
    for value in items:
        if not isinstance(value, str) or value not in allowed:
            hint = suggestion(value, allowed) if isinstance(value, str) else ""
            raise ConfigError(
                f"{owner}({name}={values!r}): {value!r} is not one of "
                f"{', '.join(map(repr, allowed))}.{hint}"
            )
        if value not in out:
            out.append(value)
    if not out:
        raise ConfigError(f"{owner}({name}={values!r}): expected at least one of {list(allowed)}.")
    return tuple(out)


def as_str_list(owner: str, name: str, value: Any) -> list[str]:
    """A pattern argument (None, one string, or a sequence of strings) as a list of strings."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, Iterable):
        items = list(value)
        bad = [v for v in items if not isinstance(v, str) or not v]
        if not bad:
            return items
    raise ConfigError(
        f"{owner}({name}={value!r}): expected a non-empty string or a list of non-empty strings "
        "(shell-style globs such as 'encoder.*', or regular expressions prefixed 're:')."
    )

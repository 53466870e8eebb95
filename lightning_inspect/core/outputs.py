"""Walk a module's output (tensors, tuples, lists, dicts, dataclasses, NamedTuples, nested) and
yield its tensors with their paths: ``/``-joined indices, keys and fields, each escaped by
:func:`~lightning_inspect.core.keys.escape_name` so two outputs never share a path.

Example:
    >>> import torch
    >>> out = {"logits": torch.zeros(2), "aux": (torch.ones(1), None, "text")}
    >>> [path for path, _ in iter_tensors(out)]
    ['logits', 'aux/0']
    >>> [path for path, _ in iter_tensors(torch.zeros(1))]
    ['']
    >>> [path for path, _ in iter_tensors({"a/b": torch.zeros(1), "a": {"b": torch.ones(1)}})]
    ['a%2Fb', 'a/b']
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from lightning_inspect.core.keys import escape_name

#: Deepest nesting followed; deeper structures are not inspected.
MAX_DEPTH = 8


def iter_tensors(obj: Any, path: str = "", depth: int = 0) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(path, tensor)`` for every tensor in ``obj`` (depth-first, in order)."""
    if isinstance(obj, torch.Tensor):
        yield path, obj
        return
    if depth >= MAX_DEPTH or obj is None or isinstance(obj, (str, bytes, int, float, bool)):
        return
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # NamedTuple
        items: Iterator[tuple[str, Any]] = zip(obj._fields, obj, strict=False)
    elif isinstance(obj, (list, tuple)):
        items = ((str(i), v) for i, v in enumerate(obj))
    elif isinstance(obj, Mapping):
        items = ((str(k), v) for k, v in obj.items())
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        items = ((f.name, getattr(obj, f.name)) for f in dataclasses.fields(obj))
    else:
        return
    for key, value in items:
        segment = escape_name(key)
        yield from iter_tensors(value, f"{path}/{segment}" if path else segment, depth + 1)

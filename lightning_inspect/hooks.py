"""Hook objects and their lifetime.

* :class:`HookSet` owns removable handles: ``remove()`` is idempotent and it is a context manager.
* :class:`InertWhenCopied` is the base of every hook object this library puts on a module or a
  tensor: a copy of the model (``copy.deepcopy``, ``torch.save``/``pickle``) made while a hook is
  installed gets a hook that does nothing, so copies never report into a live monitor and never
  drag the monitor along.
* :func:`suspended` switches every hook of this library off for a block (used while the graph is
  traced, so tracing forwards are not recorded).

Example:
    >>> import torch.nn as nn
    >>> net = nn.Linear(2, 2)
    >>> with HookSet() as hooks:
    ...     hooks.add(net.register_forward_hook(lambda m, a, o: None))
    ...     len(net._forward_hooks)
    1
    >>> len(net._forward_hooks)
    0
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any, Protocol

_SUSPENDED: ContextVar[bool] = ContextVar("lightning_inspect_hooks_suspended", default=False)


class _Removable(Protocol):
    def remove(self) -> None: ...


class HookSet:
    """A set of hook handles removed together, at most once each."""

    def __init__(self) -> None:
        self._handles: list[_Removable] = []

    def add(self, handle: _Removable) -> None:
        """Take ownership of ``handle``."""
        self._handles.append(handle)

    def remove(self) -> None:
        """Remove every handle; calling it again does nothing."""
        handles, self._handles = self._handles, []
        for handle in handles:
            handle.remove()

    def __len__(self) -> int:
        return len(self._handles)

    def __enter__(self) -> HookSet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def _inert_hook(*args: Any, **kwargs: Any) -> None:
    """What a copied hook becomes: a module-level function that does nothing."""
    return None


class InertWhenCopied:
    """Base class for hook objects: pickling or deep-copying one yields :func:`_inert_hook`."""

    __slots__ = ()

    def __reduce__(self) -> tuple[Any, tuple[()]]:
        return (_inert_hook_factory, ())

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        return _inert_hook

    def __copy__(self) -> Any:
        return _inert_hook


def _inert_hook_factory() -> Any:
    return _inert_hook


def is_suspended() -> bool:
    """Whether hooks are switched off in the current context."""
    return _SUSPENDED.get()


@contextlib.contextmanager
def suspended() -> Iterator[None]:
    """Switch every hook of this library off inside the block."""
    token = _SUSPENDED.set(True)
    try:
        yield
    finally:
        _SUSPENDED.reset(token)

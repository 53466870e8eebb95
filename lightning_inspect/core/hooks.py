"""The one output hook and the one tensor-gradient hook, and their lifetime. Hook objects are
:class:`InertWhenCopied` (a deep copy or pickle of a hooked model never reports into a live
monitor); a fault in a consumer is reported to it (``_hook_fault``) and never breaks training,
except the library's own :class:`~lightning_inspect.errors.InspectError`.

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

import torch
from torch import nn

from lightning_inspect.core.outputs import iter_tensors
from lightning_inspect.errors import InspectError

_SUSPENDED: ContextVar[bool] = ContextVar("lightning_inspect_hooks_suspended", default=False)


class _Removable(Protocol):
    def remove(self) -> None: ...


class HookSet:
    """A set of hook handles removed together, at most once each."""

    def __init__(self) -> None:
        self._handles: list[_Removable] = []

    def add(self, handle: _Removable) -> None:
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
    """What a copied hook becomes."""


def _inert_hook_factory() -> Any:
    return _inert_hook


class InertWhenCopied:
    """Base class for hook objects: a pickled or (deep-)copied one is :func:`_inert_hook`."""

    __slots__ = ()

    def __reduce__(self) -> tuple[Any, tuple[()]]:
        return (_inert_hook_factory, ())

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        return _inert_hook

    def __copy__(self) -> Any:
        return _inert_hook


def is_suspended() -> bool:
    return _SUSPENDED.get()


@contextlib.contextmanager
def suspended() -> Iterator[None]:
    """Switch every hook of this library off inside the block (graph tracing)."""
    token = _SUSPENDED.set(True)
    try:
        yield
    finally:
        _SUSPENDED.reset(token)


_graph_task_id = getattr(torch._C, "_current_graph_task_id", None)


def in_backward_pass() -> bool:
    """Whether this thread runs a backward pass (e.g. recomputing checkpointed activations)."""
    return _graph_task_id is not None and _graph_task_id() != -1


class OutputHook(InertWhenCopied):
    """Forward hook (with or without ``with_kwargs=True``) of one named module: while
    ``consumer._recording``, ``consumer._on_forward(name, module, args, kwargs, output)`` if the
    consumer has it, else ``consumer._on_output(name, path, tensor)`` per output tensor.
    """

    __slots__ = ("consumer", "name")

    def __init__(self, consumer: Any, name: str) -> None:
        self.consumer = consumer
        self.name = name

    def __call__(self, module: nn.Module, args: Any, *rest: Any) -> None:
        # The first test is all a compiled graph sees of this hook when not recording.
        if self.consumer._recording:
            _record_output(self, module, args, rest)
        return None


@torch.compiler.disable
def _record_output(hook: OutputHook, module: nn.Module, args: Any, rest: tuple[Any, ...]) -> None:
    """The work of :class:`OutputHook`, always eager (outside any compiled graph)."""
    if is_suspended() or in_backward_pass():
        return
    consumer, output = hook.consumer, rest[-1]
    try:
        on_forward = getattr(consumer, "_on_forward", None)
        if on_forward is not None:
            on_forward(hook.name, module, args, rest[0] if len(rest) == 2 else {}, output)
        else:
            for path, tensor in iter_tensors(output):
                consumer._on_output(hook.name, path, tensor)
    except InspectError:
        raise
    except Exception as exc:  # never let inspection break the forward pass
        consumer._hook_fault(f"the output of {hook.name!r}", exc)


class OutputGradHook(InertWhenCopied):
    """Tensor hook (registered on an output, so in-place modules work too):
    ``consumer._on_output_grad(key, grad)``."""

    __slots__ = ("consumer", "key")

    def __init__(self, consumer: Any, key: Any) -> None:
        self.consumer = consumer
        self.key = key

    def __call__(self, grad: torch.Tensor) -> None:
        if is_suspended():
            return None
        try:
            self.consumer._on_output_grad(self.key, grad)
        except InspectError:
            raise
        except Exception as exc:
            self.consumer._hook_fault(f"the gradient of {self.key!r}", exc)
        return None

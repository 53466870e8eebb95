"""Hook objects and their lifetime.

* :class:`HookSet` owns removable handles: ``remove()`` is idempotent and it is a context manager.
* :class:`InertWhenCopied` is the base of every hook object this library puts on a module or a
  tensor: a copy of the model (``copy.deepcopy``, ``torch.save``/``pickle``) made while a hook is
  installed gets a hook that does nothing, so copies never report into a live monitor and never
  drag the monitor along.
* :class:`OutputHook` (a forward hook) and :class:`OutputGradHook` (a tensor hook) are the
  hooks monitors put on modules and on output tensors; their rules:
  * A module called several times in one step (a shared block, a recurrent cell, several
    micro-batches under gradient accumulation) reports once per step: the values of all calls are
    merged (counts and sums add, min/max take the extremes, histograms are re-binned onto the
    combined range).
  * Forwards that run inside a backward pass (recomputation under activation checkpointing) are not
    recorded again.
  * Gradients of outputs are read with a tensor hook registered on each output tensor by a forward
    hook, never with ``register_full_backward_hook``: that works with in-place modules
    (``ReLU(inplace=True)``) and with dict/list outputs.
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

import torch
from torch import nn

from lightning_inspect.core.outputs import iter_tensors

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


_graph_task_id = getattr(torch._C, "_current_graph_task_id", None)


def in_backward_pass() -> bool:
    """Whether the current thread is running an autograd backward pass."""
    return _graph_task_id is not None and _graph_task_id() != -1


class OutputConsumer(Protocol):
    _recording: bool

    def _on_output(self, name: str, path: str, tensor: torch.Tensor) -> None: ...

    def _hook_fault(self, where: str, exc: BaseException) -> None: ...


class OutputHook(InertWhenCopied):
    """Forward hook: hands every tensor of a module's output to its monitor."""

    __slots__ = ("consumer", "name")

    def __init__(self, consumer: OutputConsumer, name: str) -> None:
        self.consumer = consumer
        self.name = name

    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        # The first test is all a compiled graph sees of this hook when not recording.
        if not self.consumer._recording:
            return None
        _record_output(self, output)
        return None


@torch.compiler.disable
def _record_output(hook: OutputHook, output: Any) -> None:
    """The work of :class:`OutputHook`, always run eagerly (outside any compiled graph)."""
    if is_suspended() or in_backward_pass():
        return
    try:
        for path, tensor in iter_tensors(output):
            hook.consumer._on_output(hook.name, path, tensor)
    except Exception as exc:  # never let inspection break the forward pass
        hook.consumer._hook_fault(f"the output of {hook.name!r}", exc)


class GradientConsumer(Protocol):
    def _on_output_grad(self, key: str, grad: torch.Tensor) -> None: ...

    def _hook_fault(self, where: str, exc: BaseException) -> None: ...


class OutputGradHook(InertWhenCopied):
    """Tensor hook: hands the gradient of one output tensor to its monitor; returns None."""

    __slots__ = ("consumer", "key")

    def __init__(self, consumer: GradientConsumer, key: str) -> None:
        self.consumer = consumer
        self.key = key

    def __call__(self, grad: torch.Tensor) -> None:
        if is_suspended():
            return None
        try:
            self.consumer._on_output_grad(self.key, grad)
        except Exception as exc:
            self.consumer._hook_fault(f"the gradient of {self.key!r}", exc)
        return None

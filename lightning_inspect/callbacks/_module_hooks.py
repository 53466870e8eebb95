"""The hook objects monitors attach to modules and to output tensors.

Rules they follow (documented for users in the README):

* A module called several times in one step (a shared block, a recurrent cell, several
  micro-batches under gradient accumulation) reports once per step: the values of all calls are
  merged (counts and sums add, min/max take the extremes, histograms are re-binned onto the
  combined range).
* Forwards that run inside a backward pass (recomputation under activation checkpointing) are not
  recorded again.
* Gradients of outputs are read with a tensor hook registered on each output tensor by a forward
  hook, never with ``register_full_backward_hook``: that works with in-place modules
  (``ReLU(inplace=True)``) and with dict/list outputs.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn

from lightning_inspect.hooks import InertWhenCopied, is_suspended
from lightning_inspect.outputs import iter_tensors

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

"""lightning_inspect.core.hooks and the hook objects of callbacks/_module_hooks.py."""

from __future__ import annotations

import copy
import io
import math
import pickle
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from lightning_inspect.core.hooks import (
    HookSet,
    InertWhenCopied,
    OutputGradHook,
    OutputHook,
    _inert_hook,
    in_backward_pass,
    is_suspended,
    suspended,
)
from lightning_inspect.errors import NonFiniteError


class Consumer:
    """Records what hooks hand it; refuses to be copied (so a copy cannot drag it along)."""

    _recording = True  # monitors switch this on only inside recorded batches

    def __init__(self) -> None:
        self.outputs: list[tuple[str, str, tuple[int, ...]]] = []
        self.grads: list[tuple[str, torch.Tensor]] = []
        self.faults: list[str] = []

    def _on_output(self, name: str, path: str, tensor: torch.Tensor) -> None:
        self.outputs.append((name, path, tuple(tensor.shape)))

    def _on_output_grad(self, key: str, grad: torch.Tensor) -> None:
        self.grads.append((key, grad.clone()))

    def _hook_fault(self, where: str, exc: BaseException) -> None:
        self.faults.append(where)

    def __deepcopy__(self, memo: Any) -> Any:
        raise AssertionError("the consumer must not be copied")

    def __reduce__(self) -> Any:
        raise AssertionError("the consumer must not be pickled")


class Handle:
    def __init__(self) -> None:
        self.removed = 0

    def remove(self) -> None:
        self.removed += 1


def test_hookset_remove_is_idempotent() -> None:
    hs = HookSet()
    handles = [Handle(), Handle()]
    for h in handles:
        hs.add(h)
    assert len(hs) == 2
    hs.remove()
    hs.remove()
    assert [h.removed for h in handles] == [1, 1] and len(hs) == 0


def test_hookset_context_manager_removes_real_hooks_even_on_error() -> None:
    net = nn.Linear(2, 2)
    with pytest.raises(RuntimeError), HookSet() as hooks:
        hooks.add(net.register_forward_hook(lambda m, a, o: None))
        hooks.add(net.register_forward_pre_hook(lambda m, a: None))
        assert len(net._forward_hooks) == 1 and len(net._forward_pre_hooks) == 1
        raise RuntimeError("boom")
    assert len(net._forward_hooks) == 0 and len(net._forward_pre_hooks) == 0
    hooks.remove()  # again: nothing happens


def attached(consumer: Consumer) -> tuple[nn.Module, Any]:
    net = nn.Sequential(nn.Linear(3, 2), nn.ReLU())
    handle = net[0].register_forward_hook(OutputHook(consumer, "0"))
    return net, handle


def test_output_hook_reports_outputs() -> None:
    c = Consumer()
    net, _ = attached(c)
    net(torch.randn(4, 3))
    assert c.outputs == [("0", "", (4, 2))]


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
def test_copies_of_a_hooked_module_get_inert_hooks(how: str) -> None:
    c = Consumer()
    net, _ = attached(c)
    if how == "deepcopy":
        clone = copy.deepcopy(net)
    elif how == "pickle":
        clone = pickle.loads(pickle.dumps(net))
    else:
        buf = io.BytesIO()
        torch.save(net, buf)
        buf.seek(0)
        clone = torch.load(buf, weights_only=False)
    hooks = list(clone[0]._forward_hooks.values())
    assert len(hooks) == 1 and hooks[0] is _inert_hook
    out = clone(torch.randn(5, 3))
    assert out.shape == (5, 2)
    assert c.outputs == []  # the copy records nothing
    torch.testing.assert_close(clone[0].weight, net[0].weight)
    net(torch.randn(1, 3))
    assert c.outputs == [("0", "", (1, 2))]  # the original still does


def test_copy_protocol_of_hook_objects() -> None:
    c = Consumer()
    for hook in (OutputHook(c, "x"), OutputGradHook(c, "k")):
        assert isinstance(hook, InertWhenCopied)
        assert copy.copy(hook) is _inert_hook
        assert copy.deepcopy(hook) is _inert_hook
        assert pickle.loads(pickle.dumps(hook)) is _inert_hook
    assert _inert_hook(1, 2, x=3) is None


def test_output_grad_hook_reports_gradient_and_leaves_it_unchanged() -> None:
    c = Consumer()
    x = torch.randn(3, requires_grad=True)
    y = x * 2
    y.register_hook(OutputGradHook(c, "activation_grads/y"))
    (y * torch.arange(3.0)).sum().backward()
    assert [k for k, _ in c.grads] == ["activation_grads/y"]
    torch.testing.assert_close(c.grads[0][1], torch.arange(3.0))
    torch.testing.assert_close(x.grad, 2 * torch.arange(3.0))


def test_suspended_switches_hooks_off_and_restores() -> None:
    c = Consumer()
    net, _ = attached(c)
    assert not is_suspended()
    with suspended():
        assert is_suspended()
        with suspended():
            pass
        assert is_suspended()
        net(torch.randn(2, 3))
    assert not is_suspended()
    assert c.outputs == []
    net(torch.randn(2, 3))
    assert len(c.outputs) == 1


def test_grad_hook_suspended() -> None:
    c = Consumer()
    x = torch.randn(3, requires_grad=True)
    y = x * 2
    y.register_hook(OutputGradHook(c, "k"))
    with suspended():
        y.sum().backward()
    assert c.grads == []


@pytest.mark.parametrize("reentrant", [False, True])
def test_recomputation_in_backward_is_not_recorded(reentrant: bool) -> None:
    c = Consumer()
    block = nn.Sequential(nn.Linear(3, 3), nn.Tanh())
    block[0].register_forward_hook(OutputHook(c, "0"))
    x = torch.randn(2, 3, requires_grad=True)
    out = checkpoint(block, x, use_reentrant=reentrant)
    assert len(c.outputs) == 1
    assert not in_backward_pass()
    out.sum().backward()
    assert len(c.outputs) == 1  # the recomputed forward was skipped
    assert x.grad is not None


def test_output_hook_is_silent_while_not_recording() -> None:
    c = Consumer()
    net, _ = attached(c)
    c._recording = False
    net(torch.randn(2, 3))
    assert c.outputs == []
    c._recording = True
    net(torch.randn(2, 3))
    assert len(c.outputs) == 1


def test_fault_in_consumer_is_contained() -> None:
    class Broken(Consumer):
        def _on_output(self, name: str, path: str, tensor: torch.Tensor) -> None:
            raise ValueError("broken consumer")

    c = Broken()
    net, _ = attached(c)
    out = net(torch.randn(2, 3))
    assert out.shape == (2, 2)
    assert c.faults == ["the output of '0'"]


def test_output_hook_with_kwargs_hands_the_whole_call_to_on_forward() -> None:
    """A consumer with ``_on_forward`` gets module, args, kwargs and output (hooks registered with
    or without ``with_kwargs``); the library's own errors go through, others are contained."""

    class Whole(Consumer):
        def __init__(self) -> None:
            super().__init__()
            self.calls: list[tuple[str, int, dict[str, Any], tuple[int, ...]]] = []

        def _on_forward(
            self, name: str, module: nn.Module, args: Any, kwargs: Any, out: Any
        ) -> None:
            if isinstance(args[0], torch.Tensor) and torch.isnan(args[0]).any():
                raise NonFiniteError("NaN in")
            self.calls.append((name, len(args), dict(kwargs), tuple(out.shape)))

    c = Whole()
    lin = nn.Linear(3, 2)
    lin.register_forward_hook(OutputHook(c, "with"), with_kwargs=True)
    lin.register_forward_hook(OutputHook(c, "without"))
    lin(torch.randn(4, 3))
    assert c.calls == [("with", 1, {}, (4, 2)), ("without", 1, {}, (4, 2))] and c.outputs == []
    with pytest.raises(NonFiniteError):
        lin(torch.full((1, 3), math.nan))
    assert c.faults == []

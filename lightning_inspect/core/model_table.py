"""The model table: a row per module (parameters, layers, shapes seen on one batch), one renderer."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.parameter import is_lazy

from lightning_inspect.core import hooks
from lightning_inspect.core.outputs import iter_tensors
from lightning_inspect.core.selection import named_modules, normalise_name

_HEAD = ("module", "type", "layers", "input shapes", "output shapes", "calls", "parameters")
_HEAD += ("trainable", "frozen")


def describe_tensor(t: torch.Tensor) -> str:
    """``(4, 8, 6, 6) float32`` (plus the device when it is not the CPU)."""
    return f"{tuple(t.shape)} {str(t.dtype)[6:]}" + f" {t.device}" * (t.device.type != "cpu")


def _join(parts: Sequence[str], limit: int = 6) -> str:
    return "; ".join([*parts[:limit], *[f"... ({len(parts) - limit} more)"][: len(parts) > limit]])


def describe_inputs(args: Sequence[Any], kwargs: Mapping[str, Any] | None = None) -> str:
    """A module's call arguments: ``input 0: (8, 288) float32; mask: (8,) bool``."""
    parts = [f"input {p}: {describe_tensor(t)}" for p, t in iter_tensors(list(args))]
    parts += [f"{p}: {describe_tensor(t)}" for p, t in iter_tensors(dict(kwargs or {}))]
    other = [f"input {i}: {type(a).__name__}" for i, a in enumerate(args) if not [*iter_tensors(a)]]
    return _join(parts + other[:2]) or "(no tensors)"


class InputHook(hooks.InertWhenCopied):
    """Forward pre-hook: hands a module's call arguments to ``consumer._on_input``, except for a
    strategy's redirected ``training_step`` (DDP, FSDP: the root's ``forward`` patched for a call)."""

    __slots__ = ("consumer", "name")

    def __init__(self, consumer: Any, name: str) -> None:
        self.consumer, self.name = consumer, name

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        patched = getattr(vars(module).get("forward", module.forward), "__self__", None)
        redirected = not self.name and patched is not module  # only the root is redirected
        try:
            if not redirected and not hooks.is_suspended() and not hooks.in_backward_pass():
                self.consumer._on_input(self.name, module, args, kwargs)
        except Exception as exc:  # never let inspection break the forward pass
            self.consumer._hook_fault(f"the inputs of {self.name!r}", exc)


def hook_modules(consumer: Any, modules: Mapping[str, nn.Module]) -> hooks.HookSet:
    """An :class:`InputHook` and an :class:`~lightning_inspect.core.hooks.OutputHook` per module."""
    handles = hooks.HookSet()
    for name, m in modules.items():
        handles.add(m.register_forward_pre_hook(InputHook(consumer, name), with_kwargs=True))
        handles.add(m.register_forward_hook(hooks.OutputHook(consumer, name)))
    return handles


class _Counted:
    params: list[nn.Parameter]  # counted when read: lazy modules get theirs in the first forward

    @property
    def parameters(self) -> int:
        return sum(p.numel() for p in self.params if not is_lazy(p))

    @property
    def trainable(self) -> int:
        return sum(p.numel() for p in self.params if p.requires_grad and not is_lazy(p))


@dataclass
class ModelRow(_Counted):
    """One module (or block) of the table; ``order``: its first call on the recorded batch."""

    name: str
    type: str
    depth: int
    params: list[nn.Parameter]
    layers: str = ""
    inputs: str = ""
    outputs: list[str] = field(default_factory=list)
    calls: int = 0
    order: int = 1 << 62


def _row(name: str, module: nn.Module, depth: int, blocks: bool = False) -> ModelRow:
    leaves = [type(m).__name__ for m in module.modules() if not any(m.children())]
    kinds = ", ".join(f"{leaves.count(k)} {k}" for k in dict.fromkeys(leaves))
    layers = f"{len(leaves)} ({kinds})" if blocks or any(module.children()) else ""
    return ModelRow(name, type(module).__name__, depth, list(module.parameters()), layers)


class ModelTable(_Counted):
    """Every module of ``model`` (``depth=1``: its blocks, descending through a lone child as in
    ``self.model = nn.Sequential(...)``, and ``(own)`` parameters). Hooked with
    :func:`hook_modules`, it records each module's inputs and outputs (first call) and calls.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 3), nn.ReLU())
        >>> table = ModelTable(net)
        >>> with hook_modules(table, {"": net, **named_modules(net)}):
        ...     _ = net(torch.zeros(4, 2))
        >>> print(table.to_markdown().replace(" float32", ""))
        **Sequential**: 9 parameters (9 trainable, 0 frozen) in 2 layers
        <BLANKLINE>
        | module | type | layers | input shapes | output shapes | calls | parameters | trainable | frozen |
        |---|---|---|---|---|---:|---:|---:|---:|
        | (model) | Sequential | 2 (1 Linear, 1 ReLU) | input 0: (4, 2) | (4, 3) | 1 | 9 | 9 | 0 |
        | 0 | Linear |  | input 0: (4, 2) | (4, 3) | 1 | 9 | 9 | 0 |
        | 1 | ReLU |  | input 0: (4, 3) | (4, 3) | 1 | 0 | 0 | 0 |
    """

    _recording = True

    def __init__(self, model: nn.Module, depth: int | None = None) -> None:
        root, prefix, own = model, "", list(model.parameters(recurse=False))
        while depth and len(kids := list(root.named_children())) == 1 and not own:
            if not any(kids[0][1].children()):
                break
            prefix, root = f"{prefix}{kids[0][0]}.", kids[0][1]
            own = list(root.parameters(recurse=False))
        self.by_name: dict[str, ModelRow] = {}
        for name, module in named_modules(root).items():
            if depth is None or name.count(".") < depth:
                full = normalise_name(prefix + name)
                self.by_name[full] = _row(full, module, name.count(".") + 1, depth is not None)
        if own:
            self.by_name["(own)"] = ModelRow("(own)", type(root).__name__, 1, own)
        self.model_type = type(model).__name__
        self.layers = sum(1 for m in model.modules() if not any(m.children()))
        self.params = list(model.parameters())
        self.note = f" (blocks of {prefix[:-1]!r})" * bool(prefix)
        self._seen: set[tuple[str, str]] = set()
        self._calls = 0

    @property
    def rows(self) -> list[ModelRow]:
        """The rows, in call order on the recorded batch (the modules not called last)."""
        return sorted(self.by_name.values(), key=lambda r: r.order)

    def _on_input(self, name: str, module: nn.Module, args: Any, kwargs: Any) -> None:
        if name not in self.by_name:  # the root, or a module hooked under another name
            self.by_name[name] = _row(name or "(model)", module, name.count(".") + bool(name))
        row, self._calls = self.by_name[name], self._calls + 1
        if not row.calls:
            row.order, row.inputs = self._calls, describe_inputs(args, kwargs)
        row.calls += 1

    def _on_output(self, name: str, path: str, tensor: torch.Tensor) -> None:
        if name in self.by_name and (name, path) not in self._seen:  # seen before: a later call
            self._seen.add((name, path))
            self.by_name[name].outputs.append(f"{path}: " * bool(path) + describe_tensor(tensor))

    def _hook_fault(self, where: str, exc: BaseException) -> None:
        warnings.warn(f"lightning-inspect: no shapes of {where}: {exc!r}", RuntimeWarning, 2)

    def to_markdown(self) -> str:
        """The table as markdown; a column empty in every row is left out."""
        cells = [
            ["&nbsp;&nbsp;" * max(r.depth - 1, 0) + r.name, r.type, r.layers, r.inputs]
            + [_join(r.outputs), str(r.calls or "")]
            + [f"{n:,}" for n in (r.parameters, r.trainable, r.parameters - r.trainable)]
            for r in self.rows
        ]
        keep = [i for i in range(9) if i < 2 or i > 5 or any(c[i] for c in cells)]
        rule = "|" + "|".join("---:" if i > 4 else "---" for i in keep) + "|"
        frozen = self.parameters - self.trainable
        title = f"**{self.model_type}**{self.note}: {self.parameters:,} parameters ({self.trainable:,} trainable, {frozen:,} frozen) in {self.layers} layers"
        head, *body = ("| " + " | ".join(c[i] for i in keep) + " |" for c in [_HEAD, *cells])
        return "\n".join([title, "", head, rule, *body])


def print_markdown(text: str) -> None:
    """Print markdown rendered by rich (160 columns off a terminal), or as it is without rich."""
    try:
        from rich.console import Console
        from rich.markdown import Markdown
    except ImportError:  # pragma: no cover - rich is an optional dependency
        return print(text)
    Console(width=None if Console().is_terminal else 160).print(Markdown(text))

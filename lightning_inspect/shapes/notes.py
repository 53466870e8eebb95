"""Shapes: where a forward pass failed and why, a shape trace of one batch, the model's blocks.

* :class:`ModuleStack` keeps the modules currently inside their forward (a pre-hook pushes, a
  forward hook pops; when a forward raises, its hook never runs, so the failing module and its
  callers stay on the stack with the arguments they were called with).
  :func:`locate_in_traceback` finds the same from an exception's traceback alone (the frames of
  ``forward`` methods), for errors raised while no hook is attached.
* :func:`error_note` turns that into the note added to the exception: the failing module's
  qualified name and type, its callers, the shapes and dtypes of its inputs and parameters, and
  :func:`shape_hint` for the common causes (a missing flatten, a wrong ``in_features`` /
  ``in_channels``, dtype or device mismatches).
* :class:`ShapeTrace` records every module's input and output shapes during one batch.
* :func:`model_summary` describes the model's blocks (``named_children``): layers and
  parameters, trainable and frozen.

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Linear(100, 10))
    >>> stack = ModuleStack()
    >>> with stack.attach({name: m for name, m in net.named_modules() if name}):
    ...     try:
    ...         net(torch.zeros(2, 1, 12, 12))
    ...     except RuntimeError as exc:
    ...         print(error_note(stack.frames(), exc).splitlines()[0])
    lightning-inspect: the error was raised inside module '2' (Linear).
"""

from __future__ import annotations

import logging
import math
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import torch
from torch import nn

from lightning_inspect.core.hooks import HookSet, InertWhenCopied, is_suspended
from lightning_inspect.core.outputs import iter_tensors

#: Prefix of every note this library adds to an exception.
NOTE_PREFIX = "lightning-inspect:"
_MAX_LISTED = 6
_SPATIAL = {1: "L", 2: "H, W", 3: "D, H, W"}


# ---------------------------------------------------------------------------------------------
# Describing tensors and modules
# ---------------------------------------------------------------------------------------------


def describe_tensor(t: torch.Tensor) -> str:
    """``(4, 8, 6, 6) float32`` (plus the device when it is not the CPU).

    >>> describe_tensor(torch.zeros(2, 3, dtype=torch.int64))
    '(2, 3) int64'
    """
    device = "" if t.device.type == "cpu" else f" {t.device}"
    return f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')}{device}"


def describe_values(obj: Any, limit: int = _MAX_LISTED) -> str:
    """The tensors inside any structure, with their paths: ``input 0: (2, 3) float32; ...``.

    >>> describe_values((torch.zeros(2), {"mask": torch.ones(2, dtype=torch.bool)}))
    '0: (2,) float32; 1/mask: (2,) bool'
    """
    items = list(iter_tensors(obj))
    parts = [
        f"{path}: {describe_tensor(t)}" if path else describe_tensor(t) for path, t in items[:limit]
    ]
    if len(items) > limit:
        parts.append(f"... ({len(items) - limit} more)")
    return "; ".join(parts) if parts else "(no tensors)"


def describe_inputs(args: Sequence[Any], kwargs: Mapping[str, Any] | None = None) -> str:
    """A module's call arguments: ``input 0: (8, 288) float32; mask: (8,) bool``."""
    items = [(f"input {p}" if p else "input", t) for p, t in iter_tensors(list(args))]
    items += [(p, t) for p, t in iter_tensors(dict(kwargs or {}))]
    others = [f"input {i}: {type(a).__name__}" for i, a in enumerate(args) if not _holds_tensor(a)]
    parts = [f"{label}: {describe_tensor(t)}" for label, t in items[:_MAX_LISTED]] + others[:2]
    if len(items) > _MAX_LISTED:
        parts.append(f"... ({len(items) - _MAX_LISTED} more tensors)")
    return "; ".join(parts) if parts else "(no tensors)"


def describe_parameters(module: nn.Module) -> str:
    """The module's own parameters and buffers: ``weight (10, 288) float32, bias (10,) float32``."""
    parts = [
        f"{n} {describe_tensor(p)}{'' if p.requires_grad else ' (frozen)'}"
        for n, p in module.named_parameters(recurse=False)
    ]
    if not parts:
        total = sum(p.numel() for p in module.parameters())
        return f"none of its own ({total:,} in its submodules)" if total else "none"
    return ", ".join(parts)


def _holds_tensor(obj: Any) -> bool:
    return any(True for _ in iter_tensors(obj))


# ---------------------------------------------------------------------------------------------
# The stack of modules inside their forward
# ---------------------------------------------------------------------------------------------


@dataclass
class ModuleFrame:
    """A module inside its forward, with what it was called with."""

    name: str
    module: nn.Module
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    from_traceback: bool = False


class _PushHook(InertWhenCopied):
    __slots__ = ("name", "stack")

    def __init__(self, stack: ModuleStack, name: str) -> None:
        self.stack = stack
        self.name = name

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if not is_suspended():
            self.stack.push(self.name, module, args, kwargs)
        return None


class _PopHook(InertWhenCopied):
    __slots__ = ("name", "stack")

    def __init__(self, stack: ModuleStack, name: str) -> None:
        self.stack = stack
        self.name = name

    def __call__(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
    ) -> None:
        if not is_suspended():
            self.stack.pop(module, output)
        return None


class ModuleStack:
    """Modules currently inside their forward, outermost first.

    A module whose forward raised stays on the stack (its forward hook never runs); the next
    :meth:`clear` (at the next batch) drops it. An exception caught inside a model's forward
    leaves stale entries that the caller's own pop removes.
    """

    def __init__(self) -> None:
        self._frames: list[ModuleFrame] = []
        #: When set, receives every push and pop (see :class:`ShapeTrace`).
        self.trace: ShapeTrace | None = None

    def attach(self, modules: Mapping[str, nn.Module]) -> HookSet:
        """Hook ``modules`` (qualified name -> module); returns the hooks to remove."""
        hooks = HookSet()
        for name, module in modules.items():
            hooks.add(module.register_forward_pre_hook(_PushHook(self, name), with_kwargs=True))
            hooks.add(module.register_forward_hook(_PopHook(self, name), with_kwargs=True))
        return hooks

    def push(
        self, name: str, module: nn.Module, args: tuple[Any, ...], kwargs: Mapping[str, Any]
    ) -> None:
        """A module enters its forward."""
        self._frames.append(ModuleFrame(name, module, args, kwargs))
        if self.trace is not None:
            self.trace.enter(name, module, args, kwargs, depth=len(self._frames) - 1)

    def pop(self, module: nn.Module, output: Any = None) -> None:
        """A module left its forward normally: drop it (and any stale frame above it)."""
        for i in range(len(self._frames) - 1, -1, -1):
            if self._frames[i].module is module:
                name = self._frames[i].name
                del self._frames[i:]
                if self.trace is not None:
                    self.trace.leave(name, output)
                return

    def frames(self) -> list[ModuleFrame]:
        """The modules inside their forward, outermost first (the failing one last)."""
        return list(self._frames)

    def clear(self) -> None:
        """Forget every frame (a new batch starts)."""
        self._frames.clear()


def locate_in_traceback(exc: BaseException, modules: Mapping[str, nn.Module]) -> list[ModuleFrame]:
    """The watched modules whose ``forward`` frames are in ``exc``'s traceback, outermost first.

    Works without hooks: each frame of a method named ``forward`` whose ``self`` is one of
    ``modules`` is a module inside its forward when the error was raised. The arguments are the
    frame's local variables (as they were at that moment).

    >>> net = nn.Sequential(nn.Linear(3, 2))
    >>> try:
    ...     net(torch.zeros(1, 4))
    ... except RuntimeError as exc:
    ...     [f.name for f in locate_in_traceback(exc, dict(net.named_modules()))]
    ['', '0']
    """
    by_id = {id(m): n for n, m in modules.items()}
    out: list[ModuleFrame] = []
    tb: TracebackType | None = exc.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        if frame.f_code.co_name == "forward":
            owner = frame.f_locals.get("self")
            if owner is not None and id(owner) in by_id:
                names = frame.f_code.co_varnames[1 : frame.f_code.co_argcount]
                args = tuple(frame.f_locals[n] for n in names if n in frame.f_locals)
                out.append(ModuleFrame(by_id[id(owner)], owner, args, {}, from_traceback=True))
        tb = tb.tb_next
    return out


# ---------------------------------------------------------------------------------------------
# Notes and hints
# ---------------------------------------------------------------------------------------------


def attach_note(exc: BaseException, note: str) -> None:
    """Add ``note`` to ``exc`` so it shows under the original traceback (Python >= 3.11).

    On Python 3.10 (no ``add_note``) the note is logged as an error and warned instead.
    """
    if hasattr(exc, "add_note"):
        exc.add_note(note)
    else:  # pragma: no cover - Python 3.10
        logging.getLogger("lightning_inspect").error(note)
        warnings.warn(note, RuntimeWarning, stacklevel=3)


def has_note(exc: BaseException, marker: str = NOTE_PREFIX) -> bool:
    """Whether ``exc`` already carries a note of this library starting with ``marker``."""
    return any(str(n).startswith(marker) for n in getattr(exc, "__notes__", ()))


def error_note(frames: Sequence[ModuleFrame], exc: BaseException, context: str = "") -> str:
    """The note added to an exception raised inside ``frames[-1]``'s forward.

    Args:
        frames: the modules inside their forward, outermost first (from :class:`ModuleStack`
            or :func:`locate_in_traceback`).
        exc: the exception.
        context: where in training it happened (``"training step 0, batch 0"``).
    """
    inner = frames[-1]
    where = (
        f"module {inner.name!r} ({type(inner.module).__name__})"
        if inner.name
        else (f"the model's own forward ({type(inner.module).__name__})")
    )
    callers = [
        f"{f.name!r} ({type(f.module).__name__})"
        if f.name
        else f"the model ({type(f.module).__name__})"
        for f in reversed(frames[:-1])
    ]
    line = f"{NOTE_PREFIX} the error was raised inside {where}"
    if callers:
        line += (
            ", called from " + " <- ".join(callers[:4]) + (" <- ..." if len(callers) > 4 else "")
        )
    if context:
        line += f", during {context}"
    lines = [line + "."]
    lines.append(f"  inputs:     {describe_inputs(inner.args, inner.kwargs)}")
    lines.append(f"  parameters: {describe_parameters(inner.module)}")
    hint = shape_hint(inner.module, inner.args, inner.kwargs, str(exc), inner.name)
    if hint:
        lines.append(f"  hint: {hint}")
    if inner.from_traceback:
        lines.append(
            "  (found from the traceback: the inputs are the forward's arguments at the time of the error)"
        )
    return "\n".join(lines)


def shape_hint(
    module: nn.Module,
    args: Sequence[Any],
    kwargs: Mapping[str, Any] | None,
    message: str,
    name: str = "",
) -> str:
    """One line on the likely cause of an error raised in ``module``'s forward, or ``""``.

    >>> shape_hint(nn.Linear(288, 10), (torch.zeros(4, 8, 6, 6),), {}, "mat1 and mat2 shapes cannot be multiplied", "fc")[:42]
    'missing flatten: the input is 4-D (4, 8, 6'
    """
    tensors = [t for _, t in iter_tensors(list(args))] + [
        t for _, t in iter_tensors(dict(kwargs or {}))
    ]
    x = tensors[0] if tensors else None
    msg = message.lower()
    label = f"{name!r}" if name else "this module"
    if (
        isinstance(module, nn.Linear)
        and x is not None
        and x.ndim >= 1
        and x.shape[-1] != module.in_features
    ):
        flat = math.prod(x.shape[1:]) if x.ndim > 1 else x.shape[-1]
        if x.ndim > 2 and flat == module.in_features:
            return (
                f"missing flatten: the input is {x.ndim}-D {tuple(x.shape)} and Linear acts on its last "
                f"dimension ({x.shape[-1]}), but in_features={module.in_features} = the product of "
                f"the non-batch dimensions: add nn.Flatten() before {label} (or x.flatten(1))"
            )
        if x.ndim > 2:
            return (
                f"Linear acts on the last dimension ({x.shape[-1]}) of the {x.ndim}-D input "
                f"{tuple(x.shape)}, but in_features={module.in_features}: if the layer before is a "
                f"convolution or pooling, flatten first (in_features would then be {flat}); "
                f"otherwise set in_features={x.shape[-1]} (or use nn.LazyLinear)"
            )
        return (
            f"wrong in_features: {label} has in_features={module.in_features} but its input has "
            f"{x.shape[-1]} features: set in_features={x.shape[-1]} (or use nn.LazyLinear, which infers it)"
        )
    if isinstance(module, nn.modules.conv._ConvNd) and x is not None:
        spatial = len(module.kernel_size)
        if x.ndim not in (spatial + 1, spatial + 2):
            return (
                f"{type(module).__name__} expects (N, C, {_SPATIAL.get(spatial, '...')}) "
                f"({spatial + 2}-D, or {spatial + 1}-D without batch) but the input is {x.ndim}-D "
                f"{tuple(x.shape)}: a missing unsqueeze/reshape, or a flatten too early"
            )
        channels = x.shape[1] if x.ndim == spatial + 2 else x.shape[0]
        if channels != module.in_channels:
            return (
                f"wrong in_channels: {label} has in_channels={module.in_channels} but the input has "
                f"{channels} channels at dimension {1 if x.ndim == spatial + 2 else 0}; set "
                f"in_channels={channels}, or if the data is channels-last (N, H, W, C) permute it to (N, C, H, W)"
            )
    if (
        isinstance(module, nn.modules.batchnorm._BatchNorm)
        and x is not None
        and x.ndim >= 2
        and x.shape[1] != module.num_features
    ):
        return (
            f"wrong num_features: {label} has num_features={module.num_features} but the input has "
            f"{x.shape[1]} channels/features at dimension 1; set num_features={x.shape[1]}"
        )
    if isinstance(module, nn.LayerNorm) and x is not None:
        shape = tuple(module.normalized_shape)
        if tuple(x.shape[-len(shape) :]) != shape:
            return (
                f"normalized_shape={shape} must equal the input's last dimensions, but the input is "
                f"{tuple(x.shape)}: set normalized_shape={tuple(x.shape[-len(shape) :])}"
            )
    if (
        isinstance(module, nn.Embedding)
        and x is not None
        and "index" in msg
        and "range" in msg
        and not x.is_floating_point()
        and x.numel()
    ):
        low, high = int(x.min()), int(x.max())
        return (
            f"{label} has num_embeddings={module.num_embeddings} (valid indices 0..{module.num_embeddings - 1}) "
            f"but the input holds indices {low}..{high}: enlarge num_embeddings or fix the vocabulary/tokeniser"
        )
    if isinstance(module, nn.Embedding) and x is not None and x.is_floating_point():
        return "Embedding takes integer indices but the input is floating point: pass token ids (torch.long)"
    if re.search(r"dtype|scalar type|expected .* but found", msg):
        inputs = sorted(
            {str(t.dtype).replace("torch.", "") for t in tensors if t.is_floating_point()}
        )
        params = sorted({str(p.dtype).replace("torch.", "") for p in module.parameters()})
        if inputs and params and inputs != params:
            return (
                f"dtype mismatch: the inputs are {', '.join(inputs)} but the parameters are "
                f"{', '.join(params)}: cast the batch (e.g. x.float()) or the model (model.to(dtype))"
            )
        return "dtype mismatch inside this module's forward: compare the dtypes above"
    if "same device" in msg or ("device" in msg and "expected" in msg):
        return "device mismatch: move the batch and the model to the same device (Lightning does this for tensors in the batch; tensors created in forward need device=x.device)"
    if "must match the size of tensor" in msg:
        return "two tensors inside this module's forward cannot be broadcast together: compare the input shapes above with what its forward expects"
    if "mat1 and mat2" in msg or "shapes cannot be multiplied" in msg:
        return "a matrix product inside this module's forward got incompatible shapes: a missing flatten or transpose, or a wrong in_features"
    if "invalid for input of size" in msg:
        return (
            "a view/reshape in this module's forward does not fit the input's size: a hard-coded "
            "batch or feature size? Use x.flatten(1) or x.view(x.size(0), -1)"
        )
    return ""


# ---------------------------------------------------------------------------------------------
# The shape trace of one batch
# ---------------------------------------------------------------------------------------------


@dataclass
class TraceRow:
    """One module call of the traced batch."""

    order: int
    name: str
    type: str
    depth: int
    inputs: str
    outputs: str = "(did not return)"
    parameters: str = ""
    calls: int = 1


class ShapeTrace:
    """Every module's input and output shapes during one batch, in call order.

    A module called several times is listed once, at its first call, with the number of calls.

    Example:
        >>> net = nn.Sequential(nn.Linear(3, 2), nn.ReLU())
        >>> trace, stack = ShapeTrace(), ModuleStack()
        >>> stack.trace = trace
        >>> with stack.attach(dict(net.named_modules())):
        ...     _ = net(torch.zeros(4, 3))
        >>> [(r.name, r.outputs) for r in trace.rows]
        [('(model)', '(4, 2) float32'), ('0', '(4, 2) float32'), ('1', '(4, 2) float32')]
    """

    def __init__(self) -> None:
        self.rows: list[TraceRow] = []
        self._by_name: dict[str, TraceRow] = {}

    def enter(
        self,
        name: str,
        module: nn.Module,
        args: tuple[Any, ...],
        kwargs: Mapping[str, Any],
        depth: int,
    ) -> None:
        row = self._by_name.get(name)
        if row is not None:
            row.calls += 1
            return
        own = sum(p.numel() for p in module.parameters(recurse=False))
        row = TraceRow(
            len(self.rows),
            name or "(model)",
            type(module).__name__,
            depth,
            describe_inputs(args, kwargs),
            parameters=f"{own:,}" if own else "",
        )
        self.rows.append(row)
        self._by_name[name] = row

    def leave(self, name: str, output: Any) -> None:
        row = self._by_name.get(name)
        if row is not None and row.calls == 1:
            row.outputs = (
                describe_values(output) if _holds_tensor(output) else type(output).__name__
            )

    def to_markdown(self, title: str = "Shape trace") -> str:
        """The trace as a markdown table (names indented by nesting depth)."""
        lines = [
            f"**{title}**: {len(self.rows)} modules, in call order",
            "",
            "| # | module | type | input shapes | output shapes | own parameters | calls |",
            "|---:|---|---|---|---|---:|---:|",
        ]
        for r in self.rows:
            name = "&nbsp;" * 2 * r.depth + r.name
            lines.append(
                f"| {r.order} | {name} | {r.type} | {r.inputs} | {r.outputs} | {r.parameters} | {r.calls} |"
            )
        return "\n".join(lines)

    def to_rich_table(self, title: str = "Shape trace") -> Any:
        """The trace as a ``rich.table.Table``."""
        from rich.table import Table

        table = Table(title=title, title_justify="left")
        for column in (
            "#",
            "module",
            "type",
            "input shapes",
            "output shapes",
            "own params",
            "calls",
        ):
            table.add_column(column, overflow="fold")
        for r in self.rows:
            style = "bold red" if r.outputs == "(did not return)" else None
            table.add_row(
                str(r.order),
                "  " * r.depth + r.name,
                r.type,
                r.inputs,
                r.outputs,
                r.parameters,
                str(r.calls),
                style=style,
            )
        return table


# ---------------------------------------------------------------------------------------------
# Model summary
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BlockSummary:
    """One block of the model: its layers and parameters."""

    name: str
    type: str
    layers: int
    layer_types: str
    parameters: int
    trainable: int

    @property
    def frozen(self) -> int:
        """Parameters that do not require grad."""
        return self.parameters - self.trainable


@dataclass(frozen=True)
class ModelSummary:
    """The model's blocks (its ``named_children``) with layer and parameter counts.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 3), nn.ReLU())
        >>> s = model_summary(net)
        >>> [(b.name, b.layers, b.parameters) for b in s.blocks], s.parameters
        ([('0', 1, 9), ('1', 1, 0)], 9)
    """

    model_type: str
    blocks: tuple[BlockSummary, ...]
    parameters: int
    trainable: int
    layers: int
    prefix: str = ""

    def to_markdown(self) -> str:
        """The summary as a markdown table."""
        frozen = self.parameters - self.trainable
        within = f" (blocks of {self.prefix!r})" if self.prefix else ""
        lines = [
            f"**{self.model_type}**{within}: {self.parameters:,} parameters ({self.trainable:,} trainable, "
            f"{frozen:,} frozen) in {self.layers} layers",
            "",
            "| block | type | layers | parameters | trainable | frozen |",
            "|---|---|---|---:|---:|---:|",
        ]
        for b in self.blocks:
            lines.append(
                f"| {b.name} | {b.type} | {b.layers} ({b.layer_types}) | {b.parameters:,} | {b.trainable:,} | {b.frozen:,} |"
            )
        return "\n".join(lines)

    def to_rich_table(self) -> Any:
        """The summary as a ``rich.table.Table``."""
        from rich.table import Table

        frozen = self.parameters - self.trainable
        table = Table(
            title=f"{self.model_type}: {self.parameters:,} parameters ({self.trainable:,} trainable, {frozen:,} frozen)",
            title_justify="left",
        )
        for column, justify in (
            ("block", "left"),
            ("type", "left"),
            ("layers", "left"),
            ("parameters", "right"),
            ("trainable", "right"),
            ("frozen", "right"),
        ):
            table.add_column(column, justify=justify, overflow="fold")  # type: ignore[arg-type]
        for b in self.blocks:
            table.add_row(
                b.name,
                b.type,
                f"{b.layers} ({b.layer_types})",
                f"{b.parameters:,}",
                f"{b.trainable:,}",
                f"{b.frozen:,}",
            )
        return table


def model_summary(model: nn.Module) -> ModelSummary:
    """Summarise ``model`` by blocks: its direct children (descending through a lone child, as
    in ``self.model = nn.Sequential(...)``), each with its layer count (leaf modules, by type)
    and parameter counts. Parameters the model holds directly form a block ``(own)``; a
    parameter shared by several blocks counts once in the totals.
    """
    from lightning_inspect.core.selection import normalise_name

    root, prefix = model, ""
    children = list(root.named_children())
    while (
        len(children) == 1
        and list(children[0][1].children())
        and not any(True for _ in root.parameters(recurse=False))
    ):
        prefix = f"{prefix}.{children[0][0]}" if prefix else children[0][0]
        root = children[0][1]
        children = list(root.named_children())
    blocks = []
    for name, block in children:
        params = list({id(p): p for p in block.parameters()}.values())
        leaves = [m for m in block.modules() if not list(m.children())]
        counts: dict[str, int] = {}
        for m in leaves:
            counts[type(m).__name__] = counts.get(type(m).__name__, 0) + 1
        blocks.append(
            BlockSummary(
                normalise_name(f"{prefix}.{name}" if prefix else name),
                type(block).__name__,
                len(leaves),
                ", ".join(f"{n} {t}" for t, n in counts.items()),
                sum(p.numel() for p in params),
                sum(p.numel() for p in params if p.requires_grad),
            )
        )
    own = list(root.parameters(recurse=False))
    if own:
        blocks.append(
            BlockSummary(
                "(own)",
                type(root).__name__,
                0,
                "parameters held directly",
                sum(p.numel() for p in own),
                sum(p.numel() for p in own if p.requires_grad),
            )
        )
    every = list({id(p): p for p in model.parameters()}.values())
    return ModelSummary(
        type(model).__name__,
        tuple(blocks),
        sum(p.numel() for p in every),
        sum(p.numel() for p in every if p.requires_grad),
        sum(1 for m in model.modules() if not list(m.children())),
        normalise_name(prefix),
    )

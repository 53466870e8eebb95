"""Where a forward pass failed and why: the stack of modules inside their forward, notes, hints.

Example:
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
from typing import Any

import torch
from torch import nn

from lightning_inspect.core import model_table as mt
from lightning_inspect.core.outputs import iter_tensors

NOTE_PREFIX = "lightning-inspect:"
#: How the note that names the failing module begins (``has_note`` looks for it).
ERROR_NOTE = f"{NOTE_PREFIX} the error was raised inside"
_SPATIAL = {1: "L", 2: "H, W", 3: "D, H, W"}


@dataclass
class ModuleFrame:
    """A module inside its forward, with what it was called with."""

    name: str
    module: nn.Module
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    from_traceback: bool = False


class ModuleStack:
    """Modules inside their forward, outermost first (one that raised stays until cleared);
    ``trace`` sees every call too."""

    _recording = True

    def __init__(self) -> None:
        self._frames: list[ModuleFrame] = []
        self.trace: mt.ModelTable | None = None

    def attach(self, modules: Mapping[str, nn.Module]) -> mt.hooks.HookSet:
        return mt.hook_modules(self, modules)

    def _on_input(self, name: str, module: nn.Module, args: Any, kwargs: Any) -> None:
        self._frames.append(ModuleFrame(name, module, args, kwargs))
        if self.trace is not None:
            self.trace._on_input(name, module, args, kwargs)

    def _on_output(self, name: str, path: str, tensor: torch.Tensor) -> None:
        names = [f.name for f in self._frames]
        if name in names:  # it returned: drop it and any stale frame above it
            del self._frames[len(names) - 1 - names[::-1].index(name) :]
        if self.trace is not None:
            self.trace._on_output(name, path, tensor)

    def _hook_fault(self, where: str, exc: BaseException) -> None:
        warnings.warn(f"ShapeTracer: could not follow {where}: {exc!r}", RuntimeWarning, 2)

    def frames(self) -> list[ModuleFrame]:
        return list(self._frames)

    def clear(self) -> None:
        self._frames.clear()


def model_summary(model: nn.Module) -> mt.ModelTable:
    """The model's blocks with layer and parameter counts (the model table at depth 1)."""
    return mt.ModelTable(model, depth=1)


def locate_in_traceback(exc: BaseException, modules: Mapping[str, nn.Module]) -> list[ModuleFrame]:
    """The ``modules`` whose ``forward`` frames are in ``exc``'s traceback, outermost first
    (arguments: the frame's local variables at the time of the error)."""
    by_id, out, tb = {id(m): n for n, m in modules.items()}, [], exc.__traceback__
    while tb is not None:
        frame, code = tb.tb_frame, tb.tb_frame.f_code
        owner = frame.f_locals.get("self") if code.co_name == "forward" else None
        if owner is not None and id(owner) in by_id:
            args = tuple(frame.f_locals[n] for n in code.co_varnames[1 : code.co_argcount])
            out.append(ModuleFrame(by_id[id(owner)], owner, args, {}, from_traceback=True))
        tb = tb.tb_next
    return out


def attach_note(exc: BaseException, note: str) -> None:
    """Add ``note`` under ``exc``'s traceback (Python 3.10: log and warn it instead)."""
    if hasattr(exc, "add_note"):
        exc.add_note(note)
    else:  # pragma: no cover - Python 3.10
        logging.getLogger("lightning_inspect").error(note)
        warnings.warn(note, RuntimeWarning, stacklevel=3)


def has_note(exc: BaseException, marker: str = NOTE_PREFIX) -> bool:
    """Whether ``exc`` already carries a note of this library starting with ``marker``."""
    return any(str(n).startswith(marker) for n in getattr(exc, "__notes__", ()))


def error_note(frames: Sequence[ModuleFrame], exc: BaseException, context: str = "") -> str:
    """The note for an exception raised inside ``frames[-1]``'s forward (``frames``: outermost
    first, from :class:`ModuleStack` or :func:`locate_in_traceback`); ``context``: when."""
    inner, kinds = frames[-1], [type(f.module).__name__ for f in frames]
    names = [
        f"{f.name!r} ({k})" if f.name else f"the model ({k})"
        for f, k in zip(frames, kinds, strict=True)
    ]
    where = f"module {names[-1]}" if inner.name else f"the model's own forward ({kinds[-1]})"
    line = f"{ERROR_NOTE} {where}"
    if len(frames) > 1:
        line += ", called from " + " <- ".join(names[-2::-1][:4]) + " <- ..." * (len(frames) > 5)
    hint = shape_hint(inner.module, inner.args, inner.kwargs, str(exc), inner.name)
    params = inner.module.named_parameters(recurse=False)  # e.g. weight (10, 288) float32
    own = [f"{n} {mt.describe_tensor(p)}" + " (frozen)" * (not p.requires_grad) for n, p in params]
    total = sum(p.numel() for p in inner.module.parameters())
    own = own or [f"none of its own ({total:,} in its submodules)" if total else "none"]
    lines = [line + f", during {context}" * bool(context) + "."]
    lines.append(f"  inputs:     {mt.describe_inputs(inner.args, inner.kwargs)}")
    lines += [f"  parameters: {', '.join(own)}"] + [f"  hint: {hint}"] * bool(hint)
    if inner.from_traceback:
        lines.append(
            "  (found from the traceback: the inputs are the forward's arguments at the time of the error)"
        )
    return "\n".join(lines)


def shape_hint(module: nn.Module, args: Sequence, kwargs: Any, message: str, name: str = "") -> str:
    """One line on the likely cause of an error raised in ``module``'s forward, or ``""``.

    >>> shape_hint(nn.Linear(288, 10), (torch.zeros(4, 8, 6, 6),), {}, "mat1 and mat2", "fc")[:42]
    'missing flatten: the input is 4-D (4, 8, 6'
    """
    tensors = [t for _, t in iter_tensors([list(args), dict(kwargs or {})])]
    msg, label = message.lower(), f"{name!r}" if name else "this module"
    if tensors:
        x, m = tensors[0], module
        shape, n, kind = tuple(x.shape), x.ndim, type(module).__name__
        if isinstance(m, nn.Linear) and n and shape[-1] != m.in_features:
            flat = math.prod(shape[1:]) if n > 1 else shape[-1]
            if n > 2 and flat == m.in_features:
                return f"missing flatten: the input is {n}-D {shape} and Linear acts on its last dimension ({shape[-1]}), but in_features={m.in_features} = the product of the non-batch dimensions: add nn.Flatten() before {label} (or x.flatten(1))"
            if n > 2:
                return f"Linear acts on the last dimension ({shape[-1]}) of the {n}-D input {shape}, but in_features={m.in_features}: if the layer before is a convolution or pooling, flatten first (in_features would then be {flat}); otherwise set in_features={shape[-1]} (or use nn.LazyLinear)"
            return f"wrong in_features: {label} has in_features={m.in_features} but its input has {shape[-1]} features: set in_features={shape[-1]} (or use nn.LazyLinear, which infers it)"
        k = len(getattr(m, "kernel_size", ())) if isinstance(m, nn.modules.conv._ConvNd) else 0
        if k and n not in (k + 1, k + 2):
            return f"{kind} expects (N, C, {_SPATIAL.get(k, '...')}) ({k + 2}-D, or {k + 1}-D without batch) but the input is {n}-D {shape}: a missing unsqueeze/reshape, or a flatten too early"
        if k and shape[int(n == k + 2)] != m.in_channels:
            c, dim = shape[int(n == k + 2)], int(n == k + 2)
            return f"wrong in_channels: {label} has in_channels={m.in_channels} but the input has {c} channels at dimension {dim}; set in_channels={c}, or if the data is channels-last (N, H, W, C) permute it to (N, C, H, W)"
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and n >= 2 and shape[1] != m.num_features:
            return f"wrong num_features: {label} has num_features={m.num_features} but the input has {shape[1]} channels/features at dimension 1; set num_features={shape[1]}"
        norm = tuple(m.normalized_shape) if isinstance(m, nn.LayerNorm) else ()
        if norm and shape[-len(norm) :] != norm:
            return f"normalized_shape={norm} must equal the input's last dimensions, but the input is {shape}: set normalized_shape={shape[-len(norm) :]}"
        if isinstance(m, nn.Embedding) and x.is_floating_point():
            return "Embedding takes integer indices but the input is floating point: pass token ids (torch.long)"
        if isinstance(m, nn.Embedding) and "index" in msg and "range" in msg and x.numel():
            return f"{label} has num_embeddings={m.num_embeddings} (valid indices 0..{m.num_embeddings - 1}) but the input holds indices {int(x.min())}..{int(x.max())}: enlarge num_embeddings or fix the vocabulary/tokeniser"
    if re.search(r"dtype|scalar type|expected .* but found", msg):
        inputs = sorted({str(t.dtype)[6:] for t in tensors if t.is_floating_point()})
        params = sorted({str(p.dtype)[6:] for p in module.parameters()})
        if inputs and params and inputs != params:
            return f"dtype mismatch: the inputs are {', '.join(inputs)} but the parameters are {', '.join(params)}: cast the batch (e.g. x.float()) or the model (model.to(dtype))"
        return "dtype mismatch inside this module's forward: compare the dtypes above"
    if "same device" in msg or ("device" in msg and "expected" in msg):
        return "device mismatch: move the batch and the model to the same device (Lightning does this for tensors in the batch; tensors created in forward need device=x.device)"
    if "must match the size of tensor" in msg:
        return "two tensors inside this module's forward cannot be broadcast together: compare the input shapes above with what its forward expects"
    if "mat1 and mat2" in msg or "shapes cannot be multiplied" in msg:
        return "a matrix product inside this module's forward got incompatible shapes: a missing flatten or transpose, or a wrong in_features"
    if "invalid for input of size" in msg:
        return "a view/reshape in this module's forward does not fit the input's size: a hard-coded batch or feature size? Use x.flatten(1) or x.view(x.size(0), -1)"
    return ""

"""The first module, in execution order, whose forward or backward made a NaN/Inf."""

from __future__ import annotations

import contextlib
import math
import sys
import warnings
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from lightning_inspect._validation import check_choice
from lightning_inspect.core.hooks import HookSet, OutputGradHook, OutputHook
from lightning_inspect.core.outputs import iter_tensors
from lightning_inspect.core.row import Field
from lightning_inspect.core.stats import reduce_tensor, summarise
from lightning_inspect.errors import NonFiniteError
from lightning_inspect.health.rules import Finding, format_value

NONFINITE_ACTIONS = ("ignore", "warn", "raise", "debug")  # at the first non-finite value
CHECK_MODES = ("auto", "module", "step")  # "auto": "module" on the CPU, "step" elsewhere
MAX_INPUTS = 4  # inputs of a module described in a report
_INPUT_STATS = ("min", "max", "mean", "std", "nan_count", "inf_count")
_HINTS = {
    "parameters": "its parameters are already non-finite: an earlier optimizer step wrote NaN/Inf "
    "into them; check the previous steps' gradients, lower the learning rate or clip gradients",
    "batch": "the batch already holds NaN/Inf: check the data and its preprocessing",
    "inputs": "its inputs were already non-finite, made by code outside the watched modules "
    "(functional calls in a parent's forward): widen `modules` to find it",
    "forward": "this module turned finite inputs into NaN/Inf: look for log/sqrt/pow of values "
    "<= 0, division by ~0, exp overflow, or float16 overflow; add an eps/clamp, use "
    "log_softmax/logsumexp, or lower the learning rate",
    "loss": "every watched module output was finite but the loss is not: check the loss "
    "function's inputs (log of 0, targets out of range, a division by the batch size 0)",
    "backward": "its backward turned finite gradients into NaN/Inf: typical causes are sqrt/log/"
    "pow/division near 0 (finite forward, infinite derivative); add an eps or clamp, or clip "
    "gradients",
    "parameter gradient": "this parameter's gradient is non-finite while the gradients reaching "
    "the module were finite: check custom autograd code, or clip gradients",
    "arriving": "the gradient arriving at this module's output is already non-finite: it was "
    "made by the loss or by code between this module and the loss (not by a watched module)",
}


class FirstNonFiniteError(NonFiniteError):
    """The first NaN/Inf of a step was found; ``origin`` says where (fit stops cleanly)."""

    def __init__(self, origin: NonFiniteOrigin) -> None:
        super().__init__(origin.message())
        self.origin = origin


def _counts(nan: int, inf: int, numel: int | None = None) -> str:
    return f"{nan} NaN, {inf} Inf" + ("" if numel is None else f" of {numel}")


def _row_counts(row: torch.Tensor) -> tuple[int, ...]:  # nan, inf, numel
    return tuple(row.detach().cpu()[[Field.NAN, Field.INF, Field.COUNT]].long().tolist())


@dataclass(frozen=True)
class TensorSummary:
    """Shape, dtype and statistics of one tensor, for reports."""

    label: str
    shape: tuple[int, ...]
    dtype: str
    stats: Mapping[str, float]

    def describe(self) -> str:
        """``input 0: (4, 8) float32, min -1, max 2, mean 0.1, std 0.7, 0 NaN, 0 Inf``."""
        s = self.stats
        parts = [f"{self.label}: {self.shape} {self.dtype}".rstrip()]
        parts += [f"{k} {format_value(s[k])}" for k in ("min", "max", "mean", "std") if k in s]
        return ", ".join([*parts, _counts(int(s["nan_count"]), int(s["inf_count"]))])


@dataclass(frozen=True)
class NonFiniteOrigin:
    """Where the first NaN/Inf of a step came from (``module`` ``""``: the loss); in backward,
    ``inputs`` are the gradients reaching the module's outputs."""

    step: int
    phase: str
    module: str
    module_type: str
    tensor: str
    nan: int
    inf: int
    numel: int
    inputs: tuple[TensorSummary, ...] = ()
    parameters: tuple[str, ...] = ()
    hint: str = ""
    batch_idx: int = -1
    check: str = "module"

    def message(self) -> str:
        batch = f", batch {self.batch_idx}" if self.batch_idx >= 0 else ""
        module = f"module {self.module!r} ({self.module_type})"
        where = f"{self.phase}, {module}, {self.tensor}" if self.module else self.tensor
        heading = "incoming gradients" if self.phase == "backward" else "inputs"
        lines = [
            f"first non-finite value at step {self.step}{batch}: {where}: "
            f"{_counts(self.nan, self.inf, self.numel)} values.",
            *(f"  {heading} - {summary.describe()}" for summary in self.inputs),
            *(f"  non-finite parameter - {text}" for text in self.parameters),
        ]
        return "\n".join(lines + ([f"  hint: {self.hint}"] if self.hint else []))

    def to_finding(self, depth: int = -1) -> Finding:
        """The origin as a report entry (rule ``nonfinite``, an error)."""
        hint = f"first NaN/Inf of the run here ({_counts(self.nan, self.inf, self.numel)}); "
        return Finding(
            "nonfinite", "error", self.module or "(loss)", f"{self.phase}: {self.tensor}",
            float(self.nan + self.inf), self.step, hint + self.hint, math.nan, depth,
        )  # fmt: skip


@dataclass
class _Site:  # a tensor that crossed a module boundary in the forward pass (its gradient is watched)
    ref: weakref.ref[torch.Tensor]
    producer: str | None = None
    path: str = ""
    consumers: list[tuple[str, str]] = field(default_factory=list)  # (module, input), outer first
    grad_row: torch.Tensor | None = None
    grad_shape: tuple[int, ...] = ()


@dataclass
class _Event:  # one tensor to test: an output, the loss, a boundary or a parameter gradient
    phase: str
    module: str
    tensor: str
    row: torch.Tensor
    inputs: list[tuple[str, tuple[int, ...], str, torch.Tensor]] = field(default_factory=list)
    site: _Site | None = None


class NonFiniteLocator:
    """Find the first module that makes a NaN/Inf, then ``action`` (``"warn"``, ``"raise"``,
    ``"debug"``). Call :meth:`start` per batch, :meth:`loss`, then :meth:`check`.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.Tanh(), nn.Linear(2, 1))
        >>> locator = NonFiniteLocator(action="raise")
        >>> with locator.attach(dict(net.named_children())), torch.no_grad():
        ...     _ = net[0].weight.fill_(3e38)
        ...     try:
        ...         net(torch.ones(1, 2))
        ...     except FirstNonFiniteError as err:
        ...         print(err.origin.module, err.origin.phase, err.origin.inf)
        0 forward 2
    """

    _recording = True  # as a hook consumer of its own (attach), it always records

    def __init__(
        self, action: str = "warn", check: str = "auto", owner: str = "HealthMonitor",
        on_origin: Callable[[NonFiniteOrigin], None] | None = None,
    ) -> None:  # fmt: skip
        self.action = check_choice(owner, "on_nonfinite", action, NONFINITE_ACTIONS[1:])
        check = check_choice(owner, "nonfinite_check", check, CHECK_MODES)
        self.check_mode = "module" if self.action == "debug" else check  # debug: at the module
        self.owner, self.on_origin = owner, on_origin
        self.origins: list[NonFiniteOrigin] = []
        self.step, self.batch_idx = 0, -1
        self.gradients_may_overflow = False  # a GradScaler's overflow: gradients wait for check()
        self._modules: dict[str, nn.Module] = {}
        self._first_module: str | None = None
        self._hit_step: int | None = None
        self._warned: set[str] = set()
        self.release()

    def watch(self, modules: Mapping[str, nn.Module], device: torch.device | str) -> None:
        """The modules reports may name; ``"auto"`` checks per module on the CPU, else per step."""
        self._modules = dict(modules)
        if self.check_mode == "auto":
            self.check_mode = "module" if torch.device(device).type == "cpu" else "step"

    def attach(self, modules: Mapping[str, nn.Module]) -> HookSet:
        """Watch ``modules`` with hooks of this locator's own; returns them (a context manager)."""
        first = next((p for m in modules.values() for p in m.parameters()), None)
        self.watch(modules, first.device if first is not None else "cpu")
        self.start(self.step, self.batch_idx)
        handles = HookSet()
        for name, module in modules.items():
            handles.add(module.register_forward_hook(OutputHook(self, name), with_kwargs=True))
        return handles

    def start(self, step: int, batch_idx: int = -1) -> None:
        """A new training batch begins (a new micro-batch of the same step keeps pending checks)."""
        events = self._events if step == self.step else []
        self.release()
        self.step, self.batch_idx, self._events = step, batch_idx, events

    def release(self) -> None:
        """Forget the current batch (its tensors and pending checks), e.g. when fit ends."""
        self._events: list[_Event] = []
        self._sites: dict[int, _Site] = {}
        self._site_list: list[_Site] = []
        self._outputs_of: dict[str, list[_Site]] = {}
        self._last_module: str | None = None

    @property
    def hit_this_step(self) -> bool:  # later values are the origin's consequences
        return self._hit_step == self.step

    def _on_forward(self, name: str, module: nn.Module, args: Any, kwargs: Any, out: Any) -> None:
        self._first_module = name if self._first_module is None else self._first_module
        self._last_module = name
        if self.hit_this_step:
            return
        found = [*iter_tensors(list(args)), *(iter_tensors(dict(kwargs)) if kwargs else ())]
        inputs = [(_label("input", path), t) for path, t in found if _checkable(t)]
        for label, tensor in inputs if torch.is_grad_enabled() else ():
            if tensor.requires_grad:
                _add_consumer(self._site(tensor).consumers, name, label)
        rows: list[tuple[str, tuple[int, ...], str, torch.Tensor]] | None = None
        for path, tensor in iter_tensors(out):
            if self.hit_this_step or not _checkable(tensor):
                continue
            if torch.is_grad_enabled() and tensor.requires_grad:
                site = self._site(tensor)
                if site.producer is None:
                    site.producer, site.path = name, path
                self._outputs_of.setdefault(name, []).append(site)
            now = self.check_mode == "module"
            if now and bool(torch.isfinite(stored_values(tensor)).all()):
                continue
            rows = rows or [
                (lb, tuple(t.shape), str(t.dtype), reduce_tensor(t, 0)) for lb, t in inputs
            ]
            event = _Event("forward", name, _label("output", path), reduce_tensor(tensor, 0), rows)
            self._test(event, now, module=module, inputs=inputs, output=tensor)

    def _on_output_grad(self, key: str, grad: torch.Tensor) -> None:
        index = int(key)
        if self.hit_this_step or index >= len(self._site_list) or not _checkable(grad):
            return
        site = self._site_list[index]
        site.grad_row, site.grad_shape = reduce_tensor(grad, 0), tuple(grad.shape)
        event = _Event("backward", "", str(site.grad_shape), site.grad_row, site=site)
        now = self.check_mode == "module" and not self.gradients_may_overflow
        self._test(event, now, gradient=grad)

    def _hook_fault(self, where: str, exc: BaseException) -> None:
        message = f"{self.owner}: checking {where} failed ({type(exc).__name__}: {exc})."
        warnings.warn(message, RuntimeWarning, stacklevel=2)

    def _site(self, tensor: torch.Tensor) -> _Site:
        site = self._sites.get(id(tensor))
        if site is None or site.ref() is not tensor:
            site = self._sites[id(tensor)] = _Site(weakref.ref(tensor))
            tensor.register_hook(OutputGradHook(self, str(len(self._site_list))))
            self._site_list.append(site)
        return site

    def _test(self, event: _Event, now: bool, **context: Any) -> None:
        if not now:
            self._events.append(event)  # for check(), in one transfer
        elif bool(event.row[Field.NAN] + event.row[Field.INF] > 0):
            self._act(self._origin(event), **context)

    def loss(self, loss: torch.Tensor) -> None:
        """Check the loss before backward (a NaN made by the loss function, not by a module)."""
        if not self.hit_this_step and isinstance(loss, torch.Tensor) and _checkable(loss):
            event = _Event("loss", "", f"the loss {tuple(loss.shape)}", reduce_tensor(loss, 0))
            self._test(event, self.check_mode == "module", output=loss)

    def check(
        self, parameters: Mapping[str, Sequence[tuple[str, nn.Parameter]]] | None = None,
        gradients_overflowed: bool = False,
    ) -> NonFiniteOrigin | None:  # fmt: skip
        """After backward: test what is pending and ``parameters`` (``{module: [(name, param)]}``
        in execution order) in one transfer; ``gradients_overflowed``: a GradScaler skips them."""
        events, self._events = self._events, []
        if self.hit_this_step:
            return None
        if gradients_overflowed:
            events, parameters = [e for e in events if e.phase != "backward"], None
        grads = [
            (module, pname, stored_values(p.grad))
            for module, params in (parameters or {}).items()
            for pname, p in params
            if p.grad is not None and _checkable(p.grad)
        ]
        flags = [e.row[Field.NAN] + e.row[Field.INF] for e in events]
        flags += [torch.logical_not(torch.isfinite(g).all()).double() for _, _, g in grads]
        host = torch.stack([f.to(flags[0].device, torch.float64) for f in flags]) if flags else None
        bad = [] if host is None else torch.nonzero(host.cpu() > 0).flatten().tolist()
        if not bad:
            return None
        if bad[0] < len(events):
            event = events[bad[0]]
        else:  # backward runs in reverse: the last module with a bad parameter gradient made it
            module, pname, grad = grads[bad[-1] - len(events)]
            label = f"{pname}.grad {tuple(grad.shape)}"
            event = _Event("parameter gradient", module, label, reduce_tensor(grad, 0))
        return self._act(self._origin(event))

    def _origin(self, event: _Event) -> NonFiniteOrigin:
        phase, name, label, site = event.phase, event.module, event.tensor, event.site
        inputs = tuple(_summary(*row) for row in event.inputs[:MAX_INPUTS])
        if site is not None and site.consumers:  # backward: blame the innermost consumer
            name, input_label = site.consumers[-1]
            label = f"gradient w.r.t. {input_label} {label}"
            inputs = tuple(
                _summary(f"gradient w.r.t. {_label('output', s.path)}", s.grad_shape, "", row)
                for s in self._outputs_of.get(name, [])[:MAX_INPUTS]
                if (row := s.grad_row) is not None
            )
        elif site is not None:
            name = site.producer or "?"
            label = f"gradient arriving at its {_label('output', site.path)} {label}"
        module = self._modules.get(name) if phase != "loss" else None
        params = tuple(
            f"{pname}: {_counts(*_row_counts(reduce_tensor(p, 0)))}"
            for pname, p in (module.named_parameters(recurse=False) if module is not None else ())
            if _checkable(p) and not bool(torch.isfinite(p).all())
        )
        finite = all(s.stats["nan_count"] + s.stats["inf_count"] == 0 for s in inputs)
        if params:
            hint = _HINTS["parameters"]
        elif phase == "forward" and not finite:
            hint = _HINTS["batch" if name == self._first_module else "inputs"]
        else:
            hint = _HINTS[phase]
        if phase == "loss" and self._last_module is not None:
            hint += f" (the last watched module was {self._last_module!r})"
        elif site is not None and not site.consumers:
            hint = _HINTS["arriving"]
        elif phase == "backward" and not finite:
            hint = "the gradient reaching this module's output was already non-finite: " + hint
        if phase == "forward" and getattr(module, "inplace", False):
            inputs = tuple(replace(s, label=s.label + " (after the in-place op)") for s in inputs)
        kind = "loss" if phase == "loss" else type(module).__name__ if module is not None else "?"
        return NonFiniteOrigin(
            self.step, phase, name, kind, label, *_row_counts(event.row), inputs, params, hint,
            self.batch_idx, self.check_mode,
        )  # fmt: skip

    def _act(
        self, origin: NonFiniteOrigin, module: Any = None, inputs: Any = None, output: Any = None,
        gradient: Any = None,
    ) -> NonFiniteOrigin:  # fmt: skip
        """Report ``origin`` (warn: return it); ``module``... ``gradient``: for the debugger."""
        self._hit_step, self._events = self.step, []
        self.origins.append(origin)
        if self.on_origin is not None:
            self.on_origin(origin)
        if self.action == "warn":
            if origin.module not in self._warned:
                self._warned.add(origin.module)
                warnings.warn(f"{self.owner}: {origin.message()}", RuntimeWarning, stacklevel=4)
            return origin
        error = FirstNonFiniteError(origin)
        if self.action == "raise":
            raise error
        interactive = False
        with contextlib.suppress(AttributeError, ValueError, OSError):  # no or a closed stdin
            interactive = bool(sys.stdin) and sys.stdin.isatty()
        note = "on_nonfinite='debug' opens a debugger only when stdin is an interactive terminal; "
        note += "it is not, so fit stopped instead."
        if interactive:
            tools = "`origin`, `module`, `inputs`, `output`, `gradient` are at hand"
            print(f"\nlightning-inspect: {origin.message()}\nDebugger: {tools}; `up` walks to the "
                  "calling forward; `c` continues (fit then stops).", file=sys.stderr)  # fmt: skip
            breakpoint()  # on_nonfinite="debug" asks for exactly this
            note = "fit stops after the debugging session (on_nonfinite='debug')."
        if hasattr(error, "add_note"):  # Python >= 3.11
            error.add_note(f"lightning-inspect: {note}")
        else:  # pragma: no cover
            warnings.warn(f"lightning-inspect: {note}", RuntimeWarning, stacklevel=4)
        raise error


def stored_values(t: torch.Tensor) -> torch.Tensor:
    """A sparse tensor's stored values (the others are zeros); a dense one as it is."""
    if t.layout == torch.strided:
        return t
    return t.coalesce().values() if t.is_sparse else t.values()


def parameters_by_module(modules: Mapping[str, nn.Module]) -> dict[str, list[tuple[str, Any]]]:
    """The trainable parameters each module owns directly, for :meth:`NonFiniteLocator.check`."""
    out: dict[str, list[tuple[str, Any]]] = {}
    seen: set[int] = set()
    for name, module in modules.items():
        for pname, param in module.named_parameters(recurse=False):
            if param.requires_grad and id(param) not in seen:
                seen.add(id(param))
                out.setdefault(name, []).append((pname, param))
    return out


def _add_consumer(consumers: list[tuple[str, str]], name: str, label: str) -> None:
    """Outer first: a forward hook runs after those of the calls inside."""
    i = len(consumers)
    while i and (not name or consumers[i - 1][0].startswith(name + ".")):
        i -= 1
    consumers.insert(i, (name, label))


def _checkable(t: torch.Tensor) -> bool:
    return (t.is_floating_point() or t.is_complex()) and t.numel() > 0


def _label(kind: str, path: str) -> str:
    return f"{kind} {path}" if path else kind


def _summary(label: str, shape: tuple[int, ...], dtype: str, row: torch.Tensor) -> TensorSummary:
    dtype = dtype.removeprefix("torch.")
    return TensorSummary(label, shape, dtype, summarise(row.detach().cpu().numpy(), _INPUT_STATS))

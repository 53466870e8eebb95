"""First-NaN localisation: the first module, in execution order, whose forward or backward made a NaN/Inf.

:class:`NonFiniteLocator` watches a set of modules during a training batch:

* **forward**: each module's output tensors are checked when the module returns (a forward hook);
  the first non-finite output names the module, with the statistics of its inputs and any of its
  parameters that are already non-finite;
* **loss**: the loss is checked before ``backward`` (a NaN made outside every module, in the loss
  function, is reported as such);
* **backward**: a tensor hook on every tensor that crosses a module boundary checks its gradient
  as autograd computes it. The first non-finite gradient is blamed on the module whose backward
  produced it: the innermost watched module that took that tensor as input (when no watched
  module did, e.g. the model's output, the loss or code between modules produced it);
* **parameter gradients**: checked once the backward pass is over, before the optimizer step.

Two ways to check, chosen by ``check``:

``"module"`` (the default on the CPU)
    each tensor is tested as it is produced (``bool(torch.isfinite(t).all())``). On the CPU that
    costs next to nothing; the action happens *at* the module, inside its hook, which is what
    ``"debug"`` needs (the debugger opens with the module, its inputs and its output at hand).
    On a GPU every test is a device synchronisation.
``"step"`` (the default on accelerators)
    nothing is synchronised while the batch runs: each output and each gradient is reduced on
    its device to a row of statistics (count, NaN, Inf, min, max...), the inputs of each module
    call too, and all rows are tested with **one** transfer per micro-batch, after the backward
    pass and before the optimizer step (so a ``"raise"`` stops fit before NaN reaches the
    weights). The first non-finite row in execution order is the origin; its module and the
    rows of its inputs give the same report as ``"module"``, only after the fact.

Both are far cheaper than ``torch.autograd.detect_anomaly`` (which checks every autograd node's
output and records a Python stack trace for every operation): one elementwise test per module
output and per boundary gradient, and no stack traces.

Actions (``action``): ``"warn"`` (a RuntimeWarning, once per module; training goes on),
``"raise"`` (:class:`FirstNonFiniteError`, a :class:`~lightning_inspect.errors.NonFiniteError`),
``"debug"`` (opens the debugger inside the hook of the culprit module when ``sys.stdin`` is a
terminal, then raises; without a terminal it raises at once, with a note saying so; always checks
per module).

Example:
    >>> import torch
    >>> from torch import nn
    >>> class Log(nn.Module):
    ...     def forward(self, x):
    ...         return torch.log(x)
    >>> net = nn.Sequential(nn.Linear(2, 2), Log(), nn.Linear(2, 1))
    >>> locator = NonFiniteLocator(action="raise")
    >>> with locator.attach(dict(net.named_children())):
    ...     with torch.no_grad():
    ...         _ = net[0].weight.fill_(-1.0)
    ...     try:
    ...         net(torch.ones(1, 2))
    ...     except FirstNonFiniteError as err:
    ...         print(err.origin.module, err.origin.phase, err.origin.nan)
    1 forward 2
"""

from __future__ import annotations

import math
import sys
import warnings
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lightning_inspect._validation import check_choice
from lightning_inspect.core.hooks import HookSet, InertWhenCopied, in_backward_pass, is_suspended
from lightning_inspect.core.outputs import iter_tensors
from lightning_inspect.core.stats import FIELDS, reduce_tensor, summarise
from lightning_inspect.errors import InspectError, NonFiniteError
from lightning_inspect.health.rules import Finding, format_value
from lightning_inspect.shapes.notes import attach_note

#: What to do at the first non-finite value.
NONFINITE_ACTIONS = ("ignore", "warn", "raise", "debug")
#: How to check: ``"auto"`` is ``"module"`` on the CPU and ``"step"`` elsewhere.
CHECK_MODES = ("auto", "module", "step")
#: Inputs of a module described in a report (the first ones).
MAX_INPUTS = 4

_NAN, _INF = FIELDS.index("nan"), FIELDS.index("inf")
_INPUT_STATS = ("min", "max", "mean", "std", "nan_count", "inf_count")


class FirstNonFiniteError(NonFiniteError):
    """The first NaN/Inf of a step was found; ``origin`` says where (fit stops cleanly).

    Example:
        >>> issubclass(FirstNonFiniteError, NonFiniteError)
        True
    """

    def __init__(self, origin: NonFiniteOrigin) -> None:
        super().__init__(origin.message())
        self.origin = origin


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
        for name in ("min", "max", "mean", "std"):
            if name in s:
                parts.append(f"{name} {format_value(s[name])}")
        parts.append(f"{int(s.get('nan_count', 0))} NaN, {int(s.get('inf_count', 0))} Inf")
        return ", ".join(parts)


@dataclass(frozen=True)
class NonFiniteOrigin:
    """Where the first NaN/Inf of a step came from.

    Attributes:
        step: optimizer step (``trainer.global_step``); ``batch_idx`` the training batch.
        phase: ``"forward"``, ``"loss"``, ``"backward"`` or ``"parameter gradient"``.
        module: qualified name of the culprit module (``""`` for the loss).
        module_type: its class name.
        tensor: which tensor held the value (``"output"``, ``"output/logits"``,
            ``"gradient w.r.t. input 0"``, ``"weight.grad"``...).
        nan, inf, numel: how many NaN and Inf among how many values.
        inputs: what the module received (forward: its inputs; backward: the gradients
            arriving at its outputs).
        parameters: ``"weight: 3 NaN, 0 Inf of 100"`` for each non-finite parameter of the module.
        hint: one line on likely causes.
        check: how it was found (``"module"`` or ``"step"``).
    """

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

    def where(self) -> str:
        """``module 'net.2' (Log)`` or ``the loss``."""
        return f"module {self.module!r} ({self.module_type})" if self.module else "the loss"

    def message(self) -> str:
        """A multi-line report."""
        batch = f", batch {self.batch_idx}" if self.batch_idx >= 0 else ""
        where = f"{self.phase}, {self.where()}, {self.tensor}" if self.module else self.tensor
        lines = [
            f"first non-finite value at step {self.step}{batch}: {where}: {self.nan} NaN, "
            f"{self.inf} Inf of {self.numel} values."
        ]
        heading = "incoming gradients" if self.phase == "backward" else "inputs"
        for summary in self.inputs:
            lines.append(f"  {heading} - {summary.describe()}")
        for text in self.parameters:
            lines.append(f"  non-finite parameter - {text}")
        if self.hint:
            lines.append(f"  hint: {self.hint}")
        return "\n".join(lines)

    def to_finding(self, depth: int = -1) -> Finding:
        """The origin as a report entry (rule ``nonfinite``, an error)."""
        return Finding(
            "nonfinite",
            "error",
            self.module or "(loss)",
            f"{self.phase}: {self.tensor}",
            float(self.nan + self.inf),
            self.step,
            f"first NaN/Inf of the run here ({self.nan} NaN, {self.inf} Inf of {self.numel}); {self.hint}",
            math.nan,
            depth,
        )


def hint_for(phase: str, inputs_finite: bool, params_finite: bool, first_module: bool) -> str:
    """The likely causes of a non-finite value, given where it appeared.

    >>> hint_for("forward", True, True, False)[:40]
    'this module turned finite inputs into Na'
    """
    if not params_finite:
        return (
            "its parameters are already non-finite: an earlier optimizer step wrote NaN/Inf into "
            "them; check the previous steps' gradients, lower the learning rate or clip gradients"
        )
    if phase == "forward" and not inputs_finite:
        if first_module:
            return "the batch already holds NaN/Inf: check the data and its preprocessing"
        return (
            "its inputs were already non-finite, made by code outside the watched modules "
            "(functional calls in a parent's forward): widen `modules` to find it"
        )
    if phase == "forward":
        return (
            "this module turned finite inputs into NaN/Inf: look for log/sqrt/pow of values <= 0, "
            "division by ~0, exp overflow, or float16 overflow; add an eps/clamp, use "
            "log_softmax/logsumexp, or lower the learning rate"
        )
    if phase == "loss":
        return (
            "every watched module output was finite but the loss is not: check the loss function's "
            "inputs (log of 0, targets out of range, a division by the batch size 0)"
        )
    if phase == "backward":
        return (
            "its backward turned finite gradients into NaN/Inf: typical causes are sqrt/log/pow/"
            "division near 0 (finite forward, infinite derivative); add an eps or clamp, or clip "
            "gradients"
        )
    return (
        "this parameter's gradient is non-finite while the gradients reaching the module were "
        "finite: check custom autograd code, or clip gradients"
    )


def can_debug() -> bool:
    """Whether a debugger can take the terminal (``sys.stdin`` is an interactive terminal)."""
    try:
        return bool(sys.stdin) and sys.stdin.isatty()
    except (AttributeError, ValueError, OSError):
        return False


# ---------------------------------------------------------------------------------------------
# Bookkeeping of one batch
# ---------------------------------------------------------------------------------------------


class _Site:
    """A tensor that crossed a module boundary in the forward pass (its gradient is watched)."""

    __slots__ = ("__weakref__", "consumers", "grad_row", "grad_shape", "path", "producer", "ref")

    def __init__(self, tensor: torch.Tensor) -> None:
        self.ref = weakref.ref(tensor)
        self.producer: str | None = None
        self.path = ""
        self.consumers: list[tuple[str, str]] = []  # (module, input label), innermost first
        self.grad_row: torch.Tensor | None = None
        self.grad_shape: tuple[int, ...] = ()


@dataclass
class _Event:
    """A deferred check: one output (forward) or one boundary gradient (backward)."""

    phase: str
    module: str
    tensor: str
    row: torch.Tensor
    shape: tuple[int, ...]
    dtype: torch.dtype
    inputs: list[tuple[str, tuple[int, ...], torch.dtype, torch.Tensor]] = field(
        default_factory=list
    )
    site: _Site | None = None


class _SiteGradHook(InertWhenCopied):
    """Tensor hook: hands a boundary tensor's gradient to the locator; returns None."""

    __slots__ = ("locator", "site")

    def __init__(self, locator: NonFiniteLocator, site: _Site) -> None:
        self.locator = locator
        self.site = site

    def __call__(self, grad: torch.Tensor) -> None:
        if not is_suspended():
            self.locator.gradient(self.site, grad)
        return None


class _LocatorHook(InertWhenCopied):
    """Forward hook (with kwargs) used by :meth:`NonFiniteLocator.attach`."""

    __slots__ = ("locator", "name")

    def __init__(self, locator: NonFiniteLocator, name: str) -> None:
        self.locator = locator
        self.name = name

    def __call__(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
    ) -> None:
        if not is_suspended() and not in_backward_pass():
            self.locator.forward(self.name, module, args, kwargs, output)
        return None


# ---------------------------------------------------------------------------------------------
# The locator
# ---------------------------------------------------------------------------------------------


class NonFiniteLocator:
    """Find the first module that makes a NaN/Inf, and act on it.

    Args:
        action: ``"warn"``, ``"raise"`` or ``"debug"`` (see the module docstring).
        check: ``"module"``, ``"step"`` or ``"auto"`` (resolved by :meth:`resolve_check`).
        owner: the name used in messages.
        on_origin: called with every origin found (before the action), e.g. to add it to a report.

    The caller drives it: :meth:`start` at each training batch, :meth:`forward` from a forward
    hook of each watched module (or let :meth:`attach` register them), :meth:`loss` before
    backward, and :meth:`check` after backward (with the parameters to check).
    """

    def __init__(
        self,
        action: str = "warn",
        check: str = "auto",
        owner: str = "HealthMonitor",
        on_origin: Callable[[NonFiniteOrigin], None] | None = None,
    ) -> None:
        self.action = check_choice(owner, "on_nonfinite", action, NONFINITE_ACTIONS[1:])
        self.check_mode = check_choice(owner, "nonfinite_check", check, CHECK_MODES)
        if self.action == "debug":
            self.check_mode = "module"  # the debugger must open at the module
        self.owner = owner
        self.on_origin = on_origin
        self.origins: list[NonFiniteOrigin] = []
        self.step = 0
        self.batch_idx = -1
        self._modules: dict[str, nn.Module] = {}
        self._first_module: str | None = None
        self._sites: dict[int, _Site] = {}
        self._outputs_of: dict[str, list[_Site]] = {}
        self._events: list[_Event] = []
        self._hit_step: int | None = None
        self._warned: set[str] = set()
        self._last_module: str | None = None
        #: Set when a GradScaler scales the gradients (fp16): a non-finite gradient may then be an
        #: overflow that the scaler answers by skipping the step, so gradient checks wait for
        #: :meth:`check`, which is told whether the scaler found one.
        self.gradients_may_overflow = False

    # -- setting up -----------------------------------------------------------------------

    def resolve_check(self, device: torch.device | str) -> str:
        """Fix ``"auto"`` for the model's device: ``"module"`` on the CPU, ``"step"`` elsewhere."""
        if self.check_mode == "auto":
            self.check_mode = "module" if torch.device(device).type == "cpu" else "step"
        return self.check_mode

    def watch(self, modules: Mapping[str, nn.Module]) -> None:
        """The modules reports may name (qualified name -> module)."""
        self._modules = dict(modules)

    def attach(self, modules: Mapping[str, nn.Module]) -> HookSet:
        """Watch ``modules`` with this locator's own forward hooks; returns the hooks to remove.

        (A monitor that already has a forward hook on each module calls :meth:`forward` from it
        instead.)
        """
        self.watch(modules)
        if self.check_mode == "auto":
            first = next((p for m in modules.values() for p in m.parameters()), None)
            self.resolve_check(first.device if first is not None else "cpu")
        self.start(self.step, self.batch_idx)
        hooks = HookSet()
        for name, module in modules.items():
            hooks.add(module.register_forward_hook(_LocatorHook(self, name), with_kwargs=True))
        return hooks

    def start(self, step: int, batch_idx: int = -1) -> None:
        """A new training batch begins (a new micro-batch of the same step keeps pending checks)."""
        if step != self.step:
            self._events = []
        self.step = step
        self.batch_idx = batch_idx
        self._sites = {}
        self._outputs_of = {}
        self._last_module = None

    def release(self) -> None:
        """Forget the current batch (its tensors and pending checks), e.g. when fit ends."""
        self._events = []
        self._sites = {}
        self._outputs_of = {}
        self._last_module = None

    @property
    def hit_this_step(self) -> bool:
        """Whether the origin of this step was already found (later values are its consequences)."""
        return self._hit_step == self.step

    # -- forward ----------------------------------------------------------------------------

    def forward(
        self,
        name: str,
        module: nn.Module,
        args: tuple[Any, ...],
        kwargs: Mapping[str, Any],
        output: Any,
    ) -> None:
        """Check the output of ``module`` (call from its forward hook)."""
        if self._first_module is None:
            self._first_module = name
        self._last_module = name
        if self.hit_this_step:
            return  # later values of this step follow from the origin already found
        inputs = _input_tensors(args, kwargs)
        outputs = list(iter_tensors(output))
        if torch.is_grad_enabled():
            self._register_sites(name, inputs, outputs)
        if self.check_mode == "module":
            for path, tensor in outputs:
                if _checkable(tensor) and not bool(torch.isfinite(stored_values(tensor)).all()):
                    origin = self._forward_origin(name, module, path, tensor, inputs)
                    self._act(origin, module=module, inputs=inputs, output=output)
                    return
        else:
            rows = None
            for path, tensor in outputs:
                if not _checkable(tensor):
                    continue
                if rows is None:
                    rows = [
                        (label, tuple(t.shape), t.dtype, reduce_tensor(t, 0))
                        for label, t in inputs
                        if _checkable(t)
                    ]
                self._events.append(
                    _Event(
                        "forward",
                        name,
                        _label("output", path),
                        reduce_tensor(tensor, 0),
                        tuple(tensor.shape),
                        tensor.dtype,
                        rows,
                    )
                )

    def loss(self, loss: torch.Tensor) -> None:
        """Check the loss before backward (a NaN made by the loss function, not by a module)."""
        if self.hit_this_step or not isinstance(loss, torch.Tensor) or not _checkable(loss):
            return
        if self.check_mode == "module":
            if not bool(torch.isfinite(loss).all()):
                self._act(
                    self._loss_origin(_host_row(reduce_tensor(loss, 0)), tuple(loss.shape)),
                    output=loss,
                )
        else:
            self._events.append(
                _Event("loss", "", "loss", reduce_tensor(loss, 0), tuple(loss.shape), loss.dtype)
            )

    # -- backward ---------------------------------------------------------------------------

    def _register_sites(
        self,
        name: str,
        inputs: Sequence[tuple[str, torch.Tensor]],
        outputs: Sequence[tuple[str, torch.Tensor]],
    ) -> None:
        for label, tensor in inputs:
            if tensor.requires_grad and _checkable(tensor):
                self._site(tensor).consumers.append((name, label))
        for path, tensor in outputs:
            if tensor.requires_grad and _checkable(tensor):
                site = self._site(tensor)
                if site.producer is None:
                    site.producer, site.path = name, path
                self._outputs_of.setdefault(name, []).append(site)

    def _site(self, tensor: torch.Tensor) -> _Site:
        site = self._sites.get(id(tensor))
        if site is None or site.ref() is not tensor:
            site = self._sites[id(tensor)] = _Site(tensor)
            tensor.register_hook(_SiteGradHook(self, site))
        return site

    def gradient(self, site: _Site, grad: torch.Tensor) -> None:
        """Check the gradient of a boundary tensor (called by its tensor hook)."""
        if self.hit_this_step or not _checkable(grad):
            return
        try:
            row = reduce_tensor(grad, 0)
            site.grad_row = row
            site.grad_shape = tuple(grad.shape)
            if self.check_mode == "module" and not self.gradients_may_overflow:
                if bool(row[_NAN] + row[_INF] > 0):
                    self._act(
                        self._backward_origin(site, _host_row(row), tuple(grad.shape)),
                        gradient=grad,
                    )
            else:
                self._events.append(
                    _Event("backward", "", "", row, tuple(grad.shape), grad.dtype, site=site)
                )
        except InspectError:
            raise
        except Exception as exc:  # never let inspection break the backward pass
            warnings.warn(
                f"{self.owner}: checking a gradient failed ({type(exc).__name__}: {exc}).",
                RuntimeWarning,
                stacklevel=2,
            )

    # -- end of backward --------------------------------------------------------------------

    def check(
        self,
        parameters: Mapping[str, Sequence[tuple[str, nn.Parameter]]] | None = None,
        gradients_overflowed: bool = False,
    ) -> NonFiniteOrigin | None:
        """Test what is pending (``"step"`` mode) and the parameter gradients, in one transfer.

        Call after backward, before the optimizer step. ``parameters``: ``{module: [(name,
        parameter), ...]}`` in execution order. ``gradients_overflowed``: a GradScaler found
        Inf/NaN gradients and skips this step, so non-finite gradients are its business, not an
        origin (forward and loss values are still checked). Returns the origin found (after
        acting on it).
        """
        events, self._events = self._events, []
        if self.hit_this_step:
            return None
        if gradients_overflowed:
            events = [e for e in events if e.phase != "backward"]
            parameters = None
        flags: list[torch.Tensor] = [e.row[_NAN] + e.row[_INF] for e in events]
        owners: list[tuple[str, str, nn.Parameter]] = []
        for module, params in (parameters or {}).items():
            for pname, param in params:
                if param.grad is not None and _checkable(param.grad):
                    grad = stored_values(param.grad)
                    flags.append(torch.logical_not(torch.isfinite(grad).all()).to(torch.float64))
                    owners.append((module, pname, param))
        if not flags:
            return None
        device = flags[0].device
        host = torch.stack([f.to(device, torch.float64) for f in flags]).cpu().numpy()
        bad = [i for i, v in enumerate(host) if v > 0]
        if not bad:
            return None
        first = bad[0]
        if first < len(events):
            origin = self._event_origin(events[first])
        else:
            # Parameter gradients are made during backward, which runs in reverse: the last
            # module (in forward order) with a non-finite parameter gradient made it first.
            module, pname, param = owners[bad[-1] - len(events)]
            origin = self._parameter_origin(module, pname, param)
        self._act(origin)
        return origin

    # -- building origins -------------------------------------------------------------------

    def _forward_origin(
        self,
        name: str,
        module: nn.Module,
        path: str,
        tensor: torch.Tensor,
        inputs: Sequence[tuple[str, torch.Tensor]],
    ) -> NonFiniteOrigin:
        row = _host_row(reduce_tensor(tensor, 0))
        summaries = tuple(
            TensorSummary(
                label,
                tuple(t.shape),
                _dtype(t.dtype),
                summarise(_host_row(reduce_tensor(t, 0)), _INPUT_STATS),
            )
            for label, t in inputs[:MAX_INPUTS]
            if _checkable(t)
        )
        return self._make_forward(name, module, _label("output", path), row, summaries)

    def _make_forward(
        self,
        name: str,
        module: nn.Module | None,
        tensor: str,
        row: Any,
        inputs: tuple[TensorSummary, ...],
    ) -> NonFiniteOrigin:
        params = _nonfinite_parameters(module)
        inputs_finite = all(
            s.stats.get("nan_count", 0) + s.stats.get("inf_count", 0) == 0 for s in inputs
        )
        if getattr(module, "inplace", False):
            inputs = tuple(
                TensorSummary(s.label + " (after the in-place op)", s.shape, s.dtype, s.stats)
                for s in inputs
            )
        return NonFiniteOrigin(
            step=self.step,
            phase="forward",
            module=name,
            module_type=type(module).__name__ if module is not None else "?",
            tensor=tensor,
            nan=int(row[_NAN]),
            inf=int(row[_INF]),
            numel=int(row[0]),
            inputs=inputs,
            parameters=params,
            hint=hint_for("forward", inputs_finite, not params, name == self._first_module),
            batch_idx=self.batch_idx,
            check=self.check_mode,
        )

    def _loss_origin(self, row: Any, shape: tuple[int, ...]) -> NonFiniteOrigin:
        return NonFiniteOrigin(
            step=self.step,
            phase="loss",
            module="",
            module_type="loss",
            tensor=f"the loss {shape}",
            nan=int(row[_NAN]),
            inf=int(row[_INF]),
            numel=int(row[0]),
            hint=hint_for("loss", True, True, False)
            + (
                f" (the last watched module was {self._last_module!r})" if self._last_module else ""
            ),
            batch_idx=self.batch_idx,
            check=self.check_mode,
        )

    def _backward_origin(self, site: _Site, row: Any, shape: tuple[int, ...]) -> NonFiniteOrigin:
        if site.consumers:
            name, label = site.consumers[0]
            module = self._modules.get(name)
            tensor = f"gradient w.r.t. {label}"
            incoming = tuple(
                TensorSummary(
                    f"gradient w.r.t. {_label('output', s.path)}",
                    s.grad_shape,
                    "",
                    summarise(_host_row(s.grad_row), _INPUT_STATS),
                )
                for s in self._outputs_of.get(name, [])[:MAX_INPUTS]
                if s.grad_row is not None
            )
            params = _nonfinite_parameters(module)
            incoming_finite = all(
                s.stats["nan_count"] + s.stats["inf_count"] == 0 for s in incoming
            )
            hint = hint_for("backward", incoming_finite, not params, False)
            if not incoming_finite:
                hint = "the gradient reaching this module's output was already non-finite: " + hint
        else:
            name = site.producer or "?"
            module = self._modules.get(name)
            tensor = f"gradient arriving at its {_label('output', site.path)}"
            incoming, params = (), _nonfinite_parameters(module)
            hint = (
                "the gradient arriving at this module's output is already non-finite: it was made "
                "by the loss or by code between this module and the loss (not by a watched module)"
            )
        return NonFiniteOrigin(
            step=self.step,
            phase="backward",
            module=name,
            module_type=type(module).__name__ if module is not None else "?",
            tensor=f"{tensor} {shape}",
            nan=int(row[_NAN]),
            inf=int(row[_INF]),
            numel=int(row[0]),
            inputs=incoming,
            parameters=params,
            hint=hint,
            batch_idx=self.batch_idx,
            check=self.check_mode,
        )

    def _parameter_origin(
        self, module_name: str, pname: str, param: nn.Parameter
    ) -> NonFiniteOrigin:
        grad = param.grad.coalesce().values() if param.grad.is_sparse else param.grad  # type: ignore[union-attr]
        row = _host_row(reduce_tensor(grad, 0))
        module = self._modules.get(module_name)
        params = _nonfinite_parameters(module)
        return NonFiniteOrigin(
            step=self.step,
            phase="parameter gradient",
            module=module_name,
            module_type=type(module).__name__ if module is not None else "?",
            tensor=f"{pname}.grad {tuple(grad.shape)}",
            nan=int(row[_NAN]),
            inf=int(row[_INF]),
            numel=int(row[0]),
            parameters=params,
            hint=hint_for("parameter gradient", True, not params, False),
            batch_idx=self.batch_idx,
            check=self.check_mode,
        )

    def _event_origin(self, event: _Event) -> NonFiniteOrigin:
        row = _host_row(event.row)
        if event.phase == "forward":
            summaries = tuple(
                TensorSummary(label, shape, _dtype(dtype), summarise(_host_row(r), _INPUT_STATS))
                for label, shape, dtype, r in event.inputs[:MAX_INPUTS]
            )
            module = self._modules.get(event.module)
            return self._make_forward(event.module, module, event.tensor, row, summaries)
        if event.phase == "loss":
            return self._loss_origin(row, event.shape)
        assert event.site is not None
        return self._backward_origin(event.site, row, event.shape)

    # -- acting -----------------------------------------------------------------------------

    def _act(self, origin: NonFiniteOrigin, **context: Any) -> None:
        self._hit_step = self.step
        self._events = []
        self.origins.append(origin)
        if self.on_origin is not None:
            self.on_origin(origin)
        if self.action == "warn":
            if origin.module not in self._warned:
                self._warned.add(origin.module)
                warnings.warn(f"{self.owner}: {origin.message()}", RuntimeWarning, stacklevel=4)
            return
        error = FirstNonFiniteError(origin)
        if self.action == "debug":
            if can_debug():
                _open_debugger(origin, **context)
                attach_note(
                    error,
                    "lightning-inspect: fit stops after the debugging session (on_nonfinite='debug').",
                )
            else:
                attach_note(
                    error,
                    "lightning-inspect: on_nonfinite='debug' opens a debugger only when stdin is an "
                    "interactive terminal; it is not, so fit stopped instead.",
                )
        raise error


def _open_debugger(
    origin: NonFiniteOrigin,
    module: nn.Module | None = None,
    inputs: Any = None,
    output: Any = None,
    gradient: Any = None,
) -> None:
    """Stop in the debugger with the culprit at hand: ``origin``, ``module``, ``inputs``,
    ``output`` / ``gradient`` are local variables here; ``up`` reaches the caller's forward."""
    print(
        f"\nlightning-inspect: {origin.message()}\n"
        "Debugger: `origin`, `module`, `inputs`, `output`, `gradient` are at hand; `up` walks to "
        "the calling forward; `c` continues (fit then stops).",
        file=sys.stderr,
    )
    breakpoint()  # on_nonfinite="debug" asks for exactly this


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def stored_values(t: torch.Tensor) -> torch.Tensor:
    """A sparse tensor's stored values (its other elements are zeros); a dense one as it is."""
    if t.layout == torch.strided:
        return t
    return t.coalesce().values() if t.is_sparse else t.values()


def _checkable(t: torch.Tensor) -> bool:
    return (t.is_floating_point() or t.is_complex()) and t.numel() > 0


def _input_tensors(
    args: tuple[Any, ...], kwargs: Mapping[str, Any]
) -> list[tuple[str, torch.Tensor]]:
    out = [(_label("input", path), t) for path, t in iter_tensors(list(args))]
    out += [(_label("input", path), t) for path, t in iter_tensors(dict(kwargs))] if kwargs else []
    return out


def _label(kind: str, path: str) -> str:
    return f"{kind} {path}" if path else kind


def _host_row(row: torch.Tensor | None) -> Any:
    return row.detach().cpu().numpy() if row is not None else None


def _dtype(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _nonfinite_parameters(module: nn.Module | None) -> tuple[str, ...]:
    if module is None:
        return ()
    out = []
    for pname, param in module.named_parameters(recurse=False):
        if _checkable(param) and not bool(torch.isfinite(param).all()):
            row = _host_row(reduce_tensor(param, 0))
            out.append(f"{pname}: {int(row[_NAN])} NaN, {int(row[_INF])} Inf of {int(row[0])}")
    return tuple(out)


def parameters_by_module(
    modules: Mapping[str, nn.Module],
) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """The trainable parameters each module owns directly, for :meth:`NonFiniteLocator.check`."""
    out: dict[str, list[tuple[str, nn.Parameter]]] = {}
    seen: set[int] = set()
    for name, module in modules.items():
        params = []
        for pname, param in module.named_parameters(recurse=False):
            if param.requires_grad and id(param) not in seen:
                seen.add(id(param))
                params.append((pname, param))
        if params:
            out[name] = params
    return out

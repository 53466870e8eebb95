"""HealthMonitor: tell the user what is wrong with training, and where.

Builds on :class:`~lightning_inspect.monitors.base.ModuleMonitor` (selection, schedule, hook
lifetime, one device-to-host transfer per logging step through the shared coordinator, sinks):

* on each logged step it reduces, on the device, what the health rules need (per module: the
  units of ReLU-like outputs that were positive, the saturated share of Tanh / Sigmoid /
  Hardtanh outputs, the parameter-gradient norm, the update-to-weight ratio), logs them as
  ``health/<module>/<statistic>`` and runs :class:`~lightning_inspect.health.rules.HealthRules`
  over them on the host;
* it finds the first module that makes a NaN/Inf (forward or backward) with a
  :class:`~lightning_inspect.health.nonfinite.NonFiniteLocator`, and warns, raises or opens a
  debugger there;
* it draws layers x steps pictures of those statistics, and writes an end-of-fit health report.
"""

from __future__ import annotations

import dataclasses
import json
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from lightning_inspect._validation import as_str_list, check_bool, check_choice, check_positive_int
from lightning_inspect.backends import Sink
from lightning_inspect.backends.pictures import heatmap, publish_image
from lightning_inspect.core.grad_scaler import (
    grad_scaler,
    gradients_scaled,
    loss_scale,
    scaler_found_inf,
)
from lightning_inspect.core.hooks import InertWhenCopied, in_backward_pass, is_suspended
from lightning_inspect.core.keys import FINDINGS_KEY, metric_key
from lightning_inspect.core.recorder import HostRecord, StepRecord
from lightning_inspect.core.selection import select_modules
from lightning_inspect.errors import InspectError
from lightning_inspect.health.nonfinite import (
    CHECK_MODES,
    NONFINITE_ACTIONS,
    NonFiniteLocator,
    NonFiniteOrigin,
    parameters_by_module,
    stored_values,
)
from lightning_inspect.health.rules import (
    Finding,
    HealthReport,
    HealthRules,
    HealthThresholds,
    scaler_stalled,
)
from lightning_inspect.monitors.base import ModuleMonitor

#: Key of the end-of-fit report (TensorBoard text; MLflow ``lightning_inspect/health/report.md``).
REPORT_KEY = "health/report"

#: The pictures drawn: statistic -> (title, log10 scale, colour range).
PICTURES: dict[str, tuple[str, bool, tuple[float | None, float | None]]] = {
    "zero_fraction": ("fraction of zero outputs (ReLU-like modules)", False, (0.0, 1.0)),
    "saturated_fraction": (
        "fraction of saturated outputs (Tanh/Sigmoid/Hardtanh)",
        False,
        (0.0, 1.0),
    ),
    "grad_norm": ("parameter-gradient norm per module (log10)", True, (None, None)),
    "update_ratio": ("update-to-weight ratio per module (log10)", True, (None, None)),
}


def activation_kind(module: nn.Module) -> str | None:
    """Which health statistic a module's output feeds: ``"relu"`` (dead units), ``"tanh"``,
    ``"sigmoid"``, ``"hardtanh"`` (saturation), or ``None``.

    LeakyReLU, ELU, GELU, SiLU... never output exactly zero on a whole region and have a
    non-zero gradient there, so they cannot have dead units in this sense.

    >>> activation_kind(nn.ReLU6()), activation_kind(nn.Tanh()), activation_kind(nn.GELU())
    ('relu', 'tanh', None)
    """
    if isinstance(module, (nn.ReLU, nn.ReLU6)):  # ReLU6 is a Hardtanh subclass: test it first
        return "relu"
    if isinstance(module, nn.Tanh):
        return "tanh"
    if isinstance(module, nn.Sigmoid):
        return "sigmoid"
    if isinstance(module, nn.Hardtanh):
        return "hardtanh"
    return None


_KIND_NAMES = {"relu": "ReLU", "tanh": "Tanh", "sigmoid": "Sigmoid", "hardtanh": "Hardtanh"}


def unit_dim(ndim: int, after_conv: bool) -> int:
    """The dimension that indexes units (features / channels) in an output of ``ndim`` dims.

    The last dimension for Linear-like outputs (``(N, F)``, ``(N, T, F)``), dimension 1 for
    convolution outputs (``(N, C, L)`` after a Conv1d / BatchNorm1d, ``(N, C, H, W)``,
    ``(N, C, D, H, W)``).

    >>> unit_dim(2, False), unit_dim(3, False), unit_dim(3, True), unit_dim(4, False)
    (-1, -1, 1, 1)
    """
    if ndim >= 4 or (ndim == 3 and after_conv):
        return 1
    return -1


#: 1 when the GradScaler found Inf/NaN gradients and skips the optimizer step (fp16), else 0.
_SKIPPED_KEY = "health/skipped_by_scaler"
#: Internal: the GradScaler's scale, for the stalled-scaler finding.
_SCALE_KEY = "__health_loss_scale__"
#: Internal: 1 when the gradients were read still scaled (an optimizer that unscales in step()).
_GRADS_SCALED_KEY = "__health_grads_scaled__"
#: Statistics a step the GradScaler skips leaves meaningless: its gradients overflowed on purpose.
_SCALER_OWNED = ("/grad_norm", "/update_ratio")


class _HealthHook(InertWhenCopied):
    """Forward hook (with kwargs) on each selected module."""

    __slots__ = ("monitor", "name")

    def __init__(self, monitor: HealthMonitor, name: str) -> None:
        self.monitor = monitor
        self.name = name

    def __call__(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
    ) -> None:
        if not self.monitor._recording:  # all a compiled graph sees when not recording
            return None
        _health_forward(self, module, args, kwargs, output)
        return None


@torch.compiler.disable
def _health_forward(
    hook: _HealthHook, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
) -> None:
    if is_suspended() or in_backward_pass():
        return
    try:
        hook.monitor._on_forward(hook.name, module, args, kwargs, output)
    except InspectError:
        raise  # the locator's "raise" / "debug" action
    except Exception as exc:  # never let inspection break the forward pass
        hook.monitor._hook_fault(f"the output of {hook.name!r}", exc)


class HealthMonitor(ModuleMonitor):
    """Diagnose training: dead units, saturation, vanishing/exploding gradients, update sizes, NaN.

    On every logged step (``every_n_steps``, in optimizer steps) it reduces on the device, per
    selected module, what the rules of :mod:`lightning_inspect.health.rules` need, moves it to the
    host with the other monitors' values (one transfer), logs it, and turns what crosses a
    threshold into findings: a warning the first time each rule fires in each module, an entry
    in the end-of-fit report (console table, TensorBoard text, MLflow markdown artifact), and
    layers x steps pictures.

    The same logged steps are checked for NaN/Inf: the first module in execution order whose
    forward or backward made one is named, with its input statistics (see
    :mod:`lightning_inspect.health.nonfinite`). Use ``every_n_steps=1`` to catch the very first.

    Args:
        modules: patterns of the modules to watch; default every module (``"*"``): activation
            modules own no parameters, and a NaN can come from any module. ``None``: the
            modules that own parameters, as for the other monitors.
        exclude: patterns removed from the selection.
        every_n_steps, start_step, stop_step: when to check and log, in optimizer steps.
        backends: ``"tensorboard"``, ``"mlflow"``, a list, Sink objects; ``None``: every
            supported logger attached to the Trainer.
        on_nonfinite: at the first NaN/Inf of a step: ``"ignore"``, ``"warn"`` (once per module;
            training goes on), ``"raise"`` (:class:`~lightning_inspect.FirstNonFiniteError`;
            fit stops cleanly, hooks removed and logs flushed) or ``"debug"`` (a debugger at the
            module when stdin is a terminal, then stops; otherwise stops with a note).
        nonfinite_check: ``"auto"`` (per module on the CPU, once per step elsewhere),
            ``"module"`` or ``"step"``; see :mod:`lightning_inspect.health.nonfinite`.
        thresholds: a :class:`~lightning_inspect.HealthThresholds` or a mapping of overrides,
            e.g. ``{"dead_fraction": 0.9, "grad_norm_high": 100}``.
        relu_modules: patterns of further modules whose output is post-ReLU (e.g. a block whose
            forward ends in ``F.relu``: functional calls are not modules and are invisible
            otherwise).
        update_ratio: compute the update-to-weight ratio. It keeps one copy of the watched
            modules' parameters (same dtype and device) from the first optimizer step of a
            logged batch to its end: the parameters' size in memory (4 bytes a float32 value).
        pictures: draw the layers x steps pictures.
        picture_every_n_logs: draw them every this many logged steps (and at the end of fit).
        report: write the end-of-fit health report.
        console: print the report (a rich table) at the end of fit.
        warn_findings: a RuntimeWarning the first time each rule fires in each module (notes of
            severity ``info`` excepted).
        log_metrics: log the ``health/<module>/<statistic>`` values to the backends.
        enabled: ``False`` attaches the callback but does nothing.

    Logged metrics:
        ``health/<module>/zero_fraction`` and ``health/<module>/dead_fraction`` (ReLU-like
        modules), ``health/<module>/saturated_fraction`` (Tanh, Sigmoid, Hardtanh),
        ``health/<module>/grad_norm`` and ``health/<module>/update_ratio`` (modules with
        parameters); images ``health/<statistic>``; text ``health/report``.

    Example::

        trainer = L.Trainer(logger=TensorBoardLogger("tb"),
                            callbacks=[HealthMonitor(every_n_steps=10, on_nonfinite="raise",
                                                     thresholds={"dead_fraction": 0.8})])
    """

    kind = "health"

    def __init__(
        self,
        modules: str | Sequence[str] | None = "*",
        exclude: str | Sequence[str] | None = None,
        every_n_steps: int = 50,
        start_step: int = 0,
        stop_step: int | None = None,
        backends: str | Sequence[str | Sink] | None = None,
        on_nonfinite: str = "warn",
        enabled: bool = True,
        nonfinite_check: str = "auto",
        thresholds: HealthThresholds | Mapping[str, Any] | None = None,
        relu_modules: str | Sequence[str] | None = None,
        update_ratio: bool = True,
        pictures: bool = True,
        picture_every_n_logs: int = 10,
        report: bool = True,
        console: bool = True,
        warn_findings: bool = True,
        log_metrics: bool = True,
    ) -> None:
        owner = type(self).__name__
        action = check_choice(owner, "on_nonfinite", on_nonfinite, NONFINITE_ACTIONS)
        super().__init__(
            modules,
            exclude,
            every_n_steps,
            start_step,
            stop_step,
            None,
            False,
            2,
            backends,
            "ignore",
            enabled,
        )
        self.on_nonfinite = action
        self.nonfinite_check = check_choice(owner, "nonfinite_check", nonfinite_check, CHECK_MODES)
        self.thresholds = HealthThresholds.checked(owner, thresholds)
        self.relu_modules = as_str_list(owner, "relu_modules", relu_modules)
        self.update_ratio = check_bool(owner, "update_ratio", update_ratio)
        self.pictures_enabled = check_bool(owner, "pictures", pictures)
        self.picture_every_n_logs = check_positive_int(
            owner, "picture_every_n_logs", picture_every_n_logs
        )
        self.report_enabled = check_bool(owner, "report", report)
        self.console = check_bool(owner, "console", console)
        self.warn_findings = check_bool(owner, "warn_findings", warn_findings)
        self.log_metrics = check_bool(owner, "log_metrics", log_metrics)

        self.rules = HealthRules(self.thresholds)
        self.report = HealthReport()
        self._shared: list[Finding] = []
        #: The latest picture of each statistic, as an ``(H, W, 3)`` uint8 array.
        self.pictures: dict[str, np.ndarray] = {}
        #: ``{statistic: {module: [(step, value), ...]}}`` of everything logged.
        self.history: dict[str, dict[str, list[tuple[int, float]]]] = {}
        self.locator: NonFiniteLocator | None = None
        self.order: list[str] = []  # selected modules in execution order (forward completion)
        self._order_set: set[str] = set()
        self._kinds: dict[str, str] = {}
        self._after_conv: dict[str, bool] = {}
        self._param_modules: dict[str, list[tuple[str, nn.Parameter]]] = {}
        self._numel: dict[str, int] = {}
        self._counts: dict[str, torch.Tensor] = {}
        self._alive: dict[str, torch.Tensor] = {}
        self._windows: dict[str, deque[torch.Tensor]] = {}
        self._units: dict[str, int] = {}
        self._before: dict[str, list[torch.Tensor]] | None = None
        self._grad_squares: dict[str, list[torch.Tensor]] = {}
        self._found_inf: torch.Tensor | None = None  # during on_before_optimizer_step only
        self._logs = 0
        self._skipped_in_a_row = 0
        self._stall_reported = False
        self._finished = False
        self._picture_warned: set[str] = set()

    # -- state ------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "grad_history": self.rules.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.rules.load_state_dict(state_dict.get("grad_history", {}))

    # -- set-up -----------------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._finished = False
        self._shared = []  # the findings of this fit written under FINDINGS_KEY so far
        super().setup(trainer, pl_module, stage)

    def _after_selection(self, pl_module: pl.LightningModule) -> None:
        extra_relu: set[str] = set()
        if self.relu_modules:
            extra = select_modules(
                pl_module, self.relu_modules, owner=f"{self._owner}(relu_modules)"
            )
            extra_relu = set(extra)
            for name, module in extra.items():
                self.selected.setdefault(name, module)
        self._kinds = {}
        for name, module in self.selected.items():
            kind = "relu" if name in extra_relu else activation_kind(module)
            if kind:
                self._kinds[name] = kind
        self._after_conv = _follows_conv(pl_module, set(self._kinds))
        self._param_modules = parameters_by_module(self.selected)
        self.locator = None
        if self.on_nonfinite != "ignore":
            self.locator = NonFiniteLocator(
                self.on_nonfinite, self.nonfinite_check, self._owner, self._on_origin
            )
            self.locator.watch(self.selected)
            self.locator.resolve_check(pl_module.device)
            self.locator.gradients_may_overflow = grad_scaler(pl_module) is not None

    def _selection_summary(self) -> tuple[str, list[str]]:
        return "modules", list(self.selected)

    def _install_hooks(self) -> None:
        for name, module in self.selected.items():
            self._hooks.add(module.register_forward_hook(_HealthHook(self, name), with_kwargs=True))

    # -- Lightning hooks (thin; the raise of the locator must not be contained) ---------------

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        if self._recording and self.locator is not None:
            self.locator.start(trainer.global_step, batch_idx)

    def on_before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor
    ) -> None:
        if self._recording and self.locator is not None:
            self.locator.loss(loss)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        # fp16: whether the GradScaler skips this step, found once for the locator and the rules
        self._found_inf = scaler_found_inf(pl_module, optimizer) if self._recording else None
        try:
            if self._recording and self.locator is not None:
                overflowed = self._found_inf is not None and bool(self._found_inf.item())
                # may stop fit before the weights change
                self.locator.check(self._params_in_order(), gradients_overflowed=overflowed)
            super().on_before_optimizer_step(trainer, pl_module, optimizer)
        finally:
            self._found_inf = None

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if self._recording and self.locator is not None and not self.locator.gradients_may_overflow:
            # what a micro-batch without optimizer step left pending (under a GradScaler it waits
            # for the optimizer step, which tells an overflow the scaler skips from a real NaN)
            self.locator.check()
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        self._finish(trainer)

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        if self._active:
            self._close()  # publish what the interrupted step collected
            self._finish(trainer)  # the report, before the backends are closed
        super().on_exception(trainer, pl_module, exception)

    def _shutdown(self) -> None:
        if self._active and self.locator is not None:
            self.locator.release()  # no tensor (nor weak reference) outlives the fit
        super()._shutdown()  # last: after a nested fit it brings back the enclosing fit's state

    # -- recording (device side) ------------------------------------------------------------

    def _on_forward(
        self,
        name: str,
        module: nn.Module,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        output: Any,
    ) -> None:
        if name not in self._order_set:
            self._order_set.add(name)
            self.order.append(name)
        if self.locator is not None:
            self.locator.forward(name, module, args, kwargs, output)
        kind = self._kinds.get(name)
        if kind is not None and isinstance(output, torch.Tensor) and output.numel() > 0:
            self._accumulate(name, kind, module, output.detach())

    def _accumulate(self, name: str, kind: str, module: nn.Module, y: torch.Tensor) -> None:
        if y.is_complex() or y.ndim == 0 or y.layout != torch.strided:
            return  # no units or bounds: complex, 0-d and sparse outputs are checked for NaN only
        if kind == "relu":
            dim = unit_dim(y.ndim, self._after_conv.get(name, False))
            units = y.shape[dim]
            alive = (y > 0).movedim(dim, -1).reshape(-1, units).any(0)
            previous = self._alive.get(name)
            self._alive[name] = (
                alive if previous is None or previous.shape != alive.shape else previous | alive
            )
            count = torch.count_nonzero(y == 0)
        else:
            margin = self.thresholds.saturation_margin
            if kind == "tanh":
                count = torch.count_nonzero(y.abs() > 1 - margin)
            elif kind == "sigmoid":
                count = torch.count_nonzero((y < margin) | (y > 1 - margin))
            else:
                low, high = (
                    float(getattr(module, "min_val", -1.0)),
                    float(getattr(module, "max_val", 1.0)),
                )
                count = torch.count_nonzero((y <= low) | (y >= high))
        previous_count = self._counts.get(name)
        self._counts[name] = count if previous_count is None else previous_count + count
        self._numel[name] = self._numel.get(name, 0) + y.numel()

    def _params_in_order(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        index = {n: i for i, n in enumerate(self.order)}
        names = sorted(self._param_modules, key=lambda n: index.get(n, len(index)))
        return {n: self._param_modules[n] for n in names}

    def _before_optimizer_step(self, pl_module: pl.LightningModule) -> None:
        first = self._before is None  # several optimizers: the first step of the batch
        skipped = self._found_inf
        if first and skipped is not None:  # fp16: the GradScaler skips this step (overflow)
            self._add_scalar(_SKIPPED_KEY, skipped)
            scale = loss_scale(pl_module)
            if scale is not None:
                self._add_scalar(_SCALE_KEY, scale)
                if gradients_scaled(pl_module, self._optimizer):  # unscaled in step() only
                    self._add_scalar(_GRADS_SCALED_KEY, torch.ones((), device=scale.device))
        with torch.no_grad():
            self._read_grad_norms()
            if first:  # the weights before every optimizer step of the batch
                modules = self._param_modules.items() if self.update_ratio else ()
                self._before = {m: [p.detach().clone() for _, p in ps] for m, ps in modules}

    def _read_grad_norms(self) -> None:
        """Squared gradient norms of the parameters this optimizer updates, by module."""
        owned = {(m, n): p for m, params in self._param_modules.items() for n, p in params}
        owners: list[str] = []
        grads: list[torch.Tensor] = []
        for (module, _), param in self._stepped(owned).items():
            if param.grad is not None:
                owners.append(module)
                grads.append(stored_values(param.grad))
        if grads:
            norms = torch._foreach_norm(grads, 2, dtype=torch.float64)  # finite for huge values
            for module, norm in zip(owners, norms, strict=False):
                self._grad_squares.setdefault(module, []).append(norm.square())

    def _finish_step(self) -> None:
        squares, self._grad_squares = self._grad_squares, {}
        for module, parts in squares.items():  # over every optimizer step of the batch
            total = torch.stack([p.to(parts[0].device) for p in parts]).sum().sqrt()
            self._add_scalar(metric_key("health", module, "grad_norm"), total)
        self._before = None  # an interrupted step's copies
        super()._finish_step()

    def _after_optimizer_step(self, pl_module: pl.LightningModule) -> None:
        before, self._before = self._before, None
        with torch.no_grad():
            if before:
                self._record_update_ratios(before)
            self._record_activations()

    def _record_update_ratios(self, before: dict[str, list[torch.Tensor]]) -> None:
        names, olds, news = [], [], []
        for module, params in self._param_modules.items():
            for old, (_, param) in zip(before.get(module, []), params, strict=False):
                names.append(module)
                olds.append(old)
                news.append(param.detach())
        if not olds:
            return
        # float64 norms: squares of finite weights of any size stay finite
        norms = torch._foreach_norm(olds, 2, dtype=torch.float64)
        torch._foreach_sub_(olds, news)  # in place: the copy becomes -(update), no third copy
        updates = torch._foreach_norm(olds, 2, dtype=torch.float64)
        sums: dict[str, list[torch.Tensor]] = {}
        for module, upd, norm in zip(names, updates, norms, strict=False):
            pair = torch.stack([upd.square(), norm.square().to(upd.device)])
            sums.setdefault(module, []).append(pair)
        for module, parts in sums.items():
            u2, w2 = torch.stack([p.to(parts[0].device) for p in parts]).sum(0)
            # A module whose weights are all zero has no ratio: NaN is dropped on the host.
            ratio = torch.where(w2 > 0, (u2 / w2).sqrt(), torch.nan)
            self._add_scalar(metric_key("health", module, "update_ratio"), ratio)

    def _record_activations(self) -> None:
        for name, count in self._counts.items():
            stat = "zero_fraction" if self._kinds[name] == "relu" else "saturated_fraction"
            self._add_scalar(
                metric_key("health", name, stat),
                count.to(torch.float64) / max(self._numel[name], 1),
            )
        window_length = self.thresholds.dead_window
        for name, alive in self._alive.items():
            window = self._windows.setdefault(name, deque(maxlen=window_length))
            if window and window[-1].shape != alive.shape:
                window.clear()
            window.append(alive)
            self._units[name] = alive.numel()
            if len(window) == window_length:
                ever = torch.stack(list(window)).any(0)
                self._add_scalar(
                    metric_key("health", name, "dead_fraction"), 1.0 - ever.to(torch.float64).mean()
                )
        self._counts, self._numel, self._alive = {}, {}, {}

    # -- publishing (host side) -------------------------------------------------------------

    def _publish(self, record: StepRecord, values: HostRecord) -> None:
        rows, scalars = values
        scale = scalars.pop(_SCALE_KEY, None)
        if scalars.pop(_GRADS_SCALED_KEY, 0.0) and scale:  # read before the optimizer unscaled them
            scalars = {k: v / scale if k.endswith("/grad_norm") else v for k, v in scalars.items()}
        skipped = bool(scalars.get(_SKIPPED_KEY, 0.0))
        scalars = {k: v for k, v in scalars.items() if not (k.endswith("/update_ratio") and v != v)}
        if self.log_metrics:
            super()._publish(record, (rows, scalars))
        stats: dict[str, dict[str, float]] = {}
        for key, value in scalars.items():
            if key == _SKIPPED_KEY:
                continue
            if skipped and key.endswith(_SCALER_OWNED):
                continue  # overflowed gradients and an update that never happened: nothing to judge
            _, rest = key.split("/", 1)
            module, stat = rest.rsplit("/", 1)
            stats.setdefault(module, {})[stat] = value
            self.history.setdefault(stat, {}).setdefault(module, []).append((record.step, value))
        for module, units in self._units.items():
            if module in stats and "dead_fraction" in stats[module]:
                stats[module]["units"] = float(units)
        kinds = {n: _KIND_NAMES[k] for n, k in self._kinds.items()}
        findings = self.rules.observe(record.step, stats, self.order, kinds)
        if self.locator is not None and any(o.step == record.step for o in self.locator.origins):
            # The origin of this step's NaN/Inf is in the report: the rest follows from it.
            findings = [f for f in findings if f.rule != "nonfinite"]
        self._skipped_in_a_row = self._skipped_in_a_row + 1 if skipped else 0
        if not skipped:
            self._stall_reported = False
        elif scale is not None and not self._stall_reported:
            stalled = scaler_stalled(self._skipped_in_a_row, scale, record.step)
            if stalled is not None:
                self._stall_reported = True
                findings.append(stalled)
        self.report.logged_steps += 1
        new = self.report.extend(findings)
        self._share_findings(new, record.step)
        for finding in new:
            if self.warn_findings and finding.severity != "info":
                rank_zero_warn(f"{self._owner}: {finding.summary()}", category=RuntimeWarning)
        self._logs += 1
        if self.pictures_enabled and self._logs % self.picture_every_n_logs == 0:
            self._draw_pictures(record.step)

    def _on_origin(self, origin: NonFiniteOrigin) -> None:
        depth = self.order.index(origin.module) if origin.module in self._order_set else -1
        finding = origin.to_finding(depth)
        if self.report.add(finding):
            self._share_findings([finding], origin.step)

    def _share_findings(self, findings: list[Finding], step: int) -> None:
        """New findings to the step's observers, and all of this fit's so far as JSON text for
        TensorBoard's overview tab (TensorBoard keeps a sample of a text's steps, always the last)."""
        if not findings:
            return
        self._shared.extend(findings)
        text = json.dumps([dataclasses.asdict(f) for f in self._shared])
        for sink in self.sinks:
            if sink.name == "tensorboard":
                sink.log_text(FINDINGS_KEY, text, step)
        if self._coordinator is not None:
            self._coordinator.notify(step, {}, {}, findings)

    def _draw_pictures(self, step: int) -> None:
        index = {n: i for i, n in enumerate(self.order)}
        for stat, (title, log10, (vmin, vmax)) in PICTURES.items():
            series = self.history.get(stat)
            if not series:
                continue
            modules = sorted(series, key=lambda n: index.get(n, len(index)))
            steps = sorted({s for points in series.values() for s, _ in points})
            column = {s: j for j, s in enumerate(steps)}
            values = np.full((len(modules), len(steps)), np.nan)
            for i, module in enumerate(modules):
                for s, v in series[module]:
                    values[i, column[s]] = v
            try:
                image = heatmap(
                    values, modules, steps, title, log10=log10, vmin=vmin, vmax=vmax, colorbar=stat
                )
            except Exception as exc:  # drawing must never stop training
                self._hook_fault(f"drawing the {stat} picture", exc)
                continue
            self.pictures[stat] = image
            publish_image(
                self.sinks, f"health/{stat}", image, step, self._owner, self._picture_warned
            )

    def _finish(self, trainer: pl.Trainer) -> None:
        """Final pictures and the health report, once per fit."""
        if self._finished or not self._active:
            return
        self._finished = True
        step = trainer.global_step
        try:
            if self.pictures_enabled and self.history:
                self._draw_pictures(step)
            if self.report_enabled:
                text = self.report.to_markdown()
                for sink in self.sinks:
                    sink.log_text(REPORT_KEY, text, step)
                if self.console and trainer.is_global_zero:
                    print_report(self.report)
        except Exception as exc:  # reporting must never hide the real outcome of fit
            self._hook_fault("the health report", exc)
        for sink in self.sinks:
            sink.flush()


def print_report(report: HealthReport) -> None:
    """Print the report to the console: a rich table, or markdown when rich is not installed."""
    try:
        from rich.console import Console
    except ImportError:  # pragma: no cover - rich is an optional dependency
        print(report.to_markdown())
        return
    console = Console()
    if not console.is_terminal:  # logs and CI: do not squeeze the table into 80 columns
        console = Console(width=160)
    if len(report):
        console.print(report.to_rich_table())
    else:
        console.print(report.headline())


def _follows_conv(model: nn.Module, names: set[str]) -> dict[str, bool]:
    """For each named module: whether the last module with parameters registered before it is a
    convolution or a batch norm (then a 3-D output is ``(N, C, L)`` and units are channels)."""
    from lightning_inspect.core.selection import normalise_name

    out: dict[str, bool] = {}
    previous: nn.Module | None = None
    for raw, module in model.named_modules():
        name = normalise_name(raw)
        if name in names:
            out[name] = isinstance(
                previous, (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm)
            )
        if any(True for _ in module.parameters(recurse=False)):
            previous = module
    return out

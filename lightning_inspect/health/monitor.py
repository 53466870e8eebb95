"""HealthMonitor: what is wrong with training, and where (rules, first NaN, pictures, report)."""

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

import lightning_inspect.health.nonfinite as nf
import lightning_inspect.health.rules as hr
from lightning_inspect._validation import as_str_list, check_bool, check_choice, check_positive_int
from lightning_inspect.backends import Sink
from lightning_inspect.backends.pictures import heatmap, publish_image
from lightning_inspect.core import grad_scaler as amp
from lightning_inspect.core.hooks import OutputHook
from lightning_inspect.core.keys import FINDINGS_KEY, metric_key, split_key
from lightning_inspect.core.model_table import print_markdown
from lightning_inspect.core.monitor import ModuleMonitor
from lightning_inspect.core.recorder import HostRecord, StepRecord
from lightning_inspect.core.selection import normalise_name, select_modules
from lightning_inspect.core.stats import squared_norm

#: Key of the end-of-fit report (TensorBoard text; MLflow ``lightning_inspect/health/report.md``).
REPORT_KEY = "health/report"
_FRACTION = {"vmin": 0.0, "vmax": 1.0}
#: The pictures drawn: statistic -> (title, options of the heatmap).
PICTURES: dict[str, tuple[str, dict[str, Any]]] = {
    "zero_fraction": ("fraction of zero outputs (ReLU-like modules)", _FRACTION),
    "saturated_fraction": ("fraction of saturated outputs (Tanh/Sigmoid/Hardtanh)", _FRACTION),
    "grad_norm": ("parameter-gradient norm per module (log10)", {"log10": True}),
    "update_ratio": ("update-to-weight ratio per module (log10)", {"log10": True}),
}
#: 1 when the GradScaler found Inf/NaN gradients and skips the optimizer step (fp16), else 0.
_SKIPPED_KEY = "health/skipped_by_scaler"
_SCALE_KEY = "__health_loss_scale__"  # internal: the GradScaler's scale
_GRADS_SCALED_KEY = "__health_grads_scaled__"  # internal: gradients read still scaled


@dataclasses.dataclass
class _Unit:  # an activation whose output is checked for dead units or saturation
    kind: str
    window: deque[torch.Tensor]  # units alive over the last dead_window logged steps
    dim: int = -1  # the units' dimension of a 3-D output
    count: Any = 0  # zero or saturated outputs this batch, of numel
    numel: int = 0
    alive: torch.Tensor | None = None  # units positive this batch


#: What an output is checked for: dead units ("relu") or saturation; LeakyReLU, GELU... neither.
_KINDS = {nn.ReLU: "relu", nn.ReLU6: "relu", nn.Tanh: "tanh", nn.Sigmoid: "sigmoid"}
_KINDS[nn.Hardtanh] = "hardtanh"  # after ReLU6, its subclass


class HealthMonitor(ModuleMonitor):
    """Diagnose training: dead units, saturation, vanishing/exploding gradients, update sizes, NaN
    (:class:`~lightning_inspect.HealthRules`; a warning per rule and module, a report, pictures).

    Args:
        on_nonfinite: ``"ignore"``, ``"warn"`` (once per module), ``"raise"`` or ``"debug"`` (a
            debugger at the module when stdin is a terminal); the last two stop fit.
        nonfinite_check: ``"module"``, ``"step"`` (one transfer) or ``"auto"`` (CPU: ``"module"``).
        relu_modules: patterns of further modules whose output is post-ReLU (``F.relu``).
        update_ratio: compute the update-to-weight ratio (copies the weights on logged steps).
        picture_every_n_logs: draw the pictures every this many logged steps (and at the end).

    Example:
        >>> monitor = HealthMonitor(on_nonfinite="raise", thresholds={"dead_fraction": 0.8})
        >>> monitor.thresholds.dead_fraction, monitor.thresholds.dead_window
        (0.8, 5)
    """

    def __init__(
        self, modules: str | Sequence[str] | None = "*", exclude: str | Sequence[str] | None = None,
        every_n_steps: int = 50, start_step: int = 0, stop_step: int | None = None,
        backends: str | Sequence[str | Sink] | None = None, on_nonfinite: str = "warn",
        enabled: bool = True, nonfinite_check: str = "auto",
        thresholds: hr.HealthThresholds | Mapping[str, Any] | None = None,
        relu_modules: str | Sequence[str] | None = None, update_ratio: bool = True,
        pictures: bool = True, picture_every_n_logs: int = 10, report: bool = True,
        console: bool = True, warn_findings: bool = True, log_metrics: bool = True,
    ) -> None:  # fmt: skip
        super().__init__(
            modules, exclude, every_n_steps, start_step, stop_step, stats=None, histograms=False,
            bins=2, backends=backends, on_nonfinite="ignore", enabled=enabled,
        )  # fmt: skip
        o = type(self).__name__
        self.on_nonfinite = check_choice(o, "on_nonfinite", on_nonfinite, nf.NONFINITE_ACTIONS)
        self.nonfinite_check = check_choice(o, "nonfinite_check", nonfinite_check, nf.CHECK_MODES)
        self.thresholds = hr.HealthThresholds.checked(o, thresholds)
        self.relu_modules = as_str_list(o, "relu_modules", relu_modules)
        n_logs = picture_every_n_logs
        self.picture_every_n_logs = check_positive_int(o, "picture_every_n_logs", n_logs)
        flags = {"update_ratio": update_ratio, "pictures": pictures, "report": report}
        flags |= {"console": console, "warn_findings": warn_findings, "log_metrics": log_metrics}
        for arg, value in flags.items():  # the report and pictures themselves have those names
            attr = f"{arg}_enabled" if arg in ("pictures", "report") else arg
            setattr(self, attr, check_bool(o, arg, value))
        self.rules = hr.HealthRules(self.thresholds)
        self.report = hr.HealthReport()
        self.pictures: dict[str, np.ndarray] = {}  # the latest picture of each statistic
        #: ``{statistic: {module: [(step, value), ...]}}`` of everything logged.
        self.history: dict[str, dict[str, list[tuple[int, float]]]] = {}
        self.locator: nf.NonFiniteLocator | None = None
        self._order: dict[str, int] = {}  # selected modules in execution order (forward completion)
        self._shared: list[hr.Finding] = []  # this fit's findings written under FINDINGS_KEY
        self._units: dict[str, _Unit] = {}
        self._param_modules: dict[str, list[tuple[str, nn.Parameter]]] = {}
        self._before: dict[str, list[torch.Tensor]] | None = None  # weights before the update
        self._grad_squares: dict[str, torch.Tensor] = {}  # over the optimizer steps of the batch
        self._found_inf: torch.Tensor | None = None  # fp16 skip, read once for locator and rules
        self._skipped_in_a_row = 0
        self._stall_reported = self._finished = False
        self._picture_warned: set[str] = set()

    @property
    def order(self) -> list[str]:
        """The selected modules in execution order (forward completion)."""
        return list(self._order)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "grad_history": self.rules.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.rules.load_state_dict(state_dict.get("grad_history", {}))

    def _after_selection(self, pl_module: pl.LightningModule) -> None:
        self._finished, self._shared = False, []  # a new fit
        owner, relu = f"{self._owner}(relu_modules)", self.relu_modules
        extra = select_modules(pl_module, relu, owner=owner) if relu else {}
        self.selected |= {n: m for n, m in extra.items() if n not in self.selected}
        old, n, self._units = self._units, self.thresholds.dead_window, {}
        for name, module in self.selected.items():
            kind = next((k for cls, k in _KINDS.items() if isinstance(module, cls)), None)
            kind = "relu" if name in extra else kind
            if kind:
                self._units[name] = old.get(name) or _Unit(kind, deque(maxlen=n))
        # Units index the last dimension, or dimension 1 of a 4-D+ output and of a 3-D one
        # after a convolution or a batch norm: (N, C, L).
        previous: nn.Module | None = None
        for raw, module in pl_module.named_modules():
            if (unit := self._units.get(normalise_name(raw))) is not None:
                conv = (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm)
                unit.dim = 1 if isinstance(previous, conv) else -1
            if any(True for _ in module.parameters(recurse=False)):
                previous = module
        self._param_modules = nf.parameters_by_module(self.selected)
        self.locator = None
        if self.on_nonfinite != "ignore":
            check, owner = self.nonfinite_check, self._owner
            self.locator = nf.NonFiniteLocator(self.on_nonfinite, check, owner, self._on_origin)
            self.locator.watch(self.selected, pl_module.device)
            self.locator.gradients_may_overflow = amp.grad_scaler(pl_module) is not None

    def _install_hooks(self) -> None:  # with kwargs: the locator describes a call's inputs
        for name, module in self.selected.items():
            self._hooks.add(module.register_forward_hook(OutputHook(self, name), with_kwargs=True))

    def _on_forward(self, name: str, module: nn.Module, args: Any, kwargs: Any, out: Any) -> None:
        self._order.setdefault(name, len(self._order))
        if self.locator is not None:
            self.locator._on_forward(name, module, args, kwargs, out)
        unit = self._units.get(name)
        if unit is not None and isinstance(out, torch.Tensor) and out.numel() > 0:
            self._accumulate(name, unit, out.detach())

    def _depth(self, name: str) -> int:
        return self._order.get(name, len(self._order))

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        super().on_train_batch_start(trainer, *args)
        if self._recording and self.locator is not None:
            self.locator.start(trainer.global_step, args[-1])  # batch_idx

    def on_before_backward(self, trainer: pl.Trainer, pl_module: Any, loss: torch.Tensor) -> None:
        if self._recording and self.locator is not None:
            self.locator.loss(loss)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        self._found_inf = amp.scaler_found_inf(pl_module, optimizer) if self._recording else None
        try:
            if self._recording and self.locator is not None:
                overflowed = self._found_inf is not None and bool(self._found_inf.item())
                params = dict(sorted(self._param_modules.items(), key=lambda i: self._depth(i[0])))
                self.locator.check(params, overflowed)  # may stop fit before the weights change
            super().on_before_optimizer_step(trainer, pl_module, optimizer)
        finally:
            self._found_inf = None

    def on_train_batch_end(self, *args: Any) -> None:
        if self._recording and self.locator is not None and not self.locator.gradients_may_overflow:
            self.locator.check()  # what a micro-batch without optimizer step left pending
        super().on_train_batch_end(*args)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        self._finish(trainer)

    def on_exception(self, trainer: pl.Trainer, *args: Any) -> None:
        if self._active:
            self._close()  # publish what the interrupted step collected
            self._finish(trainer)  # the report, before the backends are closed
        super().on_exception(trainer, *args)

    def _shutdown(self) -> None:
        if self._active and self.locator is not None:
            self.locator.release()  # no tensor (nor weak reference) outlives the fit
        super()._shutdown()  # last: after a nested fit it brings back the enclosing fit's state

    def _accumulate(self, name: str, unit: _Unit, y: torch.Tensor) -> None:
        if y.is_complex() or y.ndim == 0 or y.layout != torch.strided:
            return  # no units or bounds: complex, 0-d and sparse outputs are checked for NaN only
        if unit.kind == "relu":
            dim = unit.dim if y.ndim == 3 else (1 if y.ndim >= 4 else -1)
            alive = (y > 0).movedim(dim, -1).reshape(-1, y.shape[dim]).any(0)
            same = unit.alive is not None and unit.alive.shape == alive.shape
            unit.alive = unit.alive | alive if same else alive
            count = torch.count_nonzero(y == 0)
        elif unit.kind == "hardtanh":
            module = self.selected[name]
            count = torch.count_nonzero((y <= module.min_val) | (y >= module.max_val))
        else:
            m = self.thresholds.saturation_margin
            bad = y.abs() > 1 - m if unit.kind == "tanh" else (y < m) | (y > 1 - m)
            count = torch.count_nonzero(bad)
        unit.count, unit.numel = count + unit.count, unit.numel + y.numel()

    def _before_optimizer_step(self, pl_module: pl.LightningModule) -> None:
        first = self._before is None  # several optimizers: the first step of the batch
        if first and self._found_inf is not None:  # fp16: the GradScaler skips this step
            self._add_scalar(_SKIPPED_KEY, self._found_inf)
            scale = amp.loss_scale(pl_module)
            if scale is not None:
                self._add_scalar(_SCALE_KEY, scale)
                if amp.gradients_scaled(pl_module, self._optimizer):  # unscaled in step() only
                    self._add_scalar(_GRADS_SCALED_KEY, torch.ones((), device=scale.device))
        owned = {(m, n): p for m, params in self._param_modules.items() for n, p in params}
        grads: dict[str, list[torch.Tensor]] = {}
        for (module, _), param in self._stepped(owned).items():  # what this optimizer updates
            if param.grad is not None:
                grads.setdefault(module, []).append(nf.stored_values(param.grad))
        with torch.no_grad():
            for module, tensors in grads.items():
                square = squared_norm(tensors) + self._grad_squares.get(module, 0.0)
                self._grad_squares[module] = square
            if first:  # the weights before every optimizer step of the batch
                modules = self._param_modules.items() if self.update_ratio else ()
                self._before = {m: [p.detach().clone() for _, p in ps] for m, ps in modules}

    def _finish_step(self) -> None:
        squares, self._grad_squares = self._grad_squares, {}
        for module, square in squares.items():
            self._add_scalar(metric_key("health", module, "grad_norm"), square.sqrt())
        self._before = None  # an interrupted step's copies
        super()._finish_step()

    def _after_optimizer_step(self, pl_module: pl.LightningModule) -> None:
        before, self._before = self._before or {}, None
        with torch.no_grad():
            for module, olds in before.items():  # each module owns at least one parameter
                w2 = squared_norm(olds)
                torch._foreach_sub_(olds, [p.detach() for _, p in self._param_modules[module]])
                u2 = squared_norm(olds)  # the copies became -(update): no third copy
                # A module whose weights are all zero has no ratio: NaN is dropped on the host.
                ratio = torch.where(w2 > 0, (u2 / w2).sqrt(), torch.nan)
                self._add_scalar(metric_key("health", module, "update_ratio"), ratio)
            for name, unit in self._units.items():
                if unit.numel:
                    stat = "zero_fraction" if unit.kind == "relu" else "saturated_fraction"
                    share = unit.count.to(torch.float64) / unit.numel
                    self._add_scalar(metric_key("health", name, stat), share)
                window, alive = unit.window, unit.alive
                if alive is not None:
                    if window and window[-1].shape != alive.shape:
                        window.clear()
                    window.append(alive)
                    if len(window) == window.maxlen:
                        dead = 1.0 - torch.stack(list(window)).any(0).to(torch.float64).mean()
                        self._add_scalar(metric_key("health", name, "dead_fraction"), dead)
                unit.count, unit.numel, unit.alive = 0, 0, None

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
            if key == _SKIPPED_KEY or (skipped and key.endswith(("/grad_norm", "/update_ratio"))):
                continue  # overflowed gradients and an update that never happened: nothing to judge
            _, module, _, stat = split_key(key)
            stats.setdefault(module, {})[stat] = value
            self.history.setdefault(stat, {}).setdefault(module, []).append((record.step, value))
            if stat == "dead_fraction" and module in self._units:
                stats[module]["units"] = float(self._units[module].window[-1].numel())
        kinds = {n: u.kind.capitalize() for n, u in self._units.items()}  # Tanh, Sigmoid, Hardtanh
        findings = self.rules.observe(record.step, stats, self.order, kinds)
        if self.locator is not None and any(o.step == record.step for o in self.locator.origins):
            # The origin of this step's NaN/Inf is in the report: the rest follows from it.
            findings = [f for f in findings if f.rule != "nonfinite"]
        self._skipped_in_a_row = self._skipped_in_a_row + 1 if skipped else 0
        self._stall_reported = self._stall_reported and skipped
        stalled = skipped and scale is not None and scale <= hr.SCALER_STALL_SCALE
        if stalled and not self._stall_reported:  # healthy: a few skips while the scale comes down
            self._stall_reported = True
            args = ("", "loss_scale", scale, record.step, hr.SCALER_STALL_SCALE)
            findings.append(hr._finding("grad_scaler_stalled", *args, seen=self._skipped_in_a_row))
        self.report.logged_steps += 1
        self._add_findings(findings, record.step)
        if self.pictures_enabled and self.report.logged_steps % self.picture_every_n_logs == 0:
            self._draw_pictures(record.step)

    def _on_origin(self, origin: nf.NonFiniteOrigin) -> None:
        depth = self._order.get(origin.module, -1)
        self._add_findings([origin.to_finding(depth)], origin.step, warn=False)  # it warns itself

    def _add_findings(self, findings: list[hr.Finding], step: int, warn: bool = True) -> None:
        """The report, a warning, the observers, TensorBoard's overview tab (this fit's findings)."""
        new = self.report.extend(findings)
        if not new:
            return
        for finding in (f for f in new if warn and self.warn_findings and f.severity != "info"):
            rank_zero_warn(f"{self._owner}: {finding.summary()}", category=RuntimeWarning)
        self._shared.extend(new)
        text = json.dumps([dataclasses.asdict(f) for f in self._shared])
        for sink in (s for s in self.sinks if s.name == "tensorboard"):
            sink.log_text(FINDINGS_KEY, text, step)
        if self._coordinator is not None:
            self._coordinator.notify(step, {}, {}, new)

    def _draw_pictures(self, step: int) -> None:
        for stat, (title, options) in PICTURES.items():
            series = self.history.get(stat)
            if not series:
                continue
            modules = sorted(series, key=self._depth)
            steps = sorted({s for points in series.values() for s, _ in points})
            points = [dict(series[m]) for m in modules]  # once per module, not once per step
            values = np.array([[p.get(s, np.nan) for s in steps] for p in points])
            try:
                image = heatmap(values, modules, steps, title, colorbar=stat, **options)
            except Exception as exc:  # drawing must never stop training
                self._hook_fault(f"drawing the {stat} picture", exc)
                continue
            self.pictures[stat] = image
            warned = self._picture_warned
            publish_image(self.sinks, f"health/{stat}", image, step, self._owner, warned)

    def _finish(self, trainer: pl.Trainer) -> None:  # once per fit
        if self._finished or not self._active:
            return
        self._finished = True
        try:
            if self.pictures_enabled and self.history:
                self._draw_pictures(trainer.global_step)
            if self.report_enabled:
                for sink in self.sinks:
                    sink.log_text(REPORT_KEY, self.report.to_markdown(), trainer.global_step)
                if self.console and trainer.is_global_zero:
                    print_markdown(self.report.to_markdown())
        except Exception as exc:  # reporting must never hide the real outcome of fit
            self._hook_fault("the health report", exc)
        for sink in self.sinks:
            sink.flush()

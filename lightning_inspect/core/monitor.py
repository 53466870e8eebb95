"""ModuleMonitor: what every module monitor shares (arguments, selection, schedule, hook
lifetime, publishing); a subclass turns what it sees into rows and scalars. Output hooks live
only inside logged batches, except on compiled models (``torch.compile`` ignores hooks added
later): there they stay from ``on_fit_start`` to ``teardown`` and return at once when idle.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Sequence
from typing import Any, TypeVar

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lightning_inspect._validation import (
    check_bool,
    check_choice,
    check_choices,
    check_patterns,
    check_positive_int,
)
from lightning_inspect.backends import (
    METRIC_MODES,
    Sink,
    check_backends,
    close_sinks,
    resolve_sinks,
)
from lightning_inspect.core.hooks import HookSet, OutputHook
from lightning_inspect.core.keys import metric_key
from lightning_inspect.core.recorder import HostRecord, StepCoordinator, StepRecord
from lightning_inspect.core.row import N_FIELDS, Field
from lightning_inspect.core.schedule import Schedule
from lightning_inspect.core.selection import (
    empty_selection_message,
    select_modules,
    select_parameters,
)
from lightning_inspect.core.stats import ALL_STATS, DEFAULT_STATS, histogram, summarise_rows
from lightning_inspect.errors import InspectError, NonFiniteError

NONFINITE_ACTIONS = ("ignore", "warn", "raise")
_K = TypeVar("_K")
#: Most histogram bins: each logged histogram costs 16 bytes a bin in TensorBoard.
MAX_BINS = 1024
_MAX_LISTED = 12


def local_values(t: torch.Tensor) -> torch.Tensor:
    """A sparse tensor's stored values, a sharded (DTensor) one's local shard, else ``t``."""
    t = t.coalesce().values() if t.is_sparse else t
    return t.to_local() if hasattr(t, "to_local") else t


class _KeepsArguments:
    """Keeps the constructor's arguments (a nested fit starts from a monitor built alike); after
    the monitor classes in the MRO, so that signatures are their ``__init__``'s."""

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        self = super().__new__(cls)
        self._init_args = (args, kwargs)
        return self


class ModuleMonitor(Callback, _KeepsArguments):
    """Base class of :class:`ActivationMonitor`, :class:`GradientMonitor` and :class:`WeightMonitor`.

    Args:
        modules: module name patterns: shell-style globs (``"encoder.*"``) or regexes prefixed
            ``"re:"``, over names without wrappers' prefixes; ``None``: modules owning parameters.
        exclude: module name patterns removed from the selection.
        every_n_steps: log every this many optimizer steps (``trainer.global_step``); a batch
            taking several steps is logged once, when one of them is due.
        start_step: first optimizer step logged.
        stop_step: no logging from this optimizer step on (``None``: never stop).
        stats: statistics to log, from :data:`~lightning_inspect.core.stats.ALL_STATS`
            (``None``: :data:`~lightning_inspect.core.stats.DEFAULT_STATS`).
        histograms: also log histograms.
        bins: histogram bins, 2 to :data:`MAX_BINS` (1024).
        backends: backend names or Sink objects; ``None``: every supported attached logger.
        on_nonfinite: ``"ignore"``, ``"warn"`` (once per key, naming the first module in
            execution order) or ``"raise"`` (:class:`NonFiniteError`, which stops fit cleanly).
        enabled: ``False`` attaches the callback but inspects nothing (costs nothing).
        mlflow_metrics: MLflow metrics: ``"summary"`` (global norm, a summary over modules per
            kind and statistic) or ``"all"``; every value is in the run's table artifact either way.
    """

    def __init__(
        self,
        modules: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        every_n_steps: int = 50,
        start_step: int = 0,
        stop_step: int | None = None,
        stats: Sequence[str] | None = None,
        histograms: bool = True,
        bins: int = 64,
        backends: str | Sequence[str | Sink] | None = None,
        on_nonfinite: str = "warn",
        enabled: bool = True,
        mlflow_metrics: str = "summary",
    ) -> None:
        owner = self._owner = type(self).__name__
        self.modules = check_patterns(owner, "modules", modules)
        self.exclude = check_patterns(owner, "exclude", exclude)
        self.schedule = Schedule.checked(owner, every_n_steps, start_step, stop_step)
        self.stats = check_choices(owner, "stats", stats, ALL_STATS, DEFAULT_STATS)
        self._stat_keys: dict[str, list[str]] = {}  # row key -> its metric keys (stats order)
        self.histograms = check_bool(owner, "histograms", histograms)
        self.bins = check_positive_int(owner, "bins", bins, 2, MAX_BINS) if self.histograms else 0
        self.backends = check_backends(owner, backends)
        self.mlflow_metrics = check_choice(owner, "mlflow_metrics", mlflow_metrics, METRIC_MODES)
        self.on_nonfinite = check_choice(owner, "on_nonfinite", on_nonfinite, NONFINITE_ACTIONS)
        self.enabled = check_bool(owner, "enabled", enabled)

        self.selected: dict[str, torch.nn.Module] = {}
        self.sinks: list[Sink] = []
        self.last_logged_step: int | None = None
        self._hooks = HookSet()
        self._recording = False  # read first by every hook; True only inside recorded batches
        self._persistent_hooks = False
        self._record: StepRecord | None = None
        self._optimizer: torch.optim.Optimizer | None = None
        self._coordinator: StepCoordinator | None = None
        self._active = False
        self._model_parameters: set[int] = set()  # ids of the model's parameters
        self._steps_per_batch = 1  # optimizer steps a batch is expected to take (the last one)
        self._batch_start_step = 0
        self._warned_nonfinite: set[str] = set()
        self._hook_fault_warned = False
        self._outer_fit: dict[str, Any] | None = None  # the enclosing fit's state, in a nested fit

    # -- Lightning glue ---------------------------------------------------------------------

    @property
    def state_key(self) -> str:
        every = {"every_n_steps": self.schedule.every_n_steps}
        return self._generate_state_key(modules=self.modules, exclude=self.exclude, **every)

    def state_dict(self) -> dict[str, Any]:
        return {"last_logged_step": self.last_logged_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last_logged_step = state_dict.get("last_logged_step")

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or not self.enabled:
            return
        if self._active:  # a fit started inside this monitor's fit: fresh state until it ends
            outer = self.__dict__
            args, kwargs = self._init_args
            self.__dict__ = type(self)(*args, **kwargs).__dict__
            self._outer_fit = outer
        self._active = True
        self.last_logged_step = None  # a new fit; resuming restores it after setup
        self.sinks = resolve_sinks(
            trainer, self.backends, owner=self._owner, mlflow_metrics=self.mlflow_metrics
        )
        self._coordinator = StepCoordinator.for_trainer(trainer)
        self._coordinator.join(self)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Here, not in setup: layers built in configure_model exist only now (still before step 0)
        if not self._active:
            return
        self.selected = select_modules(pl_module, self.modules, self.exclude, owner=self._owner)
        if not self.selected:
            message = empty_selection_message(pl_module, self.modules, self.exclude, self._owner)
            rank_zero_warn(message, category=RuntimeWarning)
        self._model_parameters = {id(p) for p in pl_module.parameters()}
        manual = not pl_module.automatic_optimization
        self._steps_per_batch = max(1, len(trainer.optimizers)) if manual else 1
        self._after_selection(pl_module)
        compiled = (type(m).__name__ == "OptimizedModule" for m in pl_module.modules())
        self._persistent_hooks = bool(getattr(pl_module, "_compiler_ctx", None)) or any(compiled)
        if self._persistent_hooks:
            self._install_hooks()
        self._announce()

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if not self._active:
            return
        step = self._batch_start_step = trainer.global_step
        if self._record is None:  # else: a step due in an earlier batch is still to be taken
            last = self.last_logged_step
            first = step if last is None else max(step, last + 1)
            due = self.schedule.first_due(first, step + self._steps_per_batch)
            if due is None:
                return
            self._record = StepRecord(due)
        if not self._persistent_hooks and not len(self._hooks):
            self._install_hooks()
        self._recording = True

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self._active and self._record is not None:
            self._optimizer = optimizer  # for the duration of this call only
            try:
                self._guarded(self._before_optimizer_step, pl_module)
            finally:
                self._optimizer = None

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if not self._active:
            return
        self._recording = False
        if not self._persistent_hooks:
            self._hooks.remove()
        taken = trainer.global_step - self._batch_start_step
        if taken > 0:
            self._steps_per_batch = taken
        record = self._record
        if record is not None and trainer.global_step > record.step:
            self._guarded(self._after_optimizer_step, pl_module)
            self._finish_step()
        if self._coordinator is not None:
            self._coordinator.batch_end(self)  # may raise NonFiniteError (on_nonfinite="raise")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._shutdown()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._shutdown()

    # -- subclass interface -----------------------------------------------------------------

    def _after_selection(self, pl_module: pl.LightningModule) -> None:
        """Derive what the subclass needs from ``self.selected`` (e.g. parameters)."""

    def _wants_output_hooks(self) -> bool:
        return False

    def _on_output(self, name: str, path: str, tensor: torch.Tensor) -> None:
        """One output tensor of a selected module (``path`` inside its output)."""

    def _before_optimizer_step(self, pl_module: pl.LightningModule) -> None:
        """Record what is read before each optimizer step."""

    def _after_optimizer_step(self, pl_module: pl.LightningModule) -> None:
        """Record what needs the updated weights."""

    def _selection_summary(self) -> tuple[str, list[str]]:
        return "modules", list(self.selected)

    def _expected_nonfinite(self, key: str) -> bool:
        """Whether non-finite values under ``key`` are expected this step (no warning)."""
        return False

    # -- shared machinery -------------------------------------------------------------------

    def _parameter_patterns(self, params: object, exclude_params: object) -> None:
        owner = self._owner
        self.params = check_patterns(owner, "params", params, "parameter")
        self.exclude_params = check_patterns(owner, "exclude_params", exclude_params, "parameter")
        self.selected_parameters: dict[str, torch.nn.Parameter] = {}

    def _select_parameters(self) -> dict[str, torch.nn.Parameter]:
        return select_parameters(self.selected, self.params, self.exclude_params, owner=self._owner)

    def _stepped(self, params: dict[_K, torch.nn.Parameter]) -> dict[_K, torch.nn.Parameter]:
        """The entries of ``params`` the current optimizer updates (all of them when it holds
        none of the model's parameters: it steps copies, e.g. master weights)."""
        if self._optimizer is None:
            return params
        ids = {id(p) for group in self._optimizer.param_groups for p in group["params"]}
        if ids.isdisjoint(self._model_parameters):
            return params
        return {n: p for n, p in params.items() if id(p) in ids}

    def _install_hooks(self) -> None:
        if self._wants_output_hooks():
            for name, module in self.selected.items():
                self._hooks.add(module.register_forward_hook(OutputHook(self, name)))

    def _add_row(self, key: str, row: torch.Tensor) -> None:
        if self._record is not None:
            self._record.add_row(key, row)

    def _add_scalar(self, key: str, value: torch.Tensor) -> None:
        if self._record is not None:
            self._record.add_scalar(key, value)

    def _hook_fault(self, where: str, exc: BaseException) -> None:
        """An exception inside one of our hooks: warn once, keep training."""
        if not self._hook_fault_warned:
            self._hook_fault_warned = True
            message = f"{self._owner}: inspecting {where} failed ({type(exc).__name__}: {exc}); "
            message += "training is not affected and inspection goes on for the other values."
            warnings.warn(message, RuntimeWarning, stacklevel=2)

    def _guarded(self, fn: Any, *args: Any) -> None:
        try:
            fn(*args)
        except InspectError:
            raise  # the library's own decisions (e.g. stop at a NaN) go through
        except Exception as exc:  # inspection must never stop training
            self._hook_fault(getattr(fn, "__name__", "a step"), exc)

    def _finish_step(self) -> None:
        record, self._record = self._record, None
        if record is None:
            return
        self.last_logged_step = record.step
        if self._coordinator is not None:
            self._coordinator.submit(record, self._publish)

    def _publish(self, record: StepRecord, values: HostRecord) -> None:
        rows, scalars = values
        out: dict[str, float] = {}
        if rows:  # every statistic of every row at once, in row order, then self.stats order
            table = summarise_rows(np.stack([row[:N_FIELDS] for row in rows.values()]), self.stats)
            names = []
            for key in rows:
                if key not in self._stat_keys:
                    self._stat_keys[key] = [metric_key(key, stat) for stat in self.stats]
                names += self._stat_keys[key]
            out = dict(zip(names, table.ravel().tolist(), strict=True))
        hists = {k: histogram(r) for k, r in rows.items()} if self.histograms else {}
        hists = {k: h for k, h in hists.items() if h is not None}
        out.update(scalars)
        if not out:
            return
        for sink in self.sinks:
            sink.log_scalars(out, record.step)
            if hists:
                sink.log_histograms(hists, record.step)
        if self._coordinator is not None:
            self._coordinator.notify(record.step, out, hists)
        self._check_nonfinite(rows, record.step)

    def _check_nonfinite(self, rows: dict[str, Any], step: int) -> None:
        if self.on_nonfinite == "ignore":
            return
        expected = self._expected_nonfinite
        bad = [(k, r) for k, r in rows.items() if r[Field.NAN] + r[Field.INF] and not expected(k)]
        if not bad:
            return
        key, row = bad[0]
        later = f"; also in {len(bad) - 1} later key(s): {', '.join(k for k, _ in bad[1:4])}"
        message = (
            f"{self._owner}: non-finite values at step {step}: first in execution order is {key!r} "
            f"({int(row[Field.NAN])} NaN, {int(row[Field.INF])} Inf of {int(row[Field.COUNT])} "
            f"values){later if len(bad) > 1 else ''}."
        )
        if self.on_nonfinite == "raise":
            raise NonFiniteError(message)
        if key not in self._warned_nonfinite:
            self._warned_nonfinite.add(key)
            warnings.warn(message, RuntimeWarning, stacklevel=2)

    def _announce(self) -> None:
        what, names = self._selection_summary()
        more = f", ... ({len(names) - _MAX_LISTED} more)" if len(names) > _MAX_LISTED else ""
        shown = ", ".join(names[:_MAX_LISTED]) + more
        backends = ", ".join(s.name for s in self.sinks) or "no backend"
        rank_zero_info(
            f"{self._owner}: {len(names)} {what} selected, every {self.schedule.every_n_steps} steps "
            f"-> {backends}: {shown}"
        )

    def _shutdown(self) -> None:
        """End of fit (normal or not): publish, flush, close the backends, forget the Trainer."""
        if not self._active:
            return
        self._close()
        close_sinks(self.sinks)
        self.sinks = []
        if self._coordinator is not None:
            self._coordinator.leave(self)
            self._coordinator = None
        self._active = False
        if self._outer_fit is not None:  # a nested fit ended: back to the enclosing fit
            self.__dict__ = self._outer_fit

    def _close(self) -> None:
        self._recording = False
        self._hooks.remove()
        if self._record is not None:  # a logged step interrupted before its optimizer step
            self._finish_step()
        if self._coordinator is not None:
            # NonFiniteError: already being handled, or fit is over: the values were logged
            with contextlib.suppress(NonFiniteError):
                self._coordinator.flush()
        for sink in self.sinks:
            sink.flush()

"""WeightMonitor: statistics and histograms of parameters, and the update-to-weight ratio."""

from __future__ import annotations

from collections.abc import Sequence

import lightning.pytorch as pl
import torch

from lightning_inspect._validation import check_bool
from lightning_inspect.backends import Sink
from lightning_inspect.core.keys import escape_name, metric_key
from lightning_inspect.core.monitor import ModuleMonitor, local_values
from lightning_inspect.core.stats import reduce_tensor


class WeightMonitor(ModuleMonitor):
    """Log the parameters of selected modules, read before a logged batch's first optimizer step.

    Args:
        update_ratio: log ``||W_after - W_before|| / ||W_before||`` (float64 norms; healthy:
            often near 1e-3) from a copy of the selected parameters held during logged batches;
            a zero-norm parameter gives ``inf`` if the step moved it, else ``NaN``.
        params: parameter name patterns kept (``"*.weight"``; ``None``: all); one that matches
            none stops fit at its start with the closest names.
        exclude_params: parameter name patterns removed (``"*.bias"``).
        **kwargs: every argument of :class:`~lightning_inspect.core.monitor.ModuleMonitor`.

    Logged metrics:
        ``weights/<parameter>/<stat>``, ``weights/<parameter>/update_ratio`` and the histogram
        ``weights/<parameter>``.

    Example::

        WeightMonitor(every_n_steps=200, exclude_params="*.bias")
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
        update_ratio: bool = True,
        params: str | Sequence[str] | None = None,
        exclude_params: str | Sequence[str] | None = None,
        mlflow_metrics: str = "summary",
    ) -> None:
        base = (modules, exclude, every_n_steps, start_step, stop_step, stats, histograms, bins)
        super().__init__(*base, backends, on_nonfinite, enabled, mlflow_metrics)
        self.update_ratio = check_bool(self._owner, "update_ratio", update_ratio)
        self._parameter_patterns(params, exclude_params)
        self._before: list[torch.Tensor] | None = None

    def _after_selection(self, pl_module: pl.LightningModule) -> None:
        self.selected_parameters = self._select_parameters()

    def _selection_summary(self) -> tuple[str, list[str]]:
        return "parameters", list(self.selected_parameters)

    def _before_optimizer_step(self, pl_module: pl.LightningModule) -> None:
        if self._before is not None:  # several optimizers: the first call of the step counts
            return
        with torch.no_grad():
            params = [local_values(p) for p in self.selected_parameters.values()]
            for name, param in zip(self.selected_parameters, params, strict=False):
                key = metric_key("weights", escape_name(name))
                self._add_row(key, reduce_tensor(param, self.bins))
            self._before = [p.detach().clone() for p in params] if self.update_ratio else []

    def _finish_step(self) -> None:
        self._before = None  # an interrupted step's copies (normally released just below)
        super()._finish_step()

    def _after_optimizer_step(self, pl_module: pl.LightningModule) -> None:
        before, self._before = self._before, None
        if not before:
            return
        with torch.no_grad():
            after = [local_values(p).detach() for p in self.selected_parameters.values()]
            # float64 norms: no overflow for huge finite weights
            norms = torch._foreach_norm(before, 2, dtype=torch.float64)
            torch._foreach_sub_(before, after)  # in place: the copy becomes -(update)
            updates = torch._foreach_norm(before, 2, dtype=torch.float64)
            for name, upd, norm in zip(self.selected_parameters, updates, norms, strict=False):
                # IEEE division: a zero norm gives inf when the parameter moved, NaN when it did not
                ratio = upd / norm.to(upd.device)
                self._add_scalar(metric_key("weights", escape_name(name), "update_ratio"), ratio)

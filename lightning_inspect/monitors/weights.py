"""WeightMonitor: statistics and histograms of parameters, and the update-to-weight ratio."""

from __future__ import annotations

from collections.abc import Sequence

import lightning.pytorch as pl
import torch

from lightning_inspect._validation import check_bool
from lightning_inspect.backends import Sink
from lightning_inspect.core.keys import escape_name, metric_key
from lightning_inspect.core.stats import reduce_tensor
from lightning_inspect.monitors.base import ModuleMonitor, local_values


class WeightMonitor(ModuleMonitor):
    """Log the parameters of selected modules.

    Weights are read in ``on_before_optimizer_step`` of a logged batch (its first optimizer step
    when it takes several): the values its forward used. ``update_ratio`` logs
    ``||W_after - W_before|| / ||W_before||`` (healthy training: often near 1e-3) from a copy of
    every selected parameter held from that step to the end of logged batches (50M float32
    parameters: 200 MB more at those moments); the update is computed in that copy.

    Args:
        update_ratio: log ``weights/<parameter>/update_ratio``.
        params: patterns over the qualified names of the selected modules' parameters
            (``"*.weight"``, ``"re:.*attn.*"``); ``None``: all of them. A pattern that matches
            none of them stops fit at its start with the closest parameter names.
        exclude_params: parameter-name patterns removed (``"*.bias"``). ``modules`` and
            ``exclude`` match module names only.
        **kwargs: every argument of :class:`~lightning_inspect.monitors.base.ModuleMonitor`.

    Logged metrics:
        ``weights/<parameter>/<stat>``, ``weights/<parameter>/update_ratio`` and the histogram
        ``weights/<parameter>``. The ratio's norms are float64; a parameter whose norm is 0 (a
        zero-initialised bias) has ratio ``inf`` if the step moved it and ``NaN`` if it did not.

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

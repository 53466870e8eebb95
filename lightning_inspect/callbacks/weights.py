"""WeightMonitor: statistics and histograms of parameters, and the update-to-weight ratio."""

from __future__ import annotations

from collections.abc import Sequence

import lightning.pytorch as pl
import torch

from lightning_inspect._checks import check_bool
from lightning_inspect.callbacks.base import ModuleMonitor
from lightning_inspect.keys import metric_key
from lightning_inspect.selection import select_parameters
from lightning_inspect.sinks import Sink
from lightning_inspect.stats import reduce_tensor


class WeightMonitor(ModuleMonitor):
    """Log the parameters of selected modules.

    Weights are read in ``on_before_optimizer_step`` of a logged step, i.e. the values the step's
    forward pass used. With ``update_ratio`` a copy of the selected parameters is kept for the
    duration of that one optimizer step (and only then) to log ``||W_after - W_before|| / ||W_before||``:
    the size of this step's update relative to the weights (healthy training is often near 1e-3).

    Args:
        update_ratio: log ``weights/<parameter>/update_ratio``.
        **kwargs: every argument of :class:`~lightning_inspect.callbacks.base.ModuleMonitor`.

    Logged metrics:
        ``weights/<parameter>/<stat>``, ``weights/<parameter>/update_ratio`` and the histogram
        ``weights/<parameter>``.

    Example::

        WeightMonitor(every_n_steps=200, exclude="*.bias")
    """

    kind = "weights"

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
        mlflow_metrics: str = "summary",
    ) -> None:
        super().__init__(
            modules, exclude, every_n_steps, start_step, stop_step, stats, histograms, bins,
            backends, on_nonfinite, enabled, mlflow_metrics,
        )
        self.update_ratio = check_bool(self._owner, "update_ratio", update_ratio)
        self.selected_parameters: dict[str, torch.nn.Parameter] = {}
        self._before: list[torch.Tensor] | None = None

    def _after_selection(self, pl_module: pl.LightningModule) -> None:
        self.selected_parameters = select_parameters(self.selected)

    def _selection_summary(self) -> tuple[str, list[str]]:
        return "parameters", list(self.selected_parameters)

    def _before_optimizer_step(self, pl_module: pl.LightningModule) -> None:
        if self._before is not None:  # several optimizers: the first call of the step counts
            return
        with torch.no_grad():
            params = [_local(p) for p in self.selected_parameters.values()]
            for name, param in zip(self.selected_parameters, params):
                self._add_row(metric_key("weights", name), reduce_tensor(param, self.bins))
            self._before = [p.detach().clone() for p in params] if self.update_ratio else []

    def _after_optimizer_step(self, pl_module: pl.LightningModule) -> None:
        before, self._before = self._before, None
        if not before:
            return
        with torch.no_grad():
            after = [_local(p).detach() for p in self.selected_parameters.values()]
            norms = torch._foreach_norm(before)
            torch._foreach_sub_(before, after)  # in place: the copy becomes -(update), no third copy
            updates = torch._foreach_norm(before)
            tiny = torch.finfo(torch.float32).tiny
            for name, upd, norm in zip(self.selected_parameters, updates, norms):
                ratio = upd.to(torch.float32) / norm.to(torch.float32).clamp(min=tiny)
                self._add_scalar(metric_key("weights", name, "update_ratio"), ratio)


def _local(param: torch.Tensor) -> torch.Tensor:
    """A sharded (DTensor) parameter's local shard; any other tensor as it is."""
    return param.to_local() if hasattr(param, "to_local") else param

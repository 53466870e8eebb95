"""GradientMonitor: gradients of module outputs and of parameters, and the global norm."""

from __future__ import annotations

from collections.abc import Sequence

import lightning.pytorch as pl
import torch

from lightning_inspect._checks import check_bool
from lightning_inspect.callbacks._grad_scaler import gradients_scaled, loss_scale, scaler_found_inf
from lightning_inspect.callbacks._module_hooks import OutputGradHook
from lightning_inspect.callbacks.base import ModuleMonitor
from lightning_inspect.keys import metric_key
from lightning_inspect.selection import select_parameters
from lightning_inspect.sinks import Sink
from lightning_inspect.recorder import HostRecord, StepRecord
from lightning_inspect.stats import reduce_tensor, scale_row


class GradientMonitor(ModuleMonitor):
    """Log gradient statistics and histograms for selected modules.

    Args:
        outputs: log the gradient with respect to each selected module's output tensors
            (read by tensor hooks during backward; works with in-place modules).
        parameters: log the gradient of each parameter of the selected modules, read in
            ``on_before_optimizer_step``: after AMP unscaling, once per optimizer step under
            gradient accumulation.
        global_norm: log the L2 norm of all parameter gradients of the model (not only selected).
        **kwargs: every argument of :class:`~lightning_inspect.callbacks.base.ModuleMonitor`.

    Logged metrics:
        ``activation_grads/<module>[/<output path>]/<stat>``, ``param_grads/<parameter>/<stat>``,
        ``param_grads/global_norm``, and histograms under the same keys without ``/<stat>``.

    Example::

        GradientMonitor(modules="encoder.*", every_n_steps=50, outputs=False)
    """

    kind = "gradients"

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
        outputs: bool = True,
        parameters: bool = True,
        global_norm: bool = True,
        mlflow_metrics: str = "summary",
    ) -> None:
        super().__init__(
            modules, exclude, every_n_steps, start_step, stop_step, stats, histograms, bins,
            backends, on_nonfinite, enabled, mlflow_metrics,
        )
        self.outputs = check_bool(self._owner, "outputs", outputs)
        self.parameters = check_bool(self._owner, "parameters", parameters)
        self.global_norm = check_bool(self._owner, "global_norm", global_norm)
        self.selected_parameters: dict[str, torch.nn.Parameter] = {}
        self._all_parameters: list[torch.nn.Parameter] = []
        self._scaler_skipped = False

    def _after_selection(self, pl_module: pl.LightningModule) -> None:
        params = select_parameters(self.selected)
        self.selected_parameters = {n: p for n, p in params.items() if p.requires_grad}
        self._all_parameters = [p for p in pl_module.parameters() if p.requires_grad]

    def _wants_output_hooks(self) -> bool:
        return self.outputs

    def _on_output(self, name: str, path: str, tensor: torch.Tensor) -> None:
        if tensor.requires_grad and torch.is_grad_enabled() and tensor.is_floating_point():
            tensor.register_hook(OutputGradHook(self, metric_key("activation_grads", name, path)))

    def _on_output_grad(self, key: str, grad: torch.Tensor) -> None:
        self._add_row(key, reduce_tensor(grad, self.bins))

    def _before_optimizer_step(self, pl_module: pl.LightningModule) -> None:
        scale = loss_scale(pl_module)
        if scale is not None and self.outputs:  # output gradients were read before unscaling
            self._add_scalar(_LOSS_SCALE_KEY, scale)
        if scale is not None and gradients_scaled(pl_module, self._optimizer):
            self._add_scalar(_PARAM_SCALE_KEY, scale)  # an optimizer that unscales in step()
        skipped = scaler_found_inf(pl_module, self._optimizer)
        if skipped is not None:  # the GradScaler will skip this step: its Inf/NaN are expected
            self._add_scalar(SKIPPED_KEY, skipped)
        if self.parameters:
            for name, param in self.selected_parameters.items():
                if param.grad is not None:
                    self._add_row(metric_key("param_grads", name), reduce_tensor(_dense(param.grad), self.bins))
        if self.global_norm:
            grads = [_dense(p.grad) for p in self._all_parameters if p.grad is not None]
            if grads:
                norms = torch._foreach_norm(grads)
                device = norms[0].device
                total = torch.linalg.vector_norm(torch.stack([n.to(device, torch.float32) for n in norms]))
                self._add_scalar("param_grads/global_norm", total)


    def _publish(self, record: StepRecord, values: HostRecord) -> None:
        rows, scalars = values
        self._scaler_skipped = bool(scalars.get(SKIPPED_KEY))
        scale = scalars.pop(_LOSS_SCALE_KEY, None)
        if scale:  # output gradients carried the loss scale of mixed precision: divide it out
            rows = {k: scale_row(r, 1.0 / scale) if k.startswith("activation_grads/") else r for k, r in rows.items()}
        param_scale = scalars.pop(_PARAM_SCALE_KEY, None)
        if param_scale:  # so did the parameter gradients of an optimizer that unscales in step()
            rows = {k: scale_row(r, 1.0 / param_scale) if k.startswith("param_grads/") else r for k, r in rows.items()}
            if "param_grads/global_norm" in scalars:
                scalars["param_grads/global_norm"] /= param_scale
        super()._publish(record, (rows, scalars))


    def _expected_nonfinite(self, key: str) -> bool:
        # Overflowing gradients are how a GradScaler finds its scale: the step is skipped, not broken.
        return self._scaler_skipped and not key.startswith("activations/")


#: Internal scalar carrying the GradScaler's scale to the host with the step's values.
_LOSS_SCALE_KEY = "__loss_scale__"
#: Internal: the loss scale, when the parameter gradients were read still scaled.
_PARAM_SCALE_KEY = "__param_grad_scale__"
#: 1 when the GradScaler found Inf/NaN gradients and skips the optimizer step, else 0.
SKIPPED_KEY = "param_grads/skipped_by_scaler"


def _dense(grad: torch.Tensor) -> torch.Tensor:
    grad = grad.coalesce().values() if grad.is_sparse else grad
    return grad.to_local() if hasattr(grad, "to_local") else grad  # a sharded (DTensor) gradient: this rank's shard




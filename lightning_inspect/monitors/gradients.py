"""GradientMonitor: gradients of module outputs and of parameters, and the global norm."""

from __future__ import annotations

from collections.abc import Sequence

import lightning.pytorch as pl
import torch

from lightning_inspect._validation import check_bool
from lightning_inspect.backends import Sink
from lightning_inspect.core.grad_scaler import gradients_scaled, loss_scale, scaler_found_inf
from lightning_inspect.core.hooks import OutputGradHook
from lightning_inspect.core.keys import escape_name, metric_key
from lightning_inspect.core.monitor import ModuleMonitor, local_values
from lightning_inspect.core.recorder import HostRecord, StepRecord
from lightning_inspect.core.stats import reduce_tensor, scale_row, squared_norm


class GradientMonitor(ModuleMonitor):
    """Log gradient statistics and histograms for selected modules.

    Args:
        outputs: log the gradients of each selected module's output tensors (tensor hooks).
        parameters: log each parameter's gradient in ``on_before_optimizer_step`` (after AMP
            unscaling and accumulation) of the optimizers that hold it.
        global_norm: log the float64 L2 norm of the gradients of every model parameter that the
            batch's optimizer steps update (not only the selected ones).
        params: parameter name patterns kept by ``parameters`` (``"*.weight"``; ``None``: all);
            one that matches none stops fit at its start with the closest names.
        exclude_params: parameter name patterns removed (``"*.bias"``).
        **kwargs: every argument of :class:`~lightning_inspect.core.monitor.ModuleMonitor`.

    Logged metrics:
        ``activation_grads/<module>[/<output path>]/<stat>``, ``param_grads/<parameter>/<stat>``,
        ``param_grads/global_norm``, and histograms under the same keys without ``/<stat>``.

    Example::

        GradientMonitor(modules="encoder.*", every_n_steps=50, outputs=False)
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
        outputs: bool = True,
        parameters: bool = True,
        global_norm: bool = True,
        params: str | Sequence[str] | None = None,
        exclude_params: str | Sequence[str] | None = None,
        mlflow_metrics: str = "summary",
    ) -> None:
        base = (modules, exclude, every_n_steps, start_step, stop_step, stats, histograms, bins)
        super().__init__(*base, backends, on_nonfinite, enabled, mlflow_metrics)
        self.outputs = check_bool(self._owner, "outputs", outputs)
        self.parameters = check_bool(self._owner, "parameters", parameters)
        self.global_norm = check_bool(self._owner, "global_norm", global_norm)
        self._parameter_patterns(params, exclude_params)
        self._all_parameters: dict[str, torch.nn.Parameter] = {}
        self._norm_parts: list[torch.Tensor] = []  # squared global norms of this step's optimizers
        self._scaler_skipped = False

    def _after_selection(self, pl_module: pl.LightningModule) -> None:
        params = self._select_parameters().items()
        self.selected_parameters = {n: p for n, p in params if p.requires_grad}
        self._all_parameters = {n: p for n, p in pl_module.named_parameters() if p.requires_grad}

    def _wants_output_hooks(self) -> bool:
        return self.outputs

    def _on_output(self, name: str, path: str, tensor: torch.Tensor) -> None:
        inexact = tensor.is_floating_point() or tensor.is_complex()
        if tensor.requires_grad and torch.is_grad_enabled() and inexact:
            key = metric_key("activation_grads", escape_name(name), path)
            tensor.register_hook(OutputGradHook(self, key))

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
        if self.parameters:  # only what this optimizer applies (a GAN: opt_d reads the critic)
            for name, param in self._stepped(self.selected_parameters).items():
                if param.grad is not None:
                    key = metric_key("param_grads", escape_name(name))
                    self._add_row(key, reduce_tensor(local_values(param.grad), self.bins))
        if self.global_norm:
            stepped = self._stepped(self._all_parameters).values()
            grads = [local_values(p.grad) for p in stepped if p.grad is not None]
            if grads:
                self._norm_parts.append(squared_norm(grads))

    def _finish_step(self) -> None:
        parts, self._norm_parts = self._norm_parts, []
        if parts:  # the global norm over every optimizer step of the logged batch
            device = parts[0].device
            total = torch.stack([p.to(device) for p in parts]).sum().sqrt()
            self._add_scalar("param_grads/global_norm", total)
        super()._finish_step()

    def _publish(self, record: StepRecord, values: HostRecord) -> None:
        rows, scalars = values
        self._scaler_skipped = bool(scalars.get(SKIPPED_KEY))
        # Gradients that carried the loss scale of mixed precision (output gradients; parameter
        # gradients of an optimizer that unscales in its step()): divide it out.
        for kind, scale_key in _SCALED:
            scale = scalars.pop(scale_key, None)
            if scale:
                rows = {
                    k: scale_row(r, 1 / scale) if k.startswith(kind) else r for k, r in rows.items()
                }
                if kind == "param_grads/" and "param_grads/global_norm" in scalars:
                    scalars["param_grads/global_norm"] /= scale
        super()._publish(record, (rows, scalars))

    def _expected_nonfinite(self, key: str) -> bool:
        # Overflowing gradients are how a GradScaler finds its scale: the step is skipped, not broken.
        return self._scaler_skipped and not key.startswith("activations/")


#: Internal scalars: the loss scale of output gradients, and of parameter gradients read scaled.
_LOSS_SCALE_KEY, _PARAM_SCALE_KEY = "__loss_scale__", "__param_grad_scale__"
#: 1 when the GradScaler found Inf/NaN gradients and skips the optimizer step, else 0.
SKIPPED_KEY = "param_grads/skipped_by_scaler"
_SCALED = (("activation_grads/", _LOSS_SCALE_KEY), ("param_grads/", _PARAM_SCALE_KEY))

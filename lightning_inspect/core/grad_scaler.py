"""The Trainer's GradScaler (fp16 mixed precision), read without a device sync: gradients read
in backward carry the loss scale, and the Inf/NaN gradients of a step the scaler skips are how it
finds its scale, not a broken model. Each helper gives ``None`` without a GradScaler.
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch


def grad_scaler(pl_module: pl.LightningModule) -> Any:
    """The Trainer's enabled GradScaler (mixed precision), or None."""
    scaler = getattr(getattr(pl_module._trainer, "precision_plugin", None), "scaler", None)
    return scaler if scaler is not None and scaler.is_enabled() else None


def gradients_scaled(
    pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer | None
) -> bool:
    """Whether parameter gradients still carry the loss scale in ``on_before_optimizer_step``
    (an optimizer that unscales in its own ``step()``, e.g. ``Adam(fused=True)``)."""
    scaler = grad_scaler(pl_module)
    if scaler is None or optimizer is None:
        return False
    try:
        return not scaler._found_inf_per_device(optimizer)  # filled by unscale_
    except (KeyError, RuntimeError, AttributeError):
        return False


def scaler_found_inf(
    pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer | None
) -> torch.Tensor | None:
    """1.0 (a device tensor) when the GradScaler skips this step for Inf/NaN gradients, else 0.0;
    for an optimizer that unscales in ``step()``, found as it will (one fused norm, no sync)."""
    scaler = grad_scaler(pl_module)
    if scaler is None or optimizer is None:
        return None
    try:
        found = list(scaler._found_inf_per_device(optimizer).values())  # set by unscale_, no sync
    except (KeyError, RuntimeError, AttributeError):
        return None
    if not found:
        grads = [
            p.grad.coalesce().values() if p.grad.is_sparse else p.grad
            for group in optimizer.param_groups
            for p in group["params"]
            if p.grad is not None
        ]
        if not grads:
            return None
        found = [
            torch.logical_not(torch.isfinite(norm)) for norm in torch._foreach_norm(grads, math.inf)
        ]
    device = found[0].device
    found_any = torch.stack([f.to(device, torch.float32).reshape(()) for f in found]).sum() > 0
    return found_any.to(torch.float32)


def loss_scale(pl_module: pl.LightningModule) -> torch.Tensor | None:
    """The loss scale of the step's backward (a device tensor)."""
    scaler = grad_scaler(pl_module)
    if scaler is None:
        return None
    scale = getattr(scaler, "_scale", None)  # the tensor behind get_scale(), read without a sync
    return scale.detach().reshape(()).clone() if isinstance(scale, torch.Tensor) else None

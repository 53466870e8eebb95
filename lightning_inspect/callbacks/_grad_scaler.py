"""The Trainer's GradScaler (fp16 mixed precision), read without synchronising the device.

A GradScaler multiplies the loss by its scale before backward, so gradients read during backward
carry it, and when a scaled gradient overflows it skips the optimizer step and lowers the scale:
those Inf/NaN gradients are how it finds its scale, not a broken model. Monitors use these
helpers to divide the scale out and to tell skipped steps apart.

Example::

    found = scaler_found_inf(pl_module, optimizer)  # None without a GradScaler
    if found is not None:
        record.add_scalar("param_grads/skipped_by_scaler", found)
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch


def grad_scaler(pl_module: pl.LightningModule) -> Any:
    """The Trainer's enabled GradScaler (mixed precision), or None."""
    trainer = pl_module._trainer
    scaler = getattr(getattr(trainer, "precision_plugin", None), "scaler", None) if trainer is not None else None
    return scaler if scaler is not None and scaler.is_enabled() else None


def scaler_found_inf(pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer | None) -> torch.Tensor | None:
    """1.0 (device tensor) when the GradScaler found Inf/NaN gradients for this step; None without one."""
    scaler = grad_scaler(pl_module)
    if scaler is None or optimizer is None:
        return None
    try:
        found = list(scaler._found_inf_per_device(optimizer).values())  # set by unscale_, no sync
    except (KeyError, RuntimeError, AttributeError):
        return None
    if not found:
        return None
    device = found[0].device
    return (torch.stack([f.to(device, torch.float32).reshape(()) for f in found]).sum() > 0).to(torch.float32)


def loss_scale(pl_module: pl.LightningModule) -> torch.Tensor | None:
    """The loss scale of the step's backward (a device tensor), or None without a GradScaler."""
    scaler = grad_scaler(pl_module)
    if scaler is None:
        return None
    scale = getattr(scaler, "_scale", None)  # the tensor behind get_scale(), read without a sync
    return scale.detach().reshape(()).clone() if isinstance(scale, torch.Tensor) else None

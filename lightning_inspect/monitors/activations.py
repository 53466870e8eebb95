"""ActivationMonitor: statistics and histograms of what selected modules output."""

from __future__ import annotations

import torch

from lightning_inspect.core.keys import escape_name, metric_key
from lightning_inspect.core.monitor import ModuleMonitor
from lightning_inspect.core.stats import reduce_tensor


class ActivationMonitor(ModuleMonitor):
    """Log statistics and histograms of the outputs of selected modules.

    Takes every argument of :class:`~lightning_inspect.core.monitor.ModuleMonitor`; outputs of
    any structure are walked, each tensor reduced on its device during the forward, not kept.

    Logged metrics:
        ``activations/<module>[/<output path>]/<stat>`` for each statistic in ``stats``, and the
        histogram ``activations/<module>[/<output path>]``, at each logged optimizer step.

    Example::

        trainer = L.Trainer(logger=TensorBoardLogger("tb"),
                            callbacks=[ActivationMonitor(modules=["encoder.*", "head"], every_n_steps=50)])
    """

    def _wants_output_hooks(self) -> bool:
        return True

    def _on_output(self, name: str, path: str, tensor: torch.Tensor) -> None:
        key = metric_key("activations", escape_name(name), path)
        self._add_row(key, reduce_tensor(tensor, self.bins))

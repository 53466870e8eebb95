"""Any other Lightning logger (CSV, Comet, a user's own): scalars through ``log_metrics``,
params through ``log_hyperparams``; histograms and texts are dropped (said once at fit start)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lightning_inspect.core.stats import Histogram


class GenericSink:
    """Each step's scalars in one ``logger.log_metrics`` call.

    Example:
        >>> import tempfile
        >>> from lightning.pytorch.loggers import CSVLogger
        >>> sink = GenericSink(CSVLogger(tempfile.mkdtemp()), name="csv")
        >>> sink.log_scalars({"activations/fc/mean": 0.5}, step=0)
    """

    def __init__(self, logger: Any, name: str) -> None:
        self.logger = logger
        self.name = name

    def log_scalars(self, values: Mapping[str, float], step: int) -> None:
        self.logger.log_metrics({k: float(v) for k, v in values.items()}, step)

    def log_histograms(self, histograms: Mapping[str, Histogram], step: int) -> None: ...
    def log_text(self, key: str, text: str, step: int) -> None: ...

    def log_params(self, values: Mapping[str, Any]) -> None:
        self.logger.log_hyperparams(dict(values))

    def flush(self) -> None:
        self.logger.save()

"""Any Lightning logger (CSV, Comet, Neptune, a user's own): scalars through its ``log_metrics``.

Such a logger has no histogram type the library can rely on, so :class:`GenericSink` sends
scalars only. It takes histograms and texts (the :class:`~lightning_inspect.backends.base.Sink`
protocol asks for them) and drops them, and it has no ``log_image``, so pictures skip it; the
callbacks say so once at fit start.

Example:
    >>> import tempfile
    >>> from lightning.pytorch.loggers import CSVLogger
    >>> sink = GenericSink(CSVLogger(tempfile.mkdtemp()), name="csv")
    >>> sink.log_scalars({"activations/fc/mean": 0.5}, step=0)
    >>> sink.flush()
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lightning_inspect.core.stats import Histogram


class GenericSink:
    """Sends each step's scalars to ``logger.log_metrics`` in one call; writes on :meth:`flush`."""

    def __init__(self, logger: Any, name: str) -> None:
        self.logger = logger
        self.name = name

    def log_scalars(self, values: Mapping[str, float], step: int) -> None:
        self.logger.log_metrics({k: float(v) for k, v in values.items()}, step)

    def log_histograms(self, histograms: Mapping[str, Histogram], step: int) -> None:
        """Not shown by this backend: dropped."""

    def log_text(self, key: str, text: str, step: int) -> None:
        """Not shown by this backend: dropped."""

    def flush(self) -> None:
        self.logger.save()

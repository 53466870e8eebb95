"""An in-memory sink, for tests and for reading values back in notebooks."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from lightning_inspect.core.stats import Histogram


class MemorySink:
    """Keeps everything it is given: ``scalars[key] == [(step, value), ...]``.

    Example:
        >>> sink = MemorySink()
        >>> sink.log_scalars({"weights/fc.weight/mean": 0.1}, step=0)
        >>> sink.last("weights/fc.weight/mean"), sink.steps("weights/fc.weight/mean")
        (0.1, [0])
    """

    name = "memory"

    def __init__(self) -> None:
        self.scalars: dict[str, list[tuple[int, float]]] = {}
        self.histograms: dict[str, list[tuple[int, Histogram]]] = {}
        self.texts: dict[str, list[tuple[int, str]]] = {}
        self.images: dict[str, list[tuple[int, np.ndarray]]] = {}
        self.flushes = 0

    def log_scalars(self, values: Mapping[str, float], step: int) -> None:
        for key, value in values.items():
            self.scalars.setdefault(key, []).append((step, float(value)))

    def log_histograms(self, histograms: Mapping[str, Histogram], step: int) -> None:
        for key, hist in histograms.items():
            self.histograms.setdefault(key, []).append((step, hist))

    def log_text(self, key: str, text: str, step: int) -> None:
        self.texts.setdefault(key, []).append((step, text))

    def log_image(self, key: str, image: np.ndarray, step: int) -> None:
        self.images.setdefault(key, []).append((step, image))

    def flush(self) -> None:
        self.flushes += 1

    def last(self, key: str) -> float:
        return self.scalars[key][-1][1]

    def steps(self, key: str) -> list[int]:
        return [step for step, _ in self.scalars[key]]

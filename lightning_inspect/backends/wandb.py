"""Weights & Biases through the ``WandbLogger``'s own methods: histograms from the device's counts,
texts as a one-cell table, params as the run's config, tags in its summary, files as an artifact."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lightning_inspect.backends.base import GenericSink
from lightning_inspect.core.stats import Histogram


def wandb_bins(h: Histogram, limit: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """``(counts, edges)`` of ``h`` with at most ``limit`` bins (a wandb.Histogram's most)."""
    counts, edges = np.asarray(h.counts), np.asarray(h.edges)
    starts = np.arange(0, len(counts), -(-len(counts) // limit))  # neighbours summed
    return np.add.reduceat(counts, starts), np.append(edges[starts], edges[-1])


class WandbSink(GenericSink):
    """Writes to a ``WandbLogger``'s run."""

    def __init__(self, logger: Any) -> None:
        super().__init__(logger, "wandb")

    def log_histograms(self, histograms: Mapping[str, Histogram], step: int) -> None:
        if histograms:
            import wandb

            values = {k: wandb.Histogram(np_histogram=wandb_bins(h)) for k, h in histograms.items()}
            self.logger.log_metrics(values, step)

    def log_text(self, key: str, text: str, step: int) -> None:
        self.logger.log_text(key, columns=["text"], data=[[text]], step=step)

    def log_image(self, key: str, image: np.ndarray, step: int) -> None:
        self.logger.log_image(key, [image], step=step)

    def log_tags(self, values: Mapping[str, Any]) -> None:
        self.logger.experiment.summary.update(dict(values))

    def log_files(self, paths: Sequence[Path], folder: str) -> None:
        """The files as one W&B artifact of type ``folder`` (copied: the originals may go)."""
        import wandb

        artifact = wandb.Artifact(f"{folder}-{self.logger.experiment.id}", type=folder)
        for path in paths:
            artifact.add_file(str(path), name=f"{folder}/{Path(path).name}")
        self.logger.experiment.log_artifact(artifact)

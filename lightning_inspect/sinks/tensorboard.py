"""TensorBoard through the Trainer's ``TensorBoardLogger`` (its ``SummaryWriter``).

Histograms are written with ``add_histogram_raw`` from counts binned on the device, so nothing
is re-binned with NumPy and NaN/Inf/bf16 tensors cannot break the writer.

Example:
    >>> import tempfile
    >>> from torch.utils.tensorboard import SummaryWriter
    >>> sink = TensorBoardSink(SummaryWriter(tempfile.mkdtemp()))
    >>> sink.log_scalars({"activations/fc/mean": 0.5}, step=0)
    >>> sink.flush()
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from lightning_inspect.stats import Histogram


class TensorBoardSink:
    """Writes scalars, histograms and text to a ``SummaryWriter``.

    All scalars of a step go into one event (one summary with many values), and so do all
    histograms: the same data TensorBoard reads from ``add_scalar``/``add_histogram_raw``, without
    building and queueing one event per key. Writers without the event API get one call per key.
    """

    name = "tensorboard"

    def __init__(self, writer: Any) -> None:
        self.writer = writer
        self._file_writer = getattr(writer, "_get_file_writer", None)

    def log_scalars(self, values: Mapping[str, float], step: int) -> None:
        if self._file_writer is not None:
            from tensorboard.compat.proto.summary_pb2 import Summary

            summary = Summary(value=[Summary.Value(tag=k, simple_value=float(v)) for k, v in values.items()])
            self._file_writer().add_summary(summary, global_step=step)
            return
        for key, value in values.items():
            self.writer.add_scalar(key, value, global_step=step)

    def log_histograms(self, histograms: Mapping[str, Histogram], step: int) -> None:
        if self._file_writer is not None:
            from tensorboard.compat.proto.summary_pb2 import HistogramProto, Summary

            summary = Summary(
                value=[
                    Summary.Value(
                        tag=key,
                        histo=HistogramProto(
                            min=h.min, max=h.max, num=float(h.num), sum=h.sum, sum_squares=h.sum_squares,
                            bucket_limit=h.edges[1:].tolist(), bucket=h.counts.tolist(),
                        ),
                    )
                    for key, h in histograms.items()
                ]
            )
            self._file_writer().add_summary(summary, global_step=step)
            return
        for key, h in histograms.items():
            self.writer.add_histogram_raw(
                key,
                min=h.min,
                max=h.max,
                num=int(h.num),
                sum=h.sum,
                sum_squares=h.sum_squares,
                bucket_limits=h.edges[1:].tolist(),
                bucket_counts=h.counts.tolist(),
                global_step=step,
            )

    def log_text(self, key: str, text: str, step: int) -> None:
        self.writer.add_text(key, text, global_step=step)

    def log_image(self, key: str, image: np.ndarray, step: int) -> None:
        self.writer.add_image(key, image, global_step=step, dataformats="HWC")

    def flush(self) -> None:
        self.writer.flush()

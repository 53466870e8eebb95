"""TensorBoard through the Trainer's ``TensorBoardLogger``: a step's scalars in one event, its
histograms in another, both encoded from protobuf's wire format; records checksummed with
``google-crc32c``'s C code in the library's writer only; a custom-scalars layout of one chart per
kind and statistic, shared by the sinks of a writer."""

from __future__ import annotations

import itertools
import re
import struct
import weakref
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from lightning_inspect.backends.base import text_value
from lightning_inspect.core.keys import KINDS, split_key
from lightning_inspect.core.stats import Histogram

try:
    import google_crc32c
except ImportError:  # the tensorboard extra installs it
    google_crc32c = None

#: The custom-scalars layout of each writer: ``{category: {chart title: tag regex}}``.
_LAYOUTS: weakref.WeakKeyDictionary[Any, dict[str, dict[str, str]]] = weakref.WeakKeyDictionary()
_HISTOGRAM_HEAD = struct.Struct("<BdBdBdBdBd")


def masked_crc32c(data: bytes) -> bytes:
    """TensorBoard's masked CRC-32C of ``data`` (little-endian), with google-crc32c's C code."""
    x = google_crc32c.value(data)
    return struct.pack("<I", (((x >> 15) | (x << 17)) + 0xA282EAD8) & 0xFFFFFFFF)


def fast_records(file_writer: Any) -> Any:
    """``file_writer``, its records checksummed by :func:`masked_crc32c` (the same bytes)."""
    async_writer = getattr(getattr(file_writer, "event_writer", None), "_async_writer", None)
    records = getattr(async_writer, "_writer", None)
    if google_crc32c is None or not hasattr(records, "_writer") or "write" in vars(records):
        return file_writer
    out = records._writer

    def write(data: bytes) -> None:
        head = struct.pack("<Q", len(data))
        out.write(b"".join((head, masked_crc32c(head), data, masked_crc32c(data))))

    records.write = write
    return file_writer


def _varint(n: int) -> bytes:
    """Protobuf's base-128 varint of a non-negative integer."""
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    return bytes([*out, n])


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field."""
    return bytes([number << 3 | 2]) + _varint(len(payload)) + payload


def scalar_summary(values: Mapping[str, float], cache: dict[str, bytes] | None = None) -> Any:
    """One ``Summary`` of every scalar, as ``add_scalar`` writes them, parsed once in C from the
    wire format (~0.3 us a key). ``cache`` keeps each key's bytes before its value."""
    from tensorboard.compat.proto.summary_pb2 import Summary

    encoded = {} if cache is None else cache
    heads = []
    for key in values:
        if (head := encoded.get(key)) is None:  # Summary.value (1): tag (1), simple_value (2)
            value = _field(1, key.encode()) + b"\x15"
            head = encoded[key] = b"\x0a" + _varint(len(value) + 4) + value
        heads.append(head)
    with np.errstate(over="ignore"):  # beyond float32's range: +-inf, as protobuf stores it
        floats = np.fromiter(values.values(), dtype="<f4", count=len(heads)).tobytes()
    pairs = zip(heads, [floats[i : i + 4] for i in range(0, len(floats), 4)], strict=True)
    return Summary.FromString(b"".join(itertools.chain.from_iterable(pairs)))


def histogram_summary(hists: Mapping[str, Histogram], cache: dict[str, bytes] | None = None) -> Any:
    """One ``Summary`` of every histogram, as ``add_histogram_raw`` writes them (~3 us each)."""
    from tensorboard.compat.proto.summary_pb2 import Summary

    encoded = {} if cache is None else cache
    parts = []
    for key, h in hists.items():
        if (tag := encoded.get(key)) is None:
            tag = encoded[key] = _field(1, key.encode())
        # HistogramProto: (tag, double) of min, max, num, sum, sum_squares; limits, counts packed
        numbers = (9, h.min, 17, h.max, 25, float(h.num), 33, h.sum, 41, h.sum_squares)
        limits = np.ascontiguousarray(h.edges[1:], dtype="<f8").tobytes()
        counts = np.ascontiguousarray(h.counts, dtype="<f8").tobytes()
        histo = _HISTOGRAM_HEAD.pack(*numbers) + _field(6, limits) + _field(7, counts)
        parts.append(_field(1, tag + _field(5, histo)))  # Summary.value (1), Value.histo (5)
    return Summary.FromString(b"".join(parts))


class TensorBoardSink:
    """Writes scalars, histograms, texts, pictures and an HPARAMS entry to a ``SummaryWriter``.

    Example:
        >>> import tempfile
        >>> from torch.utils.tensorboard import SummaryWriter
        >>> TensorBoardSink(SummaryWriter(tempfile.mkdtemp())).log_scalars({"a/b/mean": 0.5}, 0)
    """

    name = "tensorboard"

    def __init__(self, writer: Any) -> None:
        self.writer = writer
        self._seen: set[str] = set()  # keys already placed in the layout
        self._scalars: dict[str, bytes] = {}  # encoded keys
        self._histograms: dict[str, bytes] = {}

    def _add(self, summary: Any, step: int | None = None) -> None:
        fast_records(self.writer._get_file_writer()).add_summary(summary, global_step=step)

    def log_scalars(self, values: Mapping[str, float], step: int) -> None:
        if not self._seen.issuperset(values):  # the new keys' charts join the writer's layout
            layout = _LAYOUTS.setdefault(self.writer, {})
            charts = sum(map(len, layout.values()))
            for key in [k for k in values if k not in self._seen]:
                self._seen.add(key)
                kind, name, _, stat = split_key(key)
                if kind in KINDS:  # one chart per kind and statistic, or one whole-kind key
                    tags = f"{re.escape(kind)}/.+/{re.escape(stat)}" if name else re.escape(key)
                    category = layout.setdefault(f"lightning-inspect/{kind}", {})
                    category[f"{kind}/{stat}"] = f"^{tags}$"
            if sum(map(len, layout.values())) > charts:
                self.writer.add_custom_scalars(
                    {c: {t: ["Multiline", [r]] for t, r in ch.items()} for c, ch in layout.items()}
                )
        self._add(scalar_summary(values, self._scalars), step)

    def log_histograms(self, histograms: Mapping[str, Histogram], step: int) -> None:
        self._add(histogram_summary(histograms, self._histograms), step)

    def log_text(self, key: str, text: str, step: int) -> None:
        self.writer.add_text(key, text, global_step=step)

    def log_image(self, key: str, image: np.ndarray, step: int) -> None:
        self.writer.add_image(key, image, global_step=step, dataformats="HWC")

    def log_hparams(self, values: Mapping[str, Any], metrics: Iterable[str] = ()) -> None:
        """An HPARAMS entry: ``values`` compared on the scalars ``metrics``."""
        from torch.utils.tensorboard.summary import hparams

        clean = {
            k: v if isinstance(v, (bool, int, float, str)) else text_value(v, 500)
            for k, v in values.items()
            if v is not None
        }
        for summary in hparams(clean, dict.fromkeys(metrics, 0.0)):
            self._add(summary)

    def flush(self) -> None:
        self.writer.flush()

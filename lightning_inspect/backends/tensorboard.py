"""TensorBoard through the Trainer's ``TensorBoardLogger`` (its ``SummaryWriter``).

Histograms are written with ``add_histogram_raw`` from counts binned on the device, so nothing
is re-binned with NumPy and NaN/Inf/bf16 tensors cannot break the writer.

TensorBoard's writer (without TensorFlow) checksums every record in pure Python, about 170 ns
per byte on its writer thread, holding the GIL the training thread needs: ~10 ms for one step's
histograms. When ``google-crc32c`` (the ``tensorboard`` extra) is installed, :func:`use_fast_crc`
swaps in its C implementation, which gives the same checksums, so the files are byte-identical.

Every key stays a scalar of its own (cheap in TensorBoard, and what users' own charts need); on
top, a custom-scalars layout (TensorBoard's "Custom Scalars" tab) gathers them into one
multi-line chart per kind and statistic across layers (category ``lightning-inspect/<kind>``,
chart ``<kind>/<stat>``, tag regex ``^<kind>/.+/<stat>$``). The layout is shared by every sink
of a writer and written again when a new chart appears, so its last version has every chart.

Example:
    >>> import tempfile
    >>> from torch.utils.tensorboard import SummaryWriter
    >>> sink = TensorBoardSink(SummaryWriter(tempfile.mkdtemp()))
    >>> sink.log_scalars({"activations/fc/mean": 0.5}, step=0)
    >>> sink.flush()
"""

from __future__ import annotations

import re
import struct
import weakref
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from lightning_inspect.core.keys import KINDS, split_key
from lightning_inspect.core.stats import Histogram

#: The custom-scalars layout of each writer, ``{category: {chart title: tag regex}}``, shared by
#: the sinks (one per monitor) that write to it.
_LAYOUTS: weakref.WeakKeyDictionary[Any, dict[str, dict[str, str]]] = weakref.WeakKeyDictionary()


def layout_charts(keys: Iterable[str]) -> dict[str, dict[str, str]]:
    """The custom-scalars charts of ``keys``: ``{category: {title: tag regex}}``.

    >>> layout_charts(["weights/fc.weight/mean", "param_grads/global_norm"])
    {'lightning-inspect/weights': {'weights/mean': '^weights/.+/mean$'}, \
'lightning-inspect/param_grads': {'param_grads/global_norm': '^param_grads/global_norm$'}}
    """
    charts: dict[str, dict[str, str]] = {}
    for key in keys:
        kind, name, _, stat = split_key(key)
        if kind not in KINDS:
            continue
        pattern = f"^{re.escape(kind)}/.+/{re.escape(stat)}$" if name else f"^{re.escape(key)}$"
        charts.setdefault(f"lightning-inspect/{kind}", {})[f"{kind}/{stat}"] = pattern
    return charts


def use_fast_crc() -> bool:
    """Make TensorBoard's record writer checksum with ``google-crc32c``'s C code, if installed.

    Returns whether the fast checksum is in use. Only TensorBoard's own pure-Python function is
    replaced (once, process-wide); the values are identical, which a test checks.

    >>> use_fast_crc() in (True, False)
    True
    """
    try:
        import google_crc32c
        from tensorboard.compat.tensorflow_stub import pywrap_tensorflow
        from tensorboard.summary.writer import record_writer
    except ImportError:
        return False
    current = getattr(record_writer, "masked_crc32c", None)
    if current is _masked_crc32c_c:
        return True
    if current is not pywrap_tensorflow.masked_crc32c or google_crc32c.implementation != "c":
        return False  # someone else's checksum, or no C code to gain from: leave it
    record_writer.masked_crc32c = _masked_crc32c_c
    return True


def _masked_crc32c_c(data: bytes) -> int:
    """TensorBoard's masked CRC-32C (see ``tensorboard``'s ``pywrap_tensorflow.masked_crc32c``)."""
    import google_crc32c

    x = google_crc32c.value(bytes(data))
    return (((x >> 15) | (x << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def scalar_summary(values: Mapping[str, float], encoded: dict[str, bytes] | None = None) -> Any:
    """One ``Summary`` holding every scalar of ``values``, as ``add_scalar`` would write them.

    Built from protobuf's wire format (each value: its tag, then the value as a little-endian
    float32) and parsed once in C, instead of one Python ``Summary.Value`` per key: about 0.3 us
    a key instead of 1-4. ``encoded`` caches the bytes of each tag across calls.

    >>> from tensorboard.compat.proto.summary_pb2 import Summary
    >>> expected = Summary(value=[Summary.Value(tag="a/b/mean", simple_value=0.5)])
    >>> scalar_summary({"a/b/mean": 0.5}) == expected
    True
    """
    from tensorboard.compat.proto.summary_pb2 import Summary

    encoded = {} if encoded is None else encoded
    heads = []
    for key in values:
        head = encoded.get(key)
        if head is None:
            tag = key.encode()
            # Summary.value (field 1) holding tag (field 1) and simple_value (field 2)
            value = b"\x0a" + _varint(len(tag)) + tag + b"\x15"
            head = encoded[key] = b"\x0a" + _varint(len(value) + 4) + value
        heads.append(head)
    with np.errstate(over="ignore"):  # beyond float32's range: +-inf, as protobuf stores it
        floats = np.fromiter(values.values(), dtype="<f4", count=len(heads)).tobytes()
    chunks = [floats[i : i + 4] for i in range(0, len(floats), 4)]
    return Summary.FromString(
        b"".join([part for pair in zip(heads, chunks, strict=True) for part in pair])
    )


def histogram_summary(
    histograms: Mapping[str, Histogram], encoded: dict[str, bytes] | None = None
) -> Any:
    """One ``Summary`` holding every histogram, as ``add_histogram_raw`` would write them.

    Encoded like :func:`scalar_summary`: the five doubles and the packed bucket limits and counts
    are copied from NumPy arrays, not turned into Python lists (about 3 us a histogram instead
    of 20). ``encoded`` caches the bytes of each tag across calls.
    """
    from tensorboard.compat.proto.summary_pb2 import Summary

    encoded = {} if encoded is None else encoded
    parts = []
    for key, h in histograms.items():
        head = encoded.get(key)
        if head is None:
            tag = key.encode()
            head = encoded[key] = b"\x0a" + _varint(len(tag)) + tag  # Summary.Value.tag (field 1)
        limits = np.ascontiguousarray(h.edges[1:], dtype="<f8").tobytes()
        counts = np.ascontiguousarray(h.counts, dtype="<f8").tobytes()
        # HistogramProto: fields 1-5 doubles (min, max, num, sum, sum_squares), 6 and 7 packed
        numbers = (h.min, h.max, float(h.num), h.sum, h.sum_squares)
        histo = b"".join(
            (
                _HISTOGRAM_HEAD.pack(
                    0x09,
                    numbers[0],
                    0x11,
                    numbers[1],
                    0x19,
                    numbers[2],
                    0x21,
                    numbers[3],
                    0x29,
                    numbers[4],
                ),
                b"\x32",
                _varint(len(limits)),
                limits,
                b"\x3a",
                _varint(len(counts)),
                counts,
            )
        )
        value = b"".join((head, b"\x2a", _varint(len(histo)), histo))  # Value.histo (field 5)
        parts += (b"\x0a", _varint(len(value)), value)
    return Summary.FromString(b"".join(parts))


_HISTOGRAM_HEAD = struct.Struct("<BdBdBdBdBd")


def _varint(n: int) -> bytes:
    """Protobuf's base-128 varint of a non-negative integer."""
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


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
        self._seen: set[str] = set()  # keys already placed in the layout
        self._encoded: dict[str, bytes] = {}  # key -> its encoded Summary.Value up to the value
        use_fast_crc()

    def log_scalars(self, values: Mapping[str, float], step: int) -> None:
        if not self._seen.issuperset(values):
            self._extend_layout([k for k in values if k not in self._seen])
        if self._file_writer is not None:
            self._file_writer().add_summary(scalar_summary(values, self._encoded), global_step=step)
            return
        for key, value in values.items():
            self.writer.add_scalar(key, value, global_step=step)

    def _extend_layout(self, new_keys: list[str]) -> None:
        """Add the charts of ``new_keys`` to the writer's layout; write it if it grew."""
        self._seen.update(new_keys)
        add_layout = getattr(self.writer, "add_custom_scalars", None)
        if add_layout is None:
            return
        layout = _LAYOUTS.setdefault(self.writer, {})
        grew = False
        for category, charts in layout_charts(new_keys).items():
            known = layout.setdefault(category, {})
            grew |= not charts.keys() <= known.keys()
            known.update(charts)
        if grew:
            add_layout(
                {c: {t: ["Multiline", [r]] for t, r in ch.items()} for c, ch in layout.items()}
            )

    def log_histograms(self, histograms: Mapping[str, Histogram], step: int) -> None:
        if self._file_writer is not None:
            summary = histogram_summary(histograms, self._encoded)
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

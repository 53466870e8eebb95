"""The small protocol every backend implements, and a guard that keeps backend faults harmless.

Example:
    >>> from lightning_inspect.backends.memory import MemorySink
    >>> sink = GuardedSink(MemorySink())
    >>> sink.log_scalars({"activations/fc/mean": 0.5}, step=3)
    >>> sink.inner.scalars
    {'activations/fc/mean': [(3, 0.5)]}
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import warnings
from collections import deque
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from lightning_inspect.core.stats import Histogram

#: Calls that carry no values: a refused one is noted in the fallback file, not retained.
CONTROL_CALLS = ("flush", "close")


@runtime_checkable
class Sink(Protocol):
    """Where reduced values go. Implementations must be cheap to call once per logging step.

    A sink may also have ``log_image(key, image, step)`` (height x width x 3 uint8 pictures),
    sinks without it are skipped for pictures; ``close()`` (release local resources) and
    ``unsent()`` (records of what it holds locally and has not delivered, kept in the fallback
    file when the sink is closed).
    """

    name: str

    def log_scalars(self, values: Mapping[str, float], step: int) -> None:
        """Log scalars, keys per :mod:`lightning_inspect.core.keys`."""

    def log_histograms(self, histograms: Mapping[str, Histogram], step: int) -> None:
        """Log histograms (already binned on the device)."""

    def log_text(self, key: str, text: str, step: int) -> None:
        """Log a text (markdown) under ``key``."""

    def flush(self) -> None:
        """Write buffered data; called at the end of fit and on exceptions."""


def histogram_record(h: Histogram) -> dict[str, Any]:
    """A histogram as the fallback file and MLflow's histogram artifact keep it."""
    return {"lo": h.min, "hi": h.max, "counts": h.counts.tolist()}


def fallback_record(method: str, args: tuple[Any, ...]) -> dict[str, Any]:
    """What the fallback file keeps of one sink call (images: their shape only)."""
    if method == "log_scalars":
        return {"call": method, "step": args[1], "values": dict(args[0])}
    if method == "log_histograms":
        histograms = {k: histogram_record(h) for k, h in args[0].items()}
        return {"call": method, "step": args[1], "histograms": histograms}
    if method == "log_step":  # the values of several callbacks: one record, keys unique
        step, scalars, hists = args
        values = {k: v for part in scalars.values() for k, v in part.items()}
        kept = {k: histogram_record(h) for part in hists.values() for k, h in part.items()}
        return {"call": method, "step": step, "values": values, "histograms": kept}
    if method == "log_text":
        return {"call": method, "step": args[2], "key": args[0], "text": args[1]}
    if method == "log_image":
        return {"call": method, "step": args[2], "key": args[0], "shape": list(args[1].shape)}
    return {"call": method}


class GuardedSink:
    """Wraps a sink so that a failing backend warns once and never stops training.

    What the backend refused is appended, as JSON lines, to a fallback file whose path the
    warning names, and kept (the last ``max_retained`` calls) to be sent again, in order, as soon
    as the backend accepts a call again. The file is created at the first refusal, with a name
    no one can predict and mode 0600 (``O_EXCL``, no symlink followed), in ``fallback_dir`` or
    else in a new private directory (mode 0700) under the system temp directory. The library never
    deletes it: it holds values that reached no backend.
    """

    def __init__(
        self,
        inner: Sink,
        fallback_dir: str | os.PathLike[str] | None = None,
        max_retained: int = 10_000,
    ) -> None:
        self.inner = inner
        self.name = inner.name
        self._fallback_dir = Path(fallback_dir) if fallback_dir else None
        self._fallback: Path | None = None
        self._lock = threading.Lock()  # the worker of a BackgroundSink and the closing thread
        self._warned = False
        self._lost_warned = False
        self._retained: deque[tuple[str, tuple[Any, ...]]] = deque(maxlen=max_retained)
        self.failures = 0

    @property
    def fallback_path(self) -> Path | None:
        """The JSON-lines file that receives what the backend refused (``None`` until then)."""
        return self._fallback

    def _call(self, method: str, *args: Any) -> None:
        try:
            getattr(self.inner, method)(*args)
        except Exception as exc:  # a backend fault must never reach the training loop
            self.failures += 1
            self.save(method, args)
            if method not in CONTROL_CALLS:
                self._retained.append((method, args))
            if not self._warned:
                self._warned = True
                where = self.fallback_path
                kept = f"written to {where}" if where else "kept in memory only"
                warnings.warn(
                    f"lightning-inspect: the {self.name} backend failed ({type(exc).__name__}: {exc}). "
                    f"Training continues; values it refused are {kept} "
                    "and sent again once it accepts values again.",
                    RuntimeWarning,
                    stacklevel=3,
                )
            return
        self._resend()

    def _resend(self) -> None:
        """Send the retained calls again, oldest first, until one fails."""
        while self._retained:
            method, args = self._retained[0]
            try:
                getattr(self.inner, method)(*args)
            except Exception:
                return
            self._retained.popleft()

    def save(self, method: str, args: tuple[Any, ...]) -> None:
        """Append one call to the fallback file instead of sending it."""
        self._write([fallback_record(method, args)])

    def _write(self, records: list[dict[str, Any]]) -> None:
        text = "".join(json.dumps(r, default=str) + "\n" for r in records)
        with self._lock:
            try:
                if self._fallback is None:
                    self._fallback = self._create_fallback()
                flags = os.O_WRONLY | os.O_APPEND | getattr(os, "O_NOFOLLOW", 0)
                fd = os.open(self._fallback, flags)
                with os.fdopen(fd, "a", encoding="utf-8") as f:
                    f.write(text)
            except OSError as exc:
                if not self._lost_warned:
                    self._lost_warned = True
                    warnings.warn(
                        f"lightning-inspect: the {self.name} fallback file could not be written "
                        f"({type(exc).__name__}: {exc}); what the backend refuses is lost.",
                        RuntimeWarning,
                        stacklevel=4,
                    )

    def _create_fallback(self) -> Path:
        directory = self._fallback_dir
        if directory is None:
            directory = Path(tempfile.mkdtemp(prefix="lightning_inspect_"))
        directory.mkdir(parents=True, exist_ok=True)
        prefix = f"lightning_inspect_unsent_{self.name}_"
        fd, path = tempfile.mkstemp(prefix=prefix, suffix=".jsonl", dir=directory)  # O_EXCL, 0600
        os.close(fd)
        return Path(path)

    def log_scalars(self, values: Mapping[str, float], step: int) -> None:
        self._call("log_scalars", values, step)

    def log_histograms(self, histograms: Mapping[str, Histogram], step: int) -> None:
        self._call("log_histograms", histograms, step)

    def log_step(
        self, step: int, scalars: Mapping[str, Any], histograms: Mapping[str, Any]
    ) -> None:
        """Several callbacks' values of one step (a sink with ``log_step``, e.g. MLflow's)."""
        self._call("log_step", step, scalars, histograms)

    def log_text(self, key: str, text: str, step: int) -> None:
        self._call("log_text", key, text, step)

    def log_image(self, key: str, image: np.ndarray, step: int) -> None:
        if hasattr(self.inner, "log_image"):
            self._call("log_image", key, image, step)

    def flush(self) -> None:
        self._call("flush")

    def close(self) -> None:
        """Keep what the backend holds undelivered in the fallback file; release its resources."""
        unsent = getattr(self.inner, "unsent", None)
        if unsent is not None:
            try:
                records = unsent()
            except Exception as exc:  # the local copy is unreadable: say so, keep closing
                records = [{"call": "unsent", "error": f"{type(exc).__name__}: {exc}"}]
            if records:
                self._write(records)
        if hasattr(self.inner, "close"):
            self._call("close")

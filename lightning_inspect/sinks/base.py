"""The small protocol every backend implements, and a guard that keeps backend faults harmless.

Example:
    >>> from lightning_inspect.sinks.memory import MemorySink
    >>> sink = GuardedSink(MemorySink())
    >>> sink.log_scalars({"activations/fc/mean": 0.5}, step=3)
    >>> sink.inner.scalars
    {'activations/fc/mean': [(3, 0.5)]}
"""

from __future__ import annotations

import json
from collections import deque
import math
import os
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from lightning_inspect.stats import Histogram


@runtime_checkable
class Sink(Protocol):
    """Where reduced values go. Implementations must be cheap to call once per logging step.

    A sink may also have ``log_image(key, image, step)`` (height x width x 3 uint8 pictures);
    sinks without it are skipped for pictures.
    """

    name: str

    def log_scalars(self, values: Mapping[str, float], step: int) -> None:
        """Log scalars, keys per :mod:`lightning_inspect.keys`."""

    def log_histograms(self, histograms: Mapping[str, Histogram], step: int) -> None:
        """Log histograms (already binned on the device)."""

    def log_text(self, key: str, text: str, step: int) -> None:
        """Log a text (markdown) under ``key``."""

    def flush(self) -> None:
        """Write buffered data; called at the end of fit and on exceptions."""


class GuardedSink:
    """Wraps a sink so that a failing backend warns once and never stops training.

    What the backend refused is appended, as JSON lines, to a fallback file whose path the
    warning names, and kept (the last ``max_retained`` calls) to be sent again, in order, as soon
    as the backend accepts a call again.
    """

    def __init__(
        self, inner: Sink, fallback_dir: str | os.PathLike[str] | None = None, max_retained: int = 10_000
    ) -> None:
        self.inner = inner
        self.name = inner.name
        self._fallback_dir = Path(fallback_dir) if fallback_dir else Path(tempfile.gettempdir())
        self._warned = False
        self._retained: deque[tuple[str, tuple[Any, ...]]] = deque(maxlen=max_retained)
        self.failures = 0

    @property
    def fallback_path(self) -> Path:
        """The JSON-lines file that receives what the backend refused."""
        return self._fallback_dir / f"lightning_inspect_unsent_{self.name}_{os.getpid()}.jsonl"

    def _call(self, method: str, payload: dict[str, Any], *args: Any) -> None:
        try:
            getattr(self.inner, method)(*args)
        except Exception as exc:  # a backend fault must never reach the training loop
            self.failures += 1
            self._save(method, payload)
            if method not in ("flush", "close"):
                self._retained.append((method, args))
            if not self._warned:
                self._warned = True
                warnings.warn(
                    f"lightning-inspect: the {self.name} backend failed ({type(exc).__name__}: {exc}). "
                    f"Training continues; values it refused are written to {self.fallback_path} "
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

    def _save(self, method: str, payload: dict[str, Any]) -> None:
        try:
            self.fallback_path.parent.mkdir(parents=True, exist_ok=True)
            with self.fallback_path.open("a") as f:
                f.write(json.dumps({"call": method, **payload}, default=_jsonable) + "\n")
        except OSError:
            pass

    def log_scalars(self, values: Mapping[str, float], step: int) -> None:
        self._call("log_scalars", {"step": step, "values": dict(values)}, values, step)

    def log_histograms(self, histograms: Mapping[str, Histogram], step: int) -> None:
        payload = {"step": step, "histograms": {k: _histogram_json(h) for k, h in histograms.items()}}
        self._call("log_histograms", payload, histograms, step)

    def log_text(self, key: str, text: str, step: int) -> None:
        self._call("log_text", {"step": step, "key": key, "text": text}, key, text, step)

    def log_image(self, key: str, image: np.ndarray, step: int) -> None:
        if not hasattr(self.inner, "log_image"):
            return
        self._call("log_image", {"step": step, "key": key, "shape": list(image.shape)}, key, image, step)

    def flush(self) -> None:
        self._call("flush", {})

    def close(self) -> None:
        """Release the backend's local resources, if it has any."""
        close = getattr(self.inner, "close", None)
        if close is not None:
            self._call("close", {})


def _histogram_json(h: Histogram) -> dict[str, Any]:
    return {"edges": h.edges.tolist(), "counts": h.counts.tolist(), "num": h.num}


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return str(value)

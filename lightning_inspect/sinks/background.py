"""Run a slow backend (MLflow over HTTP) on a background thread, so training never waits for it.

The training thread only puts calls on a bounded queue; a worker thread makes them, in order,
through a :class:`~lightning_inspect.sinks.base.GuardedSink` (a failing backend warns once and its
refused values go to a local fallback file). If the queue is full (the backend is far slower
than training), a call is written to the fallback file instead of blocking. :meth:`flush` waits
(bounded) for the queue to drain.

Example:
    >>> from lightning_inspect.sinks.memory import MemorySink
    >>> sink = BackgroundSink(MemorySink())
    >>> sink.log_scalars({"weights/fc.weight/mean": 0.5}, step=1)
    >>> sink.flush()
    >>> sink.guarded.inner.scalars
    {'weights/fc.weight/mean': [(1, 0.5)]}
    >>> sink.close()
"""

from __future__ import annotations

import queue
import threading
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np

from lightning_inspect.sinks.base import GuardedSink, Sink
from lightning_inspect.stats import Histogram

_STOP = object()


def _payload(method: str, args: tuple[Any, ...]) -> dict[str, Any]:
    """What the fallback file keeps of one call (the same layout as the guard's own records)."""
    if method == "log_scalars":
        return {"values": dict(args[0]), "step": args[1]}
    if method == "log_histograms":
        return {"histograms": {k: {"lo": h.min, "hi": h.max, "counts": h.counts.tolist()} for k, h in args[0].items()}, "step": args[1]}
    if method == "log_text":
        return {"key": args[0], "text": args[1], "step": args[2]}
    return {"key": args[0] if args else None, "step": args[-1] if args else None}


class BackgroundSink:
    """A sink whose calls run on a daemon worker thread."""

    def __init__(self, inner: Sink, max_queue: int = 10_000, flush_timeout_s: float = 120.0) -> None:
        self.guarded = inner if isinstance(inner, GuardedSink) else GuardedSink(inner)
        self.name = self.guarded.name
        self.flush_timeout_s = flush_timeout_s
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max_queue)
        self._worker = threading.Thread(target=self._run, name=f"lightning-inspect-{self.name}", daemon=True)
        self._worker.start()
        self._overflow_warned = False

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is _STOP:
                    return
                method, args = item
                getattr(self.guarded, method)(*args)
            finally:
                self._queue.task_done()

    def _put(self, method: str, *args: Any) -> None:
        try:
            self._queue.put_nowait((method, args))
        except queue.Full:
            self.guarded._save(method, _payload(method, args))
            if not self._overflow_warned:
                self._overflow_warned = True
                warnings.warn(
                    f"lightning-inspect: the {self.name} backend is slower than training; values it could "
                    f"not take in time are written to {self.guarded.fallback_path}.",
                    RuntimeWarning,
                    stacklevel=3,
                )

    def log_scalars(self, values: Mapping[str, float], step: int) -> None:
        self._put("log_scalars", dict(values), step)

    def log_histograms(self, histograms: Mapping[str, Histogram], step: int) -> None:
        self._put("log_histograms", dict(histograms), step)

    def log_text(self, key: str, text: str, step: int) -> None:
        self._put("log_text", key, text, step)

    def log_image(self, key: str, image: np.ndarray, step: int) -> None:
        self._put("log_image", key, image, step)

    def flush(self) -> None:
        """Send everything queued and the backend's own flush; wait at most ``flush_timeout_s``."""
        self._put("flush")
        done = threading.Event()
        waiter = threading.Thread(target=lambda: (self._queue.join(), done.set()), daemon=True)
        waiter.start()
        if not done.wait(self.flush_timeout_s):
            saved = self._spill()
            warnings.warn(
                f"lightning-inspect: the {self.name} backend did not take the queued values within "
                f"{self.flush_timeout_s:g} s; {saved} queued call(s) were written to "
                f"{self.guarded.fallback_path} instead.",
                RuntimeWarning,
                stacklevel=2,
            )

    def _spill(self) -> int:
        """Move every call still queued into the fallback file; returns how many."""
        saved = 0
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return saved
            try:
                if item is not _STOP:
                    method, args = item
                    if method not in ("flush", "close"):
                        self.guarded._save(method, _payload(method, args))
                        saved += 1
            finally:
                self._queue.task_done()

    def close(self) -> None:
        """Stop the worker after what is queued."""
        self._put("flush")
        self._put("close")
        try:
            self._queue.put(_STOP, timeout=1.0)
        except queue.Full:
            return
        self._worker.join(timeout=self.flush_timeout_s)
        if self._worker.is_alive():  # the backend is stuck: keep what it never took
            self._spill()

"""Run a slow backend (MLflow over HTTP) on a background thread, so training never waits for it.

The training thread only puts calls on a bounded queue; a worker thread makes them, in order,
through a :class:`~lightning_inspect.backends.base.GuardedSink` (a failing backend warns once and its
refused values go to a local fallback file). If the queue is full (the backend is far slower
than training), a call is written to the fallback file instead of blocking. :meth:`flush` only
queues the backend's flush. :meth:`close` waits for the queue to drain until the fit's shared
:class:`~lightning_inspect.backends.deadline.EndOfFit` deadline; what is left then goes to the
fallback file and the worker stops after the call it is in.

Example:
    >>> from lightning_inspect.backends.memory import MemorySink
    >>> sink = BackgroundSink(MemorySink())
    >>> sink.log_scalars({"weights/fc.weight/mean": 0.5}, step=1)
    >>> sink.close()
    >>> sink.guarded.inner.scalars
    {'weights/fc.weight/mean': [(1, 0.5)]}
"""

from __future__ import annotations

import contextlib
import queue
import threading
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np

from lightning_inspect.backends.base import CONTROL_CALLS, GuardedSink, Sink
from lightning_inspect.backends.deadline import EndOfFit
from lightning_inspect.core.stats import Histogram

_STOP = object()


class BackgroundSink:
    """A sink whose calls run on a daemon worker thread, stopped by :meth:`close`."""

    def __init__(
        self, inner: Sink, max_queue: int = 10_000, deadline: EndOfFit | None = None
    ) -> None:
        self.guarded = inner if isinstance(inner, GuardedSink) else GuardedSink(inner)
        self.name = self.guarded.name
        self.deadline = deadline if deadline is not None else EndOfFit()
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max_queue)
        self._overflow_warned = False
        self._abandoned = False  # the deadline passed: calls still queued go to the fallback file
        self._closed = False
        self._in_flight: tuple[str, tuple[Any, ...]] | None = None  # the call the worker is making
        self._worker = threading.Thread(
            target=self._run, name=f"lightning-inspect-{self.name}", daemon=True
        )
        self._worker.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            method, args = item
            if self._abandoned:
                self._keep(method, args)
                continue
            self._in_flight = item
            getattr(self.guarded, method)(*args)
            self._in_flight = None

    def _keep(self, method: str, args: tuple[Any, ...]) -> bool:
        """Write a call to the fallback file instead of making it; whether it held values."""
        if method in CONTROL_CALLS:
            return False
        self.guarded.save(method, args)
        return True

    def _put(self, method: str, *args: Any) -> None:
        if self._closed:  # a call after the end of fit: nothing sends it any more
            self._keep(method, args)
            return
        try:
            self._queue.put_nowait((method, args))
        except queue.Full:
            self._keep(method, args)
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

    def log_step(
        self, step: int, scalars: Mapping[str, Any], histograms: Mapping[str, Any]
    ) -> None:
        """Queue several callbacks' values of one step (see :meth:`GuardedSink.log_step`)."""
        self._put("log_step", step, scalars, histograms)

    def log_text(self, key: str, text: str, step: int) -> None:
        self._put("log_text", key, text, step)

    def log_image(self, key: str, image: np.ndarray, step: int) -> None:
        self._put("log_image", key, image, step)

    def flush(self) -> None:
        """Queue the backend's flush (after what is queued); returns at once."""
        self._put("flush")

    def close(self) -> None:
        """Send what is queued, flush and close the backend, and stop the worker, by the deadline.

        If the backend has not taken everything by then, the calls still queued, the call in
        progress (it may still arrive) and what the backend holds undelivered are written to the
        fallback file (one warning), and the worker ends after the call it is in, without making
        another.
        """
        if self._closed:
            return
        self._put("flush")
        self._put("close")
        self._closed = True
        with contextlib.suppress(queue.Full):
            self._queue.put(_STOP, timeout=self.deadline.remaining())
        self._worker.join(self.deadline.remaining())
        if not self._worker.is_alive():
            return
        self._abandoned = True
        in_flight = self._in_flight  # kept too: the process may end before the backend answers
        saved = (self._keep(*in_flight) if in_flight is not None else False) + self._spill()
        self.guarded.close()  # keep the backend's undelivered local data; the worker is cut off
        self._queue.put(_STOP)  # emptied by the spill: does not block
        where = self.guarded.fallback_path
        kept = f"{saved} queued call(s) and its undelivered data were written to {where}"
        warnings.warn(
            f"lightning-inspect: the {self.name} backend did not take the queued values by the "
            f"end-of-fit deadline ({self.deadline.budget_s:g} s for all backends); "
            f"{kept if where else 'nothing was left'}.",
            RuntimeWarning,
            stacklevel=2,
        )

    def _spill(self) -> int:
        """Move every call still queued into the fallback file; returns how many held values."""
        saved = 0
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return saved
            if item is not _STOP:
                saved += self._keep(*item)

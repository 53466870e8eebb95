"""A slow backend (MLflow over HTTP) on a worker thread behind a bounded queue, through a
:class:`~lightning_inspect.backends.base.GuardedSink`; a call that finds the queue full goes to
the fallback file instead of blocking, and :meth:`BackgroundSink.close` waits only until the
fit's shared :class:`~lightning_inspect.backends.deadline.EndOfFit`.

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
        self._overflow_warned = self._abandoned = self._closed = False
        self._in_flight: tuple[str, tuple[Any, ...]] | None = None
        self._worker = threading.Thread(
            target=self._run, name=f"lightning-inspect-{self.name}", daemon=True
        )
        self._worker.start()

    def _run(self) -> None:
        while (item := self._queue.get()) is not _STOP:
            if self._abandoned:  # the deadline passed: what is still queued goes to the file
                self._keep(*item)
                continue
            method, args = self._in_flight = item
            self.guarded.close() if method == "close" else self.guarded.call(method, *args)
            self._in_flight = None

    def _keep(self, method: str, args: tuple[Any, ...]) -> bool:
        """Write a call to the fallback file instead of making it; whether it held values."""
        if method not in CONTROL_CALLS:
            self.guarded.save(method, args)
        return method not in CONTROL_CALLS

    def __getattr__(self, method: str) -> Any:
        """The backend's optional ``log_*`` methods, queued."""
        if not method.startswith("log_") or not hasattr(self.guarded, method):
            raise AttributeError(method)
        return lambda *args: self._put(method, *args)

    def _put(self, method: str, *args: Any) -> None:
        """Queue a call (mappings copied: the caller may reuse them)."""
        args = tuple(dict(a) if isinstance(a, Mapping) else a for a in args)
        if self._closed:  # after the end of fit nothing sends it any more
            self._keep(method, args)
            return
        try:
            self._queue.put_nowait((method, args))
        except queue.Full:
            self._keep(method, args)
            if not self._overflow_warned:
                self._overflow_warned = True
                warnings.warn(
                    f"lightning-inspect: the {self.name} backend is slower than training; values it "
                    f"could not take in time are written to {self.guarded.fallback_path}.",
                    RuntimeWarning,
                    stacklevel=3,
                )

    def log_scalars(self, values: Mapping[str, float], step: int) -> None:
        self._put("log_scalars", values, step)

    def log_histograms(self, histograms: Mapping[str, Histogram], step: int) -> None:
        self._put("log_histograms", histograms, step)

    def log_text(self, key: str, text: str, step: int) -> None:
        self._put("log_text", key, text, step)

    def flush(self) -> None:
        self._put("flush")

    def close(self) -> None:
        """Send what is queued, flush and close the backend, and stop the worker, by the deadline;
        then the calls still queued, the one in progress (it may still arrive) and what the backend
        holds undelivered go to the fallback file (one warning)."""
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
        saved = self._keep(*self._in_flight) if self._in_flight is not None else False
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            saved += item is not _STOP and self._keep(*item)
        self.guarded.close()  # the backend's undelivered local data; the worker is cut off
        self._queue.put(_STOP)  # emptied above: does not block
        where = self.guarded.fallback_path
        kept = f"{saved} queued call(s) and its undelivered data were written to {where}"
        warnings.warn(
            f"lightning-inspect: the {self.name} backend did not take the queued values by the "
            f"end-of-fit deadline ({self.deadline.budget_s:g} s for all backends); "
            f"{kept if where else 'nothing was left'}.",
            RuntimeWarning,
            stacklevel=2,
        )

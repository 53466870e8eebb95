"""The protocol every backend implements, an in-memory and a generic one; the guard that keeps
backend faults harmless, its worker thread for slow backends, and the end-of-fit deadline."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import queue
import tempfile
import threading
import time
import warnings
import weakref
from collections import deque
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np

from lightning_inspect.core.stats import Histogram

#: Calls that carry no values: a refused one is noted in the fallback file, not retained.
CONTROL_CALLS = ("flush", "close")
_STOP = object()
#: Seconds the library may spend, in all, sending what is left when a fit ends.
END_OF_FIT_BUDGET_S = 30.0


@runtime_checkable
class Sink(Protocol):
    """Where values go, once per logging step. Optional methods, skipped where missing:
    ``log_image(key, image, step)`` (H x W x 3 uint8), ``log_params(values)`` (returns the keys
    that held another value), ``log_tags(values)``, ``log_files(paths, folder)``,
    ``log_hparams(values, metrics)``, ``close()``, ``unsent()`` (records for the fallback file)."""

    name: str

    def log_scalars(self, values: Mapping[str, float], step: int) -> None: ...
    def log_histograms(self, histograms: Mapping[str, Histogram], step: int) -> None: ...
    def log_text(self, key: str, text: str, step: int) -> None: ...
    def flush(self) -> None: ...


class MemorySink:
    """Keeps everything it is given (tests, notebooks): ``scalars[key] == [(step, value), ...]``.

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


class GenericSink:
    """Any other Lightning logger (CSV, Comet, a user's own): scalars through ``log_metrics``,
    params through ``log_hyperparams``; histograms and texts are dropped (said once at fit start)."""

    def __init__(self, logger: Any, name: str) -> None:
        self.logger = logger
        self.name = name

    def log_scalars(self, values: Mapping[str, float], step: int) -> None:
        self.logger.log_metrics({k: float(v) for k, v in values.items()}, step)

    def log_histograms(self, histograms: Mapping[str, Histogram], step: int) -> None: ...
    def log_text(self, key: str, text: str, step: int) -> None: ...

    def log_params(self, values: Mapping[str, Any]) -> None:
        self.logger.log_hyperparams(dict(values))

    def flush(self) -> None:
        self.logger.save()


class EndOfFit:
    """The deadline of one fit's end, shared by all its backends: the clock starts with the first
    wait, later waits get what is left (at most :data:`END_OF_FIT_BUDGET_S` in all)."""

    _instances: ClassVar[weakref.WeakKeyDictionary[Any, EndOfFit]] = weakref.WeakKeyDictionary()

    def __init__(self, budget_s: float = END_OF_FIT_BUDGET_S) -> None:
        self.budget_s = budget_s
        self._end: float | None = None
        self._lock = threading.Lock()

    @classmethod
    def for_fit(cls, trainer: Any) -> EndOfFit:
        """The deadline of ``trainer``'s current fit (a new one once the last fit's has started)."""
        if (current := cls._instances.get(trainer)) is None or current._end is not None:
            current = cls._instances[trainer] = cls()
        return current

    def remaining(self) -> float:
        """Seconds left before the deadline; the first call starts the clock."""
        with self._lock:
            if self._end is None:
                self._end = time.monotonic() + self.budget_s
            return max(0.0, self._end - time.monotonic())

    def run(self, fn: Callable[..., Any], *args: Any) -> bool:
        """Call ``fn(*args)`` on a helper thread until the deadline; whether it finished."""
        thread = threading.Thread(target=fn, args=args, name="lightning-inspect-end-of-fit")
        thread.daemon = True
        thread.start()
        thread.join(self.remaining())
        return not thread.is_alive()


def text_value(value: Any, limit: int) -> str:
    """``value`` as a param's or tag's text (lists and dicts as JSON), cut to ``limit`` characters."""
    if not isinstance(text := value, str):
        text = json.dumps(value, default=str) if isinstance(value, (list, dict)) else str(value)
    return text if len(text) <= limit else text[: limit - 20] + " ...[cut]"


def fallback_record(method: str, args: tuple[Any, ...]) -> dict[str, Any]:
    """What the fallback file keeps of one sink call (pictures: their shape only)."""

    def kept(hs: Mapping[str, Histogram]) -> dict[str, Any]:
        return {k: {"lo": h.min, "hi": h.max, "counts": h.counts.tolist()} for k, h in hs.items()}

    if method == "log_step":  # several callbacks' values of one step: one record
        step, scalars, hists = args
        values = {k: v for p in scalars.values() for k, v in p.items()}
        merged = {k: h for p in hists.values() for k, h in p.items()}
        return {"call": method, "step": step, "values": values, "histograms": kept(merged)}
    if method == "log_scalars":
        return {"call": method, "step": args[1], "values": dict(args[0])}
    if method == "log_histograms":
        return {"call": method, "step": args[1], "histograms": kept(args[0])}
    if method in ("log_text", "log_image"):
        value = args[1] if method == "log_text" else list(args[1].shape)
        return {"call": method, "step": args[2], "key": args[0], method[4:]: value}
    if not args:
        return {"call": method}
    values = args[0] if isinstance(args[0], Mapping) else list(args[0])  # files: their paths
    return {"call": method, "values": values}


class GuardedSink:
    """A sink whose faults warn once (``owner`` starts the warning) and never stop training: what
    the backend refused goes to a private fallback file (JSON lines, mode 0600, in ``fallback_dir``
    or a new temp directory) and is sent again, in order, once the backend accepts a call. Once
    :attr:`deadline` is set, a ``remote`` backend's calls wait only until it.

    Example:
        >>> sink = GuardedSink(MemorySink())
        >>> sink.log_scalars({"activations/fc/mean": 0.5}, step=3)
        >>> sink.inner.scalars
        {'activations/fc/mean': [(3, 0.5)]}
    """

    max_retained = 10_000  # refused calls kept to be sent again

    def __init__(
        self, inner: Sink, fallback_dir: str | Path | None = None, owner: str = "lightning-inspect"
    ) -> None:
        self.inner = inner
        self.name = inner.name
        self.owner = owner
        self.failed = self._lost_warned = self._late = False
        self.deadline: EndOfFit | None = None
        self.fallback_path: Path | None = None
        self._fallback_dir = fallback_dir
        self._lock = threading.Lock()  # a background worker and the closing thread
        self._retained: deque[tuple[str, tuple[Any, ...]]] = deque(maxlen=self.max_retained)

    def __getattr__(self, method: str) -> Any:
        if not method.startswith("log_") or not hasattr(self.inner, method):
            raise AttributeError(method)
        return functools.partial(self.call, method)

    def log_scalars(self, values: Mapping[str, float], step: int) -> None:
        self.call("log_scalars", values, step)

    def log_histograms(self, histograms: Mapping[str, Histogram], step: int) -> None:
        self.call("log_histograms", histograms, step)

    def log_text(self, key: str, text: str, step: int) -> None:
        self.call("log_text", key, text, step)

    def flush(self) -> None:
        self.call("flush")

    def call(self, method: str, *args: Any) -> Any:
        """``inner.<method>(*args)``, guarded; its result, or None when it failed."""
        if self.deadline is None or not getattr(self.inner, "remote", False):
            return self._call(method, args)
        result: list[Any] = []  # after the deadline: the file, without waiting again
        if self._late or not self.deadline.run(lambda: result.append(self._call(method, args))):
            self._late = True
            self.save(method, args)
            budget = self.deadline.budget_s
            self._warn(f"no answer by the end-of-fit deadline, {budget:g} s for all backends")
        return result[0] if result else None

    def _call(self, method: str, args: tuple[Any, ...]) -> Any:
        try:
            result = getattr(self.inner, method)(*args)
        except Exception as exc:  # a backend fault must never reach the training loop
            self.save(method, args)
            if method not in CONTROL_CALLS:
                self._retained.append((method, args))
            self._warn(f"{type(exc).__name__}: {exc}")
            return None
        while self._retained:  # what was refused, oldest first, until a call fails
            try:
                getattr(self.inner, self._retained[0][0])(*self._retained[0][1])
            except Exception:
                break
            self._retained.popleft()
        return result

    def _warn(self, why: str) -> None:
        if not self.failed:
            self.failed = True
            where = self.fallback_path
            kept = f"written to {where}" if where else "kept in memory only"
            message = f"{self.owner}: the {self.name} backend failed ({why}). Training continues; "
            message += f"values it refused are {kept} and sent again once it accepts values again."
            warnings.warn(message, RuntimeWarning, stacklevel=4)

    def save(self, method: str, args: tuple[Any, ...]) -> None:
        """Append one call to the fallback file instead of sending it."""
        self._write([fallback_record(method, args)])

    def _write(self, records: list[dict[str, Any]]) -> None:
        text = "".join(json.dumps(r, default=str) + "\n" for r in records)
        with self._lock:
            try:
                if self.fallback_path is None:
                    folder = self._fallback_dir or tempfile.mkdtemp(prefix="lightning_inspect_")
                    Path(folder).mkdir(parents=True, exist_ok=True)
                    prefix = f"lightning_inspect_unsent_{self.name}_"
                    fd, path = tempfile.mkstemp(prefix=prefix, suffix=".jsonl", dir=folder)  # 0600
                    self.fallback_path = Path(path)
                else:
                    flags = os.O_WRONLY | os.O_APPEND | getattr(os, "O_NOFOLLOW", 0)
                    fd = os.open(self.fallback_path, flags)
                with os.fdopen(fd, "a", encoding="utf-8") as f:
                    f.write(text)
            except OSError as exc:
                if not self._lost_warned:
                    self._lost_warned = True
                    message = f"{self.owner}: the {self.name} fallback file could not be written "
                    message += f"({type(exc).__name__}: {exc}); what the backend refuses is lost."
                    warnings.warn(message, RuntimeWarning, stacklevel=5)

    def close(self) -> None:
        """Keep what the backend holds undelivered in the fallback file; release its resources."""
        if (unsent := getattr(self.inner, "unsent", None)) is not None:
            try:
                records = unsent()
            except Exception as exc:  # the local copy is unreadable: say so, keep closing
                records = [{"call": "unsent", "error": f"{type(exc).__name__}: {exc}"}]
            if records:
                self._write(records)
        if hasattr(self.inner, "close"):
            GuardedSink.call(self, "close")  # on this thread, also in a BackgroundSink


class BackgroundSink(GuardedSink):
    """A guarded slow backend (MLflow over HTTP) on a daemon worker behind a bounded queue: a call
    that finds the queue full goes to the fallback file instead of blocking, and :meth:`close`
    waits only until ``deadline``, the fit's :class:`EndOfFit`."""

    def __init__(self, inner: Sink, deadline: EndOfFit | None = None, **guard: Any) -> None:
        super().__init__(inner, **guard)
        self.end_of_fit = deadline or EndOfFit()
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=10_000)  # beyond: the fallback file
        self._overflow_warned = self._abandoned = self._closed = False
        self._in_flight: tuple[str, tuple[Any, ...]] | None = None
        self._worker = threading.Thread(target=self._run, name=f"lightning-inspect-{self.name}")
        self._worker.daemon = True
        self._worker.start()

    def _run(self) -> None:
        while (item := self._queue.get()) is not _STOP:
            if self._abandoned:  # the deadline passed: what is still queued goes to the file
                self._keep(*item)
                continue
            method, args = self._in_flight = item
            super().close() if method == "close" else super().call(method, *args)
            self._in_flight = None

    def _keep(self, method: str, args: tuple[Any, ...]) -> bool:
        """Write a call to the fallback file instead of making it; whether it held values."""
        if method not in CONTROL_CALLS:
            self.save(method, args)
        return method not in CONTROL_CALLS

    def call(self, method: str, *args: Any) -> None:
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
                message = f"lightning-inspect: the {self.name} backend is slower than training; "
                message += f"values it could not take in time are written to {self.fallback_path}."
                warnings.warn(message, RuntimeWarning, stacklevel=3)

    def close(self) -> None:
        """Send what is queued, flush, close and stop the worker by the deadline; then what is left
        (queued, in progress, undelivered) goes to the fallback file (one warning)."""
        if self._closed:
            return
        self.call("flush")
        self.call("close")
        self._closed = True
        with contextlib.suppress(queue.Full):
            self._queue.put(_STOP, timeout=self.end_of_fit.remaining())
        self._worker.join(self.end_of_fit.remaining())
        if not self._worker.is_alive():
            return
        self._abandoned = True
        items = [self._in_flight] if self._in_flight is not None else []
        with contextlib.suppress(queue.Empty):
            while True:
                items.append(self._queue.get_nowait())
        saved = sum(self._keep(*item) for item in items if item is not _STOP)
        super().close()  # the backend's undelivered local data; the worker is cut off
        self._queue.put(_STOP)  # emptied above: does not block
        message = f"lightning-inspect: the {self.name} backend did not take the queued values by "
        message += f"the end-of-fit deadline ({self.end_of_fit.budget_s:g} s for all backends); "
        written = f"{saved} queued call(s) and its undelivered data were written to "
        message += f"{written}{self.fallback_path}." if self.fallback_path else "nothing was left."
        warnings.warn(message, RuntimeWarning, stacklevel=2)

"""The protocol every backend implements, and the one guard that keeps backend faults harmless.

Example:
    >>> from lightning_inspect.backends.memory import MemorySink
    >>> sink = GuardedSink(MemorySink())
    >>> sink.log_scalars({"activations/fc/mean": 0.5}, step=3)
    >>> sink.inner.scalars
    {'activations/fc/mean': [(3, 0.5)]}
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
import threading
import warnings
from collections import deque
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from lightning_inspect.backends.deadline import EndOfFit
from lightning_inspect.core.stats import Histogram

#: Calls that carry no values: a refused one is noted in the fallback file, not retained.
CONTROL_CALLS = ("flush", "close")


@runtime_checkable
class Sink(Protocol):
    """Where values go, cheap to call once per logging step (keys per :mod:`~lightning_inspect.
    core.keys`, histograms binned on the device, texts in markdown). Optional methods, skipped
    where missing: ``log_image(key, image, step)`` (H x W x 3 uint8), ``log_params(values)``
    (returns the keys that held another value), ``log_tags(values)``, ``log_files(paths,
    folder)``, ``log_hparams(values, metrics)``, ``close()``, ``unsent()`` (fallback records)."""

    name: str

    def log_scalars(self, values: Mapping[str, float], step: int) -> None: ...
    def log_histograms(self, histograms: Mapping[str, Histogram], step: int) -> None: ...
    def log_text(self, key: str, text: str, step: int) -> None: ...
    def flush(self) -> None: ...


def histogram_record(h: Histogram) -> dict[str, Any]:
    """A histogram as the fallback file keeps it."""
    return {"lo": h.min, "hi": h.max, "counts": h.counts.tolist()}


def text_value(value: Any, limit: int) -> str:
    """``value`` as a param's or tag's text (lists and dicts as JSON), cut to ``limit`` characters."""
    text = value if isinstance(value, str) else None
    if text is None:
        text = json.dumps(value, default=str) if isinstance(value, (list, dict)) else str(value)
    return text if len(text) <= limit else text[: limit - 20] + " ...[cut]"


def fallback_record(method: str, args: tuple[Any, ...]) -> dict[str, Any]:
    """What the fallback file keeps of one sink call (pictures: their shape only)."""
    if method == "log_step":  # several callbacks' values of one step: one record
        step, scalars, hists = args
        args = ({k: v for p in scalars.values() for k, v in p.items()}, step)
        kept = {k: histogram_record(h) for p in hists.values() for k, h in p.items()}
        return {"call": method, "step": step, "values": args[0], "histograms": kept}
    if method == "log_scalars":
        return {"call": method, "step": args[1], "values": dict(args[0])}
    if method == "log_histograms":
        kept = {k: histogram_record(h) for k, h in args[0].items()}
        return {"call": method, "step": args[1], "histograms": kept}
    if method in ("log_text", "log_image"):
        value = args[1] if method == "log_text" else list(args[1].shape)
        return {"call": method, "step": args[2], "key": args[0], method[4:]: value}
    if not args:
        return {"call": method}
    values = args[0] if isinstance(args[0], Mapping) else list(args[0])  # files: their paths
    return {"call": method, "values": values}


class GuardedSink:
    """A sink whose faults warn once (``owner`` starts the warning) and never stop training.

    What the backend refused goes, as JSON lines, to a fallback file the warning names (created
    at the first refusal, unpredictable name, mode 0600, in ``fallback_dir`` or a new private
    directory under the temp directory; never deleted), and is sent again, in order, once the
    backend accepts a call (the last ``max_retained``). Once :attr:`deadline` is set (the end of
    fit), a ``remote`` backend's calls wait only until it; later ones go to the file."""

    def __init__(
        self,
        inner: Sink,
        fallback_dir: str | os.PathLike[str] | None = None,
        max_retained: int = 10_000,
        owner: str = "lightning-inspect",
    ) -> None:
        self.inner = inner
        self.name = inner.name
        self.owner = owner
        self.failed = False
        self.deadline: EndOfFit | None = None
        self.fallback_path: Path | None = None  # the JSON-lines file, once something is refused
        self._fallback_dir = Path(fallback_dir) if fallback_dir else None
        self._lock = threading.Lock()  # a background worker and the closing thread
        self._lost_warned = self._late = False
        self._retained: deque[tuple[str, tuple[Any, ...]]] = deque(maxlen=max_retained)

    def __getattr__(self, method: str) -> Any:
        """The backend's optional ``log_*`` methods, guarded (missing ones are missing here)."""
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
        if self._late:
            return self.save(method, args)
        result: list[Any] = []
        if not self.deadline.run(lambda: result.append(self._call(method, args))):
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
            warnings.warn(
                f"{self.owner}: the {self.name} backend failed ({why}). Training continues; "
                f"values it refused are {kept} and sent again once it accepts values again.",
                RuntimeWarning,
                stacklevel=4,
            )

    def save(self, method: str, args: tuple[Any, ...]) -> None:
        """Append one call to the fallback file instead of sending it."""
        self._write([fallback_record(method, args)])

    def _write(self, records: list[dict[str, Any]]) -> None:
        text = "".join(json.dumps(r, default=str) + "\n" for r in records)
        with self._lock:
            try:
                if self.fallback_path is None:
                    folder = self._fallback_dir or Path(
                        tempfile.mkdtemp(prefix="lightning_inspect_")
                    )
                    folder.mkdir(parents=True, exist_ok=True)
                    prefix = f"lightning_inspect_unsent_{self.name}_"
                    fd, path = tempfile.mkstemp(prefix=prefix, suffix=".jsonl", dir=folder)
                    os.close(fd)  # mkstemp: O_EXCL, mode 0600
                    self.fallback_path = Path(path)
                flags = os.O_WRONLY | os.O_APPEND | getattr(os, "O_NOFOLLOW", 0)
                fd = os.open(self.fallback_path, flags)
                with os.fdopen(fd, "a", encoding="utf-8") as f:
                    f.write(text)
            except OSError as exc:
                if not self._lost_warned:
                    self._lost_warned = True
                    warnings.warn(
                        f"{self.owner}: the {self.name} fallback file could not be written "
                        f"({type(exc).__name__}: {exc}); what the backend refuses is lost.",
                        RuntimeWarning,
                        stacklevel=5,
                    )

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
            self.call("close")

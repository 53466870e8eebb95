"""Opt-in console capture: ``sys.stdout``/``sys.stderr`` teed into a file for the length of a fit."""

from __future__ import annotations

import logging
import sys
import threading
from pathlib import Path
from typing import Any


class _Tee:
    """A text stream that writes through to the original and copies to the capture file."""

    def __init__(self, original: Any, capture: ConsoleCapture) -> None:
        self._original, self._capture, self.pending = original, capture, ""

    def write(self, text: str) -> int:
        written = self._original.write(text)
        self._capture.collect(self, text)
        return written if isinstance(written, int) else len(text)

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, name: str) -> Any:  # flush, isatty, fileno, encoding...
        return getattr(self._original, name)


class ConsoleCapture:
    """Tees ``sys.stdout``/``sys.stderr`` and the logging handlers writing to them into ``path``.

    A line redrawn with carriage returns (a progress bar) is kept as its last state.
    """

    def __init__(self, path: Path) -> None:
        self.path, self._lock = path, threading.Lock()
        self._patched: list[tuple[Any, str, Any, _Tee]] = []  # (owner, attribute, original, tee)

    def start(self) -> ConsoleCapture:
        """Replace the streams; on a failure, restore what was replaced and raise."""
        self._file = self.path.open("w", encoding="utf-8", errors="replace")
        try:
            tees = {}
            for name in ("stdout", "stderr"):
                tees[id(getattr(sys, name))] = tee = _Tee(getattr(sys, name), self)
                self._patched.append((sys, name, tee._original, tee))
                setattr(sys, name, tee)
            loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
            for handler in {h for lg in loggers for h in getattr(lg, "handlers", [])}:
                tee = tees.get(id(getattr(handler, "stream", None)))
                if tee is not None and isinstance(handler, logging.StreamHandler):
                    self._patched.append((handler, "stream", handler.stream, tee))
                    handler.setStream(tee)  # type: ignore[arg-type]
        except BaseException:
            self.stop()
            raise
        return self

    def collect(self, tee: _Tee, text: str) -> None:
        with self._lock:
            if self._file.closed:
                return
            *lines, rest = (tee.pending + text).replace("\r\n", "\n").split("\n")
            self._file.writelines(line.rsplit("\r", 1)[-1] + "\n" for line in lines)
            tee.pending = rest[rest.rfind("\r", 0, len(rest) - 1) + 1 :]
            if lines:
                self._file.flush()

    def stop(self) -> None:
        """Restore the streams and handlers still pointing at the tees (not others' since)."""
        for owner, name, original, tee in reversed(self._patched):
            if getattr(owner, name) is tee and isinstance(owner, logging.StreamHandler):
                owner.setStream(original)
            elif getattr(owner, name) is tee:
                setattr(owner, name, original)
        with self._lock:
            tees = {id(tee): tee for *_, tee in self._patched}.values()  # a tee is patched in twice
            self._file.writelines(t.pending.rsplit("\r", 1)[-1] + "\n" for t in tees if t.pending)
            self._file.close()
        self._patched.clear()

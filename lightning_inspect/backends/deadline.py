"""One time budget for everything the library still sends to its backends when a fit ends:
its clock starts with the first wait and later waits get what is left, so a slow or dead backend
adds at most :data:`END_OF_FIT_BUDGET_S` to the end of fit.

Example:
    >>> deadline = EndOfFit(budget_s=5.0)
    >>> deadline.run(print, "sent")
    sent
    True
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Callable
from typing import Any, ClassVar

#: Seconds the library may spend, in all, sending what is left when a fit ends.
END_OF_FIT_BUDGET_S = 30.0


class EndOfFit:
    """The deadline of one fit's end, shared by all its backends."""

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

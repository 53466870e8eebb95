"""When to log: a pure function of ``trainer.global_step`` (optimizer steps, so right under
gradient accumulation, validation and resumption). A batch taking several optimizer steps
(manual optimization) covers ``[step at its start, step at its end)`` and is logged under the
first due step among them.

Example:
    >>> s = Schedule(every_n_steps=10, start_step=5, stop_step=40)
    >>> [step for step in range(50) if s.should_log(step)]
    [5, 15, 25, 35]
    >>> g = Schedule(every_n_steps=3)  # two optimizer steps per batch: batches start at 0, 2, 4...
    >>> [g.first_due(start, start + 2) for start in range(0, 12, 2)]
    [0, 3, None, 6, 9, None]
"""

from __future__ import annotations

from dataclasses import dataclass

from lightning_inspect._validation import check_optional_int, check_positive_int
from lightning_inspect.errors import ConfigError


@dataclass(frozen=True)
class Schedule:
    """Log at ``start_step``, then every ``every_n_steps`` optimizer steps, before ``stop_step``."""

    every_n_steps: int = 50
    start_step: int = 0
    stop_step: int | None = None

    @classmethod
    def checked(
        cls, owner: str, every_n_steps: object, start_step: object, stop_step: object
    ) -> Schedule:
        """Build a schedule, raising ConfigError for bad values (``owner`` names the caller)."""
        every = check_positive_int(owner, "every_n_steps", every_n_steps)
        start = check_positive_int(owner, "start_step", start_step, minimum=0)
        stop = check_optional_int(owner, "stop_step", stop_step, minimum=0)
        if stop is not None and stop <= start:
            raise ConfigError(
                f"{owner}(start_step={start}, stop_step={stop}): stop_step must be greater than start_step."
            )
        return cls(every, start, stop)

    def first_due(self, first: int, stop: int) -> int | None:
        """The first logged step in ``[first, stop)``, or ``None``."""
        step = max(first, self.start_step)
        step += -(step - self.start_step) % self.every_n_steps
        if step >= stop or (self.stop_step is not None and step >= self.stop_step):
            return None
        return step

    def should_log(self, step: int) -> bool:
        """Whether optimizer step ``step`` (0-based) is logged."""
        return self.first_due(step, step + 1) == step

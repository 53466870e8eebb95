"""lightning_inspect.core.schedule: when to log, and argument checks."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lightning_inspect.core.schedule import Schedule
from lightning_inspect.errors import ConfigError


def logged(s: Schedule, n: int = 60) -> list[int]:
    return [step for step in range(n) if s.should_log(step)]


def test_defaults() -> None:
    assert logged(Schedule(), 200) == [0, 50, 100, 150]


def test_every_start_stop() -> None:
    assert logged(Schedule(every_n_steps=10, start_step=5, stop_step=40)) == [5, 15, 25, 35]
    assert logged(Schedule(every_n_steps=1, start_step=3, stop_step=6)) == [3, 4, 5]
    assert logged(Schedule(every_n_steps=2))[:4] == [0, 2, 4, 6]


@given(st.integers(1, 9), st.integers(0, 20), st.one_of(st.none(), st.integers(1, 40)))
def test_should_log_is_a_range(every: int, start: int, span: int | None) -> None:
    stop = None if span is None else start + span
    s = Schedule.checked("T", every, start, stop)
    assert logged(s, 80) == list(range(start, 80 if stop is None else min(stop, 80), every))


@pytest.mark.parametrize(
    "kwargs, arg",
    [
        (dict(every_n_steps=0), "every_n_steps=0"),
        (dict(every_n_steps=-3), "every_n_steps=-3"),
        (dict(every_n_steps=2.0), "every_n_steps=2.0"),
        (dict(every_n_steps="5"), "every_n_steps='5'"),
        (dict(every_n_steps=True), "every_n_steps=True"),
        (dict(start_step=-1), "start_step=-1"),
        (dict(stop_step=-2), "stop_step=-2"),
        (dict(start_step=5, stop_step=5), "stop_step=5"),
        (dict(start_step=5, stop_step=2), "stop_step=2"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs: dict, arg: str) -> None:
    args = {"every_n_steps": 1, "start_step": 0, "stop_step": None, **kwargs}
    with pytest.raises(ConfigError) as info:
        Schedule.checked(
            "ActivationMonitor", args["every_n_steps"], args["start_step"], args["stop_step"]
        )
    msg = str(info.value)
    assert msg.startswith("ActivationMonitor(") and arg in msg


def test_checked_returns_values() -> None:
    assert Schedule.checked("T", 3, 1, None) == Schedule(3, 1, None)
    assert Schedule.checked("T", 3, 0, 10).stop_step == 10


@given(
    st.integers(1, 9),
    st.integers(0, 20),
    st.one_of(st.none(), st.integers(1, 40)),
    st.integers(0, 60),
    st.integers(1, 5),
)
def test_first_due_is_the_first_logged_step_of_a_range(
    every: int, start: int, span: int | None, first: int, width: int
) -> None:
    stop = None if span is None else start + span
    s = Schedule.checked("T", every, start, stop)
    due = [step for step in range(first, first + width) if s.should_log(step)]
    assert s.first_due(first, first + width) == (due[0] if due else None)

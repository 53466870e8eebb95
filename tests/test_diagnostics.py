"""Tests for lightning_inspect.health.rules: thresholds, rules, findings, report (no Lightning)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lightning_inspect.backends.pictures import heatmap, publish_image
from lightning_inspect.errors import ConfigError
from lightning_inspect.health.rules import (
    Finding,
    HealthReport,
    HealthRules,
    HealthThresholds,
    check_dead_units,
    check_saturation,
    check_update_ratio,
    format_value,
)

# -- thresholds -------------------------------------------------------------------------------


def test_thresholds_defaults_and_overrides() -> None:
    t = HealthThresholds.checked("HealthMonitor", None)
    assert (t.dead_fraction, t.grad_spike_factor, t.update_ratio_low, t.update_ratio_high) == (
        0.5,
        10.0,
        1e-5,
        1e-1,
    )
    t = HealthThresholds.checked("HealthMonitor", {"dead_fraction": 0.9, "dead_window": 2})
    assert (t.dead_fraction, t.dead_window) == (0.9, 2)
    assert HealthThresholds.checked("HealthMonitor", t) is t


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (
            {"dead_fractoin": 0.5},
            r"HealthMonitor\(thresholds.dead_fractoin=0.5\): unknown threshold .*Did you mean 'dead_fraction'",
        ),
        (
            {"dead_fraction": 1.5},
            r"HealthMonitor\(thresholds.dead_fraction=1.5\): expected a number in \(0, 1\]",
        ),
        ({"dead_window": 0}, r"thresholds.dead_window=0\): expected an integer >= 1"),
        ({"grad_spike_factor": "big"}, r"thresholds.grad_spike_factor='big'\)"),
        (
            {"grad_norm_low": 10.0, "grad_norm_high": 1.0},
            r"grad_norm_low must not exceed grad_norm_high",
        ),
        ([0.5], r"HealthMonitor\(thresholds=\[0.5\]\): expected a mapping"),
    ],
)
def test_thresholds_errors_name_argument_value_and_allowed(value: object, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        HealthThresholds.checked("HealthMonitor", value)  # type: ignore[arg-type]


# -- single rules -----------------------------------------------------------------------------


def test_dead_units_rule() -> None:
    t = HealthThresholds(dead_fraction=0.5, dead_window=4)
    assert check_dead_units("net.1", 0.49, 100, 3, t) is None
    partial = check_dead_units("net.1", 0.5, 100, 3, t, depth=1)
    assert partial is not None and partial.severity == "warning" and partial.depth == 1
    assert "50 of 100 units" in partial.hint and "last 4 logged steps" in partial.hint
    every = check_dead_units("net.1", 1.0, 8, 7, t)
    assert (
        every is not None
        and every.severity == "error"
        and every.step == 7
        and every.statistic == "dead_fraction"
    )


def test_saturation_rule() -> None:
    t = HealthThresholds(saturation_fraction=0.3)
    assert check_saturation("net.3", 0.29, 0, t) is None
    f = check_saturation("net.3", 0.8, 2, t, "Tanh")
    assert f is not None and f.rule == "saturation" and "80% of the Tanh outputs" in f.hint


def test_update_ratio_rules() -> None:
    t = HealthThresholds()
    assert check_update_ratio("fc", 1e-3, 0, t) is None
    high = check_update_ratio("fc", 0.5, 1, t)
    low = check_update_ratio("fc", 1e-7, 1, t)
    bad = check_update_ratio("fc", math.nan, 1, t)
    assert high is not None and (high.rule, high.severity, high.threshold) == (
        "update_ratio_high",
        "warning",
        0.1,
    )
    assert low is not None and (low.rule, low.severity) == ("update_ratio_low", "info")
    assert bad is not None and (bad.rule, bad.severity) == ("nonfinite", "error")


def test_gradient_rules_absolute_relative_and_nonfinite() -> None:
    rules = HealthRules(
        HealthThresholds(grad_norm_low=1e-8, grad_norm_high=100.0, grad_depth_ratio=1e-3)
    )
    stats = {
        "net.0": {"grad_norm": 1e-9},  # absolute: below grad_norm_low
        "net.2": {"grad_norm": 1e-5},  # relative: below 1e-3 of the largest (net.4)
        "net.4": {"grad_norm": 1.0},
        "net.6": {"grad_norm": 500.0},  # exploding (absolute): error
        "net.8": {"grad_norm": math.inf},
    }
    found = rules.observe(4, stats, order=["net.0", "net.2", "net.4", "net.6", "net.8"])
    got = [(f.rule, f.module, f.severity, f.depth) for f in found]
    assert got == [
        ("vanishing_gradient", "net.0", "warning", 0),
        ("vanishing_gradient", "net.2", "warning", 1),
        ("exploding_gradient", "net.6", "error", 3),
        ("nonfinite", "net.8", "error", 4),
    ]
    assert "'net.6'" in found[1].hint  # relative to the largest finite norm
    assert all(f.step == 4 for f in found)


def test_gradient_spike_against_own_running_median() -> None:
    rules = HealthRules(
        HealthThresholds(grad_spike_factor=10.0, spike_min_history=3, spike_history=5)
    )
    # Too little history: no spike, whatever the jump.
    assert rules.observe(0, {"fc": {"grad_norm": 1.0}}) == []
    assert rules.observe(1, {"fc": {"grad_norm": 100.0}}) == []
    assert rules.observe(2, {"fc": {"grad_norm": 1.0}}) == []
    # History [1, 100, 1]: median 1; 9.9 is no spike, 10.5 is.
    assert rules.observe(3, {"fc": {"grad_norm": 9.9}}) == []
    found = rules.observe(4, {"fc": {"grad_norm": 50.0}})  # history [1, 100, 1, 9.9]: median 5.45
    assert found == []
    found = rules.observe(5, {"fc": {"grad_norm": 1000.0}})
    assert [(f.rule, f.severity, f.step) for f in found] == [("exploding_gradient", "warning", 5)]
    assert "x its running median" in found[0].hint
    state = rules.state_dict()
    restored = HealthRules(rules.thresholds)
    restored.load_state_dict(state)
    assert restored.state_dict() == state


def test_observe_orders_by_execution_and_passes_kinds() -> None:
    rules = HealthRules()
    stats = {"late": {"saturated_fraction": 0.9}, "early": {"dead_fraction": 1.0, "units": 4.0}}
    found = rules.observe(3, stats, order=["early", "late"], kinds={"late": "Sigmoid"})
    assert [(f.module, f.rule, f.depth) for f in found] == [
        ("early", "dead_units", 0),
        ("late", "saturation", 1),
    ]
    assert "4 of 4 units" in found[0].hint and "Sigmoid" in found[1].hint


# -- report -----------------------------------------------------------------------------------


def _f(rule: str, severity: str, module: str, value: float, step: int, depth: int = -1) -> Finding:
    return Finding(rule, severity, module, "grad_norm", value, step, f"hint {rule}", depth=depth)


def test_report_merges_per_rule_and_module_and_keeps_first_and_worst() -> None:
    report = HealthReport()
    assert report.add(_f("vanishing_gradient", "warning", "net.0", 1e-8, 2))
    assert not report.add(_f("vanishing_gradient", "warning", "net.0", 1e-10, 5))
    assert not report.add(_f("vanishing_gradient", "warning", "net.0", 1e-9, 7))
    (entry,) = report.entries()
    assert (
        entry.count,
        entry.first.step,
        entry.worst.step,
        entry.worst.value,
        entry.last_step,
    ) == (3, 2, 5, 1e-10, 7)


def test_report_lists_worst_first() -> None:
    report = HealthReport()
    report.extend(
        [
            _f("update_ratio_low", "info", "a", 1e-7, 0),
            _f("vanishing_gradient", "warning", "b", 1e-9, 0, depth=2),
            _f("vanishing_gradient", "warning", "a", 1e-9, 0, depth=0),
            _f("dead_units", "error", "c", 1.0, 9),
            _f("nonfinite", "error", "d", 3.0, 9),
            _f("exploding_gradient", "warning", "e", 1e4, 1),
        ]
    )
    order = [(f.severity, f.rule, f.module) for f in report.findings()]
    assert order == [
        ("error", "nonfinite", "d"),
        ("error", "dead_units", "c"),
        ("warning", "exploding_gradient", "e"),
        ("warning", "vanishing_gradient", "a"),
        ("warning", "vanishing_gradient", "b"),
        ("info", "update_ratio_low", "a"),
    ]
    assert report.counts() == {"error": 2, "warning": 3, "info": 1}


def test_report_renders_markdown_and_rich() -> None:
    from rich.console import Console
    from rich.markdown import Markdown

    report = HealthReport()
    assert report.to_markdown() == "### Health report: no problems found"
    report.logged_steps = 3
    assert report.headline() == "Health report: no problems found in 3 logged steps"
    report.add(Finding("dead_units", "error", "net.1", "dead_fraction", 1.0, 4, "a | pipe"))
    report.add(Finding("dead_units", "error", "net.1", "dead_fraction", 1.0, 5, "a | pipe"))
    md = report.to_markdown().splitlines()
    assert md[0] == "### Health report: 1 problem (1 error, 0 warnings, 0 notes)"
    assert md[2].startswith("| severity | rule | module | statistic | value | step |")
    assert md[4] == "| error | dead_units | net.1 | dead_fraction | 1 | 4 |  | 2 | a \\| pipe |"
    console = Console(record=True, width=200)
    console.print(Markdown(report.to_markdown()))  # the console prints the same table
    text = console.export_text()
    assert "net.1" in text and "dead_fraction" in text and "a | pipe" in text


def test_format_value() -> None:
    assert [format_value(v) for v in (0.0, 1.0, 0.5, 2e-9, 3e5, math.inf)] == [
        "0",
        "1",
        "0.5",
        "2.0e-09",
        "3.0e+05",
        "inf",
    ]


# -- pictures ---------------------------------------------------------------------------------


def test_heatmap_handles_missing_values_and_log_scale() -> None:
    values = np.array([[1e-9, np.nan, 1e-7], [0.0, 1.0, 10.0]])
    image = heatmap(values, ["net.0", "net.2"], [0, 5, 10], "grad", log10=True)
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3 and image.std() > 0


def test_publish_image_uses_log_image_and_warns_once_on_failure() -> None:
    class Good:
        name = "good"

        def __init__(self) -> None:
            self.images: list[tuple[str, int]] = []

        def log_image(self, key: str, image: np.ndarray, step: int) -> None:
            self.images.append((key, step))

    class Bad:
        name = "bad"

        def log_image(self, key: str, image: np.ndarray, step: int) -> None:
            raise OSError("disk full")

    good, warned = Good(), set()
    image = np.zeros((4, 4, 3), dtype=np.uint8)
    with pytest.warns(
        RuntimeWarning, match="could not log the picture 'health/x' to bad .*disk full"
    ):
        assert publish_image([good, Bad()], "health/x", image, 3, "HealthMonitor", warned) == [
            "good"
        ]
    publish_image([Bad()], "health/x", image, 4, "HealthMonitor", warned)  # no second warning
    assert good.images == [("health/x", 3)] and warned == {"bad"}

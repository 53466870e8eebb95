"""Health rules over reduced statistics: thresholds, findings and the health report.

Pure host-side logic (no Lightning, no tensors): :class:`HealthRules` looks at the statistics of
one logging step, per module, and returns :class:`Finding` objects; :class:`HealthReport` keeps
them (one entry per rule and module, with the first and the worst occurrence) and renders them,
worst first, as markdown or as a rich table. :class:`~lightning_inspect.HealthMonitor` feeds it
from training.

Statistics the rules read, per module (a missing one is simply not checked):

=======================  =====================================================================
``dead_fraction``        fraction of units (features / channels) of a ReLU-like output never
                         positive over the last ``dead_window`` logged steps (``units``: how
                         many units the output has)
``saturated_fraction``   fraction of a Tanh / Sigmoid / Hardtanh output at its bounds
``grad_norm``            L2 norm of the gradients of the module's own parameters
``update_ratio``         ``||W_after - W_before|| / ||W_before||`` over the module's parameters
=======================  =====================================================================

Example:
    >>> rules = HealthRules()
    >>> found = rules.observe(10, {"fc1": {"grad_norm": 1e-9}, "fc2": {"grad_norm": 0.5}})
    >>> [(f.rule, f.module, f.step) for f in found]
    [('vanishing_gradient', 'fc1', 10)]
    >>> report = HealthReport()
    >>> new = report.extend(found)
    >>> print(report.to_markdown().splitlines()[0])
    ### Health report: 1 problem (0 errors, 1 warning, 0 notes)
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from lightning_inspect._validation import suggestion
from lightning_inspect.errors import ConfigError

#: Severities, worst first.
SEVERITIES = ("error", "warning", "info")

#: Rules, in the order the report lists them within one severity.
RULES = (
    "nonfinite",
    "exploding_gradient",
    "dead_units",
    "vanishing_gradient",
    "saturation",
    "update_ratio_high",
    "update_ratio_low",
    "grad_scaler_stalled",
)

#: A GradScaler that still skips steps at a scale this low (or lower) is stalled: gradients
#: overflow even unscaled (a NaN/Inf made in backward), not from the scale it is searching for.
SCALER_STALL_SCALE = 1.0

#: Rules whose worst value is the smallest one (the others: the largest).
_LOWER_IS_WORSE = frozenset({"vanishing_gradient", "update_ratio_low"})


# ---------------------------------------------------------------------------------------------
# Thresholds
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HealthThresholds:
    """Where the health rules draw the line. Every field can be overridden by name.

    Attributes:
        dead_fraction: report a ReLU-like module when at least this fraction of its units was
            never positive over ``dead_window`` logged steps (an error when all of them were).
        dead_window: how many consecutive logged steps a unit must stay non-positive to count
            as dead.
        saturation_fraction: report a Tanh / Sigmoid / Hardtanh module when at least this
            fraction of its outputs is saturated.
        saturation_margin: saturated means ``|y| > 1 - margin`` for Tanh, ``y < margin`` or
            ``y > 1 - margin`` for Sigmoid, and exactly at a bound for Hardtanh.
        grad_norm_low: a module whose parameter-gradient norm is below this has a vanishing
            gradient.
        grad_norm_high: above this, an exploding gradient (an error).
        grad_depth_ratio: a module whose gradient norm is below this fraction of the largest
            module gradient norm of the same step has a vanishing gradient (depth-relative).
        grad_spike_factor: a gradient norm above this many times the module's own running median
            is an exploding gradient (a warning).
        spike_history: how many logged steps the running median covers.
        spike_min_history: no spike is reported before this many values were seen.
        update_ratio_low: an update-to-weight ratio below this is reported (a note: the layer
            barely learns).
        update_ratio_high: above this, a warning (healthy training is often near ``1e-3``).

    Example:
        >>> HealthThresholds.checked("HealthMonitor", {"dead_fraction": 0.9}).dead_fraction
        0.9
    """

    dead_fraction: float = 0.5
    dead_window: int = 5
    saturation_fraction: float = 0.5
    saturation_margin: float = 0.01
    grad_norm_low: float = 1e-7
    grad_norm_high: float = 1e3
    grad_depth_ratio: float = 1e-4
    grad_spike_factor: float = 10.0
    spike_history: int = 20
    spike_min_history: int = 3
    update_ratio_low: float = 1e-5
    update_ratio_high: float = 1e-1

    @classmethod
    def checked(
        cls, owner: str, value: HealthThresholds | Mapping[str, Any] | None
    ) -> HealthThresholds:
        """Thresholds from ``None`` (defaults), an instance, or a mapping of overrides.

        Raises:
            ConfigError: an unknown name, or a value out of its range; the message names the
                argument (``thresholds.<name>``), the value and what is allowed.
        """
        if value is None:
            return cls()
        if isinstance(value, HealthThresholds):
            value._validate(owner)
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(
                f"{owner}(thresholds={value!r}): expected a mapping of threshold names to numbers "
                f"(names: {', '.join(f.name for f in dataclasses.fields(cls))})."
            )
        names = [f.name for f in dataclasses.fields(cls)]
        kwargs: dict[str, Any] = {}
        for key, item in value.items():
            if key not in names:
                raise ConfigError(
                    f"{owner}(thresholds.{key}={item!r}): unknown threshold {key!r}; expected one "
                    f"of {', '.join(names)}.{suggestion(str(key), names)}"
                )
            kwargs[str(key)] = item
        out = cls(**kwargs)
        out._validate(owner)
        return out

    def _validate(self, owner: str) -> None:
        def number(name: str, low: float, high: float, low_open: bool, high_open: bool) -> None:
            v = getattr(self, name)
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            ok = (
                ok
                and (v > low if low_open else v >= low)
                and (v < high if high_open else v <= high)
            )
            if not ok:
                lo, hi = ("(" if low_open else "["), (")" if high_open else "]")
                raise ConfigError(
                    f"{owner}(thresholds.{name}={v!r}): expected a number in {lo}{low:g}, {high:g}{hi}."
                )

        def integer(name: str, minimum: int) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
                raise ConfigError(
                    f"{owner}(thresholds.{name}={v!r}): expected an integer >= {minimum}."
                )

        number("dead_fraction", 0, 1, True, False)
        integer("dead_window", 1)
        number("saturation_fraction", 0, 1, True, False)
        number("saturation_margin", 0, 0.5, True, True)
        number("grad_norm_low", 0, math.inf, False, True)
        number("grad_norm_high", 0, math.inf, True, True)
        number("grad_depth_ratio", 0, 1, False, True)
        number("grad_spike_factor", 1, math.inf, True, True)
        integer("spike_history", 2)
        integer("spike_min_history", 1)
        number("update_ratio_low", 0, math.inf, False, True)
        number("update_ratio_high", 0, math.inf, True, True)
        pairs = (
            ("grad_norm_low", "grad_norm_high"),
            ("update_ratio_low", "update_ratio_high"),
            ("spike_min_history", "spike_history"),
        )
        for low, high in pairs:
            if getattr(self, low) > getattr(self, high):
                raise ConfigError(
                    f"{owner}(thresholds.{low}={getattr(self, low)!r}, thresholds.{high}="
                    f"{getattr(self, high)!r}): {low} must not exceed {high}."
                )


# ---------------------------------------------------------------------------------------------
# Findings
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Finding:
    """One problem seen at one step: which rule, where, what value, and what to try.

    Attributes:
        rule: one of :data:`RULES`.
        severity: ``"error"``, ``"warning"`` or ``"info"``.
        module: qualified module name (normalised, as selection patterns see it).
        statistic: the statistic the rule read (``grad_norm``, ``dead_fraction``...).
        value: its value.
        step: the optimizer step (``trainer.global_step``).
        hint: one line: what it means and what to try.
        threshold: the limit the value crossed (NaN when none applies).
        depth: position of the module in execution order (-1: unknown).

    Example:
        >>> f = Finding("dead_units", "error", "net.1", "dead_fraction", 1.0, 5, "all units dead")
        >>> f.summary()
        "error: dead_units in 'net.1' at step 5: dead_fraction = 1 (all units dead)"
    """

    rule: str
    severity: str
    module: str
    statistic: str
    value: float
    step: int
    hint: str
    threshold: float = math.nan
    depth: int = -1

    def summary(self) -> str:
        """The finding in one line."""
        return (
            f"{self.severity}: {self.rule} in {self.module!r} at step {self.step}: "
            f"{self.statistic} = {format_value(self.value)} ({self.hint})"
        )


def scaler_stalled(skipped_in_a_row: int, scale: float, step: int) -> Finding | None:
    """The finding for a GradScaler that skips a step at a scale of :data:`SCALER_STALL_SCALE` or less.

    A healthy fp16 run skips a few steps while the scale comes down from its start (``2**16`` by
    default) and then trains; skipping at a scale of 1 means the gradients are NaN/Inf unscaled.

    >>> scaler_stalled(17, 0.5, 40).rule
    'grad_scaler_stalled'
    >>> scaler_stalled(9, 2.0**15, 8) is None
    True
    """
    if not scale <= SCALER_STALL_SCALE:
        return None
    return Finding(
        "grad_scaler_stalled",
        "error",
        "",
        "loss_scale",
        scale,
        step,
        f"the GradScaler skipped the last {skipped_in_a_row} logged steps and its scale is down to "
        f"{format_value(scale)}: gradients are NaN/Inf even unscaled, so nothing is learning; look "
        "for a NaN made in backward (HealthMonitor(on_nonfinite='raise') in a float32 run names "
        "the module) or lower the learning rate",
        SCALER_STALL_SCALE,
    )


def format_value(value: float) -> str:
    """A short, readable number: ``0.25``, ``3.1e-09``, ``nan``.

    >>> format_value(0.25), format_value(3.14159e-9), format_value(12345.0)
    ('0.25', '3.1e-09', '1.2e+04')
    """
    if not math.isfinite(value):
        return str(value)
    if value == 0 or 1e-3 <= abs(value) < 1e4:
        return f"{value:.4g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2g}"
    return f"{value:.1e}"


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


# ---------------------------------------------------------------------------------------------
# Rules
# ---------------------------------------------------------------------------------------------


def check_dead_units(
    module: str,
    dead_fraction: float,
    units: int | None,
    step: int,
    t: HealthThresholds,
    depth: int = -1,
) -> Finding | None:
    """The ``dead_units`` rule for one ReLU-like output.

    >>> check_dead_units("net.1", 1.0, 32, 4, HealthThresholds()).severity
    'error'
    """
    if not math.isfinite(dead_fraction) or dead_fraction < t.dead_fraction:
        return None
    count = (
        f"{round(dead_fraction * units)} of {units} units"
        if units
        else f"{_pct(dead_fraction)} of units"
    )
    return Finding(
        "dead_units",
        "error" if dead_fraction >= 1.0 else "warning",
        module,
        "dead_fraction",
        dead_fraction,
        step,
        f"{count} never positive over the last {t.dead_window} logged steps: check the bias and "
        "initialisation of the layer before it and the input scale, lower the learning rate, "
        "or use LeakyReLU/GELU",
        t.dead_fraction,
        depth,
    )


def check_saturation(
    module: str,
    saturated_fraction: float,
    step: int,
    t: HealthThresholds,
    kind: str = "",
    depth: int = -1,
) -> Finding | None:
    """The ``saturation`` rule for one Tanh / Sigmoid / Hardtanh output.

    >>> check_saturation("net.3", 0.2, 0, HealthThresholds()) is None
    True
    """
    if not math.isfinite(saturated_fraction) or saturated_fraction < t.saturation_fraction:
        return None
    what = f"{kind} " if kind else ""
    return Finding(
        "saturation",
        "warning",
        module,
        "saturated_fraction",
        saturated_fraction,
        step,
        f"{_pct(saturated_fraction)} of the {what}outputs sit at their bounds, where the gradient is "
        "~0: normalise its input (LayerNorm/BatchNorm before it), shrink the initial weights or "
        "lower the learning rate",
        t.saturation_fraction,
        depth,
    )


def check_update_ratio(
    module: str, ratio: float, step: int, t: HealthThresholds, depth: int = -1
) -> Finding | None:
    """The ``update_ratio_high`` / ``update_ratio_low`` / ``nonfinite`` rules for one module.

    >>> check_update_ratio("fc", 0.5, 3, HealthThresholds()).rule
    'update_ratio_high'
    """
    if not math.isfinite(ratio):
        return Finding(
            "nonfinite",
            "error",
            module,
            "update_ratio",
            ratio,
            step,
            "the update or the weights hold NaN/Inf: the optimizer wrote non-finite values into "
            "this layer's parameters",
            math.nan,
            depth,
        )
    if ratio > t.update_ratio_high:
        return Finding(
            "update_ratio_high",
            "warning",
            module,
            "update_ratio",
            ratio,
            step,
            f"each step changes this layer's weights by more than {format_value(t.update_ratio_high)} "
            "of their size (healthy is near 1e-3): the learning rate is likely too high",
            t.update_ratio_high,
            depth,
        )
    if ratio < t.update_ratio_low:
        return Finding(
            "update_ratio_low",
            "info",
            module,
            "update_ratio",
            ratio,
            step,
            f"this layer's weights change by less than {format_value(t.update_ratio_low)} of their "
            "size per step: it barely learns (learning rate too low, tiny gradients, or frozen "
            "in effect)",
            t.update_ratio_low,
            depth,
        )
    return None


class HealthRules:
    """The rules, with the little state they need (each module's gradient-norm history).

    Args:
        thresholds: where the rules draw the line; defaults :class:`HealthThresholds`.

    Example:
        >>> rules = HealthRules(HealthThresholds(spike_min_history=2))
        >>> for step in range(3):
        ...     _ = rules.observe(step, {"fc": {"grad_norm": 1.0}})
        >>> [f.rule for f in rules.observe(3, {"fc": {"grad_norm": 50.0}})]
        ['exploding_gradient']
    """

    def __init__(self, thresholds: HealthThresholds | None = None) -> None:
        self.thresholds = thresholds or HealthThresholds()
        self._grad_history: dict[str, deque[float]] = {}

    def observe(
        self,
        step: int,
        stats: Mapping[str, Mapping[str, float]],
        order: Sequence[str] | None = None,
        kinds: Mapping[str, str] | None = None,
    ) -> list[Finding]:
        """Check one logging step.

        Args:
            step: the optimizer step.
            stats: ``{module: {statistic: value}}`` (see the module docstring for the names).
            order: module names in execution order; gives each finding its ``depth`` and the
                order of the returned list. Modules missing from it come last.
            kinds: ``{module: "Tanh" | "Sigmoid" | ...}`` for the saturation hint.

        Returns:
            The findings of this step, in execution order of their modules.
        """
        t = self.thresholds
        depth_of = {name: i for i, name in enumerate(order or ())}
        names = sorted(stats, key=lambda n: (depth_of.get(n, len(depth_of)), list(stats).index(n)))
        norms = {n: float(stats[n]["grad_norm"]) for n in names if "grad_norm" in stats[n]}
        finite_norms = {n: v for n, v in norms.items() if math.isfinite(v)}
        top = max(finite_norms, key=lambda n: finite_norms[n]) if finite_norms else None
        out: list[Finding] = []
        for name in names:
            values = stats[name]
            depth = depth_of.get(name, -1)
            if "grad_norm" in values:
                found = self._check_gradient(name, norms[name], step, depth, top, finite_norms)
                out.extend(found)
            if "dead_fraction" in values:
                units = values.get("units")
                f = check_dead_units(
                    name,
                    float(values["dead_fraction"]),
                    int(units) if units else None,
                    step,
                    t,
                    depth,
                )
                if f:
                    out.append(f)
            if "saturated_fraction" in values:
                kind = (kinds or {}).get(name, "")
                f = check_saturation(
                    name, float(values["saturated_fraction"]), step, t, kind, depth
                )
                if f:
                    out.append(f)
            if "update_ratio" in values:
                f = check_update_ratio(name, float(values["update_ratio"]), step, t, depth)
                if f:
                    out.append(f)
        return out

    def _check_gradient(
        self,
        name: str,
        norm: float,
        step: int,
        depth: int,
        top: str | None,
        norms: Mapping[str, float],
    ) -> list[Finding]:
        t = self.thresholds
        history = self._grad_history.setdefault(name, deque(maxlen=t.spike_history))
        median = statistics.median(history) if len(history) >= t.spike_min_history else math.nan
        out: list[Finding] = []
        if not math.isfinite(norm):
            out.append(
                Finding(
                    "nonfinite",
                    "error",
                    name,
                    "grad_norm",
                    norm,
                    step,
                    "a parameter gradient of this module holds NaN/Inf (see the first-NaN report for "
                    "where it started); lower the learning rate or clip gradients",
                    math.nan,
                    depth,
                )
            )
            return out
        if norm > t.grad_norm_high:
            out.append(
                Finding(
                    "exploding_gradient",
                    "error",
                    name,
                    "grad_norm",
                    norm,
                    step,
                    f"gradient norm above {format_value(t.grad_norm_high)}: lower the learning rate or "
                    "clip gradients (Trainer(gradient_clip_val=1.0))",
                    t.grad_norm_high,
                    depth,
                )
            )
        elif median > 0 and norm > t.grad_spike_factor * median:
            out.append(
                Finding(
                    "exploding_gradient",
                    "warning",
                    name,
                    "grad_norm",
                    norm,
                    step,
                    f"gradient norm jumped to {norm / median:.0f}x its running median "
                    f"({format_value(median)} over {len(history)} logged steps): lower the learning "
                    "rate or clip gradients",
                    t.grad_spike_factor * median,
                    depth,
                )
            )
        elif norm < t.grad_norm_low:
            out.append(
                Finding(
                    "vanishing_gradient",
                    "warning",
                    name,
                    "grad_norm",
                    norm,
                    step,
                    f"gradient norm below {format_value(t.grad_norm_low)}: almost no learning signal "
                    "reaches this layer; use ReLU-family activations, residual connections or "
                    "normalisation, and look for a detach()",
                    t.grad_norm_low,
                    depth,
                )
            )
        elif top is not None and top != name and norm < t.grad_depth_ratio * norms[top]:
            out.append(
                Finding(
                    "vanishing_gradient",
                    "warning",
                    name,
                    "grad_norm",
                    norm,
                    step,
                    f"gradient norm is {norm / norms[top]:.1e} of the largest ({top!r}: "
                    f"{format_value(norms[top])}): the signal fades on its way back; use ReLU-family "
                    "activations, residual connections or normalisation",
                    t.grad_depth_ratio * norms[top],
                    depth,
                )
            )
        history.append(norm)
        return out

    def state_dict(self) -> dict[str, list[float]]:
        """The gradient-norm histories (for checkpoints)."""
        return {name: list(h) for name, h in self._grad_history.items()}

    def load_state_dict(self, state: Mapping[str, Iterable[float]]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self._grad_history = {
            name: deque((float(v) for v in values), maxlen=self.thresholds.spike_history)
            for name, values in state.items()
        }


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


@dataclass
class ReportEntry:
    """All findings of one rule in one module: the first, the worst, how many."""

    first: Finding
    worst: Finding
    count: int = 1
    last_step: int = field(default=-1)

    def __post_init__(self) -> None:
        if self.last_step < 0:
            self.last_step = self.first.step

    def sort_key(self) -> tuple[int, int, int, int]:
        """Worst first: severity, rule, first step, execution order."""
        depth = self.first.depth if self.first.depth >= 0 else 1 << 30
        return (
            SEVERITIES.index(self.worst.severity),
            RULES.index(self.first.rule) if self.first.rule in RULES else len(RULES),
            self.first.step,
            depth,
        )


class HealthReport:
    """The findings of a run, one entry per rule and module, listed worst first.

    Example:
        >>> report = HealthReport()
        >>> report.add(Finding("saturation", "warning", "net.1", "saturated_fraction", 0.6, 3, "hint"))
        True
        >>> report.add(Finding("saturation", "warning", "net.1", "saturated_fraction", 0.9, 7, "hint"))
        False
        >>> entry = report.entries()[0]
        >>> entry.count, entry.first.step, entry.worst.value
        (2, 3, 0.9)
    """

    def __init__(self) -> None:
        self._entries: dict[tuple[str, str, str], ReportEntry] = {}
        self.logged_steps = 0

    def add(self, finding: Finding) -> bool:
        """Add one finding; ``True`` when it is the first of its rule in its module."""
        key = (finding.rule, finding.module, finding.statistic)
        entry = self._entries.get(key)
        if entry is None:
            self._entries[key] = ReportEntry(finding, finding)
            return True
        entry.count += 1
        entry.last_step = max(entry.last_step, finding.step)
        if _worse(finding, entry.worst):
            entry.worst = finding
        return False

    def extend(self, findings: Iterable[Finding]) -> list[Finding]:
        """Add several findings; returns those that were new (first of their rule and module)."""
        return [f for f in findings if self.add(f)]

    def entries(self) -> list[ReportEntry]:
        """Every entry, worst first."""
        return sorted(self._entries.values(), key=ReportEntry.sort_key)

    def findings(self) -> list[Finding]:
        """The first finding of every entry, worst first."""
        return [e.first for e in self.entries()]

    def __len__(self) -> int:
        return len(self._entries)

    def __bool__(self) -> bool:
        return True

    def counts(self) -> dict[str, int]:
        """Entries per severity."""
        out = dict.fromkeys(SEVERITIES, 0)
        for e in self._entries.values():
            out[e.worst.severity] += 1
        return out

    def headline(self) -> str:
        """One line: how many problems of each severity."""
        c = self.counts()
        n = len(self)
        if not n:
            steps = f" in {self.logged_steps} logged steps" if self.logged_steps else ""
            return f"Health report: no problems found{steps}"
        return (
            f"Health report: {n} problem{'s' if n != 1 else ''} ({c['error']} error"
            f"{'s' if c['error'] != 1 else ''}, {c['warning']} warning{'s' if c['warning'] != 1 else ''}, "
            f"{c['info']} note{'s' if c['info'] != 1 else ''})"
        )

    def rows(self) -> list[list[str]]:
        """The table body as strings, worst first (the columns of :data:`COLUMNS`)."""
        out = []
        for e in self.entries():
            f, w = e.first, e.worst
            worst = "" if w is f else f"{format_value(w.value)} (step {w.step})"
            out.append(
                [
                    f.severity if w.severity == f.severity else w.severity,
                    f.rule,
                    f.module,
                    f.statistic,
                    format_value(f.value),
                    str(f.step),
                    worst,
                    str(e.count),
                    w.hint,
                ]
            )
        return out

    def to_markdown(self) -> str:
        """The report as a markdown table (TensorBoard's Text tab, an MLflow artifact)."""
        lines = [f"### {self.headline()}"]
        if not len(self):
            return "\n".join(lines)
        lines += ["", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
        for row in self.rows():
            lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |")
        return "\n".join(lines)

    def to_rich_table(self) -> Any:
        """The report as a ``rich.table.Table`` (needs the ``rich`` package), worst first."""
        from rich.table import Table

        table = Table(title=self.headline(), title_justify="left", show_lines=True)
        styles = {"error": "bold red", "warning": "yellow", "info": "cyan"}
        table.add_column("severity", no_wrap=True)
        table.add_column("rule", no_wrap=True)
        table.add_column("module", min_width=8, overflow="fold")
        table.add_column("value at step", min_width=14, overflow="fold")
        table.add_column("seen", justify="right", no_wrap=True)
        table.add_column("hint", ratio=1, overflow="fold")
        for severity, rule, module, statistic, value, step, worst, seen, hint in self.rows():
            at = f"{statistic} = {value} at {step}" + (f"; worst {worst}" if worst else "")
            table.add_row(severity, rule, module, at, seen, hint, style=styles.get(severity))
        return table


#: Columns of the rendered report.
COLUMNS = (
    "severity",
    "rule",
    "module",
    "statistic",
    "value",
    "step",
    "worst (step)",
    "seen",
    "hint",
)


def _worse(a: Finding, b: Finding) -> bool:
    if SEVERITIES.index(a.severity) != SEVERITIES.index(b.severity):
        return SEVERITIES.index(a.severity) < SEVERITIES.index(b.severity)
    if not math.isfinite(a.value) and math.isfinite(b.value):
        return True
    if not math.isfinite(b.value):
        return False
    return a.value < b.value if a.rule in _LOWER_IS_WORSE else a.value > b.value

"""Health rules over reduced statistics (no Lightning): thresholds, findings and the report."""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from lightning_inspect._validation import check_number, check_positive_int, suggestion
from lightning_inspect.errors import ConfigError

SEVERITIES = ("error", "warning", "info")  # worst first
#: A GradScaler that skips steps at this scale or lower is stalled (NaN/Inf even unscaled).
SCALER_STALL_SCALE = 1.0
_LOWER_IS_WORSE = frozenset({"vanishing_gradient", "update_ratio_low"})
_DEPTH = "use ReLU-family activations, residual connections or normalisation"
_CLIP = "lower the learning rate or clip gradients"
# fmt: off
#: Rules, in the order the report lists them within one severity.
RULES = ("nonfinite", "exploding_gradient", "dead_units", "vanishing_gradient", "saturation",
         "update_ratio_high", "update_ratio_low", "grad_scaler_stalled")
#: Columns of the rendered report.
COLUMNS = ("severity", "rule", "module", "statistic", "value", "step", "worst (step)", "seen",
           "hint")
_ORDERED = (("grad_norm_low", "grad_norm_high"), ("update_ratio_low", "update_ratio_high"),
            ("spike_min_history", "spike_history"))
#: Each variant of a finding: its rule, its severity and a one-line hint (fields filled in).
_HINTS = {
    "dead_units": ("dead_units", "warning", "{count} never positive over the last {window} logged "
        "steps: check the bias and initialisation of the layer before it and the input scale, "
        "lower the learning rate, or use LeakyReLU/GELU"),
    "saturation": ("saturation", "warning", "{share} of the {kind}outputs sit at their bounds, "
        "where the gradient is ~0: normalise its input (LayerNorm/BatchNorm before it), shrink "
        "the initial weights or lower the learning rate"),
    "update_nonfinite": ("nonfinite", "error", "the update or the weights hold NaN/Inf: the "
        "optimizer wrote non-finite values into this layer's parameters"),
    "update_ratio_high": ("update_ratio_high", "warning", "each step changes this layer's weights "
        "by more than {limit} of their size (healthy is near 1e-3): the learning rate is likely "
        "too high"),
    "update_ratio_low": ("update_ratio_low", "info", "this layer's weights change by less than "
        "{limit} of their size per step: it barely learns (learning rate too low, tiny "
        "gradients, or frozen in effect)"),
    "grad_nonfinite": ("nonfinite", "error", "a parameter gradient of this module holds NaN/Inf "
        f"(see the first-NaN report for where it started); {_CLIP}"),
    "grad_high": ("exploding_gradient", "error", f"gradient norm above {{limit}}: {_CLIP} "
        "(Trainer(gradient_clip_val=1.0))"),
    "grad_spike": ("exploding_gradient", "warning", "gradient norm jumped to {factor}x its running "
        f"median ({{median}} over {{seen}} logged steps): {_CLIP}"),
    "grad_low": ("vanishing_gradient", "warning", "gradient norm below {limit}: almost no "
        f"learning signal reaches this layer; {_DEPTH}, and look for a detach()"),
    "grad_fades": ("vanishing_gradient", "warning", "gradient norm is {share} of the largest "
        f"({{top!r}}: {{top_norm}}): the signal fades on its way back; {_DEPTH}"),
    "grad_scaler_stalled": ("grad_scaler_stalled", "error", "the GradScaler skipped the last "
        "{seen} logged steps and its scale is down to {value}: gradients are NaN/Inf even unscaled,"
        " so nothing is learning; look for a NaN made in backward (HealthMonitor(on_nonfinite="
        "'raise') in a float32 run names the module) or lower the learning rate"),
}
# fmt: on


def _limited(default: float, *allowed: Any) -> Any:  # allowed: int minimum, or low, high, bounds
    return field(default=default, metadata={"allowed": allowed})


@dataclass(frozen=True)
class HealthThresholds:
    """Where the health rules draw the line (docs/diagnostics.md); any field can be overridden.

    Example:
        >>> HealthThresholds.checked("HealthMonitor", {"dead_fraction": 0.9}).dead_fraction
        0.9
    """

    dead_fraction: float = _limited(0.5, 0, 1, "(]")
    dead_window: int = _limited(5, 1)
    saturation_fraction: float = _limited(0.5, 0, 1, "(]")
    saturation_margin: float = _limited(0.01, 0, 0.5, "()")
    grad_norm_low: float = _limited(1e-7, 0, math.inf, "[)")
    grad_norm_high: float = _limited(1e3, 0, math.inf, "()")
    grad_depth_ratio: float = _limited(1e-4, 0, 1, "[)")
    grad_spike_factor: float = _limited(10.0, 1, math.inf, "()")
    spike_history: int = _limited(20, 2)
    spike_min_history: int = _limited(3, 1)
    update_ratio_low: float = _limited(1e-5, 0, math.inf, "[)")
    update_ratio_high: float = _limited(1e-1, 0, math.inf, "()")

    @classmethod
    def checked(cls, owner: str, value: HealthThresholds | Mapping | None) -> HealthThresholds:
        """Thresholds from ``None`` (defaults), an instance or a mapping of overrides."""
        names = [f.name for f in fields(cls)]
        if not isinstance(value, (HealthThresholds, Mapping, type(None))):
            raise ConfigError(
                f"{owner}(thresholds={value!r}): expected a mapping of threshold names to numbers "
                f"(names: {', '.join(names)})."
            )
        for key, item in value.items() if isinstance(value, Mapping) else ():
            if key not in names:
                raise ConfigError(
                    f"{owner}(thresholds.{key}={item!r}): unknown threshold {key!r}; expected one "
                    f"of {', '.join(names)}.{suggestion(str(key), names)}"
                )
        out = cls(**value) if isinstance(value, Mapping) else value or cls()
        for f in fields(out):
            allowed, arg = f.metadata["allowed"], f"thresholds.{f.name}"
            check = check_positive_int if len(allowed) == 1 else check_number
            check(owner, arg, getattr(out, f.name), *allowed)
        for low, high in _ORDERED:
            if getattr(out, low) > getattr(out, high):
                raise ConfigError(
                    f"{owner}(thresholds.{low}={getattr(out, low)!r}, thresholds.{high}="
                    f"{getattr(out, high)!r}): {low} must not exceed {high}."
                )
        return out


@dataclass(frozen=True)
class Finding:
    """One problem at one step; ``threshold``: the limit crossed; ``depth``: execution order.

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
        value = format_value(self.value)
        where = f"{self.rule} in {self.module!r} at step {self.step}"
        return f"{self.severity}: {where}: {self.statistic} = {value} ({self.hint})"


def format_value(value: float) -> str:
    """A short, readable number: ``0.25``, ``3.1e-09``, ``1.2e+04``."""
    if not math.isfinite(value):
        return str(value)
    return f"{value:.4g}" if value == 0 or 1e-3 <= abs(value) < 1e4 else f"{value:.1e}"


def _finding(
    variant: str, module: str, statistic: str, value: float, step: int, limit: float = math.nan,
    depth: int = -1, severity: str = "", **extra: Any,
) -> Finding:  # fmt: skip
    """The finding of one :data:`_HINTS` variant; float fields are shown by :func:`format_value`."""
    rule, default, hint = _HINTS[variant]
    shown = {k: format_value(v) if isinstance(v, float) else v for k, v in extra.items()}
    text = hint.format(limit=format_value(limit), value=format_value(value), **shown)
    return Finding(rule, severity or default, module, statistic, value, step, text, limit, depth)


def check_dead_units(
    module: str, value: float, units: int | None, step: int, t: HealthThresholds, depth: int = -1
) -> Finding | None:
    """The ``dead_units`` rule for one ReLU-like output."""
    if not (math.isfinite(value) and value >= t.dead_fraction):
        return None
    count = f"{round(value * units)} of {units} units" if units else f"{value:.0%} of units"
    severity = "error" if value >= 1.0 else "warning"
    args = (module, "dead_fraction", value, step, t.dead_fraction, depth, severity)
    return _finding("dead_units", *args, count=count, window=t.dead_window)


def check_saturation(
    module: str, value: float, step: int, t: HealthThresholds, kind: str = "", depth: int = -1
) -> Finding | None:
    """The ``saturation`` rule for one Tanh / Sigmoid / Hardtanh output."""
    if not (math.isfinite(value) and value >= t.saturation_fraction):
        return None
    args = (module, "saturated_fraction", value, step, t.saturation_fraction, depth)
    return _finding("saturation", *args, share=f"{value:.0%}", kind=kind + " " if kind else "")


def check_update_ratio(
    module: str, ratio: float, step: int, t: HealthThresholds, depth: int = -1
) -> Finding | None:
    """The ``update_ratio_high`` / ``update_ratio_low`` / ``nonfinite`` rules for one module."""
    if not math.isfinite(ratio):
        variant, limit = "update_nonfinite", math.nan
    elif ratio > t.update_ratio_high:
        variant, limit = "update_ratio_high", t.update_ratio_high
    elif ratio < t.update_ratio_low:
        variant, limit = "update_ratio_low", t.update_ratio_low
    else:
        return None
    return _finding(variant, module, "update_ratio", ratio, step, limit, depth)


class HealthRules:
    """The rules, with each module's gradient-norm history (for spikes).

    Example:
        >>> rules = HealthRules(HealthThresholds(spike_min_history=2))
        >>> [len(rules.observe(step, {"fc": {"grad_norm": v}})) for step, v in enumerate([1, 1, 50])]
        [0, 0, 1]
    """

    def __init__(self, thresholds: HealthThresholds | None = None) -> None:
        self.thresholds = thresholds or HealthThresholds()
        self._grad_history: dict[str, deque[float]] = {}

    def observe(
        self, step: int, stats: Mapping[str, Mapping[str, float]],
        order: Sequence[str] | None = None, kinds: Mapping[str, str] | None = None,
    ) -> list[Finding]:  # fmt: skip
        """The findings of one step from ``{module: {statistic: value}}`` (``dead_fraction`` with
        ``units``, ``saturated_fraction``, ``grad_norm``, ``update_ratio``; a missing one is not
        checked); ``order``: execution order (``depth``); ``kinds``: ``{module: "Tanh"}``."""
        t, kinds = self.thresholds, kinds or {}
        depth_of = {name: i for i, name in enumerate(order or ())}
        names = sorted(stats, key=lambda n: depth_of.get(n, len(depth_of)))  # stable
        norms = {n: float(stats[n]["grad_norm"]) for n in names if "grad_norm" in stats[n]}
        finite = {n: v for n, v in norms.items() if math.isfinite(v)}
        top = max(finite, key=finite.__getitem__) if finite else None
        out: list[Finding | None] = []
        for name in names:
            v, depth = stats[name], depth_of.get(name, -1)
            if name in norms:
                out.append(self._check_gradient(name, norms[name], step, depth, top, finite))
            if "dead_fraction" in v:
                units = int(v.get("units", 0)) or None
                out.append(check_dead_units(name, v["dead_fraction"], units, step, t, depth))
            if "saturated_fraction" in v:
                kind = kinds.get(name, "")
                out.append(check_saturation(name, v["saturated_fraction"], step, t, kind, depth))
            if "update_ratio" in v:
                out.append(check_update_ratio(name, v["update_ratio"], step, t, depth))
        return [f for f in out if f is not None]

    def _check_gradient(
        self, name: str, norm: float, step: int, depth: int, top: str | None, norms: Mapping
    ) -> Finding | None:
        t = self.thresholds
        history = self._grad_history.setdefault(name, deque(maxlen=t.spike_history))
        seen = len(history)
        median = statistics.median(history) if seen >= t.spike_min_history else math.nan
        if math.isfinite(norm):
            history.append(norm)
        fields: dict[str, Any] = {}
        if not math.isfinite(norm):
            variant, limit = "grad_nonfinite", math.nan
        elif norm > t.grad_norm_high:
            variant, limit = "grad_high", t.grad_norm_high
        elif median > 0 and norm > t.grad_spike_factor * median:
            variant, limit = "grad_spike", t.grad_spike_factor * median
            fields = {"factor": f"{norm / median:.0f}", "median": median, "seen": seen}
        elif norm < t.grad_norm_low:
            variant, limit = "grad_low", t.grad_norm_low
        elif top not in (None, name) and norm < t.grad_depth_ratio * norms[top]:
            variant, limit = "grad_fades", t.grad_depth_ratio * norms[top]
            fields = {"share": f"{norm / norms[top]:.1e}", "top": top, "top_norm": norms[top]}
        else:
            return None
        return _finding(variant, name, "grad_norm", norm, step, limit, depth, **fields)

    def state_dict(self) -> dict[str, list[float]]:
        return {name: list(h) for name, h in self._grad_history.items()}

    def load_state_dict(self, state: Mapping[str, Iterable[float]]) -> None:
        n = self.thresholds.spike_history
        self._grad_history = {name: deque(map(float, h), maxlen=n) for name, h in state.items()}


@dataclass
class ReportEntry:  # all findings of one rule in one module: the first, the worst, how many...
    first: Finding
    worst: Finding
    count: int = 1
    last_step: int = -1


class HealthReport:
    """The findings of a run, one entry per rule and module, listed worst first.

    Example:
        >>> report = HealthReport()
        >>> f = Finding("saturation", "warning", "net.1", "saturated_fraction", 0.6, 3, "h")
        >>> report.add(f), report.add(f), len(report)
        (True, False, 1)
        >>> print(report.to_markdown().splitlines()[0])
        ### Health report: 1 problem (0 errors, 1 warning, 0 notes)
    """

    def __init__(self) -> None:
        self._entries: dict[tuple[str, str, str], ReportEntry] = {}
        self.logged_steps = 0

    def add(self, finding: Finding) -> bool:
        """Add one finding; ``True`` when it is the first of its rule in its module."""
        key = (finding.rule, finding.module, finding.statistic)
        entry = self._entries.get(key)
        if entry is None:
            self._entries[key] = ReportEntry(finding, finding, 1, finding.step)
            return True
        entry.count += 1
        entry.last_step = max(entry.last_step, finding.step)
        if _worse(finding, entry.worst):
            entry.worst = finding
        return False

    def extend(self, findings: Iterable[Finding]) -> list[Finding]:
        """Add several findings; returns the new ones."""
        return [f for f in findings if self.add(f)]

    def entries(self) -> list[ReportEntry]:
        """Every entry, worst first: severity, rule, first step, execution order."""

        def key(e: ReportEntry) -> tuple[int, int, int, int]:
            f = e.first
            rule = RULES.index(f.rule) if f.rule in RULES else len(RULES)
            depth = f.depth if f.depth >= 0 else 1 << 30
            return (SEVERITIES.index(e.worst.severity), rule, f.step, depth)

        return sorted(self._entries.values(), key=key)

    def findings(self) -> list[Finding]:
        return [e.first for e in self.entries()]

    def __len__(self) -> int:
        return len(self._entries)

    def __bool__(self) -> bool:
        return True

    def counts(self) -> dict[str, int]:
        severities = [e.worst.severity for e in self._entries.values()]
        return {s: severities.count(s) for s in SEVERITIES}

    def headline(self) -> str:
        if not len(self):
            steps = f" in {self.logged_steps} logged steps" if self.logged_steps else ""
            return f"Health report: no problems found{steps}"
        each = [_plural(n, "note" if s == "info" else s) for s, n in self.counts().items()]
        return f"Health report: {_plural(len(self), 'problem')} ({', '.join(each)})"

    def to_markdown(self) -> str:
        """The report as a markdown table, worst first (TensorBoard, MLflow, the console)."""
        rows = [list(COLUMNS), ["---"] * len(COLUMNS)] if len(self) else []
        for e in self.entries():
            f, w = e.first, e.worst
            worst = "" if w is f else f"{format_value(w.value)} (step {w.step})"
            value = format_value(f.value)
            rows.append([w.severity, f.rule, f.module, f.statistic, value, str(f.step), worst])
            rows[-1] += [str(e.count), w.hint]
        cells = ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
        return "\n".join([f"### {self.headline()}", *([""] if rows else []), *cells])


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' if n != 1 else ''}"


def _worse(a: Finding, b: Finding) -> bool:
    if a.severity != b.severity:
        return SEVERITIES.index(a.severity) < SEVERITIES.index(b.severity)
    if not (math.isfinite(a.value) and math.isfinite(b.value)):
        return math.isfinite(b.value)  # a non-finite value is the worst
    return a.value < b.value if a.rule in _LOWER_IS_WORSE else a.value > b.value

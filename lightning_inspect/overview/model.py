"""The overview's data per view kind (layers x steps per statistic, histograms), and findings.

Example:
    >>> run = RunData()
    >>> run.add_scalars(0, {"activations/conv/mean": 0.5, "activations/fc/mean": 1.0})
    >>> run.add_scalars(2, {"activations/conv/mean": 0.25})
    >>> run.matrix("activations", "mean")
    [[0.5, 0.25], [1.0, None]]
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lightning_inspect.core import keys

#: key prefix -> label, in the page's order
VIEW_KINDS = {
    "activations": "activations",
    "activation_grads": "activation gradients",
    "param_grads": "parameter gradients",
    "weights": "weights",
    "update_ratios": "update ratios",
    "health": "health",
}
_DIGITS = 6  # significant digits kept in the page's data
_FIELDS = ("rule", "severity", "module", "statistic", "value", "step", "hint")


def split_key(key: str) -> tuple[str, str, str] | None:
    """``(view kind, layer, statistic)`` of a scalar key; ``None`` for keys without a layer.

    >>> split_key("weights/fc.weight/update_ratio"), split_key("param_grads/global_norm")
    (('update_ratios', 'fc.weight', 'update_ratio'), None)
    """
    kind, name, output, stat = keys.split_key(key)
    if kind not in VIEW_KINDS or not name:
        return None
    layer = f"{name}/{output}" if output else name
    if kind == "weights" and stat == "update_ratio":
        kind = "update_ratios"
    return kind, layer, stat


def split_histogram_key(key: str) -> tuple[str, str] | None:
    """``(view kind, layer)`` of a histogram key (``activations/attn/0``: a key without statistic)."""
    return None if (parts := split_key(f"{key}/")) is None else parts[:2]


def _rounded(values: Any) -> list[float | None]:
    """Values (any shape) to :data:`_DIGITS` significant digits; non-finite as ``None``."""
    values = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(values)
    magnitude = np.floor(np.log10(np.where(finite & (values != 0), abs(values), 1)))
    scale = 10.0 ** (_DIGITS - 1 - magnitude)
    return np.where(finite, np.round(np.where(finite, values, 0.0) * scale) / scale, None).tolist()


@dataclass
class KindData:
    """One view kind of one run (``layers``, ``stats``: ordered sets)."""

    layers: dict[str, None] = field(default_factory=dict)
    stats: dict[str, None] = field(default_factory=dict)
    values: dict[tuple[str, str], dict[int, float]] = field(default_factory=dict)
    histograms: dict[str, dict[int, tuple[float, float, list[int]]]] = field(default_factory=dict)

    def copy(self) -> KindData:
        values, hists = ({k: dict(v) for k, v in d.items()} for d in (self.values, self.histograms))
        return KindData(dict(self.layers), dict(self.stats), values, hists)


@dataclass
class RunData:
    """Everything the page shows about one run."""

    kinds: dict[str, KindData] = field(default_factory=dict)
    findings: list[dict[str, Any]] = field(default_factory=list)

    def copy(self) -> RunData:
        """A copy that later additions leave unchanged."""
        return RunData({name: k.copy() for name, k in self.kinds.items()}, list(self.findings))

    def _layer(self, kind: str, layer: str) -> KindData:
        data = self.kinds.setdefault(kind, KindData())
        data.layers.setdefault(layer)
        return data

    def add_scalars(self, step: int, values: Mapping[str, float]) -> None:
        """Add one step's scalars (keys that are not the library's are skipped)."""
        for key, value in values.items():
            if (parts := split_key(key)) is not None:
                data = self._layer(*parts[:2])
                data.stats.setdefault(parts[2])
                data.values.setdefault(parts[1:], {})[int(step)] = float(value)

    def add_histogram(
        self, key: str, step: int, lo: float, hi: float, counts: Sequence[float]
    ) -> None:
        """Add one histogram: ``counts`` (whole numbers) in equal bins from ``lo`` to ``hi``."""
        if (parts := split_histogram_key(key)) is not None:
            whole = np.rint(np.asarray(counts, dtype=np.float64)).astype(np.int64).tolist()
            series = self._layer(*parts).histograms.setdefault(parts[1], {})
            series[int(step)] = (float(lo), float(hi), whole)

    def note_histograms(self, key: str) -> None:
        """Note that histograms exist under ``key`` (their values are read later)."""
        if (parts := split_histogram_key(key)) is not None:
            self._layer(*parts).histograms.setdefault(parts[1], {})

    def add_findings(self, findings: Iterable[Any]) -> None:
        """Add health findings (mappings or ``Finding`` objects), each (rule, module, step) once."""
        seen = {(f["rule"], f["module"], f["step"]) for f in self.findings}
        for f in findings:
            entry = {n: f.get(n) if isinstance(f, Mapping) else getattr(f, n) for n in _FIELDS}
            entry["value"] = None if entry["value"] is None else _rounded([entry["value"]])[0]
            if (key := (entry["rule"], entry["module"], entry["step"])) not in seen:
                seen.add(key)
                self.findings.append(entry)

    def steps(self, kind: str) -> list[int]:
        """The steps with a value or a histogram of ``kind``, ascending."""
        data = self.kinds[kind]
        series = [*data.values.values(), *data.histograms.values()]
        return sorted({step for one in series for step in one})

    def matrix(
        self, kind: str, stat: str, steps: list[int] | None = None
    ) -> list[list[float | None]]:
        """Values of ``stat``: one row per layer (arrival order), one column per step
        (``steps``: ``self.steps(kind)``, passed in where the caller has it already)."""
        data = self.kinds[kind]
        column = {step: j for j, step in enumerate(self.steps(kind) if steps is None else steps)}
        grid = np.full((len(data.layers), len(column)), np.nan)
        for i, layer in enumerate(data.layers):
            for step, value in data.values.get((layer, stat), {}).items():
                grid[i, column[step]] = value
        return _rounded(grid)

    def layer_histograms(self, kind: str, layer: str) -> dict[str, Any]:
        """One layer's histograms: ``steps``, ``lo``, ``hi`` and ``counts`` (one list per step)."""
        series = self.kinds.get(kind, KindData()).histograms.get(layer, {})
        steps = sorted(series)
        lo, hi, counts = zip(*(series[s] for s in steps), strict=True) if steps else ((), (), ())
        return {"steps": steps, "lo": _rounded(lo), "hi": _rounded(hi), "counts": list(counts)}

    def meta(self) -> dict[str, Any]:
        """The run's kinds (layers, stats, steps, layers with histograms) and findings."""
        kinds = {
            kind: {
                "label": label,
                "layers": list(data.layers),
                "stats": list(data.stats),
                "steps": self.steps(kind),
                "histograms": [layer for layer in data.layers if layer in data.histograms],
            }
            for kind, label in VIEW_KINDS.items()
            if (data := self.kinds.get(kind)) is not None
        }
        return {"kinds": kinds, "findings": self.findings}

    def to_json_dict(self) -> dict[str, Any]:
        """Meta, matrices and histograms: everything, for a page with its data inlined."""
        out = self.meta()
        for kind, info in out["kinds"].items():
            info["values"] = {s: self.matrix(kind, s, info["steps"]) for s in info["stats"]}
            info["hist"] = {h: self.layer_histograms(kind, h) for h in info["histograms"]}
        return out


def safe_json(value: Any) -> str:
    """JSON that no string in it (``</script>`` in a module name) can end a ``<script>`` with.

    >>> safe_json({"m": "</script>"})
    '{"m": "\\\\u003c/script\\\\u003e"}'
    """
    text = json.dumps(value, allow_nan=False)
    return text.translate({ord(c): f"\\u{ord(c):04x}" for c in "<>&\u2028\u2029"})

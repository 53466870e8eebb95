"""MLflow through the Trainer's ``MLFlowLogger`` (its ``MlflowClient`` and run).

A real model logs thousands of statistics per step; as thousands of metric charts they make the
MLflow UI unusable and every SQLite insert costs GIL time on the worker thread. So, by default
(``metrics="summary"``):

* every value goes, one line per key and step, into a CSV table spooled locally and uploaded on
  :meth:`MlflowSink.flush` as ``lightning_inspect/stats/<owner>.csv`` (columns ``step``, ``key``,
  ``value``; ``pandas.read_csv`` reads it, :func:`lightning_inspect.backends.read_stats` returns it tidy);
* MLflow's metrics get the headline values only (:func:`headline_metrics`): the scalars of a
  whole kind (``param_grads/global_norm``) and, per kind and statistic, one summary over modules.

``metrics="all"`` also sends every value as a metric (``log_batch``, at most 1000 per call).

MLflow has no histogram type, so histograms are appended to a local JSON-lines spool file as
they arrive (memory stays flat over long runs) and on :meth:`MlflowSink.flush` uploaded as
artifacts: the data (``lightning_inspect/histograms/<owner>.jsonl``, one line per key and step,
with ``lo``, ``hi`` and ``counts``) and one picture per key, a step-by-value heatmap
(``lightning_inspect/histograms/<key>.png``).

Keys are sanitised with :class:`lightning_inspect.core.keys.MlflowKeys`; artifact file names are cut to
255 bytes with a hash (:func:`artifact_file`). Histogram data the sink has not uploaded when it is
closed is handed to the fallback file (:meth:`MlflowSink.unsent`).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import shutil
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from lightning_inspect.core.keys import KINDS, MlflowKeys, split_key
from lightning_inspect.core.stats import Histogram

ARTIFACT_ROOT = "lightning_inspect"
#: Where the tables of every value go, under the run's artifacts.
STATS_ARTIFACT_DIR = f"{ARTIFACT_ROOT}/stats"
#: What :class:`MlflowSink` sends as MLflow metrics: headline values only, or every value too.
METRIC_MODES = ("summary", "all")
_BATCH = 1000
#: The longest file name, in UTF-8 bytes, that common file systems accept.
_NAME_BYTES = 255


def artifact_file(key: str, suffix: str) -> str:
    """``key + suffix`` as a relative path whose every part fits in a file name (255 bytes).

    A part that is too long is cut and ends with 8 hex digits of its SHA-1, so long keys that
    share a beginning stay apart.

    >>> len(artifact_file("activations/" + "é" * 200, ".png").split("/")[-1].encode())
    255
    """
    *folders, name = key.split("/")
    return "/".join([*(_file_name(f, "") for f in folders), _file_name(name, suffix)])


def _file_name(name: str, suffix: str) -> str:
    if len((name + suffix).encode()) <= _NAME_BYTES:
        return name + suffix
    digest = hashlib.sha1(name.encode()).hexdigest()[:8]
    room = _NAME_BYTES - len(suffix.encode()) - len(digest) - 1
    return f"{name.encode()[:room].decode('utf-8', 'ignore')}-{digest}{suffix}"


#: Statistics whose summary over modules is exact: the extremes, the counts, the joint L2 norm.
_EXACT = {"min": min, "max": max, "nan_count": math.fsum, "inf_count": math.fsum}


def _csv_cell(text: str) -> str:
    """``text`` as one CSV cell (quoted as ``csv`` does when it holds a comma, quote or newline)."""
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\r\n").writerow((text,))
    return buffer.getvalue()[:-2]


def headline_metrics(
    values: Mapping[str, float], parsed: dict[str, tuple[str, str, str, str]] | None = None
) -> dict[str, float]:
    """The MLflow metrics of one step in ``"summary"`` mode, from all of its values.

    * keys of a whole kind (``param_grads/global_norm``) and keys outside the scheme, as they are;
    * ``summary/<kind>/<stat>`` for ``min``, ``max`` (the extremes over modules),
      ``nan_count``, ``inf_count`` (totals) and ``l2_norm`` (the norm of all values of the kind);
    * ``summary/<kind>/<stat>/min`` and ``.../max`` (over modules) for the other statistics
      (``mean``, ``std``, ``abs_mean``, ``rms``, ``zero_fraction``, ``update_ratio``).

    NaN values (a statistic with no finite value) are left out of the summaries.
    ``parsed`` caches :func:`~lightning_inspect.core.keys.split_key` across calls.

    >>> headline_metrics({"weights/a/max": 1.0, "weights/b/max": 3.0,
    ...                   "param_grads/global_norm": 2.0})
    {'param_grads/global_norm': 2.0, 'summary/weights/max': 3.0}
    """
    parsed = {} if parsed is None else parsed
    out: dict[str, float] = {}
    groups: dict[tuple[str, str], list[float]] = {}
    for key, value in values.items():
        parts = parsed.get(key)
        if parts is None:
            parts = parsed[key] = split_key(key)
        kind, name, _, stat = parts
        if kind not in KINDS or not name:
            out[key] = value
        elif not math.isnan(value):
            groups.setdefault((kind, stat), []).append(value)
    for (kind, stat), group in groups.items():
        base = f"summary/{kind}/{stat}"
        if stat == "l2_norm":
            out[base] = math.sqrt(math.fsum(v * v for v in group))
        elif stat in _EXACT:
            out[base] = float(_EXACT[stat](group))
        else:
            out[f"{base}/min"], out[f"{base}/max"] = min(group), max(group)
    return out


def send_metrics(
    client: Any, run_id: str, keys: MlflowKeys, values: Mapping[str, float], step: int
) -> None:
    """``values`` as MLflow metrics of ``step``: ``log_batch`` calls of at most 1000."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics = [Metric(keys(k), float(v), now, step) for k, v in values.items()]
    for start in range(0, len(metrics), _BATCH):
        client.log_batch(run_id, metrics=metrics[start : start + _BATCH])


def log_text_artifact(client: Any, run_id: str, keys: MlflowKeys, key: str, text: str) -> None:
    """A text as the run's artifact ``lightning_inspect/<key>.md``."""
    client.log_text(run_id, text, f"{ARTIFACT_ROOT}/{artifact_file(keys(key), '.md')}")


def log_image_artifact(
    client: Any, run_id: str, keys: MlflowKeys, key: str, image: np.ndarray
) -> None:
    """A picture as the run's artifact ``lightning_inspect/<key>.png``."""
    name = f"{ARTIFACT_ROOT}/{artifact_file(keys(key), '.png')}"
    client.log_image(run_id, image, artifact_file=name)


class MlflowSink:
    """Writes metrics, the table of every value, histogram artifacts and texts to one MLflow run.

    ``metrics``: ``"summary"`` (headline metrics, see :func:`headline_metrics`) or ``"all"``
    (every value as a metric as well); the table holds every value in both modes.
    """

    name = "mlflow"

    def __init__(
        self,
        client: Any,
        run_id: str,
        owner: str = "inspect",
        render: bool = True,
        metrics: str = "summary",
        keys: MlflowKeys | None = None,
    ) -> None:
        if metrics not in METRIC_MODES:
            raise ValueError(f"MlflowSink(metrics={metrics!r}): expected one of {METRIC_MODES}.")
        self.client = client
        self.run_id = run_id
        self.owner = owner
        self.render = render
        self.metrics = metrics
        self.keys = keys if keys is not None else MlflowKeys()
        self._parsed: dict[str, tuple[str, str, str, str]] = {}
        self._csv_keys: dict[str, str] = {}  # key -> its CSV cell
        self._spool = Path(tempfile.mkdtemp(prefix="lightning_inspect_mlflow_"))
        self._histogram_file = self._spool / f"{owner}.jsonl"
        self._table_file = self._spool / "stats" / f"{owner}.csv"
        self._dirty = False
        self._table_dirty = False

    def log_scalars(self, values: Mapping[str, float], step: int) -> None:
        send_metrics(self.client, self.run_id, self.keys, self.metrics_of(values), step)
        # After the metrics: a call the server refused and the guard sends again adds its lines once.
        self.append_table(values, step)

    def metrics_of(self, values: Mapping[str, float]) -> Mapping[str, float]:
        """What of one step's ``values`` MLflow receives as metrics (see ``metrics``)."""
        return values if self.metrics == "all" else headline_metrics(values, self._parsed)

    def append_table(self, values: Mapping[str, float], step: int) -> None:
        """Append ``step,key,value`` lines (values as Python writes floats: exact round trip)."""
        new = not self._table_file.exists()
        if new:
            self._table_file.parent.mkdir(parents=True, exist_ok=True)
        cells = self._csv_keys
        for key in values:
            if key not in cells:
                cells[key] = _csv_cell(key)
        lines = [f"{step},{cells[key]},{float(value)!r}\n" for key, value in values.items()]
        with self._table_file.open("a", newline="") as f:
            f.write(("step,key,value\n" if new else "") + "".join(lines))
        self._table_dirty = True

    def log_histograms(self, histograms: Mapping[str, Histogram], step: int) -> None:
        if not histograms:
            return
        with self._histogram_file.open("a") as f:
            for key, h in histograms.items():
                line = {
                    "key": key,
                    "step": step,
                    "lo": h.min,
                    "hi": h.max,
                    "counts": h.counts.tolist(),
                }
                f.write(json.dumps(line) + "\n")
        self._dirty = True

    def log_text(self, key: str, text: str, step: int) -> None:
        log_text_artifact(self.client, self.run_id, self.keys, key, text)

    def log_image(self, key: str, image: np.ndarray, step: int) -> None:
        """The picture as ``lightning_inspect/<key>.png`` (a later picture of the key replaces it)."""
        log_image_artifact(self.client, self.run_id, self.keys, key, image)

    def flush(self) -> None:
        if self._table_dirty:
            table = str(self._table_file)
            self.client.log_artifact(self.run_id, table, artifact_path=STATS_ARTIFACT_DIR)
            self._table_dirty = False
        if not self._dirty:
            return
        target = f"{ARTIFACT_ROOT}/histograms"
        self.client.log_artifact(self.run_id, str(self._histogram_file), artifact_path=target)
        if self.render:
            pictures = self._spool / "pictures"
            render_histogram_pictures(self._histogram_file, pictures, self.keys)
            self.client.log_artifacts(self.run_id, str(pictures), artifact_path=target)
        self._dirty = False  # only once uploaded: a refused flush is tried again by the next one

    def unsent(self) -> list[dict[str, Any]]:
        """What the last uploads did not deliver, one fallback record per step and kind: the
        table's values (steps whose headline metrics MLflow took, but whose table it never got)
        and the spooled histograms."""
        records = self._unsent_table() if self._table_dirty else []
        if not self._dirty:
            return records
        by_step: dict[int, dict[str, Any]] = {}
        for key, points in load_histogram_spool(self._histogram_file).items():
            for step, lo, hi, counts in points:
                record = by_step.setdefault(step, {"call": "log_histograms", "step": step})
                values = {"lo": lo, "hi": hi, "counts": counts.tolist()}
                record.setdefault("histograms", {})[key] = values
        return records + [by_step[s] for s in sorted(by_step)]

    def _unsent_table(self) -> list[dict[str, Any]]:
        by_step: dict[int, dict[str, float]] = {}
        with self._table_file.open(newline="") as f:
            for row in csv.DictReader(f):
                by_step.setdefault(int(row["step"]), {})[row["key"]] = float(row["value"])
        return [{"call": "log_scalars", "step": s, "values": by_step[s]} for s in sorted(by_step)]

    def close(self) -> None:
        """Remove the local spool (after a final flush)."""
        shutil.rmtree(self._spool, ignore_errors=True)


def load_histogram_spool(path: Path) -> dict[str, list[tuple[int, float, float, np.ndarray]]]:
    """Read a spool / artifact file back: ``{key: [(step, lo, hi, counts), ...]}``."""
    series: dict[str, list[tuple[int, float, float, np.ndarray]]] = {}
    with Path(path).open() as f:
        for line in f:
            d = json.loads(line)
            series.setdefault(d["key"], []).append(
                (d["step"], d["lo"], d["hi"], np.asarray(d["counts"]))
            )
    return series


#: Size of the plot area of a histogram picture, in pixels, and the margins around it.
_PLOT = (480, 200)
_MARGIN = (64, 22, 16, 30)  # left, top, right, bottom


def render_histogram_pictures(spool: Path, out_dir: Path, keys: MlflowKeys) -> list[Path]:
    """One PNG per key: value (y) by step (x), colour = log(1 + count), on a common value range.

    Drawn with Pillow, a few milliseconds a picture (a matplotlib figure takes about 0.16 s), so a
    model with hundreds of keys does not hold up the end of fit.
    """
    from matplotlib import colormaps
    from PIL import Image, ImageDraw

    lut = (colormaps["viridis"](np.linspace(0.0, 1.0, 256))[:, :3] * 255).astype(np.uint8)
    left, top, right, bottom = _MARGIN
    width, height = _PLOT
    written = []
    for key, points in load_histogram_spool(spool).items():
        points.sort(key=lambda p: p[0])
        lo = min(p[1] for p in points)
        hi = max(p[2] for p in points)
        bins = len(points[0][3])
        grid = np.zeros((bins, len(points)))
        for j, (_, p_lo, p_hi, counts) in enumerate(points):
            centres = p_lo + (np.arange(bins) + 0.5) * (p_hi - p_lo) / bins
            index = np.clip(((centres - lo) / max(hi - lo, 1e-30) * bins).astype(int), 0, bins - 1)
            np.add.at(grid[:, j], index, counts)
        shade = np.log1p(grid)
        shade = shade / shade.max() if shade.max() > 0 else shade
        rgb = lut[(shade[::-1] * 255).astype(np.uint8)]  # highest values at the top
        plot = Image.fromarray(rgb, "RGB").resize((width, height), Image.Resampling.NEAREST)
        canvas = Image.new("RGB", (left + width + right, top + height + bottom), "white")
        canvas.paste(plot, (left, top))
        draw = ImageDraw.Draw(canvas)
        draw.text((left, 5), key, fill="black")
        draw.text((4, top), f"{hi:.3g}", fill="black")
        draw.text((4, top + height - 10), f"{lo:.3g}", fill="black")
        draw.text((4, top + height // 2 - 5), "value", fill="black")
        steps = (points[0][0], points[-1][0])
        draw.text((left, top + height + 4), f"step {steps[0]}", fill="black")
        last = f"step {steps[1]}"
        draw.text((left + width - 6 * len(last), top + height + 4), last, fill="black")
        draw.text(
            (left + width // 2 - 66, top + height + 16), "colour: log(1 + count)", fill="gray"
        )
        path = out_dir / artifact_file(keys(key), ".png")
        path.parent.mkdir(parents=True, exist_ok=True)
        canvas.save(path)
        written.append(path)
    return written

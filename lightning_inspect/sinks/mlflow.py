"""MLflow through the Trainer's ``MLFlowLogger`` (its ``MlflowClient`` and run).

MLflow has no histogram type, so:

* statistics go in as metrics, in batches (``log_batch``, at most 1000 per call);
* histograms are appended to a local JSON-lines spool file as they arrive (memory stays flat
  over long runs) and on :meth:`MlflowSink.flush` uploaded as artifacts: the data
  (``lightning_inspect/histograms/<owner>.jsonl``, one line per key and step, with ``lo``, ``hi``
  and ``counts``) and one picture per key, a step-by-value heatmap
  (``lightning_inspect/histograms/<key>.png``).

Keys are sanitised with :class:`lightning_inspect.keys.MlflowKeys`.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from lightning_inspect.keys import MlflowKeys
from lightning_inspect.stats import Histogram

ARTIFACT_ROOT = "lightning_inspect"
_BATCH = 1000


class MlflowSink:
    """Writes metrics, histogram artifacts and texts to one MLflow run."""

    name = "mlflow"

    def __init__(self, client: Any, run_id: str, owner: str = "inspect", render: bool = True) -> None:
        self.client = client
        self.run_id = run_id
        self.owner = owner
        self.render = render
        self.keys = MlflowKeys()
        self._spool = Path(tempfile.mkdtemp(prefix="lightning_inspect_mlflow_"))
        self._histogram_file = self._spool / f"{owner}.jsonl"
        self._dirty = False

    def log_scalars(self, values: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(self.keys(k), float(v), now, step) for k, v in values.items()]
        for start in range(0, len(metrics), _BATCH):
            self.client.log_batch(self.run_id, metrics=metrics[start : start + _BATCH])

    def log_histograms(self, histograms: Mapping[str, Histogram], step: int) -> None:
        if not histograms:
            return
        with self._histogram_file.open("a") as f:
            for key, h in histograms.items():
                line = {"key": key, "step": step, "lo": h.min, "hi": h.max, "counts": h.counts.tolist()}
                f.write(json.dumps(line) + "\n")
        self._dirty = True

    def log_text(self, key: str, text: str, step: int) -> None:
        self.client.log_text(self.run_id, text, f"{ARTIFACT_ROOT}/{self.keys(key)}.md")

    def log_image(self, key: str, image: np.ndarray, step: int) -> None:
        """The picture as ``lightning_inspect/<key>.png`` (a later picture of the key replaces it)."""
        self.client.log_image(self.run_id, image, artifact_file=f"{ARTIFACT_ROOT}/{self.keys(key)}.png")

    def flush(self) -> None:
        if not self._dirty:
            return
        target = f"{ARTIFACT_ROOT}/histograms"
        self.client.log_artifact(self.run_id, str(self._histogram_file), artifact_path=target)
        if self.render:
            pictures = self._spool / "pictures"
            render_histogram_pictures(self._histogram_file, pictures, self.keys)
            self.client.log_artifacts(self.run_id, str(pictures), artifact_path=target)
        self._dirty = False  # only once uploaded: a refused flush is tried again by the next one

    def close(self) -> None:
        """Remove the local spool (after a final flush)."""
        shutil.rmtree(self._spool, ignore_errors=True)


def load_histogram_spool(path: Path) -> dict[str, list[tuple[int, float, float, np.ndarray]]]:
    """Read a spool / artifact file back: ``{key: [(step, lo, hi, counts), ...]}``."""
    series: dict[str, list[tuple[int, float, float, np.ndarray]]] = {}
    with Path(path).open() as f:
        for line in f:
            d = json.loads(line)
            series.setdefault(d["key"], []).append((d["step"], d["lo"], d["hi"], np.asarray(d["counts"])))
    return series


def render_histogram_pictures(spool: Path, out_dir: Path, keys: MlflowKeys) -> list[Path]:
    """One PNG per key: value (y) by step (x), colour = log(1 + count), on a common value range."""
    from matplotlib.figure import Figure

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
        fig = Figure(figsize=(6, 3), dpi=100)
        ax = fig.add_subplot()
        steps = [p[0] for p in points]
        extent = (steps[0] - 0.5, steps[-1] + 0.5, lo, hi if hi > lo else lo + 1e-12)
        image = ax.imshow(np.log1p(grid), origin="lower", aspect="auto", extent=extent, cmap="viridis")
        ax.set_xlabel("step")
        ax.set_ylabel("value")
        ax.set_title(key, fontsize=9)
        fig.colorbar(image, ax=ax, label="log(1 + count)")
        fig.tight_layout()
        path = out_dir / f"{keys(key)}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
        written.append(path)
    return written

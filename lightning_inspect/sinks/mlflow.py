"""MLflow through the Trainer's ``MLFlowLogger`` (its ``MlflowClient`` and run).

MLflow has no histogram type, so:

* statistics go in as metrics, in batches (``log_batch``, at most 1000 per call);
* histograms are appended to a local JSON-lines spool file as they arrive (memory stays flat
  over long runs) and on :meth:`MlflowSink.flush` uploaded as artifacts: the data
  (``lightning_inspect/histograms/<owner>.jsonl``, one line per key and step, with ``lo``, ``hi``
  and ``counts``) and one picture per key, a step-by-value heatmap
  (``lightning_inspect/histograms/<key>.png``).

Keys are sanitised with :class:`lightning_inspect.keys.MlflowKeys`; artifact file names are cut to
255 bytes with a hash (:func:`artifact_file`). Histogram data the sink has not uploaded when it is
closed is handed to the fallback file (:meth:`MlflowSink.unsent`).
"""

from __future__ import annotations

import hashlib
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
        name = artifact_file(self.keys(key), ".md")
        self.client.log_text(self.run_id, text, f"{ARTIFACT_ROOT}/{name}")

    def log_image(self, key: str, image: np.ndarray, step: int) -> None:
        """The picture as ``lightning_inspect/<key>.png`` (a later picture of the key replaces it)."""
        name = artifact_file(self.keys(key), ".png")
        self.client.log_image(self.run_id, image, artifact_file=f"{ARTIFACT_ROOT}/{name}")

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

    def unsent(self) -> list[dict[str, Any]]:
        """The spooled histograms, one fallback record per step, when the last upload failed."""
        if not self._dirty:
            return []
        by_step: dict[int, dict[str, Any]] = {}
        for key, points in load_histogram_spool(self._histogram_file).items():
            for step, lo, hi, counts in points:
                record = by_step.setdefault(step, {"call": "log_histograms", "step": step})
                values = {"lo": lo, "hi": hi, "counts": counts.tolist()}
                record.setdefault("histograms", {})[key] = values
        return [by_step[s] for s in sorted(by_step)]

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
        draw.text((left + width // 2 - 66, top + height + 16), "colour: log(1 + count)", fill="gray")
        path = out_dir / artifact_file(keys(key), ".png")
        path.parent.mkdir(parents=True, exist_ok=True)
        canvas.save(path)
        written.append(path)
    return written

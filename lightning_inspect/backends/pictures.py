"""The library's one picture renderer (Pillow): layers x steps heatmaps and histograms over
steps; :func:`publish_image` sends a picture to every sink that shows pictures.

Example:
    >>> image = heatmap(np.array([[0.1, 0.5], [0.9, 1.0]]), ["net.1", "net.3"], [0, 10], "zero fraction")
    >>> image.dtype, image.shape[2]
    (dtype('uint8'), 3)
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

#: viridis (RGB) at 0, 1/8, ..., 1 and once more for 1 (matplotlib's values), interpolated.
_VIRIDIS_HEX = "440154472d7b3b528b2c728e21918c28ae805ec962addc30fde725fde725"
_VIRIDIS = np.array(list(bytes.fromhex(_VIRIDIS_HEX)), dtype=np.float64).reshape(-1, 3)
PLOT = (480, 200)  # plot area (width, height) of a histogram picture
MARGIN = (64, 22, 82, 30)  # left, top, right (at least: the colour bar label fits), bottom
_MAX_LABELLED_ROWS = 60


def colours(shade: np.ndarray) -> np.ndarray:
    """``shade`` (values in [0, 1], NaN: no value, light grey) as viridis RGB uint8."""
    x = np.nan_to_num(np.clip(shade, 0.0, 1.0), nan=0.0) * 8
    i = x.astype(int)
    rgb = _VIRIDIS[i] + (_VIRIDIS[i + 1] - _VIRIDIS[i]) * (x - i)[..., None]
    rgb[np.isnan(shade)] = 235
    return rgb.astype(np.uint8)


def _draw(shade: np.ndarray, title: str, labels: Any, steps: Any, scale: Any, height: int) -> Any:
    """``shade`` with a title, ``labels`` (height fraction, text), steps and a colour bar ``scale``."""
    from PIL import Image, ImageDraw

    width, (_, top, right, bottom) = PLOT[0], MARGIN
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    left = int(max(MARGIN[0], 8 + max((measure.textlength(t) for _, t in labels), default=0)))
    right = int(max(right, 12 + measure.textlength(scale[2])))  # the colour bar's label fits
    canvas = Image.new("RGB", (left + width + right, top + height + bottom), "white")
    plot = Image.fromarray(colours(shade)).resize((width, height), Image.Resampling.NEAREST)
    canvas.paste(plot, (left, top))
    bar = colours(np.linspace(1.0, 0.0, height)[:, None].repeat(12, axis=1))
    canvas.paste(Image.fromarray(bar), (left + width + 8, top))
    draw = ImageDraw.Draw(canvas)
    draw.text((left, 5), title, fill="black")
    for fraction, text in labels:
        y = top + min(max(fraction * height - 6, 0), height - 12)
        draw.text((left - 4 - draw.textlength(text), y), text, fill="black")
    n = len(steps)
    for j in {round(x) for x in np.linspace(0, n - 1, num=min(n, 8))}:
        text, size = str(steps[j]), draw.textlength(str(steps[j]))
        x = min(max(left + (j + 0.5) * width / n - size / 2, left), left + width - size)
        draw.text((x, top + height + 3), text, fill="black")
    draw.text((left + width // 2 - 12, top + height + 16), "step", fill="gray")
    lo, hi, label = scale
    draw.text((left + width + 24, top), f"{hi:.3g}", fill="black")
    draw.text((left + width + 24, top + height - 12), f"{lo:.3g}", fill="black")
    draw.text((left + width + 8, top + height + 16), label, fill="gray")
    return np.asarray(canvas, dtype=np.uint8)


def heatmap(
    values: np.ndarray,
    rows: Sequence[str],
    steps: Sequence[int],
    title: str,
    *,
    log10: bool = False,
    vmin: float | None = None,
    vmax: float | None = None,
    colorbar: str = "",
) -> np.ndarray:
    """``values[row, column]`` (a row per module, a column per step, NaN: no value) as an
    ``(H, W, 3)`` uint8 picture; ``log10``: colour by ``log10(value)`` (values <= 0 lowest);
    ``vmin``/``vmax``: the colour range (default: the data's)."""
    data = np.asarray(values, dtype=np.float64).reshape(len(rows), len(steps))
    if log10:
        with np.errstate(divide="ignore", invalid="ignore"):
            positive = data[np.isfinite(data) & (data > 0)]
            floor = math.log10(positive.min()) - 1 if positive.size else -12.0
            logs = np.log10(np.where(data > 0, data, 1.0))
            data = np.where(data > 0, logs, np.where(np.isnan(data), np.nan, floor))
    finite = data[np.isfinite(data)]
    lo = vmin if vmin is not None else (float(finite.min()) if finite.size else 0.0)
    hi = vmax if vmax is not None else (float(finite.max()) if finite.size else 1.0)
    shade = np.where(np.isnan(data), np.nan, (data - lo) / (hi - lo or 1.0))
    labels = [
        ((i + 0.5) / len(rows), n if len(n) <= 40 else "…" + n[-39:]) for i, n in enumerate(rows)
    ]
    if len(rows) > _MAX_LABELLED_ROWS:
        labels, title = [], f"{title} ({len(rows)} modules, in execution order)"
    height = int(np.clip(12 * len(rows), 120, 12 * _MAX_LABELLED_ROWS))
    scale = (lo, hi, f"log10 {colorbar}" if log10 else colorbar)
    return _draw(shade, title, labels, steps, scale, height)


def histogram_picture(
    key: str, points: Sequence[tuple[int, float, float, np.ndarray]]
) -> np.ndarray:
    """The histograms ``(step, lo, hi, counts)`` of ``key``: value by step, colour log(1 + count)."""
    points = sorted(points, key=lambda p: p[0])
    lo, hi = min(p[1] for p in points), max(p[2] for p in points)
    bins = len(points[0][3])
    grid = np.zeros((bins, len(points)))
    for j, (_, p_lo, p_hi, counts) in enumerate(points):
        centres = p_lo + (np.arange(bins) + 0.5) * (p_hi - p_lo) / bins
        index = np.clip(((centres - lo) / max(hi - lo, 1e-30) * bins).astype(int), 0, bins - 1)
        np.add.at(grid[:, j], index, counts)
    shade = np.log1p(grid)[::-1] / max(np.log1p(grid.max()), 1e-30)
    labels = [(0.0, f"{hi:.3g}"), (0.5, "value"), (1.0, f"{lo:.3g}")]
    scale = (0.0, float(grid.max()), "count, log scale")
    return _draw(shade, key, labels, [p[0] for p in points], scale, PLOT[1])


def publish_image(
    sinks: Sequence[Any], key: str, image: np.ndarray, step: int, owner: str, warned: set[str]
) -> list[str]:
    """Send ``image`` to every sink with ``log_image``; the names of those written. A failing
    sink warns once (its name joins ``warned``)."""
    written = []
    for sink in (s for s in sinks if hasattr(s, "log_image")):
        try:
            sink.log_image(key, image, step)
            written.append(sink.name)
        except Exception as exc:  # a picture must never stop training
            if sink.name not in warned:
                warned.add(sink.name)
                message = f"{owner}: could not log the picture {key!r} to {sink.name} "
                message += f"({type(exc).__name__}: {exc}); training continues."
                warnings.warn(message, RuntimeWarning, stacklevel=2)
    return written

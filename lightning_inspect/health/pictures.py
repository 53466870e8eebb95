"""Pictures of per-layer statistics over time (layers x steps heatmaps), and where they go.

:func:`heatmap` renders one statistic of every module over the logged steps as an RGB image
(rows: modules in execution order, columns: logged steps; optionally on a log10 scale).
:func:`publish_image` sends it to the backends behind a monitor's sinks: TensorBoard's Images tab
(``add_image``) and an MLflow artifact ``lightning_inspect/<key>.png`` (the latest picture; the
TensorBoard series keeps every one).

Example:
    >>> import numpy as np
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

_MAX_LABELLED_ROWS = 60


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
    """Render ``values[row, column]`` (NaN: no value) as an ``(H, W, 3)`` uint8 image.

    Args:
        values: one row per module (in execution order), one column per logged step.
        rows: the module names (labels of the y axis).
        steps: the optimizer steps (x axis).
        title: the picture's title.
        log10: colour by ``log10(value)`` (values <= 0 show as the lowest colour).
        vmin, vmax: colour range (in log10 units when ``log10``); default: the data's range.
        colorbar: label of the colour bar.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    data = np.asarray(values, dtype=np.float64)
    if log10:
        with np.errstate(divide="ignore", invalid="ignore"):
            positive = data[np.isfinite(data) & (data > 0)]
            floor = math.log10(positive.min()) - 1 if positive.size else -12.0
            data = np.where(
                data > 0,
                np.log10(np.where(data > 0, data, 1.0)),
                np.where(np.isnan(data), np.nan, floor),
            )
    masked = np.ma.masked_invalid(data)
    n_rows = max(len(rows), 1)
    height = min(2.0 + 0.22 * n_rows, 18.0)
    fig = Figure(figsize=(7.5, height), dpi=90)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(
        masked, aspect="auto", interpolation="nearest", cmap="viridis", vmin=vmin, vmax=vmax
    )
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("step")
    n_steps = len(steps)
    ticks = (
        sorted(set(np.linspace(0, n_steps - 1, num=min(n_steps, 8)).round().astype(int).tolist()))
        if n_steps
        else []
    )
    ax.set_xticks(ticks)
    ax.set_xticklabels([str(steps[i]) for i in ticks], fontsize=8)
    if len(rows) <= _MAX_LABELLED_ROWS:
        ax.set_yticks(range(len(rows)))
        ax.set_yticklabels(list(rows), fontsize=7)
    else:
        ax.set_ylabel(f"{len(rows)} modules, in execution order")
    fig.colorbar(image, ax=ax, label=colorbar or ("log10" if log10 else ""))
    fig.tight_layout()
    fig.canvas.draw()
    rgba = np.asarray(fig.canvas.buffer_rgba())
    return np.ascontiguousarray(rgba[..., :3])


def unwrap_sink(sink: Any) -> Any:
    """The backend object behind the library's wrappers (background thread, fault guard)."""
    inner = getattr(sink, "guarded", sink)
    return getattr(inner, "inner", inner)


def publish_image(
    sinks: Sequence[Any], key: str, image: np.ndarray, step: int, owner: str, warned: set[str]
) -> list[str]:
    """Send ``image`` to every sink that can take pictures; returns the names of those written.

    Each sink's own ``log_image(key, image, step)`` does the work: TensorBoard's Images tab, and
    for MLflow the artifact ``lightning_inspect/<key>.png`` (replaced by later pictures), sent from
    its background thread. Sinks without ``log_image`` are skipped. A failing backend warns once
    (the names in ``warned``) and never stops training.
    """
    written = []
    for sink in sinks:
        if not hasattr(sink, "log_image"):
            continue
        inner = unwrap_sink(sink)
        name = getattr(inner, "name", type(inner).__name__)
        try:
            sink.log_image(key, image, step)
            written.append(name)
        except Exception as exc:  # a picture must never stop training
            if name not in warned:
                warned.add(name)
                warnings.warn(
                    f"{owner}: could not log the picture {key!r} to {name} ({type(exc).__name__}: {exc}); "
                    "training continues.",
                    RuntimeWarning,
                    stacklevel=2,
                )
    return written

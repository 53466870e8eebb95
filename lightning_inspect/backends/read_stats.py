"""Read a run's logged statistics back as one tidy pandas DataFrame, from either backend.

:func:`read_stats` takes a TensorBoard log directory, or an MLflow run id with its tracking URI,
and returns one row per logged value with the columns ``step``, ``kind``, ``module``,
``output``, ``stat`` and ``value`` (``module`` holds the parameter's name for the
``param_grads`` and ``weights`` kinds, and is empty for whole-kind values such as
``param_grads/global_norm``; ``output`` is the path inside a module's output, often empty).
``module`` is the name as the model has it (a ``/`` in it, escaped in the metric key, is given
back); ``output`` is the path as in the key.
Rows are sorted by step, kind, module, output and stat, so frames of two runs line up.

From MLflow the values come from the table artifacts ``lightning_inspect/stats/<monitor>.csv``
(every value, as logged, in float64). TensorBoard stores scalars as float32: the same run read
from TensorBoard gives the MLflow values rounded to float32.

Example::

    df = read_stats("tb_logs/my_model/version_0")
    df = read_stats(run_id, tracking_uri="sqlite:///mlflow.db")
    stds = df[(df.kind == "activations") & (df.stat == "std")]
    stds.pivot_table(index="module", columns="step", values="value")  # layers x steps
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

from lightning_inspect.backends.mlflow import STATS_ARTIFACT_DIR
from lightning_inspect.core.keys import KINDS, split_key, unescape_name
from lightning_inspect.errors import ConfigError

COLUMNS = ("step", "kind", "module", "output", "stat", "value")


def read_stats(source: str | os.PathLike[str], tracking_uri: str | None = None) -> pd.DataFrame:
    """The statistics of one run as a tidy ``pandas.DataFrame`` (columns :data:`COLUMNS`).

    Args:
        source: a TensorBoard log directory (the directory of one run's event files, or a
            directory above it holding exactly one run), or, with ``tracking_uri``, an MLflow
            run id.
        tracking_uri: the MLflow tracking URI of the run (``sqlite:///mlflow.db``,
            ``http://host:5000``); ``None`` reads TensorBoard.
    """
    if tracking_uri is not None:
        keys, steps, values = _from_mlflow(str(source), tracking_uri)
    else:
        keys, steps, values = _from_tensorboard(Path(source))
    return _tidy(keys, steps, values)


def _pandas() -> Any:
    """The pandas module, or an ImportError that names the extra providing it."""
    try:
        import pandas
    except ImportError as exc:
        raise ImportError(
            "read_stats needs pandas: pip install 'lightning-inspect[analysis]'"
        ) from exc
    return pandas


def _tidy(keys: list[str], steps: list[int], values: list[float]) -> pd.DataFrame:
    import numpy as np

    pd = _pandas()

    parts = {key: split_key(key) for key in dict.fromkeys(keys)}
    frame = pd.DataFrame(
        {
            "step": np.asarray(steps, dtype=np.int64),
            "kind": [parts[k][0] for k in keys],
            "module": [unescape_name(parts[k][1]) for k in keys],
            "output": [parts[k][2] for k in keys],
            "stat": [parts[k][3] for k in keys],
            "value": np.asarray(values, dtype=np.float64),
        },
        columns=list(COLUMNS),
    )
    frame = frame[frame["kind"].isin(KINDS)]
    return frame.sort_values(list(COLUMNS[:5]), kind="stable").reset_index(drop=True)


def _from_tensorboard(root: Path) -> tuple[list[str], list[int], list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if not root.is_dir():
        raise ConfigError(
            f"read_stats({str(root)!r}): no such TensorBoard log directory; for an MLflow run pass "
            "its run id with tracking_uri=..."
        )
    run_dirs = sorted({str(p.parent) for p in root.rglob("events.out.tfevents.*")})
    if len(run_dirs) != 1:
        found = ", ".join(map(repr, run_dirs[:5])) + (" ..." if len(run_dirs) > 5 else "")
        raise ConfigError(
            f"read_stats({str(root)!r}): expected the event files of one run, found "
            f"{len(run_dirs)} run directories{': ' + found if run_dirs else ''}; pass one of them."
        )
    events = EventAccumulator(run_dirs[0], size_guidance={"scalars": 0})
    events.Reload()
    keys: list[str] = []
    steps: list[int] = []
    values: list[float] = []
    for tag in events.Tags()["scalars"]:
        if split_key(tag)[0] not in KINDS:
            continue
        for event in events.Scalars(tag):
            keys.append(tag)
            steps.append(event.step)
            values.append(event.value)
    return keys, steps, values


def _from_mlflow(run_id: str, tracking_uri: str) -> tuple[list[str], list[int], list[float]]:
    from mlflow.tracking import MlflowClient

    pd = _pandas()

    client = MlflowClient(tracking_uri=tracking_uri)
    try:
        client.get_run(run_id)
    except Exception as exc:  # MlflowException, or a store that cannot be reached
        raise ConfigError(f"read_stats({run_id!r}, tracking_uri={tracking_uri!r}): {exc}") from exc
    tables = [
        f.path for f in client.list_artifacts(run_id, STATS_ARTIFACT_DIR) if f.path.endswith(".csv")
    ]
    if not tables:
        raise ConfigError(
            f"read_stats({run_id!r}, tracking_uri={tracking_uri!r}): the run has no "
            f"{STATS_ARTIFACT_DIR}/*.csv artifact (written at the end of fit by the monitors)."
        )
    with tempfile.TemporaryDirectory(prefix="lightning_inspect_read_") as tmp:
        frames = [
            pd.read_csv(
                client.download_artifacts(run_id, path, tmp),
                dtype={"key": str},
                keep_default_na=False,
                na_values={"value": ["nan"]},
            )
            for path in tables
        ]
    table = pd.concat(frames, ignore_index=True)
    return table["key"].tolist(), table["step"].tolist(), table["value"].tolist()

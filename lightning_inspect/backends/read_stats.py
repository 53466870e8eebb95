"""A run's logged statistics back as one tidy pandas DataFrame, from TensorBoard or MLflow."""

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
    """The statistics of one run, a row per value (:data:`COLUMNS`), sorted by all but value.

    ``source``: a TensorBoard log directory (of one run, or above exactly one run), or with
    ``tracking_uri`` (``sqlite:///mlflow.db``, ``http://host:5000``) an MLflow run id.

    Example::

        df = read_stats("tb_logs/my_model/version_0")  # one statistic, layers x steps:
        df[df.stat == "std"].pivot_table(index="module", columns="step", values="value")
    """
    try:
        import pandas as pd
    except ImportError as exc:
        hint = "pip install 'lightning-inspect[analysis]'"
        raise ImportError(f"read_stats needs pandas: {hint}") from exc
    if tracking_uri is not None:
        table = _from_mlflow(pd, str(source), tracking_uri)
    else:
        table = pd.DataFrame(_from_tensorboard(Path(source)), columns=["key", "step", "value"])
    parts = {key: split_key(key) for key in table["key"].unique()}
    frame = pd.DataFrame([parts[k] for k in table["key"]], columns=list(COLUMNS[1:5]))
    frame["module"] = frame["module"].map(unescape_name)
    frame.insert(0, "step", table["step"].astype("int64").to_numpy())
    frame["value"] = table["value"].astype("float64").to_numpy()
    frame = frame[frame["kind"].isin(KINDS)]
    return frame.sort_values(list(COLUMNS[:5]), kind="stable").reset_index(drop=True)


def _from_tensorboard(root: Path) -> list[tuple[str, int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if not root.is_dir():
        message = f"read_stats({str(root)!r}): no such TensorBoard log directory; for an MLflow "
        raise ConfigError(message + "run pass its run id with tracking_uri=...")
    run_dirs = sorted({str(p.parent) for p in root.rglob("events.out.tfevents.*")})
    if len(run_dirs) != 1:
        found = ": " + ", ".join(map(repr, run_dirs[:5])) if run_dirs else ""
        found += " ..." if len(run_dirs) > 5 else ""
        message = f"read_stats({str(root)!r}): expected the event files of one run, found "
        raise ConfigError(f"{message}{len(run_dirs)} run directories{found}; pass one of them.")
    events = EventAccumulator(run_dirs[0], size_guidance={"scalars": 0})
    events.Reload()
    tags = [t for t in events.Tags()["scalars"] if split_key(t)[0] in KINDS]
    return [(tag, e.step, e.value) for tag in tags for e in events.Scalars(tag)]


def _from_mlflow(pd: Any, run_id: str, tracking_uri: str) -> Any:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    where = f"read_stats({run_id!r}, tracking_uri={tracking_uri!r})"
    try:
        client.get_run(run_id)
    except Exception as exc:  # MlflowException, or a store that cannot be reached
        raise ConfigError(f"{where}: {exc}") from exc
    listed = client.list_artifacts(run_id, STATS_ARTIFACT_DIR)
    if not (tables := [f.path for f in listed if f.path.endswith(".csv")]):
        message = f"{where}: the run has no {STATS_ARTIFACT_DIR}/*.csv artifact (written at the "
        raise ConfigError(message + "end of fit by the monitors).")
    with tempfile.TemporaryDirectory(prefix="lightning_inspect_read_") as tmp:
        options = dict(dtype={"key": str}, keep_default_na=False, na_values={"value": ["nan"]})
        paths = [client.download_artifacts(run_id, path, tmp) for path in tables]
        return pd.concat([pd.read_csv(p, **options) for p in paths], ignore_index=True)

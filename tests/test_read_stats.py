"""A real-size run read back: read_stats from TensorBoard and MLflow, MLflow's headline metrics,
the table artifact of every value and TensorBoard's custom-scalars layout."""

from __future__ import annotations

import copy
import re
import sys
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import make_trainer
from lightning.pytorch.loggers import MLFlowLogger, TensorBoardLogger

from lightning_inspect import (
    ActivationMonitor,
    ConfigError,
    GradientMonitor,
    WeightMonitor,
    read_stats,
)
from lightning_inspect.backends.mlflow import headline_metrics
from lightning_inspect.core.keys import KINDS, split_key

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from overhead import make_model

STEPS = 3  # logged at steps 0 and 2


@pytest.fixture(scope="module")
def real_run(
    tmp_path_factory: pytest.TempPathFactory, mlflow_store: dict[str, str]
) -> dict[str, Any]:
    """The 12-layer transformer of the benchmark, default monitors, TensorBoard + SQLite MLflow."""
    tmp = tmp_path_factory.mktemp("real")
    model = make_model("transformer12")
    initial = copy.deepcopy(model.state_dict())
    tb = TensorBoardLogger(save_dir=str(tmp / "tb"), name="", version="run")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mlf = MLFlowLogger(experiment_name="lightning_inspect_real_size", **mlflow_store)
    callbacks = [m(every_n_steps=2) for m in (ActivationMonitor, GradientMonitor, WeightMonitor)]
    trainer = make_trainer(STEPS, logger=[tb, mlf], callbacks=callbacks)
    trainer.fit(model)
    return {"tb_dir": Path(tb.log_dir), "run_id": mlf.run_id, "initial": initial, **mlflow_store}


@pytest.fixture(scope="module")
def frames(real_run: dict[str, Any]) -> tuple[pd.DataFrame, pd.DataFrame]:
    from_tb = read_stats(real_run["tb_dir"])
    from_mlflow = read_stats(real_run["run_id"], tracking_uri=real_run["tracking_uri"])
    return from_tb, from_mlflow


def test_read_stats_gives_the_same_tidy_frame_from_both_backends(
    frames: tuple[pd.DataFrame, pd.DataFrame],
) -> None:
    from_tb, from_mlflow = frames
    assert list(from_tb.columns) == ["step", "kind", "module", "output", "stat", "value"]
    assert sorted(from_tb.step.unique()) == [0, 2]
    per_step = len(from_tb) // 2
    assert per_step > 3500, per_step  # ~3,900 values per logged step on this model
    keys = ["step", "kind", "module", "output", "stat"]
    pd.testing.assert_frame_equal(from_tb[keys], from_mlflow[keys])
    # TensorBoard keeps scalars as float32: the MLflow table rounded to float32 is TensorBoard's.
    np.testing.assert_array_equal(
        from_mlflow.value.to_numpy().astype(np.float32), from_tb.value.to_numpy(np.float32)
    )
    assert set(from_tb.kind) == {"activations", "activation_grads", "param_grads", "weights"}
    attn = from_tb[
        (from_tb.kind == "activations") & (from_tb.module == "encoder.layers.0.self_attn")
    ]
    assert set(attn.output) == {"0"}  # MultiheadAttention returns (output, None): one tensor path


def test_read_stats_values_match_numpy(
    real_run: dict[str, Any], frames: tuple[pd.DataFrame, pd.DataFrame]
) -> None:
    _, df = frames
    weight = real_run["initial"]["encoder.layers.3.linear1.weight"].double().numpy()
    rows = df[
        (df.step == 0) & (df.kind == "weights") & (df.module == "encoder.layers.3.linear1.weight")
    ]
    got = dict(zip(rows.stat, rows.value, strict=False))
    assert got["mean"] == pytest.approx(weight.mean(), rel=1e-6, abs=1e-12)
    assert got["std"] == pytest.approx(weight.std(), rel=1e-6)
    assert got["l2_norm"] == pytest.approx(np.linalg.norm(weight), rel=1e-6)
    assert got["max"] == weight.max() and got["min"] == weight.min()
    assert got["nan_count"] == 0


def test_mlflow_gets_headline_metrics_and_every_value_in_its_table(
    real_run: dict[str, Any], frames: tuple[pd.DataFrame, pd.DataFrame]
) -> None:
    from mlflow.tracking import MlflowClient

    _, df = frames
    client = MlflowClient(tracking_uri=real_run["tracking_uri"])
    metrics = client.get_run(real_run["run_id"]).data.metrics
    ours = {
        k for k in metrics if k.split("/")[0] in ("summary", *KINDS)
    }  # not Lightning's train/loss
    assert len(ours) == 55, sorted(
        ours
    )  # 4 kinds x 13 summaries of the default stats, 2 of update_ratio, global_norm
    assert "param_grads/global_norm" in metrics
    last = df[df.step == 2]
    weights = last[last.kind == "weights"]
    assert metrics["summary/weights/max"] == weights[weights.stat == "max"].value.max()
    assert metrics["summary/weights/min"] == weights[weights.stat == "min"].value.min()
    norms = weights[weights.stat == "l2_norm"].value.to_numpy()
    assert metrics["summary/weights/l2_norm"] == pytest.approx(np.sqrt(np.sum(norms**2)), rel=1e-12)
    ratios = weights[weights.stat == "update_ratio"].value
    assert metrics["summary/weights/update_ratio/max"] == ratios.max()
    zeros = last[(last.kind == "activations") & (last.stat == "zero_fraction")].value
    assert metrics["summary/activations/zero_fraction/min"] == zeros.min()
    history = client.get_metric_history(real_run["run_id"], "summary/activation_grads/std/max")
    assert sorted(m.step for m in history) == [0, 2]
    tables = {f.path for f in client.list_artifacts(real_run["run_id"], "lightning_inspect/stats")}
    assert tables == {
        f"lightning_inspect/stats/{m}.csv"
        for m in ("ActivationMonitor", "GradientMonitor", "WeightMonitor")
    }


def test_tensorboard_layout_has_one_chart_per_kind_and_stat(
    real_run: dict[str, Any], frames: tuple[pd.DataFrame, pd.DataFrame]
) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.custom_scalar import layout_pb2

    events = EventAccumulator(str(real_run["tb_dir"]), size_guidance={"tensors": 0, "scalars": 0})
    events.Reload()
    layouts = events.Tensors("custom_scalars__config__")
    layout = layout_pb2.Layout.FromString(
        layouts[-1].tensor_proto.string_val[0]
    )  # TensorBoard shows the last
    charts = {c.title: list(c.multiline.tag) for cat in layout.category for c in cat.chart}
    tags = events.Tags()["scalars"]
    from_tb, _ = frames
    expected = {f"{k}/{s}" for k, s in zip(from_tb.kind, from_tb.stat, strict=False)}
    assert set(charts) == expected
    for title, (pattern,) in charts.items():
        kind, stat = title.split("/")
        matched = {t for t in tags if re.search(pattern, t)}
        assert matched == {
            t for t in tags if split_key(t)[0] == kind and split_key(t)[3] == stat
        }, title
        assert matched
    # 62 modules produce outputs: MultiheadAttention uses its 12 out_proj layers' weights directly
    assert len({t for t in tags if re.search(charts["activations/mean"][0], t)}) == 62


def test_headline_metrics_summarise_each_kind_and_stat() -> None:
    values = {
        "activations/a/max": 2.0,
        "activations/b/max": 5.0,
        "activations/a/min": -1.0,
        "activations/b/min": float("nan"),
        "activations/a/std": 0.5,
        "activations/b/std": 1.5,
        "activations/c/out/std": 1.0,
        "param_grads/w/l2_norm": 3.0,
        "param_grads/v/l2_norm": 4.0,
        "param_grads/global_norm": 5.0,
        "weights/w/nan_count": 1.0,
        "weights/v/nan_count": 2.0,
        "weights/w/update_ratio": 1e-3,
        "other": 7.0,
    }
    assert headline_metrics(values) == {
        "summary/activations/max": 5.0,
        "summary/activations/min": -1.0,  # a statistic with no finite value is left out
        "summary/activations/std/min": 0.5,
        "summary/activations/std/max": 1.5,
        "summary/param_grads/l2_norm": 5.0,
        "param_grads/global_norm": 5.0,
        "summary/weights/nan_count": 3.0,
        "summary/weights/update_ratio/min": 1e-3,
        "summary/weights/update_ratio/max": 1e-3,
        "other": 7.0,
    }


def test_mlflow_metrics_setting_is_checked() -> None:
    with pytest.raises(
        ConfigError, match=r"WeightMonitor\(mlflow_metrics='al'\): expected one of 'summary', 'all'"
    ):
        WeightMonitor(mlflow_metrics="al")


def test_read_stats_errors_name_the_source(
    tmp_path: Path, mlflow_logger, mlflow_store: dict[str, str]
) -> None:
    with pytest.raises(
        ConfigError, match=r"no such TensorBoard log directory; for an MLflow run pass"
    ):
        read_stats(tmp_path / "missing")
    for version in ("a", "b"):
        (tmp_path / "tb" / version).mkdir(parents=True)
        (tmp_path / "tb" / version / "events.out.tfevents.1").write_bytes(b"")
    with pytest.raises(
        ConfigError, match=r"expected the event files of one run, found 2 run directories"
    ):
        read_stats(tmp_path / "tb")
    with pytest.raises(
        ConfigError, match=r"the run has no lightning_inspect/stats/\*.csv artifact"
    ):
        read_stats(mlflow_logger.run_id, tracking_uri=mlflow_store["tracking_uri"])


def test_the_table_keeps_odd_keys_and_every_float_exactly(
    mlflow_logger, mlflow_client, mlflow_store
) -> None:
    from lightning_inspect.backends.mlflow import MlflowSink

    values = {
        'activations/head/a,b"c\nd/mean': 0.1,  # an output path with CSV's special characters
        "activations/head/std": float("nan"),
        "weights/w/max": float("inf"),
        "weights/w/min": 5e-324,
        "param_grads/global_norm": 1 / 3,
    }
    sink = MlflowSink(mlflow_client, mlflow_logger.run_id, owner="Odd")
    sink.log_scalars(values, step=7)
    sink.log_scalars({"weights/w/max": -2.5}, step=8)
    sink.flush()
    df = read_stats(mlflow_logger.run_id, tracking_uri=mlflow_store["tracking_uri"])
    got = {
        (row.step, row.kind, row.module, row.output, row.stat): row.value for row in df.itertuples()
    }
    expected = {(7, *split_key(k)): v for k, v in values.items()} | {
        (8, "weights", "w", "", "max"): -2.5
    }
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == value or (np.isnan(value) and np.isnan(got[key])), key
    sink.close()


def test_read_stats_without_pandas_names_the_extra(tmp_path: Path, monkeypatch) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path))
    writer.add_scalar("weights/w/mean", 1.0, 0)
    writer.close()
    monkeypatch.setitem(sys.modules, "pandas", None)  # import pandas raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'lightning-inspect\[analysis\]'"):
        read_stats(tmp_path)


class _SlashNames(L.LightningModule):
    """A ModuleDict key with a '/' beside a dict-returning module whose output is 'logits'."""

    def __init__(self) -> None:
        super().__init__()
        self.heads = torch.nn.ModuleDict({"a/b": torch.nn.Linear(4, 4)})
        self.head = _DictHead()

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        (x,) = batch
        return self.heads["a/b"](x).sum() + self.head(x)["logits"].sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class _DictHead(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.fc(x)}


def test_read_stats_gives_module_names_back_as_the_model_has_them(tmp_path: Path) -> None:
    from torch.utils.data import DataLoader, TensorDataset

    tb = TensorBoardLogger(save_dir=str(tmp_path), name="", version="run")
    monitor = ActivationMonitor(modules=["heads.*", "head"], every_n_steps=1)
    trainer = make_trainer(1, logger=[tb], callbacks=[monitor])
    data = DataLoader(TensorDataset(torch.randn(8, 4)), batch_size=8)
    trainer.fit(_SlashNames(), data)
    df = read_stats(tb.log_dir)
    pairs = set(zip(df.module, df.output, strict=False))
    assert pairs == {("heads.a/b", ""), ("head", "logits")}, pairs

"""Every Lightning logger gets what it can show: CSV and any logger (scalars), W&B (offline run
read back), the names that select them, and the warning for a Trainer without a logger."""

from __future__ import annotations

import csv
import json
import struct
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import PlainMLP, loader, make_trainer, read_tb
from lightning.pytorch import Callback
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger

from lightning_inspect import (
    ActivationMonitor,
    BackendError,
    ConfigError,
    GradientMonitor,
    MemorySink,
)
from lightning_inspect.backends import GenericSink, check_backends, logger_backend, resolve_sinks
from lightning_inspect.backends.wandb import WandbSink, wandb_bins
from lightning_inspect.core.stats import Histogram, histogram, reduce_tensor

B, HIDDEN = 8, 5  # conftest.loader's batch size, PlainMLP's hidden width


def np64(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float64).reshape(-1).numpy()


def approx(ref: float, scale: float) -> Any:
    """float32-computed statistics."""
    return pytest.approx(ref, rel=2e-5, abs=2e-6 * scale + 1e-7)


class Reference(Callback):
    """Per step: the weights the forward used and the parameter gradients (before the update)."""

    def __init__(self) -> None:
        self.weights: dict[int, dict[str, torch.Tensor]] = {}
        self.grads: dict[int, dict[str, torch.Tensor]] = {}

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        s = trainer.global_step
        self.weights[s] = {n: p.detach().clone() for n, p in pl_module.named_parameters()}
        self.grads[s] = {n: p.grad.detach().clone() for n, p in pl_module.named_parameters()}

    def activation(self, step: int) -> np.ndarray:
        """Output of ``net.0`` for the step's batch (the loader does not shuffle)."""
        x = loader().dataset.tensors[0][step * B : (step + 1) * B]
        w = self.weights[step]
        return np64(torch.nn.functional.linear(x, w["net.0.weight"], w["net.0.bias"]))


class ListLogger(Logger):
    """A user's own logger: keeps every ``log_metrics`` call."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int | None, dict[str, float]]] = []
        self.saves = 0

    @property
    def name(self) -> str:
        return "list"

    @property
    def version(self) -> str:
        return "0"

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self.calls.append((step, dict(metrics)))

    def save(self) -> None:
        self.saves += 1


def read_csv_metrics(logger: CSVLogger) -> list[dict[str, str]]:
    with open(Path(logger.log_dir) / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def csv_series(rows: list[dict[str, str]], key: str) -> dict[int, float]:
    return {int(r["step"]): float(r[key]) for r in rows if r.get(key)}


# ------------------------------------------------------------------------------------------
# CSV (any logger: scalars through its log_metrics)
# ------------------------------------------------------------------------------------------


def test_csv_logger_receives_the_statistics(tmp_path: Path, lightning_info: list[str]) -> None:
    torch.manual_seed(0)
    logger = CSVLogger(str(tmp_path), name="csv", version=0)
    ref = Reference()
    monitors = [
        ActivationMonitor(modules=["net.0"], every_n_steps=1),
        GradientMonitor(modules=["net.0"], every_n_steps=1),
    ]
    make_trainer(3, logger=logger, callbacks=[*monitors, ref]).fit(PlainMLP(), loader())
    rows = read_csv_metrics(logger)
    for s in range(3):
        a = ref.activation(s)
        g = np64(ref.grads[s]["net.0.weight"])
        assert csv_series(rows, "activations/net.0/mean")[s] == approx(a.mean(), np.abs(a).mean())
        assert csv_series(rows, "activations/net.0/max")[s] == approx(a.max(), np.abs(a).max())
        got = csv_series(rows, "param_grads/net.0.weight/l2_norm")[s]
        assert got == approx(np.linalg.norm(g), np.linalg.norm(g))
    # histograms have no column: they are not sent to a logger that takes scalars only
    assert "activations/net.0" not in rows[0] and "param_grads/net.0.weight" not in rows[0]
    for owner in ("ActivationMonitor", "GradientMonitor"):
        line = (
            f"{owner}: CSVLogger receives scalars only; histograms, texts and pictures go to "
            "no backend (attach a TensorBoard, MLflow or W&B logger for them)."
        )
        assert lightning_info.count(line) == 1, lightning_info
    assert any(
        x.startswith("ActivationMonitor: 1 modules selected") and "-> csv:" in x
        for x in lightning_info
    ), lightning_info


def test_a_users_own_logger_receives_one_call_per_step(lightning_info: list[str]) -> None:
    own = ListLogger()
    assert logger_backend(own) == "list"
    make_trainer(
        2, logger=own, callbacks=[ActivationMonitor(modules=["net.0"], every_n_steps=1)]
    ).fit(PlainMLP(), loader())
    ours = [(step, m) for step, m in own.calls if any(k.startswith("activations/") for k in m)]
    assert [step for step, _ in ours] == [0, 1]  # all of a step's scalars in one call
    assert all(k.startswith("activations/net.0/") for _, m in ours for k in m)
    assert {"activations/net.0/mean", "activations/net.0/std"} <= set(ours[0][1])
    assert "ActivationMonitor: ListLogger receives scalars only" in " ".join(lightning_info)


def test_generic_sink_drops_histograms_and_texts_and_takes_no_pictures() -> None:
    own = ListLogger()
    sink = GenericSink(own, "list")
    sink.log_histograms({"k": histogram(reduce_tensor(torch.arange(4.0), bins=4).numpy())}, step=0)
    sink.log_text("k", "text", step=0)
    sink.log_scalars({"k/mean": np.float32(0.5)}, step=3)
    assert own.calls == [(3, {"k/mean": 0.5})] and type(own.calls[0][1]["k/mean"]) is float
    assert not hasattr(sink, "log_image")
    sink.flush()
    assert own.saves == 1  # flush writes through the logger's own save()


# ------------------------------------------------------------------------------------------
# Selection by name, and the errors
# ------------------------------------------------------------------------------------------


def test_backend_names_select_loggers(tmp_path: Path, lightning_info: list[str]) -> None:
    tb = TensorBoardLogger(str(tmp_path / "tb"), name="", version="run")
    csv_logger = CSVLogger(str(tmp_path), name="csv", version=0)
    own = ListLogger()
    trainer = make_trainer(1, logger=[tb, csv_logger, own])
    assert [logger_backend(lg) for lg in trainer.loggers] == ["tensorboard", "csv", "list"]
    sinks = resolve_sinks(trainer, None, owner="X")
    assert [s.name for s in sinks] == ["tensorboard", "csv", "list"]
    assert (
        "X: CSVLogger receives scalars only; histograms, texts and pictures go to tensorboard."
        in lightning_info
    )
    assert [s.name for s in resolve_sinks(trainer, check_backends("X", "csv"), owner="X")] == [
        "csv"
    ]
    assert [s.name for s in resolve_sinks(trainer, check_backends("X", ["list"]), owner="X")] == [
        "list"
    ]


def test_csv_selected_by_name_is_the_only_backend_written(tmp_path: Path) -> None:
    tb = TensorBoardLogger(str(tmp_path / "tb"), name="", version="run")
    csv_logger = CSVLogger(str(tmp_path), name="csv", version=0)
    monitor = ActivationMonitor(modules=["net.0"], every_n_steps=1, backends="csv")
    make_trainer(2, logger=[tb, csv_logger], callbacks=[monitor]).fit(PlainMLP(), loader())
    assert sorted(csv_series(read_csv_metrics(csv_logger), "activations/net.0/mean")) == [0, 1]
    assert not [t for t in read_tb(tb.log_dir).scalar_tags() if t.startswith("activations/")]


def test_a_requested_backend_without_its_logger_is_an_error(tmp_path: Path) -> None:
    csv_logger = CSVLogger(str(tmp_path), name="csv", version=0)
    trainer = make_trainer(1, logger=[csv_logger], callbacks=[ActivationMonitor(backends="wandb")])
    match = (
        r"ActivationMonitor\(backends=\['wandb'\]\): backend 'wandb' needs a WandbLogger in "
        r"Trainer\(logger=\.\.\.\), but the Trainer has: CSVLogger \('csv'\)\."
    )
    with pytest.raises(BackendError, match=match):
        trainer.fit(PlainMLP(), loader())
    trainer = make_trainer(
        1, logger=[ListLogger()], callbacks=[GradientMonitor(backends=["lists"])]
    )
    match = (
        r"backend 'lists' needs a logger named 'lists' .* has: ListLogger \('list'\)\. "
        r"Did you mean 'list'\?"
    )
    with pytest.raises(BackendError, match=match):
        trainer.fit(PlainMLP(), loader())


def test_a_near_miss_of_a_known_name_is_refused_at_construction() -> None:
    with pytest.raises(
        ConfigError,
        match=r"unknown backend 'csvv'.*'comet' for CometLogger\)\. Did you mean 'csv'\?",
    ):
        ActivationMonitor(backends="csvv")
    with pytest.raises(ConfigError, match=r"unknown backend ''"):
        check_backends("X", [""])
    assert check_backends("X", ["wandb", "comet"]) == ("wandb", "comet")


# ------------------------------------------------------------------------------------------
# No logger
# ------------------------------------------------------------------------------------------


def _no_logger_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    return [
        str(w.message)
        for w in caught
        if issubclass(w.category, RuntimeWarning) and "the Trainer has no logger" in str(w.message)
    ]


def test_a_trainer_without_a_logger_warns_once_per_callback() -> None:
    monitors = [ActivationMonitor(every_n_steps=1), GradientMonitor(every_n_steps=1)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(2, logger=False, callbacks=monitors).fit(PlainMLP(), loader())
    found = _no_logger_warnings(caught)
    assert len(found) == 2 and found[0].startswith("ActivationMonitor: the Trainer has no logger")
    assert found[1].startswith("GradientMonitor: ") and "logger=csv" in found[1]


def test_explicit_sinks_without_a_logger_do_not_warn() -> None:
    sink = MemorySink()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(1, logger=False, callbacks=[ActivationMonitor(backends=[sink])]).fit(
            PlainMLP(), loader()
        )
    assert _no_logger_warnings(caught) == [] and sink.scalars


# ------------------------------------------------------------------------------------------
# W&B, offline
# ------------------------------------------------------------------------------------------


def test_wandb_bins_merge_neighbours_beyond_wandbs_limit() -> None:
    x = torch.randn(5000, generator=torch.Generator().manual_seed(0))
    h = histogram(reduce_tensor(x, bins=1024).numpy())
    assert h is not None
    counts, edges = wandb_bins(h)
    assert len(counts) == 512 and len(edges) == 513
    np.testing.assert_array_equal(edges, h.edges[::2])
    np.testing.assert_array_equal(counts, np.asarray(h.counts).reshape(512, 2).sum(axis=1))
    assert counts.sum() == 5000
    small_counts, small_edges = wandb_bins(histogram(reduce_tensor(x, bins=64).numpy()))
    assert len(small_counts) == 64 and len(small_edges) == 65
    uneven = Histogram(np.linspace(0, 6, 7), np.arange(6.0), 0.0, 6.0, 15.0, 0.0, 0.0)
    assert [a.tolist() for a in wandb_bins(uneven, limit=4)] == [[1.0, 5.0, 9.0], [0, 2, 4, 6]]


def _history_key(item: Any) -> str | tuple[str, ...]:
    """A history item's key: a string, or (key, field) for a field of a logged object."""
    path = (item.key,) if item.key else tuple(item.nested_key)
    return path[0] if len(path) == 1 else path


def read_wandb_history(run_file: Path) -> list[dict[Any, Any]]:
    """The history rows of an offline run's ``.wandb`` file (a LevelDB-style log of protobuf
    records: 32 KiB blocks, each record chunk with a 7-byte header crc32, length, type)."""
    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    block, i, parts, rows = 32768, 7, [], []
    while i + 7 <= len(data):
        left = block - i % block
        if left < 7:  # a block's tail too short for a header is padding
            i += left
            continue
        _, length, kind = struct.unpack("<IHB", data[i : i + 7])
        if kind == 0:
            break
        parts.append(data[i + 7 : i + 7 + length])
        i += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(parts))
            parts = []
            if record.WhichOneof("record_type") == "history":
                rows.append(
                    {
                        _history_key(item): json.loads(item.value_json)
                        for item in record.history.item
                    }
                )
    return rows


def test_wandb_offline_run_receives_scalars_and_histograms(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, lightning_info: list[str]
) -> None:
    wandb = pytest.importorskip("wandb")
    from lightning.pytorch.loggers import WandbLogger

    for name, value in {
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_DIR": str(tmp_path),
        "WANDB_CACHE_DIR": str(tmp_path / "cache"),
        "WANDB_CONFIG_DIR": str(tmp_path / "config"),
    }.items():
        monkeypatch.setenv(name, value)
    torch.manual_seed(0)
    logger = WandbLogger(offline=True, save_dir=str(tmp_path), project="lightning-inspect-tests")
    ref = Reference()
    try:
        monitor = ActivationMonitor(modules=["net.0"], every_n_steps=1, bins=16)
        make_trainer(2, logger=logger, callbacks=[monitor, ref]).fit(PlainMLP(), loader())
        sink = WandbSink(logger)
        sink.log_text("notes/summary", "| a | b |", step=7)
        sink.log_image("pictures/heatmap", np.zeros((4, 6, 3), dtype=np.uint8), step=7)
        logger.experiment.finish()
    finally:
        wandb.teardown()
    [run_file] = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    rows = read_wandb_history(run_file)
    means = {
        r["trainer/global_step"]: r["activations/net.0/mean"]
        for r in rows
        if "activations/net.0/mean" in r
    }
    hists = {r["trainer/global_step"]: r for r in rows if ("activations/net.0", "values") in r}
    assert sorted(means) == [0, 1] and sorted(hists) == [0, 1]
    for s in (0, 1):
        a = ref.activation(s)
        assert means[s] == approx(a.mean(), np.abs(a).mean())
        counts = hists[s][("activations/net.0", "values")]
        bins = hists[s][("activations/net.0", "bins")]
        assert hists[s][("activations/net.0", "_type")] == "histogram"
        assert len(counts) == 16 and len(bins) == 17 and sum(counts) == a.size == B * HIDDEN
        assert bins[0] == approx(a.min(), np.abs(a).max()) and bins[-1] == approx(
            a.max(), np.abs(a).max()
        )
        reference, _ = np.histogram(a, bins=np.asarray(bins))
        assert np.abs(np.asarray(counts) - reference).sum() <= 2  # float32 edges vs float64 values
    assert not [x for x in lightning_info if "receives scalars only" in x]
    [text] = [r for r in rows if ("notes/summary", "_type") in r]
    assert text[("notes/summary", "_type")] == "table-file" and text["trainer/global_step"] == 7
    assert text[("notes/summary", "ncols")] == 1 and text[("notes/summary", "nrows")] == 1
    [picture] = [r for r in rows if ("pictures/heatmap", "_type") in r]
    assert picture[("pictures/heatmap", "_type")] == "images/separated"
    assert (
        picture[("pictures/heatmap", "height")] == 4 and picture[("pictures/heatmap", "width")] == 6
    )

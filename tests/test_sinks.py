"""Sinks: TensorBoard and MLflow read back from their stores; the guard and background wrappers."""

from __future__ import annotations

import json
import math
import struct
import tempfile
import threading
import warnings
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import PlainMLP, loader, make_trainer, mlflow_history, read_tb
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_inspect import (
    ActivationMonitor,
    BackendError,
    ConfigError,
    GradientMonitor,
    MemorySink,
    WeightMonitor,
)
from lightning_inspect.backends import (
    BackgroundSink,
    GuardedSink,
    MlflowRunSink,
    MlflowSink,
    Sink,
    TensorBoardSink,
    check_backends,
    resolve_sinks,
)
from lightning_inspect.core.stats import Histogram, histogram, reduce_tensor


def make_histogram(x: torch.Tensor, bins: int = 8) -> Histogram:
    h = histogram(reduce_tensor(x, bins=bins).numpy())
    assert h is not None
    return h


class FailingSink:
    name = "flaky"

    def __init__(self) -> None:
        self.calls = 0

    def _fail(self, *args: Any) -> None:
        self.calls += 1
        raise ConnectionError("backend unreachable")

    log_scalars = log_histograms = log_text = flush = _fail


def _runtime_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]


# ------------------------------------------------------------------------------------------
# GuardedSink
# ------------------------------------------------------------------------------------------


def test_guarded_sink_warns_once_and_saves_what_was_refused(tmp_path: Path) -> None:
    inner = FailingSink()
    sink = GuardedSink(inner, fallback_dir=tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sink.log_scalars({"weights/w/mean": 0.5, "weights/w/nan_count": math.nan}, step=3)
        sink.log_histograms({"weights/w": make_histogram(torch.arange(4.0), bins=4)}, step=3)
        sink.log_text("model/structure", "| a | b |", step=0)
        sink.flush()
        sink.log_scalars({"weights/w/mean": 0.25}, step=4)
    messages = _runtime_warnings(caught)
    assert len(messages) == 1
    assert str(sink.fallback_path) in messages[0] and "ConnectionError" in messages[0]
    assert sink.fallback_path.parent == tmp_path
    assert inner.calls == 5 and sink.failed  # every call still offered to the backend
    lines = [json.loads(line) for line in sink.fallback_path.read_text().splitlines()]
    assert [line["call"] for line in lines] == [
        "log_scalars",
        "log_histograms",
        "log_text",
        "flush",
        "log_scalars",
    ]
    assert lines[0]["step"] == 3 and lines[0]["values"]["weights/w/mean"] == 0.5
    assert math.isnan(lines[0]["values"]["weights/w/nan_count"])
    assert lines[1]["histograms"]["weights/w"]["counts"] == [1.0, 1.0, 1.0, 1.0]
    assert lines[2]["text"] == "| a | b |"
    assert lines[4] == {"call": "log_scalars", "step": 4, "values": {"weights/w/mean": 0.25}}


def test_guarded_sink_passes_through() -> None:
    inner = MemorySink()
    sink = GuardedSink(inner)
    sink.log_scalars({"a": 1.0}, 0)
    sink.log_text("t", "x", 1)
    sink.flush()
    assert (
        inner.scalars == {"a": [(0, 1.0)]}
        and inner.texts == {"t": [(1, "x")]}
        and inner.flushes == 1
    )
    assert not sink.failed


def test_failing_backend_during_training(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    flaky = FailingSink()
    monitor = ActivationMonitor(
        modules=["net.0"], every_n_steps=1, backends=[flaky], histograms=False
    )
    trainer = make_trainer(3, callbacks=[monitor])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(PlainMLP(), loader())
    assert trainer.global_step == 3
    messages = _runtime_warnings(caught)
    assert len(messages) == 1, messages
    # In a private directory of its own (mode 0700) under the temp directory, named in the warning.
    [path] = list(tmp_path.glob("lightning_inspect_*/lightning_inspect_unsent_flaky_*.jsonl"))
    assert str(path) in messages[0]
    assert path.stat().st_mode & 0o777 == 0o600 and path.parent.stat().st_mode & 0o777 == 0o700
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    steps = [line["step"] for line in lines if line["call"] == "log_scalars"]
    assert steps == [0, 1, 2]
    assert all(
        "activations/net.0/mean" in line["values"]
        for line in lines
        if line["call"] == "log_scalars"
    )


# ------------------------------------------------------------------------------------------
# MemorySink, TensorBoardSink
# ------------------------------------------------------------------------------------------


def test_memory_sink() -> None:
    sink = MemorySink()
    assert isinstance(sink, Sink)
    sink.log_scalars({"a": 1, "b": 2.0}, step=0)
    sink.log_scalars({"a": 3.0}, step=5)
    h = make_histogram(torch.ones(3))
    sink.log_histograms({"h": h}, step=5)
    assert sink.steps("a") == [0, 5] and sink.last("a") == 3.0 and sink.scalars["b"] == [(0, 2.0)]
    assert sink.histograms["h"] == [(5, h)]


def test_tensorboard_sink_round_trip(tmp_path: Path) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path))
    sink = TensorBoardSink(writer)
    x = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0, math.nan, math.inf], dtype=torch.bfloat16)
    h = make_histogram(x, bins=4)
    sink.log_scalars({"activations/fc/mean": 0.125, "activations/fc/nan_count": 1.0}, step=7)
    sink.log_histograms({"activations/fc": h}, step=7)
    sink.log_text("model/structure", "**Net**", step=0)
    sink.flush()
    writer.close()
    tb = read_tb(tmp_path)
    assert tb.scalars("activations/fc/mean") == [(7, 0.125)]
    [event] = tb.histograms("activations/fc")
    v = event.histogram_value
    assert event.step == 7
    assert (v.min, v.max, v.num, v.sum, v.sum_squares) == (0.0, 4.0, 5.0, 10.0, 30.0)
    assert list(v.bucket_limit) == [1.0, 2.0, 3.0, 4.0]
    assert list(v.bucket) == [1.0, 1.0, 1.0, 2.0]
    [text] = tb.acc.Tensors("model/structure/text_summary")
    assert text.tensor_proto.string_val[0].decode() == "**Net**"


def test_fast_tensorboard_checksum_is_tensorboards_own_and_local(tmp_path: Path) -> None:
    """The C checksum of the library's writer gives TensorBoard's pure-Python values, byte for
    byte, and changes nothing process-wide: TensorBoard's own function stays in place."""
    pytest.importorskip("google_crc32c")
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c
    from tensorboard.summary.writer import record_writer
    from torch.utils.tensorboard import SummaryWriter

    from lightning_inspect.backends import tensorboard

    before = record_writer.masked_crc32c
    rng = np.random.default_rng(0)
    for size in (0, 1, 3, 8, 255, 4097, 65536):
        data = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
        assert tensorboard.masked_crc32c(data) == struct.pack("<I", masked_crc32c(data)), size
    # a file written with it reads back through TensorBoard's reader, which checks every CRC
    writer, users = SummaryWriter(str(tmp_path / "ours")), SummaryWriter(str(tmp_path / "users"))
    TensorBoardSink(writer).log_scalars({f"k{i}": float(i) for i in range(300)}, step=3)
    users.add_scalar("mine", 1.0, 0)
    writer.close(), users.close()
    assert read_tb(tmp_path / "ours").scalars("k299") == [(3, 299.0)]
    assert record_writer.masked_crc32c is before is masked_crc32c  # nothing patched
    assert "write" not in vars(users._get_file_writer().event_writer._async_writer._writer)
    make_trainer(
        1, logger=TensorBoardLogger(str(tmp_path / "fit")), callbacks=[ActivationMonitor()]
    ).fit(PlainMLP(), loader())
    assert record_writer.masked_crc32c is before


# ------------------------------------------------------------------------------------------
# MlflowSink and BackgroundSink
# ------------------------------------------------------------------------------------------


def test_mlflow_sink_metrics_histograms_and_text(
    mlflow_logger, mlflow_client, tmp_path: Path
) -> None:
    run_id = mlflow_logger.run_id
    sink = MlflowSink(mlflow_client, run_id, owner="TestMonitor", metrics="all")
    many = {f"weights/p{i}/mean": float(i) for i in range(1203)}  # more than one log_batch
    many["activations/blocks[0]/mean"] = -1.0
    many["activations/nan/mean"] = math.nan
    sink.log_scalars(many, step=2)
    sink.log_scalars({"weights/p0/mean": 10.0}, step=4)
    g = torch.Generator().manual_seed(0)
    for step in (2, 4):
        sink.log_histograms(
            {"activations/fc": make_histogram(torch.randn(50, generator=g) + step)}, step=step
        )
    sink.log_text("model/structure", "**Net**", step=0)
    sink.flush()

    assert mlflow_history(mlflow_client, run_id, "weights/p0/mean") == [(2, 0.0), (4, 10.0)]
    assert mlflow_history(mlflow_client, run_id, "weights/p1202/mean") == [(2, 1202.0)]
    assert mlflow_history(mlflow_client, run_id, "activations/blocks_0_/mean") == [(2, -1.0)]
    assert math.isnan(mlflow_history(mlflow_client, run_id, "activations/nan/mean")[0][1])
    run = mlflow_client.get_run(run_id)
    assert len([k for k in run.data.metrics if k.startswith("weights/p")]) == 1203

    out = tmp_path / "dl"
    out.mkdir()
    spool = mlflow_client.download_artifacts(
        run_id, "lightning_inspect/histograms/TestMonitor.jsonl", str(out)
    )
    lines = [json.loads(line) for line in Path(spool).read_text().splitlines()]
    assert [(d["key"], d["step"], sum(d["counts"])) for d in lines] == [
        ("activations/fc", 2, 50),
        ("activations/fc", 4, 50),
    ]
    png = mlflow_client.download_artifacts(
        run_id, "lightning_inspect/histograms/activations/fc.png", str(out)
    )
    assert Path(png).read_bytes()[:4] == b"\x89PNG"
    md = mlflow_client.download_artifacts(run_id, "lightning_inspect/model/structure.md", str(out))
    assert Path(md).read_text() == "**Net**"


class SlowRecordingSink(MemorySink):
    name = "slow"

    def __init__(self) -> None:
        super().__init__()
        self.threads: set[str] = set()

    def log_scalars(self, values: Mapping[str, float], step: int) -> None:
        self.threads.add(threading.current_thread().name)
        super().log_scalars(values, step)


def test_background_sink_keeps_order_and_close_waits() -> None:
    inner = SlowRecordingSink()
    sink = BackgroundSink(inner)
    for step in range(200):
        sink.log_scalars({"k": float(step)}, step)
    sink.flush()  # queued, not waited for
    sink.close()
    assert inner.steps("k") == list(range(200))
    assert inner.flushes == 2  # the one asked for, and close's own
    assert threading.current_thread().name not in inner.threads
    assert not sink._worker.is_alive()


def test_background_sink_over_failing_backend(tmp_path: Path) -> None:
    sink = BackgroundSink(FailingSink(), fallback_dir=tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sink.log_scalars({"k": 1.0}, 0)
        sink.log_scalars({"k": 2.0}, 1)
        sink.flush()
        sink.close()
    assert len(_runtime_warnings(caught)) == 1
    lines = [json.loads(line) for line in sink.fallback_path.read_text().splitlines()]
    assert [line.get("step") for line in lines if line["call"] == "log_scalars"] == [0, 1]


# ------------------------------------------------------------------------------------------
# Backend selection
# ------------------------------------------------------------------------------------------


def test_check_backends() -> None:
    assert check_backends("X", None) is None
    assert check_backends("X", "mlflow") == ("mlflow",)
    mem = MemorySink()
    assert check_backends("X", ["tensorboard", mem]) == ("tensorboard", mem)
    with pytest.raises(
        ConfigError,
        match=r"X\(backends=\['tensorbord'\]\): unknown backend 'tensorbord'.*Did you mean 'tensorboard'",
    ):
        check_backends("X", ["tensorbord"])
    with pytest.raises(ConfigError, match=r"X\(backends=\[3\]\)"):
        check_backends("X", [3])


def test_resolve_sinks_from_the_trainers_loggers(tb_logger, mlflow_logger) -> None:
    trainer = make_trainer(1, logger=[tb_logger, mlflow_logger])
    sinks = resolve_sinks(trainer, None, owner="WeightMonitor")
    try:
        assert [s.name for s in sinks] == ["tensorboard", "mlflow"]
        assert isinstance(sinks[0], GuardedSink) and isinstance(sinks[1], MlflowRunSink)
        only = resolve_sinks(trainer, ("mlflow",), owner="GradientMonitor")
        assert [s.name for s in only] == ["mlflow"]
        assert only[0].run is sinks[1].run  # one writer for the fit's run
        mem = MemorySink()
        [given] = resolve_sinks(trainer, (mem,), owner="WeightMonitor")
        assert given.name == "memory" and isinstance(given, GuardedSink) and given.inner is mem
    finally:
        for s in sinks + only:
            getattr(s, "close", lambda: None)()
    with pytest.raises(
        BackendError,
        match=r"WeightMonitor\(backends=\['mlflow'\]\): backend 'mlflow' needs a MLFlowLogger",
    ):
        resolve_sinks(make_trainer(1, logger=tb_logger), ("mlflow",), owner="WeightMonitor")
    with pytest.warns(RuntimeWarning, match=r"X: the Trainer has no logger"):
        assert resolve_sinks(make_trainer(1, logger=False), None, owner="X") == []


def test_memory_sink_as_backend_in_training() -> None:
    sink = MemorySink()
    make_trainer(
        2, callbacks=[WeightMonitor(every_n_steps=1, backends=[sink], stats=["mean"])]
    ).fit(PlainMLP(), loader())
    assert sink.steps("weights/net.0.weight/mean") == [0, 1]
    assert sink.steps("weights/net.0.weight/update_ratio") == [0, 1]
    assert sink.histograms["weights/net.0.weight"][0][1].num == 30
    assert sink.flushes >= 1


class ThreadCensus(Callback):
    """Notes the library's threads alive at the end of every training batch."""

    def __init__(self) -> None:
        self.seen: list[list[str]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        names = [t.name for t in threading.enumerate() if t.name.startswith("lightning-inspect")]
        self.seen.append(sorted(names))


def test_the_monitors_of_a_fit_share_one_mlflow_writer(
    mlflow_logger, mlflow_client, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import pandas as pd
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    batches: list[list[str]] = []  # the metric keys of every log_batch the SQLite store receives
    real_log_batch = SqlAlchemyStore.log_batch

    def counted(self, run_id, metrics, params, tags):  # the real store, its calls noted
        batches.append([m.key for m in metrics])
        return real_log_batch(self, run_id, metrics, params, tags)

    monkeypatch.setattr(SqlAlchemyStore, "log_batch", counted)
    census = ThreadCensus()
    monitors = [
        ActivationMonitor(every_n_steps=1, stats=["mean", "max"]),
        GradientMonitor(every_n_steps=1, stats=["mean", "max"]),
        WeightMonitor(every_n_steps=1, stats=["mean", "max"]),
    ]
    make_trainer(4, logger=mlflow_logger, callbacks=[census, *monitors]).fit(PlainMLP(), loader())

    # One worker thread for the three monitors, during the whole fit; none after it.
    assert census.seen == [["lightning-inspect-mlflow"]] * 4
    assert not [t for t in threading.enumerate() if t.name.startswith("lightning-inspect")]
    # One log_batch per logged step carries the headline metrics of all three monitors.
    ours = [keys for keys in batches if any(k.startswith("summary/") for k in keys)]
    assert len(ours) == 4
    for keys in ours:
        assert {
            "summary/activations/max",
            "summary/param_grads/max",
            "summary/weights/max",
            "param_grads/global_norm",
        } <= set(keys)
    run_id = mlflow_logger.run_id
    # Each monitor keeps its own table; the headline maxima are those of its table's rows.
    tables = {}
    for owner in ("ActivationMonitor", "GradientMonitor", "WeightMonitor"):
        path = mlflow_client.download_artifacts(
            run_id, f"lightning_inspect/stats/{owner}.csv", str(tmp_path)
        )
        tables[owner] = pd.read_csv(path)
    kinds = {
        "ActivationMonitor": ("activations",),
        "WeightMonitor": ("weights",),
        "GradientMonitor": ("param_grads", "activation_grads"),
    }
    for owner, own in kinds.items():
        table = tables[owner]
        assert table["key"].str.startswith(tuple(f"{k}/" for k in own)).all()
        kind = own[0]
        rows = table[table["key"].str.startswith(f"{kind}/") & table["key"].str.endswith("/max")]
        expected = [
            (int(step), float(np.max(group["value"].to_numpy())))
            for step, group in rows.groupby("step")
        ]
        assert mlflow_history(mlflow_client, run_id, f"summary/{kind}/max") == expected


class RecoveringSink(MemorySink):
    """Refuses its first ``failures`` calls, then accepts everything."""

    name = "recovering"

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.left = failures

    def log_scalars(self, values: Mapping[str, float], step: int) -> None:
        if self.left > 0:
            self.left -= 1
            raise TimeoutError("server busy")
        super().log_scalars(values, step)


def test_guarded_sink_resends_refused_values_after_recovery(tmp_path: Path) -> None:
    inner = RecoveringSink(failures=2)
    sink = GuardedSink(inner, fallback_dir=tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(4):
            sink.log_scalars({"k": float(step)}, step)
    assert len(_runtime_warnings(caught)) == 1
    assert sorted(inner.scalars["k"]) == [
        (s, float(s)) for s in range(4)
    ]  # each value exactly once
    lines = [json.loads(line) for line in sink.fallback_path.read_text().splitlines()]
    assert [line["step"] for line in lines] == [0, 1]  # what was refused is also on disk


# Regression test (fixed in baec00b): a backend named twice got two sinks, every value logged twice.
def test_backend_named_twice_logs_once(tb_logger) -> None:
    trainer = make_trainer(1, logger=tb_logger)
    assert (
        len(resolve_sinks(trainer, check_backends("X", ["tensorboard", "tensorboard"]), owner="X"))
        == 1
    )


class FlakyArtifacts:
    """An MlflowClient whose first artifact upload fails (a transient outage)."""

    def __init__(self, client: Any) -> None:
        self._client = client
        self.refused = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def log_artifact(self, *args: Any, **kwargs: Any) -> None:
        if self.refused == 0:
            self.refused += 1
            raise ConnectionError("artifact store unreachable")
        self._client.log_artifact(*args, **kwargs)


def test_histogram_artifacts_are_uploaded_after_a_failed_flush(
    mlflow_logger, mlflow_client, tmp_path: Path
) -> None:
    run_id = mlflow_logger.run_id
    sink = GuardedSink(
        MlflowSink(FlakyArtifacts(mlflow_client), run_id, owner="Flaky"),
        fallback_dir=tmp_path,
    )
    sink.log_histograms({"activations/fc": make_histogram(torch.arange(6.0))}, step=0)
    with pytest.warns(RuntimeWarning, match="artifact store unreachable"):
        sink.flush()  # refused
    sink.flush()  # the end of fit: the store is back
    names = [f.path for f in mlflow_client.list_artifacts(run_id, "lightning_inspect/histograms")]
    assert "lightning_inspect/histograms/Flaky.jsonl" in names


def test_histogram_picture_puts_high_values_at_the_top(tmp_path: Path) -> None:
    """The MLflow picture of a key: value grows upwards, step to the right, bright = many values."""
    from PIL import Image

    from lightning_inspect.backends.mlflow import render_histogram_pictures
    from lightning_inspect.backends.pictures import MARGIN, PLOT
    from lightning_inspect.core.keys import MlflowKeys

    spool = tmp_path / "h.jsonl"
    with spool.open("w") as f:
        for step in range(10):  # every value in the top bin for steps 0-4, the bottom bin after
            counts = [0] * 8
            counts[7 if step < 5 else 0] = 100
            f.write(
                json.dumps(
                    {"key": "activations/fc", "step": step, "lo": -1.0, "hi": 1.0, "counts": counts}
                )
                + "\n"
            )
    [path] = render_histogram_pictures(spool, tmp_path / "pictures", MlflowKeys())
    image = np.asarray(Image.open(path).convert("L"), dtype=float)
    left, top, right, bottom = MARGIN
    width, height = PLOT
    assert image.shape == (top + height + bottom, left + width + right)
    plot = image[top : top + height, left : left + width]
    band = height // 8  # one bin of the eight
    first, last = slice(0, width // 2 - 4), slice(width // 2 + 4, width)  # steps 0-4, steps 5-9
    top_early, bottom_early = plot[:band, first].mean(), plot[-band:, first].mean()
    top_late, bottom_late = plot[:band, last].mean(), plot[-band:, last].mean()
    assert top_early > bottom_early + 100  # early steps: every value in the top bin, drawn on top
    assert bottom_late > top_late + 100  # later steps: every value in the bottom bin


# ------------------------------------------------------------------------------------------
# The fallback file: private, never through a planted link; the end-of-fit deadline
# ------------------------------------------------------------------------------------------


def test_fallback_file_is_private_and_does_not_follow_a_planted_link(tmp_path: Path) -> None:
    import os

    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    # The name the fallback file used to have, planted as a link by someone else.
    (tmp_path / f"lightning_inspect_unsent_flaky_{os.getpid()}.jsonl").symlink_to(victim)
    sinks = [GuardedSink(FailingSink(), fallback_dir=tmp_path) for _ in range(2)]
    assert sinks[0].fallback_path is None  # nothing is created before a refusal
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i, sink in enumerate(sinks):
            sink.log_scalars({"k": float(i)}, step=i)
    assert victim.read_text() == "precious\n"
    paths = [s.fallback_path for s in sinks]
    assert paths[0] != paths[1]  # one file per sink, never shared
    for i, path in enumerate(paths):
        assert path is not None and path.parent == tmp_path and not path.is_symlink()
        assert path.stat().st_mode & 0o777 == 0o600
        lines = path.read_text().splitlines()
        assert [json.loads(line)["values"] for line in lines] == [{"k": float(i)}]


def test_unwritable_fallback_file_warns_once(tmp_path: Path) -> None:
    (tmp_path / "taken").write_text("a file, not a directory")
    sink = GuardedSink(FailingSink(), fallback_dir=tmp_path / "taken")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(3):
            sink.log_scalars({"k": 1.0}, step)
    messages = _runtime_warnings(caught)
    assert len(messages) == 2 and "fallback file could not be written" in messages[0]
    assert "kept in memory only" in messages[1]
    assert sink.inner.calls == 3 and sink.failed and sink.fallback_path is None


class BlockingSink(MemorySink):
    """A backend whose calls hang until ``release`` is set (a server in its retry back-off)."""

    name = "stuck"

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()
        self.calls = 0

    def log_scalars(self, values: Mapping[str, float], step: int) -> None:
        self.calls += 1
        self.release.wait(60)
        super().log_scalars(values, step)


def test_stuck_backends_share_one_end_of_fit_deadline(tmp_path: Path) -> None:
    import time

    from lightning_inspect.backends import EndOfFit

    deadline = EndOfFit(budget_s=1.0)
    inners = [BlockingSink() for _ in range(3)]
    sinks = [BackgroundSink(inner, fallback_dir=tmp_path, deadline=deadline) for inner in inners]
    for sink in sinks:
        for step in range(5):
            sink.log_scalars({"k": float(step)}, step)
    start = time.monotonic()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for sink in sinks:
            sink.close()
    elapsed = time.monotonic() - start
    assert elapsed < 1.9, elapsed  # one budget for all three, not one each
    messages = _runtime_warnings(caught)
    assert len(messages) == 3 and all("end-of-fit deadline" in m for m in messages)
    for sink in sinks:  # step 0 was in flight (it may still arrive), steps 1-4 queued: all on disk
        lines = [json.loads(line) for line in sink.fallback_path.read_text().splitlines()]
        assert [line["step"] for line in lines] == [0, 1, 2, 3, 4]
    for inner in inners:
        inner.release.set()
    for sink, inner in zip(sinks, inners, strict=True):
        sink._worker.join(10)
        assert not sink._worker.is_alive()
        assert inner.calls == 1 and inner.steps("k") == [0]  # no call after the deadline


class RefusingArtifacts:
    """An MlflowClient whose artifact uploads always fail."""

    def __init__(self, client: Any) -> None:
        self._client = client

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def log_artifact(self, *args: Any, **kwargs: Any) -> None:
        raise ConnectionError("artifact store unreachable")


def test_histograms_never_uploaded_are_in_the_fallback_file(
    mlflow_logger, mlflow_client, tmp_path: Path
) -> None:
    inner = MlflowSink(RefusingArtifacts(mlflow_client), mlflow_logger.run_id, owner="M")
    sink = GuardedSink(inner, fallback_dir=tmp_path)
    x = {step: torch.randn(40, generator=torch.Generator().manual_seed(step)) for step in (0, 1)}
    for step, values in x.items():
        sink.log_histograms({"activations/fc": make_histogram(values)}, step=step)
    with pytest.warns(RuntimeWarning, match="artifact store unreachable"):
        sink.flush()
    sink.close()
    records = [json.loads(line) for line in sink.fallback_path.read_text().splitlines()]
    kept = [r for r in records if r["call"] == "log_histograms"]
    assert [r["step"] for r in kept] == [0, 1]
    for r in kept:
        h = r["histograms"]["activations/fc"]
        values = x[r["step"]].numpy()
        counts, _ = np.histogram(values, bins=8, range=(values.min(), values.max()))
        assert h["counts"] == counts.tolist()
        assert h["lo"] == pytest.approx(values.min()) and h["hi"] == pytest.approx(values.max())


def test_table_values_never_uploaded_are_in_the_fallback_file(
    mlflow_logger, mlflow_client, tmp_path: Path
) -> None:
    """Headline metrics went through, the table of every value did not: the values are kept."""
    inner = MlflowSink(RefusingArtifacts(mlflow_client), mlflow_logger.run_id, owner="M")
    sink = GuardedSink(inner, fallback_dir=tmp_path)
    logged = {0: {"weights/a/mean": 0.1, "weights/b/mean": -2.5}, 1: {"weights/a/mean": 1e-30}}
    for step, values in logged.items():
        sink.log_scalars(values, step=step)
    assert mlflow_client.get_run(mlflow_logger.run_id).data.metrics  # the headline went through
    with pytest.warns(RuntimeWarning, match="artifact store unreachable"):
        sink.flush()
    sink.close()
    records = [json.loads(line) for line in sink.fallback_path.read_text().splitlines()]
    kept = {r["step"]: r["values"] for r in records if r["call"] == "log_scalars"}
    assert kept == logged


def test_keys_longer_than_a_file_name_get_short_artifact_names(
    mlflow_logger, mlflow_client
) -> None:
    run_id = mlflow_logger.run_id
    sink = GuardedSink(MlflowSink(mlflow_client, run_id, owner="Long"))
    stem = "activations/" + "é" * 200  # 400 bytes in UTF-8
    hists = {
        stem + "a": make_histogram(torch.arange(8.0)),
        stem + "b": make_histogram(torch.arange(4.0)),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a failed upload would warn
        sink.log_histograms(hists, step=0)
        sink.log_text(stem + "a", "text", step=0)
        sink.flush()
    listed = mlflow_client.list_artifacts
    pictures = [f.path for f in listed(run_id, "lightning_inspect/histograms/activations")]
    texts = [f.path for f in listed(run_id, "lightning_inspect/activations")]
    assert len(pictures) == 2 and len(texts) == 1
    for path in pictures + texts:
        name = path.rsplit("/", 1)[-1]
        assert len(name.encode()) <= 255 and name.startswith("é" * 100)
    assert not sink.failed


def test_scalar_summary_is_what_protobuf_builds_for_every_kind_of_value() -> None:
    from tensorboard.compat.proto.summary_pb2 import Summary

    from lightning_inspect.backends.tensorboard import scalar_summary

    values = {
        "a/x/mean": 0.1,
        "a/x/max": 1e300,
        "a/x/min": -1e300,
        "a/y/std": math.nan,
        "a/y/max": math.inf,
        "a/y/min": 5e-324,
        "a/é/mean": -0.0,
        "t" * 300: 3.0,
        "": 2.0,
    }
    cache: dict[str, bytes] = {}
    for _ in range(2):  # the second time from the cache
        ours = scalar_summary(values, cache)
        theirs = Summary(value=[Summary.Value(tag=k, simple_value=v) for k, v in values.items()])
        assert ours.SerializeToString() == theirs.SerializeToString()
    assert set(cache) == set(values)


def test_histogram_summary_is_what_protobuf_builds() -> None:
    from tensorboard.compat.proto.summary_pb2 import HistogramProto, Summary

    from lightning_inspect.backends.tensorboard import histogram_summary

    g = torch.Generator().manual_seed(0)
    wide = torch.randn(3, generator=g, dtype=torch.float64) * 1e300
    histograms = {
        "a/x": make_histogram(torch.randn(1000, generator=g)),
        "a/zero": make_histogram(torch.zeros(5)),
        "b/" + "y" * 200: make_histogram(wide),
    }
    cache: dict[str, bytes] = {}
    for _ in range(2):
        ours = histogram_summary(histograms, cache)
        theirs = Summary(
            value=[
                Summary.Value(
                    tag=k,
                    histo=HistogramProto(
                        min=h.min,
                        max=h.max,
                        num=float(h.num),
                        sum=h.sum,
                        sum_squares=h.sum_squares,
                        bucket_limit=h.edges[1:].tolist(),
                        bucket=h.counts.tolist(),
                    ),
                )
                for k, h in histograms.items()
            ]
        )
        assert ours.SerializeToString() == theirs.SerializeToString()


class FlakyBatches(FlakyArtifacts):
    """An MlflowClient whose first ``log_batch`` fails (a tracking server that was away)."""

    def log_batch(self, *args: Any, **kwargs: Any) -> None:
        if self.refused == 0:
            self.refused += 1
            raise ConnectionError("tracking server unreachable")
        self._client.log_batch(*args, **kwargs)


def test_a_refused_step_sent_again_is_in_the_table_once(
    mlflow_logger, mlflow_client, mlflow_store, tmp_path: Path
) -> None:
    from lightning_inspect import read_stats

    run_id = mlflow_logger.run_id
    inner = MlflowSink(FlakyBatches(mlflow_client), run_id, owner="Flaky")
    sink = GuardedSink(inner, fallback_dir=tmp_path)
    with pytest.warns(RuntimeWarning, match="the mlflow backend failed"):
        sink.log_scalars({"weights/w/mean": 1.0, "weights/w/max": 2.0}, step=0)  # refused, kept
    sink.log_scalars({"weights/w/mean": 3.0, "weights/w/max": 4.0}, step=1)  # accepted: 0 re-sent
    sink.flush()
    df = read_stats(run_id, tracking_uri=mlflow_store["tracking_uri"])
    assert list(zip(df.step, df.stat, df.value, strict=True)) == [
        (0, "max", 2.0),
        (0, "mean", 1.0),
        (1, "max", 4.0),
        (1, "mean", 3.0),
    ]
    assert mlflow_history(mlflow_client, run_id, "summary/weights/max") == [(0, 2.0), (1, 4.0)]
    sink.close()


class Unavailable(BaseHTTPRequestHandler):
    """A tracking server that answers every request with 503 and counts them."""

    requests = 0

    def _refuse(self) -> None:
        type(self).requests += 1
        self.send_response(503)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_POST = do_PUT = _refuse

    def log_message(self, *args: Any) -> None:
        pass


def test_the_librarys_mlflow_calls_have_their_own_retry_budget(
    monkeypatch: pytest.MonkeyPatch, mlflow_client
) -> None:
    from mlflow.entities import Metric
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from lightning_inspect.backends.mlflow import HTTP_BUDGET, BoundedClient, bounded_client

    # The user's own settings for MLflow's calls: kept for theirs, not used for the library's.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
    server = ThreadingHTTPServer(("127.0.0.1", 0), Unavailable)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        users = MlflowClient(f"http://127.0.0.1:{server.server_address[1]}")
        ours = bounded_client(users)
        assert isinstance(ours, BoundedClient)
        metric = Metric("k", 1.0, 0, 0)
        Unavailable.requests = 0
        with pytest.raises(MlflowException):
            ours.log_batch("run", metrics=[metric])
        assert Unavailable.requests == 1 + HTTP_BUDGET["max_retries"]
        Unavailable.requests = 0
        with pytest.raises(MlflowException):
            ours.log_text("run", "text", "lightning_inspect/a.md")  # get_run first: refused
        assert Unavailable.requests == 1 + HTTP_BUDGET["max_retries"]
        Unavailable.requests = 0
        with pytest.raises(MlflowException):
            users.log_batch("run", metrics=[metric])
        assert Unavailable.requests == 1 + 3
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
    assert bounded_client(mlflow_client) is mlflow_client  # a database store: MLflow's own calls

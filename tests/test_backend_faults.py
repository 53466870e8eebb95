"""A real MLflow server that dies mid-run: one warning, training goes on, nothing is lost."""

from __future__ import annotations

import glob
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import MLFlowLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from lightning_inspect import ActivationMonitor

KILL_AT_STEP = 3
RESTART_AT_STEP = 6
STEPS = 9


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """``mlflow server`` on loopback, started and stopped by the test."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        mlflow = str(Path(sys.executable).with_name("mlflow"))
        self.proc = subprocess.Popen(
            [
                mlflow,
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--workers",
                "1",
                "--backend-store-uri",
                f"sqlite:///{self.root}/server.db",
                "--artifacts-destination",
                str(self.root / "artifacts"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        self.stop()
        raise RuntimeError("mlflow server did not start within 90 s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        self.proc = None


class ServerOutage(Callback):
    """Kills the server before step KILL_AT_STEP and brings it back before RESTART_AT_STEP."""

    def __init__(self, server: MlflowServer) -> None:
        self.server = server

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == KILL_AT_STEP and self.server.proc is not None:
            self.server.stop()
        if trainer.global_step == RESTART_AT_STEP and self.server.proc is None:
            self.server.start()


class Net(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def training_step(self, batch, batch_idx):
        return self.fc(batch[0]).square().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


@pytest.mark.slow
def test_mlflow_server_outage_warns_once_and_loses_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The library's own calls have their bounded budget; these keep Lightning's MLFlowLogger calls
    # (MLflow's settings) from stalling the test while the server is down.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    server = MlflowServer(tmp_path)
    server.start()
    try:
        mlflow_logger = MLFlowLogger(tracking_uri=server.url, experiment_name="outage")
        trainer = L.Trainer(
            max_steps=STEPS,
            accelerator="cpu",
            log_every_n_steps=1000,
            logger=[TensorBoardLogger(tmp_path / "tb", name="", version=""), mlflow_logger],
            callbacks=[
                ServerOutage(server),
                ActivationMonitor(every_n_steps=1, stats=["mean"], mlflow_metrics="all"),
            ],
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
        )
        data = torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(torch.randn(64, 4)), batch_size=4
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.fit(Net(), data)
        ours = [
            w for w in caught if "lightning-inspect: the mlflow backend failed" in str(w.message)
        ]
        assert len(ours) == 1, [str(w.message) for w in caught]
        fallback = Path(str(ours[0].message).split("written to ")[1].split(" and sent again")[0])
        assert fallback.exists()

        # TensorBoard received every step, outage or not.
        events = glob.glob(str(tmp_path / "tb" / "events.out.tfevents.*"))
        acc = EventAccumulator(events[0], size_guidance={"scalars": 0})
        acc.Reload()
        assert [e.step for e in acc.Scalars("activations/fc/mean")] == list(range(STEPS))

        # The fallback file names what the outage refused; once the server was back, it was re-sent:
        # the server holds every step.
        from mlflow.tracking import MlflowClient

        refused = set()
        for line in fallback.read_text().splitlines():
            record = json.loads(line)
            if record["call"] == "log_step" and "activations/fc/mean" in record["values"]:
                refused.add(record["step"])
        assert refused, "the outage must have refused some steps"
        history = MlflowClient(server.url).get_metric_history(
            mlflow_logger.run_id, "activations/fc/mean"
        )
        assert sorted(m.step for m in history) == list(range(STEPS))
    finally:
        server.stop()


DEAD_AT_STEP = 30
LONG_STEPS = 80


class KillServer(Callback):
    """SIGKILLs the server before step DEAD_AT_STEP; notes when the last step ended."""

    def __init__(self, server: MlflowServer) -> None:
        self.server = server
        self.last_step_end = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == DEAD_AT_STEP:
            self.server.stop()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.last_step_end = time.monotonic()


class UnfinishedMLFlowLogger(MLFlowLogger):
    """Lightning's own end-of-run call waits for MLflow's retries; it is not the library's."""

    def finalize(self, status: str = "success") -> None:
        pass


@pytest.mark.slow
def test_a_dead_server_delays_the_end_of_fit_by_one_shared_deadline(tmp_path: Path) -> None:
    import threading

    from lightning_inspect import GradientMonitor, RunRecord, WeightMonitor
    from lightning_inspect.backends.base import END_OF_FIT_BUDGET_S
    from lightning_inspect.backends.mlflow import LONGEST_CALL_S

    server = MlflowServer(tmp_path)
    server.start()
    try:
        mlflow_logger = UnfinishedMLFlowLogger(tracking_uri=server.url, experiment_name="dead")
        killer = KillServer(server)
        monitors = [
            monitor(every_n_steps=1, stats=["mean"])
            for monitor in (ActivationMonitor, GradientMonitor, WeightMonitor)
        ]
        record = RunRecord(
            git=False,
            packages=False,
            model=False,
            fingerprint_items=0,
            output_dir=tmp_path / "record",
        )
        trainer = L.Trainer(
            max_steps=LONG_STEPS,
            accelerator="cpu",
            log_every_n_steps=1000,
            logger=[mlflow_logger],
            callbacks=[killer, *monitors, record],
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
        )
        data = torch.utils.data.TensorDataset(torch.randn(64, 4))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.fit(Net(), torch.utils.data.DataLoader(data, batch_size=4))
        fit_returned = time.monotonic()
        end_of_fit = fit_returned - killer.last_step_end
        assert trainer.global_step == LONG_STEPS
        # MLflow retries a refused connection for about four minutes per call with its defaults;
        # the library's own calls have a bounded budget and it waits once, at most, for all its
        # backends and the run record together.
        assert end_of_fit < END_OF_FIT_BUDGET_S + 10, end_of_fit
        # No thread of the library outlives fit by more than one bounded call.
        alive = [t for t in threading.enumerate() if t.name.startswith("lightning-inspect")]
        while alive and time.monotonic() < fit_returned + LONGEST_CALL_S + 2:
            alive[0].join(0.1)
            alive = [t for t in alive if t.is_alive()]
        assert not alive, [t.name for t in alive]

        messages = [str(w.message) for w in caught]
        record_dir = str(tmp_path / "record")
        assert any(
            m.startswith("RunRecord: the mlflow backend failed") and record_dir in m
            for m in messages
        ), messages
        # Every monitor's values: on the server (before it died) or in a fallback file that a
        # warning names.
        files = {
            Path(p)
            for m in messages
            if m.startswith("lightning-inspect:")
            for p in re.findall(r"(/\S+\.jsonl)", m)
        }
        kept: dict[str, set[int]] = {}
        for path in files:
            assert path.stat().st_mode & 0o777 == 0o600
            for line in path.read_text().splitlines():
                entry = json.loads(line)
                for key in entry.get("values", {}):
                    kept.setdefault(key, set()).add(entry["step"])
        from mlflow.tracking import MlflowClient

        server.start()  # to read back what arrived before the kill
        client = MlflowClient(server.url)
        for key in ("activations/fc/mean", "param_grads/fc.weight/mean", "weights/fc.weight/mean"):
            arrived = {m.step for m in client.get_metric_history(mlflow_logger.run_id, key)}
            assert arrived | kept.get(key, set()) == set(range(LONG_STEPS)), key
            assert kept.get(key), key  # the outage refused some
    finally:
        server.stop()

"""Soak test: a deep model, a long run, every monitor, many metrics per step, real backends.

Not part of the test suite. Trains a 200-layer MLP (``--layers`` x (Linear(width, width) + ReLU))
on synthetic data with ActivationMonitor, GradientMonitor, WeightMonitor (all statistics,
histograms on) and GraphMonitor into a TensorBoardLogger and a real ``mlflow server`` that the
script starts on 127.0.0.1 (a free port, SQLite backend store and artifact destination in a
temporary directory) and stops at the end. A short plain run (same loggers, no monitor) comes
first, as the reference speed.

Prints:
    steps/s without and with inspection, and the time of logged and unlogged steps;
    metrics per logging step (scalars and histograms) and the total handed to each backend;
    the MLflow queue length at the last step and the time the end-of-fit flush took
    (queue drained, histogram data uploaded);
    what the MLflow server holds (distinct metric keys, history length of one key, artifacts);
    the cost of MLflow's histogram pictures (see --pictures);
    RSS at the start and at 10 %, 50 % and 100 % of the run, and the peak (is memory flat?);
    TensorBoard event-file bytes per logged step;
    the number of warnings (and the distinct lightning-inspect ones) and backend failures.

MLflow's histogram pictures: the MLflow backend renders one PNG per histogram key at the end of
fit (~0.3 s per key on one CPU core; 1,200 keys here). By default this script gives the monitors
the library's MLflow sink with rendering off, then renders a sample of keys from the uploaded
histogram data and extrapolates; ``--pictures all`` keeps the library's default (and shows how
the end-of-fit wait behaves when rendering takes longer than it).

Torch runs with one intra-op thread by default: with small matrices on a shared machine, more
threads mostly spin against other processes and make steps several times slower.

Usage:
    python benchmarks/soak.py                  # 2000 steps, log every 200; ~4-5 min on 2 CPU cores
    python benchmarks/soak.py --quick          # 100 steps, log every 50; ~1-1.5 min (server start included)
    python benchmarks/soak.py --steps 5000 --every 10 --json soak.json
    python benchmarks/soak.py --no-mlflow      # TensorBoard only (no server)
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import logging
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from unittest import mock

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import MLFlowLogger, TensorBoardLogger
from torch import nn

from lightning_inspect import (
    ALL_STATS,
    ActivationMonitor,
    GradientMonitor,
    GraphMonitor,
    WeightMonitor,
)
from lightning_inspect.backends import mlflow as mlflow_backend
from lightning_inspect.backends.mlflow import MlflowSink
from lightning_inspect.core.stats import Histogram

try:
    import psutil
except ImportError:  # RSS then comes from /proc (Linux) or is not reported
    psutil = None


# ------------------------------------------------------------------------------------------------
# Model and data
# ------------------------------------------------------------------------------------------------


class _CycleBatches(torch.utils.data.IterableDataset):
    """Endless stream over a few pre-generated batches: no epoch boundary, no loading cost."""

    def __init__(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.batches = batches

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield from self.batches


class DeepMLP(pl.LightningModule):
    """``layers`` x (Linear(width, width) + ReLU), regression to a random target."""

    def __init__(self, layers: int, width: int, batch: int) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        for _ in range(layers):
            blocks += [nn.Linear(width, width), nn.ReLU()]
        self.net = nn.Sequential(*blocks)
        self.width = width
        self.batch = batch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
    ) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-4)

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        g = torch.Generator().manual_seed(1)
        batches = [
            (
                torch.randn(self.batch, self.width, generator=g),
                torch.randn(self.batch, self.width, generator=g),
            )
            for _ in range(4)
        ]
        return torch.utils.data.DataLoader(_CycleBatches(batches), batch_size=None)


# ------------------------------------------------------------------------------------------------
# MLflow server (loopback only, bounded waits)
# ------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """``mlflow server`` on 127.0.0.1 with its stores in ``root``; stopped by :meth:`stop`."""

    def __init__(self, root: Path, start_timeout_s: float = 120.0) -> None:
        self.root = root
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.start_timeout_s = start_timeout_s
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = root / "server.log"

    def start(self) -> None:
        mlflow = shutil.which("mlflow", path=str(Path(sys.executable).parent)) or shutil.which(
            "mlflow"
        )
        if mlflow is None:
            raise RuntimeError(
                "the `mlflow` command is not installed (pip install mlflow), or use --no-mlflow"
            )
        with self.log.open("wb") as log:
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
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        tail = self.log.read_text(errors="replace")[-2000:]
        self.stop()
        raise RuntimeError(
            f"mlflow server did not start within {self.start_timeout_s:.0f} s:\n{tail}"
        )

    def stop(self, timeout_s: float = 20.0) -> None:
        """SIGTERM the server's process group, SIGKILL it if still there after ``timeout_s``."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=timeout_s)
        self.proc = None


# ------------------------------------------------------------------------------------------------
# Measurement
# ------------------------------------------------------------------------------------------------


def rss_mib() -> float:
    """Resident set size of this process, MiB."""
    if psutil is not None:
        return psutil.Process().memory_info().rss / 2**20
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far, MiB (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


class CountingSink:
    """An extra backend that only counts what the monitors hand to their backends, per step."""

    name = "counting"

    def __init__(self) -> None:
        self.scalars: dict[int, int] = {}
        self.histograms: dict[int, int] = {}

    def log_scalars(self, values: Mapping[str, float], step: int) -> None:
        self.scalars[step] = self.scalars.get(step, 0) + len(values)

    def log_histograms(self, histograms: Mapping[str, Histogram], step: int) -> None:
        self.histograms[step] = self.histograms.get(step, 0) + len(histograms)

    def log_text(self, key: str, text: str, step: int) -> None:
        pass

    def flush(self) -> None:
        pass


class Timing(Callback):
    """Per-step wall time, RSS at chosen steps, and the MLflow queue at the last step.

    Put one instance first and one last in the callback list: ``first`` marks the start of each
    batch and of the end-of-fit work, ``last`` the end (so monitors' own work falls in between).
    """

    def __init__(
        self,
        steps: int,
        logged: set[int],
        monitors: list[Any],
        first: bool,
        peer: Timing | None = None,
    ) -> None:
        self.steps = steps
        self.logged = logged
        self.monitors = monitors
        self.first = first
        self.peer = peer
        self.batch_start: dict[int, float] = {}
        self.step_time: dict[int, float] = {}
        self.batch_end: dict[int, float] = {}
        self.rss: dict[str, float] = {}
        self.queue_at_end: int | None = None
        self.train_end: float = 0.0
        self.fit_started = 0.0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.first:
            self.fit_started = time.perf_counter()
            self.rss["start"] = rss_mib()

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.first:
            self.batch_start[trainer.global_step] = time.perf_counter()

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if self.first or self.peer is None:
            return
        step = trainer.global_step - 1
        self.batch_end[step] = now = time.perf_counter()
        self.step_time[step] = now - self.peer.batch_start[step]
        for fraction in (0.1, 0.5, 1.0):
            if step == max(0, int(self.steps * fraction) - 1):
                self.rss[f"{int(fraction * 100)}%"] = rss_mib()
        if step == self.steps - 1:
            self.queue_at_end = sum(
                s._queue.qsize() for m in self.monitors for s in m.sinks if hasattr(s, "_queue")
            )

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.train_end = time.perf_counter()


def _quiet() -> None:
    for name in ("lightning.pytorch", "lightning.fabric", "mlflow", "urllib3", "alembic"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
    # A server that stops answering must not stall the run for minutes.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")


def _loggers(root: Path, name: str, server: MlflowServer | None) -> list[Any]:
    loggers: list[Any] = [TensorBoardLogger(str(root / "tb"), name=name, version="")]
    if server is not None:
        loggers.append(MLFlowLogger(experiment_name=f"soak-{name}", tracking_uri=server.url))
    return loggers


def _trainer(steps: int, loggers: list[Any], callbacks: list[Callback]) -> pl.Trainer:
    return pl.Trainer(
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        logger=loggers,
        callbacks=callbacks,
        log_every_n_steps=10**9,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )


def plain_run(args: argparse.Namespace, root: Path, server: MlflowServer | None) -> float:
    """Steps/s of the same training without monitors (same loggers attached)."""
    torch.manual_seed(0)
    model = DeepMLP(args.layers, args.width, args.batch)
    first = Timing(args.plain_steps, set(), [], first=True)
    last = Timing(args.plain_steps, set(), [], first=False, peer=first)
    trainer = _trainer(args.plain_steps, _loggers(root, "plain", server), [first, last])
    trainer.fit(model)
    return _rate(last.batch_end, min(10, args.plain_steps // 5))


def _rate(batch_end: dict[int, float], first: int) -> float:
    """Steps per second from the end of step ``first`` to the end of the last step (whole loop)."""
    last = max(batch_end)
    return (last - first) / (batch_end[last] - batch_end[first])


def inspected_run(
    args: argparse.Namespace, root: Path, server: MlflowServer | None
) -> dict[str, Any]:
    torch.manual_seed(0)
    model = DeepMLP(args.layers, args.width, args.batch)
    counter = CountingSink()
    loggers = _loggers(root, "inspected", server)

    class NoPictures(MlflowSink):
        """The library's MLflow sink without the histogram pictures (sampled below instead)."""

        def flush(self) -> None:
            with mock.patch.object(mlflow_backend, "render_histogram_pictures", lambda *a: []):
                super().flush()

    def backends(owner: str) -> list[Any]:
        chosen: list[Any] = ["tensorboard", counter]
        if server is not None:
            # The library's own MLflow sink, given explicitly only to choose whether it renders.
            chosen.append(
                "mlflow"
                if args.pictures == "all"
                else NoPictures(loggers[1].experiment, loggers[1].run_id, owner, "all")
            )
        return chosen

    # Every value as an MLflow metric: the soak loads the tracking server as much as it can be.
    options: dict[str, Any] = {
        "every_n_steps": args.every,
        "stats": list(ALL_STATS),
        "histograms": True,
        "bins": args.bins,
        "mlflow_metrics": "all",
    }
    monitors = [  # default selection: every module that owns parameters (the Linear layers)
        ActivationMonitor(backends=backends("ActivationMonitor"), **options),
        GradientMonitor(backends=backends("GradientMonitor"), **options),
        WeightMonitor(backends=backends("WeightMonitor"), **options),
    ]
    graph = GraphMonitor(backends=["tensorboard"] + (["mlflow"] if server is not None else []))
    logged = {s for s in range(args.steps) if s % args.every == 0}
    first = Timing(args.steps, logged, monitors, first=True)
    last = Timing(args.steps, logged, monitors, first=False, peer=first)
    trainer = _trainer(args.steps, loggers, [first, *monitors, graph, last])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t0 = time.perf_counter()
        trainer.fit(model)
        fit_s = time.perf_counter() - t0
    flush_s = last.train_end - first.train_end  # the monitors' end-of-fit flush, between the two

    times = last.step_time
    logged_t = [t for s, t in times.items() if s in logged and s > 0]
    plain_t = [t for s, t in times.items() if s not in logged and s >= 10]
    events = glob.glob(str(root / "tb" / "inspected" / "events.out.tfevents.*"))
    event_bytes = sum(os.path.getsize(f) for f in events)

    ours = [
        w for w in caught if "lightning-inspect" in str(w.message) or "Monitor" in str(w.message)
    ]
    result: dict[str, Any] = {
        "steps": args.steps,
        "logged_steps": len(logged),
        "fit_s": fit_s,
        "steps_per_s": _rate(last.batch_end, 0),
        "logged_step_ms": 1000 * sum(logged_t) / max(len(logged_t), 1),
        "unlogged_step_ms": 1000 * sum(plain_t) / max(len(plain_t), 1),
        "scalars_per_logged_step": max(counter.scalars.values(), default=0),
        "histograms_per_logged_step": max(counter.histograms.values(), default=0),
        "scalars_total": sum(counter.scalars.values()),
        "histograms_total": sum(counter.histograms.values()),
        "mlflow_queue_at_last_step": last.queue_at_end,
        "end_flush_s": flush_s,
        "rss_mib": {"start": first.rss.get("start"), **last.rss},
        "peak_rss_mib": peak_rss_mib(),
        "event_file_bytes": event_bytes,
        "event_bytes_per_logged_step": event_bytes / max(len(logged), 1),
        "warnings": len(caught),
        "lightning_inspect_warnings": len(ours),
        "distinct_lightning_inspect_warnings": sorted({str(w.message)[:200] for w in ours}),
        "backend_failures": sum(
            getattr(getattr(s, "guarded", s), "failures", 0) for m in monitors for s in m.sinks
        ),
    }
    if server is not None:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(server.url)
        run_id = loggers[1].run_id
        keys = client.get_run(run_id).data.metrics
        probe_key = next(
            iter(sorted(k for k in keys if k.startswith("weights/") and k.endswith("/mean"))), None
        )
        result["mlflow_server_metric_keys"] = len(keys)
        result["mlflow_server_history_of_one_key"] = (
            [probe_key, len(client.get_metric_history(run_id, probe_key))] if probe_key else None
        )
        result["mlflow_artifacts"] = len(
            client.list_artifacts(run_id, "lightning_inspect/histograms")
        )
        if args.pictures == "sample":
            result["picture_s_per_key"], result["picture_keys"] = _picture_cost(
                client, run_id, root
            )
    return result


def _picture_cost(client: Any, run_id: str, root: Path, sample: int = 10) -> tuple[float, int]:
    """Seconds to render one histogram picture (mean over ``sample`` keys) and how many keys there are."""
    from lightning_inspect.backends.mlflow import render_histogram_pictures
    from lightning_inspect.core.keys import MlflowKeys

    local = Path(
        client.download_artifacts(run_id, "lightning_inspect/histograms", str(root / "download"))
    )
    spools = sorted(local.glob("*.jsonl"))
    lines = [line for spool in spools for line in spool.read_text().splitlines()]
    keys = sorted({json.loads(line)["key"] for line in lines})
    if not keys:
        return float("nan"), 0
    chosen = set(keys[:: max(1, len(keys) // sample)][:sample])
    subset = root / "picture_sample.jsonl"
    subset.write_text("\n".join(line for line in lines if json.loads(line)["key"] in chosen) + "\n")
    t0 = time.perf_counter()
    render_histogram_pictures(subset, root / "pictures", MlflowKeys())
    return (time.perf_counter() - t0) / len(chosen), len(keys)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="optimizer steps of the inspected run (default 2000; --quick 100)",
    )
    parser.add_argument(
        "--every",
        type=int,
        default=None,
        help="every_n_steps of every monitor (default 200; --quick 50)",
    )
    parser.add_argument(
        "--plain-steps",
        type=int,
        default=None,
        help="steps of the plain reference run (default 200; --quick 50)",
    )
    parser.add_argument("--layers", type=int, default=200, help="Linear+ReLU blocks (default 200)")
    parser.add_argument("--width", type=int, default=64, help="features per layer (default 64)")
    parser.add_argument("--batch", type=int, default=32, help="batch size (default 32)")
    parser.add_argument("--bins", type=int, default=64, help="histogram bins (default 64)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument(
        "--pictures",
        choices=("sample", "all"),
        default="sample",
        help="MLflow histogram pictures: 'all' renders one per key at the end of fit as the "
        "library does by default; 'sample' (default) uploads the histogram data only and "
        "times the rendering of a few keys afterwards, extrapolated to all keys",
    )
    parser.add_argument("--quick", action="store_true", help="a short run (~1 min) for smoke tests")
    parser.add_argument(
        "--no-mlflow", action="store_true", help="TensorBoard only; no server is started"
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the temporary directory (logs, server store)"
    )
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    args = parser.parse_args(argv)
    args.steps = args.steps or (100 if args.quick else 2000)
    args.every = args.every or (50 if args.quick else 200)
    args.plain_steps = args.plain_steps or (50 if args.quick else 200)

    _quiet()
    # Small matrices on a shared machine: several intra-op threads spin against other processes and
    # make every step many times slower; one thread gives stable numbers.
    torch.set_num_threads(args.threads)
    root = Path(tempfile.mkdtemp(prefix="lightning_inspect_soak_"))
    server = None if args.no_mlflow else MlflowServer(root)
    print(
        f"soak: {args.layers} x (Linear({args.width}, {args.width}) + ReLU), batch {args.batch}, "
        f"{args.steps} steps, every monitor every {args.every} steps, all stats, {args.bins} bins; "
        f"torch {torch.__version__}, lightning {pl.__version__}, {os.cpu_count()} CPUs, {args.threads} torch "
        f"thread(s); work dir {root}",
        flush=True,
    )
    try:
        if server is not None:
            t0 = time.perf_counter()
            server.start()
            print(
                f"mlflow server at {server.url} (started in {time.perf_counter() - t0:.1f} s)",
                flush=True,
            )
        plain = plain_run(args, root, server)
        print(f"plain run: {plain:.1f} steps/s ({args.plain_steps} steps)", flush=True)
        r = inspected_run(args, root, server)
        r["plain_steps_per_s"] = plain
    finally:
        if server is not None:
            server.stop()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)

    rss = r["rss_mib"]
    lines = [
        "",
        f"steps/s           plain {plain:.1f}   inspected {r['steps_per_s']:.1f} (whole loop, {r['logged_steps']} logged of {r['steps']} steps)",
        f"step time         unlogged {r['unlogged_step_ms']:.1f} ms   logged {r['logged_step_ms']:.0f} ms",
        f"per logged step   {r['scalars_per_logged_step']} scalars + {r['histograms_per_logged_step']} histograms per backend",
        f"total handed      {r['scalars_total']} scalars + {r['histograms_total']} histograms per backend",
        f"mlflow            queue at last step {r['mlflow_queue_at_last_step']}, end-of-fit flush {r['end_flush_s']:.1f} s"
        + (
            f", server holds {r['mlflow_server_metric_keys']} keys, {r['mlflow_server_history_of_one_key']}, "
            f"{r['mlflow_artifacts']} histogram artifacts"
            if "mlflow_server_metric_keys" in r
            else " (no server)"
        ),
        "RSS MiB           "
        + "  ".join(f"{k} {v:.0f}" for k, v in rss.items() if v is not None)
        + f"   peak {r['peak_rss_mib']:.0f}",
        (
            f"mlflow pictures   {r['picture_s_per_key']:.2f} s per key x {r['picture_keys']} keys = "
            f"{r['picture_s_per_key'] * r['picture_keys']:.0f} s of rendering at the end of fit with the default sink"
            if "picture_s_per_key" in r
            else "mlflow pictures   rendered by the sink, within the end-of-fit flush"
            if "mlflow_server_metric_keys" in r
            else "mlflow pictures   (no server)"
        ),
        f"tensorboard       {r['event_file_bytes'] / 2**20:.1f} MiB, {r['event_bytes_per_logged_step'] / 1024:.0f} KiB per logged step",
        f"warnings          {r['warnings']} in all, {r['lightning_inspect_warnings']} from lightning-inspect; backend failures {r['backend_failures']}",
        f"fit               {r['fit_s']:.1f} s",
    ]
    lines += [f"  warning: {w}" for w in r["distinct_lightning_inspect_warnings"]]
    print("\n".join(lines), flush=True)
    if args.json:
        args.json.write_text(json.dumps(r, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

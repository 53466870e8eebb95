"""Shared fixtures and helpers for the core test suite (CPU, tiny models, real loggers).

* ``tb_logger``: a ``TensorBoardLogger`` writing under the test's tmp dir;
  :func:`read_tb` reads its event files back with TensorBoard's own ``EventAccumulator``.
* ``mlflow_logger``: an ``MLFlowLogger`` on a SQLite store shared by the session (creating the
  schema costs seconds, a run costs milliseconds), one new run per test;
  ``mlflow_client`` is an ``MlflowClient`` on the same store.
* :func:`make_trainer`: a quiet CPU Trainer.
* Tiny models: :class:`TinyMLP` (dropout + batchnorm), :class:`ZooModel` (in-place ReLU,
  MultiheadAttention, a dict-returning block and a block shared between two calls), data helpers.
"""

from __future__ import annotations

import glob
import logging
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import MLFlowLogger, TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

#: The tests run these scripts as subprocesses; pytest never imports them (not even for doctests).
collect_ignore = ["scripts"]

# Third-party noise only; RuntimeWarnings from lightning_inspect are never filtered.
NOISY_WARNINGS = [
    r"ignore:.*does not have many workers.*",
    r"ignore:.*The number of training batches.*",
    r"ignore:.*GPU available but not used.*",
    r"ignore:.*Found .* module\(s\) in eval mode.*",
    r"ignore:.*LeafSpec.*:DeprecationWarning",
    r"ignore::DeprecationWarning:mlflow.*",
    r"ignore::DeprecationWarning:google.*",
    r"ignore::DeprecationWarning:tensorboard.*",
    r"ignore::FutureWarning:mlflow.*",
    r"ignore:.*Checkpoint directory .* exists and is not empty.*",
    r"ignore:.*`isinstance\(treespec, LeafSpec\)` is deprecated.*",
    r"ignore:.*filesystem tracking backend.*",
    r"ignore:.*torch.jit.script_method. is deprecated.*:DeprecationWarning",
]


def pytest_configure(config: pytest.Config) -> None:
    for spec in NOISY_WARNINGS:
        config.addinivalue_line("filterwarnings", spec)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")


# ------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------

IN_FEATURES = 6


def regression_data(n: int = 32, features: int = IN_FEATURES, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=g)
    y = torch.randn(n, 1, generator=g)
    return TensorDataset(x, y)


def loader(
    n: int = 32, batch_size: int = 8, seed: int = 0, shuffle: bool = False, **kw: Any
) -> DataLoader:
    ds = regression_data(n, seed=seed)
    gen = torch.Generator().manual_seed(1234) if shuffle else None
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=gen, **kw)


# ------------------------------------------------------------------------------------------
# Models
# ------------------------------------------------------------------------------------------


class TinyModule(L.LightningModule):
    """A LightningModule around ``self.net``; MSE loss, SGD (deterministic)."""

    lr = 0.1

    def __init__(self) -> None:
        super().__init__()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class TinyMLP(TinyModule):
    """Linear -> BatchNorm -> ReLU -> Dropout -> Linear -> Linear."""

    def __init__(self, hidden: int = 8) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(IN_FEATURES, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(),
            nn.Dropout(0.3),
            nn.Linear(hidden, hidden),
            nn.Linear(hidden, 1),
        )


class PlainMLP(TinyModule):
    """Linear -> Tanh -> Linear: no randomness, no buffers."""

    def __init__(self, hidden: int = 5) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(IN_FEATURES, hidden), nn.Tanh(), nn.Linear(hidden, 1))


class DictBlock(nn.Module):
    """Returns a dict of tensors plus non-tensor leaves."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> dict[str, Any]:
        h = self.proj(x)
        return {"main": h, "aux": h * 2.0, "note": "text", "missing": None}


class ZooModel(TinyModule):
    """In-place ReLU over a Linear's output, MultiheadAttention (tuple output), a
    dict-returning block and one Linear ``shared`` called twice per forward."""

    def __init__(self, dim: int = IN_FEATURES) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, dim)
        self.relu = nn.ReLU(inplace=True)
        self.attn = nn.MultiheadAttention(dim, num_heads=2, batch_first=True)
        self.block = DictBlock(dim)
        self.shared = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # ReLU(inplace=True) overwrites the Linear's output (the pattern that breaks full backward
        # hooks, pytorch#61519); nothing may modify the ReLU's own output in place afterwards
        # (ReLU's backward needs it: autograd itself refuses).
        h = self.relu(self.fc(x)) + 1.0
        seq = h.unsqueeze(1)  # (B, 1, dim)
        a, _ = self.attn(seq, seq, seq)
        h = a.squeeze(1)
        d = self.block(h)
        h = d["main"] + 0.5 * d["aux"]
        h = self.shared(torch.tanh(self.shared(h)))
        return self.head(h)


# ------------------------------------------------------------------------------------------
# Trainer and loggers
# ------------------------------------------------------------------------------------------


def make_trainer(
    max_steps: int = 4,
    logger: Any = False,
    callbacks: list[Callback] | None = None,
    **kw: Any,
) -> L.Trainer:
    defaults: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        log_every_n_steps=1,
        deterministic=False,
    )
    defaults.update(kw)
    return L.Trainer(max_steps=max_steps, logger=logger, callbacks=callbacks or [], **defaults)


@pytest.fixture
def tb_logger(tmp_path: Path) -> TensorBoardLogger:
    return TensorBoardLogger(save_dir=str(tmp_path / "tb"), name="", version="run")


@pytest.fixture(scope="session")
def mlflow_store(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("mlflow")
    return {
        "tracking_uri": f"sqlite:///{root}/mlflow.db",
        "artifact_location": str(root / "artifacts"),
    }


@pytest.fixture
def mlflow_logger(mlflow_store: dict[str, str]) -> MLFlowLogger:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logger = MLFlowLogger(experiment_name="lightning_inspect_tests", **mlflow_store)
        _ = logger.run_id  # create the run (and the schema, once per session)
    return logger


@pytest.fixture
def mlflow_client(mlflow_store: dict[str, str]) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=mlflow_store["tracking_uri"])


def mlflow_history(client: Any, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


# ------------------------------------------------------------------------------------------
# TensorBoard reading
# ------------------------------------------------------------------------------------------


@dataclass
class TBRun:
    """Everything in the event files of one log dir."""

    acc: Any

    @property
    def tags(self) -> dict[str, list[str]]:
        return self.acc.Tags()

    def scalar_tags(self) -> list[str]:
        return list(self.acc.Tags()["scalars"])

    def histogram_tags(self) -> list[str]:
        return list(self.acc.Tags()["histograms"])

    def scalars(self, tag: str) -> list[tuple[int, float]]:
        return [(e.step, e.value) for e in self.acc.Scalars(tag)]

    def steps(self, tag: str) -> list[int]:
        return [s for s, _ in self.scalars(tag)]

    def value(self, tag: str, step: int) -> float:
        values = [v for s, v in self.scalars(tag) if s == step]
        assert len(values) == 1, f"{tag} at step {step}: {values}"
        return values[0]

    def histograms(self, tag: str) -> list[Any]:
        return list(self.acc.Histograms(tag))


def read_tb(log_dir: str | Path) -> TBRun:
    """Load the event files under ``log_dir`` (they must all lie in one directory)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = glob.glob(str(Path(log_dir) / "**" / "events.out.tfevents.*"), recursive=True)
    assert files, f"no event file under {log_dir}"
    dirs = {str(Path(f).parent) for f in files}
    assert len(dirs) == 1, f"event files in several directories: {sorted(dirs)}"
    acc = EventAccumulator(
        dirs.pop(),
        size_guidance={"scalars": 0, "histograms": 0, "tensors": 0, "graph": 0, "meta_graph": 0},
    )
    acc.Reload()
    return TBRun(acc)


# ------------------------------------------------------------------------------------------
# Hook inspection
# ------------------------------------------------------------------------------------------


def module_hook_counts(model: nn.Module) -> dict[str, int]:
    """Forward/pre/backward hooks per module (only non-empty entries)."""
    out = {}
    for name, m in model.named_modules():
        n = (
            len(m._forward_hooks)
            + len(m._forward_pre_hooks)
            + len(m._backward_hooks)
            + len(getattr(m, "_backward_pre_hooks", {}))
        )
        if n:
            out[name or "<root>"] = n
    return out


class Capture(Callback):
    """Runs ``fn(trainer, pl_module)`` in the chosen hook; collects whatever it returns by step."""

    def __init__(self, hook: str, fn: Callable[[L.Trainer, L.LightningModule], Any]) -> None:
        self.hook = hook
        self.fn = fn
        self.by_step: dict[int, Any] = {}

    def _run(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.by_step[trainer.global_step] = self.fn(trainer, pl_module)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):  # type: ignore[no-untyped-def]
        if self.hook == "on_before_optimizer_step":
            self._run(trainer, pl_module)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # type: ignore[no-untyped-def]
        if self.hook == "on_train_batch_start":
            self._run(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # type: ignore[no-untyped-def]
        if self.hook == "on_train_batch_end":
            self._run(trainer, pl_module)


@pytest.fixture
def no_leaked_hooks() -> Iterator[Callable[[nn.Module], None]]:
    def check(model: nn.Module) -> None:
        assert module_hook_counts(model) == {}

    yield check


class _LogLines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def lightning_info() -> Iterator[list[str]]:
    """The info lines Lightning's loggers print (``rank_zero_info``)."""
    handler = _LogLines()
    logger = logging.getLogger("lightning.pytorch")
    logger.addHandler(handler)
    yield handler.lines
    logger.removeHandler(handler)

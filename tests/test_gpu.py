"""GPU checks (skipped without CUDA): one device-to-host synchronisation per logging step."""

from __future__ import annotations

import warnings

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from lightning_inspect import ActivationMonitor, GradientMonitor, MemorySink, WeightMonitor
from lightning_inspect.core.stats import _reduce_any, reduce_tensor, summarise

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


class SyncCounter(Callback):
    """Counts synchronising CUDA calls (``torch.cuda.set_sync_debug_mode``) inside training batches."""

    def __init__(self) -> None:
        self.per_step: dict[int, int] = {}
        self._catcher: warnings.catch_warnings | None = None
        self._caught: list[warnings.WarningMessage] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        torch.cuda.synchronize()
        self._catcher = warnings.catch_warnings(record=True)
        self._caught = self._catcher.__enter__()
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        torch.cuda.set_sync_debug_mode("default")
        assert self._catcher is not None
        self._catcher.__exit__(None, None, None)
        # Only the calls themselves: the once-per-process notice that the debug mode is a
        # prototype ("... does not yet detect all synchronizing operations") is not a sync.
        syncs = [w for w in self._caught if "called a synchronizing" in str(w.message)]
        self.per_step[trainer.global_step - 1] = len(syncs)


class Net(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 1)
        )

    def training_step(self, batch, batch_idx):
        return self.body(batch[0]).square().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _syncs(monitors: list[Callback]) -> dict[int, int]:
    counter = SyncCounter()
    # The counter runs last in each batch, after the monitors' transfer.
    trainer = L.Trainer(
        accelerator="gpu",
        devices=1,
        max_steps=6,
        logger=False,
        callbacks=[*monitors, counter],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    data = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.randn(256, 64)), batch_size=32
    )
    trainer.fit(Net(), data)
    return counter.per_step


def test_one_device_to_host_transfer_per_logging_step() -> None:
    plain = _syncs([])
    sink = MemorySink()
    monitors = [
        ActivationMonitor(every_n_steps=2, backends=[sink]),
        GradientMonitor(every_n_steps=2, backends=[sink]),
        WeightMonitor(every_n_steps=2, backends=[sink]),
    ]
    inspected = _syncs(monitors)
    for step in plain:
        extra = inspected[step] - plain[step]
        assert extra == (1 if step % 2 == 0 else 0), (step, plain, inspected)
    assert sink.steps("activations/body.0/mean") == [0, 2, 4]


def test_reduction_on_the_gpu_matches_the_cpu() -> None:
    x = torch.randn(10_000) * 3 + 1
    x[::97] = float("nan")
    x[::89] = float("inf")
    cpu = summarise(reduce_tensor(x, bins=32).numpy())
    gpu = summarise(reduce_tensor(x.cuda(), bins=32).cpu().numpy())
    for key, value in cpu.items():
        assert gpu[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    # the GPU's path, run on the CPU, bins every value alike (the CPU's own path bins in float64)
    assert torch.equal(
        _reduce_any(x, 32, torch.float32)[-32:], reduce_tensor(x.cuda(), bins=32).cpu()[-32:]
    )


def test_fp16_amp_gradients_are_unscaled() -> None:
    sink = MemorySink()
    reference: list[float] = []

    class Reference(Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
            reference.append(
                float(
                    torch.linalg.vector_norm(
                        torch.stack(
                            [
                                p.grad.float().norm()
                                for p in pl_module.parameters()
                                if p.grad is not None
                            ]
                        )
                    )
                )
            )

    trainer = L.Trainer(
        accelerator="gpu",
        devices=1,
        precision="16-mixed",
        max_steps=3,
        logger=False,
        callbacks=[GradientMonitor(every_n_steps=1, outputs=False, backends=[sink]), Reference()],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    data = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.randn(96, 64)), batch_size=32
    )
    trainer.fit(Net(), data)
    logged = [v for _, v in sink.scalars["param_grads/global_norm"]]
    assert logged == pytest.approx(
        reference, rel=1e-4
    )  # the scaler's factor (65536) is not in them


@pytest.mark.slow
def test_overhead_benchmark_gpu_variant(tmp_path) -> None:
    """The benchmark's CUDA variant runs and reports every scenario with its peak GPU memory."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(root / "benchmarks" / "overhead.py"),
            "--accelerator",
            "gpu",
            "--quick",
            "--models",
            "cnn",
            "--no-wandb",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["environment"]["accelerator"] == "gpu"
    runs = [r for r in result["runs"] if r["model"] == "cnn" and r["repeat"] >= 0]
    assert {r["scenario"] for r in runs} >= {"plain", "every_step", "every_50"}
    assert all(r["peak_gpu_mb"] > 0 for r in runs)
    assert "peak GPU memory" in proc.stdout

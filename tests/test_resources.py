"""Resource bounds over long runs: memory stays flat, TensorBoard output grows by a bounded amount
per logged step that depends on the number of keys and bins, never on the size of the tensors,
and the bounded wait for a slow backend at the end of fit loses nothing silently.
"""

from __future__ import annotations

import gc
import glob
import types
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from conftest import TinyModule, make_trainer, module_hook_counts
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_inspect import ActivationMonitor, GradientMonitor, WeightMonitor
from lightning_inspect.core.stats import Histogram


class CountingSink:
    """A backend that keeps nothing but counts, so any growth in memory is the monitors' own."""

    name = "counting"

    def __init__(self) -> None:
        self.scalars = 0
        self.histograms = 0
        self.steps: set[int] = set()

    def log_scalars(self, values: Mapping[str, float], step: int) -> None:
        self.scalars += len(values)
        self.steps.add(step)

    def log_histograms(self, histograms: Mapping[str, Histogram], step: int) -> None:
        self.histograms += len(histograms)

    def log_text(self, key: str, text: str, step: int) -> None:
        pass

    def flush(self) -> None:
        pass


class Net(TinyModule):
    """Linear -> ReLU(inplace) -> LayerNorm -> Linear -> Tanh -> Dropout -> Linear."""

    def __init__(self, width: int = 16, features: int = 8) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(features, width),
            nn.ReLU(inplace=True),
            nn.LayerNorm(width),
            nn.Linear(width, width),
            nn.Tanh(),
            nn.Dropout(0.1),
            nn.Linear(width, 1),
        )

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def _loader(batch_size: int, batches: int = 4, features: int = 8) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    n = batch_size * batches
    return DataLoader(
        TensorDataset(torch.randn(n, features, generator=g), torch.randn(n, 1, generator=g)),
        batch_size=batch_size,
    )


def _live_tensors() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


def _reachable_tensors(root: object, model: nn.Module) -> list[str]:
    """Tensors reachable from ``root`` (a monitor) other than the model's parameters and buffers.

    The walk does not enter modules, the Trainer, functions, classes or Python modules: what a
    monitor holds *of its own* is what is found.
    """
    own = {id(t) for t in model.parameters()} | {id(t) for t in model.buffers()}
    stop = (
        nn.Module,
        L.Trainer,
        type,
        types.ModuleType,
        types.FunctionType,
        types.BuiltinFunctionType,
    )
    seen: set[int] = set()
    found: list[str] = []
    frontier: list[tuple[object, str]] = [(root, type(root).__name__)]
    while frontier:
        obj, path = frontier.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            if id(obj) not in own:
                found.append(f"{path}: {tuple(obj.shape)}")
            continue
        if obj is not root and isinstance(obj, stop):
            continue
        for child in gc.get_referents(obj):
            frontier.append((child, f"{path}>{type(child).__name__}"))
    return found


class ResourceProbe(Callback):
    """Put last in the callback list: sees the monitors' hooks inside the batch, and their state
    after they published at the end of it."""

    def __init__(self, at_steps: tuple[int, ...], monitors: list[Callback]) -> None:
        self.at_steps = at_steps
        self.monitors = monitors
        self.hooks_inside: dict[int, int] = {}
        self.hooks_after: dict[int, int] = {}
        self.tensors: dict[int, int] = {}
        self.objects: dict[int, int] = {}
        self.held: dict[int, list[str]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        self.hooks_inside[trainer.global_step] = sum(module_hook_counts(pl_module).values())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        step = trainer.global_step - 1  # the step whose batch just ended
        self.hooks_after[step] = sum(module_hook_counts(pl_module).values())
        if step in self.at_steps:
            self.tensors[step] = _live_tensors()
            self.objects[step] = len(gc.get_objects())
            self.held[step] = [t for m in self.monitors for t in _reachable_tensors(m, pl_module)]


@pytest.mark.slow
def test_long_run_keeps_tensors_hooks_and_objects_flat() -> None:
    steps = 300
    sink = CountingSink()
    monitors: list[Callback] = [
        ActivationMonitor(modules="*", every_n_steps=1, backends=[sink]),
        GradientMonitor(modules="*", every_n_steps=1, backends=[sink]),
        WeightMonitor(every_n_steps=1, backends=[sink]),
    ]
    probe = ResourceProbe((50, 150, steps - 1), monitors)
    torch.manual_seed(0)
    model = Net()
    trainer = make_trainer(max_steps=steps, callbacks=[*monitors, probe])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, _loader(batch_size=8))

    assert sink.steps == set(range(steps)), "every step must have been logged"
    # Hooks: the same set inside every logged batch (``net`` and its 7 layers x 2 output-reading
    # monitors), none between batches.
    assert set(probe.hooks_inside.values()) == {16}
    assert set(probe.hooks_after.values()) == {0}
    # No per-step tensor survives its step, in the monitors or anywhere else.
    assert probe.held == {s: [] for s in probe.at_steps}, probe.held
    # (no growth: tensors that other tests' lingering daemon threads release may lower the count)
    first, *later = (probe.tensors[s] for s in sorted(probe.tensors))
    assert all(n - first <= 2 for n in later), probe.tensors
    first, *later = (probe.objects[s] for s in sorted(probe.objects))
    assert all(n - first <= 200 for n in later), probe.objects  # 250 logged steps: not per step


# ---------------------------------------------------------------------------------------------
# TensorBoard bytes per logged step.
#
# Each monitor writes two events per logged step: one Summary holding all its scalars, one holding
# all its histograms. An event costs a TFRecord frame (8-byte length, two 4-byte CRCs) plus wall
# time and step; each value inside costs its tag plus a float (scalar) or five doubles and two
# packed double arrays of ``bins`` entries (histogram). The bound keeps a little headroom for large
# step numbers and small format changes:
# ---------------------------------------------------------------------------------------------

EVENT_BYTES = 40  # per event: 2 per monitor and logged step
SCALAR_VALUE_BYTES = 12  # + len(tag)
HISTOGRAM_VALUE_BYTES = 64  # + len(tag) + 16 * bins
BYTES_PER_BIN = 16  # two float64 per bin: bucket limit and count
MONITORS = 3


class EventSize(Callback):
    """Flushes the TensorBoard writer after each batch (after the monitors) and records the size."""

    def __init__(self) -> None:
        self.size: dict[int, int] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        trainer.logger.experiment.flush()
        files = glob.glob(str(Path(trainer.logger.log_dir) / "events.out.tfevents.*"))
        self.size[trainer.global_step - 1] = sum(Path(f).stat().st_size for f in files)


def _event_run(
    tmp_path: Path, tag: str, batch_size: int, width: int, bins: int, steps: int = 10
) -> tuple[float, Any]:
    """Bytes per logged step between step 2 and the last, and the run's event accumulator."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    options: dict[str, Any] = {"every_n_steps": 1, "bins": bins, "stats": None}
    monitors = [
        ActivationMonitor(modules=["net.0", "net.3", "net.6"], **options),
        GradientMonitor(modules=["net.0", "net.3", "net.6"], **options),
        WeightMonitor(**options),
    ]
    sizes = EventSize()
    logger = TensorBoardLogger(str(tmp_path), name=tag, version="")
    torch.manual_seed(0)
    trainer = make_trainer(max_steps=steps, logger=logger, callbacks=[*monitors, sizes])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(Net(width=width), _loader(batch_size=batch_size))
    per_step = (sizes.size[steps - 1] - sizes.size[1]) / (steps - 2)
    acc = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    return per_step, acc


@pytest.mark.slow
def test_tensorboard_bytes_per_logged_step_scale_with_keys_and_bins_not_tensor_size(
    tmp_path: Path,
) -> None:
    bins = 32
    base, acc = _event_run(tmp_path, "base", batch_size=8, width=16, bins=bins)
    scalars, hists = acc.Tags()["scalars"], acc.Tags()["histograms"]
    # 3 modules' outputs and their gradients, their 6 parameters' gradients, all 8 parameters.
    assert len(hists) == 3 + 3 + 6 + 8
    bound = (
        2 * MONITORS * EVENT_BYTES
        + sum(SCALAR_VALUE_BYTES + len(t) for t in scalars)
        + sum(HISTOGRAM_VALUE_BYTES + len(t) + BYTES_PER_BIN * bins for t in hists)
    )
    assert base <= bound, (base, bound)
    assert base >= 0.8 * bound, "the bound is meant to be tight; re-derive it if the format changed"

    # 10x the batch and 10x the width (100x bigger weights): the same bytes per step.
    big, big_acc = _event_run(tmp_path, "big", batch_size=80, width=160, bins=bins)
    assert big_acc.Tags()["scalars"] == scalars
    assert big == pytest.approx(base, rel=0.03)

    # Bytes grow by two doubles per extra bin per histogram, nothing more.
    wide, _ = _event_run(tmp_path, "bins", batch_size=8, width=16, bins=2 * bins)
    assert (wide - base) / (len(hists) * bins) == pytest.approx(BYTES_PER_BIN, rel=0.03)


# ---------------------------------------------------------------------------------------------
# The end of fit waits a bounded time for a slow backend; what it could not send must not vanish.
# ---------------------------------------------------------------------------------------------

SLOW_BACKEND_SCRIPT = """
import sys, time
from pathlib import Path
from lightning_inspect.backends.base import BackgroundSink, EndOfFit

out = Path(sys.argv[1])

class Slow:
    name = "slow"
    def log_scalars(self, values, step):
        time.sleep(0.5)
        with (out / "received.txt").open("a") as f:
            f.write(f"{step}\\n")
    def log_histograms(self, histograms, step): pass
    def log_text(self, key, text, step): pass
    def flush(self): pass

sink = BackgroundSink(Slow(), fallback_dir=out, deadline=EndOfFit(0.3))
for step in range(10):
    sink.log_scalars({"x": 1.0}, step)
sink.flush()   # what the monitors call at the end of fit ...
sink.close()   # ... and at teardown (waits until the deadline); then the process exits
"""


@pytest.mark.slow
def test_values_a_slow_backend_did_not_take_by_exit_are_in_the_fallback_file(
    tmp_path: Path,
) -> None:
    import json
    import subprocess
    import sys

    script = tmp_path / "slow_backend.py"
    script.write_text(SLOW_BACKEND_SCRIPT)
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    received_file = tmp_path / "received.txt"
    received = (
        {int(s) for s in received_file.read_text().split()} if received_file.exists() else set()
    )
    saved: set[int] = set()
    for fallback in tmp_path.glob("lightning_inspect_unsent_*.jsonl"):
        for line in fallback.read_text().splitlines():
            record = json.loads(line)
            if record.get("call") == "log_scalars" and "step" in record:
                saved.add(int(record["step"]))
    assert received | saved == set(range(10)), (
        f"sent {sorted(received)}, in the fallback file {sorted(saved)}"
    )

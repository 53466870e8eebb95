"""Overhead of lightning-inspect against a plain run and against the usual alternatives.

Trains the same small models (MLP, CNN, transformer encoder; synthetic data, fixed seed) under
several scenarios in ONE process, interleaved: every repetition runs each scenario once, in a
rotated order, so slow drifts of a shared machine hit every scenario alike. Prints, per model and
scenario, the median seconds per optimizer step, the ratio to the plain run (median of the
per-repetition ratios) and the peak memory, then checks the project's targets (PASS/FAIL is a
report: the script exits 0 unless it crashes).

Scenarios:
    plain         no callback (TensorBoardLogger attached, as in every scenario)
    off           ActivationMonitor, GradientMonitor, WeightMonitor, GraphMonitor with enabled=False
    every_step    Activation+Gradient+Weight monitors, histograms on, default selection, every_n_steps=1
    every_50      the same with every_n_steps=50
    handwritten   a callback as people write it: forward hooks + tensor hooks + parameter loop,
                  `.item()` for mean/std/min/max/norm, `SummaryWriter.add_histogram`, every step
    wandb_watch   wandb.watch(model, log="all", log_freq=1), offline (only if wandb is importable)
Diagnostics (only with --scenarios): every_step_memsink (no TensorBoard writes), every_step_nohist,
every_step_noratio (no update ratio), params_like_wandb (weights + parameter gradients only).

A step is timed from one ``on_train_batch_start`` to the next, so it holds everything the loop does.
Peak memory is the kernel's RSS high-water mark (reset before each run), minus the RSS at its start.

Also measured: the "floor" (one read pass, ``t.sum()``, over the tensors every_step reduces in a
logged step), our reduction over the same tensors, and the cost of a switched-off probe call.

Usage:
    python benchmarks/overhead.py                 # default, ~4-6 min on 2 CPU cores
    python benchmarks/overhead.py --quick         # ~1 min smoke test (numbers indicative only)
    python benchmarks/overhead.py --steps 100 --repeats 5 --models mlp,cnn --json out.json
    python benchmarks/overhead.py --profile mlp   # where every_step's time goes
    python benchmarks/overhead.py --accelerator gpu   # the same on one CUDA device

On a GPU (``--accelerator gpu``) step boundaries synchronise the device before reading the clock,
the floor's timings synchronise too, and the table adds each scenario's peak GPU memory
(``torch.cuda.max_memory_allocated``, reset before every run).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import gc
import itertools
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
import timeit
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn

import lightning_inspect
from lightning_inspect import (
    ActivationMonitor,
    GradientMonitor,
    GraphMonitor,
    WeightMonitor,
    select_modules,
)
from lightning_inspect.core.stats import reduce_tensor

LOGGED_EVERY = 50  # every_50's period; measured windows should be multiples of it
ACCELERATOR = "cpu"  # or "gpu": set from --accelerator in main()


def _sync() -> None:
    """Wait for the device, so that the clock measures the work and not its queueing."""
    if ACCELERATOR == "gpu":
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------------------
# Models and data
# ------------------------------------------------------------------------------------------------


class _CycleBatches(torch.utils.data.IterableDataset):
    """Endless stream over a few pre-generated batches: no epoch boundary, no loading cost."""

    def __init__(self, batches: list[tuple[torch.Tensor, ...]]) -> None:
        self.batches = batches

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        while True:
            yield from self.batches


class _BenchModule(pl.LightningModule):
    n_batches = 4

    def make_batch(self, g: torch.Generator) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def loss(self, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        raise NotImplementedError

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        loss = self.loss(batch)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        g = torch.Generator().manual_seed(1)
        batches = [self.make_batch(g) for _ in range(self.n_batches)]
        return torch.utils.data.DataLoader(_CycleBatches(batches), batch_size=None)


class MLP(_BenchModule):
    """8 x (Linear(512, 512) + ReLU), batch 256, regression to a random target."""

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for _ in range(8):
            layers += [nn.Linear(512, 512), nn.ReLU()]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def make_batch(self, g: torch.Generator) -> tuple[torch.Tensor, ...]:
        return torch.randn(256, 512, generator=g), torch.randn(256, 512, generator=g)

    def loss(self, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self(x), y)


class CNN(_BenchModule):
    """3 conv layers (8, 16, 32 channels) on 1x32x32 images, batch 128, 10 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
        )
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))

    def make_batch(self, g: torch.Generator) -> tuple[torch.Tensor, ...]:
        return torch.randn(128, 1, 32, 32, generator=g), torch.randint(0, 10, (128,), generator=g)

    def loss(self, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)


class Transformer(_BenchModule):
    """Token embedding + 2-layer TransformerEncoder (d_model 128, 4 heads, FF 256, seq 64), batch 32."""

    vocab = 256

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(self.vocab, 128)
        layer = nn.TransformerEncoderLayer(
            128, nhead=4, dim_feedforward=256, dropout=0.0, batch_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(128, self.vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(tokens)))

    def make_batch(self, g: torch.Generator) -> tuple[torch.Tensor, ...]:
        return (
            torch.randint(0, self.vocab, (32, 64), generator=g),
            torch.randint(0, self.vocab, (32, 64), generator=g),
        )

    def loss(self, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x).reshape(-1, self.vocab), y.reshape(-1))


class Transformer12(_BenchModule):
    """Real size: embedding + ``layers``-layer TransformerEncoder (d_model 128, 4 heads, FF 512,
    PyTorch's default dropout), seq 32, batch 16, AdamW; 12 layers: 74 modules, 147 parameters."""

    vocab = 256

    def __init__(self, layers: int = 12) -> None:
        super().__init__()
        self.embed = nn.Embedding(self.vocab, 128)
        layer = nn.TransformerEncoderLayer(128, nhead=4, dim_feedforward=512, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=layers, enable_nested_tensor=False)
        self.head = nn.Linear(128, self.vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(tokens)))

    def make_batch(self, g: torch.Generator) -> tuple[torch.Tensor, ...]:
        return (
            torch.randint(0, self.vocab, (16, 32), generator=g),
            torch.randint(0, self.vocab, (16, 32), generator=g),
        )

    def loss(self, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x).reshape(-1, self.vocab), y.reshape(-1))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


class _BasicBlock(nn.Module):
    """ResNet's basic block: two 3x3 conv + BatchNorm, a 1x1 conv + BatchNorm shortcut when the
    shape changes."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(_BenchModule):
    """Real size: a ResNet-style CNN with BatchNorm, stages of 2/3/3/2 basic blocks (16, 32, 64,
    128 channels) on 3x32x32 images, batch 32, 10 classes, SGD with momentum; 49 modules."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True)
        )
        blocks: list[nn.Module] = []
        c_in = 16
        for c_out, n, stride in ((16, 2, 1), (32, 3, 2), (64, 3, 2), (128, 2, 2)):
            for i in range(n):
                blocks.append(_BasicBlock(c_in, c_out, stride if i == 0 else 1))
                c_in = c_out
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        return self.head(nn.functional.adaptive_avg_pool2d(x, 1).flatten(1))

    def make_batch(self, g: torch.Generator) -> tuple[torch.Tensor, ...]:
        return torch.randn(32, 3, 32, 32, generator=g), torch.randint(0, 10, (32,), generator=g)

    def loss(self, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


MODELS: dict[str, type[_BenchModule]] = {"mlp": MLP, "cnn": CNN, "transformer": Transformer}
#: The real-size models of ``benchmarks/real_size.py``.
REAL_SIZE_MODELS: dict[str, type[_BenchModule]] = {"transformer12": Transformer12, "resnet": ResNet}


def make_model(name: str) -> _BenchModule:
    torch.manual_seed(0)  # the same initial weights in every scenario and repetition
    if name.startswith("transformer") and name[len("transformer") :].isdigit():
        return Transformer12(layers=int(name[len("transformer") :]))  # transformer2, transformer24
    return {**MODELS, **REAL_SIZE_MODELS}[name]()


# ------------------------------------------------------------------------------------------------
# Baselines
# ------------------------------------------------------------------------------------------------


class HandWrittenHooks(Callback):
    """What people paste into their code: hooks that call ``.item()`` and ``add_histogram``.

    Covers the same tensors as the every_step scenario (outputs and output gradients of every
    module that owns parameters, parameter gradients, weights), so both log the same information.
    """

    def __init__(self) -> None:
        self.handles: list[Any] = []
        self.writer: Any = None
        self.step = 0

    def _log(self, key: str, t: torch.Tensor) -> None:
        t = t.detach()
        w, s = self.writer, self.step
        w.add_scalar(f"{key}/mean", t.mean().item(), s)
        w.add_scalar(f"{key}/std", t.std().item(), s)
        w.add_scalar(f"{key}/min", t.min().item(), s)
        w.add_scalar(f"{key}/max", t.max().item(), s)
        w.add_scalar(f"{key}/norm", t.norm().item(), s)
        w.add_histogram(key, t, s)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.writer = trainer.logger.experiment
        for name, module in pl_module.named_modules():
            if not any(True for _ in module.parameters(recurse=False)):
                continue

            def hook(mod: nn.Module, args: Any, out: Any, name: str = name) -> None:
                out = out[0] if isinstance(out, tuple) else out
                self._log(f"act/{name}", out)
                if out.requires_grad:
                    out.register_hook(lambda g: self._log(f"act_grad/{name}", g))

            self.handles.append(module.register_forward_hook(hook))

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        self.step = trainer.global_step

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        for name, p in pl_module.named_parameters():
            if p.grad is not None:
                self._log(f"grad/{name}", p.grad)
            self._log(f"weight/{name}", p)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


_WANDB_RUN: Any = None


def _wandb_run(directory: str) -> Any:
    """One offline wandb run for the whole benchmark (its start-up is not what is measured)."""
    global _WANDB_RUN
    if _WANDB_RUN is None:
        import wandb

        _WANDB_RUN = wandb.init(
            mode="offline",
            dir=directory,
            project="lightning-inspect-bench",
            settings=wandb.Settings(
                silent=True,
                console="off",
                x_disable_stats=True,
                disable_git=True,
                save_code=False,
                x_disable_machine_info=True,
            ),
        )
    return _WANDB_RUN


def _wandb_finish() -> None:
    global _WANDB_RUN
    if _WANDB_RUN is not None:
        _WANDB_RUN.finish()
        _WANDB_RUN = None


class WandbWatch(Callback):
    """``wandb.watch(model, log="all", log_freq=1)`` in offline mode; commits one row per step.

    ``wandb.watch`` hooks every parameter (histograms of weights and gradients, computed with
    ``torch.histc`` and ``.item()`` each logged step); it does not record activations.
    """

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.run: Any = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.run = _wandb_run(self.directory)
        self.run.watch(pl_module, log="all", log_freq=1)

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self.run.log({"global_step": trainer.global_step})  # commits the step's histograms

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.run.unwatch(pl_module)
        self.run = None


def wandb_available() -> tuple[bool, str]:
    try:
        import wandb  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install: skip, say why
        return (
            False,
            f"wandb is not importable ({type(exc).__name__}: {exc}); install the 'bench' extra",
        )
    return True, ""


# ------------------------------------------------------------------------------------------------
# Scenarios
# ------------------------------------------------------------------------------------------------


def _monitors(every: int, **kwargs: Any) -> list[Callback]:
    ratio = kwargs.pop("update_ratio", True)
    return [
        ActivationMonitor(every_n_steps=every, **kwargs),
        GradientMonitor(every_n_steps=every, **kwargs),
        WeightMonitor(every_n_steps=every, update_ratio=ratio, **kwargs),
    ]


def scenario_callbacks(name: str, tmp: str) -> list[Callback]:
    if name == "plain":
        return []
    if name == "off":
        return [
            ActivationMonitor(enabled=False),
            GradientMonitor(enabled=False),
            WeightMonitor(enabled=False),
            GraphMonitor(enabled=False),
        ]
    if name == "every_step":
        return _monitors(1)
    if name == "every_50":
        return _monitors(LOGGED_EVERY)
    # Diagnostics (not run by default): every_step with one part of the work taken away.
    if name == "every_step_memsink":  # no TensorBoard writes: values go to an in-memory sink
        from lightning_inspect import MemorySink

        return _monitors(1, backends=[MemorySink()])
    if name == "every_step_nohist":
        return _monitors(1, histograms=False)
    if name == "every_step_noratio":
        return _monitors(1, update_ratio=False)
    if (
        name == "params_like_wandb"
    ):  # what wandb.watch(log="all") reads: weights and parameter gradients
        return [
            GradientMonitor(every_n_steps=1, outputs=False, global_norm=False),
            WeightMonitor(every_n_steps=1, update_ratio=False),
        ]
    if name == "handwritten":
        return [HandWrittenHooks()]
    if name == "wandb_watch":
        return [WandbWatch(tmp)]
    raise ValueError(name)


DEFAULT_SCENARIOS = ("plain", "off", "every_step", "every_50", "handwritten", "wandb_watch")
DIAGNOSTIC_SCENARIOS = (
    "every_step_memsink",
    "every_step_nohist",
    "every_step_noratio",
    "params_like_wandb",
)
ALL_SCENARIOS = DEFAULT_SCENARIOS + DIAGNOSTIC_SCENARIOS
#: Scenarios whose every step costs the same: a shorter window measures them as well (--costly-steps).
UNIFORM_SCENARIOS = ("every_step", "handwritten", "wandb_watch", *DIAGNOSTIC_SCENARIOS)


# ------------------------------------------------------------------------------------------------
# Measurement
# ------------------------------------------------------------------------------------------------


class StepTimer(Callback):
    """Records the wall clock and the CPU time at every ``on_train_batch_start``.

    A step is measured from one batch start to the next, so it includes everything the loop does
    for that step: forward, backward, optimizer, every callback's batch-end work, the logger and
    fetching the next batch, whatever the callback order.

    CPU time is this process's (every thread: the TensorBoard writer thread too) plus that of its
    child processes (wandb's service). Other programs on the machine barely move it, whereas they
    stretch the wall clock: on a shared machine the CPU-time ratios are the ones to trust.
    """

    def __init__(self, parts: _Attribution | None = None) -> None:
        self.starts: list[float] = []
        self.cpu: list[float] = []
        self.inside: list[float] = []
        self._parts = parts
        self._children: list[Any] = []

    def on_train_start(self, *args: Any) -> None:
        with contextlib.suppress(Exception):
            import psutil

            self._children = psutil.Process().children(recursive=True)

    def _cpu(self) -> float:
        total = time.process_time()
        for child in self._children:
            with contextlib.suppress(Exception):
                t = child.cpu_times()
                total += t.user + t.system
        return total

    def on_train_batch_start(self, *args: Any) -> None:
        _sync()
        self.inside.append(self._parts.total() if self._parts is not None else 0.0)
        self.cpu.append(self._cpu())
        self.starts.append(time.perf_counter())


_libc = None
with contextlib.suppress(Exception):
    _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")


def _release_memory() -> None:
    """Collect garbage and give freed heap back to the OS, so each scenario starts alike.

    ``main`` freezes the objects that exist after the imports (``gc.freeze``), so this collection
    scans only what runs created: milliseconds instead of a second.
    """
    gc.collect()
    if _libc is not None and hasattr(_libc, "malloc_trim"):
        _libc.malloc_trim(0)


def _status_kb(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class PeakRSS:
    """Peak resident memory over a block.

    On Linux the kernel's own high-water mark (``VmHWM``) is reset by writing ``5`` to
    ``/proc/self/clear_refs``: exact and free. Elsewhere, a thread samples the RSS (psutil)
    every millisecond.
    """

    def __init__(self) -> None:
        self.kernel = self._kernel_hwm_resettable()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._peak = 0
        self.start_bytes = 0
        self.method = (
            "VmHWM reset via /proc/self/clear_refs" if self.kernel else "psutil sampled every 1 ms"
        )
        if not self.kernel:
            import psutil  # pip install psutil

            self._proc = psutil.Process()

    @staticmethod
    def _kernel_hwm_resettable() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return _status_kb("VmHWM") is not None
        except OSError:
            return False

    def _rss(self) -> int:
        if self.kernel:
            return (_status_kb("VmRSS") or 0) * 1024
        return self._proc.memory_info().rss

    def start(self) -> None:
        self.start_bytes = self._rss()
        if self.kernel:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return
        self._peak = self.start_bytes
        self._stop.clear()

        def sample() -> None:
            while not self._stop.wait(0.001):
                self._peak = max(self._peak, self._proc.memory_info().rss)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()

    def stop(self) -> int:
        """Absolute peak RSS in bytes since :meth:`start`."""
        if self.kernel:
            return (_status_kb("VmHWM") or 0) * 1024
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        return max(self._peak, self._proc.memory_info().rss)


@dataclass
class Run:
    model: str
    scenario: str
    repeat: int
    step_mean_s: float  # mean over the measured window (amortises every_50's logged steps)
    step_median_s: float  # the typical step
    step_cpu_s: float  # CPU time per step, mean over the window
    inside_s: float  # wall time per step spent inside lightning_inspect's code (our scenarios only)
    peak_rss_mb: float
    peak_increase_mb: float
    peak_gpu_mb: float = 0.0  # torch.cuda.max_memory_allocated, --accelerator gpu only
    gaps_s: list[float] = field(default_factory=list)  # every measured step, in order


def bench_trainer(max_steps: int, logger: Any, callbacks: list[Callback]) -> pl.Trainer:
    """The Trainer every scenario runs in: one device, no validation, progress bar, summary or checkpoints."""
    return pl.Trainer(
        accelerator=ACCELERATOR,
        devices=1,
        max_steps=max_steps,
        logger=logger,
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        log_every_n_steps=LOGGED_EVERY,
    )


def fit_once(
    model_name: str,
    scenario: str,
    warmup: int,
    steps: int,
    tmp: str,
    repeat: int,
    memory: PeakRSS,
    loggers: Callable[[str], list[Any]] | None = None,
    callbacks_of: Callable[[str, str], list[Callback]] | None = None,
    parts: _Attribution | None = None,
) -> Run:
    """One fit of ``warmup + steps + 1`` steps; ``loggers(name)`` replaces the TensorBoardLogger,
    ``callbacks_of`` replaces :func:`scenario_callbacks`, ``parts`` the time attribution."""
    model = make_model(model_name)
    ours = scenario not in ("plain", "handwritten", "wandb_watch")
    parts = (parts or _Attribution()) if ours else None
    timer = StepTimer(parts)
    callbacks = [timer, *(callbacks_of or scenario_callbacks)(scenario, tmp)]
    name = f"{model_name}-{scenario}"
    if loggers is not None:
        logger = loggers(name)
    else:
        logger = TensorBoardLogger(save_dir=tmp, name=name, version=repeat)
    trainer = bench_trainer(warmup + steps + 1, logger, callbacks)
    _release_memory()
    if ACCELERATOR == "gpu":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    memory.start()
    with parts if parts is not None else contextlib.nullcontext():
        trainer.fit(model)
    peak = memory.stop()
    peak_gpu = torch.cuda.max_memory_allocated() / 2**20 if ACCELERATOR == "gpu" else 0.0
    gaps = [b - a for a, b in itertools.pairwise(timer.starts)][warmup : warmup + steps]
    if len(gaps) != steps:
        raise RuntimeError(f"{model_name}/{scenario}: measured {len(gaps)} steps, expected {steps}")
    cpu = (timer.cpu[warmup + steps] - timer.cpu[warmup]) / steps
    inside = (timer.inside[warmup + steps] - timer.inside[warmup]) / steps
    return Run(
        model_name,
        scenario,
        repeat,
        sum(gaps) / len(gaps),
        statistics.median(gaps),
        cpu,
        inside,
        peak / 2**20,
        (peak - memory.start_bytes) / 2**20,
        peak_gpu,
        gaps,
    )


# ------------------------------------------------------------------------------------------------
# Floor and micro-benchmarks
# ------------------------------------------------------------------------------------------------


def inspected_tensors(model_name: str, tmp: str) -> dict[str, list[torch.Tensor]]:
    """The tensors every_step reduces in one logged step, captured in a one-step fit.

    Captured where the monitors call ``reduce_tensor``; if that name moved, rebuilt by hand
    (outputs and output gradients of the selected modules, parameter gradients, weights).
    """
    import importlib

    captured: dict[str, list[torch.Tensor]] = {}
    undo = []
    for kind in ("activations", "gradients", "weights"):
        try:
            module = importlib.import_module(f"lightning_inspect.{kind}")
            original = module.reduce_tensor
        except (ImportError, AttributeError):
            continue

        def capture(
            x: torch.Tensor, *args: Any, _original: Any = original, _kind: str = kind, **kwargs: Any
        ) -> Any:
            captured.setdefault(_kind, []).append(x.detach())
            return _original(x, *args, **kwargs)

        module.reduce_tensor = capture
        undo.append((module, original))
    try:
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=1,
            max_steps=1,
            logger=TensorBoardLogger(save_dir=tmp, name="floor"),
            callbacks=scenario_callbacks("every_step", tmp),
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
            num_sanity_val_steps=0,
            limit_val_batches=0,
        )
        trainer.fit(make_model(model_name))
    finally:
        for module, original in undo:
            module.reduce_tensor = original
    return captured or _inspected_tensors_by_hand(model_name)


def _inspected_tensors_by_hand(model_name: str) -> dict[str, list[torch.Tensor]]:
    model = make_model(model_name)
    selected = select_modules(model)
    acts: list[torch.Tensor] = []
    act_grads: list[torch.Tensor] = []
    handles = []
    for module in selected.values():

        def hook(mod: nn.Module, args: Any, out: Any) -> None:
            for t in out if isinstance(out, tuple) else (out,):
                if isinstance(t, torch.Tensor):
                    acts.append(t.detach())
                    if t.requires_grad:
                        t.register_hook(lambda g: act_grads.append(g.detach()))

        handles.append(module.register_forward_hook(hook))
    batch = model.make_batch(torch.Generator().manual_seed(1))
    model.loss(batch).backward()
    for h in handles:
        h.remove()
    params = [p for m in selected.values() for p in m.parameters()]
    return {
        "activations": acts,
        "gradients": act_grads + [p.grad.detach() for p in params if p.grad is not None],
        "weights": [p.detach() for p in params],
    }


def _median_time(fn: Callable[[], Any], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        _sync()
        t0 = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def floor(model_name: str, repeats: int, tmp: str) -> dict[str, Any]:
    groups = inspected_tensors(model_name, tmp)
    tensors = [t for ts in groups.values() for t in ts]
    n_elements = sum(t.numel() for t in tensors)

    def read_pass() -> None:
        for t in tensors:
            t.sum()

    def reduce_hist() -> None:
        for t in tensors:
            reduce_tensor(t, 64)

    def reduce_nohist() -> None:
        for t in tensors:
            reduce_tensor(t, 0)

    return {
        "tensors": len(tensors),
        "elements": n_elements,
        "by_group": {k: len(v) for k, v in groups.items()},
        "read_pass_s": _median_time(read_pass, repeats),
        "reduce_tensor_bins64_s": _median_time(reduce_hist, repeats),
        "reduce_tensor_bins0_s": _median_time(reduce_nohist, repeats),
    }


def probe_microbench() -> dict[str, Any]:
    probe = getattr(lightning_inspect, "probe", None)
    enabled = getattr(lightning_inspect, "enabled", None)
    if probe is None:
        try:
            from lightning_inspect.probes.context import enabled, probe  # type: ignore[no-redef]
        except Exception as exc:  # not there yet, or broken: skip, say why
            return {
                "skipped": f"lightning_inspect.probe is not importable ({type(exc).__name__}: {exc})"
            }
    env = os.environ.pop("LIGHTNING_INSPECT", None)
    try:
        with contextlib.suppress(Exception):
            from lightning_inspect import probes as _probes

            _probes.reload_env()

        @probe("bench.off")
        def probed(x: Any) -> None:
            return None

        def plain(x: Any) -> None:
            return None

        assert probed(1) is None
        n = 200_000

        def ns(stmt: Callable[[], Any]) -> float:
            return min(timeit.repeat(stmt, number=n, repeat=7)) / n * 1e9

        out = {
            "probe_off_ns": ns(lambda: probed(1)),
            "plain_call_ns": ns(lambda: plain(1)),
        }
        if enabled is not None:
            out["enabled_off_ns"] = ns(lambda: enabled("bench.off"))
        return out
    finally:
        if env is not None:
            os.environ["LIGHTNING_INSPECT"] = env


# ------------------------------------------------------------------------------------------------
# Profile of every_step
# ------------------------------------------------------------------------------------------------


class _Attribution:
    """Wall-clock time spent in named parts of lightning-inspect, by timing wrappers (exclusive times).

    Patches module attributes for the duration of a ``with`` block. The names are internal: a part
    that no longer exists is skipped with a note, so the benchmark keeps working as the code moves.
    """

    def __init__(self) -> None:
        self.time: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self.keys: dict[str, int] = {}  # labels patched with count_keys: keys in their mappings
        self.background: set[str] = set()  # labels timed on worker threads (CPU time, not total())
        self.missing: list[str] = []
        self._local = threading.local()  # one stack of nested calls per thread
        self._lock = threading.Lock()
        self._undo: list[tuple[Any, str, Any]] = []

    def _wrap(
        self, label: str, fn: Callable[..., Any], background: bool = False, count_keys: bool = False
    ) -> Callable[..., Any]:
        clock = time.thread_time if background else time.perf_counter

        def timed(*args: Any, **kwargs: Any) -> Any:
            stack = self._local.__dict__.setdefault("stack", [])
            t0 = clock()
            stack.append(0.0)
            try:
                return fn(*args, **kwargs)
            finally:
                inner = stack.pop()
                dt = clock() - t0
                with self._lock:
                    self.time[label] = self.time.get(label, 0.0) + dt - inner
                    self.calls[label] = self.calls.get(label, 0) + 1
                    if count_keys:  # (self, mapping, step)
                        self.keys[label] = self.keys.get(label, 0) + len(args[1])
                if stack:
                    stack[-1] += dt

        return timed

    def patch(
        self, label: str, owner: str, attr: str, background: bool = False, count_keys: bool = False
    ) -> None:
        """Time ``owner.attr`` under ``label`` (``background``: on worker threads, CPU time)."""
        import importlib

        module_name, _, cls = owner.partition(":")
        try:
            target = importlib.import_module(module_name)
            if cls:
                target = getattr(target, cls)
            original = getattr(target, attr)
        except (ImportError, AttributeError):
            self.missing.append(f"{owner}.{attr}")
            return
        self._undo.append((target, attr, original))
        setattr(target, attr, self._wrap(label, original, background, count_keys))
        if background:
            self.background.add(label)

    def __enter__(self) -> _Attribution:  # typing.Self needs Python 3.11
        mon, core = "lightning_inspect.monitors", "lightning_inspect.core"
        for mod in ("activations", "gradients", "weights"):
            self.patch("reduce_tensor (stats.py)", f"{mon}.{mod}", "reduce_tensor")
        tb = "lightning_inspect.backends.tensorboard:TensorBoardSink"
        self.patch("TensorBoard writes: scalars", tb, "log_scalars", count_keys=True)
        self.patch("TensorBoard writes: histograms", tb, "log_histograms", count_keys=True)
        base = f"{core}.monitor:ModuleMonitor"
        self.patch("publish: summarise rows, keys, non-finite check", base, "_publish")
        self.patch("to_host: one transfer, merge rows", f"{core}.recorder", "to_host")
        self.patch(
            "WeightMonitor before step (+ clone for update ratio)",
            f"{mon}.weights:WeightMonitor",
            "_before_optimizer_step",
        )
        self.patch(
            "WeightMonitor update ratio after step",
            f"{mon}.weights:WeightMonitor",
            "_after_optimizer_step",
        )
        self.patch(
            "GradientMonitor parameter loop + global norm",
            f"{mon}.gradients:GradientMonitor",
            "_before_optimizer_step",
        )
        hooks = f"{core}.hooks"
        self.patch("forward hooks (walk outputs, tensor hooks)", f"{hooks}:OutputHook", "__call__")
        self.patch("output-gradient hooks", f"{hooks}:OutputGradHook", "__call__")
        for hook in ("on_train_batch_start", "on_before_optimizer_step", "on_train_batch_end"):
            self.patch("callback glue (the rest of the hooks)", base, hook)
        if self.missing:  # a renamed module or method would silently shrink the in-lib figures
            raise RuntimeError(f"in-lib attribution: not found: {self.missing}")
        return self

    def total(self) -> float:
        """Seconds spent inside the wrapped parts so far, on the training thread."""
        return sum(t for label, t in self.time.items() if label not in self.background)

    def __exit__(self, *exc: object) -> None:
        for target, attr, original in reversed(self._undo):
            setattr(target, attr, original)
        self._undo = []


def profile_every_step(model_name: str, steps: int, top: int) -> None:
    """Where every_step's extra time goes: wall-clock attribution, then torch.profiler's top ops."""
    warmup = 3
    with tempfile.TemporaryDirectory(prefix="li-bench-") as tmp:
        memory = PeakRSS()
        plain = statistics.median(
            fit_once(model_name, "plain", warmup, steps, tmp, i, memory).step_mean_s
            for i in range(3)
        )
        with _Attribution() as parts:
            every = fit_once(model_name, "every_step", warmup, steps, tmp, 0, memory).step_mean_s
        n = warmup + steps + 1  # the wrappers saw every step of the fit
        overhead = every - plain
        print(
            f"\n=== {model_name}: plain {plain * 1e3:.1f} ms/step, every_step {every * 1e3:.1f} ms/step, "
            f"overhead {overhead * 1e3:.1f} ms/step; wall-clock attribution (exclusive) ==="
        )
        total = 0.0
        for label, t in sorted(parts.time.items(), key=lambda kv: -kv[1]):
            total += t / n
            print(
                f"  {t / n * 1e3:8.1f} ms/step {t / n / overhead:6.1%}  {parts.calls[label] / n:5.1f} calls/step  {label}"
            )
        print(
            f"  {(overhead - total) * 1e3:8.1f} ms/step {(overhead - total) / overhead:6.1%}  elsewhere "
            "(autograd with tensor hooks, allocator, timing noise)"
        )
        for name in parts.missing:
            print(f"  note: {name} not found, not attributed")

        model = make_model(model_name)
        window = _ProfileWindow(warmup=warmup, steps=steps)
        trainer = bench_trainer(
            warmup + steps + 1,
            TensorBoardLogger(save_dir=tmp, name="profile"),
            [window, *scenario_callbacks("every_step", tmp)],
        )
        trainer.fit(model)
        print(
            f"\n=== torch.profiler, {model_name}/every_step, {steps} steps: top {top} ops by self CPU time ==="
        )
        print(window.prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top))


class _ProfileWindow(Callback):
    """Runs torch.profiler over steps [warmup, warmup + steps)."""

    def __init__(self, warmup: int, steps: int) -> None:
        from torch.profiler import ProfilerActivity, profile

        self.warmup, self.steps = warmup, steps
        self.prof = profile(activities=[ProfilerActivity.CPU])
        self.n = 0

    def on_train_batch_start(self, *args: Any) -> None:
        if self.n == self.warmup:
            self.prof.__enter__()
        elif self.n == self.warmup + self.steps:
            self.prof.__exit__(None, None, None)
        self.n += 1


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------


@dataclass
class Summary:
    model: str
    scenario: str
    step_s: float  # median over repetitions of the per-repetition mean s/step
    step_median_s: float  # median over repetitions of the per-repetition median step
    ratio: float  # median of per-repetition ratios to plain
    ratio_lo: float
    ratio_hi: float
    cpu_step_s: float  # median over repetitions of the CPU time per step
    cpu_ratio: float  # median of per-repetition CPU-time ratios to plain
    inside_s: float  # median over repetitions of the time per step inside lightning_inspect
    inside_ratio: float  # median of (plain + inside) / plain: the overhead our own code explains
    peak_increase_mb: float
    peak_rss_mb: float
    repeats: int


def summarise(runs: list[Run], scenarios: list[str]) -> list[Summary]:
    out = []
    for model in dict.fromkeys(r.model for r in runs):
        plain = {r.repeat: r for r in runs if r.model == model and r.scenario == "plain"}
        for scenario in scenarios:
            rs = [r for r in runs if r.model == model and r.scenario == scenario]
            if not rs:
                continue
            ratios = [r.step_mean_s / plain[r.repeat].step_mean_s for r in rs]
            cpu_ratios = [r.step_cpu_s / plain[r.repeat].step_cpu_s for r in rs]
            inside_ratios = [1 + r.inside_s / plain[r.repeat].step_mean_s for r in rs]
            out.append(
                Summary(
                    model,
                    scenario,
                    statistics.median(r.step_mean_s for r in rs),
                    statistics.median(r.step_median_s for r in rs),
                    statistics.median(ratios),
                    min(ratios),
                    max(ratios),
                    statistics.median(r.step_cpu_s for r in rs),
                    statistics.median(cpu_ratios),
                    statistics.median(r.inside_s for r in rs),
                    statistics.median(inside_ratios),
                    statistics.median(r.peak_increase_mb for r in rs),
                    max(r.peak_rss_mb for r in rs),
                    len(rs),
                )
            )
    return out


def print_table(summaries: list[Summary]) -> None:
    w = max(13, *(len(s.scenario) + 1 for s in summaries))
    head = (
        f"{'model':<12}{'scenario':<{w}}{'ms/step':>9}{'(typical)':>10}{'ratio':>7}"
        f"{'  [min, max]':<17}{'CPU ms':>8}{'ratio':>7}{'in-lib ms':>10}{'ratio':>7}"
        f"{'peak +MB':>9}{'peak MB':>8}"
    )
    print(head)
    print("-" * len(head))
    last = None
    for s in summaries:
        if last is not None and s.model != last:
            print()
        last = s.model
        spread = f"[{s.ratio_lo:.2f}, {s.ratio_hi:.2f}]"
        inside = (
            f"{s.inside_s * 1e3:>10.3f}{s.inside_ratio:>7.3f}"
            if s.scenario not in ("plain", "handwritten", "wandb_watch")
            else f"{'':>10}{'':>7}"
        )
        print(
            f"{s.model:<12}{s.scenario:<{w}}{s.step_s * 1e3:>9.2f}{s.step_median_s * 1e3:>10.2f}"
            f"{s.ratio:>7.3f}  {spread:<15}{s.cpu_step_s * 1e3:>8.2f}{s.cpu_ratio:>7.3f}{inside}"
            f"{s.peak_increase_mb:>9.1f}{s.peak_rss_mb:>8.0f}"
        )


CLOCKS = ("wall", "cpu", "in-lib")


def check_targets(summaries: list[Summary]) -> list[dict[str, Any]]:
    """The project's targets, judged on each estimate of the ratio to plain.

    ``wall``: wall-clock ratio (what users feel; the noisiest on a shared machine); ``cpu``: CPU
    time ratio; ``in-lib``: 1 + time spent inside lightning_inspect's code / plain step (robust,
    but blind to indirect costs such as autograd slowed by tensor hooks). Comparisons with the
    baselines have no ``in-lib`` estimate.
    """
    by = {(s.model, s.scenario): s for s in summaries}
    results: list[dict[str, Any]] = []

    def ratio(s: Summary, clock: str) -> float:
        return {"wall": s.ratio, "cpu": s.cpu_ratio, "in-lib": s.inside_ratio}[clock]

    for model in dict.fromkeys(s.model for s in summaries):
        off, every, every_50, hand, watch = (
            by.get((model, sc))
            for sc in ("off", "every_step", "every_50", "handwritten", "wandb_watch")
        )
        limits = ((off, "off <= 1.01 x plain", 1.01), (every_50, "every_50 <= 1.03 x plain", 1.03))
        for ours, name, limit in limits:
            if ours:
                row: dict[str, Any] = {"model": model, "target": name}
                for c in CLOCKS:
                    row[c] = (f"{ratio(ours, c):.3f}", ratio(ours, c) <= limit)
                results.append(row)
        for other, name, factor in (
            (hand, "1/2 handwritten's", 0.5),
            (watch, "wandb.watch's", 1.0),
        ):
            if every and other:
                row = {"model": model, "target": f"every_step overhead < {name}"}
                for c in CLOCKS[:2]:
                    mine, theirs = ratio(every, c) - 1, ratio(other, c) - 1
                    row[c] = (f"{mine:+.0%} vs {theirs:+.0%}", mine < factor * theirs)
                results.append(row)
    return results


# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------


def _quiet() -> None:
    for name in (
        "lightning.pytorch",
        "lightning.fabric",
        "lightning",
        "pytorch_lightning",
        "wandb",
    ):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*IterableDataset.*")
    warnings.filterwarnings("ignore", message=".*val_dataloader.*")
    warnings.filterwarnings("ignore", category=UserWarning, module="lightning")
    warnings.filterwarnings(
        "ignore", message=".*LeafSpec.*"
    )  # Lightning's own use of torch's pytree
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ["WANDB_MODE"] = "offline"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke-test settings (~1 minute): --steps 10 --costly-steps 3 --warmup 1 --repeats 1, "
        "no warm-up round; every_50 then logs inside warm-up only",
    )
    p.add_argument(
        "--steps",
        type=int,
        help=f"measured steps per run of plain, off, every_50 (default 50; keep a multiple of {LOGGED_EVERY})",
    )
    p.add_argument(
        "--costly-steps",
        type=int,
        help=f"measured steps per run of the scenarios that cost the same every step: "
        f"{', '.join(UNIFORM_SCENARIOS[:3])} and the diagnostics (default 6)",
    )
    p.add_argument(
        "--warmup", type=int, help="steps run before measuring, in every run (default 3)"
    )
    p.add_argument("--repeats", type=int, help="repetitions of the round-robin (default 3)")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: stable on a shared machine; see README)",
    )
    p.add_argument(
        "--models", default="mlp,cnn,transformer", help="comma-separated: mlp,cnn,transformer"
    )
    p.add_argument(
        "--scenarios",
        default=",".join(DEFAULT_SCENARIOS),
        help=f"comma-separated, from {','.join(ALL_SCENARIOS)} (the last {len(DIAGNOSTIC_SCENARIOS)} "
        "are diagnostics: every_step without TensorBoard writes / histograms / update ratio, "
        "and our monitors reading only what wandb.watch reads)",
    )
    p.add_argument("--no-wandb", action="store_true", help="skip the wandb.watch baseline")
    p.add_argument(
        "--accelerator",
        choices=("cpu", "gpu"),
        default="cpu",
        help="where the models train (gpu: one CUDA device; default cpu)",
    )
    p.add_argument("--json", type=Path, help="write every measurement and the summary here")
    p.add_argument(
        "--profile", metavar="MODEL", help="profile plain and every_step for MODEL instead"
    )
    p.add_argument("--profile-steps", type=int, default=10)
    args = p.parse_args(argv)
    args.steps = args.steps or (10 if args.quick else 50)
    args.costly_steps = args.costly_steps or (3 if args.quick else 6)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    bad = [m for m in args.models if m not in MODELS]
    if bad:
        p.error(f"--models: unknown {bad}; choose from {sorted(MODELS)}")
    args.scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    bad = [s for s in args.scenarios if s not in ALL_SCENARIOS]
    if bad:
        p.error(f"--scenarios: unknown {bad}; choose from {list(ALL_SCENARIOS)}")
    if "plain" not in args.scenarios:
        args.scenarios.insert(0, "plain")
    if min(args.steps, args.costly_steps, args.repeats) < 1 or args.warmup < 0:
        p.error("--steps, --costly-steps and --repeats must be >= 1, --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    global ACCELERATOR
    if args.accelerator == "gpu" and not torch.cuda.is_available():
        print(
            "--accelerator gpu: torch sees no CUDA device here; run on a GPU machine or use --accelerator cpu"
        )
        return 2
    ACCELERATOR = args.accelerator
    _quiet()
    torch.set_num_threads(args.threads)
    gc.collect()
    gc.freeze()  # the imported modules' objects: never garbage, no need to scan them per run
    if args.profile:
        if args.profile not in MODELS:
            print(f"--profile: unknown model {args.profile!r}; choose from {sorted(MODELS)}")
            return 2
        profile_every_step(args.profile, args.profile_steps, top=15)
        return 0

    scenarios = list(args.scenarios)
    notes: list[str] = []
    if "wandb_watch" in scenarios:
        ok, why = wandb_available()
        if args.no_wandb or not ok:
            scenarios.remove("wandb_watch")
            notes.append("wandb_watch skipped: " + ("--no-wandb" if args.no_wandb else why))
    if args.steps % LOGGED_EVERY:
        notes.append(
            f"--steps {args.steps} is not a multiple of {LOGGED_EVERY}: every_50's cost is "
            "not amortised evenly over the measured window"
        )

    memory = PeakRSS()
    print(f"lightning-inspect {lightning_inspect.__version__} overhead benchmark")
    print(
        f"python {platform.python_version()}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"lightning {pl.__version__}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}"
    )
    print(f"models {args.models}; scenarios {scenarios}")
    print(
        f"{args.repeats} repetitions x ({args.warmup} warm-up + {args.steps} measured steps, "
        f"{args.costly_steps} for {', '.join(s for s in scenarios if s in UNIFORM_SCENARIOS)}) per scenario; "
        f"memory: {memory.method}"
    )
    for note in notes:
        print("note:", note)

    started = time.perf_counter()
    runs: list[Run] = []
    floors: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="li-bench-") as tmp:
        for model in args.models:
            if not args.quick and model == args.models[0]:
                # Warm-up round, not recorded: lazy imports, first writers, wandb's service start.
                for scenario in scenarios:
                    fit_once(model, scenario, 0, 1, tmp, -1, memory)
            for rep in range(args.repeats):
                k = rep % len(scenarios)
                order = scenarios[k:] + scenarios[:k]  # rotate, so no scenario always runs first
                for scenario in order:
                    steps = args.costly_steps if scenario in UNIFORM_SCENARIOS else args.steps
                    runs.append(fit_once(model, scenario, args.warmup, steps, tmp, rep, memory))
                print(
                    f"  {model}: repetition {rep + 1}/{args.repeats} done "
                    f"({time.perf_counter() - started:.0f} s)",
                    flush=True,
                )
            floors[model] = floor(model, 5 if args.quick else 20, tmp)
        _wandb_finish()

    summaries = summarise(runs, scenarios)
    print()
    print(
        "ms/step: median over repetitions of the mean step time (amortises every_50's logged steps);"
    )
    print("(typical): median step; ratio: median of per-repetition ratios to plain [min, max];")
    print(
        "CPU ms, ratio: the same from CPU time (this process and its children): less load-sensitive;"
    )
    print(
        "in-lib ms, ratio: time spent inside lightning_inspect's code per step; 1 + that / plain step;"
    )
    print("peak +MB: median peak RSS increase over the run's start; peak MB: highest absolute RSS.")
    print()
    print_table(summaries)
    if ACCELERATOR == "gpu":
        print("\npeak GPU memory (max_memory_allocated, median over repetitions), MB:")
        for model in args.models:
            cells = []
            for scenario in scenarios:
                peaks = [
                    r.peak_gpu_mb
                    for r in runs
                    if r.model == model and r.scenario == scenario and r.repeat >= 0
                ]
                if peaks:
                    cells.append(f"{scenario} {statistics.median(peaks):.0f}")
            print(f"  {model:<12}" + ", ".join(cells))

    by = {(s.model, s.scenario): s for s in summaries}
    if any((sc == "every_step") for _, sc in by) and any(sc == "every_50" for _, sc in by):
        print(
            f"\nevery_50 expected from the other rows, 1 + (every_step - 1) / {LOGGED_EVERY} + (off - 1) "
            "(less noisy than the every_50 row, which holds few logged steps):"
        )
        for model in args.models:
            if (model, "every_step") in by:
                off = by[(model, "off")].ratio - 1 if (model, "off") in by else 0.0
                print(
                    f"  {model:<12}{1 + (by[(model, 'every_step')].ratio - 1) / LOGGED_EVERY + off:.3f}"
                    f"   (logged-step share alone: {1 + (by[(model, 'every_step')].ratio - 1) / LOGGED_EVERY:.3f})"
                )

    print(
        "\nFloor: one read pass (t.sum()) over the tensors every_step reduces in a logged step, vs. our reduction"
    )
    for model, f in floors.items():
        p = by[(model, "plain")].step_s
        line = (
            f"  {model:<12}{f['tensors']:>4} tensors, {f['elements'] / 1e6:5.2f} M elements: read pass "
            f"{f['read_pass_s'] * 1e3:6.2f} ms ({f['read_pass_s'] / p:5.1%} of a plain step); reduce_tensor "
            f"bins=64 {f['reduce_tensor_bins64_s'] * 1e3:6.2f} ms, bins=0 {f['reduce_tensor_bins0_s'] * 1e3:6.2f} ms"
        )
        if (model, "every_step") in by:
            line += f"; every_step overhead {(by[(model, 'every_step')].step_s - p) * 1e3:6.2f} ms"
        print(line)

    probes = probe_microbench()
    print("\nProbes switched off:", end=" ")
    if "skipped" in probes:
        print("skipped:", probes["skipped"])
    else:
        print(
            f"{probes['probe_off_ns']:.0f} ns per call of a @probe function "
            f"(a plain Python call: {probes['plain_call_ns']:.0f} ns)"
            + (
                f"; enabled(tag): {probes['enabled_off_ns']:.0f} ns"
                if "enabled_off_ns" in probes
                else ""
            )
        )

    targets = check_targets(summaries)
    print(
        f"\nTargets ({'one CUDA device' if ACCELERATOR == 'gpu' else 'CPU-only machine'}; medians of per-repetition ratios) judged on: "
        "wall clock | CPU time | time inside lightning_inspect"
    )
    for t in targets:
        cells = [f"{'PASS' if t[c][1] else 'FAIL'} {t[c][0]}" if c in t else "" for c in CLOCKS]
        print(
            f"  {t['model']:<12}{t['target']:<40}" + " | ".join(f"{c:<22}" for c in cells).rstrip()
        )
    elapsed = time.perf_counter() - started
    print(
        f"\nfinished in {elapsed:.0f} s; load average now {os.getloadavg()[0]:.2f} "
        f"(other processes running make the numbers noisier: compare ratios, not seconds)"
    )

    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "settings": {
                        k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                    },
                    "environment": {
                        "python": platform.python_version(),
                        "torch": torch.__version__,
                        "lightning": pl.__version__,
                        "threads": torch.get_num_threads(),
                        "cpus": os.cpu_count(),
                        "accelerator": ACCELERATOR,
                        "gpu": torch.cuda.get_device_name(0) if ACCELERATOR == "gpu" else None,
                        "memory_method": memory.method,
                    },
                    "notes": notes,
                    "runs": [asdict(r) for r in runs],
                    "summary": [asdict(s) for s in summaries],
                    "floor": floors,
                    "probes": probes,
                    "targets": targets,
                    "elapsed_s": elapsed,
                },
                indent=2,
            )
        )
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

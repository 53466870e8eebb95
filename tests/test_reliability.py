"""Real-model situations: torch.compile, activation checkpointing, bf16 autocast, exceptions."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from lightning_inspect import ActivationMonitor, GradientMonitor, MemorySink, WeightMonitor


def _fit(model: L.LightningModule, callbacks: list, steps: int = 4, **trainer_kwargs) -> L.Trainer:
    data = torch.utils.data.TensorDataset(torch.randn(64, 8), torch.randint(0, 2, (64,)))
    trainer = L.Trainer(
        max_steps=steps,
        logger=False,
        callbacks=callbacks,
        accelerator="cpu",
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        **trainer_kwargs,
    )
    trainer.fit(model, torch.utils.data.DataLoader(data, batch_size=8))
    return trainer


class Classifier(L.LightningModule):
    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))


def _no_hooks_left(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


@pytest.mark.slow
def test_compiled_module_is_inspected_without_recompiling_each_logged_step() -> None:
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = Classifier(torch.compile(_mlp()))
    sink = MemorySink()
    trainer = _fit(
        model,
        [
            ActivationMonitor(every_n_steps=2, backends=[sink]),
            GradientMonitor(every_n_steps=3, backends=[sink]),
        ],
        steps=8,
    )
    # Names are normalised (no ``_orig_mod``) and every logged step is seen.
    assert sink.steps("activations/body.0/mean") == [0, 2, 4, 6]
    assert sink.steps("activation_grads/body.0/mean") == [0, 3, 6]
    assert sink.steps("param_grads/body.0.weight/mean") == [0, 3, 6]
    # Two graph variants (recording or not), however many steps are logged.
    assert counters["stats"]["unique_graphs"] <= 4
    assert _no_hooks_left(trainer.lightning_module)


class Checkpointed(nn.Module):
    def __init__(self, use_reentrant: bool) -> None:
        super().__init__()
        self.pre = nn.Linear(8, 8)  # so the checkpointed segment's input requires grad
        self.inner = _mlp()
        self.use_reentrant = use_reentrant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return checkpoint(self.inner, self.pre(x), use_reentrant=self.use_reentrant)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_activation_checkpointing_does_not_count_recomputed_forwards(use_reentrant: bool) -> None:
    torch.manual_seed(0)
    sink = MemorySink()
    model = Classifier(Checkpointed(use_reentrant))
    monitor = ActivationMonitor(
        modules=["body.inner.0"], every_n_steps=1, stats=["mean"], backends=[sink]
    )
    _fit(model, [monitor], steps=2)
    # One forward per step, 8 x 16 values: the recomputation during backward is not recorded.
    hist = sink.histograms["activations/body.inner.0"][0][1]
    assert hist.num == 8 * 16


def test_bf16_autocast_statistics_are_float32_and_training_is_unchanged() -> None:
    def run(with_monitors: bool) -> tuple[dict[str, torch.Tensor], MemorySink]:
        torch.manual_seed(0)
        sink = MemorySink()
        callbacks = (
            [
                ActivationMonitor(every_n_steps=1, backends=[sink]),
                GradientMonitor(every_n_steps=1, backends=[sink]),
                WeightMonitor(every_n_steps=1, backends=[sink]),
            ]
            if with_monitors
            else []
        )
        model = Classifier(_mlp())
        _fit(model, callbacks, steps=3, precision="bf16-mixed")
        return {k: v.clone() for k, v in model.state_dict().items()}, sink

    plain, _ = run(False)
    inspected, sink = run(True)
    assert all(torch.equal(plain[k], inspected[k]) for k in plain)
    # bf16 activations are read as float32: values finite, histograms present.
    assert sink.steps("activations/body.0/mean") == [0, 1, 2]
    assert sink.last("activations/body.0/nan_count") == 0
    assert sink.histograms["activations/body.0"][0][1].num == 8 * 16


def test_exception_in_training_step_leaves_no_hooks() -> None:
    class Failing(Classifier):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            if self.global_step == 2:
                raise RuntimeError("user code failed")
            return loss

    sink = MemorySink()
    model = Failing(_mlp())
    with pytest.raises(RuntimeError, match="user code failed"):
        _fit(
            model,
            [
                ActivationMonitor(every_n_steps=1, backends=[sink]),
                GradientMonitor(every_n_steps=1, backends=[sink]),
            ],
        )
    assert _no_hooks_left(model)
    # What was logged stays; the interrupted step publishes what its forward recorded.
    assert sink.steps("activations/body.0/mean") == [0, 1, 2]
    assert sink.flushes >= 1

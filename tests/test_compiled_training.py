"""What inspection keeps of a ``torch.compile`` run (the README's exact claim).

Eager training is bit for bit the same with and without inspection (tests/test_monitors.py,
tests/test_property.py). Compiled, the hooks are part of the compiled code: steps that are not
recorded run the same code as without inspection; a recorded step runs the variant split at the
hooks (graph breaks), whose rounding can differ, and later steps carry that difference on.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import pytest
import torch
from torch import nn

from lightning_inspect import ActivationMonitor, GradientMonitor, MemorySink, WeightMonitor


class _Net(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        layers = [nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 2)]
        self.body = torch.compile(nn.Sequential(*layers))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.body(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class _EachStep(L.Callback):
    """The loss and a copy of the weights after every optimizer step."""

    def __init__(self) -> None:
        self.losses: list[torch.Tensor] = []
        self.weights: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        self.losses.append(outputs["loss"].detach().clone())
        self.weights.append({k: v.clone() for k, v in pl_module.state_dict().items()})


def _fit(monitors: list[L.Callback]) -> _EachStep:
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = _Net()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(48, 8, generator=g), torch.randint(0, 2, (48,), generator=g)
    data = torch.utils.data.TensorDataset(x, y)
    steps = _EachStep()
    L.Trainer(
        max_steps=5,
        logger=False,
        callbacks=[*monitors, steps],
        accelerator="cpu",
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    ).fit(model, torch.utils.data.DataLoader(data, batch_size=8))
    return steps


@pytest.mark.slow
def test_compiled_training_is_identical_until_the_first_recorded_step() -> None:
    plain = _fit([])
    sink = MemorySink()
    every = dict(start_step=2, every_n_steps=2, backends=[sink])  # records steps 2 and 4
    inspected = _fit([ActivationMonitor(**every), GradientMonitor(**every), WeightMonitor(**every)])
    assert sink.steps("activations/body.0/mean") == [2, 4]
    assert sink.steps("activation_grads/body.0/mean") == [2, 4]
    # Steps 0 and 1 are not recorded: the hooks are compiled in, and the results are the same bits.
    for step in (0, 1):
        assert torch.equal(plain.losses[step], inspected.losses[step])
        for k, w in inspected.weights[step].items():
            assert torch.equal(w, plain.weights[step][k]), (step, k)
    # From the first recorded step on, the runs may differ, by float rounding only (here the
    # weights by 4e-9 from step 2 on, the losses not at all).
    for step in range(2, 5):
        torch.testing.assert_close(inspected.losses[step], plain.losses[step], rtol=1e-5, atol=1e-6)
        for k, w in inspected.weights[step].items():
            torch.testing.assert_close(w, plain.weights[step][k], rtol=1e-5, atol=1e-6)

"""FSDP2 (``fully_shard`` in ``configure_model``) on two CPU processes, used by tests/test_distributed.py.

Run as ``python tests/scripts/fsdp2_train.py <log_dir>``; Lightning starts the second process by
running this script again.
"""

from __future__ import annotations

import sys

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

from lightning_inspect import ActivationMonitor, GradientMonitor, WeightMonitor


class ShardedNet(L.LightningModule):
    """Three Linear layers, each sharded across the two ranks when the model is configured."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 1)
        )

    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for module in self.body:
            if isinstance(module, nn.Linear):
                fully_shard(module, mesh=mesh)
        fully_shard(self, mesh=mesh)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        x = torch.full((3, 4), float(self.global_rank + 1))
        return self(x).square().mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def main() -> None:
    torch.manual_seed(0)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        max_steps=2,
        logger=TensorBoardLogger(sys.argv[1], name="", version=""),
        callbacks=[
            ActivationMonitor(every_n_steps=1),
            GradientMonitor(every_n_steps=1),
            WeightMonitor(every_n_steps=1),
        ],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(ShardedNet(), torch.utils.data.DataLoader(torch.zeros(64, 1), batch_size=1))


if __name__ == "__main__":
    main()

"""Two-process DDP (gloo, CPU) training used by tests/test_distributed.py.

Run as ``python tests/scripts/ddp_train.py <log_dir> [unused_on_rank1]``; Lightning's DDP launcher
starts the second process by running this script again.
"""

from __future__ import annotations

import sys

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn

from lightning_inspect import ActivationMonitor, GradientMonitor, GraphMonitor, WeightMonitor


class TwoBranchNet(L.LightningModule):
    """Rank r sees inputs filled with r + 1; with ``skip_on_rank1`` rank 1 never calls ``extra``."""

    def __init__(self, skip_on_rank1: bool) -> None:
        super().__init__()
        self.body = nn.Linear(4, 4)
        self.extra = nn.Linear(4, 4)
        self.skip_on_rank1 = skip_on_rank1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(x)
        if not (self.skip_on_rank1 and self.global_rank == 1):
            h = h + self.extra(x)
        return h

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        x = torch.full((3, 4), float(self.global_rank + 1))
        return self(x).square().mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def main() -> None:
    log_dir = sys.argv[1]
    skip = len(sys.argv) > 2 and sys.argv[2] == "unused_on_rank1"
    torch.manual_seed(0)
    model = TwoBranchNet(skip)
    # The first layer's weights are constant so its outputs are known exactly on every rank.
    with torch.no_grad():
        model.body.weight.fill_(0.5)
        model.body.bias.zero_()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_find_unused_parameters_true" if skip else "ddp",
        max_steps=3,
        logger=TensorBoardLogger(log_dir, name="", version=""),
        callbacks=[
            ActivationMonitor(every_n_steps=1, modules=["body", "extra"]),
            GradientMonitor(every_n_steps=1, outputs=False),
            WeightMonitor(every_n_steps=1),
            GraphMonitor(),
        ],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    data = torch.utils.data.DataLoader(torch.zeros(64, 1), batch_size=1)
    trainer.fit(model, data)


if __name__ == "__main__":
    main()

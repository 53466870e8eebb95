"""A Hydra app training on two CPU processes with ``strategy="ddp_spawn"`` (gloo).

Used by tests/test_distributed.py, as the Lightning + Hydra template's ``trainer=ddp_sim`` runs:
``python ddp_spawn_hydra.py hydra.run.dir=<dir> [overrides]``. The batches are ``[x, y]`` lists and
``training_step`` calls ``self(x)``; RunRecord and GraphMonitor write to ``<dir>/tb``.
"""

from __future__ import annotations

from typing import Any

import hydra
import lightning as L
import torch
from hydra.core.config_store import ConfigStore
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import DictConfig
from torch import nn

from lightning_inspect import GraphMonitor, RunRecord

ConfigStore.instance().store(
    name="train",
    node={
        "model": {"hidden": 8},
        "trainer": {"max_steps": 2},
        "log_dir": "${hydra:runtime.output_dir}/tb",
    },
)


class ListBatchNet(L.LightningModule):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, hidden), nn.ReLU(), nn.Linear(hidden, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1)


@hydra.main(config_path=None, config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(32, 4), torch.randint(0, 2, (32,)))
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        max_steps=cfg.trainer.max_steps,
        logger=TensorBoardLogger(cfg.log_dir, name="", version=""),
        callbacks=[RunRecord(git=False, packages=False, verify_model=False), GraphMonitor()],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(ListBatchNet(cfg.model.hidden), torch.utils.data.DataLoader(data, batch_size=4))


if __name__ == "__main__":
    main()

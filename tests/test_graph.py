"""GraphMonitor: the traced graph and the structure table, read back from TensorBoard and MLflow."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from conftest import TinyMLP, TinyModule, loader, make_trainer, module_hook_counts, read_tb
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_inspect import ConfigError, GraphMonitor
from lightning_inspect.core.model_table import ModelTable, hook_modules
from lightning_inspect.monitors.graph import STRUCTURE_KEY

STRUCTURE_TAG = f"{STRUCTURE_KEY}/text_summary"


def structure_text(tb: Any) -> str:
    [event] = tb.acc.Tensors(STRUCTURE_TAG)
    return event.tensor_proto.string_val[0].decode()


def graph_ops(tb: Any) -> list[str]:
    return [n.op for n in tb.acc.Graph().node]


class Flat(TinyModule):
    """Several direct children used in sequence by forward (encoder + activation + head)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 4)
        self.act = nn.Tanh()
        self.fc2 = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def test_graph_and_structure_of_a_tensor_input_model(tb_logger) -> None:
    model = TinyMLP()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        make_trainer(2, logger=tb_logger, callbacks=[GraphMonitor()]).fit(model, loader())
    assert module_hook_counts(model) == {}
    tb = read_tb(tb_logger.log_dir)
    assert tb.tags["graph"] is True
    ops = graph_ops(tb)
    assert ops.count("aten::linear") == 3 and "aten::batch_norm" in ops and "aten::relu" in ops
    text = structure_text(tb)
    assert text.startswith("**TinyMLP**: ")
    params = sum(p.numel() for p in model.parameters())
    assert f"{params:,} parameters ({params:,} trainable, 0 frozen)" in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and "module" not in line]
    assert [r.split("|")[1].strip().replace("&nbsp;", "") for r in rows] == ["(model)", "net"] + [
        f"net.{i}" for i in range(6)
    ]
    # input and output shapes seen on the first batch
    assert "| Linear |  | input 0: (8, 6) float32 | (8, 8) float32 | 1 | 56 | 56 | 0 |" in rows[2]
    assert (
        len(tb.acc.Tensors(STRUCTURE_TAG)) == 1
    )  # logged once (at the step after the first batch)


def test_graph_covers_the_whole_forward_of_a_module_with_several_children(tb_logger) -> None:
    make_trainer(1, logger=tb_logger, callbacks=[GraphMonitor()]).fit(Flat(), loader())
    ops = graph_ops(read_tb(tb_logger.log_dir))
    assert ops.count("aten::linear") == 2 and "aten::tanh" in ops


class DictData(Dataset):
    def __len__(self) -> int:
        return 16

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(i)
        return {"x": torch.randn(6, generator=g), "y": torch.randn(1, generator=g)}


class DictEncoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 1)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.fc(batch["x"])


class DictModel(TinyModule):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = DictEncoder()

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.encoder(batch)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return nn.functional.mse_loss(self(batch), batch["y"])


def test_dict_input_model_warns_and_trains(tb_logger) -> None:
    model = DictModel()
    trainer = make_trainer(3, logger=tb_logger, callbacks=[GraphMonitor()])
    with pytest.warns(RuntimeWarning, match=r"GraphMonitor: could not trace.*dict") as record:
        trainer.fit(model, DataLoader(DictData(), batch_size=4))
    assert len([w for w in record if issubclass(w.category, RuntimeWarning)]) == 1
    assert trainer.global_step == 3
    tb = read_tb(tb_logger.log_dir)
    assert "DictEncoder" in structure_text(tb)  # the structure is still logged
    assert module_hook_counts(model) == {}


def _final_state(tmp: Path, callbacks: list) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    L.seed_everything(3, verbose=False)
    model = TinyMLP()
    logger = TensorBoardLogger(save_dir=str(tmp), name="", version="v")
    make_trainer(3, logger=logger, callbacks=callbacks).fit(model, loader(shuffle=True))
    return {k: v.clone() for k, v in model.state_dict().items()}, torch.get_rng_state()


def test_tracing_does_not_change_training_or_rng(tmp_path: Path) -> None:
    plain, rng_plain = _final_state(tmp_path / "a", [])
    traced, rng_traced = _final_state(tmp_path / "b", [GraphMonitor()])
    assert read_tb(tmp_path / "b").tags["graph"] is True
    for k in plain:
        assert torch.equal(plain[k], traced[k]), k
    assert torch.equal(rng_plain, rng_traced)


class FrozenNorm(TinyMLP):
    """A fine-tuning classic: the BatchNorm is frozen in eval mode by the user."""

    def __init__(self) -> None:
        super().__init__()
        self.net[1].eval()
        self.modes: list[bool] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.modes.append(self.net[1].training)
        return super().training_step(batch, batch_idx)


@pytest.mark.filterwarnings("ignore:.*module\\(s\\) in eval mode.*")
def test_tracing_keeps_each_submodules_training_mode(tb_logger) -> None:
    model = FrozenNorm()
    make_trainer(3, logger=tb_logger, callbacks=[GraphMonitor()]).fit(model, loader())
    assert model.modes == [False, False, False]
    assert torch.equal(model.net[1].running_mean, torch.zeros(8))


def test_structure_goes_to_mlflow_too(mlflow_logger, mlflow_client, tmp_path: Path) -> None:
    make_trainer(1, logger=mlflow_logger, callbacks=[GraphMonitor()]).fit(TinyMLP(), loader())
    path = mlflow_client.download_artifacts(
        mlflow_logger.run_id, "lightning_inspect/model/structure.md", str(tmp_path)
    )
    text = Path(path).read_text()
    assert text.startswith("**TinyMLP**")
    assert (
        "| &nbsp;&nbsp;net.1 | BatchNorm1d |  | input 0: (8, 8) float32 | (8, 8) float32 | 1 | 16 | 16 | 0 |"
        in text
    )  # indented by depth


def test_graph_off_structure_only(tb_logger) -> None:
    make_trainer(1, logger=tb_logger, callbacks=[GraphMonitor(graph=False)]).fit(
        TinyMLP(), loader()
    )
    tb = read_tb(tb_logger.log_dir)
    assert tb.tags["graph"] is False
    assert "BatchNorm1d" in structure_text(tb)


def test_structure_table_counts_frozen_parameters() -> None:
    net = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))
    net[0].requires_grad_(False)
    table = ModelTable(net)
    with hook_modules(table, {"1": net[1]}):
        net(torch.zeros(4, 2))
    text = table.to_markdown()
    assert ModelTable(net).to_markdown().splitlines()[0] == text.splitlines()[0]
    assert (
        text.splitlines()[0] == "**Sequential**: 13 parameters (4 trainable, 9 frozen) in 2 layers"
    )
    assert "| 0 | Linear |  |  |  | 9 | 0 | 9 |" in text
    assert "| 1 | Linear | input 0: (4, 3) float32 | (4, 1) float32 | 1 | 4 | 4 | 0 |" in text


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(graph="yes"), "graph='yes'"),
        (dict(backends=["tensorbord"]), "'tensorbord'"),
        (dict(enabled=None), "enabled=None"),
    ],
)
def test_bad_arguments(kwargs: dict, fragment: str) -> None:
    with pytest.raises(ConfigError, match="GraphMonitor") as info:
        GraphMonitor(**kwargs)
    assert fragment in str(info.value)


def test_state_dict_marks_done() -> None:
    g = GraphMonitor()
    assert g.state_dict() == {"done": False}
    g.load_state_dict({"done": True})
    assert g.done is True

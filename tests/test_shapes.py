"""Tests for shape-error localisation, the shape trace and the model summary (CPU, tiny models)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_inspect.backends import MemorySink
from lightning_inspect.errors import ConfigError, NonFiniteError
from lightning_inspect.shapes.notes import (
    ModuleStack,
    attach_note,
    error_note,
    has_note,
    locate_in_traceback,
    model_summary,
    shape_hint,
)
from lightning_inspect.shapes.tracer import ShapeTracer


@pytest.fixture(autouse=True)
def _quiet() -> Any:
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore",
            message=".*(does not have many workers|number of training batches|LeafSpec|treespec|val_dataloader).*",
        )
        yield


# ------------------------------------------------------------------------------------------
# Models built to fail
# ------------------------------------------------------------------------------------------


class MissingFlatten(L.LightningModule):
    """Conv features fed straight into a Linear: "mat1 and mat2 shapes cannot be multiplied"."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU())
        self.head = nn.Linear(8 * 6 * 6, 10)  # expects the flattened features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))  # no flatten

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.training_step(batch, batch_idx)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


class HardCodedBatch(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(4, 8 * 6 * 6)  # breaks on a smaller last batch


class LastBatchFails(MissingFlatten):
    def __init__(self) -> None:
        super().__init__()
        self.flatten = HardCodedBatch()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.flatten(self.features(x)))


def images(n: int = 8, batch_size: int = 4) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(
        TensorDataset(
            torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)
        ),
        batch_size=batch_size,
    )


def trainer(
    tmp_path: Path, callbacks: list[Any], logger: Any = False, sanity: int = 0, max_steps: int = 2
) -> L.Trainer:
    return L.Trainer(
        default_root_dir=tmp_path,
        max_steps=max_steps,
        logger=logger,
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=sanity,
        limit_val_batches=1,
        accelerator="cpu",
        devices=1,
    )


def no_hooks_left(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_missing_flatten_in_the_sanity_check_names_the_module(tmp_path: Path) -> None:
    model = MissingFlatten()
    with pytest.raises(RuntimeError, match="mat1 and mat2 shapes cannot be multiplied") as info:
        trainer(tmp_path, [ShapeTracer(console=False, summary=False)], sanity=1).fit(
            model, images(), images()
        )
    (note,) = info.value.__notes__
    lines = note.splitlines()
    assert lines[0] == (
        "lightning-inspect: the error was raised inside module 'head' (Linear), called from the model "
        "(MissingFlatten), during the sanity check (validation batch 0)."
    )
    assert lines[1] == "  inputs:     input 0: (4, 8, 6, 6) float32"
    assert lines[2] == "  parameters: weight (10, 288) float32, bias (10,) float32"
    assert (
        lines[3].startswith("  hint: missing flatten: the input is 4-D (4, 8, 6, 6)")
        and "nn.Flatten() before 'head'" in lines[3]
    )
    assert no_hooks_left(model)


def test_missing_flatten_in_training_with_trace_and_summary_in_tensorboard(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model = MissingFlatten()
    model.features[0].requires_grad_(False)  # a frozen block for the summary
    tb = TensorBoardLogger(tmp_path, name="tb")
    tracer = ShapeTracer(trace=True, console=False)
    with pytest.raises(RuntimeError) as info:
        trainer(tmp_path, [tracer], logger=tb).fit(model, images())
    note = info.value.__notes__[0]
    assert "inside module 'head' (Linear)" in note and "during training step 0, batch 0" in note
    assert tracer.shape_trace is not None
    assert [(r.name, r.outputs) for r in tracer.shape_trace.rows][-1] == (
        "head",
        ["(did not return)"],
    )

    events = EventAccumulator(tb.log_dir, size_guidance={"tensors": 0})
    events.Reload()
    texts = {
        tag: events.Tensors(tag)[-1].tensor_proto.string_val[0].decode()
        for tag in events.Tags()["tensors"]
    }
    trace = texts["model/shape_trace/text_summary"]
    assert trace.startswith("**MissingFlatten**, shapes of the first training batch (it failed): ")
    assert (
        "| &nbsp;&nbsp;features.0 | Conv2d |  | input 0: (4, 1, 8, 8) float32 | (4, 8, 6, 6) float32 | 1 | 80 | 0 | 80 |"
        in trace
    )
    assert (
        "| head | Linear |  | input 0: (4, 8, 6, 6) float32 | (did not return) | 1 | 2,890 | 2,890 | 0 |"
        in trace
    )
    summary = texts["model/summary/text_summary"]
    assert (
        "**MissingFlatten**: 2,970 parameters (2,890 trainable, 80 frozen) in 3 layers" in summary
    )
    assert "| features | Sequential | 2 (1 Conv2d, 1 ReLU) | 80 | 0 | 80 |" in summary
    assert no_hooks_left(model)


def test_errors_after_the_first_batches_are_located_from_the_traceback(tmp_path: Path) -> None:
    model = LastBatchFails()
    tracer = ShapeTracer(first_n_batches=1, summary=False, console=False)
    with pytest.raises(RuntimeError, match="invalid for input of size") as info:
        trainer(tmp_path, [tracer], max_steps=3).fit(model, images(n=10))  # batches of 4, 4, 2
    note = info.value.__notes__[0]
    assert (
        "inside module 'flatten' (HardCodedBatch), called from the model (LastBatchFails), during training step 2, batch 2"
        in note
    )
    assert "input 0: (2, 8, 6, 6) float32" in note and "hard-coded" in note
    assert "found from the traceback" in note
    assert no_hooks_left(model)


def test_a_working_fit_keeps_hooks_only_for_the_first_batches(tmp_path: Path) -> None:
    seen: list[int] = []
    model = MissingFlatten()
    model.head = nn.Sequential(nn.Flatten(), nn.Linear(288, 10))

    class Count(L.Callback):
        def on_train_batch_start(self, *args: Any) -> None:
            seen.append(sum(len(m._forward_pre_hooks) for m in model.modules()))

    sink = MemorySink()
    trainer(
        tmp_path,
        [ShapeTracer(first_n_batches=2, backends=[sink], console=False), Count()],
        max_steps=4,
    ).fit(model, images(n=16))
    n_modules = len(list(model.modules()))
    assert seen == [n_modules, n_modules, 0, 0] and no_hooks_left(model)
    assert list(sink.texts) == ["model/summary"]


def test_library_errors_get_no_note() -> None:
    tracer = ShapeTracer()
    error = NonFiniteError("first non-finite value ...")
    tracer._note(error)
    assert not getattr(error, "__notes__", [])


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"first_n_batches": -1}, r"ShapeTracer\(first_n_batches=-1\): expected an integer >= 0"),
        ({"trace": "yes"}, r"ShapeTracer\(trace='yes'\): expected true or false"),
        ({"backends": "wandbb"}, r"ShapeTracer\(backends='wandbb'\): unknown backend"),
    ],
)
def test_bad_arguments_raise_config_error(kwargs: dict[str, Any], expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        ShapeTracer(**kwargs)


# ------------------------------------------------------------------------------------------
# Pure helpers
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("module", "x", "message", "expected"),
    [
        (
            nn.Linear(64, 10),
            torch.zeros(4, 48),
            "mat1 and mat2 shapes cannot be multiplied (4x48 and 64x10)",
            "wrong in_features: 'm' has in_features=64 but its input has 48 features: set in_features=48",
        ),
        (
            nn.Linear(64, 10),
            torch.zeros(4, 8, 6, 6),
            "mat1 and mat2",
            "Linear acts on the last dimension (6) of the 4-D input (4, 8, 6, 6), but in_features=64: if the layer",
        ),
        (
            nn.Conv2d(3, 8, 3),
            torch.zeros(2, 1, 8, 8),
            "expected input[2, 1, 8, 8] to have 3 channels",
            "wrong in_channels: 'm' has in_channels=3 but the input has 1 channels at dimension 1",
        ),
        (
            nn.Conv2d(3, 8, 3),
            torch.zeros(2, 192),
            "Expected 3D (unbatched) or 4D (batched) input",
            "Conv2d expects (N, C, H, W) (4-D, or 3-D without batch) but the input is 2-D (2, 192)",
        ),
        (
            nn.BatchNorm1d(16),
            torch.zeros(4, 8),
            "running_mean should contain 8 elements not 16",
            "wrong num_features: 'm' has num_features=16 but the input has 8",
        ),
        (
            nn.LayerNorm(16),
            torch.zeros(4, 8),
            "Given normalized_shape=[16]",
            "normalized_shape=(16,) must equal the input's last dimensions, but the input is (4, 8)",
        ),
        (
            nn.Embedding(10, 4),
            torch.tensor([3, 12]),
            "index out of range in self",
            "'m' has num_embeddings=10 (valid indices 0..9) but the input holds indices 3..12",
        ),
        (
            nn.Linear(4, 2),
            torch.zeros(3, 4, dtype=torch.float64),
            "mat1 and mat2 must have the same dtype, but got Double and Float",
            "dtype mismatch: the inputs are float64 but the parameters are float32",
        ),
        (nn.Identity(), torch.zeros(2), "something else", ""),
    ],
)
def test_shape_hints(module: nn.Module, x: torch.Tensor, message: str, expected: str) -> None:
    assert shape_hint(module, (x,), {}, message, "m").startswith(expected)


def test_stack_survives_exceptions_caught_inside_a_forward() -> None:
    class Fallback(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bad, self.good = nn.Linear(3, 2), nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            try:
                return self.bad(x)
            except RuntimeError:
                return self.good(x)

    net = Fallback()
    stack = ModuleStack()
    with stack.attach({n: m for n, m in net.named_modules()}):
        net(torch.zeros(1, 4))
        assert stack.frames() == []  # the stale 'bad' frame went with its caller's pop
        with pytest.raises(RuntimeError) as info:
            net.good(torch.zeros(1, 5))
        assert [f.name for f in stack.frames()] == ["good"]
        assert "inside module 'good' (Linear)" in error_note(stack.frames(), info.value)


def test_traceback_location_and_notes() -> None:
    net = nn.Sequential(nn.Linear(3, 2), nn.Sequential(nn.Linear(5, 1)))
    with pytest.raises(RuntimeError) as info:
        net(torch.zeros(1, 3))
    frames = locate_in_traceback(info.value, {n: m for n, m in net.named_modules()})
    assert [f.name for f in frames] == ["", "1", "1.0"] and frames[-1].args[0].shape == (1, 2)
    note = error_note(frames, info.value, "a test")
    assert note.startswith(
        "lightning-inspect: the error was raised inside module '1.0' (Linear), called from '1' (Sequential) <- the model (Sequential), during a test."
    )
    assert not has_note(info.value)
    attach_note(info.value, note)
    assert has_note(info.value) and info.value.__notes__ == [note]


def test_model_summary_blocks_frozen_shared_and_own_parameters() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
            self.head = nn.Linear(4, 1)
            self.scale = nn.Parameter(torch.ones(3))
            self.encoder[0].requires_grad_(False)

    s = model_summary(Net())
    assert [(b.name, b.layers, b.parameters, b.trainable) for b in s.rows] == [
        ("encoder", "3 (2 Linear, 1 ReLU)", 40, 20),
        ("head", "1 (1 Linear)", 5, 5),
        ("(own)", "", 3, 3),
    ]
    assert (s.parameters, s.trainable, s.layers) == (48, 28, 4)
    assert "| encoder | Sequential | 3 (2 Linear, 1 ReLU) | 40 | 20 | 20 |" in s.to_markdown()

    class Wrapper(nn.Module):  # self.model = nn.Sequential(...): its children are the blocks
        def __init__(self) -> None:
            super().__init__()
            shared = nn.Linear(2, 2)
            self.model = nn.Sequential(shared, nn.Tanh(), nn.Sequential(shared))

    w = model_summary(Wrapper())
    assert [b.name for b in w.rows] == ["model.0", "model.1", "model.2"]
    assert w.parameters == 6  # the shared layer counts once
    assert "(blocks of 'model')" in w.to_markdown()

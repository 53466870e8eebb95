"""Property: inspection never changes training.

For random small models, random selections, schedules, statistics and histogram settings, a fit
with every monitor attached ends with bit-identical weights (every ``state_dict`` tensor, buffers
such as BatchNorm's running statistics included) and logs bit-identical losses at every step as
the same fit without monitors. Dropout makes the property cover the random state too: a monitor
that drew a random number would change every later dropout mask.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import torch
from conftest import TinyModule
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_inspect import (
    ALL_STATS,
    ActivationMonitor,
    GradientMonitor,
    GraphMonitor,
    MemorySink,
    WeightMonitor,
)

IN_FEATURES = 5
STEPS = 6
BATCH = 8

# A layer that follows another one must be able to take its width; ReLU(inplace=True) may only
# follow a layer whose backward does not need its own output (autograd itself refuses otherwise:
# Tanh and ReLU save their result).
INPLACE_OK_AFTER = {"linear", "layernorm", "batchnorm", "dropout", "input"}
LAYER_KINDS = ("linear", "relu", "relu_inplace", "tanh", "dropout", "layernorm", "batchnorm")


@dataclass(frozen=True)
class Spec:
    """One drawn example: the model, what to select, when to log and what."""

    layers: tuple[tuple[str, int], ...]  # (kind, width for linear) per layer, head excluded
    accumulate: int
    with_tensorboard: bool
    monitors: tuple[dict[str, Any], ...] = field(default=())


def _build(layers: tuple[tuple[str, int], ...]) -> nn.Sequential:
    modules: list[nn.Module] = []
    width = IN_FEATURES
    previous = "input"
    for kind, out in layers:
        if kind == "linear":
            modules.append(nn.Linear(width, out))
            width = out
        elif kind == "relu":
            modules.append(nn.ReLU())
        elif kind == "relu_inplace":
            modules.append(nn.ReLU(inplace=previous in INPLACE_OK_AFTER))
        elif kind == "tanh":
            modules.append(nn.Tanh())
        elif kind == "dropout":
            modules.append(nn.Dropout(0.3))
        elif kind == "layernorm":
            modules.append(nn.LayerNorm(width))
        elif kind == "batchnorm":
            modules.append(nn.BatchNorm1d(width))
        previous = kind
    modules.append(nn.Linear(width, 1))  # the head
    return nn.Sequential(*modules)


class Regressor(TinyModule):
    def __init__(self, layers: tuple[tuple[str, int], ...]) -> None:
        super().__init__()
        self.net = _build(layers)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # Momentum and weight decay: the optimizer state must come out the same too.
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)


class LossRecorder(Callback):
    """Keeps the loss Lightning hands to ``on_train_batch_end`` for every batch."""

    def __init__(self) -> None:
        self.losses: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        self.losses.append(outputs["loss"].detach().clone())


def _module_names(layers: tuple[tuple[str, int], ...]) -> list[str]:
    return ["net"] + [f"net.{i}" for i in range(len(layers) + 1)]


@st.composite
def specs(draw: st.DrawFn) -> Spec:
    depth = draw(st.integers(1, 4))
    layers = tuple(
        (kind, draw(st.integers(1, 12)) if kind == "linear" else 0)
        for kind in draw(st.lists(st.sampled_from(LAYER_KINDS), min_size=depth, max_size=depth))
    )
    names = _module_names(layers)

    def selection() -> dict[str, Any]:
        how = draw(st.sampled_from(["default", "names", "glob", "regex"]))
        out: dict[str, Any] = {}
        if how == "names":
            out["modules"] = draw(
                st.lists(st.sampled_from(names), min_size=1, max_size=4, unique=True)
            )
        elif how == "glob":
            out["modules"] = draw(
                st.sampled_from(["net.*", "*", "net.?", "net", f"net.{len(layers)}"])
            )
        elif how == "regex":
            out["modules"] = draw(st.sampled_from([r"re:net\.\d+", r"re:net(\.0)?", r"re:.*"]))
        if draw(st.booleans()):
            out["exclude"] = draw(
                st.lists(
                    st.sampled_from([*names, "*.1", "net.*"]), min_size=1, max_size=2, unique=True
                )
            )
        return out

    def schedule() -> dict[str, Any]:
        start = draw(st.integers(0, 3))
        stop = draw(st.one_of(st.none(), st.integers(start + 1, start + 6)))
        return {"every_n_steps": draw(st.integers(1, 3)), "start_step": start, "stop_step": stop}

    def what() -> dict[str, Any]:
        histograms = draw(st.booleans())
        out: dict[str, Any] = {
            "stats": draw(
                st.lists(
                    st.sampled_from(ALL_STATS), min_size=1, max_size=len(ALL_STATS), unique=True
                )
            ),
            "histograms": histograms,
        }
        if histograms:
            out["bins"] = draw(st.integers(2, 32))
        return out

    monitors = (
        {"cls": "activations", **selection(), **schedule(), **what()},
        {
            "cls": "gradients",
            **selection(),
            **schedule(),
            **what(),
            "outputs": draw(st.booleans()),
            "parameters": draw(st.booleans()),
            "global_norm": draw(st.booleans()),
        },
        {
            "cls": "weights",
            **selection(),
            **schedule(),
            **what(),
            "update_ratio": draw(st.booleans()),
        },
    )
    return Spec(layers, draw(st.sampled_from([1, 1, 2])), draw(st.booleans()), monitors)


def _monitors(spec: Spec, sink: MemorySink) -> list[Callback]:
    classes = {
        "activations": ActivationMonitor,
        "gradients": GradientMonitor,
        "weights": WeightMonitor,
    }
    out: list[Callback] = []
    for options in spec.monitors:
        options = dict(options)
        cls = classes[options.pop("cls")]
        out.append(
            cls(backends=[sink, "tensorboard"] if spec.with_tensorboard else [sink], **options)
        )
    out.append(GraphMonitor(backends=["tensorboard"] if spec.with_tensorboard else [sink]))
    return out


def _fit(
    spec: Spec, inspected: bool, root: str
) -> tuple[dict[str, torch.Tensor], list[torch.Tensor], MemorySink]:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(
        torch.randn(STEPS * spec.accumulate * BATCH, IN_FEATURES, generator=g),
        torch.randn(STEPS * spec.accumulate * BATCH, 1, generator=g),
    )
    # Shuffling draws from the loader's own generator, so the batch order is fixed too.
    loader = DataLoader(
        data, batch_size=BATCH, shuffle=True, generator=torch.Generator().manual_seed(2)
    )
    model = Regressor(spec.layers)
    losses = LossRecorder()
    sink = MemorySink()
    callbacks: list[Callback] = [losses, *(_monitors(spec, sink) if inspected else [])]
    logger: Any = False
    if spec.with_tensorboard:
        from lightning.pytorch.loggers import TensorBoardLogger

        logger = TensorBoardLogger(root, name="", version="inspected" if inspected else "plain")
    trainer = L.Trainer(
        max_steps=STEPS,
        accelerator="cpu",
        devices=1,
        logger=logger,
        callbacks=callbacks,
        accumulate_grad_batches=spec.accumulate,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, loader)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for i, opt_state in enumerate(trainer.optimizers[0].state.values()):
        for k, v in opt_state.items():
            if isinstance(v, torch.Tensor):
                state[f"optimizer.{i}.{k}"] = v.detach().clone()
    return state, losses.losses, sink


def _expected_steps(options: dict[str, Any]) -> list[int]:
    start, every, stop = options["start_step"], options["every_n_steps"], options["stop_step"]
    return [
        s
        for s in range(STEPS)
        if s >= start and (stop is None or s < stop) and (s - start) % every == 0
    ]


@settings(
    max_examples=20,
    deadline=None,
    derandomize=bool(os.environ.get("CI")),
    suppress_health_check=[HealthCheck.too_slow],
)
@given(spec=specs())
def test_monitors_never_change_training(spec: Spec) -> None:
    with tempfile.TemporaryDirectory(prefix="lightning_inspect_property_") as root:
        plain_state, plain_losses, _ = _fit(spec, inspected=False, root=root)
        state, losses, sink = _fit(spec, inspected=True, root=root)

    assert list(state) == list(plain_state)
    changed = [k for k in plain_state if not torch.equal(plain_state[k], state[k])]
    assert not changed, f"tensors changed by inspection: {changed} ({spec})"
    assert len(losses) == len(plain_losses) == STEPS * spec.accumulate
    assert all(torch.equal(a, b) for a, b in zip(plain_losses, losses, strict=False)), (
        plain_losses,
        losses,
    )

    # The monitors did run: every monitor with a selection logged on exactly its scheduled steps.
    weights = spec.monitors[2]
    for key in sink.scalars:
        if key.startswith("weights/") and not key.endswith("update_ratio"):
            assert sink.steps(key) == _expected_steps(weights), key


# ---------------------------------------------------------------------------------------------
# Invariance of what is logged: the values must not depend on how training is set up around them.
# ---------------------------------------------------------------------------------------------


class TwoLayer(L.LightningModule):
    """``a`` -> ``b``; built in ``__init__`` or, with ``lazy=True``, in ``configure_model`` (the way
    Lightning recommends for large and sharded models)."""

    def __init__(self, lazy: bool = False) -> None:
        super().__init__()
        if not lazy:
            self.configure_model()

    def configure_model(self) -> None:
        if not hasattr(self, "a"):
            torch.manual_seed(1)  # the same initial weights wherever the layers are built
            self.a = nn.Linear(8, 8)
            self.b = nn.Linear(8, 1)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.b(self.a(batch[0])).square().mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _logged(model: L.LightningModule, **trainer_kwargs: Any) -> dict[str, list[tuple[int, float]]]:
    torch.manual_seed(0)
    sink = MemorySink()
    monitors = [
        ActivationMonitor(every_n_steps=1, backends=[sink], stats=["l2_norm", "max"]),
        GradientMonitor(every_n_steps=1, backends=[sink], stats=["l2_norm", "max"]),
        WeightMonitor(every_n_steps=1, backends=[sink], stats=["l2_norm"]),
    ]
    data = DataLoader(
        TensorDataset(torch.randn(24, 8, generator=torch.Generator().manual_seed(3))), batch_size=8
    )
    trainer = L.Trainer(
        max_steps=3,
        logger=False,
        accelerator="cpu",
        callbacks=monitors,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        **trainer_kwargs,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, data)
    return sink.scalars


def _fp16_with_loss_scale(scale: float) -> dict[str, list[tuple[int, float]]]:
    from lightning.pytorch.plugins.precision import MixedPrecision

    torch.manual_seed(0)
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=scale))
    return _logged(TwoLayer(), plugins=[plugin])


def _same(a: list[tuple[int, float]], b: list[tuple[int, float]]) -> bool:
    return [s for s, _ in a] == [s for s, _ in b] and all(
        abs(x - y) <= 1e-6 * max(abs(x), abs(y), 1e-12)
        for (_, x), (_, y) in zip(a, b, strict=False)
    )


def test_parameter_gradients_do_not_depend_on_the_fp16_loss_scale() -> None:
    small, large = _fp16_with_loss_scale(1.0), _fp16_with_loss_scale(2.0**10)
    keys = [k for k in small if k.startswith("param_grads/")]
    assert keys
    assert all(_same(small[k], large[k]) for k in keys), {k: (small[k], large[k]) for k in keys}


def test_activation_gradients_do_not_depend_on_the_fp16_loss_scale() -> None:
    small, large = _fp16_with_loss_scale(1.0), _fp16_with_loss_scale(2.0**10)
    keys = [k for k in small if k.startswith("activation_grads/")]
    assert keys
    assert all(_same(small[k], large[k]) for k in keys), {k: (small[k], large[k]) for k in keys}


def test_layers_built_in_configure_model_are_inspected_like_layers_built_in_init() -> None:
    eager, lazy = _logged(TwoLayer(lazy=False)), _logged(TwoLayer(lazy=True))
    assert sorted(lazy) == sorted(eager)
    assert all(_same(eager[k], lazy[k]) for k in eager)


def test_steps_the_grad_scaler_skips_are_marked_and_not_warned_about() -> None:
    from lightning.pytorch.plugins.precision import MixedPrecision

    torch.manual_seed(0)
    sink = MemorySink()
    # A scale of 2**24 overflows fp16 gradients: the scaler skips steps and halves its scale
    # until the gradients fit. Those are not exploding gradients.
    plugin = MixedPrecision(
        "16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**24)
    )
    data = DataLoader(
        TensorDataset(torch.randn(48, 8, generator=torch.Generator().manual_seed(3))), batch_size=8
    )
    trainer = L.Trainer(
        max_steps=12,
        logger=False,
        accelerator="cpu",
        plugins=[plugin],
        enable_progress_bar=False,
        callbacks=[GradientMonitor(every_n_steps=1, backends=[sink])],
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(TwoLayer(), data)
    skipped = dict(sink.scalars["param_grads/skipped_by_scaler"])
    assert skipped[0] == 1.0  # the first step overflowed
    assert any(v == 0.0 for v in skipped.values())  # and the scale came down until steps ran
    infs = dict(sink.scalars["param_grads/a.weight/inf_count"])
    nans = dict(sink.scalars["param_grads/a.weight/nan_count"])
    assert all((infs[s] + nans[s] > 0) == bool(skipped[s]) for s in skipped)
    assert not [w for w in caught if "non-finite values" in str(w.message)]

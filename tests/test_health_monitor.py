"""Tests for HealthMonitor and the first-NaN locator, with models built to fail (CPU, tiny)."""

from __future__ import annotations

import math
import statistics
import sys
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import MLFlowLogger, TensorBoardLogger
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_inspect.backends import MemorySink
from lightning_inspect.errors import ConfigError, NonFiniteError
from lightning_inspect.health.monitor import HealthMonitor
from lightning_inspect.health.nonfinite import (
    FirstNonFiniteError,
    NonFiniteLocator,
    parameters_by_module,
)
from lightning_inspect.shapes.tracer import ShapeTracer

# ------------------------------------------------------------------------------------------
# Building blocks of models built to fail
# ------------------------------------------------------------------------------------------


class Poison(nn.Module):
    """Identity, except that it returns log(0) = -inf while ``active``."""

    def __init__(self) -> None:
        super().__init__()
        self.active = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log(x * 0) if self.active else x


class _NanBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad * float("nan")


class NanBackward(nn.Module):
    """Identity forward whose backward makes NaN out of finite gradients."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _NanBackward.apply(x)


class ReluBlock(nn.Module):
    """A block whose forward ends in F.relu (no ReLU module to hook)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.fc = nn.Linear(n, n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.fc(x))


class Regression(L.LightningModule):
    def __init__(self, net: nn.Module, lr: float = 0.01, poison_at: int | None = None) -> None:
        super().__init__()
        self.net = net
        self.lr = lr
        self.poison_at = poison_at

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
    ) -> torch.Tensor:
        for module in self.net.modules():
            if isinstance(module, Poison):
                module.active = self.global_step == self.poison_at
        x, y = batch
        return F.mse_loss(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def data(n_in: int, n: int = 64, batch_size: int = 16, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    return DataLoader(
        TensorDataset(torch.randn(n, n_in, generator=g), torch.randn(n, 1, generator=g)),
        batch_size=batch_size,
    )


def trainer(tmp_path: Path, callbacks: list[Any], max_steps: int, logger: Any = False) -> L.Trainer:
    return L.Trainer(
        default_root_dir=tmp_path,
        max_steps=max_steps,
        logger=logger,
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        accelerator="cpu",
        devices=1,
        log_every_n_steps=1,
    )


def no_hooks_left(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def quiet_monitor(**kwargs: Any) -> HealthMonitor:
    kwargs.setdefault("console", False)
    kwargs.setdefault("warn_findings", False)
    return HealthMonitor(**kwargs)


@pytest.fixture(autouse=True)
def _quiet() -> Any:
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore",
            message=".*(does not have many workers|number of training batches|LeafSpec|treespec|val_dataloader).*",
        )
        yield


# ------------------------------------------------------------------------------------------
# NonFiniteLocator without Lightning
# ------------------------------------------------------------------------------------------


def run_step(
    net: nn.Module, locator: NonFiniteLocator, x: torch.Tensor, step: int = 5, loss_fn: Any = None
) -> None:
    modules = {n: m for n, m in net.named_modules() if n}
    with locator.attach(modules):
        locator.start(step, batch_idx=2)
        out = net(x)
        loss = loss_fn(out) if loss_fn else out.square().mean()
        locator.loss(loss)
        loss.backward()
        locator.check(parameters_by_module(modules))


@pytest.mark.parametrize("check", ["module", "step"])
def test_locator_names_the_first_forward_module_with_its_inputs(check: str) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), Poison(), nn.Linear(4, 2), nn.Tanh())
    net[2].active = True
    locator = NonFiniteLocator("raise", check)
    with pytest.raises(FirstNonFiniteError) as info:
        run_step(net, locator, torch.randn(5, 3))
    origin = info.value.origin
    assert (origin.module, origin.module_type, origin.phase, origin.step, origin.batch_idx) == (
        "2",
        "Poison",
        "forward",
        5,
        2,
    )
    assert (origin.nan, origin.inf, origin.numel, origin.check) == (0, 20, 20, check)
    (inputs,) = origin.inputs
    assert (
        inputs.shape == (5, 4) and inputs.stats["nan_count"] == 0 and inputs.stats["min"] >= 0
    )  # after the ReLU
    assert "turned finite inputs into NaN/Inf" in origin.hint
    assert isinstance(info.value, NonFiniteError) and "module '2' (Poison)" in str(info.value)
    assert locator.origins == [origin] and no_hooks_left(net)


@pytest.mark.parametrize("check", ["module", "step"])
def test_locator_blames_the_module_whose_backward_made_the_nan(check: str) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), NanBackward(), nn.Linear(4, 2))
    with pytest.raises(FirstNonFiniteError) as info:
        run_step(net, NonFiniteLocator("raise", check), torch.randn(5, 3))
    origin = info.value.origin
    assert (origin.module, origin.phase, origin.nan) == ("2", "backward", 20)
    assert origin.tensor.startswith("gradient w.r.t. input")
    (incoming,) = origin.inputs  # the finite gradient that reached its output
    assert incoming.shape == (5, 4) and incoming.stats["nan_count"] == 0


@pytest.mark.parametrize("check", ["module", "step"])
def test_locator_reports_the_loss_and_gradients_made_after_the_last_module(check: str) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 2))
    with pytest.raises(FirstNonFiniteError) as info:
        run_step(
            net,
            NonFiniteLocator("raise", check),
            torch.randn(4, 3),
            loss_fn=lambda out: torch.log(out * 0).sum(),
        )
    assert (info.value.origin.phase, info.value.origin.module) == ("loss", "")
    assert "the last watched module was '0'" in info.value.origin.hint
    with pytest.raises(FirstNonFiniteError) as info:  # sqrt'(0) = inf: finite loss, NaN gradient
        run_step(
            net,
            NonFiniteLocator("raise", check),
            torch.randn(4, 3),
            loss_fn=lambda out: torch.sqrt(out * 0).sum(),
        )
    origin = info.value.origin
    assert (origin.phase, origin.module) == ("backward", "0")
    assert (
        origin.tensor.startswith("gradient arriving at its output")
        and "made by the loss" in origin.hint
    )


def test_locator_names_bad_inputs_and_bad_parameters() -> None:
    net = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 2))
    x = torch.randn(4, 3)
    x[0, 0] = float("nan")
    with pytest.raises(FirstNonFiniteError) as info:
        run_step(net, NonFiniteLocator("raise", "module"), x)
    assert (
        info.value.origin.module == "0"
        and "the batch already holds NaN/Inf" in info.value.origin.hint
    )
    with torch.no_grad():
        net[1].weight[0, 0] = float("inf")
    with pytest.raises(FirstNonFiniteError) as info:
        run_step(net, NonFiniteLocator("raise", "step"), torch.randn(4, 3))
    origin = info.value.origin
    assert origin.module == "1" and origin.parameters == ("weight: 0 NaN, 1 Inf of 4",)
    assert "parameters are already non-finite" in origin.hint


def test_locator_checks_parameter_gradients_after_backward() -> None:
    net = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 1))
    net[0].weight.register_hook(lambda g: g * float("nan"))  # only the parameter gradient goes bad
    with pytest.raises(FirstNonFiniteError) as info:
        run_step(net, NonFiniteLocator("raise", "module"), torch.randn(4, 3))
    origin = info.value.origin
    assert (origin.phase, origin.module, origin.tensor) == (
        "parameter gradient",
        "0",
        "weight.grad (2, 3)",
    )


def test_locator_warn_reports_once_per_module_and_skips_the_rest_of_the_step() -> None:
    net = nn.Sequential(nn.Linear(3, 4), Poison(), nn.Linear(4, 2))
    net[1].active = True
    seen: list[str] = []
    locator = NonFiniteLocator(
        "warn", "module", on_origin=lambda o: seen.append(f"{o.module}@{o.step}")
    )
    with pytest.warns(
        RuntimeWarning,
        match=r"HealthMonitor: first non-finite value at step 5, batch 2: forward, module '1'",
    ):
        run_step(net, locator, torch.randn(2, 3), step=5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # same module again: no second warning
        run_step(net, locator, torch.randn(2, 3), step=6)
    assert seen == ["1@5", "1@6"]


def test_debug_opens_the_debugger_at_the_module_when_a_terminal_is_attached(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[dict[str, Any]] = []

    def fake_breakpointhook(*args: Any, **kwargs: Any) -> None:
        frame = sys._getframe(1)
        calls.append(dict(frame.f_locals))

    monkeypatch.setattr(sys.stdin, "isatty", lambda: True, raising=False)
    monkeypatch.setattr(sys, "breakpointhook", fake_breakpointhook)
    net = nn.Sequential(nn.Linear(3, 4), Poison())
    net[1].active = True
    with pytest.raises(FirstNonFiniteError) as info:
        run_step(net, NonFiniteLocator("debug", "step"), torch.randn(2, 3))  # debug forces "module"
    (local,) = calls
    assert (
        local["module"] is net[1]
        and local["origin"].module == "1"
        and isinstance(local["output"], torch.Tensor)
    )
    assert any("after the debugging session" in n for n in info.value.__notes__)


def test_debug_without_a_terminal_raises_with_a_note(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys.stdin, "isatty", lambda: False, raising=False)
    monkeypatch.setattr(
        sys, "breakpointhook", lambda *a, **k: pytest.fail("no debugger without a terminal")
    )
    net = nn.Sequential(nn.Linear(3, 4), Poison())
    net[1].active = True
    with pytest.raises(FirstNonFiniteError) as info:
        run_step(net, NonFiniteLocator("debug"), torch.randn(2, 3))
    assert any(
        "stdin is an interactive terminal; it is not, so fit stopped" in n
        for n in info.value.__notes__
    )


# ------------------------------------------------------------------------------------------
# Arguments
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        (
            {"on_nonfinite": "stop"},
            r"HealthMonitor\(on_nonfinite='stop'\): expected one of 'ignore', 'warn', 'raise', 'debug'",
        ),
        (
            {"nonfinite_check": "batch"},
            r"HealthMonitor\(nonfinite_check='batch'\): expected one of 'auto', 'module', 'step'",
        ),
        (
            {"picture_every_n_logs": 0},
            r"HealthMonitor\(picture_every_n_logs=0\): expected an integer >= 1",
        ),
        ({"thresholds": {"dead_window": -1}}, r"HealthMonitor\(thresholds.dead_window=-1\)"),
        ({"relu_modules": [""]}, r"HealthMonitor\(relu_modules=\[''\]\)"),
    ],
)
def test_bad_arguments_raise_config_error(kwargs: dict[str, Any], expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        HealthMonitor(**kwargs)


# ------------------------------------------------------------------------------------------
# Models built to fail, in Lightning
# ------------------------------------------------------------------------------------------


def test_dead_relu_network_is_reported_and_logged_to_tensorboard_and_mlflow(
    tmp_path: Path, mlflow_logger: MLFlowLogger, mlflow_client: Any
) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 8), ReluBlock(8), nn.Linear(8, 1)
    )
    with torch.no_grad():
        net[0].bias.fill_(-100.0)  # every unit of net.1 is negative for every input
        net[3].fc.bias.fill_(-100.0)  # and every unit of the F.relu block
    model = Regression(net)
    tb = TensorBoardLogger(tmp_path, name="tb")
    mlf, client = mlflow_logger, mlflow_client  # a SQLite store (conftest), one run per test
    monitor = HealthMonitor(
        every_n_steps=1,
        thresholds={"dead_window": 3},
        relu_modules="net.3",
        picture_every_n_logs=2,
        console=False,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        trainer(tmp_path, [monitor, ShapeTracer(console=False)], max_steps=4, logger=[tb, mlf]).fit(
            model, data(4)
        )
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert (
        "HealthMonitor: error: dead_units in 'net.1' at step 2: dead_fraction = 1 (16 of 16 units"
        in "\n".join(messages)
    )
    assert sum("dead_units in 'net.1'" in m for m in messages) == 1  # once per rule and module

    worst = monitor.report.findings()[0]
    assert (worst.rule, worst.module, worst.step, worst.severity, worst.value) == (
        "dead_units",
        "net.1",
        2,
        "error",
        1.0,
    )
    dead = [f.module for f in monitor.report.findings() if f.rule == "dead_units"]
    assert dead == [
        "net.1",
        "net.3",
    ]  # the F.relu block is seen through relu_modules, in execution order
    assert monitor.order[:4] == ["net.0", "net.1", "net.2", "net.3.fc"] and no_hooks_left(model)

    events = EventAccumulator(tb.log_dir, size_guidance={"tensors": 0, "images": 0, "scalars": 0})
    events.Reload()
    report = events.Tensors("health/report/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert "| error | dead_units | net.1 | dead_fraction | 1 | 2 |" in report
    assert [(e.step, e.value) for e in events.Scalars("health/net.1/dead_fraction")] == [
        (2, 1.0),
        (3, 1.0),
    ]
    assert {e.step for e in events.Images("health/zero_fraction")} == {
        1,
        3,
        4,
    }  # every 2 logs, and at the end

    artifacts = {a.path for a in client.list_artifacts(mlf.run_id, "lightning_inspect/health")}
    assert {
        "lightning_inspect/health/report.md",
        "lightning_inspect/health/zero_fraction.png",
    } <= artifacts
    text = Path(
        client.download_artifacts(
            mlf.run_id, "lightning_inspect/health/report.md", str(tmp_path / "dl")
        )
    ).read_text()
    assert "| error | dead_units | net.1 |" in text
    summary = Path(
        client.download_artifacts(
            mlf.run_id, "lightning_inspect/model/summary.md", str(tmp_path / "dl")
        )
    ).read_text()
    assert "| net.0 | Linear | 1 (1 Linear) | 80 | 80 | 0 |" in summary
    history = client.get_metric_history(mlf.run_id, "health/net.1/dead_fraction")
    assert [(m.step, m.value) for m in history] == [(2, 1.0), (3, 1.0)]


def test_deep_sigmoid_stack_has_vanishing_gradients_named_by_depth(tmp_path: Path) -> None:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(8):
        layers += [nn.Linear(16, 16), nn.Sigmoid()]
    model = Regression(nn.Sequential(*layers, nn.Linear(16, 1)))
    sink = MemorySink()
    monitor = quiet_monitor(every_n_steps=1, backends=[sink], pictures=False)
    trainer(tmp_path, [monitor], max_steps=2).fit(model, data(16, n=32))

    vanishing = [f for f in monitor.report.findings() if f.rule == "vanishing_gradient"]
    assert (
        vanishing
        and vanishing[0].module == "net.0"
        and vanishing[0].depth == 0
        and vanishing[0].step == 0
    )
    depths = [f.depth for f in vanishing]
    assert depths == sorted(depths)  # reported in execution order
    last = sink.last("health/net.16/grad_norm")
    assert all(
        sink.scalars[f"health/{f.module}/grad_norm"][0][1] < 1e-4 * max(last, 1e-30) * 10
        for f in vanishing
    )
    assert "net.16" not in {f.module for f in vanishing}
    assert sink.texts["health/report"][-1][1].count("vanishing_gradient") == len(vanishing)


def test_large_learning_rate_explodes_at_the_step_the_rule_predicts(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Regression(nn.Sequential(nn.Linear(8, 1)), lr=2.0)
    sink = MemorySink()
    monitor = quiet_monitor(every_n_steps=1, backends=[sink], pictures=False)
    trainer(tmp_path, [monitor], max_steps=8).fit(model, data(8))

    norms = [v for _, v in sink.scalars["health/net.0/grad_norm"]]
    t = monitor.thresholds
    expected = next(
        step
        for step, v in enumerate(norms)
        if v > t.grad_norm_high
        or (
            step >= t.spike_min_history
            and v
            > t.grad_spike_factor * statistics.median(norms[max(0, step - t.spike_history) : step])
        )
    )
    exploding = [f for f in monitor.report.findings() if f.rule == "exploding_gradient"]
    assert exploding[0].module == "net.0" and exploding[0].step == expected
    high = [f for f in monitor.report.findings() if f.rule == "update_ratio_high"]
    assert high and high[0].module == "net.0"


@pytest.mark.parametrize("check", ["module", "step"])
def test_nan_at_step_k_stops_fit_naming_the_module(tmp_path: Path, check: str) -> None:
    torch.manual_seed(0)
    model = Regression(
        nn.Sequential(nn.Linear(4, 8), nn.ReLU(), Poison(), nn.Linear(8, 1)), poison_at=3
    )
    sink = MemorySink()
    monitor = quiet_monitor(
        every_n_steps=1,
        backends=[sink],
        on_nonfinite="raise",
        nonfinite_check=check,
        pictures=False,
    )
    with pytest.raises(FirstNonFiniteError) as info:
        trainer(tmp_path, [monitor], max_steps=6).fit(model, data(4))
    origin = info.value.origin
    assert (origin.module, origin.module_type, origin.step, origin.phase, origin.check) == (
        "net.2",
        "Poison",
        3,
        "forward",
        check,
    )
    assert origin.inputs[0].stats["nan_count"] == 0 and origin.inputs[0].stats["inf_count"] == 0
    # Stopped cleanly: hooks removed, the report written and flushed, the weights still finite.
    assert no_hooks_left(model) and sink.flushes > 0
    assert all(torch.isfinite(p).all() for p in model.parameters())
    (step, report) = sink.texts["health/report"][-1]
    assert step == 3 and "| error | nonfinite | net.2 | forward: output |" in report
    assert monitor.report.findings()[0].module == "net.2"


def test_debug_yaml_block_instantiates() -> None:
    """The block proposed for the `debug` option of the `inspect` config group."""
    from omegaconf import OmegaConf

    from lightning_inspect.hydra.instantiate import instantiate_callbacks

    health, shapes = instantiate_callbacks(OmegaConf.create(DEBUG_YAML))
    assert isinstance(health, HealthMonitor) and isinstance(shapes, ShapeTracer)
    assert (health.schedule.every_n_steps, health.on_nonfinite, health.nonfinite_check) == (
        1,
        "debug",
        "auto",
    )
    assert (
        health.modules == ["*"]
        and health.thresholds.dead_window == 3
        and health.picture_every_n_logs == 10
    )
    assert (shapes.first_n_batches, shapes.trace, shapes.summary) == (None, True, True)


DEBUG_YAML = """
# HealthMonitor under inspect.health: health rules, first-NaN localisation, report and pictures.
health:
  _target_: lightning_inspect.HealthMonitor
  # Every module of the model, containers included (a NaN can come from any of them).
  modules: ["*"]
  # Check and log every optimizer step.
  every_n_steps: 1
  # At the first NaN/Inf: a debugger at the module when stdin is a terminal, otherwise stop fit with FirstNonFiniteError.
  on_nonfinite: debug
  # Check per module on the CPU, once per step (one transfer) on accelerators.
  nonfinite_check: auto
  # Units count as dead after 3 logged steps without a positive value (default 5).
  thresholds:
    dead_window: 3
  # Draw the layers x steps pictures every 10 logged steps and at the end of fit.
  picture_every_n_logs: 10
# ShapeTracer under inspect.shapes: name the module where a forward pass fails; shape trace; model summary.
shapes:
  _target_: lightning_inspect.ShapeTracer
  # Keep the module-stack hooks for the whole fit, not only the sanity check and the first batch.
  first_n_batches: null
  # Log every module's input and output shapes during the first training batch.
  trace: true
  # Log the model's blocks with layer and parameter counts (trainable, frozen) once.
  summary: true
"""


@pytest.fixture(autouse=True)
def _public_names(monkeypatch: pytest.MonkeyPatch) -> None:
    """Until the package re-exports them, make the proposed public names resolvable."""
    import lightning_inspect

    for name, value in {"HealthMonitor": HealthMonitor, "ShapeTracer": ShapeTracer}.items():
        if not hasattr(lightning_inspect, name):
            monkeypatch.setattr(lightning_inspect, name, value, raising=False)


def test_hooks_are_inert_in_copies_and_absent_outside_logged_steps(tmp_path: Path) -> None:
    import copy

    torch.manual_seed(0)
    model = Regression(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1)))
    copies: list[nn.Module] = []

    class Copier(L.Callback):
        def on_train_batch_end(self, *args: Any) -> None:
            copies.append(copy.deepcopy(model))

    monitor = quiet_monitor(every_n_steps=2, backends=[MemorySink()], pictures=False)
    trainer(tmp_path, [monitor, Copier()], max_steps=3).fit(model, data(4))
    assert no_hooks_left(model) and math.isfinite(copies[-1](torch.zeros(1, 4)).item())
    assert monitor.last_logged_step == 2


class FusedAdam(Regression):
    """Adam(fused=True) unscales inside step(): its gradients still carry the loss scale."""

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3, fused=True)


class PlainAdam(Regression):
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def fp16_fit(
    tmp_path: Path,
    callbacks: list[Any],
    model: L.LightningModule,
    init_scale: float,
    steps: int,
    **trainer: Any,
) -> L.Trainer:
    """Fit on the CPU in fp16 mixed precision with a GradScaler starting at ``init_scale``."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    plugin = MixedPrecision(
        "16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=init_scale)
    )
    fit = L.Trainer(
        default_root_dir=tmp_path,
        max_steps=steps,
        logger=False,
        callbacks=callbacks,
        plugins=[plugin],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        accelerator="cpu",
        devices=1,
        **trainer,
    )
    fit.fit(model, data(4, n=16 * steps * trainer.get("accumulate_grad_batches", 1)))
    return fit


@pytest.mark.parametrize("check", ["module", "step"])
@pytest.mark.parametrize(
    "model_class, accumulate",
    [(PlainAdam, 1), (PlainAdam, 2), (FusedAdam, 1)],
    ids=["adam", "accumulate-2", "fused-adam"],
)
def test_steps_the_grad_scaler_skips_are_neither_errors_nor_stops(
    tmp_path: Path, check: str, model_class: type[Regression], accumulate: int
) -> None:
    """fp16 with a GradScaler: overflowing gradients are how the scaler finds its scale.

    The scaler skips those steps and lowers its scale; they must not stop training in ``raise``
    mode nor be reported as non-finite or exploding gradients or a stalled scaler, with gradient
    accumulation and with an optimizer that unscales inside ``step()`` too.
    """
    torch.manual_seed(0)
    sink = MemorySink()
    monitor = quiet_monitor(
        every_n_steps=1,
        backends=[sink],
        on_nonfinite="raise",
        nonfinite_check=check,
        pictures=False,
    )
    model = model_class(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1)))
    fit = fp16_fit(tmp_path, [monitor], model, 2.0**24, 14, accumulate_grad_batches=accumulate)
    assert fit.global_step == 14  # not stopped
    skipped = dict(sink.scalars["health/skipped_by_scaler"])
    assert skipped[0] == 1.0 and any(
        v == 0.0 for v in skipped.values()
    )  # it did overflow, then recover
    rules = {
        f.rule for f in monitor.report.findings() if f.step in {s for s, v in skipped.items() if v}
    }
    assert not rules & {
        "nonfinite",
        "exploding_gradient",
        "vanishing_gradient",
        "update_ratio_low",
    }, rules
    assert not [
        f for f in monitor.report.findings() if f.rule in ("nonfinite", "grad_scaler_stalled")
    ]
    ran = [s for s, v in skipped.items() if not v]
    norms = dict(sink.scalars["health/net.0/grad_norm"])
    assert all(math.isfinite(norms[s]) for s in ran)


def test_fused_and_plain_adam_report_the_same_unscaled_gradient_norm(tmp_path: Path) -> None:
    """A fused optimizer's gradients still carry the loss scale at on_before_optimizer_step:
    the monitors divide it out, so the first step that runs shows the same norm either way."""
    from lightning_inspect import GradientMonitor

    norms = {}
    for model_class in (PlainAdam, FusedAdam):
        torch.manual_seed(0)
        sink = MemorySink()
        health = quiet_monitor(every_n_steps=1, backends=[sink], pictures=False)
        gradients = GradientMonitor(every_n_steps=1, backends=[sink], outputs=False)
        model = model_class(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1)))
        fp16_fit(tmp_path, [health, gradients], model, 2.0**24, 12)
        skipped = dict(sink.scalars["health/skipped_by_scaler"])
        assert dict(sink.scalars["param_grads/skipped_by_scaler"]) == skipped
        first = min(s for s, v in skipped.items() if not v)
        norms[model_class.__name__] = (
            dict(sink.scalars["health/net.0/grad_norm"])[first],
            dict(sink.scalars["param_grads/net.0.weight/l2_norm"])[first],
            dict(sink.scalars["param_grads/global_norm"])[first],
            first,
        )
    plain, fused = norms["PlainAdam"], norms["FusedAdam"]
    assert plain[3] == fused[3]  # the same steps overflowed
    for a, b in zip(plain[:3], fused[:3], strict=False):
        assert b == pytest.approx(a, rel=1e-3)


def test_a_grad_scaler_that_skips_at_a_scale_below_one_is_reported_as_stalled(
    tmp_path: Path,
) -> None:
    """A NaN made in backward under fp16: the scaler skips every step, its scale falls below 1."""
    torch.manual_seed(0)
    monitor = quiet_monitor(every_n_steps=1, on_nonfinite="raise", pictures=False)
    model = PlainAdam(nn.Sequential(nn.Linear(4, 8), NanBackward(), nn.Linear(8, 1)))
    before = [p.detach().clone() for p in model.parameters()]
    fp16_fit(tmp_path, [monitor], model, 4.0, 8)
    assert all(
        torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=False)
    )  # every step skipped
    [stalled] = [f for f in monitor.report.findings() if f.rule == "grad_scaler_stalled"]
    # scales 4, 2, 1: the third skipped step is the first at a scale of 1 or less
    assert (stalled.severity, stalled.step, stalled.value) == ("error", 2, 1.0)
    assert "skipped the last 3 logged steps" in stalled.hint


class Muted(nn.Module):
    """Multiplies its input by 0: the next layer's output is its bias, whatever its weights."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 0


class DecayedRegression(Regression):
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1, weight_decay=1.0)


def test_huge_finite_weights_give_finite_norms_and_ratios(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    torch.manual_seed(0)
    net = nn.Sequential(Muted(), nn.Linear(4, 8), nn.Linear(8, 1))
    with torch.no_grad():
        net[1].weight.fill_(1e20)  # finite; its square overflows float32
    model = DecayedRegression(net)
    params = {n: p for n, p in model.named_parameters() if n.startswith("net.1.")}
    before = {n: p.detach().double().clone() for n, p in params.items()}
    tb = TensorBoardLogger(tmp_path, name="tb")
    monitor = quiet_monitor(every_n_steps=1, pictures=False)
    trainer(tmp_path, [monitor], max_steps=1, logger=tb).fit(model, data(4))

    update = math.sqrt(
        sum(float((p.detach().double() - before[n]).square().sum()) for n, p in params.items())
    )
    weight = math.sqrt(sum(float(w.square().sum()) for w in before.values()))
    assert math.isfinite(update) and update > 1e19
    events = EventAccumulator(tb.log_dir, size_guidance={"scalars": 0})
    events.Reload()
    [logged] = events.Scalars("health/net.1/update_ratio")
    assert logged.value == pytest.approx(update / weight, rel=1e-6)  # 0.1: the weight decay
    assert [f for f in monitor.report.findings() if f.rule == "nonfinite"] == []


def test_monitor_pickles_after_fit(tmp_path: Path) -> None:
    import pickle

    torch.manual_seed(0)
    model = Regression(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1)))
    monitor = quiet_monitor(every_n_steps=1, backends=[MemorySink()], pictures=False)
    trainer(tmp_path, [monitor], max_steps=2).fit(model, data(4))
    copy = pickle.loads(pickle.dumps(monitor))
    assert copy.history == monitor.history and copy.order == monitor.order
    assert (
        copy.order[:3] == ["net.0", "net.1", "net.2"] and "net.1" in copy.history["zero_fraction"]
    )


class SparseOut(nn.Module):
    """Returns its input as a sparse COO tensor (NaN while ``poison``)."""

    def __init__(self) -> None:
        super().__init__()
        self.poison = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.to_sparse()
        return y * float("nan") if self.poison else y


class SparseModel(Regression):
    def __init__(self, poison_at: int | None) -> None:
        super().__init__(
            nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1)), poison_at=poison_at
        )
        self.sparse = SparseOut()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.sparse.poison = self.global_step == self.poison_at
        return self.net(self.sparse(x).to_dense())


@pytest.mark.parametrize("check", ["module", "step"])
def test_sparse_outputs_are_checked_without_faults(tmp_path: Path, check: str) -> None:
    torch.manual_seed(0)
    clean = quiet_monitor(
        every_n_steps=1, backends=[MemorySink()], pictures=False, nonfinite_check=check
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        trainer(tmp_path, [clean], max_steps=2).fit(SparseModel(None), data(4))
    assert [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)] == []
    assert "sparse" in clean.order and "net.1" in clean.history["zero_fraction"]

    poisoned = quiet_monitor(
        every_n_steps=1,
        backends=[MemorySink()],
        pictures=False,
        nonfinite_check=check,
        on_nonfinite="raise",
    )
    with pytest.raises(FirstNonFiniteError) as info:
        trainer(tmp_path, [poisoned], max_steps=4).fit(SparseModel(1), data(4))
    assert (info.value.origin.module, info.value.origin.step) == ("sparse", 1)

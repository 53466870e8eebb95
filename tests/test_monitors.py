"""Activation/Gradient/Weight monitors in real Lightning runs, read back from TensorBoard and MLflow."""

from __future__ import annotations

import copy
import io
import warnings
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import numpy as np
import pytest
import torch
from conftest import (
    IN_FEATURES,
    PlainMLP,
    TinyMLP,
    ZooModel,
    loader,
    make_trainer,
    mlflow_history,
    module_hook_counts,
    read_tb,
)
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_inspect import (
    ActivationMonitor,
    BackendError,
    ConfigError,
    GradientMonitor,
    GraphMonitor,
    NonFiniteError,
    SelectionError,
    WeightMonitor,
    read_stats,
)
from lightning_inspect.core.keys import split_key

B = 8  # batch size of conftest.loader


def tb_dir(logger: Any) -> Path:
    return Path(logger.log_dir)


def np64(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float64).reshape(-1).numpy()


def approx(ref: float, scale: float | None = None) -> Any:
    """float32-computed statistics, stored by TensorBoard as float32."""
    return pytest.approx(ref, rel=2e-5, abs=2e-6 * (abs(ref) if scale is None else scale) + 1e-7)


class StepProbe(Callback):
    """Captures, per global step: the batch and weights at batch start, parameter gradients and
    weights in on_before_optimizer_step, weights after the optimizer step."""

    def __init__(self) -> None:
        self.batch: dict[int, Any] = {}
        self.start: dict[int, dict[str, torch.Tensor]] = {}
        self.before: dict[int, dict[str, torch.Tensor]] = {}
        self.grads: dict[int, dict[str, torch.Tensor]] = {}
        self.after: dict[int, dict[str, torch.Tensor]] = {}
        self.batch_starts = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # type: ignore[no-untyped-def]
        self.batch_starts += 1
        self.batch.setdefault(trainer.global_step, []).append([t.clone() for t in batch])
        self.start.setdefault(
            trainer.global_step, {n: p.detach().clone() for n, p in pl_module.named_parameters()}
        )

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):  # type: ignore[no-untyped-def]
        s = trainer.global_step
        self.before[s] = {n: p.detach().clone() for n, p in pl_module.named_parameters()}
        self.grads[s] = {
            n: p.grad.detach().clone()
            for n, p in pl_module.named_parameters()
            if p.grad is not None
        }

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # type: ignore[no-untyped-def]
        self.after[trainer.global_step - 1] = {
            n: p.detach().clone() for n, p in pl_module.named_parameters()
        }


def all_monitors(every: int = 2, **kw: Any) -> list[Callback]:
    return [
        ActivationMonitor(modules=["net.*"], every_n_steps=every, **kw),
        GradientMonitor(every_n_steps=every, **kw),
        WeightMonitor(every_n_steps=every, **kw),
    ]


# ------------------------------------------------------------------------------------------
# Keys, steps and values in TensorBoard and MLflow
# ------------------------------------------------------------------------------------------


def test_keys_steps_and_values_in_tensorboard_and_mlflow(
    tb_logger, mlflow_logger, mlflow_client, mlflow_store
) -> None:
    torch.manual_seed(0)
    model = PlainMLP()
    probe = StepProbe()
    trainer = make_trainer(
        6, logger=[tb_logger, mlflow_logger], callbacks=[*all_monitors(every=2), probe]
    )
    trainer.fit(model, loader(n=48))
    assert module_hook_counts(model) == {}

    tb = read_tb(tb_dir(tb_logger))
    scalars = set(tb.scalar_tags())
    expected = {
        "activations/net.0/mean",
        "activations/net.1/std",
        "activations/net.2/zero_fraction",
        "activation_grads/net.0/mean",
        "activation_grads/net.2/l2_norm",
        "param_grads/net.0.weight/l2_norm",
        "param_grads/net.2.bias/max",
        "param_grads/global_norm",
        "weights/net.0.weight/mean",
        "weights/net.0.weight/update_ratio",
        "weights/net.2.bias/update_ratio",
    }
    assert expected <= scalars, expected - scalars
    assert not any(
        t.startswith("activation_grads/net.1") for t in scalars
    )  # Tanh owns no parameters
    assert "activations/net.0/rms" not in scalars  # rms is not a default statistic
    assert {
        "activations/net.0",
        "activation_grads/net.0",
        "param_grads/net.0.weight",
        "weights/net.0.weight",
    } <= set(tb.histogram_tags())
    for tag in expected:
        assert tb.steps(tag) == [0, 2, 4], tag

    for s in (0, 2, 4):
        w_before, grads, w_after = probe.before[s], probe.grads[s], probe.after[s]
        w = np64(w_before["net.0.weight"])
        assert tb.value("weights/net.0.weight/mean", s) == approx(w.mean(), np.abs(w).mean())
        assert tb.value("weights/net.0.weight/std", s) == approx(w.std())
        assert tb.value("weights/net.0.weight/max", s) == approx(w.max())
        assert tb.value("weights/net.0.weight/l2_norm", s) == approx(np.linalg.norm(w))
        # weights read in on_before_optimizer_step are the ones the forward used
        torch.testing.assert_close(
            probe.start[s]["net.0.weight"], w_before["net.0.weight"], rtol=0, atol=0
        )
        g = np64(grads["net.0.weight"])
        assert tb.value("param_grads/net.0.weight/l2_norm", s) == approx(np.linalg.norm(g))
        assert tb.value("param_grads/net.0.weight/mean", s) == approx(g.mean(), np.abs(g).mean())
        total = torch.nn.utils.get_total_norm(list(grads.values())).item()
        assert tb.value("param_grads/global_norm", s) == approx(total)
        for name in ("net.0.weight", "net.2.bias"):
            ratio = np.linalg.norm(np64(w_after[name]) - np64(w_before[name])) / np.linalg.norm(
                np64(w_before[name])
            )
            assert tb.value(f"weights/{name}/update_ratio", s) == approx(ratio)
        # activations of net.0 for this step's batch, with the weights the forward used
        ((x, y),) = probe.batch[s]
        h0 = torch.nn.functional.linear(x, w_before["net.0.weight"], w_before["net.0.bias"])
        a = np64(h0)
        assert tb.value("activations/net.0/mean", s) == approx(a.mean(), np.abs(a).mean())
        assert tb.value("activations/net.0/min", s) == approx(a.min())
        assert tb.value("activations/net.0/zero_fraction", s) == 0.0
        # d loss / d output of net.2 for MSE: 2 (out - y) / n
        out = torch.nn.functional.linear(
            torch.tanh(h0), w_before["net.2.weight"], w_before["net.2.bias"]
        )
        dout = np64(2 * (out - y) / out.numel())
        assert tb.value("activation_grads/net.2/l2_norm", s) == approx(np.linalg.norm(dout))
        assert tb.value("activation_grads/net.2/mean", s) == approx(
            dout.mean(), np.abs(dout).mean()
        )
        # histograms: totals are the element counts
        [h] = [e for e in tb.histograms("activations/net.0") if e.step == s]
        assert h.histogram_value.num == a.size == B * 5
        assert sum(h.histogram_value.bucket) == a.size
        assert h.histogram_value.min == approx(a.min()) and h.histogram_value.max == approx(a.max())

    # MLflow: same keys, steps and values (the run's table of every value, read back tidy)
    run_id = mlflow_logger.run_id
    table = read_stats(run_id, tracking_uri=mlflow_store["tracking_uri"])
    for tag in (
        "weights/net.0.weight/mean",
        "param_grads/global_norm",
        "activations/net.0/mean",
        "activation_grads/net.2/l2_norm",
        "weights/net.0.weight/update_ratio",
    ):
        kind, module, output, stat = split_key(tag)
        rows = table[
            (table.kind == kind)
            & (table.module == module)
            & (table.output == output)
            & (table.stat == stat)
        ]
        hist = list(zip(rows.step, rows.value, strict=False))
        assert [s for s, _ in hist] == [0, 2, 4], tag
        for (s, v), (s_tb, v_tb) in zip(hist, tb.scalars(tag), strict=True):
            assert s == s_tb, tag
            assert v == pytest.approx(v_tb, rel=1e-6, abs=1e-12)
    # histogram artifacts: data files and one PNG per key
    root = "lightning_inspect/histograms"
    files = set(_walk_artifacts(mlflow_client, run_id, root))
    assert {
        f"{root}/ActivationMonitor.jsonl",
        f"{root}/GradientMonitor.jsonl",
        f"{root}/WeightMonitor.jsonl",
    } <= files
    for key in (
        "activations/net.0",
        "activation_grads/net.0",
        "param_grads/net.0.weight",
        "weights/net.0.weight",
    ):
        assert f"{root}/{key}.png" in files, (key, sorted(files))
    local = mlflow_client.download_artifacts(
        run_id, f"{root}/ActivationMonitor.jsonl", str(tb_dir(tb_logger).parent)
    )
    from lightning_inspect.backends.mlflow import load_histogram_spool

    series = load_histogram_spool(Path(local))
    assert [p[0] for p in series["activations/net.0"]] == [0, 2, 4]
    assert all(p[3].sum() == B * 5 for p in series["activations/net.0"])
    png = mlflow_client.download_artifacts(
        run_id, f"{root}/activations/net.0.png", str(tb_dir(tb_logger).parent)
    )
    assert Path(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _walk_artifacts(client: Any, run_id: str, path: str) -> list[str]:
    out = []
    for info in client.list_artifacts(run_id, path):
        out.extend(_walk_artifacts(client, run_id, info.path) if info.is_dir else [info.path])
    return out


# ------------------------------------------------------------------------------------------
# In-place ReLU, MultiheadAttention, dict outputs, a module called twice
# ------------------------------------------------------------------------------------------


class ZooReference(Callback):
    """At each batch start, runs a deep copy of the model (hooks of ours there are inert) with
    an out-of-place ReLU, retaining the gradient of every selected output."""

    def __init__(self) -> None:
        self.outputs: dict[int, dict[str, list[torch.Tensor]]] = {}
        self.grads: dict[int, dict[str, list[torch.Tensor]]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # type: ignore[no-untyped-def]
        ref = copy.deepcopy(pl_module)
        ref.relu.inplace = False
        outs: dict[str, list[torch.Tensor]] = {}
        kept: dict[str, list[torch.Tensor]] = {}

        def keep(name: str):  # type: ignore[no-untyped-def]
            def hook(module, args, output):  # type: ignore[no-untyped-def]
                tensors = (
                    [(name, output)]
                    if isinstance(output, torch.Tensor)
                    else (
                        [(f"{name}/{i}", t) for i, t in enumerate(output)]
                        if isinstance(output, tuple)
                        else [
                            (f"{name}/{k}", t)
                            for k, t in output.items()
                            if isinstance(t, torch.Tensor)
                        ]
                    )
                )
                for key, t in tensors:
                    outs.setdefault(key, []).append(t.detach().clone())
                    if t.requires_grad:
                        t.retain_grad()
                        kept.setdefault(key, []).append(t)

            return hook

        for name in ("fc", "relu", "attn", "block", "shared", "head"):
            getattr(ref, name).register_forward_hook(keep(name))
        x, y = batch
        nn.functional.mse_loss(ref(x), y).backward()
        step = trainer.global_step
        self.outputs[step] = outs
        self.grads[step] = {
            k: [t.grad.detach().clone() for t in ts if t.grad is not None] for k, ts in kept.items()
        }


def _cat(ts: list[torch.Tensor]) -> np.ndarray:
    return np.concatenate([np64(t) for t in ts])


def test_inplace_relu_attention_dict_and_shared_module(tb_logger) -> None:
    torch.manual_seed(0)
    model = ZooModel()
    ref = ZooReference()
    names = ["fc", "relu", "attn", "block", "shared", "head"]
    monitors = [
        ActivationMonitor(modules=names, every_n_steps=1),
        GradientMonitor(modules=names, every_n_steps=1),
    ]
    with warnings.catch_warnings():
        warnings.simplefilter(
            "error", RuntimeWarning
        )  # no hook fault may be swallowed into a warning
        make_trainer(2, logger=tb_logger, callbacks=[*monitors, ref]).fit(model, loader(n=16))
    tb = read_tb(tb_dir(tb_logger))
    tags = set(tb.scalar_tags())
    for key in (
        "activations/attn/0/mean",
        "activations/attn/1/mean",
        "activations/block/main/mean",
        "activations/block/aux/mean",
        "activations/relu/mean",
        "activations/shared/mean",
        "activation_grads/attn/0/mean",
        "activation_grads/block/main/mean",
        "activation_grads/relu/mean",
    ):
        assert key in tags, key
    assert not any("block/note" in t or "block/missing" in t for t in tags)
    assert "activation_grads/attn/1/mean" not in tags  # attention weights do not reach the loss

    for s in (0, 1):
        outs, grads = ref.outputs[s], ref.grads[s]
        # activations: the ReLU's output as the ReLU returned it; Linear before it pre-ReLU
        for key in ("fc", "relu", "attn/0", "attn/1", "block/main", "head"):
            a = _cat(outs[key])
            assert tb.value(f"activations/{key}/mean", s) == approx(a.mean(), np.abs(a).mean()), key
            assert tb.value(f"activations/{key}/max", s) == approx(a.max()), key
        # the shared module: one row, the merge of both calls
        shared = _cat(outs["shared"])
        assert len(outs["shared"]) == 2
        [h] = [e for e in tb.histograms("activations/shared") if e.step == s]
        assert h.histogram_value.num == shared.size == 2 * B * IN_FEATURES
        assert tb.value("activations/shared/mean", s) == approx(
            shared.mean(), np.abs(shared).mean()
        )
        assert tb.value("activations/shared/std", s) == approx(shared.std())
        assert tb.value("activations/shared/min", s) == approx(shared.min())
        # gradients: the in-place ReLU's output and the Linear output it overwrote
        for key in ("relu", "fc", "attn/0", "block/main", "block/aux", "shared", "head"):
            g = _cat(grads[key])
            assert tb.value(f"activation_grads/{key}/l2_norm", s) == approx(np.linalg.norm(g)), key
            assert tb.value(f"activation_grads/{key}/mean", s) == approx(
                g.mean(), np.abs(g).mean()
            ), key
            assert tb.value(f"activation_grads/{key}/zero_fraction", s) == pytest.approx(
                np.mean(g == 0)
            ), key
        [h] = [e for e in tb.histograms("activation_grads/shared") if e.step == s]
        assert h.histogram_value.num == 2 * B * IN_FEATURES


# ------------------------------------------------------------------------------------------
# Non-finite values
# ------------------------------------------------------------------------------------------


class Poison(nn.Module):
    armed = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * float("nan") if self.armed else x * 1.0


class PoisonedMLP(PlainMLP):
    def __init__(self, at_step: int) -> None:
        super().__init__()
        self.at_step = at_step
        self.net = nn.Sequential(nn.Linear(IN_FEATURES, 5), Poison(), nn.Linear(5, 1))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.net[1].armed = self.global_step == self.at_step
        return super().training_step(batch, batch_idx)


def test_nonfinite_warn_names_first_module_and_step(tb_logger) -> None:
    model = PoisonedMLP(at_step=3)
    monitor = ActivationMonitor(modules=["net.*"], every_n_steps=1, on_nonfinite="warn")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(4, logger=tb_logger, callbacks=[monitor]).fit(model, loader())
    ours = [w for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(ours) == 1, [str(w.message) for w in ours]
    msg = str(ours[0].message)
    assert "step 3" in msg and "'activations/net.1'" in msg and "activations/net.2" in msg
    assert msg.index("activations/net.1") < msg.index("activations/net.2")
    tb = read_tb(tb_dir(tb_logger))
    assert tb.scalars("activations/net.1/nan_count") == [
        (0, 0.0),
        (1, 0.0),
        (2, 0.0),
        (3, float(B * 5)),
    ]
    assert tb.value("activations/net.0/nan_count", 3) == 0.0


def test_nonfinite_raise_stops_fit_cleanly(tb_logger) -> None:
    model = PoisonedMLP(at_step=2)
    probe = StepProbe()
    monitors = [
        ActivationMonitor(modules=["net.*"], every_n_steps=1, on_nonfinite="raise"),
        GradientMonitor(every_n_steps=1, on_nonfinite="raise"),
    ]
    with pytest.raises(
        NonFiniteError, match=r"step 2: first in execution order is 'activations/net.1'"
    ):
        make_trainer(6, logger=tb_logger, callbacks=[*monitors, probe]).fit(model, loader())
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks, m
    assert probe.batch_starts == 3  # nothing after the poisoned step
    tb = read_tb(tb_dir(tb_logger))
    assert tb.steps("activations/net.0/mean") == [0, 1, 2]
    assert tb.value("activations/net.1/nan_count", 2) == B * 5
    assert tb.steps("param_grads/global_norm") == [0, 1, 2]


# ------------------------------------------------------------------------------------------
# Inspection never changes training; hooks and copies
# ------------------------------------------------------------------------------------------


def _train_tiny_mlp(tmp: Path, callbacks: list[Callback]) -> dict[str, torch.Tensor]:
    L.seed_everything(7, verbose=False)
    model = TinyMLP()
    from lightning.pytorch.loggers import TensorBoardLogger

    logger = TensorBoardLogger(save_dir=str(tmp), name="", version="v")
    make_trainer(5, logger=logger, callbacks=callbacks).fit(model, loader(n=40, shuffle=True))
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_training_is_bit_identical_with_all_monitors(tmp_path: Path) -> None:
    plain = _train_tiny_mlp(tmp_path / "plain", [])
    monitors = [
        ActivationMonitor(every_n_steps=1, modules=["net.*"]),
        GradientMonitor(every_n_steps=1),
        WeightMonitor(every_n_steps=1),
        GraphMonitor(),
    ]
    inspected = _train_tiny_mlp(tmp_path / "inspected", monitors)
    assert plain.keys() == inspected.keys()
    for k in plain:
        assert torch.equal(plain[k], inspected[k]), k
    assert read_tb(tmp_path / "inspected").steps("weights/net.0.weight/mean") == [0, 1, 2, 3, 4]


class CopiesItself(PlainMLP):
    def __init__(self) -> None:
        super().__init__()
        self.copies: list[Any] = []
        self.hooks_seen: dict[str, int] = {}

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if self.global_step == 1:
            self.hooks_seen = module_hook_counts(self)
            buf = io.BytesIO()
            torch.save(self, buf)
            buf.seek(0)
            loaded = torch.load(buf, weights_only=False)
            clone = copy.deepcopy(self)
            x = batch[0]
            with torch.no_grad():
                self.copies = [loaded(x), clone(x), clone.net(x)]
        return super().training_step(batch, batch_idx)


def test_save_and_deepcopy_inside_a_logged_training_step(tb_logger) -> None:
    model = CopiesItself()
    monitors = all_monitors(every=1)
    make_trainer(3, logger=tb_logger, callbacks=monitors).fit(model, loader())
    assert model.hooks_seen, "the monitors' hooks were attached during the logged step"
    assert len(model.copies) == 3 and all(c.shape == (B, 1) for c in model.copies)
    assert module_hook_counts(model) == {}
    tb = read_tb(tb_dir(tb_logger))
    # the copies' forwards (through inert hooks) were not recorded
    for s in (0, 1, 2):
        [h] = [e for e in tb.histograms("activations/net.0") if e.step == s]
        assert h.histogram_value.num == B * 5


# ------------------------------------------------------------------------------------------
# Gradient accumulation, validation, resumption
# ------------------------------------------------------------------------------------------


def test_gradient_accumulation_logs_once_per_optimizer_step(tb_logger) -> None:
    probe = StepProbe()
    make_trainer(
        3, logger=tb_logger, callbacks=[*all_monitors(every=1), probe], accumulate_grad_batches=2
    ).fit(PlainMLP(), loader(n=48))
    tb = read_tb(tb_dir(tb_logger))
    for tag in (
        "activations/net.0/mean",
        "param_grads/global_norm",
        "weights/net.0.weight/update_ratio",
        "activation_grads/net.0/mean",
    ):
        assert tb.steps(tag) == [0, 1, 2], tag
    for s in (0, 1, 2):
        assert len(probe.batch[s]) == 2
        [h] = [e for e in tb.histograms("activations/net.0") if e.step == s]
        assert h.histogram_value.num == 2 * B * 5  # both micro-batches
        [h] = [e for e in tb.histograms("activation_grads/net.0") if e.step == s]
        assert h.histogram_value.num == 2 * B * 5
        x = torch.cat([b[0] for b in probe.batch[s]])
        w = probe.start[s]
        a = np64(torch.nn.functional.linear(x, w["net.0.weight"], w["net.0.bias"]))
        assert tb.value("activations/net.0/mean", s) == approx(a.mean(), np.abs(a).mean())
        g = np64(probe.grads[s]["net.0.weight"])  # accumulated over both micro-batches
        assert tb.value("param_grads/net.0.weight/l2_norm", s) == approx(np.linalg.norm(g))


class WithValidation(PlainMLP):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(IN_FEATURES, 5, bias=False), nn.Tanh(), nn.Linear(5, 1))
        self.val_batches = 0

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.val_batches += 1
        self.log("val_loss", nn.functional.mse_loss(self(batch[0]), batch[1]))


def test_validation_forwards_are_not_recorded(tb_logger) -> None:
    model = WithValidation()
    zeros = DataLoader(
        TensorDataset(torch.zeros(16, IN_FEATURES), torch.zeros(16, 1)), batch_size=8
    )
    trainer = make_trainer(
        4,
        logger=tb_logger,
        callbacks=[ActivationMonitor(modules=["net.0"], every_n_steps=1)],
        limit_val_batches=2,
        val_check_interval=1,
        num_sanity_val_steps=2,
        check_val_every_n_epoch=None,
    )
    trainer.fit(model, loader(), zeros)
    assert model.val_batches >= 2 + 4 * 2  # sanity check and a validation after every step
    tb = read_tb(tb_dir(tb_logger))
    assert [v for _, v in tb.scalars("activations/net.0/zero_fraction")] == [0.0] * 4
    for h in tb.histograms("activations/net.0"):
        assert h.histogram_value.num == B * 5


def test_state_dict_round_trip() -> None:
    m = ActivationMonitor(every_n_steps=3)
    assert m.state_dict() == {"last_logged_step": None}
    m.last_logged_step = 9
    m2 = ActivationMonitor(every_n_steps=3)
    m2.load_state_dict(m.state_dict())
    assert m2.last_logged_step == 9
    assert m.state_key == m2.state_key
    assert ActivationMonitor(every_n_steps=4).state_key != m.state_key


@pytest.mark.filterwarnings(
    "ignore:.*resuming from a checkpoint that ended before the epoch ended.*"
)
@pytest.mark.filterwarnings(
    "ignore:.*callbacks used to create the checkpoint need to be provided.*"
)
def test_resume_continues_the_schedule(tmp_path: Path) -> None:
    from lightning.pytorch.loggers import TensorBoardLogger

    def run(version: str, max_steps: int, ckpt: str | None, monitor: Callback) -> Path:
        logger = TensorBoardLogger(save_dir=str(tmp_path), name="", version=version)
        ckpt_cb = ModelCheckpoint(
            dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1, filename="{step}"
        )
        trainer = make_trainer(
            max_steps, logger=logger, callbacks=[monitor, ckpt_cb], enable_checkpointing=True
        )
        trainer.fit(PlainMLP(), loader(n=48), ckpt_path=ckpt)
        return Path(logger.log_dir)

    first = ActivationMonitor(modules=["net.0"], every_n_steps=3)
    d1 = run("a", 5, None, first)
    assert read_tb(d1).steps("activations/net.0/mean") == [0, 3]
    ckpt = tmp_path / "ckpt" / "step=4.ckpt"
    state = torch.load(ckpt, weights_only=False)["callbacks"][first.state_key]
    assert state == {"last_logged_step": 3}

    second = ActivationMonitor(modules=["net.0"], every_n_steps=3)
    d2 = run("b", 10, str(ckpt), second)
    assert read_tb(d2).steps("activations/net.0/mean") == [6, 9]
    assert second.last_logged_step == 9

    # a checkpoint whose state says the resumed step was logged already: no duplicate
    ckpt6 = tmp_path / "ckpt" / "step=6.ckpt"
    data = torch.load(ckpt6, weights_only=False)
    key = ActivationMonitor(modules=["net.0"], every_n_steps=1).state_key
    data["callbacks"][key] = {"last_logged_step": 6}
    torch.save(data, tmp_path / "patched.ckpt")
    third = ActivationMonitor(modules=["net.0"], every_n_steps=1)
    d3 = run("c", 9, str(tmp_path / "patched.ckpt"), third)
    assert read_tb(d3).steps("activations/net.0/mean") == [7, 8]


# ------------------------------------------------------------------------------------------
# Bad arguments, missing backends, selections that match nothing
# ------------------------------------------------------------------------------------------

MONITORS = [ActivationMonitor, GradientMonitor, WeightMonitor]


@pytest.mark.parametrize("cls", MONITORS, ids=lambda c: c.__name__)
@pytest.mark.parametrize(
    "kwargs, fragments",
    [
        (dict(every_n_steps=0), ["every_n_steps=0", ">= 1"]),
        (dict(stats=["meen"]), ["stats=", "'meen'", "Did you mean 'mean'"]),
        (dict(backends=["tensorbord"]), ["backends=", "'tensorbord'", "'tensorboard'"]),
        (dict(on_nonfinite="boom"), ["on_nonfinite='boom'", "'warn'", "'raise'"]),
        (dict(bins=1), ["bins=1", "expected an integer >= 2 and <= 1024"]),
        (dict(bins=100_000), ["bins=100000", "expected an integer >= 2 and <= 1024"]),
        (dict(histograms="yes"), ["histograms='yes'"]),
        (dict(modules=[""]), ["modules=['']"]),
        (dict(exclude=3), ["exclude=3"]),
        (dict(start_step=5, stop_step=5), ["stop_step=5"]),
    ],
)
def test_bad_arguments(cls: type, kwargs: dict, fragments: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        cls(**kwargs)
    msg = str(info.value)
    assert msg.startswith(cls.__name__)
    for fragment in fragments:
        assert fragment in msg, (fragment, msg)


def test_backend_without_logger_fails_at_fit_start(tb_logger) -> None:
    probe = StepProbe()
    with pytest.raises(BackendError, match=r"'mlflow'.*MLFlowLogger.*TensorBoardLogger"):
        make_trainer(
            2, logger=tb_logger, callbacks=[GradientMonitor(backends=["mlflow"]), probe]
        ).fit(PlainMLP(), loader())
    assert probe.batch_starts == 0
    with pytest.raises(BackendError, match=r"'tensorboard'.*no logger"):
        make_trainer(2, logger=False, callbacks=[WeightMonitor(backends="tensorboard"), probe]).fit(
            PlainMLP(), loader()
        )
    assert probe.batch_starts == 0


def test_selection_matching_nothing_fails_before_the_first_step() -> None:
    probe = StepProbe()
    model = PlainMLP()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(SelectionError, match=r"ActivationMonitor.*'net.lyr\*'.*net\.0"):
        make_trainer(2, callbacks=[ActivationMonitor(modules=["net.lyr*"]), probe]).fit(
            model, loader()
        )
    assert probe.batch_starts == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert module_hook_counts(model) == {}


def test_invalid_regex_fails_in_the_constructor() -> None:
    with pytest.raises(ConfigError, match=r"modules"):
        ActivationMonitor(modules=["re:("])


def test_monitor_reused_for_a_second_fit_logs_its_first_step(tmp_path: Path) -> None:
    from lightning.pytorch.loggers import TensorBoardLogger

    monitor = ActivationMonitor(modules=["net.0"], every_n_steps=5)
    for version in ("first", "second"):  # e.g. a sweep in a notebook reusing its callbacks
        logger = TensorBoardLogger(save_dir=str(tmp_path), name="", version=version)
        make_trainer(3, logger=logger, callbacks=[monitor]).fit(PlainMLP(), loader())
        tb = read_tb(logger.log_dir)
        assert "activations/net.0/mean" in tb.scalar_tags(), f"{version} fit logged nothing"
        assert tb.steps("activations/net.0/mean") == [0], version


class StopsBeforeTheStep(Callback):
    """Raises in the first optimizer step, after the monitors took their weight copies."""

    def on_before_optimizer_step(self, *args: Any) -> None:
        raise RuntimeError("stopped before the optimizer step")


def test_an_interrupted_step_releases_the_weight_copies_and_the_next_fit_logs(
    tmp_path: Path,
) -> None:
    from lightning.pytorch.loggers import TensorBoardLogger

    monitor = WeightMonitor(every_n_steps=5)
    trainer = make_trainer(3, logger=False, callbacks=[monitor, StopsBeforeTheStep()])
    with pytest.raises(RuntimeError, match="before the optimizer step"):
        trainer.fit(PlainMLP(), loader())
    assert monitor._before is None  # no copy of the weights outlives the fit
    logger = TensorBoardLogger(save_dir=str(tmp_path), name="", version="again")
    make_trainer(3, logger=logger, callbacks=[monitor]).fit(PlainMLP(), loader())
    assert read_tb(logger.log_dir).steps("weights/net.0.weight/mean") == [0]


def test_disabled_monitor_does_nothing(tb_logger) -> None:
    model = PlainMLP()
    monitors = [
        ActivationMonitor(every_n_steps=1, enabled=False),
        GradientMonitor(every_n_steps=1, enabled=False),
    ]

    class Spy(Callback):
        seen: ClassVar[list[dict[str, int]]] = []

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):  # type: ignore[no-untyped-def]
            self.seen.append(module_hook_counts(pl_module))

    make_trainer(2, logger=tb_logger, callbacks=[*monitors, Spy()]).fit(model, loader())
    assert Spy.seen == [{}, {}]
    tags = read_tb(tb_dir(tb_logger)).scalar_tags()
    assert not any(
        t.startswith(("activations/", "activation_grads/", "param_grads/")) for t in tags
    )


def test_start_stop_and_stats_selection(tb_logger) -> None:
    monitor = WeightMonitor(
        every_n_steps=2,
        start_step=1,
        stop_step=6,
        stats=["rms", "nan_count"],
        histograms=False,
        update_ratio=False,
    )
    make_trainer(7, logger=tb_logger, callbacks=[monitor]).fit(PlainMLP(), loader(n=56))
    tb = read_tb(tb_dir(tb_logger))
    ours = sorted(t for t in tb.scalar_tags() if t.startswith("weights/"))
    assert ours == sorted(
        f"weights/net.{i}.{p}/{s}"
        for i in (0, 2)
        for p in ("weight", "bias")
        for s in ("rms", "nan_count")
    )
    assert tb.steps("weights/net.0.weight/rms") == [1, 3, 5]
    assert not tb.histogram_tags()


def test_update_ratio_of_a_zero_parameter_is_inf_when_it_moves_and_nan_when_not(
    tb_logger, mlflow_logger, mlflow_store, mlflow_client
) -> None:
    torch.manual_seed(0)
    model = PlainMLP()
    with torch.no_grad():
        model.net[2].bias.zero_()  # zero-initialised, then moved by the step
        model.net[0].bias.zero_()
    model.net[0].bias.requires_grad_(False)  # zero, and never moves
    probe = StepProbe()
    monitor = WeightMonitor(every_n_steps=1, histograms=False, mlflow_metrics="all")
    make_trainer(1, logger=[tb_logger, mlflow_logger], callbacks=[monitor, probe]).fit(
        model, loader()
    )

    tb = read_tb(tb_dir(tb_logger))
    moved = np64(probe.after[0]["net.2.bias"]) - np64(probe.before[0]["net.2.bias"])
    assert np.linalg.norm(moved) > 0
    assert tb.value("weights/net.2.bias/update_ratio", 0) == np.inf
    assert np.isnan(tb.value("weights/net.0.bias/update_ratio", 0))
    w0, w1 = np64(probe.before[0]["net.2.weight"]), np64(probe.after[0]["net.2.weight"])
    expected = np.linalg.norm(w1 - w0) / np.linalg.norm(w0)
    assert tb.value("weights/net.2.weight/update_ratio", 0) == pytest.approx(expected, rel=1e-5)
    # MLflow: the run's table of every value, read back
    table = read_stats(mlflow_logger.run_id, tracking_uri=mlflow_store["tracking_uri"])

    def stored(parameter: str) -> list[tuple[int, float]]:
        rows = table[
            (table.kind == "weights") & (table.module == parameter) & (table.stat == "update_ratio")
        ]
        return list(zip(rows.step.tolist(), rows.value.tolist(), strict=True))

    [(_, ratio)] = stored("net.2.weight")
    assert ratio == pytest.approx(expected, rel=1e-5)
    assert stored("net.2.bias") == [(0, np.inf)]
    [(_, still)] = stored("net.0.bias")
    assert np.isnan(still)
    # MLflow's metrics (mlflow_metrics="all") store +inf as the largest float64, and NaN as NaN
    run = mlflow_logger.run_id
    [(_, metric)] = mlflow_history(mlflow_client, run, "weights/net.2.weight/update_ratio")
    assert metric == pytest.approx(expected, rel=1e-5)
    assert mlflow_history(mlflow_client, run, "weights/net.2.bias/update_ratio") == [
        (0, np.finfo(np.float64).max)
    ]
    assert np.isnan(mlflow_history(mlflow_client, run, "weights/net.0.bias/update_ratio")[0][1])


class Spectrum(nn.Module):
    """A complex output: the FFT of a Linear's output."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(IN_FEATURES, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.fft.fft(self.fc(x))


class ComplexModel(PlainMLP):
    def __init__(self) -> None:
        super().__init__()
        self.spectrum = Spectrum()
        self.head = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spectrum = self.spectrum(x)
        spectrum.register_hook(lambda g: self.grads.append(g.detach().clone()))
        return self.head(spectrum.abs())


def test_gradients_of_complex_outputs_are_logged(tb_logger) -> None:
    torch.manual_seed(0)
    model = ComplexModel()
    model.grads = []
    monitor = GradientMonitor(
        modules="spectrum", every_n_steps=1, parameters=False, global_norm=False
    )
    make_trainer(1, logger=tb_logger, callbacks=[monitor]).fit(model, loader())
    tb = read_tb(tb_dir(tb_logger))
    [grad] = model.grads
    # the real and imaginary parts
    parts = torch.view_as_real(grad).to(torch.float64).reshape(-1).numpy()
    assert tb.value("activation_grads/spectrum/mean", 0) == approx(
        parts.mean(), np.abs(parts).mean()
    )
    assert tb.value("activation_grads/spectrum/max", 0) == approx(parts.max())
    assert tb.histograms("activation_grads/spectrum")[0].histogram_value.num == parts.size


def test_parameter_patterns_choose_weights_and_parameter_gradients(tb_logger) -> None:
    torch.manual_seed(0)
    monitors = [
        WeightMonitor(every_n_steps=1, exclude_params="*.bias", histograms=False),
        GradientMonitor(every_n_steps=1, params="*.weight", outputs=False, histograms=False),
    ]
    make_trainer(1, logger=tb_logger, callbacks=monitors).fit(PlainMLP(), loader())
    tags = read_tb(tb_dir(tb_logger)).scalar_tags()
    for prefix in ("weights", "param_grads"):
        logged = {
            t.split("/")[1]
            for t in tags
            if t.startswith(prefix + "/") and t != "param_grads/global_norm"
        }
        assert logged == {"net.0.weight", "net.2.weight"}, prefix


@pytest.mark.parametrize("cls", [WeightMonitor, GradientMonitor], ids=lambda c: c.__name__)
def test_parameter_pattern_matching_nothing_fails_before_the_first_step(cls: type) -> None:
    probe = StepProbe()
    with pytest.raises(
        SelectionError, match=rf"^{cls.__name__}: parameter pattern 'net.0.weigth'.*net\.0\.weight"
    ):
        make_trainer(2, callbacks=[cls(params="net.0.weigth"), probe]).fit(PlainMLP(), loader())
    assert probe.batch_starts == 0
    with pytest.raises(ConfigError, match=rf"^{cls.__name__}\(exclude_params=3\)"):
        cls(exclude_params=3)


class GAN(L.LightningModule):
    """Manual optimization with two optimizers: ``opt_d`` (critic) then ``opt_g`` (generator)."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.gen = nn.Sequential(nn.Linear(3, IN_FEATURES))
        self.disc = nn.Sequential(nn.Linear(IN_FEATURES, 4), nn.Tanh(), nn.Linear(4, 1))
        self.noise = torch.Generator().manual_seed(0)

    def training_step(self, batch: Any, batch_idx: int) -> None:
        x, _ = batch
        opt_d, opt_g = self.optimizers()
        fake = self.gen(torch.randn(x.shape[0], 3, generator=self.noise))
        d_loss = (
            nn.functional.softplus(-self.disc(x)).mean()
            + nn.functional.softplus(self.disc(fake.detach())).mean()
        )
        opt_d.zero_grad()
        self.manual_backward(d_loss)
        opt_d.step()
        g_loss = nn.functional.softplus(-self.disc(fake)).mean()  # also leaves gradients on disc
        opt_g.zero_grad()
        self.manual_backward(g_loss)
        opt_g.step()

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        return [
            torch.optim.SGD(self.disc.parameters(), lr=0.05),
            torch.optim.SGD(self.gen.parameters(), lr=0.05),
        ]


class OptimizerProbe(Callback):
    """Per global step: the gradients of the parameters the stepping optimizer updates."""

    def __init__(self) -> None:
        self.grads: dict[int, dict[str, torch.Tensor]] = {}
        self.start: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # type: ignore[no-untyped-def]
        self.start[trainer.global_step] = {
            n: p.detach().clone() for n, p in pl_module.named_parameters()
        }

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):  # type: ignore[no-untyped-def]
        ids = {id(p) for group in optimizer.param_groups for p in group["params"]}
        self.grads[trainer.global_step] = {
            n: p.grad.detach().clone() for n, p in pl_module.named_parameters() if id(p) in ids
        }


def test_two_optimizers_per_batch_schedule_and_parameter_gradients(
    tb_logger, tmp_path: Path
) -> None:
    from lightning_inspect import HealthMonitor

    torch.manual_seed(0)
    probe = OptimizerProbe()
    health = HealthMonitor(every_n_steps=3, console=False, warn_findings=False, pictures=False)
    monitors = [
        ActivationMonitor(modules="disc.0", every_n_steps=3),
        GradientMonitor(every_n_steps=3, outputs=False),
        WeightMonitor(every_n_steps=3, update_ratio=False),
        health,
    ]
    make_trainer(24, logger=tb_logger, callbacks=[*monitors, probe]).fit(GAN(), loader(n=96))

    tb = read_tb(tb_dir(tb_logger))
    logged = [0, 3, 6, 9, 12, 15, 18, 21]  # each batch takes steps 2k (opt_d) and 2k + 1 (opt_g)
    for tag in (
        "activations/disc.0/mean",
        "param_grads/gen.0.weight/l2_norm",
        "param_grads/disc.0.weight/l2_norm",
        "param_grads/global_norm",
        "weights/gen.0.weight/mean",
        "health/disc.0/grad_norm",
    ):
        assert tb.steps(tag) == logged, tag
    for s in logged:
        d_step = s - s % 2  # the batch's opt_d step; opt_g steps at d_step + 1
        assert [
            h.histogram_value.num for h in tb.histograms("activations/disc.0") if h.step == s
        ] == [3 * B * 4]
        d_grads, g_grads = probe.grads[d_step], probe.grads[d_step + 1]
        assert set(d_grads) == {n for n, _ in GAN().disc.named_parameters(prefix="disc")}
        # each gradient read at its own optimizer's step
        for name, grad in [*d_grads.items(), *g_grads.items()]:
            g, key = np64(grad), f"param_grads/{name}"
            assert tb.value(f"{key}/l2_norm", s) == approx(np.linalg.norm(g)), (key, s)
            assert tb.value(f"{key}/mean", s) == approx(g.mean(), np.abs(g).mean()), (key, s)
        everything = np.concatenate([np64(g) for g in [*d_grads.values(), *g_grads.values()]])
        assert tb.value("param_grads/global_norm", s) == approx(np.linalg.norm(everything))
        for module in ("disc.0", "gen.0"):
            own = [
                np64(g)
                for n, g in [*d_grads.items(), *g_grads.items()]
                if n.startswith(module + ".")
            ]
            assert tb.value(f"health/{module}/grad_norm", s) == approx(
                np.linalg.norm(np.concatenate(own))
            )
        w = np64(probe.start[d_step]["gen.0.weight"])  # weights read at the batch's first step
        assert tb.value("weights/gen.0.weight/mean", s) == approx(w.mean(), np.abs(w).mean())

    # the first batch is expected to take one step per optimizer: step 1 is found in batch 0
    from lightning.pytorch.loggers import TensorBoardLogger

    logger = TensorBoardLogger(save_dir=str(tmp_path), name="", version="late")
    late = ActivationMonitor(modules="disc.0", every_n_steps=4, start_step=1)
    make_trainer(8, logger=logger, callbacks=[late]).fit(GAN(), loader())
    assert read_tb(logger.log_dir).steps("activations/disc.0/mean") == [1, 5]


class NestsAFit(PlainMLP):
    """At global step 1, inside its training step, runs a whole fit of another model."""

    def __init__(self, inner: Any) -> None:
        super().__init__()
        self.inner = inner

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if self.global_step == 1:
            self.inner()
        return super().training_step(batch, batch_idx)


def test_one_monitor_instance_in_nested_fits_logs_both(tmp_path: Path) -> None:
    from lightning.pytorch.loggers import TensorBoardLogger

    from lightning_inspect import HealthMonitor

    monitors = [
        ActivationMonitor(modules="net.0", every_n_steps=1),
        WeightMonitor(every_n_steps=1),
        HealthMonitor(every_n_steps=1, console=False, warn_findings=False, pictures=False),
    ]
    outer_logger = TensorBoardLogger(save_dir=str(tmp_path), name="", version="outer")
    inner_logger = TensorBoardLogger(save_dir=str(tmp_path), name="", version="inner")
    inner_model = PlainMLP()

    def inner_fit() -> None:
        make_trainer(2, logger=inner_logger, callbacks=monitors).fit(inner_model, loader())

    torch.manual_seed(0)
    outer_model = NestsAFit(inner_fit)
    make_trainer(4, logger=outer_logger, callbacks=monitors).fit(outer_model, loader())
    outer, inner = read_tb(outer_logger.log_dir), read_tb(inner_logger.log_dir)
    for tag in (
        "activations/net.0/mean",
        "weights/net.0.weight/update_ratio",
        "health/net.0/grad_norm",
    ):
        assert outer.steps(tag) == [0, 1, 2, 3], tag
        assert inner.steps(tag) == [0, 1], tag
    assert module_hook_counts(outer_model) == {} and module_hook_counts(inner_model) == {}
    assert all(not m._active and m.sinks == [] for m in monitors)

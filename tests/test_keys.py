"""lightning_inspect.core.keys: the metric-key scheme and MLflow key sanitising."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest
import torch
from conftest import TinyModule, loader, make_trainer, read_tb
from hypothesis import given, settings
from hypothesis import strategies as st
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn

from lightning_inspect import ActivationMonitor, GradientMonitor, WeightMonitor
from lightning_inspect.core.keys import (
    MLFLOW_MAX_KEY_LENGTH,
    MlflowKeys,
    escape_name,
    metric_key,
    unescape_name,
)

MLFLOW_CHARS = re.compile(r"^[/\w.\- ]*$")


def mlflow_accepts(key: str) -> bool:
    from mlflow.exceptions import MlflowException
    from mlflow.utils.validation import _validate_metric_name

    try:
        _validate_metric_name(key)
    except MlflowException:
        return False
    return len(key) <= MLFLOW_MAX_KEY_LENGTH


def test_metric_key_joins_non_empty_parts() -> None:
    assert metric_key("activations", "encoder.0", "mean") == "activations/encoder.0/mean"
    assert metric_key("activations", "attn", "", "std") == "activations/attn/std"
    assert (
        metric_key("activation_grads", "attn", "0", "l2_norm") == "activation_grads/attn/0/l2_norm"
    )


def test_ordinary_names_are_not_escaped() -> None:
    for name in ("encoder.0", "blocks.11.attn.q_proj", "fc.weight", "a b-c_d"):
        assert escape_name(name) == name


def test_slash_and_percent_in_names_are_escaped_reversibly() -> None:
    assert escape_name("head/logits") == "head%2Flogits"
    assert escape_name("50%/x") == "50%25%2Fx"
    assert escape_name("%2F") == "%252F"  # an escape sequence in a name is itself escaped
    assert unescape_name("%252F") == "%2F"


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("ab/%2F5.")), max_size=12))
def test_escaped_names_are_one_segment_and_round_trip(name: str) -> None:
    segment = escape_name(name)
    assert "/" not in segment
    assert unescape_name(segment) == name


class Constant(nn.Module):
    """``value`` times a trainable scale (1 at the start), as a tensor or as ``{"logits": ...}``."""

    def __init__(self, value: float, as_dict: bool) -> None:
        super().__init__()
        self.value, self.as_dict = value, as_dict
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
        out = self.scale * torch.full((x.shape[0], 3), self.value)
        return {"logits": out} if self.as_dict else out


class SlashNames(TinyModule):
    """A ModuleDict key ``"head/logits"`` next to a module ``head`` returning ``{"logits": ...}``."""

    def __init__(self) -> None:
        super().__init__()
        self.parts = nn.ModuleDict(
            {"head": Constant(1000.0, True), "head/logits": Constant(-0.05, False)}
        )
        self.net = nn.Linear(6, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.parts["head"](x)["logits"], self.parts["head/logits"](x)
        return self.net(x) + 1e-6 * (a.mean(1, keepdim=True) + b.mean(1, keepdim=True))


def test_a_module_name_with_a_slash_never_merges_with_an_output_path(tmp_path: Path) -> None:
    """Real fit: both modules log under their own keys, read back apart from TensorBoard."""
    names = ["parts.head", "parts.head/logits"]
    monitors = [
        ActivationMonitor(modules=names, every_n_steps=1, stats=["mean"]),
        GradientMonitor(modules=names, every_n_steps=1, stats=["mean"]),
        WeightMonitor(modules=names, every_n_steps=1, stats=["mean"]),
    ]
    logger = TensorBoardLogger(save_dir=str(tmp_path), name="", version="run")
    make_trainer(1, logger=logger, callbacks=monitors).fit(SlashNames(), loader(n=8))
    tb = read_tb(logger.log_dir)
    assert tb.value("activations/parts.head/logits/mean", 0) == pytest.approx(1000.0)
    assert tb.value("activations/parts.head%2Flogits/mean", 0) == pytest.approx(-0.05)
    assert len(tb.histograms("activations/parts.head/logits")) == 1
    assert len(tb.histograms("activations/parts.head%2Flogits")) == 1
    tags = set(tb.scalar_tags())
    for key in (
        "activation_grads/parts.head/logits/mean",
        "activation_grads/parts.head%2Flogits/mean",
        "weights/parts.head.scale/mean",
        "weights/parts.head%2Flogits.scale/mean",
        "param_grads/parts.head.scale/mean",
        "param_grads/parts.head%2Flogits.scale/mean",
    ):
        assert key in tags, key
    assert unescape_name("parts.head%2Flogits") == "parts.head/logits"


def test_valid_keys_pass_unchanged() -> None:
    keys = MlflowKeys()
    for key in [
        "activations/encoder.0/mean",
        "weights/fc.weight/update_ratio",
        "param_grads/global_norm",
        "a b-c_d",
    ]:
        assert keys(key) == key
        assert mlflow_accepts(keys(key))


def test_invalid_characters_are_replaced_and_collisions_hashed() -> None:
    keys = MlflowKeys()
    a = keys("activations/blocks[0]/mean")
    b = keys("activations/blocks(0)/mean")
    assert a == "activations/blocks_0_/mean"
    digest = hashlib.sha1(b"activations/blocks(0)/mean").hexdigest()[:8]
    assert b == f"activations/blocks_0_/mean-{digest}"
    assert mlflow_accepts(a) and mlflow_accepts(b)


def test_stable_for_repeated_calls() -> None:
    keys = MlflowKeys()
    originals = ["x(1)", "x[1]", "x_1_", "y" * 400, "ok/key"]
    first = [keys(k) for k in originals]
    for _ in range(3):
        assert [keys(k) for k in reversed(originals)] == list(reversed(first))


def test_long_keys_are_truncated_with_a_hash() -> None:
    keys = MlflowKeys()
    base = "activations/" + "very_long_module_name." * 20
    k1, k2 = keys(base + "a/mean"), keys(base + "b/mean")
    assert len(k1) == len(k2) == MLFLOW_MAX_KEY_LENGTH
    assert k1 != k2 and mlflow_accepts(k1) and mlflow_accepts(k2)
    exactly = "k" * MLFLOW_MAX_KEY_LENGTH
    assert keys(exactly) == exactly


_segment = st.text(alphabet=st.sampled_from(list("ab_(.[]{}:#é -0")), min_size=1, max_size=12)
_key = st.lists(_segment, min_size=1, max_size=4).map("/".join)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.one_of(_key, st.text(min_size=240, max_size=300, alphabet="ab(")),
        min_size=1,
        max_size=30,
        unique=True,
    )
)
def test_never_maps_two_keys_to_one(originals: list[str]) -> None:
    keys = MlflowKeys()
    out = [keys(k) for k in originals]
    assert len(set(out)) == len(out)
    for k in out:
        assert MLFLOW_CHARS.match(k) and len(k) <= MLFLOW_MAX_KEY_LENGTH
    assert [keys(k) for k in originals] == out


def test_hashed_key_cannot_collide_with_a_taken_key() -> None:
    keys = MlflowKeys()
    digest = hashlib.sha1(b"x_").hexdigest()[:8]
    first = keys(f"x_-{digest}")  # a valid key that happens to look like a hashed one
    keys("x(")  # -> 'x_'
    third = keys("x_")  # 'x_' is taken -> 'x_-<sha1(x_)>' == first
    assert third != first


@pytest.mark.parametrize(
    "key", ["activations/head/../mean", "activations/head/./mean", "activations/head/a//mean"]
)
def test_sanitised_keys_pass_mlflow_validation(key: str) -> None:
    assert mlflow_accepts(MlflowKeys()(key))

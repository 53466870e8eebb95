"""lightning_inspect.keys: the metric-key scheme and MLflow key sanitising."""

from __future__ import annotations

import hashlib
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_inspect.keys import MLFLOW_MAX_KEY_LENGTH, MlflowKeys, metric_key

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
    assert metric_key("activation_grads", "attn", "0", "l2_norm") == "activation_grads/attn/0/l2_norm"


def test_valid_keys_pass_unchanged() -> None:
    keys = MlflowKeys()
    for key in ["activations/encoder.0/mean", "weights/fc.weight/update_ratio", "param_grads/global_norm", "a b-c_d"]:
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
@given(st.lists(st.one_of(_key, st.text(min_size=240, max_size=300, alphabet="ab(")), min_size=1, max_size=30, unique=True))
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


@pytest.mark.parametrize("key", ["activations/head/../mean", "activations/head/./mean", "activations/head/a//mean"])
def test_sanitised_keys_pass_mlflow_validation(key: str) -> None:
    assert mlflow_accepts(MlflowKeys()(key))

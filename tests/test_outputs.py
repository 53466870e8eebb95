"""lightning_inspect.core.outputs.iter_tensors: every output structure a module can return."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from lightning_inspect.core.outputs import MAX_DEPTH, iter_tensors


def paths(obj: object) -> list[str]:
    return [p for p, _ in iter_tensors(obj)]


class Pair(NamedTuple):
    logits: torch.Tensor
    hidden: torch.Tensor | None


@dataclass
class Out:
    loss: torch.Tensor
    extra: dict = field(default_factory=dict)
    name: str = "x"


def test_plain_tensor_has_empty_path() -> None:
    t = torch.zeros(2)
    [(p, got)] = list(iter_tensors(t))
    assert p == "" and got is t


def test_tuple_and_list_use_indices() -> None:
    a, b, c = torch.zeros(1), torch.ones(1), torch.zeros(2)
    items = list(iter_tensors((a, [b, c])))
    assert [p for p, _ in items] == ["0", "1/0", "1/1"]
    assert items[0][1] is a and items[2][1] is c


def test_dict_uses_keys_in_order_and_stringifies() -> None:
    out = {"z": torch.zeros(1), 3: torch.ones(1), "a": {"b": torch.zeros(1)}}
    assert paths(out) == ["z", "3", "a/b"]


def test_namedtuple_uses_field_names_and_skips_none() -> None:
    assert paths(Pair(torch.zeros(1), None)) == ["logits"]
    assert paths(Pair(torch.zeros(1), torch.ones(1))) == ["logits", "hidden"]


def test_dataclass_uses_field_names() -> None:
    out = Out(torch.zeros(1), {"k": (torch.ones(1), None)})
    assert paths(out) == ["loss", "extra/k/0"]


def test_none_and_non_tensor_leaves_are_skipped() -> None:
    assert paths(None) == []
    assert paths(("text", 3, 2.5, True, b"bytes", None, object())) == []
    assert paths([None, torch.zeros(1), "x"]) == ["1"]
    assert paths(Out) == []  # a dataclass *type* is not walked


def test_multihead_attention_output() -> None:
    attn = torch.nn.MultiheadAttention(4, 2)
    x = torch.randn(3, 2, 4)
    assert paths(attn(x, x, x)) == ["0", "1"]
    assert paths(attn(x, x, x, need_weights=False)) == ["0"]


def test_depth_limit() -> None:
    obj: object = torch.zeros(1)
    for _ in range(MAX_DEPTH):
        obj = [obj]
    assert paths(obj) == ["/".join(["0"] * MAX_DEPTH)]
    assert paths([obj]) == []  # one level deeper than followed


def test_tensors_are_yielded_not_copied() -> None:
    t = torch.zeros(3, requires_grad=True) * 1
    [(_, got)] = list(iter_tensors({"t": t}))
    assert got is t and got.grad_fn is not None


def test_dict_keys_with_a_slash_are_one_escaped_segment() -> None:
    """``{"a/b": x}`` and ``{"a": {"b": y}}`` would both be ``a/b`` unescaped."""
    x, y = torch.zeros(1), torch.ones(1)
    assert paths({"a/b": x, "a": {"b": y}, "50%": x}) == ["a%2Fb", "a/b", "50%25"]

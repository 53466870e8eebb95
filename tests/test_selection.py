"""lightning_inspect.core.selection: patterns, default selection, wrapper normalisation, errors."""

from __future__ import annotations

import difflib

import pytest
import torch
from torch import nn

from lightning_inspect.core.selection import (
    named_modules,
    normalise_name,
    select_modules,
    select_parameters,
)
from lightning_inspect.errors import ConfigError, SelectionError


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.ModuleList([nn.Sequential(nn.Linear(4, 4), nn.ReLU()) for _ in range(3)])
        self.norm = nn.LayerNorm(4)


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = Encoder()
        self.attn = nn.MultiheadAttention(4, num_heads=2)
        self.dropout = nn.Dropout(0.1)
        self.head = nn.Linear(4, 2)


LEAVES = [
    "encoder.layer.0.0",
    "encoder.layer.1.0",
    "encoder.layer.2.0",
    "encoder.norm",
    "attn",
    "attn.out_proj",
    "head",
]


def test_default_selection_is_modules_owning_parameters() -> None:
    sel = select_modules(Model())
    assert list(sel) == LEAVES  # registration order; MultiheadAttention owns in_proj_weight
    assert isinstance(sel["attn"], nn.MultiheadAttention)


def test_globs_cross_dots_and_match_whole_names() -> None:
    m = Model()
    assert list(select_modules(m, ["encoder.*"])) == [
        "encoder.layer",
        "encoder.layer.0",
        "encoder.layer.0.0",
        "encoder.layer.0.1",
        "encoder.layer.1",
        "encoder.layer.1.0",
        "encoder.layer.1.1",
        "encoder.layer.2",
        "encoder.layer.2.0",
        "encoder.layer.2.1",
        "encoder.norm",
    ]
    got = list(select_modules(m, ["*.1"]))
    assert set(got) == {
        "encoder.layer.1",
        "encoder.layer.0.1",
        "encoder.layer.1.1",
        "encoder.layer.2.1",
    }
    assert list(select_modules(m, ["head", "attn"])) == [
        "attn",
        "head",
    ]  # model order, not pattern order
    assert list(select_modules(m, ["encoder.layer.?.0"])) == LEAVES[:3]
    assert list(select_modules(m, ["encoder.layer.[02].0"])) == [
        "encoder.layer.0.0",
        "encoder.layer.2.0",
    ]


def test_regex_is_fullmatch() -> None:
    m = Model()
    assert list(select_modules(m, [r"re:encoder\.layer\.\d\.0"])) == LEAVES[:3]
    assert list(select_modules(m, ["re:attn|head"])) == ["attn", "head"]
    assert list(select_modules(m, ["re:encoder"])) == ["encoder"]  # not its children
    with pytest.raises(SelectionError):
        select_modules(m, ["re:encod"])


def test_exclude() -> None:
    m = Model()
    assert list(select_modules(m, exclude=["attn*", "re:.*norm"])) == [*LEAVES[:3], "head"]
    assert list(select_modules(m, ["encoder.*"], exclude=["*.1", "*layer", "*layer.?"])) == [
        "encoder.layer.0.0",
        "encoder.layer.1.0",
        "encoder.layer.2.0",
        "encoder.norm",
    ]
    # an exclude pattern that matches nothing is fine
    assert list(select_modules(m, exclude=["nothing.here"])) == LEAVES


def test_no_match_lists_close_names() -> None:
    with pytest.raises(SelectionError) as info:
        select_modules(Model(), ["encoder.lyr*"], owner="ActivationMonitor")
    msg = str(info.value)
    assert "ActivationMonitor" in msg and "'encoder.lyr*'" in msg
    assert "encoder.layer" in msg and "head" not in msg.split("Closest module names:")[1]
    assert isinstance(info.value, ConfigError) and isinstance(info.value, ValueError)


def test_no_match_without_wildcard_hints_at_globs() -> None:
    with pytest.raises(
        SelectionError, match=r"'hed'.*Closest module names: head\..*whole-name globs"
    ):
        select_modules(Model(), ["hed"])


def test_no_match_with_nothing_close_still_lists_the_closest_names() -> None:
    """``encoder.*`` on a model without an encoder: the most similar names by difflib's ratio."""
    names = list(named_modules(Model()))
    ratio = {n: difflib.SequenceMatcher(None, n, "blocks").ratio() for n in names}
    assert max(ratio.values()) < 0.5  # nothing is close
    with pytest.raises(SelectionError) as info:
        select_modules(Model(), ["blocks.*"])
    listed = str(info.value).split("Closest module names: ")[1].rstrip(".").split(", ")
    assert listed == sorted(names, key=lambda n: -ratio[n])[:5]


@pytest.mark.parametrize("bad", ["re:(", "re:[a-", "re:*x"])
def test_invalid_regex_is_config_error(bad: str) -> None:
    with pytest.raises(ConfigError, match="not a valid regular expression") as info:
        select_modules(Model(), [bad])
    assert bad in str(info.value)
    with pytest.raises(ConfigError):
        select_modules(Model(), exclude=[bad])


def test_public_select_modules_accepts_one_string() -> None:
    net = nn.Sequential(*[nn.Linear(2, 2) for _ in range(11)])
    assert list(select_modules(net, "10")) == ["10"]  # today: ['0', '1'] (patterns '1' and '0')
    assert list(select_modules(net, exclude="10")) == [str(i) for i in range(10)]


# ------------------------------------------------------------------------------------------
# Normalisation
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("model._orig_mod.encoder._checkpoint_wrapped_module.0", "model.encoder.0"),
        ("module.head.module", "module.head.module"),  # a user's own submodule named "module"
        ("_fsdp_wrapped_module.block._fsdp_wrapped_module.fc", "block.fc"),
        ("encoder.0", "encoder.0"),
        ("_orig_mod", ""),
    ],
)
def test_normalise_name(raw: str, expected: str) -> None:
    assert normalise_name(raw) == expected


def test_torch_compile_submodule_name_is_normalised() -> None:
    m = Model()
    inner = m.encoder
    m.encoder = torch.compile(inner)  # constructing is enough for the names
    assert any("_orig_mod" in n for n, _ in m.named_modules())
    sel = select_modules(m, ["encoder", "encoder.layer.0.0"])
    assert sel["encoder"] is inner  # the user's module, not the OptimizedModule wrapper
    assert sel["encoder.layer.0.0"] is inner.layer[0][0]
    assert list(select_modules(m)) == LEAVES


def test_leading_module_prefix_of_a_data_parallel_wrapper_is_removed() -> None:
    assert normalise_name("module.head.module", data_parallel_root=True) == "head.module"
    m = Model()
    wrapped = nn.DataParallel(m)  # on CPU it only wraps; the same name rule as DDP
    assert list(select_modules(wrapped)) == LEAVES
    assert select_modules(wrapped, ["head"])["head"] is m.head


def test_checkpoint_wrapper_is_normalised() -> None:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    m = Model()
    head = m.head
    m.head = checkpoint_wrapper(head)
    assert "head._checkpoint_wrapped_module" in dict(m.named_modules())
    sel = select_modules(m, ["head"])
    assert sel["head"] is head
    assert list(select_modules(m)) == LEAVES
    params = select_parameters(select_modules(m, ["head"]))
    assert list(params) == ["head.weight", "head.bias"]


def test_shared_module_appears_once() -> None:
    m = Model()
    m.alias = m.head  # registered under two names
    sel = select_modules(m)
    assert list(sel) == LEAVES
    assert list(select_modules(m, ["head"])) == ["head"]
    assert sum(1 for mod in sel.values() if mod is m.head) == 1


def test_shared_module_is_known_by_its_first_name_only() -> None:
    m = Model()
    m.alias = m.head
    with pytest.raises(SelectionError, match="'alias'"):
        select_modules(m, ["alias"])  # documented: it appears under its first name only


def test_user_submodule_named_module_is_selected() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.module = nn.Linear(2, 2)
            self.head = nn.Linear(2, 1)

    assert list(select_modules(Net())) == ["module", "head"]


def test_select_parameters_unique_and_normalised() -> None:
    m = Model()
    m.head2 = nn.Linear(4, 2)
    m.head2.weight = m.head.weight  # tied weight
    sel = select_modules(m, ["attn*", "head*"])
    params = select_parameters(sel)
    assert list(params) == [
        "attn.in_proj_weight",
        "attn.in_proj_bias",
        "attn.out_proj.weight",
        "attn.out_proj.bias",
        "head.weight",
        "head.bias",
        "head2.bias",
    ]
    assert params["head.weight"] is m.head.weight
    assert len({id(p) for p in params.values()}) == len(params)


def test_named_modules_excludes_root() -> None:
    names = named_modules(Model())
    assert "" not in names and next(iter(names)) == "encoder"


def test_select_parameters_by_parameter_patterns() -> None:
    sel = select_modules(Model(), ["attn*", "head"])
    assert list(select_parameters(sel, exclude_params=["*bias"])) == [
        "attn.in_proj_weight",
        "attn.out_proj.weight",
        "head.weight",
    ]
    assert list(select_parameters(sel, ["*.weight"], ["attn.*"])) == ["head.weight"]
    assert list(select_parameters(sel, ["re:attn\\.in_.*"])) == [
        "attn.in_proj_weight",
        "attn.in_proj_bias",
    ]


def test_parameter_pattern_matching_nothing_lists_close_parameter_names() -> None:
    sel = select_modules(Model(), ["head"])
    with pytest.raises(SelectionError) as info:
        select_parameters(sel, ["head.weigth"], owner="WeightMonitor")
    msg = str(info.value)
    assert msg.startswith("WeightMonitor: parameter pattern 'head.weigth' matches no parameter")
    assert "(2 parameters). Closest parameter names: head.weight" in msg
    with pytest.raises(
        ConfigError, match="parameter pattern 're:\\(' is not a valid regular expression"
    ):
        select_parameters(sel, exclude_params=["re:("])

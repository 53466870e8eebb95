"""The overview's data model and the self-contained page (no TensorBoard, no MLflow)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from overview_run import HOSTILE

from lightning_inspect.overview.model import RunData, safe_json, split_key
from lightning_inspect.overview.page import render_page


def _inlined(page: str) -> dict:
    match = re.search(
        r'<script type="application/json" id="inspect-data">(.*?)</script>', page, re.DOTALL
    )
    assert match is not None
    return json.loads(match.group(1))


def test_keys_map_to_kind_layer_and_statistic() -> None:
    assert split_key("activations/blocks.0/attn/1/std") == ("activations", "blocks.0/attn/1", "std")
    assert split_key("activation_grads/fc/l2_norm") == ("activation_grads", "fc", "l2_norm")
    assert split_key("weights/fc.weight/update_ratio") == (
        "update_ratios",
        "fc.weight",
        "update_ratio",
    )
    assert split_key("weights/fc.weight/mean") == ("weights", "fc.weight", "mean")
    for other in ("param_grads/global_norm", "loss", "model/structure", "train/acc/top1"):
        assert split_key(other) is None


def test_layers_keep_arrival_order_and_missing_values_are_none() -> None:
    run = RunData()
    run.add_scalars(0, {"activations/zeta/mean": 1.0, "activations/alpha/mean": 2.0})
    run.add_scalars(5, {"activations/alpha/mean": float("nan"), "activations/beta/mean": 3.0})
    assert list(run.kinds["activations"].layers) == ["zeta", "alpha", "beta"]
    assert run.steps("activations") == [0, 5]
    assert run.matrix("activations", "mean") == [[1.0, None], [2.0, None], [None, 3.0]]


def test_matrix_values_match_numpy() -> None:
    rng = np.random.default_rng(0)
    values = rng.lognormal(0, 4, size=(7, 11))  # spans decades
    run = RunData()
    for j in range(11):
        run.add_scalars(j * 3, {f"param_grads/l{i}.weight/l2_norm": values[i, j] for i in range(7)})
    np.testing.assert_allclose(np.array(run.matrix("param_grads", "l2_norm")), values, rtol=1e-5)


def test_histograms_and_findings() -> None:
    run = RunData()
    run.add_histogram("activations/fc", 2, -1.0, 1.0, [1, 2, 3])
    run.add_histogram("activations/fc", 0, -2.0, 2.0, [0, 5, 0])
    assert run.layer_histograms("activations", "fc") == {
        "steps": [0, 2],
        "lo": [-2.0, -1.0],
        "hi": [2.0, 1.0],
        "counts": [[0, 5, 0], [1, 2, 3]],
    }
    finding = {
        "rule": "dead_units",
        "severity": "error",
        "module": "fc",
        "statistic": "dead_fraction",
        "value": 1.0,
        "step": 2,
        "hint": "h",
        "threshold": 0.9,
    }
    run.add_findings([finding, finding])
    assert run.findings == [{k: v for k, v in finding.items() if k != "threshold"}]


def test_a_copy_is_not_changed_by_later_additions() -> None:
    run = RunData()
    run.add_scalars(0, {"activations/fc/mean": 1.0})
    run.add_histogram("activations/fc", 0, 0.0, 1.0, [1, 1])
    snapshot = run.copy()
    run.add_scalars(1, {"activations/fc/mean": 2.0, "activations/head/mean": 3.0})
    run.add_histogram("activations/fc", 1, 0.0, 1.0, [2, 0])
    run.add_findings([{"rule": "r", "module": "fc", "step": 1}])
    assert snapshot.to_json_dict() == {
        "kinds": {
            "activations": {
                "label": "activations",
                "layers": ["fc"],
                "stats": ["mean"],
                "steps": [0],
                "histograms": ["fc"],
                "values": {"mean": [[1.0]]},
                "hist": {"fc": {"steps": [0], "lo": [0.0], "hi": [1.0], "counts": [[1, 1]]}},
            }
        },
        "findings": [],
    }


def test_safe_json_cannot_end_a_script_element() -> None:
    text = safe_json({"m": HOSTILE + "&\u2028\u2029"})
    assert "<" not in text and ">" not in text and "&" not in text
    assert "\u2028" not in text and "\u2029" not in text
    assert json.loads(text) == {"m": HOSTILE + "&\u2028\u2029"}


def test_page_inlines_the_data_and_a_hostile_name_stays_data() -> None:
    run = RunData()
    run.add_scalars(0, {f"activations/{HOSTILE}/mean": 0.5, "activations/fc/mean": 0.25})
    run.add_histogram(f"activations/{HOSTILE}", 0, 0.0, 1.0, [3, 1])
    page = render_page({"my <run>": run})
    assert page.count("</script>") == 3  # the data, the script, the start call: nothing else
    assert "<img" not in page
    data = _inlined(page)
    assert list(data["runs"]) == ["my <run>"]
    kinds = data["runs"]["my <run>"]["kinds"]
    assert kinds["activations"]["layers"] == [HOSTILE, "fc"]
    assert kinds["activations"]["values"]["mean"] == [[0.5], [0.25]]
    assert kinds["activations"]["hist"][HOSTILE]["counts"] == [[3, 1]]
    assert "http://" not in page and "https://" not in page  # nothing fetched at view time


@pytest.mark.parametrize("bad", [0, -1, 1.5, "3"])
def test_overview_page_rejects_bad_every_n_logs(bad: object) -> None:
    from lightning_inspect import ConfigError, OverviewPage

    with pytest.raises(ConfigError, match=r"OverviewPage.*every_n_logs"):
        OverviewPage(every_n_logs=bad)  # type: ignore[arg-type]

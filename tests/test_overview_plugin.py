"""The "Inspect" TensorBoard plugin: its HTTP routes on a real TensorBoard server (127.0.0.1)
serving runs written by the monitors; values checked against TensorBoard's EventAccumulator."""

from __future__ import annotations

import importlib.util
import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import read_tb
from overview_run import ORDER, get, tensorboard, write_run

from lightning_inspect.overview.page import ASSETS, asset

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def logdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tb")
    write_run(root, "first", steps=6)
    write_run(root, "second", steps=4)
    return root


@pytest.fixture(scope="module")
def url(logdir: Path) -> Iterator[str]:
    with tensorboard(logdir) as url:
        yield url


def test_the_tab_is_listed_and_active(url: str) -> None:
    with urllib.request.urlopen(url + "data/plugins_listing", timeout=60) as r:
        listing = json.loads(r.read())
    assert listing["inspect"]["enabled"] is True
    assert listing["inspect"]["tab_name"] == "Inspect"
    assert listing["inspect"]["loading_mechanism"]["module_path"] == "/data/plugin/inspect/index.js"


def test_the_tab_is_inactive_without_lightning_inspect_data(tmp_path: Path) -> None:
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(tmp_path / "other")) as writer:
        writer.add_scalar("loss", 1.0, 0)
    with (
        tensorboard(tmp_path) as url,
        urllib.request.urlopen(url + "data/plugins_listing", timeout=60) as r,
    ):
        assert json.loads(r.read())["inspect"]["enabled"] is False


def test_static_files_are_served_by_the_plugin(url: str) -> None:
    for name in ASSETS:
        assert get(url, name) == asset(name)
    assert b"http://" not in asset("overview.js") and b"https://" not in asset("overview.js")


def test_runs_and_layers_in_model_order(url: str) -> None:
    assert get(url, "runs") == ["first", "second"]
    meta = get(url, "meta", run="first")
    assert list(meta["kinds"]) == [
        "activations",
        "activation_grads",
        "param_grads",
        "weights",
        "update_ratios",
        "health",
    ]
    acts = meta["kinds"]["activations"]
    assert acts["layers"] == ORDER  # execution order, not sorted
    assert acts["steps"] == list(range(6))
    assert meta["kinds"]["activation_grads"]["layers"] == ORDER[::-1]  # backward order
    assert meta["kinds"]["weights"]["layers"][:2] == ["zeta.weight", "zeta.bias"]
    assert meta["kinds"]["update_ratios"]["stats"] == ["update_ratio"]
    assert acts["histograms"] == ORDER


def test_matrix_equals_what_tensorboard_stored(url: str, logdir: Path) -> None:
    events = read_tb(logdir / "first")
    for kind, stat in [("activations", "mean"), ("param_grads", "l2_norm"), ("weights", "std")]:
        m = get(url, "matrix", run="first", kind=kind, stat=stat)
        assert len(m["values"]) == len(m["layers"]) and all(
            len(r) == len(m["steps"]) for r in m["values"]
        )
        for layer, row in zip(m["layers"], m["values"], strict=False):
            stored = dict(events.scalars(f"{kind}/{layer}/{stat}"))
            expected = np.array([stored[s] for s in m["steps"]])
            np.testing.assert_allclose(np.array(row, dtype=float), expected, rtol=1e-5)


def test_histograms_of_one_layer(url: str, logdir: Path) -> None:
    h = get(url, "histograms", run="first", kind="activations", layer="zeta")
    assert h["steps"] == list(range(6))
    stored = read_tb(logdir / "first").histograms("activations/zeta")
    for counts, event in zip(h["counts"], stored, strict=False):
        np.testing.assert_array_equal(counts, event.histogram_value.bucket)
    # every histogram holds all values of zeta's output: batch 8 x 8 features
    assert [sum(c) for c in h["counts"]] == [64.0] * 6
    assert all(lo < hi for lo, hi in zip(h["lo"], h["hi"], strict=False))
    hostile = get(url, "histograms", run="first", kind="activations", layer=ORDER[1])
    assert len(hostile["steps"]) == 6


def test_findings_recovered_from_the_log_dir(url: str) -> None:
    findings = get(url, "meta", run="first")["findings"]
    dead = [f for f in findings if f["module"] == "relu" and f["rule"] == "dead_units"]
    assert dead, findings
    assert set(dead[0]) == {"rule", "severity", "module", "statistic", "value", "step", "hint"}


def test_the_last_findings_text_holds_every_finding_of_the_fit(tmp_path: Path) -> None:
    """TensorBoard keeps only a sample of a text's steps (always the last): the last suffices."""
    from conftest import loader, make_trainer
    from lightning.pytorch.loggers import TensorBoardLogger
    from overview_run import OrderModel

    from lightning_inspect import HealthMonitor

    health = HealthMonitor(every_n_steps=1, console=False, pictures=False, warn_findings=False)
    logger = TensorBoardLogger(str(tmp_path), name="", version="h")
    make_trainer(8, logger=logger, callbacks=[health]).fit(OrderModel(), loader(n=64))
    texts = read_tb(tmp_path / "h").acc.Tensors("health/findings/text_summary")
    last = json.loads(texts[-1].tensor_proto.string_val[0])
    assert len(texts) >= 2  # new findings at more than one step
    assert {(f["rule"], f["module"]) for f in last} == {
        (f.rule, f.module) for f in health.report.findings()
    }


def test_unknown_run_or_statistic_is_a_clear_404(url: str) -> None:
    with pytest.raises(urllib.error.HTTPError) as err:
        get(url, "meta", run="nope")
    assert err.value.code == 404 and "nope" in json.loads(err.value.read())["error"]
    with pytest.raises(urllib.error.HTTPError) as err:
        get(url, "matrix", run="first", kind="activations", stat="median")
    assert err.value.code == 404


@pytest.mark.skipif(
    importlib.util.find_spec("tensorboard_data_server") is None,
    reason="tensorboard-data-server is not installed",
)
def test_model_order_with_the_rust_data_server(logdir: Path) -> None:
    """The Rust data server lists tags in hash order: the order comes from the event files."""
    with tensorboard(logdir, load_fast="true") as url:
        deadline = time.monotonic() + 120
        meta: dict[str, Any] = {}
        while time.monotonic() < deadline:  # it loads the log dir in the background
            if "first" in get(url, "runs"):
                meta = get(url, "meta", run="first")
                acts = meta["kinds"].get("activations", {})
                if len(acts.get("steps", [])) == 6 and len(acts.get("histograms", [])) == 3:
                    break
            time.sleep(0.5)
    assert meta["kinds"]["activations"]["layers"] == ORDER
    assert meta["kinds"]["activation_grads"]["layers"] == ORDER[::-1]
    assert meta["kinds"]["weights"]["layers"][:2] == ["zeta.weight", "zeta.bias"]
    assert meta["kinds"]["activations"]["histograms"] == ORDER

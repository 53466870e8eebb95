"""The overview page in a real headless Chromium: the TensorBoard tab and the MLflow HTML file.

Skipped where no ``chromium`` is on PATH (Debian: ``apt-get install -y chromium``) or
``websocket-client`` is missing. Screenshots are saved under the test's tmp dir, and also into
``$LIGHTNING_INSPECT_SCREENSHOTS`` when that is set (the README's pictures).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cdp import CHROMIUM
from overview_run import HOSTILE, ORDER, tensorboard, write_run

from lightning_inspect import OverviewPage
from lightning_inspect.core.keys import escape_name
from lightning_inspect.overview.callback import ARTIFACT

pytest.importorskip("websocket", reason="the browser tests need websocket-client")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH"),
]

#: Every iframe of the page, also inside shadow roots (TensorBoard hosts the tab in one).
FRAMES = """(() => { const out = [];
  const walk = (root) => { for (const e of root.querySelectorAll('*')) {
  if (e.tagName === 'IFRAME') out.push(e); if (e.shadowRoot) walk(e.shadowRoot); } };
  walk(document); return out; })()"""


def keep(shot: Path) -> None:
    target = os.environ.get("LIGHTNING_INSPECT_SCREENSHOTS")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(target) / shot.name)


@pytest.fixture()
def browser() -> Iterator[Any]:
    from cdp import Browser

    with Browser() as b:
        yield b


def heatmap_state(doc: str) -> str:
    return (
        f"(() => {{ const c = {doc}.querySelector('canvas.li-heatmap');"
        " return c && {rows: +c.dataset.rows, cols: +c.dataset.cols, cells: +c.dataset.cells,"
        " marked: +c.dataset.marked}; })()"
    )


def click_cell(browser: Any, doc: str, offset: str, i: int, j: int) -> None:
    """Click cell (layer i, step j) of the first heatmap; ``offset`` gives the frame's origin."""
    x, y = browser.evaluate(
        f"(() => {{ const c = {doc}.querySelector('canvas.li-heatmap'); c.scrollIntoView();"
        f" const r = c.getBoundingClientRect(); const o = {offset};"
        f" const [cx, cy] = c.cellCentre({i}, {j});"
        " return [o.left + r.left + cx, o.top + r.top + cy]; })()"
    )
    browser.click(x, y)


def histogram_state(doc: str) -> str:
    return (
        f"(() => {{ const c = {doc}.querySelector('canvas.li-histogram');"
        " const h = " + doc + ".querySelector('.li-detail h3');"
        " return c && {steps: +c.dataset.steps, bins: +c.dataset.bins, title: h.textContent,"
        f" curves: {doc}.querySelectorAll('canvas.li-curve').length}}; }})()"
    )


def test_tensorboard_tab_draws_heatmap_and_a_click_shows_histograms(
    tmp_path: Path, browser: Any
) -> None:
    write_run(tmp_path / "tb", "first", steps=6)
    write_run(tmp_path / "tb", "second", steps=6)
    with tensorboard(tmp_path / "tb") as url:
        browser.open(url + "#inspect")
        browser.wait_for(f"{FRAMES}.length", "the plugin's frame")
        doc, offset = f"{FRAMES}[0].contentDocument", f"{FRAMES}[0].getBoundingClientRect()"
        state = browser.wait_for(heatmap_state(doc), "the heatmap")
        assert state["rows"] == len(ORDER) and state["cols"] == 6 and state["cells"] == 18
        click_cell(browser, doc, offset, 0, 2)
        hist = browser.wait_for(histogram_state(doc), "the histogram")
        assert hist["steps"] == 6 and hist["bins"] == 64
        assert (
            hist["title"] == "layer zeta \u2014 step 2" and hist["curves"] >= 9
        )  # curves + profile
        browser.screenshot(tmp_path / "overview_tensorboard.png")
        # two runs as a difference: the same layers x steps, a diverging scale
        browser.evaluate(
            f"(() => {{ const s = [...{doc}.querySelectorAll('select')];"
            " const set = (i, v) => { s[i].value = v; s[i].dispatchEvent(new Event('change')); };"
            " set(3, 'second'); })()"
        )
        browser.wait_for(
            f"{doc}.querySelectorAll('canvas.li-heatmap').length === 2", "side by side"
        )
        browser.evaluate(
            f"(() => {{ const s = {doc}.querySelectorAll('select')[4]; s.value = 'diff';"
            " s.dispatchEvent(new Event('change')); })()"
        )
        browser.wait_for(f"{doc}.querySelectorAll('canvas.li-heatmap').length === 1", "difference")
        assert browser.evaluate(heatmap_state(doc))["rows"] == len(ORDER)
    assert browser.dialogs == []
    keep(tmp_path / "overview_tensorboard.png")


def test_mlflow_page_opens_offline_and_a_click_shows_histograms(
    tmp_path: Path, browser: Any, mlflow_logger: Any, mlflow_client: Any
) -> None:
    write_run(tmp_path / "tb", "run", steps=6, extra=[OverviewPage()], loggers=[mlflow_logger])
    page = Path(mlflow_client.download_artifacts(mlflow_logger.run_id, ARTIFACT, str(tmp_path)))
    browser.open(page.as_uri())
    state = browser.wait_for(heatmap_state("document"), "the heatmap")
    assert state["rows"] == len(ORDER) and state["cols"] == 6
    # the hostile module name is data: drawn on the canvas, never parsed as HTML
    assert browser.evaluate("document.querySelectorAll('img').length") == 0
    click_cell(browser, "document", "({left: 0, top: 0})", 1, 4)
    hist = browser.wait_for(histogram_state("document"), "the histogram")
    assert hist["steps"] == 6 and hist["title"] == f"layer {escape_name(HOSTILE)} \u2014 step 4"
    # the findings table lists the dead ReLU; a finding's cells are marked on the health view
    rows = browser.evaluate(
        "[...document.querySelectorAll('.li-findings td')].map(t => t.textContent)"
    )
    assert "dead_units" in rows and "relu" in rows
    browser.evaluate(
        "(() => { const s = document.querySelectorAll('select')[1]; s.value = 'health';"
        " s.dispatchEvent(new Event('change')); })()"
    )
    browser.wait_for(f"{heatmap_state('document')}.marked > 0", "marked findings")
    browser.screenshot(tmp_path / "overview_mlflow.png")
    assert browser.dialogs == []
    keep(tmp_path / "overview_mlflow.png")

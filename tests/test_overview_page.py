"""OverviewPage: the self-contained page in a real MLflow run (SQLite store), fed in-process."""

from __future__ import annotations

import json
import re
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from conftest import loader, make_trainer, read_tb
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import MLFlowLogger
from overview_run import ORDER, OrderModel, monitors, write_run

from lightning_inspect import OverviewPage
from lightning_inspect.overview.callback import ARTIFACT


def page_data(client: Any, run_id: str, out: Path) -> dict[str, Any]:
    """The data inlined in the run's overview page."""
    out.mkdir(parents=True, exist_ok=True)
    html = Path(client.download_artifacts(run_id, ARTIFACT, str(out))).read_text()
    match = re.search(
        r'<script type="application/json" id="inspect-data">(.*?)</script>', html, re.DOTALL
    )
    assert match is not None
    return json.loads(match.group(1))["runs"][run_id]


class ReadPageAt(Callback):
    """Reads the page back while fit runs, at the end of the batch that reaches ``step``."""

    def __init__(self, page: OverviewPage, client: Any, run_id: str, step: int, out: Path) -> None:
        self.page, self.client, self.run_id, self.step, self.out = page, client, run_id, step, out
        self.seen: dict[str, Any] | None = None

    def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
        if trainer.global_step == self.step:
            self.page.wait()  # the refresh is written on a worker thread
            self.seen = page_data(self.client, self.run_id, self.out)


def test_page_written_refreshed_and_equal_to_what_was_logged(
    tmp_path: Path, mlflow_logger: MLFlowLogger, mlflow_client: Any
) -> None:
    run_id = mlflow_logger.run_id
    write_run(
        tmp_path / "tb",
        "run",
        steps=6,
        extra=[OverviewPage(every_n_logs=2)],
        loggers=[mlflow_logger],
    )
    data = page_data(mlflow_client, run_id, tmp_path / "end")
    acts = data["kinds"]["activations"]
    assert acts["layers"] == ORDER and acts["steps"] == list(range(6))
    events = read_tb(tmp_path / "tb" / "run")
    for kind, stat in [
        ("activations", "mean"),
        ("param_grads", "l2_norm"),
        ("update_ratios", "update_ratio"),
    ]:
        info = data["kinds"][kind]
        tag_kind = "weights" if kind == "update_ratios" else kind
        for layer, row in zip(info["layers"], info["values"][stat], strict=False):
            stored = dict(events.scalars(f"{tag_kind}/{layer}/{stat}"))
            expected = [stored.get(s, np.nan) for s in info["steps"]]
            np.testing.assert_allclose(np.array(row, dtype=float), expected, rtol=1e-5)
    hist = acts["hist"]["zeta"]
    assert hist["steps"] == list(range(6)) and [sum(c) for c in hist["counts"]] == [64] * 6
    assert any(f["rule"] == "dead_units" and f["module"] == "relu" for f in data["findings"])


def test_page_is_refreshed_every_n_logged_steps(
    tmp_path: Path, mlflow_logger: MLFlowLogger, mlflow_client: Any
) -> None:
    run_id = mlflow_logger.run_id
    page = OverviewPage(every_n_logs=2)
    probe = ReadPageAt(page, mlflow_client, run_id, 5, tmp_path / "mid")
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        make_trainer(6, logger=mlflow_logger, callbacks=[page, *monitors(), probe]).fit(
            OrderModel(), loader(n=48)
        )
    # after batch 5 (steps 0..4 published) the last refresh was at the 4th completed step
    assert probe.seen is not None
    assert probe.seen["kinds"]["activations"]["steps"] == [0, 1, 2, 3]
    assert page_data(mlflow_client, run_id, tmp_path / "end")["kinds"]["activations"][
        "steps"
    ] == list(range(6))


def _weights(with_page: bool, tmp_path: Path, mlflow_store: dict[str, str]) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = OrderModel()
    logger = MLFlowLogger(experiment_name="overview_identity", **mlflow_store)
    extra = [OverviewPage(every_n_logs=1)] if with_page else []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        make_trainer(5, logger=logger, callbacks=[*extra, *monitors()]).fit(model, loader(n=48))
    return [p.detach().clone() for p in model.parameters()]


def test_the_page_never_changes_training(tmp_path: Path, mlflow_store: dict[str, str]) -> None:
    for a, b in zip(
        _weights(False, tmp_path, mlflow_store),
        _weights(True, tmp_path, mlflow_store),
        strict=False,
    ):
        assert torch.equal(a, b)


def test_without_mlflow_the_callback_does_nothing(tmp_path: Path) -> None:
    page = OverviewPage()
    write_run(tmp_path, "tb_only", steps=2, extra=[page])
    assert page.data.kinds == {}


def test_an_upload_failure_warns_once_and_training_goes_on(
    tmp_path: Path, mlflow_store: dict[str, str]
) -> None:
    blocker = tmp_path / "not_a_directory"
    blocker.write_text("artifacts cannot be stored under a file")
    logger = MLFlowLogger(
        experiment_name="overview_failure",
        tracking_uri=mlflow_store["tracking_uri"],
        artifact_location=str(blocker / "artifacts"),
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = make_trainer(
            6, logger=logger, callbacks=[OverviewPage(every_n_logs=1), *monitors()]
        )
        trainer.fit(OrderModel(), loader(n=48))
    assert trainer.global_step == 6
    ours = [w for w in caught if str(w.message).startswith("OverviewPage: writing")]
    assert len(ours) == 1, [str(w.message) for w in caught]
    assert ARTIFACT in str(ours[0].message)


class StuckUploads:
    """An MLflow client whose uploads hang (a tracking server in its retry back-off)."""

    def __init__(self) -> None:
        self.calls = 0

    def log_text(self, *args: Any) -> None:
        self.calls += 1
        time.sleep(3)


class EndOfFitClock(Callback):
    """Seconds from the end of training to this callback's teardown (after the page's)."""

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self.start = time.monotonic()

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self.seconds = time.monotonic() - self.start


def test_the_final_page_waits_only_until_the_end_of_fit_deadline(
    tmp_path: Path, mlflow_logger: MLFlowLogger, monkeypatch: Any
) -> None:
    from lightning_inspect.backends.base import EndOfFit
    from lightning_inspect.overview import callback

    stuck = StuckUploads()
    monkeypatch.setattr(callback, "bounded_client", lambda client: stuck)
    monkeypatch.setattr(EndOfFit, "for_fit", classmethod(lambda cls, trainer: EndOfFit(1.0)))
    page, clock = OverviewPage(every_n_logs=1), EndOfFitClock()
    trainer = make_trainer(4, logger=mlflow_logger, callbacks=[*monitors(), page, clock])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(OrderModel(), loader(n=32))
        start = time.monotonic()
        page.teardown(trainer, trainer.lightning_module, "fit")  # again: nothing left to do
    assert trainer.global_step == 4 and stuck.calls >= 1
    assert clock.seconds < 2.5, clock.seconds  # one upload alone hangs for 3 s
    # the refreshes hang for 3 s each: fit's end waited for the 1 s deadline, not for them
    ours = [str(w.message) for w in caught if str(w.message).startswith("OverviewPage:")]
    assert len(ours) == 1 and "deadline" in ours[0], ours
    assert time.monotonic() - start < 0.5
    assert page._worker is None


class PoisonAt(Callback):
    """Writes a NaN into ``zeta.weight`` before the batch of optimizer step ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(
        self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step == self.step:
            with torch.no_grad():
                pl_module.zeta.weight[0, 0] = float("nan")


def test_first_nonfinite_module_reaches_both_pages(
    tmp_path: Path, mlflow_logger: MLFlowLogger, mlflow_client: Any
) -> None:
    from overview_run import get, tensorboard

    write_run(
        tmp_path / "tb",
        "nan",
        steps=5,
        extra=[PoisonAt(3), OverviewPage()],
        loggers=[mlflow_logger],
    )
    inline = page_data(mlflow_client, mlflow_logger.run_id, tmp_path / "page")["findings"]
    with tensorboard(tmp_path / "tb") as url:
        served = get(url, "meta", run="nan")["findings"]
    for findings in (inline, served):
        first = [f for f in findings if f["rule"] == "nonfinite"]
        assert [(f["module"], f["step"], f["severity"]) for f in first] == [("zeta", 3, "error")]


def test_values_it_cannot_take_warn_once_and_never_raise() -> None:
    page = OverviewPage()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(3):
            page.observe(step, {"activations/fc/mean": 1.0}, {"activations/fc": object()}, ())
    assert [str(w.message)[:45] for w in caught] == [
        "OverviewPage: taking the values of step 0 fai"
    ]
    assert page.data.steps("activations") == [0, 1, 2]  # the scalars before the fault are kept

"""Inspection that would write nothing says so at fit start: an empty selection, ``backends=[]``."""

from __future__ import annotations

import warnings

import pytest
from conftest import PlainMLP, TinyMLP, loader, make_trainer, read_tb
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_inspect import ActivationMonitor, GraphMonitor, WeightMonitor


def _ours(log_dir: str) -> list[str]:
    tb = read_tb(log_dir)
    return [t for t in tb.scalar_tags() if t.startswith(("activations/", "weights/"))]


def test_exclude_that_removes_every_module_warns(tb_logger: TensorBoardLogger) -> None:
    monitor = ActivationMonitor(modules=["net.*"], exclude=["*"], every_n_steps=1)
    trainer = make_trainer(2, logger=tb_logger, callbacks=[monitor])
    with pytest.warns(RuntimeWarning) as caught:
        trainer.fit(PlainMLP(), loader())
    [message] = [str(w.message) for w in caught if "nothing to inspect" in str(w.message)]
    assert "ActivationMonitor: nothing to inspect: exclude=['*'] removes all 3 modules" in message
    assert "of modules=['net.*'] (net.0, net.1, net.2)" in message and "enabled=False" in message
    assert trainer.global_step == 2  # training went on
    assert _ours(tb_logger.log_dir) == []


def test_default_selection_emptied_by_exclude(tb_logger: TensorBoardLogger) -> None:
    trainer = make_trainer(1, logger=tb_logger, callbacks=[WeightMonitor(exclude="net.*")])
    match = r"removes all 4 modules of the default selection \(net\.0, net\.1, net\.4, net\.5\)"
    with pytest.warns(RuntimeWarning, match=match):
        trainer.fit(TinyMLP(), loader())


def test_a_selection_that_is_not_empty_does_not_warn(tb_logger: TensorBoardLogger) -> None:
    monitor = ActivationMonitor(exclude="net.0", every_n_steps=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        make_trainer(1, logger=tb_logger, callbacks=[monitor]).fit(PlainMLP(), loader())
    assert read_tb(tb_logger.log_dir).steps("activations/net.2/mean") == [0]


@pytest.mark.parametrize(
    "make",
    [lambda: ActivationMonitor(backends=[], every_n_steps=1), lambda: GraphMonitor(backends=[])],
)
def test_empty_backends_warn_that_nothing_is_written(make, tb_logger: TensorBoardLogger) -> None:
    trainer = make_trainer(2, logger=tb_logger, callbacks=[make()])
    match = r"\(backends=\[\]\): no backend is selected, so this callback writes nothing"
    with pytest.warns(RuntimeWarning, match=match):
        trainer.fit(PlainMLP(), loader())
    # The TensorBoard logger is attached (Lightning writes its own events), but nothing of ours.
    assert _ours(tb_logger.log_dir) == [] and not read_tb(tb_logger.log_dir).tags["graph"]

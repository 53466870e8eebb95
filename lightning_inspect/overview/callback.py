"""The overview page in MLflow, fed in-process with what the monitors publish."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from lightning_inspect._validation import check_bool, check_positive_int
from lightning_inspect.backends import attached_loggers
from lightning_inspect.backends.base import EndOfFit
from lightning_inspect.backends.mlflow import bounded_client
from lightning_inspect.core.recorder import StepCoordinator
from lightning_inspect.overview.model import RunData
from lightning_inspect.overview.page import render_page

ARTIFACT = "lightning_inspect/overview.html"


class OverviewPage(Callback):
    """Write the overview page (heatmaps, histograms, findings) to MLflow as one HTML artifact,
    every ``every_n_logs`` logged steps and at the end of fit (on a worker thread; the last within
    the end-of-fit deadline). Without an ``MLFlowLogger`` it does nothing.

    Example::

        trainer = L.Trainer(logger=MLFlowLogger(...),
                            callbacks=[ActivationMonitor(), GradientMonitor(), OverviewPage()])
    """

    def __init__(self, every_n_logs: int = 10, enabled: bool = True) -> None:
        owner = type(self).__name__
        self.every_n_logs = check_positive_int(owner, "every_n_logs", every_n_logs)
        self.enabled = check_bool(owner, "enabled", enabled)
        self.data, self._logger, self._client = RunData(), None, None
        self._deadline: EndOfFit | None = None
        self._coordinator: StepCoordinator | None = None
        self._worker: ThreadPoolExecutor | None = None
        self._pending: Future[None] | None = None
        self._last_step: int | None = None
        self._complete_steps, self._warned = 0, False

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or not self.enabled or not trainer.is_global_zero:
            return
        self._logger = attached_loggers(trainer).get("mlflow")
        if self._logger is None:
            return
        self._client = bounded_client(self._logger.experiment)
        self._deadline, self.data = EndOfFit.for_fit(trainer), RunData()
        self._last_step, self._complete_steps, self._warned = None, 0, False
        self._coordinator = StepCoordinator.for_trainer(trainer)
        self._coordinator.observers.append(self.observe)
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="lightning-inspect-overview")

    def observe(self, step: int, scalars: Mapping, histograms: Mapping, findings: Sequence) -> None:
        """Take one step's values from a monitor (a ``StepCoordinator`` observer)."""
        try:
            if self._last_step is not None and step > self._last_step:
                self._complete_steps += 1  # a later step began: the previous one is complete
                if self._complete_steps % self.every_n_logs == 0 and self._worker is not None:
                    if self._pending is not None:
                        self._pending.cancel()  # a write not yet started is replaced
                    self._pending = self._worker.submit(self.write, self.data.copy())
            self._last_step = step if self._last_step is None else max(step, self._last_step)
            self.data.add_scalars(step, scalars)
            for key, h in histograms.items():
                self.data.add_histogram(key, step, h.edges[0], h.edges[-1], h.counts)
            self.data.add_findings(findings)
        except Exception as exc:  # the page must never stop training
            self._warn(f"taking the values of step {step}", exc)

    def wait(self, timeout: float | None = None) -> bool:
        """Whether the page being written in the background was uploaded within ``timeout``."""
        try:
            if self._pending is not None:
                self._pending.result(timeout)
        except FutureTimeout:
            return False
        return True

    def write(self, data: RunData | None = None) -> None:
        """Upload the page of ``data`` (default: all so far) now; a failure warns once."""
        logger, client = self._logger, self._client  # teardown may clear them meanwhile
        if logger is None:
            return
        run = logger.run_id
        try:
            page = render_page({run: data or self.data}, f"lightning-inspect {run}")
            client.log_text(run, page, ARTIFACT)
        except Exception as exc:  # the page must never stop training
            self._warn(f"writing {ARTIFACT}", exc)

    def _warn(self, what: str, exc: Exception) -> None:
        if not self._warned:
            self._warned = True
            msg = f"OverviewPage: {what} failed ({type(exc).__name__}: {exc}); training continues"
            warnings.warn(f"{msg}; the page is rewritten at the next refresh.", RuntimeWarning, 3)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # after every callback's on_train_end: the monitors have published their last step
        if self._coordinator is None:
            return
        self._coordinator.flush()
        self._coordinator.observers.remove(self.observe)
        self._coordinator = None
        deadline = self._deadline or EndOfFit()
        if self.wait(deadline.remaining()) and deadline.remaining() > 0:
            deadline.run(self.write)  # the final page, within what is left of the deadline
        else:
            self._warn("the final page (the end-of-fit deadline passed)", TimeoutError())
        self._worker.shutdown(wait=False, cancel_futures=True)  # made with the coordinator
        self._logger = self._client = self._deadline = self._worker = None

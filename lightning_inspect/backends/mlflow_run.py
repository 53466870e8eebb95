"""One MLflow writer per fit and run: the callbacks of a fit share one worker and one metrics call.

Every callback that writes to a Trainer's ``MLFlowLogger`` gets a :class:`MlflowRunSink` of the
fit's :class:`MlflowRun`. The values a step publishes are gathered on the training thread; when the
Trainer's :class:`~lightning_inspect.core.recorder.StepCoordinator` has published every monitor of the
step, the run hands them to its one background worker as one call (:meth:`MlflowRunWriter.
log_step`): one ``log_batch`` for the headline metrics of all monitors, then each monitor's table
and histogram spool (``lightning_inspect/stats/<monitor>.csv``, as :class:`~lightning_inspect.
sinks.mlflow.MlflowSink` writes them). The worker stops when the last callback closes its sink,
by the fit's shared end-of-fit deadline. Against a tracking server every call has a bounded retry
budget (:mod:`lightning_inspect.backends.mlflow_http`).
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from lightning_inspect.backends.background import BackgroundSink
from lightning_inspect.backends.deadline import EndOfFit
from lightning_inspect.backends.mlflow import (
    MlflowSink,
    log_image_artifact,
    log_text_artifact,
    send_metrics,
)
from lightning_inspect.backends.mlflow_http import bounded_client
from lightning_inspect.core.keys import MlflowKeys
from lightning_inspect.core.recorder import StepCoordinator
from lightning_inspect.core.stats import Histogram

#: One step of several callbacks: ``{owner: {key: value}}`` and ``{owner: {key: histogram}}``.
Scalars = dict[str, dict[str, float]]
Histograms = dict[str, dict[str, Histogram]]


class MlflowRunWriter:
    """The worker's side: writes steps of all the fit's callbacks to one MLflow run."""

    name = "mlflow"

    def __init__(self, client: Any, run_id: str) -> None:
        self.client = client
        self.run_id = run_id
        self.keys = MlflowKeys()
        self.parts: dict[str, MlflowSink] = {}  # owner -> its table and histogram spool

    def part(self, owner: str, metrics: str) -> MlflowSink:
        """The table and spool of ``owner`` (one callback class); every value as a metric if
        any of its callbacks asks for ``metrics="all"``."""
        part = self.parts.get(owner)
        if part is None:
            part = MlflowSink(
                self.client, self.run_id, owner=owner, metrics=metrics, keys=self.keys
            )
            self.parts = {**self.parts, owner: part}  # the worker may be reading the old dict
        elif metrics == "all":
            part.metrics = "all"
        return part

    def log_step(self, step: int, scalars: Scalars, histograms: Histograms) -> None:
        """One ``log_batch`` (per 1000 metrics) for all callbacks, then their tables and spools."""
        sent: dict[str, float] = {}
        for owner, values in scalars.items():
            sent.update(self.parts[owner].metrics_of(values))
        send_metrics(self.client, self.run_id, self.keys, sent, step)
        for owner, values in scalars.items():
            self.parts[owner].append_table(values, step)
        for owner, hists in histograms.items():
            self.parts[owner].log_histograms(hists, step)

    def log_scalars(self, values: Mapping[str, float], step: int) -> None:
        """Scalars as metrics (the ``Sink`` protocol; callbacks' steps come in :meth:`log_step`)."""
        send_metrics(self.client, self.run_id, self.keys, values, step)

    def log_histograms(self, histograms: Mapping[str, Histogram], step: int) -> None:
        """Histograms arrive with their step (:meth:`log_step`)."""

    def log_text(self, key: str, text: str, step: int) -> None:
        log_text_artifact(self.client, self.run_id, self.keys, key, text)

    def log_image(self, key: str, image: np.ndarray, step: int) -> None:
        log_image_artifact(self.client, self.run_id, self.keys, key, image)

    def flush(self) -> None:
        """Upload every callback's table and histograms (those already uploaded are skipped)."""
        for part in self.parts.values():
            part.flush()

    def unsent(self) -> list[dict[str, Any]]:
        """The table values and histograms of every callback never uploaded (``MlflowSink.unsent``)."""
        return [record for part in self.parts.values() for record in part.unsent()]

    def close(self) -> None:
        for part in self.parts.values():
            part.close()


class MlflowRun:
    """The training thread's side: gathers each step's values and feeds the one worker."""

    _instances: ClassVar[weakref.WeakKeyDictionary[Any, dict[str, MlflowRun]]] = (
        weakref.WeakKeyDictionary()
    )

    def __init__(self, client: Any, run_id: str, deadline: EndOfFit | None = None) -> None:
        self.writer = MlflowRunWriter(bounded_client(client), run_id)
        self.background = BackgroundSink(self.writer, deadline=deadline)
        self._pending: dict[int, tuple[Scalars, Histograms]] = {}
        self._open = 0
        self._coordinator: StepCoordinator | None = None
        self.closed = False

    @classmethod
    def for_fit(cls, trainer: Any, logger: Any) -> MlflowRun:
        """The writer of ``logger``'s run in ``trainer``'s current fit (created on first use)."""
        runs = cls._instances.setdefault(trainer, {})
        run_id = str(logger.run_id)
        run = runs.get(run_id)
        if run is None or run.closed:
            run = runs[run_id] = cls(logger.experiment, run_id, EndOfFit.for_fit(trainer))
            run._coordinator = StepCoordinator.for_trainer(trainer)
            run._coordinator.flushed.append(run.send)
        return run

    def sink(self, owner: str, metrics: str = "summary") -> MlflowRunSink:
        """A callback's sink; the worker stops once every sink handed out is closed."""
        self.writer.part(owner, metrics)
        self._open += 1
        return MlflowRunSink(self, owner)

    def add(
        self,
        owner: str,
        step: int,
        values: Mapping[str, float] | None = None,
        histograms: Mapping[str, Histogram] | None = None,
    ) -> None:
        """Gather a callback's values of ``step`` until :meth:`send`."""
        scalars, hists = self._pending.setdefault(step, ({}, {}))
        if values:
            scalars.setdefault(owner, {}).update(values)
        if histograms:
            hists.setdefault(owner, {}).update(histograms)

    def send(self) -> None:
        """Queue every gathered step, oldest first, as one call each (returns at once)."""
        pending, self._pending = self._pending, {}
        for step in sorted(pending):
            scalars, hists = pending[step]
            if scalars or hists:
                self.background.log_step(step, scalars, hists)

    def flush(self) -> None:
        """Queue what is gathered and the upload of the tables and histograms."""
        self.send()
        self.background.flush()

    def release(self) -> None:
        """One sink closed; the last one sends what is left and stops the worker by the deadline."""
        self._open -= 1
        if self._open > 0 or self.closed:
            return
        self.closed = True
        self.send()
        if self._coordinator is not None and self.send in self._coordinator.flushed:
            self._coordinator.flushed.remove(self.send)
        self.background.close()


class MlflowRunSink:
    """One callback's sink to the fit's MLflow run (see the module docstring)."""

    name = "mlflow"

    def __init__(self, run: MlflowRun, owner: str) -> None:
        self.run = run
        self.owner = owner
        self._closed = False

    def log_scalars(self, values: Mapping[str, float], step: int) -> None:
        self.run.add(self.owner, step, values=values)

    def log_histograms(self, histograms: Mapping[str, Histogram], step: int) -> None:
        self.run.add(self.owner, step, histograms=histograms)

    def log_text(self, key: str, text: str, step: int) -> None:
        self.run.background.log_text(key, text, step)

    def log_image(self, key: str, image: np.ndarray, step: int) -> None:
        self.run.background.log_image(key, image, step)

    def flush(self) -> None:
        self.run.flush()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.run.release()

"""Backends: every Lightning logger attached to the Trainer, behind one protocol (:class:`Sink`)."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

from lightning.pytorch import loggers
from lightning.pytorch.utilities import rank_zero_info

from lightning_inspect._validation import closest, suggestion
from lightning_inspect.backends.base import BackgroundSink, EndOfFit, GenericSink, GuardedSink, Sink
from lightning_inspect.backends.base import MemorySink as MemorySink
from lightning_inspect.backends.mlflow import METRIC_MODES, MlflowRun, MlflowRunSink, MlflowSink  # noqa: F401
from lightning_inspect.backends.tensorboard import TensorBoardSink
from lightning_inspect.backends.wandb import WandbSink
from lightning_inspect.errors import BackendError, ConfigError

#: Lightning's logger class of each known backend name, and the sink that writes to it; any
#: other logger's name is its class name, lower-case, without "Logger" (``CometLogger``: "comet").
LOGGERS: dict[str, tuple[str, Any]] = {
    "tensorboard": ("TensorBoardLogger", lambda lg: TensorBoardSink(lg.experiment)),
    "mlflow": ("MLFlowLogger", lambda lg: MlflowSink(lg.experiment, str(lg.run_id), owner=None)),
    "wandb": ("WandbLogger", WandbSink),
    "csv": ("CSVLogger", None),
}
BACKENDS = tuple(LOGGERS)


def close_sinks(sinks: Sequence[Any]) -> None:
    """Close ``sinks`` (background workers stop after what they queued, by the fit's deadline)."""
    for sink in (s for s in sinks if hasattr(s, "close")):
        sink.close()


def check_backends(owner: str, backends: Any) -> tuple[str | Sink, ...] | None:
    """Validate a ``backends`` argument: None, a name, or a list of names and Sink objects (a
    name close to one of :data:`BACKENDS` is a typo; others are checked at fit start)."""
    if backends is None:
        return None
    items = [backends] if isinstance(backends, (str, Sink)) else list(backends)
    for item in items:
        near = isinstance(item, str) and (not item or closest(item, BACKENDS, n=1, cutoff=0.8))
        if near and item not in BACKENDS:
            message = f"{owner}(backends={backends!r}): unknown backend {item!r}; expected one of "
            message += f"{', '.join(map(repr, BACKENDS))} or another attached logger's name (its "
            message += "class name, lower-case, without 'Logger': 'comet' for CometLogger)."
            raise ConfigError(message + suggestion(item, BACKENDS))
        if not isinstance(item, (str, Sink)):
            message = f"{owner}(backends={backends!r}): expected backend names {list(BACKENDS)} "
            raise ConfigError(message + f"or Sink objects, got {item!r}.")
    return tuple(dict.fromkeys(items))  # a backend named twice is written once


def logger_backend(logger: Any) -> str:
    """The backend name of a Lightning logger (:data:`LOGGERS`).

    >>> from lightning.pytorch.loggers import CSVLogger
    >>> logger_backend(CSVLogger("logs"))
    'csv'
    """
    for name, (cls, _) in LOGGERS.items():
        if isinstance(logger, getattr(loggers, cls)):
            return name
    lowered = type(logger).__name__.lower()
    return lowered.removesuffix("logger") or lowered


def attached_loggers(trainer: Any) -> dict[str, Any]:
    """The Trainer's first ``TensorBoardLogger`` and ``MLFlowLogger``, by backend name."""
    found = {logger_backend(lg): lg for lg in reversed(trainer.loggers)}  # the first one wins
    return {k: found[k] for k in ("tensorboard", "mlflow") if k in found}


def select_loggers(trainer: Any, backends: Sequence[str | Sink] | None, owner: str) -> list[Any]:
    """``(name, logger)`` of every attached logger (``backends=None``) or of those named; Sink
    objects as they are."""
    attached = [(logger_backend(lg), lg) for lg in trainer.loggers]
    targets: list[Any] = []
    for item in attached if backends is None else backends:
        if not isinstance(item, str):
            targets.append(item)
        elif named := [(name, lg) for name, lg in attached if name == item]:
            targets.extend(named)
        else:
            has = ", ".join(f"{type(lg).__name__} ({n!r})" for n, lg in attached)
            wanted = LOGGERS[item][0] if item in LOGGERS else f"logger named {item!r}"
            message = f"{owner}(backends={list(backends or ())!r}): backend {item!r} needs a "
            message += f"{wanted} in Trainer(logger=...), but the Trainer has: {has or 'no logger'}"
            raise BackendError(f"{message}.{suggestion(item, [n for n, _ in attached])}")
    return targets


def logger_sink(name: str, logger: Any) -> Sink:
    """The sink that writes straight to ``logger`` (backend ``name``), on the calling thread."""
    make = LOGGERS.get(name, ("", None))[1]
    return make(logger) if make else GenericSink(logger, name)


def resolve_sinks(
    trainer: Any, backends: Sequence[str | Sink] | None, owner: str, mlflow_metrics: str = "summary"
) -> list[Sink]:
    """The guarded sinks a monitor writes to, on global rank 0 (:func:`select_loggers`); MLflow's
    is the fit's shared background writer of the run (``mlflow_metrics``: :data:`METRIC_MODES`)."""
    if not trainer.is_global_zero:
        return []
    if backends is not None and not backends:
        message = f"{owner}(backends=[]): no backend is selected, so this callback writes nothing "
        message += "to the Trainer's loggers in this fit. Leave backends=None (the default) to "
        message += "write to every logger attached, or pass enabled=False to switch it off."
        warnings.warn(message, RuntimeWarning, stacklevel=3)
    if backends is None and not trainer.loggers:
        message = f"{owner}: the Trainer has no logger, so nothing of this callback reaches a "
        message += "logger in this fit. Attach one, e.g. Trainer(logger=TensorBoardLogger('logs')) "
        message += "or CSVLogger, WandbLogger, MLFlowLogger (in the Lightning+Hydra template: "
        message += "logger=tensorboard, logger=csv, ...), or pass Sink objects in backends=[...]."
        warnings.warn(message, RuntimeWarning, stacklevel=3)
    chosen: list[Any] = []
    for target in select_loggers(trainer, backends, owner):
        if isinstance(target, MlflowSink):
            chosen.append(BackgroundSink(target, deadline=EndOfFit.for_fit(trainer)))
        elif not isinstance(target, tuple):
            chosen.append(GuardedSink(target))
        elif target[0] == "mlflow":
            chosen.append(MlflowRun.for_fit(trainer, target[1]).sink(owner, mlflow_metrics))
        else:
            chosen.append(GuardedSink(logger_sink(*target)))
    generic = [s.inner for s in chosen if type(getattr(s, "inner", None)) is GenericSink]
    rest = ", ".join(s.name for s in chosen if getattr(s, "inner", None) not in generic)
    rest = rest or "no backend (attach a TensorBoard, MLflow or W&B logger for them)"
    for sink in generic:
        message = f"{owner}: {type(sink.logger).__name__} receives scalars only; histograms, "
        rank_zero_info(message + f"texts and pictures go to {rest}.")
    return chosen

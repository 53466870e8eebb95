"""Backends: TensorBoard, MLflow and an in-memory sink, behind one small protocol.

:func:`resolve_sinks` finds the backends a monitor writes to from the Trainer's own loggers.

Example:
    >>> import lightning as L
    >>> resolve_sinks(L.Trainer(logger=False), None, owner="ActivationMonitor")
    []
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lightning_inspect._checks import suggestion
from lightning_inspect.errors import BackendError, ConfigError
from lightning_inspect.sinks.background import BackgroundSink
from lightning_inspect.sinks.base import GuardedSink, Sink
from lightning_inspect.sinks.memory import MemorySink
from lightning_inspect.sinks.mlflow import METRIC_MODES, MlflowSink
from lightning_inspect.sinks.tensorboard import TensorBoardSink

BACKENDS = ("tensorboard", "mlflow")

__all__ = ["BACKENDS", "METRIC_MODES", "BackgroundSink", "GuardedSink", "MemorySink", "MlflowSink", "Sink", "TensorBoardSink", "attached_loggers", "check_backends", "close_sinks",
           "missing_backend_error", "resolve_sinks"]


def close_sinks(sinks: Sequence[Any]) -> None:
    """Stop the background workers of ``sinks`` (after what they queued)."""
    for sink in sinks:
        close = getattr(sink, "close", None)  # background workers, local spools
        if close is not None:
            close()


def check_backends(owner: str, backends: Any) -> tuple[str | Sink, ...] | None:
    """Validate a ``backends`` argument: None, a name, or a list of names and Sink objects."""
    if backends is None:
        return None
    items = [backends] if isinstance(backends, (str, Sink)) else list(backends)
    for item in items:
        if isinstance(item, str):
            if item not in BACKENDS:
                raise ConfigError(
                    f"{owner}(backends={backends!r}): unknown backend {item!r}; expected one of "
                    f"{', '.join(map(repr, BACKENDS))}.{suggestion(item, BACKENDS)}"
                )
        elif not isinstance(item, Sink):
            raise ConfigError(
                f"{owner}(backends={backends!r}): expected backend names {list(BACKENDS)} or Sink objects, got {item!r}."
            )
    return tuple(dict.fromkeys(items))  # a backend named twice is written once


def attached_loggers(trainer: Any) -> dict[str, Any]:
    """The Trainer's first ``TensorBoardLogger`` and ``MLFlowLogger``, by backend name."""
    from lightning.pytorch.loggers import MLFlowLogger, TensorBoardLogger

    found: dict[str, Any] = {}
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            found.setdefault("tensorboard", logger)
        elif isinstance(logger, MLFlowLogger):
            found.setdefault("mlflow", logger)
    return found


def missing_backend_error(owner: str, backends: Sequence[Any], name: str, trainer: Any) -> BackendError:
    """The error for a requested backend whose logger is not attached to the Trainer."""
    attached = [type(lg).__name__ for lg in trainer.loggers] or ["no logger"]
    wanted = {"tensorboard": "TensorBoardLogger", "mlflow": "MLFlowLogger"}[name]
    return BackendError(
        f"{owner}(backends={list(backends)!r}): backend {name!r} needs a {wanted} in "
        f"Trainer(logger=...), but the Trainer has: {', '.join(attached)}."
    )


def available_sinks(trainer: Any, owner: str, mlflow_metrics: str = "summary") -> dict[str, Sink]:
    """One sink per supported logger attached to the Trainer, by backend name (first wins)."""
    found: dict[str, Sink] = {}
    for name, logger in attached_loggers(trainer).items():
        if name == "tensorboard":
            found[name] = TensorBoardSink(logger.experiment)
        else:
            found[name] = MlflowSink(
                logger.experiment, logger.run_id, owner=owner, metrics=mlflow_metrics
            )
    return found


def resolve_sinks(
    trainer: Any, backends: Sequence[str | Sink] | None, owner: str, mlflow_metrics: str = "summary"
) -> list[Sink]:
    """The guarded sinks a monitor writes to (MLflow's on a background thread).

    ``None`` means every supported logger attached to the Trainer. A requested backend name with
    no matching logger raises :class:`~lightning_inspect.errors.BackendError`. Sink objects are
    used as given. ``mlflow_metrics`` is the MLflow sink's ``metrics`` mode
    (:data:`~lightning_inspect.sinks.mlflow.METRIC_MODES`).
    """
    if not trainer.is_global_zero:
        return []
    found = available_sinks(trainer, owner, mlflow_metrics)
    if backends is None:
        chosen: list[Sink] = list(found.values())
    else:
        chosen = []
        for item in backends:
            if isinstance(item, str):
                if item not in found:
                    raise missing_backend_error(owner, backends, item, trainer)
                chosen.append(found[item])
            else:
                chosen.append(item)
    return [BackgroundSink(s) if isinstance(s, MlflowSink) else GuardedSink(s) for s in chosen]

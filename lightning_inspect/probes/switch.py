"""ProbeSwitch: switch probe tags on for the duration of ``Trainer.fit``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lightning_inspect.errors import ConfigError
from lightning_inspect.probes.context import (
    ON_ERROR,
    RANKS,
    _check_choice,
    _check_patterns,
    _hydra_output_dir,
    _Switch,
)

__all__ = ["ProbeSwitch"]


class ProbeSwitch(Callback):
    """Switch probe tags on during fit and give probes the trainer's step, epoch and loggers.

    Probes run while ``trainer.global_step % every_n_steps == 0``, from ``setup`` to
    ``teardown``, outside validation (set ``validation=True`` to run them in every validation
    batch as well; the sanity check never runs them). Tags already on through
    ``LIGHTNING_INSPECT`` or an enclosing ``probing()`` block follow the same schedule and get the
    same context; ``tags=[]`` only provides the context.

    Args:
        tags: tag patterns to switch on (names, globs such as ``"encoder.*"``, ``"*"`` for all);
            a string is split on commas.
        every_n_steps: run probes on optimizer steps divisible by this (>= 1).
        ranks: ``"zero"`` (global rank 0 only) or ``"all"`` (every rank; file names carry the
            rank).
        on_error: ``"disable"`` (warn once, switch the failing probe off for the rest of the
            fit) or ``"raise"``.
        output_dir: directory for probe files; default ``<hydra run dir>/probes`` inside a Hydra
            app, else ``<trainer.log_dir>/probes``.
        validation: also run probes in validation batches.

    At the end of fit, rank 0 prints one line per switched-on tag pattern: how many probe calls
    ran there, per probe, and where their ``ctx`` output went (the TensorBoard log dir and tags,
    the MLflow run and artifact path, the files directory). A pattern that matches no probe
    decorated in the process gives a ``RuntimeWarning`` listing the known probe tags instead, and
    so does a pattern whose probes exist but never ran.

    Logged metrics:
        None by itself; probes log through their ``ctx`` (``probes/<probe>/<name>`` tags in
        TensorBoard, ``probes/`` artifacts in MLflow).

    Example:
        >>> import lightning as L
        >>> trainer = L.Trainer(callbacks=[ProbeSwitch(tags=["attention"], every_n_steps=50)])
    """

    def __init__(
        self,
        tags: list[str] | tuple[str, ...] | str | None = (),
        every_n_steps: int = 1,
        ranks: str = "zero",
        on_error: str = "disable",
        output_dir: str | os.PathLike[str] | None = None,
        validation: bool = False,
    ) -> None:
        call = (
            f"ProbeSwitch(tags={tags!r}, every_n_steps={every_n_steps!r}, ranks={ranks!r}, "
            f"on_error={on_error!r}, output_dir={output_dir!r}, validation={validation!r})"
        )
        self.tags = _check_patterns(call, "tags", tags)
        if type(every_n_steps) is not int or every_n_steps < 1:
            raise ConfigError(f"{call}: every_n_steps must be an int >= 1; got {every_n_steps!r}.")
        self.every_n_steps = every_n_steps
        self.ranks = _check_choice(call, "ranks", ranks, RANKS)
        self.on_error = _check_choice(call, "on_error", on_error, ON_ERROR)
        if output_dir is not None and not isinstance(output_dir, (str, os.PathLike)):
            raise ConfigError(
                f"{call}: output_dir must be None, a str or a path; got {output_dir!r}."
            )
        self.output_dir = output_dir
        if not isinstance(validation, bool):
            raise ConfigError(f"{call}: validation must be True or False; got {validation!r}.")
        self.validation = validation
        self._switch: _Switch | None = None

    # -- hooks: thin, all hand off to _open / _gate / _close -------------------------------------

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            self._open(trainer)

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._gate(self._due(trainer))

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._gate(self._due(trainer))

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._gate(self.validation and not trainer.sanity_checking)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._gate(self._due(trainer))

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            self._close()

    def on_exception(
        self, trainer: Trainer, pl_module: LightningModule, exception: BaseException
    ) -> None:
        self._close()

    # -- worker ---------------------------------------------------------------------------------

    def _due(self, trainer: Trainer) -> bool:
        return trainer.global_step % self.every_n_steps == 0

    def _output_dir(self, trainer: Trainer) -> Path:
        """Resolved on every rank in setup: ``trainer.log_dir`` is a collective call under DDP."""
        if self.output_dir is not None:
            return Path(self.output_dir)
        hydra_dir = _hydra_output_dir()
        if hydra_dir is not None:
            return hydra_dir
        log_dir = trainer.log_dir
        return Path(log_dir if log_dir else trainer.default_root_dir) / "probes"

    def _open(self, trainer: Trainer) -> None:
        self._close()  # re-entry of fit, or a teardown that never came
        switches = [cb for cb in trainer.callbacks if isinstance(cb, ProbeSwitch)]
        if len(switches) > 1:
            raise ConfigError(
                f"Trainer(callbacks=[...]) holds {len(switches)} ProbeSwitch callbacks "
                f"(tags {[list(s.tags) for s in switches]}); use one ProbeSwitch with all the tags."
            )
        self._switch = _Switch(
            self.tags,
            output_dir=self._output_dir(trainer),
            trainer=trainer,
            rank=int(trainer.global_rank),
            ranks=self.ranks,
            on_error=self.on_error,
            gate=self._due(trainer),
        )
        self._switch.open()

    def _gate(self, gate: bool) -> None:
        if self._switch is not None:
            self._switch.set_gate(gate)

    def _close(self) -> None:
        switch, self._switch = self._switch, None
        if switch is None:
            return
        switch.close()
        lines, problems = switch.report()
        for line in lines:
            rank_zero_info(f"ProbeSwitch: {line}")
        for problem in problems:
            rank_zero_warn(f"ProbeSwitch: {problem}", category=RuntimeWarning)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_switch"] = None  # a live switch belongs to this process's context
        return state

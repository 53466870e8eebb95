"""ProbeSwitch: switch probe tags on for the duration of ``Trainer.fit``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lightning_inspect._validation import check_bool, check_choice, check_positive_int
from lightning_inspect.backends import GenericSink, close_sinks, resolve_sinks
from lightning_inspect.errors import ConfigError
from lightning_inspect.probes.context import (
    ON_ERROR,
    RANKS,
    _Switch,
    check_output_dir,
    check_tags,
    hydra_output_dir,
)


class ProbeSwitch(Callback):
    """Switch probe tags on during fit and give probes the trainer's step, epoch and loggers.

    Probes run while ``trainer.global_step % every_n_steps == 0``, from ``setup`` to
    ``teardown``, outside validation (``validation=True``: in every validation batch too; never
    in the sanity check). Tags switched on by ``LIGHTNING_INSPECT`` or an enclosing ``probing()``
    follow the same schedule and get the same context; ``tags=[]`` only provides the context.
    At the end of fit, rank 0 prints one line per tag pattern (calls that ran, where their
    output went), or warns when the pattern matches no probe or none of its probes ran.

    Args:
        tags: tag patterns (names, globs such as ``"encoder.*"``); a string is split on commas.
        every_n_steps: run probes on optimizer steps divisible by this (>= 1).
        ranks: ``"zero"`` (global rank 0 only) or ``"all"`` (file names carry the rank).
        on_error: ``"disable"`` (warn once, switch the probe off for the fit) or ``"raise"``.
        output_dir: default ``<hydra run dir>/probes`` in a Hydra app, else
            ``<trainer.log_dir>/probes``.
        validation: also run probes in validation batches.

    Logged metrics:
        None by itself; probes log through ``ctx`` to every logger (``probes/<probe>/<name>``).

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
        self.tags = check_tags(f"ProbeSwitch(tags={tags!r})", tags or (), patterns=True)
        self.every_n_steps = check_positive_int("ProbeSwitch", "every_n_steps", every_n_steps)
        self.ranks = check_choice("ProbeSwitch", "ranks", ranks, RANKS)
        self.on_error = check_choice("ProbeSwitch", "on_error", on_error, ON_ERROR)
        self.output_dir = check_output_dir("ProbeSwitch", output_dir)
        self.validation = check_bool("ProbeSwitch", "validation", validation)
        self._switch: _Switch | None = None
        self._sinks: list[Any] = []

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            self._open(trainer)

    def on_train_batch_start(self, trainer: Trainer, *args: Any) -> None:
        self._gate(trainer.global_step % self.every_n_steps == 0)

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._gate(self.validation and not trainer.sanity_checking)

    on_train_batch_end = on_validation_end = on_train_batch_start

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            self._close()

    def on_exception(self, *args: Any) -> None:
        self._close()

    def _gate(self, on: bool) -> None:
        if self._switch is not None:
            self._switch.gate(on)

    def _open(self, trainer: Trainer) -> None:
        self._close()  # re-entry of fit, or a teardown that never came
        switches = [cb for cb in trainer.callbacks if isinstance(cb, ProbeSwitch)]
        if len(switches) > 1:
            raise ConfigError(
                f"Trainer(callbacks=[...]) holds {len(switches)} ProbeSwitch callbacks (tags "
                f"{[list(s.tags) for s in switches]}); use one ProbeSwitch with all the tags."
            )
        # trainer.log_dir is a collective call under DDP: read on every rank, here.
        output_dir = self.output_dir or hydra_output_dir()
        output_dir = output_dir or Path(trainer.log_dir or trainer.default_root_dir) / "probes"
        self._sinks = resolve_sinks(trainer, None, "ProbeSwitch") if trainer.loggers else []
        shown = [  # the loggers that show texts, pictures or histograms (rank 0 only)
            (f"{type(lg).__name__} {getattr(lg, 'run_id', None) or lg.log_dir}", sink)
            for lg, sink in zip(trainer.loggers, self._sinks, strict=False)
            if not isinstance(getattr(sink, "inner", sink), GenericSink)
        ]
        self._switch = _Switch(
            self.tags,
            output_dir=output_dir,
            trainer=trainer,
            sinks=tuple(shown),
            rank=int(trainer.global_rank),
            ranks=self.ranks,
            on_error=self.on_error,
        )
        self._switch.gate_open = trainer.global_step % self.every_n_steps == 0
        self._switch.open()

    def _close(self) -> None:
        switch, self._switch, sinks, self._sinks = self._switch, None, self._sinks, []
        if switch is not None:
            switch.close()
            close_sinks(sinks)
            lines, problems = switch.report()
            for line in lines:
                rank_zero_info(f"ProbeSwitch: {line}")
            for problem in problems:
                rank_zero_warn(f"ProbeSwitch: {problem}", category=RuntimeWarning)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_switch": None, "_sinks": []}  # live state stays here

"""ProbeSwitch: switch probe tags on for the duration of ``Trainer.fit``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lightning_inspect._validation import check_bool, check_positive_int
from lightning_inspect.backends import GenericSink, close_sinks, resolve_sinks
from lightning_inspect.errors import ConfigError
from lightning_inspect.probes.context import _Switch, hydra_output_dir


class ProbeSwitch(Callback, _Switch):
    """Switch ``tags`` on during fit on steps divisible by ``every_n_steps`` (and in validation
    with ``validation=True``), with the trainer's step, epoch and loggers; ``ranks``, ``on_error``
    and ``output_dir`` as for :func:`probing`. At the end, rank 0 reports what ran, and where.

    Logged metrics:
        None by itself; probes log through ``ctx`` to every logger (``probes/<probe>/<name>``).

    Example:
        >>> ProbeSwitch(tags=["attention"], every_n_steps=50).tags
        ('attention',)
    """

    def __init__(
        self,
        tags: list[str] | tuple[str, ...] | str | None = (),
        every_n_steps: int = 1,
        ranks: str = "zero",
        on_error: str = "disable",
        output_dir: str | Path | None = None,
        validation: bool = False,
    ) -> None:
        options = dict(output_dir=output_dir, ranks=ranks, on_error=on_error)
        _Switch.__init__(self, "ProbeSwitch", tags, **options)
        self.every_n_steps = check_positive_int("ProbeSwitch", "every_n_steps", every_n_steps)
        self.validation = check_bool("ProbeSwitch", "validation", validation)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._close()  # re-entry of fit, or a teardown that never came
        if (n := sum(isinstance(cb, ProbeSwitch) for cb in trainer.callbacks)) > 1:
            raise ConfigError(f"Trainer(callbacks=...) holds {n} ProbeSwitch callbacks; use one.")
        # trainer.log_dir is a collective call under DDP: read on every rank, here.
        out = self.given["output_dir"] or hydra_output_dir()
        out = out or Path(trainer.log_dir or trainer.default_root_dir) / "probes"
        self._sinks: list[Any] = trainer.loggers and resolve_sinks(trainer, None, "ProbeSwitch")
        shown = [  # the loggers that show texts, pictures or histograms (rank 0 only)
            (f"{type(lg).__name__} {getattr(lg, 'run_id', None) or lg.log_dir}", sink)
            for lg, sink in zip(trainer.loggers, self._sinks, strict=False)
            if not isinstance(getattr(sink, "inner", sink), GenericSink)
        ]
        self.gate_open = trainer.global_step % self.every_n_steps == 0
        self.open(output_dir=out, trainer=trainer, sinks=tuple(shown), rank=trainer.global_rank)

    def on_train_batch_start(self, trainer: Trainer, *args: Any) -> None:
        self.gate(trainer.global_step % self.every_n_steps == 0)

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.gate(self.validation and not trainer.sanity_checking)

    on_train_batch_end = on_validation_end = on_train_batch_start

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            self._close()

    def on_exception(self, *args: Any) -> None:
        self._close()

    def _close(self) -> None:
        if not self.closed:
            self.close()
            close_sinks(self._sinks)
            self.trainer, self.sinks, self._sinks = None, (), []  # nothing live stays behind
            for ok, line in self.report():
                if ok:
                    rank_zero_info(f"ProbeSwitch: {line}")
                else:
                    rank_zero_warn(f"ProbeSwitch: {line}", category=RuntimeWarning)

"""ShapeTracer: name the module where a forward pass failed; shape trace; model summary."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from lightning_inspect._validation import check_bool, check_optional_int
from lightning_inspect.backends import Sink, check_backends, close_sinks, resolve_sinks
from lightning_inspect.core.hooks import HookSet
from lightning_inspect.core.model_table import ModelTable, print_markdown
from lightning_inspect.core.selection import named_modules
from lightning_inspect.errors import InspectError
from lightning_inspect.shapes import notes

SUMMARY_KEY = "model/summary"
TRACE_KEY = "model/shape_trace"


class ShapeTracer(Callback):
    """Add a note naming the failing module (by hooks in the first ``first_n_batches`` training
    batches, validate, test and predict, then from the traceback), its callers, inputs, parameters
    and a hint to forward-pass errors; ``trace``: log every module's shapes on the first training
    batch (``model/shape_trace``); ``summary``: the model's blocks at fit start (``model/summary``);
    ``console``: print them too.

    Example::

        trainer = L.Trainer(callbacks=[ShapeTracer(trace=True)])
        trainer.fit(model)  # RuntimeError: mat1 and mat2 shapes cannot be multiplied ...
                            # lightning-inspect: the error was raised inside module 'head' (Linear)
    """

    def __init__(
        self,
        localise_errors: bool = True,
        first_n_batches: int | None = 1,
        trace: bool = False,
        summary: bool = True,
        backends: str | Sequence[str | Sink] | None = None,
        console: bool = True,
        enabled: bool = True,
    ) -> None:
        owner = type(self).__name__
        self.localise_errors = check_bool(owner, "localise_errors", localise_errors)
        self.first_n_batches = check_optional_int(owner, "first_n_batches", first_n_batches)
        self.trace = check_bool(owner, "trace", trace)
        self.summary = check_bool(owner, "summary", summary)
        self.backends = check_backends(owner, backends)
        self.console = check_bool(owner, "console", console)
        self.enabled = check_bool(owner, "enabled", enabled)
        self.sinks: list[Sink] = []
        self.stack, self._hooks = notes.ModuleStack(), HookSet()
        self.shape_trace: ModelTable | None = None
        self._modules: dict[str, Any] = {}
        self._context, self._train_batches, self._summarised = "", 0, False

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not self.enabled:
            return
        self._modules = {"": pl_module, **named_modules(pl_module)}
        self.sinks = resolve_sinks(trainer, self.backends, owner=type(self).__name__)
        self._train_batches = 0
        self._hooks.remove()
        if self.localise_errors or (self.trace and stage == "fit" and self.shape_trace is None):
            self._hooks = self.stack.attach(self._modules)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.enabled and self.summary and not self._summarised and trainer.is_global_zero:
            self._summarised = True
            self._log(
                SUMMARY_KEY, notes.model_summary(pl_module).to_markdown(), trainer.global_step
            )

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if not self.enabled:
            return
        self._begin(f"training step {trainer.global_step}, batch {batch_idx}")
        if self.trace and self.shape_trace is None:
            self.stack.trace = ModelTable(pl_module)
        elif self.first_n_batches is not None and self._train_batches >= self.first_n_batches:
            self._hooks.remove()  # errors are located from the traceback from now on

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if not self.enabled:
            return
        self._train_batches += 1
        self._log_trace(trainer, failed=False)
        limit = self.first_n_batches
        if not self.localise_errors or (limit is not None and self._train_batches >= limit):
            self._hooks.remove()

    def on_validation_batch_start(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        what = "the sanity check" if trainer.sanity_checking else "validation"
        self._begin(f"{what} (validation batch {args[2]})")

    def on_test_batch_start(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        self._begin(f"test batch {args[2]}")

    def on_predict_batch_start(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        self._begin(f"predict batch {args[2]}")

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        if not self.enabled:
            return
        try:
            if self.localise_errors:
                self._note(exception)
            self._log_trace(trainer, failed=True)
        finally:  # Lightning calls no teardown after an exception
            self.teardown(trainer, pl_module, "fit")

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._hooks.remove()
        self.stack.clear()
        self.stack.trace = None
        close_sinks(self.sinks)
        self.sinks = []

    def _begin(self, context: str) -> None:
        self.stack.clear()
        self._context = context

    def _note(self, exception: BaseException) -> None:
        # the library's own errors say where they come from; interrupts are not failures
        if isinstance(exception, InspectError) or not isinstance(exception, Exception):
            return
        frames = self.stack.frames() or notes.locate_in_traceback(exception, self._modules)
        if frames and not notes.has_note(exception, notes.ERROR_NOTE):
            notes.attach_note(exception, notes.error_note(frames, exception, self._context))

    def _log_trace(self, trainer: pl.Trainer, failed: bool) -> None:
        trace, self.stack.trace = self.stack.trace, None
        if trace is None:
            return
        for frame in self.stack.frames() if failed else []:
            if frame.name in trace.by_name:
                trace.by_name[frame.name].outputs = ["(did not return)"]
        self.shape_trace, trace.note = trace, ", shapes of the first training batch"
        trace.note += " (it failed)" * failed
        if trainer.is_global_zero:
            self._log(TRACE_KEY, trace.to_markdown(), trainer.global_step)

    def _log(self, key: str, text: str, step: int) -> None:
        for sink in self.sinks:
            sink.log_text(key, text, step)
            sink.flush()
        if self.console:
            print_markdown(text)

"""ShapeTracer: name the module where a forward pass failed; shape trace; model summary."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from torch import nn

from lightning_inspect._validation import check_bool, check_optional_int
from lightning_inspect.backends import Sink, check_backends, close_sinks, resolve_sinks
from lightning_inspect.core.hooks import HookSet
from lightning_inspect.core.selection import normalise_name
from lightning_inspect.errors import InspectError
from lightning_inspect.shapes.notes import (
    ModuleStack,
    ShapeTrace,
    attach_note,
    error_note,
    has_note,
    locate_in_traceback,
    model_summary,
)

#: Keys of the texts logged (TensorBoard text; MLflow ``lightning_inspect/<key>.md``).
SUMMARY_KEY = "model/summary"
TRACE_KEY = "model/shape_trace"
_ERROR_NOTE = "lightning-inspect: the error was raised inside"


class ShapeTracer(Callback):
    """Make forward-pass errors name their module; optionally trace shapes; summarise the model.

    **Error localisation.** While active, a forward pre-hook and a forward hook on every module
    keep the stack of modules inside their forward. When fit (or validate/test/predict) stops on
    an exception raised inside a module, a note is added to that exception (the original
    traceback stays as it is) naming the innermost module by qualified name and type, its
    callers, the shapes and dtypes of its inputs and of its parameters, and a hint for the common
    causes (a missing flatten, a wrong ``in_features`` / ``in_channels`` / ``num_features``,
    dtype and device mismatches). The hooks are active during the sanity check and the first
    ``first_n_batches`` training batches (in ``validate`` / ``test`` / ``predict``: the whole
    run); afterwards the module is found from the traceback (the ``forward`` frames of the
    model's modules), at no cost while nothing fails. Under ``torch.compile`` the hooks and the
    ``forward`` frames may be missing, and then so is the note.

    **Shape trace** (``trace=True``): every module's input and output shapes during the first
    training batch, as a table (console, TensorBoard text ``model/shape_trace``, MLflow
    artifact ``lightning_inspect/model/shape_trace.md``). If that batch fails, the partial trace
    is logged, ending at the failing module.

    **Model summary** (``summary=True``): the model's blocks (``named_children``), their layer
    counts and parameters (trainable and frozen), once at the start of fit (console,
    ``model/summary``).

    Args:
        localise_errors: add the note described above.
        first_n_batches: training batches during which the hooks stay (after the sanity check);
            ``None``: all of fit.
        trace: log the shape trace of the first training batch.
        summary: log the model summary.
        backends: as for the other monitors (``None``: every supported logger attached).
        console: also print the summary and the trace (rich tables).
        enabled: ``False`` does nothing.

    Example::

        trainer = L.Trainer(callbacks=[ShapeTracer(trace=True)])
        trainer.fit(model)   # RuntimeError: mat1 and mat2 shapes cannot be multiplied (128x6 and 288x10)
                             # lightning-inspect: the error was raised inside module 'head' (Linear) ...
                             #   hint: missing flatten: the input is 4-D (4, 8, 6, 6) ...
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
        self.first_n_batches = check_optional_int(
            owner, "first_n_batches", first_n_batches, minimum=0
        )
        self.trace = check_bool(owner, "trace", trace)
        self.summary = check_bool(owner, "summary", summary)
        self.backends = check_backends(owner, backends)
        self.console = check_bool(owner, "console", console)
        self.enabled = check_bool(owner, "enabled", enabled)
        self.sinks: list[Sink] = []
        self.stack = ModuleStack()
        #: The shape trace of the first training batch, once taken.
        self.shape_trace: ShapeTrace | None = None
        self._modules: dict[str, nn.Module] = {}
        self._hooks = HookSet()
        self._context = ""
        self._train_batches = 0
        self._summarised = False
        self._global_zero = True

    # -- Lightning hooks --------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not self.enabled:
            return
        self._global_zero = trainer.is_global_zero
        self._modules = {}
        for raw, module in pl_module.named_modules():
            self._modules.setdefault(normalise_name(raw), module)
        self.sinks = resolve_sinks(trainer, self.backends, owner=type(self).__name__)
        self._train_batches = 0
        self._hooks.remove()
        if self.localise_errors or (self.trace and stage == "fit" and self.shape_trace is None):
            self._hooks = self.stack.attach(self._modules)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.enabled or not self.summary or self._summarised or not trainer.is_global_zero:
            return
        self._summarised = True
        summary = model_summary(pl_module)
        self._log_text(SUMMARY_KEY, summary.to_markdown(), trainer.global_step)
        self._print(summary)

    def on_sanity_check_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._context = "the sanity check"

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if not self.enabled:
            return
        self.stack.clear()
        self._context = f"training step {trainer.global_step}, batch {batch_idx}"
        tracing = self.trace and self.shape_trace is None
        if tracing:
            self.stack.trace = ShapeTrace()
        elif self.first_n_batches is not None and self._train_batches >= self.first_n_batches:
            self._hooks.remove()  # errors are located from the traceback from now on

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if not self.enabled:
            return
        self._train_batches += 1
        if self.stack.trace is not None:
            self.shape_trace, self.stack.trace = self.stack.trace, None
            self._log_trace(trainer, failed=False)
        if not self.localise_errors or (
            self.first_n_batches is not None and self._train_batches >= self.first_n_batches
        ):
            self._hooks.remove()

    def on_validation_batch_start(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self.stack.clear()
        what = "the sanity check" if trainer.sanity_checking else "validation"
        self._context = f"{what} (validation batch {batch_idx})"

    def on_test_batch_start(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self.stack.clear()
        self._context = f"test batch {batch_idx}"

    def on_predict_batch_start(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self.stack.clear()
        self._context = f"predict batch {batch_idx}"

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        if not self.enabled:
            return
        try:
            if self.localise_errors:
                self._note(exception)
            if self.stack.trace is not None:
                self.shape_trace, self.stack.trace = self.stack.trace, None
                self._log_trace(trainer, failed=True)
        finally:
            self.teardown(
                trainer, pl_module, "fit"
            )  # Lightning calls no teardown after an exception

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._hooks.remove()
        self.stack.clear()
        self.stack.trace = None
        close_sinks(self.sinks)
        self.sinks = []

    # -- workers ----------------------------------------------------------------------------

    def _note(self, exception: BaseException) -> None:
        # The library's own errors say where they come from; interrupts are not failures.
        if (
            isinstance(exception, InspectError)
            or not isinstance(exception, Exception)
            or has_note(exception, _ERROR_NOTE)
        ):
            return
        frames = self.stack.frames() or locate_in_traceback(exception, self._modules)
        if frames:
            attach_note(exception, error_note(frames, exception, self._context))

    def _log_trace(self, trainer: pl.Trainer, failed: bool) -> None:
        if self.shape_trace is None or not trainer.is_global_zero:
            return
        title = "Shape trace of the first training batch" + (
            " (it failed: the last rows did not return)" if failed else ""
        )
        self._log_text(TRACE_KEY, self.shape_trace.to_markdown(title), trainer.global_step)
        if self.console:
            trace = self.shape_trace
            _print_rich(lambda: trace.to_rich_table(title), trace.to_markdown(title))

    def _log_text(self, key: str, text: str, step: int) -> None:
        for sink in self.sinks:
            sink.log_text(key, text, step)
            sink.flush()

    def _print(self, summary: Any) -> None:
        if self.console:
            _print_rich(summary.to_rich_table, summary.to_markdown())


def _print_rich(table_factory: Callable[[], Any], fallback: str) -> None:
    try:
        from rich.console import Console
    except ImportError:  # pragma: no cover - rich is an optional dependency
        print(fallback)
        return
    console = Console()
    if not console.is_terminal:
        console = Console(width=160)
    console.print(table_factory())

"""GraphMonitor: the computational graph (TensorBoard) and the model table (every backend)."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from lightning_inspect._validation import check_bool
from lightning_inspect.backends import Sink, check_backends, close_sinks, resolve_sinks
from lightning_inspect.backends.tensorboard import TensorBoardSink
from lightning_inspect.core.hooks import HookSet, suspended
from lightning_inspect.core.model_table import ModelTable, hook_modules
from lightning_inspect.core.selection import named_modules

STRUCTURE_KEY = "model/structure"


class GraphMonitor(Callback):
    """Log the model's graph (TensorBoard; traced on rank 0 with the inputs of the LightningModule
    or, if ``training_step`` does not call ``self(...)``, of its first child called; else a warning
    says why) and its model table (every backend, ``model/structure``) from the first training batch.

    Example::

        L.Trainer(logger=TensorBoardLogger("tb"), callbacks=[GraphMonitor()])
    """

    _recording = True

    def __init__(
        self,
        graph: bool = True,
        structure: bool = True,
        backends: str | Sequence[str | Sink] | None = None,
        enabled: bool = True,
    ) -> None:
        owner = type(self).__name__
        self.graph = check_bool(owner, "graph", graph)
        self.structure = check_bool(owner, "structure", structure)
        self.backends = check_backends(owner, backends)
        self.enabled = check_bool(owner, "enabled", enabled)
        self.sinks: list[Sink] = []
        self.done, self._step, self._hooks = False, 0, HookSet()
        self._inputs: tuple[nn.Module, str, tuple[Any, ...], dict[str, Any]] | None = None
        self._table = ModelTable(nn.Module())  # replaced on the first training batch

    def state_dict(self) -> dict[str, Any]:
        return {"done": self.done}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.done = bool(state_dict.get("done", False))

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and self.enabled:
            self.sinks = resolve_sinks(trainer, self.backends, owner=type(self).__name__)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: nn.Module, *_: Any) -> None:
        if not self.done and self.enabled and trainer.is_global_zero:
            self._step, self._table = trainer.global_step, ModelTable(pl_module)
            self._hooks = hook_modules(self, {"": pl_module, **named_modules(pl_module)})

    # pre-hooks fire outermost first: the first of the model and its children called is traced
    def _on_input(self, name: str, module: nn.Module, args: Any, kwargs: Any) -> None:
        if self._inputs is None and "." not in name:
            self._inputs = (module, name, args, kwargs)
        self._table._on_input(name, module, args, kwargs)

    def _on_output(self, name: str, path: str, tensor: torch.Tensor) -> None:
        self._table._on_output(name, path, tensor)

    def _hook_fault(self, where: str, exc: BaseException) -> None:
        self._table._hook_fault(where, exc)

    def on_train_batch_end(self, trainer: pl.Trainer, *_: Any) -> None:
        if self.done or not self.enabled or not trainer.is_global_zero:
            return
        self._hooks.remove()
        self.done = True
        if self.structure:
            text = self._table.to_markdown()
            for sink in self.sinks:
                sink.log_text(STRUCTURE_KEY, text, self._step)
        if self.graph:
            self._log_graph()
        for sink in self.sinks:
            sink.flush()
        self._inputs = None

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *_: Any) -> None:
        self.teardown(trainer, pl_module, "fit")

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._hooks.remove()
        self._inputs = None
        close_sinks(self.sinks)
        self.sinks = []

    def _log_graph(self) -> None:
        sinks = [getattr(s, "inner", s) for s in self.sinks]
        if not (writers := [s.writer for s in sinks if isinstance(s, TensorBoardSink)]):
            return
        if self._inputs is None:
            return self._warn("the model", "it was not called during the first training batch")
        module, name, args, kwargs = self._inputs
        where = f"the module {name!r}" if name else "the LightningModule"
        if kwargs:
            why = f"it was called with keyword arguments {sorted(kwargs)}; tracing takes positional tensors only"
            return self._warn(where, why)
        if not all(isinstance(a, torch.Tensor) for a in args):
            why = f"its inputs are {[type(a).__name__ for a in args]}; tracing takes tensors only (dict or list inputs cannot be traced)"
            return self._warn(where, why)
        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        modes = {m: m.training for m in module.modules()}  # tracing runs in eval mode
        try:
            with (
                suspended(),
                torch.random.fork_rng(devices=[torch.cuda.current_device()] if cuda else []),
                torch.no_grad(),
                warnings.catch_warnings(),
            ):
                warnings.simplefilter("ignore")  # the tracer's own warnings are noise here
                writers[0].add_graph(module, tuple(a.detach() for a in args))
        except Exception as exc:
            self._warn(where, f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}")
        finally:
            for m, training in modes.items():  # each module back to its own mode
                m.training = training

    @staticmethod
    def _warn(where: str, why: str) -> None:
        msg = f"GraphMonitor: could not trace the graph of {where}: {why}. Training continues; "
        warnings.warn(msg + "the model structure is still logged.", RuntimeWarning, stacklevel=3)

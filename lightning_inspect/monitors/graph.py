"""GraphMonitor: the computational graph (TensorBoard) and a readable model structure (both)."""

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
from lightning_inspect.core.hooks import HookSet, InertWhenCopied, suspended
from lightning_inspect.core.outputs import iter_tensors
from lightning_inspect.core.selection import normalise_name

STRUCTURE_KEY = "model/structure"


class _InputCaptureHook(InertWhenCopied):
    """Forward pre-hook recording the inputs of the first (outermost) entry module called.

    Pre-hooks fire outermost first, so when ``training_step`` calls ``self(x)`` the
    LightningModule is captured, not the first of its children to run.
    """

    __slots__ = ("name", "owner", "wrapped")

    def __init__(self, owner: GraphMonitor, name: str, wrapped: bool = False) -> None:
        self.owner = owner
        self.name = name
        self.wrapped = wrapped  # the strategy wraps this module (DDP...): skip the redirected step

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if self.owner._inputs is None and not (self.wrapped and _redirected_step(module)):
            self.owner._inputs = (module, self.name, args, kwargs)


def _redirected_step(module: nn.Module) -> bool:
    """Whether this call of ``module`` is a strategy's redirected ``training_step``.

    Under DDP (``ddp``, ``ddp_spawn``), FSDP and DeepSpeed, Lightning runs ``training_step``
    through the wrapper's ``forward``: it replaces the LightningModule's ``forward`` on the
    instance by a plain function for that one call, which receives ``(batch, batch_idx)``. The
    model's own ``self(x)`` inside ``training_step`` runs its bound ``forward`` again.
    """
    patched = vars(module).get("forward")
    return patched is not None and getattr(patched, "__self__", None) is not module


class _ShapeHook(InertWhenCopied):
    """Forward hook recording every module's output shapes on the first batch."""

    __slots__ = ("name", "owner")

    def __init__(self, owner: GraphMonitor, name: str) -> None:
        self.owner = owner
        self.name = name

    def __call__(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        shapes = [
            f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')}"
            for _, t in iter_tensors(output)
        ]
        self.owner._shapes.setdefault(
            self.name, "; ".join(shapes[:4]) + (" ..." if len(shapes) > 4 else "")
        )


class GraphMonitor(Callback):
    """Log the model's computational graph and structure once, from the first training batch.

    The graph is traced (``torch.jit.trace`` through ``SummaryWriter.add_graph``, in eval mode,
    without gradients, with the random state saved and restored, so training is unchanged) with
    the inputs the model really received on its first training batch: no
    ``example_input_array`` is needed. The traced module is the LightningModule when
    ``training_step`` calls ``self(...)``, otherwise the first direct child it called; on global
    rank 0 only, and under DDP the module itself, not the wrapper (the strategy's own call that
    routes ``training_step`` through the wrapper is skipped). Where
    tracing cannot work (keyword or dict inputs, data-dependent control flow) a warning says why
    and training goes on.

    The structure is a markdown table of every module: qualified name, type, output shapes seen
    on the first batch, parameters (total and trainable). It goes to TensorBoard's Text tab and to
    MLflow as ``lightning_inspect/model/structure.md``.

    Args:
        graph: log the graph (TensorBoard only).
        structure: log the structure table.
        backends: as for the other monitors.
        enabled: ``False`` does nothing.

    Example::

        L.Trainer(logger=TensorBoardLogger("tb"), callbacks=[GraphMonitor()])
    """

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
        self.done = False
        self._hooks = HookSet()
        self._inputs: tuple[nn.Module, str, tuple[Any, ...], dict[str, Any]] | None = None
        self._shapes: dict[str, str] = {}
        self._step = 0

    def state_dict(self) -> dict[str, Any]:
        return {"done": self.done}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.done = bool(state_dict.get("done", False))

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or not self.enabled:
            return
        self.sinks = resolve_sinks(trainer, self.backends, owner=type(self).__name__)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.done or not self.enabled or not trainer.is_global_zero:
            return
        self._step = trainer.global_step
        wrapped = trainer.strategy.model is not pl_module
        root_hook = _InputCaptureHook(self, "", wrapped)
        self._hooks.add(pl_module.register_forward_pre_hook(root_hook, with_kwargs=True))
        for name, module in pl_module.named_children():
            self._hooks.add(
                module.register_forward_pre_hook(_InputCaptureHook(self, name), with_kwargs=True)
            )
        for raw, module in pl_module.named_modules():
            self._hooks.add(module.register_forward_hook(_ShapeHook(self, raw)))

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if self.done or not self.enabled or not trainer.is_global_zero:
            return
        self._hooks.remove()
        self.done = True
        step = self._step
        if self.structure:
            text = structure_table(pl_module, self._shapes)
            for sink in self.sinks:
                sink.log_text(STRUCTURE_KEY, text, step)
        if self.graph:
            self._log_graph()
        for sink in self.sinks:
            sink.flush()
        self._inputs = None

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self.teardown(trainer, pl_module, "fit")

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._hooks.remove()
        self._inputs = None
        close_sinks(self.sinks)
        self.sinks = []

    def _log_graph(self) -> None:
        writers = [
            s.inner.writer
            for s in self.sinks
            if isinstance(getattr(s, "inner", s), TensorBoardSink)
        ]
        if not writers:
            return
        if self._inputs is None:
            warnings.warn(
                "GraphMonitor: the model was not called during the first training batch; no graph is logged.",
                RuntimeWarning,
                stacklevel=2,
            )
            return
        module, name, args, kwargs = self._inputs
        where = f"the module {normalise_name(name)!r}" if name else "the LightningModule"
        if kwargs:
            self._warn(
                where,
                f"it was called with keyword arguments {sorted(kwargs)}; tracing takes positional tensors only",
            )
            return
        if not all(isinstance(a, torch.Tensor) for a in args):
            kinds = [type(a).__name__ for a in args]
            self._warn(
                where,
                f"its inputs are {kinds}; tracing takes tensors only (dict or list inputs cannot be traced)",
            )
            return
        devices = (
            [torch.cuda.current_device()]
            if torch.cuda.is_available() and torch.cuda.is_initialized()
            else []
        )
        modes = {m: m.training for m in module.modules()}  # tracing runs in eval mode
        try:
            with (
                suspended(),
                torch.random.fork_rng(devices=devices),
                torch.no_grad(),
                warnings.catch_warnings(),
            ):
                warnings.simplefilter("ignore")  # the tracer's own warnings are noise here
                writers[0].add_graph(module, tuple(a.detach() for a in args))
        except Exception as exc:
            self._warn(
                where, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            )
        finally:
            for (
                m,
                training,
            ) in modes.items():  # each module back to its own mode (frozen parts stay eval)
                m.training = training

    @staticmethod
    def _warn(where: str, why: str) -> None:
        warnings.warn(
            f"GraphMonitor: could not trace the graph of {where}: {why}. Training continues; the "
            "model structure is still logged.",
            RuntimeWarning,
            stacklevel=3,
        )


def structure_table(model: nn.Module, shapes: dict[str, str] | None = None) -> str:
    """A markdown table of every module: name, type, output shape, parameters (trainable).

    >>> print(structure_table(nn.Sequential(nn.Linear(2, 3))).splitlines()[4])
    | 0 | Linear |  | 9 | 9 |
    """
    shapes = shapes or {}
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    lines = [
        f"**{type(model).__name__}**: {total:,} parameters ({trainable:,} trainable, {total - trainable:,} frozen)",
        "",
        "| module | type | output shape | parameters | trainable |",
        "|---|---|---|---:|---:|",
    ]
    body = []
    for raw, module in model.named_modules():
        name = normalise_name(raw)
        if not name:
            continue
        n = sum(p.numel() for p in module.parameters())
        t = sum(p.numel() for p in module.parameters() if p.requires_grad)
        depth = name.count(".")
        body.append(
            f"| {'&nbsp;' * 2 * depth}{name} | {type(module).__name__} | {shapes.get(raw, '')} | {n:,} | {t:,} |"
        )
    return "\n".join(lines + body)

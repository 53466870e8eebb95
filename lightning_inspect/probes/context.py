"""Probes: a user's own inspection code that runs only while one of its tags is switched on.

Tags are switched on by :class:`~lightning_inspect.probes.switch.ProbeSwitch` (``+inspect=probes``),
the environment variable ``LIGHTNING_INSPECT`` or :class:`probing`; the state lives in a
:class:`contextvars.ContextVar`, so threads and asyncio tasks do not see each other's switches.

Example:
    >>> @probe("attention")
    ... def show_attention(weights, *, ctx):
    ...     return f"{ctx.tag} at step {ctx.step}"
    >>> show_attention([0.5, 0.5]) is None
    True
    >>> with probing("attention", output_dir="probes-doctest"):
    ...     show_attention([0.5, 0.5])
    'attention at step 0'
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import json
import os
import re
import sys
import threading
import traceback
import warnings
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from lightning_inspect._validation import (
    check_choice,
    check_optional_int,
    check_positive_int,
    suggestion,
)
from lightning_inspect.errors import ConfigError

if TYPE_CHECKING:
    import numpy as np
    from lightning.pytorch import Trainer

__all__ = [
    "ENV_VAR",
    "ON_ERROR",
    "RANKS",
    "ProbeContext",
    "ProbeWarning",
    "current_context",
    "enabled",
    "probe",
    "probing",
    "reload_env",
    "tag_matches",
]

R = TypeVar("R")
#: The environment variable holding comma-separated tag patterns to switch on.
ENV_VAR = "LIGHTNING_INSPECT"
#: ``ranks``: run probes on global rank 0 only, or on every rank.
RANKS = ("zero", "all")
#: ``on_error``: warn once and switch the probe off, or re-raise.
ON_ERROR = ("disable", "raise")


class ProbeWarning(UserWarning):
    """A probe raised and was switched off for the rest of the run."""


def _safe(text: str) -> str:
    """``text`` as a file name: anything but letters, digits, ``_ . -`` becomes ``_``."""
    return re.sub(r"[^A-Za-z0-9_.\-]+", "_", text).strip(".") or "probe"


def check_tags(owner: str, values: Any, patterns: bool) -> tuple[str, ...]:
    """A probe's tags (plain dotted names) or, with ``patterns``, a switch's tag patterns (globs
    allowed; a string is split on commas); a ConfigError names ``owner`` and the bad entry."""
    kind = "tag pattern" if patterns else "tag"
    if isinstance(values, str):
        values = values.split(",") if patterns else [values]
    if not isinstance(values, Iterable):
        raise ConfigError(
            f"{owner}: expected a list of {kind}s such as ['attention', 'encoder.*']; "
            f"got {values!r} ({type(values).__name__})."
        )
    out = []
    for value in values:
        if callable(value):
            raise ConfigError(
                f"{owner}: write @probe('attention'), with parentheses and a tag; got the "
                f"function {getattr(value, '__name__', value)!r}."
            )
        if not isinstance(value, str):
            raise ConfigError(
                f"{owner}: each of tags must be a string such as 'attention'; "
                f"got {value!r} ({type(value).__name__})."
            )
        value = value.strip() if patterns else value
        if not value:
            more = ", a glob such as 'encoder.*', or '*' for every probe" if patterns else ""
            raise ConfigError(
                f"{owner}: tags holds an empty {kind}; use a name such as 'attention'{more}."
            )
        if re.search(r"[\s,]" if patterns else r"[\s,*?\[\]]", value):
            why = (
                "; give one pattern per entry, e.g. ['attention', 'encoder.*']"
                if patterns
                else " or a glob character (* ? [ ]); a probe's tags are plain dotted names "
                "such as 'encoder.features' (globs belong in the switches)"
            )
            raise ConfigError(f"{owner}: {kind} {value!r} contains whitespace, a comma{why}.")
        out.append(value)
    return tuple(out)


def check_output_dir(owner: str, value: Any) -> Path | None:
    """``output_dir`` as a Path (None stays None)."""
    if value is not None and not isinstance(value, (str, os.PathLike)):
        raise ConfigError(f"{owner}(output_dir={value!r}): expected None, a str or a path.")
    return None if value is None else Path(value)


def tag_matches(pattern: str, tag: str) -> bool:
    """Whether switch ``pattern`` switches on probe ``tag`` (glob plus hierarchy).

    Example:
        >>> tag_matches("model", "model.attention"), tag_matches("model.*", "model.attention")
        (True, True)
        >>> tag_matches("*", "any.tag"), tag_matches("model.*", "model"), tag_matches("mod", "model")
        (True, False, False)
    """
    return fnmatchcase(tag, pattern) or fnmatchcase(tag, pattern + ".*")


def hydra_output_dir() -> Path | None:
    """``<hydra run dir>/probes`` inside a running Hydra app, else None (never imports Hydra)."""
    module = sys.modules.get("hydra.core.hydra_config")
    try:
        if module is not None and module.HydraConfig.initialized():
            return Path(module.HydraConfig.get().runtime.output_dir) / "probes"
    except Exception:  # a half-initialised Hydra: the other defaults apply
        pass
    return None


def _environment_rank() -> int:
    for name in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return 0


class _Journal:
    """One run's bookkeeping: probes switched off after an error, names handed out, calls per
    probe and items written per destination (for the end-of-run report)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.disabled: set[_ProbeInfo] = set()
        self.issued: set[str] = set()
        self.calls: dict[_ProbeInfo, int] = {}
        self.outputs: dict[str, dict[str, int]] = {}  # qualname -> {destination: items}

    def wrote(self, qualname: str, where: str, items: int = 1) -> None:
        with self.lock:
            done = self.outputs.setdefault(qualname, {})
            done[where] = done.get(where, 0) + items

    def claim(self, directory: Path | None, base: str, suffix: str, namespace: str) -> str:
        """A name ``base[_k]suffix`` not handed out before in this run, nor on disk."""
        with self.lock:
            k = 0
            while True:
                name = f"{base}_{k}{suffix}" if k else f"{base}{suffix}"
                key = f"{namespace}:{directory}/{name}"
                if key not in self.issued and not (directory and (directory / name).exists()):
                    self.issued.add(key)
                    return name
                k += 1


@dataclass(frozen=True, eq=False)
class _Run:
    """What every probe call shares while one switch is on."""

    patterns: frozenset[str] = frozenset()
    output_dir: Path | None = None  # None: <hydra run dir>/probes, else ./probes
    trainer: Trainer | None = None
    sinks: tuple[tuple[str, Any], ...] = ()  # (destination, backend sink) of the loggers
    rank: int | None = None  # None: the trainer's, torch.distributed's or the environment's
    ranks: str = "zero"
    on_error: str = "disable"
    step: int | None = None  # None: the trainer's global_step, else 0
    journal: _Journal = field(default_factory=_Journal)
    env_rank: int = field(default_factory=_environment_rank)  # read when the run starts
    memo: dict[str, bool] = field(default_factory=dict)  # tag -> switched on

    def matches(self, tag: str) -> bool:
        hit = self.memo.get(tag)
        if hit is None:
            hit = self.memo[tag] = any(tag_matches(p, tag) for p in self.patterns)
        return hit

    def current_rank(self) -> int:
        if self.rank is not None:
            return self.rank
        if self.trainer is not None:
            return int(self.trainer.global_rank)
        dist = sys.modules.get("torch.distributed")
        if dist is not None and dist.is_available() and dist.is_initialized():
            return int(dist.get_rank())
        return self.env_rank

    def directory(self) -> Path:
        return self.output_dir or hydra_output_dir() or Path("probes")

    def context(self, probe: str, qualname: str, tag: str, rank: int) -> ProbeContext:
        t = self.trainer
        step = self.step if self.step is not None else int(t.global_step) if t is not None else 0
        return ProbeContext(
            probe=probe,
            tag=tag,
            step=step,
            epoch=int(t.current_epoch) if t is not None else 0,
            rank=rank,
            output_dir=self.directory(),
            trainer=t,
            qualname=qualname,
            _journal=self.journal,
            _sinks=self.sinks if rank == 0 else (),  # Lightning's loggers write on rank 0 only
        )


@dataclass(frozen=True, eq=False)
class _State:
    """The ContextVar's value: the run, whether probes may run now, the switch that set it."""

    run: _Run
    active: bool
    owner: _Switch | None = None


def _state_from_env() -> _State:
    patterns = frozenset(p.strip() for p in os.environ.get(ENV_VAR, "").split(",") if p.strip())
    return _State(_Run(patterns), active=bool(patterns))


#: None (or unset) means the environment's default, read at import and replaced by reload_env().
_STATE: contextvars.ContextVar[_State | None] = contextvars.ContextVar("lightning_inspect.probes")
_default_state = _state_from_env()


def _current() -> _State:
    return _STATE.get(None) or _default_state


def reload_env() -> tuple[str, ...]:
    """Re-read ``LIGHTNING_INSPECT`` (read once at import) and return the patterns now on.

    The value is the default of every thread and context without a switch of its own.

    Example:
        >>> import os
        >>> os.environ["LIGHTNING_INSPECT"] = "attention, encoder.*"
        >>> reload_env()
        ('attention', 'encoder.*')
        >>> del os.environ["LIGHTNING_INSPECT"]; reload_env()
        ()
    """
    global _default_state
    _default_state = _state_from_env()
    return tuple(sorted(_default_state.run.patterns))


class _Switch:
    """Adds tag patterns to what is on in this context until :meth:`close`; ``gate(False)``
    keeps them but lets no probe run. Switches closed out of order are skipped by the one above."""

    def __init__(self, patterns: tuple[str, ...], **settings: Any) -> None:
        self.patterns = patterns
        self.settings = settings  # _Run fields; None: inherited or detected
        self.closed = True
        self.gate_open = True

    def open(self) -> _State:
        self.outer = _STATE.get(None)
        outer = self.outer or _default_state
        inherited = {k: getattr(outer.run, k) for k in ("output_dir", "trainer", "sinks")}
        given = {k: v for k, v in self.settings.items() if v is not None}
        patterns = frozenset(self.patterns) | (outer.run.patterns if outer.active else frozenset())
        self.run = run = _Run(patterns, **{**inherited, **given})
        blocked = run.rank not in (None, 0) and run.ranks == "zero"
        self.on = _State(run, bool(patterns) and not blocked, self)
        self.off = _State(run, False, self)
        self.closed = False
        _STATE.set(self.on if self.gate_open else self.off)
        return self.on

    def _on_top(self) -> bool:
        state = _STATE.get(None)
        return state is not None and state.owner is self

    def gate(self, on: bool) -> None:
        """Let probes run (True) or not; ignored while a nested switch is open above."""
        if on != self.gate_open:
            self.gate_open = on
            if not self.closed and self._on_top():
                _STATE.set(self.on if on else self.off)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._on_top():  # else a switch opened later restores past this one when it closes
            bottom = self
            while bottom.outer is not None and bottom.outer.owner is not None:
                if not bottom.outer.owner.closed:
                    break
                bottom = bottom.outer.owner
            _STATE.set(bottom.outer)

    def report(self) -> tuple[list[str], list[str]]:
        """Per pattern that was on: a line (calls that ran, where they wrote) or a problem (it
        matches no registered probe, or none of its probes' calls ran)."""
        journal = self.run.journal
        with journal.lock:
            calls, outputs = dict(journal.calls), {k: dict(v) for k, v in journal.outputs.items()}
        probes = set(_REGISTRY) | set(calls)
        known = sorted({tag for info in probes for tag in info.tags})
        lines: list[str] = []
        problems: list[str] = []
        for pattern in sorted(self.run.patterns):
            matching = sorted(
                (i for i in probes if any(tag_matches(pattern, t) for t in i.tags)),
                key=lambda i: i.qualname,
            )
            ran = sum(calls.get(i, 0) for i in matching)
            if not matching:
                problems.append(
                    f"tag pattern {pattern!r} matches no registered probe, so nothing ran for it. "
                    f"Known probe tags: {', '.join(known) or 'none (no @probe was imported)'}."
                    f"{suggestion(pattern, known)}"
                )
            elif not ran:
                problems.append(
                    f"tag pattern {pattern!r} switches on {', '.join(i.qualname for i in matching)}"
                    ", but no call of it ran (none came on a step that was due), so nothing was "
                    "written for it."
                )
            else:
                written: dict[str, int] = {}
                for info in matching:
                    for where, n in outputs.get(info.qualname, {}).items():
                        written[where] = written.get(where, 0) + n
                went = "; ".join(f"{w}: {n} items" if n else w for w, n in written.items())
                each = ", ".join(f"{i.qualname} {calls.get(i, 0)}" for i in matching)
                lines.append(
                    f"tag {pattern!r}: {ran} probe calls ran ({each}); "
                    f"output: {went or 'nothing written through ctx'}."
                )
        return lines, problems


class ProbeContext:
    """What a running probe receives as ``ctx``.

    Attributes: ``probe`` (name used in file names), ``qualname`` (module.function), ``tag``
    (the probe's tag that matched), ``step``, ``epoch``, ``rank`` and ``trainer`` (or None).
    ``output_dir`` is created on first access. The ``log_*`` helpers write at ``step`` to every
    logger of the trainer (through :mod:`lightning_inspect.backends`), else to files.

    Example:
        >>> import tempfile
        >>> ctx = ProbeContext(probe="attn", tag="attn", step=12, output_dir=tempfile.mkdtemp())
        >>> ctx.path(".npy").name, ctx.path(".npy").name, ctx.path("heads.npy").name
        ('attn_00000012_rank0.npy', 'attn_00000012_rank0_1.npy', 'attn_00000012_rank0_heads.npy')
        >>> ctx.log_text("note", "hello")  # no logger: writes attn_00000012_rank0_note.txt
    """

    __slots__ = (
        *("_dir", "_journal", "_sinks", "epoch", "probe", "qualname", "rank", "step", "tag"),
        "trainer",
    )

    def __init__(
        self,
        *,
        probe: str,
        tag: str,
        step: int = 0,
        epoch: int = 0,
        rank: int = 0,
        output_dir: str | os.PathLike[str] = "probes",
        trainer: Trainer | None = None,
        qualname: str | None = None,
        _journal: _Journal | None = None,
        _sinks: tuple[tuple[str, Any], ...] = (),
    ) -> None:
        self.probe, self.qualname, self.tag = _safe(probe), qualname or probe, tag
        self.step, self.epoch, self.rank, self.trainer = step, epoch, rank, trainer
        self._dir = Path(output_dir)
        self._journal = _journal or _Journal()
        self._sinks = _sinks

    @property
    def output_dir(self) -> Path:
        """The run's probe directory (created on first access)."""
        self._dir.mkdir(parents=True, exist_ok=True)
        self._journal.wrote(self.qualname, f"files in {self._dir}", 0)
        return self._dir

    def path(self, suffix_or_name: str = "") -> Path:
        """A new path ``{probe}_{step:08d}_rank{r}[_{name}][_{k}]{suffix}`` in ``output_dir``.

        Pass a suffix (``".png"``) or a name (``"weights.npy"``); a name already handed out in
        this run, or on disk, gets a counter (``_1``, ``_2``, ...).
        """
        directory = self.output_dir
        path = directory / self._claim(directory, suffix_or_name, "file")
        self._journal.wrote(self.qualname, f"files in {directory}")
        return path

    def _claim(self, directory: Path | None, suffix_or_name: str, namespace: str) -> str:
        if not isinstance(suffix_or_name, str) or re.search(r"[/\\]", suffix_or_name):
            raise ConfigError(
                f"ctx.path({suffix_or_name!r}): expected a file suffix such as '.png' or a name "
                "such as 'weights.npy', without directories."
            )
        base = f"{self.probe}_{self.step:08d}_rank{self.rank}"
        name = _safe(suffix_or_name) if suffix_or_name[:1] not in ("", ".") else ""
        suffix = Path(name).suffix if name else suffix_or_name
        base += f"_{name[: len(name) - len(suffix)]}" if name else ""
        return self._journal.claim(directory, base, suffix, namespace)

    def _sink(self, name: str) -> Any:
        return next((sink for _, sink in self._sinks if sink.name == name), None)

    @property
    def tensorboard(self) -> Any:
        """The ``SummaryWriter`` of the trainer's TensorBoard logger (rank 0), else None."""
        sink = self._sink("tensorboard")
        return None if sink is None else sink.inner.writer

    @property
    def mlflow(self) -> tuple[Any, str] | None:
        """``(MlflowClient, run_id)`` of the trainer's MLflow logger (rank 0), else None."""
        sink = self._sink("mlflow")
        if sink is None:
            return None
        client = sink.run.writer.client
        return getattr(client, "client", client), sink.run.writer.run_id

    def _send(self, kind: str, name: str, value: Any) -> bool:
        """``value`` to every logger's sink at ``step``; False when there is none."""
        for where, sink in self._sinks:
            key = f"probes/{self.probe}/{name}"
            if kind == "histograms":
                sink.log_histograms({key: value}, self.step)
                self._journal.wrote(self.qualname, where)
                continue
            if sink.name == "mlflow":  # an artifact per key: the step goes into its name
                key = "probes/" + self._claim(None, _safe(name), kind)
            getattr(sink, f"log_{kind}")(key, value, self.step)
            self._journal.wrote(self.qualname, where)
        return bool(self._sinks)

    def log_text(self, name: str, text: str) -> None:
        """Log ``text`` at the current step to every logger, else to a ``.txt`` file."""
        if not self._send("text", name, text):
            self.path(_safe(name) + ".txt").write_text(text, encoding="utf-8")

    def log_image(self, name: str, image: Any, *, dataformats: str | None = None) -> None:
        """Log an image (HW, HWC or CHW; float in [0, 1], uint8 or bool) at the current step.

        The layout is HWC when the last axis has 1, 3 or 4 entries, else CHW when the first
        has; ``dataformats="CHW"``/``"HWC"`` decides explicitly. Without a logger: a ``.png``.

        Example:
            >>> import numpy as np, tempfile
            >>> ctx = ProbeContext(probe="p", tag="t", output_dir=tempfile.mkdtemp())
            >>> ctx.log_image("mask", np.zeros((8, 8, 3)))
        """
        array = _rgb_uint8(image, dataformats)
        if not self._send("image", name, array):
            path = self.path(_safe(name) + ".png")
            try:
                from PIL import Image
            except ImportError:  # no Pillow: keep the pixels
                import numpy as np

                np.save(path.with_suffix(".npy"), array)
                return
            Image.fromarray(array).save(path)

    def log_figure(self, name: str, figure: Any, *, close: bool = True) -> None:
        """Log a matplotlib figure as an image; closes it afterwards unless ``close=False``."""
        import numpy as np
        from matplotlib.backends.backend_agg import FigureCanvasAgg

        try:
            canvas = FigureCanvasAgg(figure)
            canvas.draw()
            self.log_image(name, np.asarray(canvas.buffer_rgba()))
        finally:
            if close and "matplotlib.pyplot" in sys.modules:
                sys.modules["matplotlib.pyplot"].close(figure)

    def log_histogram(self, name: str, values: Any, *, bins: int = 64) -> None:
        """Log a histogram of ``values`` (a tensor or array) at the current step.

        Binned on the values' device over the finite values (NaN/Inf are counted apart, and a
        tensor without a finite value logs nothing). Without a logger: a ``.json`` with edges,
        counts and the NaN/Inf counts.

        Example:
            >>> import tempfile, torch
            >>> ctx = ProbeContext(probe="p", tag="t", output_dir=tempfile.mkdtemp())
            >>> ctx.log_histogram("w", torch.randn(100))
        """
        import torch

        from lightning_inspect.core.stats import histogram, reduce_tensor, summarise

        check_positive_int("ctx.log_histogram", "bins", bins)
        row = reduce_tensor(torch.as_tensor(values), bins).cpu().numpy()
        hist = histogram(row)
        if self._sinks:
            if hist is not None:
                self._send("histograms", name, hist)
            return
        data: dict[str, Any] = {"num": 0, "edges": [], "counts": []}
        if hist is not None:
            data = {k: getattr(hist, k) for k in ("min", "max", "num", "sum", "sum_squares")}
            data.update(edges=hist.edges.tolist(), counts=hist.counts.tolist())
        nonfinite = summarise(row, ("nan_count", "inf_count")).values()
        data["nan"], data["inf"] = (int(n) for n in nonfinite)
        self.path(_safe(name) + ".json").write_text(json.dumps(data), encoding="utf-8")


def _rgb_uint8(image: Any, dataformats: str | None) -> np.ndarray:
    """An HW, HWC or CHW image (tensor or array) as a height x width x 3 uint8 array."""
    import numpy as np

    if hasattr(image, "detach"):  # a tensor, without importing torch
        image = image.detach().cpu()
        image = (image.float() if image.is_floating_point() else image).numpy()
    array = np.asarray(image)
    layout = "HWC" if array.ndim == 2 else dataformats
    array = array[:, :, None] if array.ndim == 2 else array
    if array.ndim == 3 and layout is None:
        layout = "HWC" if array.shape[-1] in (1, 3, 4) else "CHW"
    if (
        array.ndim != 3
        or layout not in ("HWC", "CHW")
        or array.shape[layout.index("C")] not in (1, 3, 4)
    ):
        raise ConfigError(
            f"ctx.log_image(image of shape {np.shape(image)}, dataformats={dataformats!r}): "
            "expected HW, HWC or CHW with 1, 3 or 4 channels; pass dataformats='HWC' or 'CHW'."
        )
    array = array.transpose(1, 2, 0) if layout == "CHW" else array
    if np.issubdtype(array.dtype, np.floating):
        array = np.nan_to_num(array.astype(np.float32), nan=0.0, posinf=1.0, neginf=0.0)
        array = np.clip(array, 0.0, 1.0) * 255.0 + 0.5
    elif array.dtype == np.bool_:
        array = array * 255
    array = np.clip(array, 0, 255).astype(np.uint8)
    rgb = np.repeat(array, 3, axis=2) if array.shape[2] == 1 else array[:, :, :3]
    return np.ascontiguousarray(rgb)


@dataclass(frozen=True, eq=False)
class _ProbeInfo:
    func: Callable[..., Any]
    tags: tuple[str, ...]
    name: str
    qualname: str
    wants_ctx: bool


#: Every probe decorated in this process (for the report: which tags exist); weak references.
_REGISTRY: weakref.WeakSet[_ProbeInfo] = weakref.WeakSet()


def _wants_ctx(call: str, func: Callable[..., Any]) -> bool:
    try:
        parameter = inspect.signature(func).parameters.get("ctx")
    except (TypeError, ValueError):
        return False
    if parameter is not None and parameter.kind not in (
        parameter.POSITIONAL_OR_KEYWORD,
        parameter.KEYWORD_ONLY,
    ):
        raise ConfigError(
            f"{call}: the probe's ctx parameter is {parameter.kind.description}; declare it as "
            "keyword-only, e.g. def show(weights, *, ctx): ..."
        )
    return parameter is not None


def _run_probe(info: _ProbeInfo, run: _Run, tag: str, args: Any, kwargs: dict[str, Any]) -> Any:
    """The on path: rank rule, disabled check, context injection, error containment."""
    journal = run.journal
    rank = run.current_rank()
    if info in journal.disabled or (run.ranks == "zero" and rank != 0):
        return None
    with journal.lock:
        journal.calls[info] = journal.calls.get(info, 0) + 1
    try:
        if info.wants_ctx:
            if "ctx" in kwargs:
                raise TypeError(
                    f"{info.qualname}() got ctx from its caller; ctx is supplied by "
                    "lightning_inspect while the probe is on"
                )
            kwargs["ctx"] = run.context(info.name, info.qualname, tag, rank)
        return info.func(*args, **kwargs)
    except Exception as exc:
        if run.on_error == "raise":
            raise
        with journal.lock:
            first = info not in journal.disabled
            journal.disabled.add(info)
        if first:
            frame = traceback.extract_tb(exc.__traceback__)[-1]
            warnings.warn(
                f"Probe {info.qualname} (tag {tag!r}) raised {type(exc).__name__}: {exc} at "
                f"{frame.filename}:{frame.lineno}. It is switched off for the rest of this run; "
                "pass on_error='raise' to ProbeSwitch or probing() to stop on probe errors.",
                ProbeWarning,
                stacklevel=3,
            )
        return None


def probe(
    *tags: str, name: str | None = None
) -> Callable[[Callable[..., R]], Callable[..., R | None]]:
    """Decorate an inspection function so that it runs only while one of ``tags`` is on.

    The call site stays a plain call and returns None while off. A parameter named ``ctx``
    receives a :class:`ProbeContext` while on; callers never pass it. ``name`` (default: the
    function's name) is used in file names.

    Example:
        >>> @probe("attention", "encoder.features")
        ... def show_attention(weights, *, ctx):
        ...     ctx.log_text("shape", str(len(weights)))
        >>> show_attention([0.1, 0.9]) is None  # nothing switched on
        True
    """
    call = "probe(" + ", ".join([*map(repr, tags), *([f"name={name!r}"] if name else [])]) + ")"
    checked = check_tags(call, tags, patterns=False)
    if not checked:
        raise ConfigError(f"{call}: a probe needs at least one tag, e.g. @probe('attention').")
    if name is not None and (not isinstance(name, str) or _safe(name) != name):
        raise ConfigError(f"{call}: name must be letters, digits, '_', '.' or '-'; got {name!r}.")

    def decorate(func: Callable[..., R]) -> Callable[..., R | None]:
        if inspect.iscoroutinefunction(func) or inspect.isasyncgenfunction(func):
            raise ConfigError(
                f"{call}: {func.__qualname__!r} is an async function; probes must be plain "
                "functions (call them from async code as usual)."
            )
        qualname = f"{getattr(func, '__module__', '?')}.{getattr(func, '__qualname__', func)}"
        own = name or _safe(getattr(func, "__name__", "probe"))
        info = _ProbeInfo(func, checked, own, qualname, _wants_ctx(call, func))
        _REGISTRY.add(info)
        cache: tuple[_Run | None, str | None] = (None, None)

        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> R | None:
            nonlocal cache
            state = _STATE.get(None) or _default_state
            if not state.active:
                return None
            seen = cache  # one read: the pair stays consistent across threads
            if seen[0] is not state.run:
                match = next((t for t in info.tags if state.run.matches(t)), None)
                seen = cache = (state.run, match)
            if seen[1] is None:
                return None
            return _run_probe(info, state.run, seen[1], args, kwargs)  # type: ignore[no-any-return]

        return wrapper

    return decorate


def _check_query(owner: str, tag: Any) -> None:
    if not isinstance(tag, str) or not tag:
        raise ConfigError(f"{owner}(tag={tag!r}): expected a non-empty tag such as 'attention'.")


def enabled(tag: str) -> bool:
    """Whether a probe tagged ``tag`` would run here and now (for ``if`` blocks).

    Example:
        >>> enabled("attention")
        False
        >>> with probing("attention", output_dir="probes-doctest"):
        ...     enabled("attention"), enabled("attention.heads"), enabled("loss")
        (True, True, False)
    """
    _check_query("enabled", tag)
    state = _current()
    run = state.run
    return state.active and run.matches(tag) and (run.ranks == "all" or run.current_rank() == 0)


def current_context(tag: str, *, name: str | None = None) -> ProbeContext | None:
    """A :class:`ProbeContext` for ``tag`` when it is on here and now, else None; ``name``
    (default: the tag) is used in file names.

    Example:
        >>> with probing("attention", output_dir="probes-doctest"):
        ...     current_context("attention").tag
        'attention'
    """
    _check_query("current_context", tag)
    if not enabled(tag):
        return None
    run = _current().run
    return run.context(_safe(name or tag), name or tag, tag, run.current_rank())


class probing(_Switch):
    """Switch tags on inside a ``with`` block (notebooks, tests, scripts).

    Patterns are added to whatever is on. ``output_dir`` defaults to the enclosing switch's
    directory, else ``<hydra run dir>/probes``, else ``./probes``; ``rank`` overrides the
    detected global rank, ``step`` the step. ``with`` yields the output directory.

    Example:
        >>> @probe("encoder.features")
        ... def count(*, ctx):
        ...     return ctx.tag
        >>> with probing("encoder", output_dir="probes-doctest") as out:
        ...     count()
        'encoder.features'
    """

    def __init__(
        self,
        *tags: str,
        output_dir: str | os.PathLike[str] | None = None,
        ranks: str = "zero",
        on_error: str = "disable",
        rank: int | None = None,
        step: int | None = None,
    ) -> None:
        call = "probing(" + ", ".join(map(repr, tags)) + ")"
        patterns = check_tags(call, tags, patterns=True)
        if not patterns:
            raise ConfigError(
                f"{call}: give at least one tag pattern, e.g. probing('attention') or "
                "probing('*') for every probe."
            )
        super().__init__(
            patterns,
            output_dir=check_output_dir("probing", output_dir),
            ranks=check_choice("probing", "ranks", ranks, RANKS),
            on_error=check_choice("probing", "on_error", on_error, ON_ERROR),
            rank=check_optional_int("probing", "rank", rank),
            step=check_optional_int("probing", "step", step),
        )

    def __enter__(self) -> Path:
        if not self.closed:
            raise RuntimeError("probing(...) blocks cannot be re-entered while open")
        return self.open().run.directory()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

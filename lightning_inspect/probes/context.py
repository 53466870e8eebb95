"""Probes: a user's own inspection code that runs only while one of its tags is switched on (by
``ProbeSwitch``, ``LIGHTNING_INSPECT`` or :func:`probing`; the state is in a ContextVar)."""

from __future__ import annotations

import contextvars
import functools
import importlib
import inspect
import json
import os
import re
import sys
import threading
import traceback
import warnings
import weakref
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from lightning_inspect import _validation as check
from lightning_inspect.core.stats import histogram, reduce_tensor, summarise
from lightning_inspect.errors import ConfigError

R = TypeVar("R")
ENV_VAR = "LIGHTNING_INSPECT"  #: comma-separated tag patterns switched on for the process
RANKS = ("zero", "all")  #: run probes on global rank 0 only, or on every rank
ON_ERROR = ("disable", "raise")  #: warn once and switch the probe off, or re-raise
_RANK_VARS = ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")
_LOCK = threading.Lock()  # file and artifact names handed out


class ProbeWarning(UserWarning):
    """A probe raised and was switched off for the rest of the run."""


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.\-]+", "_", text).strip(".") or "probe"


def check_tags(owner: str, values: Any, patterns: bool) -> tuple[str, ...]:  # of probe, switch
    kind = "tag pattern" if patterns else "tag"
    values = (values.split(",") if patterns else [values]) if isinstance(values, str) else values
    if not isinstance(values, Iterable):
        got = f"{values!r} ({type(values).__name__})"
        raise ConfigError(f"{owner}: expected a list of {kind}s such as ['attention']; got {got}.")
    values = [v.strip() if patterns and isinstance(v, str) else v for v in values]
    for v in values:
        if not isinstance(v, str):
            how = ": write @probe('attention'), with a tag" if callable(v) else ""
            got = f"{v!r} ({type(v).__name__})"
            raise ConfigError(f"{owner}: tags must be strings such as 'attention'{how}; got {got}.")
        if not v or re.search(r"[\s,]" if patterns else r"[\s,*?\[\]]", v):
            what = "or a comma" if patterns else "a comma or a glob (globs go in switches)"
            use = "dotted names such as 'attention'" + (" or globs" if patterns else "")
            bad = f"{v!r}, an empty {kind} or one with whitespace, {what}"
            raise ConfigError(f"{owner}: tags holds {bad}; use {use}.")
    return tuple(values)


def tag_matches(pattern: str, tag: str) -> bool:
    """Whether switch ``pattern`` switches on probe ``tag`` (glob plus hierarchy).

    Example:
        >>> tag_matches("model", "model.attention"), tag_matches("model.*", "model")
        (True, False)
    """
    return fnmatchcase(tag, pattern) or fnmatchcase(tag, pattern + ".*")


def hydra_output_dir() -> Path | None:  # <hydra run dir>/probes in a Hydra app; never imports it
    try:
        hydra = sys.modules["hydra.core.hydra_config"].HydraConfig
        return Path(hydra.get().runtime.output_dir) / "probes"
    except Exception:  # no Hydra app running (or a half-initialised one)
        return None


class _Switch:
    """Adds tag patterns to what is on in this context (``with`` block, or open to close) and
    holds the run: settings (None: inherited from the switch below) and the report's counts."""

    trainer: Any = None
    sinks: tuple[tuple[str, Any], ...] = ()  # (destination, backend sink) of the loggers

    def __init__(self, owner: str, tags: Any, **options: Any) -> None:
        output_dir, get = options.get("output_dir"), options.get
        self.tags = check_tags(f"{owner}(tags={tags!r})", tags or (), patterns=True)
        if not isinstance(output_dir, (str, os.PathLike, type(None))):
            raise ConfigError(f"{owner}(output_dir={output_dir!r}): expected a path or None.")
        self.output_dir = Path(output_dir) if output_dir is not None else None  # None: inherited
        self.ranks = check.check_choice(owner, "ranks", get("ranks", "zero"), RANKS)
        self.on_error = check.check_choice(owner, "on_error", get("on_error", "disable"), ON_ERROR)
        self.rank = check.check_optional_int(owner, "rank", get("rank"))  # None: detected
        self.step = check.check_optional_int(owner, "step", get("step"))  # None: the trainer's
        self.given = {"output_dir": self.output_dir}
        self.on, self.closed, self.gate_open = frozenset(self.tags), True, True
        self.active = self.may_run = bool(self.on)
        self._fresh()

    def _fresh(self) -> None:
        self.issued, self.disabled = set[str](), set[Any]()  # names handed out, probes off
        self.calls, self.written = Counter[Any](), Counter[tuple[str, str]]()  # (qualname, where)

    def open(self, **run: Any) -> _Switch:
        self._fresh()
        self.outer = _STATE.get(None)
        below = self.outer or _default
        own = {k: v for k, v in {**self.given, **run}.items() if v is not None}
        inherited = ("output_dir", "trainer", "sinks")
        self.__dict__.update({k: getattr(below, k) for k in inherited} | own)
        self.on = frozenset(self.tags) | (below.on if below.active else frozenset())
        self.may_run = bool(self.on) and (self.rank in (None, 0) or self.ranks == "all")
        self.closed, self.active = False, self.may_run and self.gate_open
        _STATE.set(self)
        return self

    def gate(self, on: bool) -> None:
        self.gate_open, self.active = on, self.may_run and on

    def close(self) -> None:
        if not self.closed and _STATE.get(None) is self:  # else the one above restores past it
            bottom = self
            while bottom.outer is not None and bottom.outer.closed:
                bottom = bottom.outer
            _STATE.set(bottom.outer)
        self.closed = True

    def __enter__(self) -> Path:
        if not self.closed:
            raise RuntimeError("probing(...) blocks cannot be re-entered while open")
        return self.open().output_dir or hydra_output_dir() or Path("probes")

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def current_rank(self) -> int:  # given, the trainer's, else the launcher's (RANK, ...)
        if self.rank is not None or self.trainer is not None:
            return self.rank if self.rank is not None else int(self.trainer.global_rank)
        return next((int(v) for v in map(os.environ.get, _RANK_VARS) if v and v.isdigit()), 0)

    def claim(self, directory: Path | None, base: str, suffix: str, namespace: str) -> str:
        with _LOCK:
            for name in (f"{base}_{k}{suffix}" if k else base + suffix for k in range(1 << 62)):
                key = f"{namespace}:{directory}/{name}"
                if key not in self.issued and not (directory and (directory / name).exists()):
                    self.issued.add(key)
                    return name
        raise AssertionError  # unreachable

    def context(self, probe: str, qualname: str, tag: str, rank: int) -> ProbeContext:
        t, step = self.trainer, self.step
        step = step if step is not None else int(t.global_step) if t is not None else 0
        epoch = int(t.current_epoch) if t is not None else 0
        out = self.output_dir or hydra_output_dir() or Path("probes")
        args = dict(step=step, epoch=epoch, rank=rank, output_dir=out, trainer=t)
        return ProbeContext(probe=probe, tag=tag, qualname=qualname, _run=self, **args)

    def report(self) -> list[tuple[bool, str]]:
        """Per pattern that was on: (True, what ran and where it wrote) or (False, problem)."""
        calls, written = Counter(self.calls), Counter(self.written)
        probes, out = set(_REGISTRY) | set(calls), []
        known = sorted({tag for info in probes for tag in info.tags})
        for pattern in sorted(self.on):
            found = [i for i in probes if any(tag_matches(pattern, t) for t in i.tags)]
            names = sorted(i.qualname for i in found)
            went = sum((Counter({w: n}) for (q, w), n in written.items() if q in names), Counter())
            went_to = "; ".join(f"{w}: {n} items" for w, n in went.items()) or "none"
            each = ", ".join(sorted(f"{i.qualname} {calls[i]}" for i in found))
            ran = sum(calls[i] for i in found)
            text = f"tag {pattern!r}: {ran} probe calls ran ({each}); output: {went_to}."
            if not found:
                text = f"tag pattern {pattern!r} matches no registered probe, so nothing ran for it. Known probe tags: {', '.join(known) or 'none'}."
                text += check.suggestion(pattern, known)
            elif not ran:
                text = f"tag pattern {pattern!r} switches on {', '.join(names)}, but no call of it ran (none came on a step that was due), so nothing was written for it."
            out.append((bool(ran), text))
        return out


def reload_env() -> tuple[str, ...]:
    """Re-read ``LIGHTNING_INSPECT`` (read at import) and return the patterns it switches on.

    Example:
        >>> reload_env()  # LIGHTNING_INSPECT unset
        ()
    """
    global _default
    _default = _Switch(ENV_VAR, ())
    _default.on = frozenset(p.strip() for p in os.environ.get(ENV_VAR, "").split(",") if p.strip())
    _default.active = bool(_default.on)
    return tuple(sorted(_default.on))


#: The switch on top in this context; None (or unset): the environment's, re-read by reload_env().
_STATE: contextvars.ContextVar[_Switch | None] = contextvars.ContextVar("lightning_inspect.probes")
_default: _Switch
reload_env()


class ProbeContext:
    """What a running probe receives as ``ctx``: ``probe`` (its name in file names), ``qualname``,
    ``tag`` (the one that matched), ``step``, ``epoch``, ``rank``, ``trainer``, ``output_dir``
    (made on first access); ``log_*`` write to every logger of the trainer, else to files.

    Example:
        >>> import tempfile
        >>> ctx = ProbeContext(probe="attn", tag="attn", step=12, output_dir=tempfile.mkdtemp())
        >>> ctx.path(".npy").name, ctx.path(".npy").name, ctx.path("heads.npy").name
        ('attn_00000012_rank0.npy', 'attn_00000012_rank0_1.npy', 'attn_00000012_rank0_heads.npy')
    """

    def __init__(
        self,
        *,
        probe: str,
        tag: str,
        step: int = 0,
        epoch: int = 0,
        rank: int = 0,
        output_dir: str | os.PathLike[str] = "probes",
        trainer: Any = None,
        qualname: str | None = None,
        _run: _Switch | None = None,
    ) -> None:
        self.probe, self.qualname, self.tag = _safe(probe), qualname or probe, tag
        self.step, self.epoch, self.rank, self.trainer = step, epoch, rank, trainer
        self._dir, self._run = Path(output_dir), _run or _Switch("ProbeContext", ())
        self._sinks = self._run.sinks if rank == 0 else ()  # Lightning's loggers: rank 0 only

    @property
    def output_dir(self) -> Path:
        self._dir.mkdir(parents=True, exist_ok=True)
        return self._dir

    def path(self, suffix_or_name: str = "") -> Path:
        """A new path ``{probe}_{step:08d}_rank{r}[_{name}][_{k}]{suffix}`` in ``output_dir``
        for a suffix (``".png"``) or a name (``"weights.npy"``), never one used before."""
        directory = self.output_dir
        self._run.written[(self.qualname, f"files in {directory}")] += 1
        return directory / self._claim(directory, suffix_or_name, "file")

    def _claim(self, directory: Path | None, suffix_or_name: str, namespace: str) -> str:
        if not isinstance(suffix_or_name, str) or re.search(r"[/\\]", suffix_or_name):
            raise ConfigError(
                f"ctx.path({suffix_or_name!r}): expected a suffix such as '.png' or a file name "
                "such as 'weights.npy', without directories."
            )
        name = _safe(suffix_or_name) if suffix_or_name[:1] not in ("", ".") else ""
        suffix = Path(name).suffix if name else suffix_or_name
        base = f"{self.probe}_{self.step:08d}_rank{self.rank}"
        base += f"_{name[: len(name) - len(suffix)]}" if name else ""
        return self._run.claim(directory, base, suffix, namespace)

    @property
    def tensorboard(self) -> Any:
        """The trainer's TensorBoard ``SummaryWriter`` (rank 0), else None."""
        return next((s.inner.writer for _, s in self._sinks if s.name == "tensorboard"), None)

    @property
    def mlflow(self) -> tuple[Any, str] | None:
        """``(MlflowClient, run_id)`` of the trainer's MLflow run (rank 0), else None."""
        run = next((s.run.writer for _, s in self._sinks if s.name == "mlflow"), None)
        return None if run is None else (getattr(run.client, "client", run.client), run.run_id)

    def _log(self, kind: str, name: str, value: Any, suffix: str, save: Callable[..., Any]) -> None:
        for where, sink in self._sinks if value is not None else ():
            key = f"probes/{self.probe}/{name}"
            if kind == "histograms":
                sink.log_histograms({key: value}, self.step)
            else:
                if sink.name == "mlflow":  # an artifact per key: the step goes into its name
                    key = "probes/" + self._claim(None, _safe(name), kind)
                getattr(sink, f"log_{kind}")(key, value, self.step)
            self._run.written[(self.qualname, where)] += 1
        if not self._sinks:
            save(self.path(_safe(name) + suffix))

    def log_text(self, name: str, text: str) -> None:
        """Log ``text`` at the current step (file: ``.txt``)."""
        self._log("text", name, text, ".txt", lambda p: p.write_text(text, encoding="utf-8"))

    def log_image(self, name: str, image: Any, *, dataformats: str | None = None) -> None:
        """Log an HW, HWC or CHW image (float in [0, 1], uint8, bool; HWC when the last axis has
        1, 3 or 4 entries, unless ``dataformats`` says) as HxWx3 uint8 (file: ``.png``)."""
        if isinstance(image, torch.Tensor):
            image = image.detach().cpu()
            image = (image.float() if image.is_floating_point() else image).numpy()
        array = np.asarray(image)
        array, layout = (array[:, :, None], "HWC") if array.ndim == 2 else (array, dataformats)
        if array.ndim == 3 and layout is None:
            layout = "HWC" if array.shape[-1] in (1, 3, 4) else "CHW"
        ok = array.ndim == 3 and layout in ("HWC", "CHW")
        if not ok or array.shape[str(layout).find("C")] not in (1, 3, 4):
            raise ConfigError(
                f"ctx.log_image(image of shape {np.shape(image)}, dataformats={dataformats!r}): "
                "expected HW, HWC or CHW with 1, 3 or 4 channels; pass dataformats='HWC' or 'CHW'."
            )
        array = array.transpose(1, 2, 0) if layout == "CHW" else array
        if np.issubdtype(array.dtype, np.floating):
            array = np.clip(np.nan_to_num(array, posinf=1.0), 0.0, 1.0) * 255 + 0.5
        array = np.clip(array * (255 if array.dtype == np.bool_ else 1), 0, 255).astype(np.uint8)
        rgb = array[..., [0, 0, 0] if array.shape[2] == 1 else [0, 1, 2]]  # a contiguous copy
        pil = importlib.import_module  # Pillow only when a file is written
        self._log("image", name, rgb, ".png", lambda p: pil("PIL.Image").fromarray(rgb).save(p))

    def log_figure(self, name: str, figure: Any, *, close: bool = True) -> None:
        """Log a matplotlib figure as an image; closes it afterwards unless ``close=False``."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg

        try:
            (canvas := FigureCanvasAgg(figure)).draw()
            self.log_image(name, canvas.buffer_rgba())
        finally:
            if close and "matplotlib.pyplot" in sys.modules:
                sys.modules["matplotlib.pyplot"].close(figure)

    def log_histogram(self, name: str, values: Any, *, bins: int = 64) -> None:
        """Log a histogram of the finite ``values`` (file: ``.json`` with NaN/Inf counts)."""
        check.check_positive_int("ctx.log_histogram", "bins", bins)
        row = reduce_tensor(torch.as_tensor(values), bins).cpu().numpy()
        hist = histogram(row)
        data = {"num": 0, "edges": [], "counts": []} if hist is None else asdict(hist)
        data = {k: v.tolist() if hasattr(v, "tolist") else v for k, v in data.items()}
        nan, inf = summarise(row, ("nan_count", "inf_count")).values()
        data.update(nan=int(nan), inf=int(inf))
        self._log("histograms", name, hist, ".json", lambda p: p.write_text(json.dumps(data)))


class _ProbeInfo:  # one decorated probe; hashed by identity
    def __init__(self, tags: tuple[str, ...], name: str, qualname: str, wants_ctx: bool) -> None:
        self.tags, self.name, self.qualname, self.wants_ctx = tags, name, qualname, wants_ctx


#: Every probe decorated in this process (for the report: which tags exist); weak references.
_REGISTRY: weakref.WeakSet[_ProbeInfo] = weakref.WeakSet()


def probe(
    *tags: str, name: str | None = None
) -> Callable[[Callable[..., R]], Callable[..., R | None]]:
    """Run the decorated function only while one of ``tags`` is on (else return None), passing a
    :class:`ProbeContext` to a parameter named ``ctx``; ``name`` is used in file names.

    Example:
        >>> @probe("attention")
        ... def show_attention(weights, *, ctx):
        ...     return ctx.tag
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
        ctx = inspect.signature(func).parameters.get("ctx")
        if inspect.iscoroutinefunction(func) or inspect.isasyncgenfunction(func):
            raise ConfigError(f"{call}: {func.__qualname__} is async; probes are plain functions.")
        if ctx is not None and ctx.kind not in (ctx.POSITIONAL_OR_KEYWORD, ctx.KEYWORD_ONLY):
            raise ConfigError(f"{call}: ctx is {ctx.kind.description}; make it keyword-only.")
        qualname = f"{func.__module__}.{func.__qualname__}"
        info = _ProbeInfo(checked, name or _safe(func.__name__), qualname, ctx is not None)
        _REGISTRY.add(info)
        cache: tuple[frozenset[str] | None, str | None] = (None, None)

        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> R | None:
            nonlocal cache
            switch = _STATE.get(None) or _default
            if not switch.active:
                return None
            seen, on = cache, switch.on  # one read: the pair stays consistent across threads
            if seen[0] is not on:  # the tag match, computed once per set of patterns
                hit = next((t for t in info.tags for p in on if tag_matches(p, t)), None)
                seen = cache = (on, hit)
            rank = switch.current_rank() if seen[1] is not None else 0
            if seen[1] is None or info in switch.disabled or (switch.ranks == "zero" and rank):
                return None
            switch.calls[info] += 1
            try:
                if info.wants_ctx and "ctx" in kwargs:
                    raise TypeError(
                        f"{qualname} got ctx from its caller; ctx is supplied by lightning_inspect"
                    )
                if info.wants_ctx:
                    kwargs["ctx"] = switch.context(info.name, qualname, seen[1], rank)
                return func(*args, **kwargs)
            except Exception as exc:
                if switch.on_error == "raise":
                    raise
                if info not in switch.disabled:
                    at = traceback.extract_tb(exc.__traceback__)[-1]
                    what = f"{qualname} (tag {seen[1]!r}) raised {type(exc).__name__}: {exc}"
                    msg = f"Probe {what} at {at.filename}:{at.lineno}. It is switched off for the rest of this run; on_error='raise' stops."
                    warnings.warn(msg, ProbeWarning, 2)
                switch.disabled.add(info)
                return None

        return wrapper

    return decorate


def enabled(tag: str) -> bool:
    """Whether a probe tagged ``tag`` would run here and now (for ``if`` blocks).

    Example:
        >>> enabled("attention")
        False
    """
    if not isinstance(tag, str) or not tag:
        raise ConfigError(f"enabled(tag={tag!r}): expected a non-empty tag such as 'attention'.")
    run = _STATE.get(None) or _default
    on = run.active and any(tag_matches(p, tag) for p in run.on)
    return on and (run.ranks == "all" or run.current_rank() == 0)


def current_context(tag: str, *, name: str | None = None) -> ProbeContext | None:
    """A :class:`ProbeContext` for ``tag`` (named ``name``) when it is on here and now, else None.

    Example:
        >>> current_context("attention") is None
        True
    """
    run, on = _STATE.get(None) or _default, enabled(tag)
    return run.context(_safe(name or tag), name or tag, tag, run.current_rank()) if on else None


def probing(
    *tags: str,
    output_dir: str | os.PathLike[str] | None = None,
    ranks: str = "zero",
    on_error: str = "disable",
    rank: int | None = None,
    step: int | None = None,
) -> _Switch:
    """Switch tags on inside a ``with`` block (notebooks, tests, scripts), on top of whatever is
    on; ``with`` yields the output directory (default: the enclosing switch's, else ``<hydra run
    dir>/probes``, else ``./probes``). ``rank`` overrides the detected rank, ``step`` the step.

    Example:
        >>> with probing("attention", output_dir="probes-doctest"):
        ...     enabled("attention"), enabled("attention.heads"), enabled("loss")
        (True, True, False)
    """
    if not tags:
        raise ConfigError("probing(): give at least one tag pattern, e.g. probing('attention').")
    options = dict(output_dir=output_dir, ranks=ranks, on_error=on_error, rank=rank, step=step)
    return _Switch("probing", tags, **options)

"""Probes: tagged inspection code that runs only while one of its tags is switched on.

A probe is a user's own function decorated with :func:`probe`. Its call site stays a plain
call. While none of its tags is switched on, the call returns ``None`` at once and the body never
runs. While one is on, the function runs and, if it declares a parameter named ``ctx``, receives a
:class:`ProbeContext` (step, epoch, rank, output directory, TensorBoard/MLflow handles) without
the caller passing it.

Tags are switched on by any of: :class:`~lightning_inspect.probes.switch.ProbeSwitch` (the
Hydra option ``+inspect=probes``), the environment variable ``LIGHTNING_INSPECT`` (comma-separated
tag patterns) or the context manager :func:`probing`. The switched-on state lives in a
:class:`contextvars.ContextVar`, so threads and asyncio tasks do not see each other's switches.

Example:
    >>> from lightning_inspect.probes.context import probe, probing
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
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

from lightning_inspect._validation import suggestion
from lightning_inspect.errors import ConfigError

if TYPE_CHECKING:
    import numpy as np
    from lightning.pytorch import Trainer
    from mlflow import MlflowClient
    from torch.utils.tensorboard import SummaryWriter

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

ENV_VAR = "LIGHTNING_INSPECT"
"""Name of the environment variable holding comma-separated tag patterns to switch on."""

RANKS = ("zero", "all")
"""Allowed values of ``ranks``: run probes on global rank 0 only, or on every rank."""

ON_ERROR = ("disable", "raise")
"""Allowed values of ``on_error``: warn once and switch the probe off, or re-raise."""

_RANK_ENV_VARS = ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")
_UNSAFE = re.compile(r"[^A-Za-z0-9_.\-]+")
_TAG_FORBIDDEN = re.compile(r"[\s,*?\[\]]")
_PATTERN_FORBIDDEN = re.compile(r"[\s,]")


class ProbeWarning(UserWarning):
    """A probe raised and was switched off for the rest of the run."""


# --------------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------------


def _check_choice(call: str, argument: str, value: object, allowed: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in allowed:
        choices = ", ".join(repr(a) for a in allowed)
        raise ConfigError(f"{call}: {argument} must be one of {choices}; got {value!r}.")
    return value


def _check_patterns(call: str, argument: str, values: object) -> tuple[str, ...]:
    """Validate switch-side tag patterns; a string is split on commas like the env variable."""
    if values is None:
        return ()
    if isinstance(values, str):
        values = values.split(",")
    if not isinstance(values, Iterable):
        raise ConfigError(
            f"{call}: {argument} must be a list of tag patterns such as "
            f"['attention', 'encoder.*']; got {values!r} ({type(values).__name__})."
        )
    patterns: list[str] = []
    for value in values:
        if not isinstance(value, str):
            raise ConfigError(
                f"{call}: every entry of {argument} must be a string tag pattern such as "
                f"'attention' or 'encoder.*'; got {value!r} ({type(value).__name__})."
            )
        value = value.strip()
        if not value:
            raise ConfigError(
                f"{call}: {argument} contains an empty tag pattern; use a name such as "
                f"'attention', a glob such as 'encoder.*', or '*' for every probe."
            )
        if _PATTERN_FORBIDDEN.search(value):
            raise ConfigError(
                f"{call}: tag pattern {value!r} in {argument} contains whitespace or a comma; "
                f"give one pattern per entry, e.g. ['attention', 'encoder.*']."
            )
        patterns.append(value)
    return tuple(patterns)


def _check_tag_names(call: str, tags: tuple[object, ...]) -> tuple[str, ...]:
    """Validate probe-side tags: concrete dotted names, no globs."""
    if not tags:
        raise ConfigError(
            f"{call}: a probe needs at least one tag, e.g. @probe('attention'); got none."
        )
    for tag in tags:
        if callable(tag) and not isinstance(tag, str):
            raise ConfigError(
                f"{call}: probe takes tag strings, so write @probe('attention') with "
                f"parentheses and a tag; got the function {getattr(tag, '__name__', tag)!r}."
            )
        if not isinstance(tag, str):
            raise ConfigError(
                f"{call}: every tag must be a string such as 'attention' or 'encoder.features'; "
                f"got {tag!r} ({type(tag).__name__})."
            )
        if not tag:
            raise ConfigError(
                f"{call}: got an empty tag; use a dotted name such as 'attention' or "
                f"'encoder.features'."
            )
        if _TAG_FORBIDDEN.search(tag):
            raise ConfigError(
                f"{call}: tag {tag!r} contains whitespace, a comma or a glob character "
                f"(* ? [ ]); a probe's tags are plain dotted names such as 'encoder.features' "
                f"(globs belong in the switches)."
            )
    return tuple(str(t) for t in tags)


def _check_rank(call: str, rank: object) -> int | None:
    if rank is None:
        return None
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
        raise ConfigError(f"{call}: rank must be None or an int >= 0; got {rank!r}.")
    return rank


def _check_step(call: str, step: object) -> int | None:
    if step is None:
        return None
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ConfigError(f"{call}: step must be None or an int >= 0; got {step!r}.")
    return step


def _safe(text: str) -> str:
    """A file-name-safe version of ``text`` (letters, digits, ``_ . -``)."""
    cleaned = _UNSAFE.sub("_", text).strip(".")
    return cleaned or "probe"


# --------------------------------------------------------------------------------------------
# State: what is switched on, held in a ContextVar
# --------------------------------------------------------------------------------------------


def tag_matches(pattern: str, tag: str) -> bool:
    """Whether switch ``pattern`` switches on probe ``tag`` (glob plus hierarchy).

    Example:
        >>> tag_matches("model", "model.attention"), tag_matches("model.*", "model.attention")
        (True, True)
        >>> tag_matches("*", "any.tag"), tag_matches("model.*", "model")
        (True, False)
        >>> tag_matches("mod", "model")
        False
    """
    return fnmatchcase(tag, pattern) or fnmatchcase(tag, pattern + ".*")


class _Switched:
    """An immutable set of switched-on tag patterns, with a memo of tag -> bool."""

    __slots__ = ("_memo", "patterns")

    def __init__(self, patterns: Iterable[str]) -> None:
        self.patterns: frozenset[str] = frozenset(patterns)
        self._memo: dict[str, bool] = {}

    def matches(self, tag: str) -> bool:
        hit = self._memo.get(tag)
        if hit is None:
            hit = any(tag_matches(p, tag) for p in self.patterns)
            self._memo[tag] = hit
        return hit

    def first_match(self, tags: tuple[str, ...]) -> str | None:
        for tag in tags:
            if self.matches(tag):
                return tag
        return None


class _Journal:
    """Per-run bookkeeping: probes switched off after an error, file names handed out, and for
    the end-of-run report the calls that ran per probe and what each wrote where."""

    __slots__ = ("calls", "disabled", "issued", "lock", "outputs")

    def __init__(self) -> None:
        self.disabled: set[object] = set()
        self.issued: set[str] = set()
        self.lock = threading.Lock()
        self.calls: dict[object, int] = {}  # _ProbeInfo -> calls that ran
        self.outputs: dict[str, dict[str, int]] = {}  # qualname -> {destination: items}

    def ran(self, probe: object) -> None:
        """Count one call of ``probe`` that ran."""
        with self.lock:
            self.calls[probe] = self.calls.get(probe, 0) + 1

    def wrote(self, qualname: str, destination: str, items: int = 1) -> None:
        """Note that ``qualname`` wrote ``items`` things to ``destination``."""
        with self.lock:
            where = self.outputs.setdefault(qualname, {})
            where[destination] = where.get(destination, 0) + items

    def claim(self, directory: Path | None, base: str, suffix: str, namespace: str = "") -> str:
        """A name ``base[_k]suffix`` not handed out before in this run (nor on disk)."""
        with self.lock:
            k = 0
            while True:
                name = f"{base}_{k}{suffix}" if k else f"{base}{suffix}"
                key = f"{namespace}:{directory}/{name}"
                on_disk = directory is not None and (directory / name).exists()
                if key not in self.issued and not on_disk:
                    self.issued.add(key)
                    return name
                k += 1


def _hydra_output_dir() -> Path | None:
    """``<hydra run dir>/probes`` inside a running Hydra app, else None (never imports Hydra)."""
    module = sys.modules.get("hydra.core.hydra_config")
    if module is None:
        return None
    hydra_config = module.HydraConfig
    try:
        if not hydra_config.initialized():
            return None
        output_dir = hydra_config.get().runtime.output_dir
    except Exception:  # a half-initialised Hydra: fall back to the other defaults
        return None
    return Path(output_dir) / "probes" if output_dir else None


def _distributed_rank() -> int | None:
    """The rank from torch.distributed when it is imported and initialised, else None."""
    dist = sys.modules.get("torch.distributed")
    if dist is None:
        return None
    try:
        if dist.is_available() and dist.is_initialized():
            return int(dist.get_rank())
    except Exception:
        pass
    return None


def _environment_rank() -> int:
    """The global rank from the usual launcher variables (RANK, LOCAL_RANK, ...), else 0."""
    for name in _RANK_ENV_VARS:
        value = os.environ.get(name)
        if value is not None:
            try:
                return int(value)
            except ValueError:
                continue
    return 0


@dataclass(frozen=True, eq=False)
class _Run:
    """Settings shared by every probe call while one switch is on."""

    output_dir: Path | None = None  # None: Hydra run dir / probes, else ./probes (at use time)
    trainer: Trainer | None = None
    rank: int | None = None  # None: from the trainer, torch.distributed or the environment
    ranks: str = "zero"
    on_error: str = "disable"
    step: int | None = None  # None: the trainer's global_step, else 0
    journal: _Journal = field(default_factory=_Journal)
    env_rank: int = field(default_factory=_environment_rank)  # read once, when the run starts

    def current_rank(self) -> int:
        if self.rank is not None:
            return self.rank
        if self.trainer is not None:
            return int(self.trainer.global_rank)
        rank = _distributed_rank()
        return self.env_rank if rank is None else rank

    def rank_allowed(self) -> bool:
        return self.ranks == "all" or self.current_rank() == 0

    def resolved_output_dir(self) -> Path:
        if self.output_dir is not None:
            return self.output_dir
        return _hydra_output_dir() or Path("probes")

    def context(self, probe: str, qualname: str, tag: str, rank: int) -> ProbeContext:
        trainer = self.trainer
        if self.step is not None:
            step = self.step
        elif trainer is not None:
            step = int(trainer.global_step)
        else:
            step = 0
        epoch = int(trainer.current_epoch) if trainer is not None else 0
        return ProbeContext(
            probe=probe,
            tag=tag,
            step=step,
            epoch=epoch,
            rank=rank,
            output_dir=self.resolved_output_dir(),
            trainer=trainer,
            qualname=qualname,
            _journal=self.journal,
        )


@dataclass(frozen=True, eq=False, slots=True)
class _State:
    """The value of the ContextVar: which patterns are on, whether probes may run, the run."""

    switched: _Switched
    active: bool
    run: _Run
    owner: object = None  # the _Switch that set this state (None: the environment default)


def _parse_env(value: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in value.split(",") if p.strip())


def _state_from_env() -> _State:
    patterns = _parse_env(os.environ.get(ENV_VAR, ""))
    return _State(_Switched(patterns), active=bool(patterns), run=_Run())


_STATE: contextvars.ContextVar[_State] = contextvars.ContextVar("lightning_inspect.probes.context")

# The immutable default for contexts that switched nothing on themselves: read from
# LIGHTNING_INSPECT at import, replaced (not mutated) only by reload_env().
_default_state: _State = _state_from_env()


def reload_env() -> tuple[str, ...]:
    """Re-read ``LIGHTNING_INSPECT`` and return the tag patterns it now switches on.

    The variable is read once at import. Call this after changing ``os.environ`` in-process;
    the new value is the default for every thread and context without a switch of its own.

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
    return tuple(sorted(_default_state.switched.patterns))


def _current_state() -> _State:
    return _STATE.get(_default_state)


class _Switch:
    """Switches tag patterns on in the current context until :meth:`close` (used by switches).

    The patterns are added to whatever is on when the switch opens. ``set_gate(False)`` keeps the
    switch but lets no probe run (steps that are not due). Switches closed out of order are
    skipped when the one above them closes, so nothing stays on after every switch is closed.
    """

    def __init__(
        self,
        patterns: tuple[str, ...],
        *,
        output_dir: Path | None,
        trainer: Trainer | None = None,
        rank: int | None = None,
        ranks: str = "zero",
        on_error: str = "disable",
        step: int | None = None,
        gate: bool = True,
    ) -> None:
        self.patterns = patterns
        self.output_dir = output_dir
        self.trainer = trainer
        self.rank = rank
        self.ranks = ranks
        self.on_error = on_error
        self.step = step
        self._initial_gate = gate
        self._gate = gate
        self._token: contextvars.Token[_State] | None = None
        self._outer: _State | None = None  # the ContextVar's value before open (None: unset)
        self._closed = True
        self._on: _State | None = None
        self._off: _State | None = None

    @property
    def is_open(self) -> bool:
        return not self._closed

    def open(self) -> _State:
        self._outer = _STATE.get(None)
        outer = self._outer if self._outer is not None else _default_state
        inherited = outer.switched.patterns if outer.active else frozenset()
        outer_run = outer.run
        run = _Run(
            output_dir=self.output_dir if self.output_dir is not None else outer_run.output_dir,
            trainer=self.trainer if self.trainer is not None else outer_run.trainer,
            rank=self.rank,
            ranks=self.ranks,
            on_error=self.on_error,
            step=self.step,
        )
        switched = _Switched(inherited | frozenset(self.patterns))
        rank_blocks = self.rank is not None and self.ranks == "zero" and self.rank != 0
        may_run = bool(switched.patterns) and not rank_blocks
        self._on = _State(switched, active=may_run, run=run, owner=self)
        self._off = _State(switched, active=False, run=run, owner=self)
        self._closed = False
        state = self._on if self._gate else self._off
        self._token = _STATE.set(state)
        return state

    def _on_top(self) -> bool:
        current = _STATE.get(None)
        return current is not None and current.owner is self

    def set_gate(self, gate: bool) -> None:
        """Let probes run (True) or not (False); ignored while a nested switch is open above."""
        if gate == self._gate:
            return
        self._gate = gate
        if not self._closed and self._on_top():
            assert self._on is not None and self._off is not None
            _STATE.set(self._on if gate else self._off)

    def report(self) -> tuple[list[str], list[str]]:
        """For each pattern that was on: a line saying how many probe calls ran and where they
        wrote, or (second list) a problem: no registered probe matches it, or none of its calls
        ran."""
        if self._on is None:
            return [], []
        journal = self._on.run.journal
        with journal.lock:
            calls, outputs = dict(journal.calls), {k: dict(v) for k, v in journal.outputs.items()}
        probes: set[_ProbeInfo] = set(_REGISTRY) | {p for p in calls if isinstance(p, _ProbeInfo)}
        known = sorted({tag for info in probes for tag in info.tags})
        lines: list[str] = []
        problems: list[str] = []
        for pattern in sorted(self._on.switched.patterns):
            matching = sorted(
                (i for i in probes if any(tag_matches(pattern, t) for t in i.tags)),
                key=lambda i: i.qualname,
            )
            if not matching:
                problems.append(_no_probe_message(pattern, known))
                continue
            names = ", ".join(i.qualname for i in matching)
            if not any(calls.get(i, 0) for i in matching):
                problems.append(
                    f"tag pattern {pattern!r} switches on {names}, but no call of it ran (none "
                    "came on a step that was due), so nothing was written for it."
                )
                continue
            written: dict[str, int] = {}
            for info in matching:
                for where, items in outputs.get(info.qualname, {}).items():
                    written[where] = written.get(where, 0) + items
            went = "; ".join(f"{w}: {n} items" if n else w for w, n in written.items())
            ran = ", ".join(f"{i.qualname} {calls.get(i, 0)}" for i in matching)
            lines.append(
                f"tag {pattern!r}: {sum(calls.get(i, 0) for i in matching)} probe calls ran "
                f"({ran}); output: {went or 'nothing written through ctx'}."
            )
        return lines, problems

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._gate = self._initial_gate
        if not self._on_top():
            return  # a switch opened later is still open: it restores past this one on close
        bottom = self  # walk down over switches below that were closed out of order
        while bottom._outer is not None and isinstance(bottom._outer.owner, _Switch):
            below = bottom._outer.owner
            if not below._closed:
                break
            bottom = below
        token, target = bottom._token, bottom._outer
        if token is not None:
            try:
                _STATE.reset(token)
                return
            except (ValueError, RuntimeError):  # token made in another context, or used
                pass
        _STATE.set(target if target is not None else _default_state)


def _no_probe_message(pattern: str, known: list[str]) -> str:
    if not known:
        return (
            f"tag pattern {pattern!r} matches no probe: no function decorated with "
            "@lightning_inspect.probe was imported in this process, so nothing ran for it."
        )
    return (
        f"tag pattern {pattern!r} matches no registered probe, so nothing ran for it. Known probe "
        f"tags: {', '.join(known)}.{suggestion(pattern, known)}"
    )


# --------------------------------------------------------------------------------------------
# The context a probe receives
# --------------------------------------------------------------------------------------------


class ProbeContext:
    """What a running probe receives as ``ctx``.

    Attributes: ``probe`` (name used in file names), ``qualname`` (module.function), ``tag``
    (the probe's tag that matched), ``step`` (the trainer's ``global_step``, else 0), ``epoch``,
    ``rank`` (global rank), ``trainer`` (or None). ``output_dir`` is created on first access.

    Example:
        >>> import tempfile
        >>> ctx = ProbeContext(probe="attn", tag="attn", step=12, output_dir=tempfile.mkdtemp())
        >>> ctx.path(".npy").name, ctx.path(".npy").name
        ('attn_00000012_rank0.npy', 'attn_00000012_rank0_1.npy')
    """

    __slots__ = ("_dir", "_journal", "epoch", "probe", "qualname", "rank", "step", "tag", "trainer")

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
    ) -> None:
        self.probe = _safe(probe)
        self.qualname = qualname or probe
        self.tag = tag
        self.step = step
        self.epoch = epoch
        self.rank = rank
        self.trainer = trainer
        self._dir = output_dir if isinstance(output_dir, Path) else Path(output_dir)
        self._journal = _journal if _journal is not None else _Journal()

    def __repr__(self) -> str:
        return (
            f"ProbeContext(probe={self.probe!r}, tag={self.tag!r}, step={self.step}, "
            f"epoch={self.epoch}, rank={self.rank}, output_dir={str(self._dir)!r})"
        )

    # -- files ---------------------------------------------------------------------------------

    @property
    def output_dir(self) -> Path:
        """The run's probe output directory (created on first access)."""
        self._dir.mkdir(parents=True, exist_ok=True)
        self._journal.wrote(self.qualname, f"files in {self._dir}", 0)
        return self._dir

    def path(self, suffix_or_name: str = "") -> Path:
        """A new file path ``{probe}_{step:08d}_rank{r}[_{name}][_{k}]{suffix}`` in output_dir.

        Pass a suffix (``".png"``) or a name (``"weights.npy"``). A name already handed out in
        this run, or already on disk, gets a counter (``_1``, ``_2``...), so files never
        overwrite each other.

        Example:
            >>> import tempfile
            >>> ctx = ProbeContext(probe="attn", tag="a", step=3, output_dir=tempfile.mkdtemp())
            >>> ctx.path("heads.npy").name
            'attn_00000003_rank0_heads.npy'
        """
        directory = self.output_dir
        path = directory / self._claim(directory, suffix_or_name, "file")
        self._journal.wrote(self.qualname, f"files in {directory}")
        return path

    def _claim(self, directory: Path | None, suffix_or_name: str, namespace: str) -> str:
        if not isinstance(suffix_or_name, str):
            raise ConfigError(
                f"ctx.path(suffix_or_name): expected a string such as '.png' or 'weights.npy'; "
                f"got {suffix_or_name!r} ({type(suffix_or_name).__name__})."
            )
        if "/" in suffix_or_name or "\\" in suffix_or_name:
            raise ConfigError(
                f"ctx.path(suffix_or_name): expected a file suffix or name without directories; "
                f"got {suffix_or_name!r}."
            )
        base = f"{self.probe}_{self.step:08d}_rank{self.rank}"
        if not suffix_or_name or suffix_or_name.startswith("."):
            suffix = suffix_or_name
        else:
            name = Path(_safe(suffix_or_name))
            suffix = name.suffix
            base = f"{base}_{name.name[: len(name.name) - len(suffix)] if suffix else name.name}"
        return self._journal.claim(directory, base, suffix, namespace)

    def _artifact(self, name: str, suffix: str) -> str:
        return "probes/" + self._claim(None, _safe(name) + suffix, "mlflow")

    def _tb_tag(self, name: str) -> str:
        return f"probes/{self.probe}/{name}"

    def _wrote(self, tb: SummaryWriter | None, ml: tuple[MlflowClient, str] | None) -> None:
        """Note one item written to each backend given, for the end-of-run report."""
        if tb is not None:
            where = f"TensorBoard {tb.get_logdir()} (tags probes/{self.probe}/...)"
            self._journal.wrote(self.qualname, where)
        if ml is not None:
            self._journal.wrote(self.qualname, f"MLflow run {ml[1]} (artifacts probes/)")

    # -- backends ------------------------------------------------------------------------------

    @property
    def tensorboard(self) -> SummaryWriter | None:
        """The SummaryWriter of the trainer's TensorBoardLogger (rank 0 only), else None."""
        if self.trainer is None or self.rank != 0:
            return None
        from lightning.pytorch.loggers import TensorBoardLogger

        for logger in self.trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                return logger.experiment  # type: ignore[no-any-return]
        return None

    @property
    def mlflow(self) -> tuple[MlflowClient, str] | None:
        """``(MlflowClient, run_id)`` of the trainer's MLFlowLogger (rank 0 only), else None."""
        if self.trainer is None or self.rank != 0:
            return None
        from lightning.pytorch.loggers import MLFlowLogger

        for logger in self.trainer.loggers:
            if isinstance(logger, MLFlowLogger):
                run_id = logger.run_id
                if run_id is not None:
                    return logger.experiment, run_id
        return None

    def log_text(self, name: str, text: str) -> None:
        """Log ``text`` at the current step (TensorBoard text, MLflow ``.txt``, else a file).

        Example:
            >>> import tempfile
            >>> ctx = ProbeContext(probe="p", tag="t", output_dir=tempfile.mkdtemp())
            >>> ctx.log_text("note", "hello")  # no logger: writes p_00000000_rank0_note.txt
        """
        tb, ml = self.tensorboard, self.mlflow
        if tb is not None:
            tb.add_text(self._tb_tag(name), text, global_step=self.step)
        if ml is not None:
            client, run_id = ml
            client.log_text(run_id, text, self._artifact(name, ".txt"))
        self._wrote(tb, ml)
        if tb is None and ml is None:
            self.path(_safe(name) + ".txt").write_text(text, encoding="utf-8")

    def log_image(self, name: str, image: Any, *, dataformats: str | None = None) -> None:
        """Log an image (HW, HWC or CHW; float in [0, 1] or uint8) at the current step.

        The layout is HWC when the last axis has 1, 3 or 4 entries, else CHW when the first
        has; pass ``dataformats="CHW"``/``"HWC"`` to decide explicitly. Files: ``.png``.

        Example:
            >>> import numpy as np, tempfile
            >>> ctx = ProbeContext(probe="p", tag="t", output_dir=tempfile.mkdtemp())
            >>> ctx.log_image("mask", np.zeros((8, 8, 3)))
        """
        array = _to_hwc_uint8(image, dataformats)
        tb, ml = self.tensorboard, self.mlflow
        if tb is not None:
            tb.add_image(self._tb_tag(name), array, global_step=self.step, dataformats="HWC")
        if ml is not None:
            client, run_id = ml
            client.log_image(run_id, array, artifact_file=self._artifact(name, ".png"))
        self._wrote(tb, ml)
        if tb is None and ml is None:
            _save_png(self.path(_safe(name) + ".png"), array)

    def log_figure(self, name: str, figure: Any, *, close: bool = True) -> None:
        """Log a matplotlib figure at the current step; closes it afterwards unless ``close=False``.

        Example:
            >>> import matplotlib; matplotlib.use("Agg")
            >>> import matplotlib.pyplot as plt, tempfile
            >>> fig, ax = plt.subplots(); _ = ax.plot([0, 1])
            >>> ProbeContext(probe="p", tag="t", output_dir=tempfile.mkdtemp()).log_figure("f", fig)
        """
        tb, ml = self.tensorboard, self.mlflow
        try:
            if ml is not None:
                client, run_id = ml
                client.log_figure(run_id, figure, self._artifact(name, ".png"))
            if tb is not None:
                tb.add_figure(self._tb_tag(name), figure, global_step=self.step, close=False)
            self._wrote(tb, ml)
            if tb is None and ml is None:
                figure.savefig(self.path(_safe(name) + ".png"))
        finally:
            if close and "matplotlib.pyplot" in sys.modules:
                sys.modules["matplotlib.pyplot"].close(figure)

    def log_histogram(self, name: str, values: Any, *, bins: int = 64) -> None:
        """Log a histogram of ``values`` (any tensor or array) at the current step.

        Binned with ``torch.histc`` on the values' device over the finite values; NaN/Inf are
        counted apart. TensorBoard gets a histogram (skipped when no value is finite); MLflow
        and the file fallback get a ``.json`` with edges, counts and the NaN/Inf counts.

        Example:
            >>> import tempfile, torch
            >>> ctx = ProbeContext(probe="p", tag="t", output_dir=tempfile.mkdtemp())
            >>> ctx.log_histogram("w", torch.randn(100))
        """
        if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
            raise ConfigError(f"ctx.log_histogram(bins=...): expected an int >= 1; got {bins!r}.")
        data = _histogram(values, bins)
        tb, ml = self.tensorboard, self.mlflow
        if tb is not None and data["num"] > 0:
            tb.add_histogram_raw(
                self._tb_tag(name),
                min=data["min"],
                max=data["max"],
                num=data["num"],
                sum=data["sum"],
                sum_squares=data["sum_squares"],
                bucket_limits=data["edges"][1:],
                bucket_counts=data["counts"],
                global_step=self.step,
            )
        if ml is not None:
            client, run_id = ml
            client.log_dict(run_id, data, self._artifact(name, ".json"))
        self._wrote(tb if data["num"] > 0 else None, ml)
        if tb is None and ml is None:
            self.path(_safe(name) + ".json").write_text(json.dumps(data), encoding="utf-8")


def _to_hwc_uint8(image: Any, dataformats: str | None) -> np.ndarray:
    import numpy as np

    if hasattr(image, "detach"):  # torch.Tensor without importing torch
        image = image.detach()
        image = (image.float() if image.is_floating_point() else image).cpu().numpy()
    array = np.asarray(image)
    if array.ndim == 2:
        array = array[:, :, None]
    elif array.ndim == 3:
        layout = dataformats
        if layout is None:
            if array.shape[-1] in (1, 3, 4):
                layout = "HWC"
            elif array.shape[0] in (1, 3, 4):
                layout = "CHW"
        if layout not in ("HWC", "CHW"):
            raise ConfigError(
                f"ctx.log_image: cannot tell the channel axis of an image of shape "
                f"{tuple(array.shape)} (dataformats={dataformats!r}); pass dataformats='HWC' or "
                f"'CHW' with 1, 3 or 4 channels."
            )
        if layout == "CHW":
            array = array.transpose(1, 2, 0)
    else:
        raise ConfigError(
            f"ctx.log_image: expected an image of shape HW, HWC or CHW; got shape "
            f"{tuple(array.shape)}."
        )
    if array.dtype == np.uint8:
        return np.ascontiguousarray(array)
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if np.issubdtype(array.dtype, np.floating):
        array = np.nan_to_num(array.astype(np.float32), nan=0.0, posinf=1.0, neginf=0.0)
        return (np.clip(array, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return np.clip(array, 0, 255).astype(np.uint8)


def _save_png(path: Path, array: np.ndarray) -> None:
    try:
        from PIL import Image
    except ImportError:  # no Pillow: keep the pixels anyway
        import numpy as np

        np.save(path.with_suffix(".npy"), array)
        return
    Image.fromarray(array[:, :, 0] if array.shape[-1] == 1 else array).save(path)


def _histogram(values: Any, bins: int) -> dict[str, Any]:
    import torch

    flat = torch.as_tensor(values).detach().flatten()
    if flat.is_complex():
        flat = flat.abs()
    flat = flat.float()
    finite_mask = torch.isfinite(flat)
    finite = flat[finite_mask]
    nan = int(torch.isnan(flat).sum().item())
    inf = int(flat.numel() - finite.numel() - nan)
    if finite.numel() == 0:
        return {
            "min": None,
            "max": None,
            "num": 0,
            "sum": 0.0,
            "sum_squares": 0.0,
            "edges": [],
            "counts": [],
            "nan": nan,
            "inf": inf,
        }
    lo, hi = finite.min(), finite.max()
    low, high = float(lo.item()), float(hi.item())
    a, b = (low - 0.5, high + 0.5) if low == high else (low, high)
    counts = torch.histc(finite, bins=bins, min=a, max=b)
    edges = torch.linspace(a, b, bins + 1)
    return {
        "min": low,
        "max": high,
        "num": int(finite.numel()),
        "sum": float(finite.sum().item()),
        "sum_squares": float((finite * finite).sum().item()),
        "edges": edges.tolist(),
        "counts": counts.cpu().tolist(),
        "nan": nan,
        "inf": inf,
    }


# --------------------------------------------------------------------------------------------
# The decorator and the query functions
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class _ProbeInfo:
    func: Callable[..., Any]
    tags: tuple[str, ...]
    name: str
    qualname: str
    wants_ctx: bool


#: Every probe decorated in this process (for the end-of-run report: which tags exist). Weak, so
#: a probe that is no longer referenced leaves it.
_REGISTRY: weakref.WeakSet[_ProbeInfo] = weakref.WeakSet()


def _wants_ctx(call: str, func: Callable[..., Any]) -> bool:
    try:
        parameter = inspect.signature(func).parameters.get("ctx")
    except (TypeError, ValueError):
        return False
    if parameter is None:
        return False
    if parameter.kind not in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY):
        raise ConfigError(
            f"{call}: the probe's ctx parameter is {parameter.kind.description}; declare it as "
            f"keyword-only, e.g. def show(weights, *, ctx): ..."
        )
    return True


def _run_probe(
    info: _ProbeInfo, state: _State, tag: str, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    """The on path: rank policy, disabled check, context injection, error containment."""
    run = state.run
    journal = run.journal
    if info in journal.disabled:
        return None
    rank = run.current_rank()
    if run.ranks == "zero" and rank != 0:
        return None
    journal.ran(info)
    try:
        if info.wants_ctx:
            if "ctx" in kwargs:
                raise TypeError(
                    f"{info.qualname}() got ctx from its caller; ctx is supplied by "
                    f"lightning_inspect while the probe is on"
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
            frames = traceback.extract_tb(exc.__traceback__)
            where = f" at {frames[-1].filename}:{frames[-1].lineno}" if frames else ""
            warnings.warn(
                f"Probe {info.qualname} (tag {tag!r}) raised {type(exc).__name__}: {exc}{where}. "
                f"It is switched off for the rest of this run; pass on_error='raise' to "
                f"ProbeSwitch or probing() to stop on probe errors instead.",
                ProbeWarning,
                stacklevel=3,
            )
        return None


def probe(
    *tags: str, name: str | None = None
) -> Callable[[Callable[..., R]], Callable[..., R | None]]:
    """Decorate an inspection function so that it runs only while one of ``tags`` is on.

    The call site stays a plain call and returns None while off. A parameter named ``ctx``
    (keyword-only recommended) receives a :class:`ProbeContext` while on; callers never pass it.
    ``name`` (default: the function's name) is used in file names.

    Example:
        >>> @probe("attention", "encoder.features")
        ... def show_attention(weights, *, ctx):
        ...     ctx.log_text("shape", str(len(weights)))
        >>> show_attention([0.1, 0.9]) is None  # nothing switched on
        True
    """
    shown = [repr(t) for t in tags] + ([f"name={name!r}"] if name is not None else [])
    call = "probe(" + ", ".join(shown) + ")"
    checked = _check_tag_names(call, tags)
    if name is not None and (not isinstance(name, str) or not _safe(name) == name):
        raise ConfigError(
            f"{call}: name must be a non-empty string of letters, digits, '_', '.' or '-'; "
            f"got {name!r}."
        )

    def decorate(func: Callable[..., R]) -> Callable[..., R | None]:
        if not callable(func):
            raise ConfigError(f"{call}: expected a function to decorate; got {func!r}.")
        if inspect.iscoroutinefunction(func) or inspect.isasyncgenfunction(func):
            raise ConfigError(
                f"{call}: {getattr(func, '__qualname__', func)!r} is an async function; probes "
                f"must be plain functions (call them from async code as usual)."
            )
        info = _ProbeInfo(
            func=func,
            tags=checked,
            name=name or _safe(getattr(func, "__name__", "probe")),
            qualname=f"{getattr(func, '__module__', '?')}.{getattr(func, '__qualname__', func)}",
            wants_ctx=_wants_ctx(call, func),
        )
        _REGISTRY.add(info)
        get = _STATE.get
        cache: tuple[_Switched | None, str | None] = (None, None)

        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> R | None:
            nonlocal cache
            state = get(_default_state)
            if not state.active:
                return None
            seen = cache  # one read: the (key, match) pair stays consistent across threads
            if seen[0] is not state.switched:
                seen = cache = (state.switched, state.switched.first_match(info.tags))
            if seen[1] is None:
                return None
            return _run_probe(info, state, seen[1], args, kwargs)  # type: ignore[no-any-return]

        return wrapper

    return decorate


def _check_query_tag(call: str, tag: object) -> None:
    if not isinstance(tag, str) or not tag:
        raise ConfigError(
            f"{call}: tag must be a non-empty string such as 'attention'; got {tag!r}."
        )


def enabled(tag: str) -> bool:
    """Whether a probe tagged ``tag`` would run here and now (for ``if`` blocks).

    Example:
        >>> enabled("attention")
        False
        >>> with probing("attention", output_dir="probes-doctest"):
        ...     enabled("attention"), enabled("attention.heads"), enabled("loss")
        (True, True, False)
    """
    if not isinstance(tag, str) or not tag:
        _check_query_tag("enabled(tag)", tag)
    state = _STATE.get(_default_state)
    if not state.active or not state.switched.matches(tag):
        return False
    return state.run.rank_allowed()


def current_context(tag: str, *, name: str | None = None) -> ProbeContext | None:
    """A :class:`ProbeContext` for ``tag`` when it is on here and now, else None.

    For inspection code that is not a decorated function. ``name`` (default: the tag) is used
    in file names.

    Example:
        >>> current_context("attention") is None
        True
        >>> with probing("attention", output_dir="probes-doctest"):
        ...     current_context("attention").tag
        'attention'
    """
    _check_query_tag("current_context(tag)", tag)
    if not enabled(tag):
        return None
    run = _current_state().run
    label = name or tag
    return run.context(_safe(label), label, tag, run.current_rank())


class probing:  # used like a function: ``with probing("attention"):``
    """Switch tags on inside a ``with`` block (notebooks, tests, scripts).

    Patterns are added to whatever is already on. ``output_dir`` defaults to the enclosing
    switch's directory (a ``ProbeSwitch`` run's), else ``<hydra run dir>/probes`` inside a Hydra
    app, else ``./probes``. ``rank`` overrides the detected global rank, ``step`` the step in
    file names. ``with`` yields the output directory (not yet created).

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
        call = "probing(" + ", ".join(repr(t) for t in tags) + ")"
        patterns = _check_patterns(call, "tags", list(tags))
        if not patterns:
            raise ConfigError(
                f"{call}: give at least one tag pattern, e.g. probing('attention') or "
                f"probing('*') for every probe."
            )
        if output_dir is not None and not isinstance(output_dir, (str, os.PathLike)):
            raise ConfigError(
                f"{call}: output_dir must be None, a str or a path; got {output_dir!r}."
            )
        self._switch = _Switch(
            patterns,
            output_dir=Path(output_dir) if output_dir is not None else None,
            rank=_check_rank(call, rank),
            ranks=_check_choice(call, "ranks", ranks, RANKS),
            on_error=_check_choice(call, "on_error", on_error, ON_ERROR),
            step=_check_step(call, step),
        )

    def __enter__(self) -> Path:
        if self._switch.is_open:
            raise RuntimeError("probing(...) blocks cannot be re-entered while open")
        state = self._switch.open()
        return state.run.resolved_output_dir()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._switch.close()

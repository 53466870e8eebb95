"""Build the callbacks of the Hydra ``inspect`` group, checking every key before anything is built.

Each option adds ``name -> {_target_: <Callback class>, <arguments>}`` to ``cfg.inspect``; one
line in a training script turns that into callbacks::

    trainer = L.Trainer(callbacks=instantiate_callbacks(cfg.get("inspect")))  # [] without +inspect

Only an entry's own ``_target_`` is instantiated, and only when it is a Lightning ``Callback``
class; a ``_target_`` nested in an argument is a ConfigError naming its key, and nothing is called.

    >>> instantiate_callbacks(None)
    []
    >>> instantiate_callbacks({"activations": {"_target_": "lightning_inspect.ActivationMonitor",
    ...                                        "every_n_step": 5}})
    Traceback (most recent call last):
    ...
    lightning_inspect.errors.ConfigError: inspect.activations.every_n_step: unknown key for lightning_inspect.ActivationMonitor (value 5). Did you mean 'every_n_steps'? Valid keys: modules, exclude, every_n_steps, start_step, stop_step, stats, histograms, bins, backends, on_nonfinite, enabled, mlflow_metrics.
"""

from __future__ import annotations

import inspect as _pyinspect
import sys
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import Callback

from lightning_inspect._validation import closest
from lightning_inspect.errors import ConfigError

__all__ = ["instantiate_callbacks", "validate_callback_config"]

#: Keys Hydra's ``instantiate`` reads itself; never passed to the constructor.
HYDRA_KEYS = ("_target_", "_args_", "_partial_", "_convert_", "_recursive_")


def instantiate_callbacks(cfg: Any, key: str | None = None) -> list[Callback]:
    """The callbacks described by ``cfg`` (usually ``cfg.get("inspect")``), in order.

    Args:
        cfg: ``None`` (returns ``[]``), a mapping ``name -> {_target_: ..., <arguments>}``
            (DictConfig or dict) or a list of entries. A ``None`` entry or ``_target_`` is
            skipped (``inspect.gradients=null``).
        key: the key path in messages; default: the node's own path (``inspect``).

    Raises:
        ConfigError: before anything is built, for a bad entry, target, key or nested
            ``_target_``; afterwards, for a value the callback rejects. Every message starts
            with the key path (``inspect.activations.bins``).

    Example:
        >>> cbs = instantiate_callbacks({"graph": {"_target_": "lightning_inspect.GraphMonitor"}})
        >>> [type(cb).__name__ for cb in cbs]
        ['GraphMonitor']
    """
    if cfg is None:
        return []
    if key is None:
        try:  # the node's own path in its Hydra config
            key = str(cfg._get_full_key(None) or "inspect")
        except Exception:  # a plain dict or list
            key = "inspect"
    checked = [(path, e, validate_callback_config(e, path)) for path, e in _entries(cfg, key)]
    return [_instantiate(e, path, target) for path, e, target in checked if target is not None]


def validate_callback_config(entry: Any, path: str) -> type | None:
    """Check one entry's keys against its target class; return the class (``None``: skipped).

    Example:
        >>> validate_callback_config({"_target_": "lightning_inspect.GraphMonitor", "graph": False}, "inspect.graph")
        <class 'lightning_inspect.monitors.graph.GraphMonitor'>
    """
    if entry is None:
        return None
    if not _is_mapping(entry):
        raise ConfigError(
            f"{path}={_show(entry)}: expected a mapping with a _target_ (a callback class) and its "
            "arguments, or null to skip it."
        )
    if "_target_" not in entry:
        raise ConfigError(
            f"{path}: no _target_ (keys: {', '.join(map(str, entry)) or 'none'})."
            f"{_did_you_mean(path.rsplit('.', 1)[-1], _shipped_entries())} Each entry names its "
            "callback class (_target_: lightning_inspect.ActivationMonitor); add the option before "
            "overriding its keys: +inspect=activations inspect.activations.every_n_steps=10."
        )
    if entry["_target_"] is None:
        return None
    target = _locate(entry["_target_"], f"{path}._target_")
    _check_keys(entry, path, target)
    for name in entry:
        if str(name) != "_target_":
            _refuse_targets(_get(entry, name), f"{path}.{name}")
    return target


def _entries(cfg: Any, root: str) -> Iterator[tuple[str, Any]]:
    if _is_mapping(cfg):
        return ((f"{root}.{name}", _get(cfg, name)) for name in cfg)
    if _is_sequence(cfg):
        return ((f"{root}[{i}]", entry) for i, entry in enumerate(cfg))
    raise ConfigError(
        f"{root}={_show(cfg)}: expected a mapping name -> {{_target_: ..., arguments}} (the "
        "inspect group, e.g. +inspect=activations), a list of such entries, or null."
    )


def _locate(name: Any, path: str) -> type:
    """The class ``name`` names, imported, never called; a ConfigError unless a Callback."""
    if not isinstance(name, str) or not name:
        raise ConfigError(
            f"{path}={name!r}: expected a dotted class path such as lightning_inspect.ActivationMonitor."
        )
    from hydra.utils import get_object

    import lightning_inspect

    try:
        target = get_object(name)
    except Exception as exc:
        known = [f"lightning_inspect.{n}" for n in lightning_inspect.__all__]
        raise ConfigError(
            f"{path}={name!r}: no such class can be imported.{_did_you_mean(name, known)}"
        ) from exc
    if not (isinstance(target, type) and issubclass(target, Callback)):
        kind = target.__qualname__ if isinstance(target, type) else f"a {type(target).__name__}"
        raise ConfigError(
            f"{path}={name!r}: {kind} is not a Lightning Callback; only Callback classes "
            "are instantiated."
        )
    return target


def _refuse_targets(value: Any, path: str) -> None:
    """A ConfigError naming the first ``_target_`` in ``value``: it would call any importable
    function (``builtins.open``) with arguments taken from the command line."""
    if _is_mapping(value):
        if "_target_" in value:
            raise ConfigError(
                f"{path}={_show(value)}: a nested _target_ is not allowed. Only the entry's "
                "own _target_ (a Lightning Callback class) is instantiated; its arguments must be "
                "plain values (numbers, strings, lists, mappings without _target_)."
            )
        for name in value:
            _refuse_targets(_get(value, name), f"{path}.{name}")
    elif _is_sequence(value):
        for i, item in enumerate(value):
            _refuse_targets(item, f"{path}[{i}]")


def _check_keys(entry: Any, path: str, target: type) -> None:
    try:
        params = _pyinspect.signature(target).parameters.values()
    except (TypeError, ValueError):
        return
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return  # the constructor takes **kwargs: leave the checks to it
    named = {p.name: p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    given = [str(k) for k in entry if str(k) not in HYDRA_KEYS]
    for name in given:
        if name not in named:
            raise ConfigError(
                f"{path}.{name}: unknown key for {entry['_target_']} (value "
                f"{_show(_get(entry, name))}).{_did_you_mean(name, named)} Valid keys: "
                f"{', '.join(named) or 'none'}."
            )
    if "_args_" in entry or entry.get("_partial_", False):
        return
    missing = [n for n, p in named.items() if p.default is p.empty and n not in given]
    if missing:
        raise ConfigError(
            f"{path}: missing required key(s) {', '.join(missing)} of {entry['_target_']}."
        )


def _instantiate(entry: Any, path: str, target: type) -> Callback:
    """Build one checked entry; a callback's ConfigError is raised once, prefixed with ``path``."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    rejected: ConfigError | None = None
    try:
        callback = instantiate(entry, **({} if "_convert_" in entry else {"_convert_": "all"}))
    except InstantiationException as exc:
        cause: BaseException = exc  # Hydra wraps the constructor's error: find it
        while isinstance(cause, InstantiationException) and (cause.__cause__ or cause.__context__):
            cause = cause.__cause__ or cause.__context__  # type: ignore[assignment]
        if not isinstance(cause, ConfigError):
            raise ConfigError(
                f"{path}: building {target.__module__}.{target.__qualname__} failed: "
                f"{type(cause).__name__}: {cause}"
            ) from cause
        rejected = cause
    except ConfigError as exc:
        rejected = exc
    if rejected is not None:  # raised outside the handler: no chained copy of the same message
        raise type(rejected)(f"{path}: {rejected}")
    if not isinstance(callback, Callback):  # e.g. _partial_: true
        raise ConfigError(
            f"{path}: instantiating {entry['_target_']} gave {type(callback).__name__}, not a "
            "Lightning Callback."
        )
    return callback


def _shipped_entries() -> list[str]:
    """The entry names of the shipped options (``activations``, ...), for "did you mean" hints."""
    from omegaconf import OmegaConf

    options = sorted((Path(__file__).parents[1] / "conf" / "inspect").glob("*.yaml"))
    return [str(k) for path in options for k in OmegaConf.load(path) if k != "defaults"]


def _omegaconf(name: str) -> Any:
    """An omegaconf type, or ``()`` while omegaconf is not imported (then no value is one)."""
    return getattr(sys.modules.get("omegaconf"), name, ())


def _is_mapping(value: Any) -> bool:
    return isinstance(value, (Mapping, _omegaconf("DictConfig")))


def _is_sequence(value: Any) -> bool:
    return isinstance(value, (list, tuple, _omegaconf("ListConfig")))


def _get(cfg: Any, name: Any) -> Any:
    """A value, without resolving an interpolation that fails outside a Hydra run."""
    try:
        return cfg[name]
    except Exception:
        node = cfg._get_node(name)
        return node._value() if node is not None else None


def _show(value: Any) -> str:
    if isinstance(value, (_omegaconf("DictConfig"), _omegaconf("ListConfig"))):
        try:
            return repr(_omegaconf("OmegaConf").to_container(value, resolve=False))
        except Exception:
            return str(value)
    return repr(value)


def _did_you_mean(value: str, candidates: Iterable[Any]) -> str:
    """``" Did you mean 'x'?"`` with the single closest candidate, or ``""``."""
    near = closest(value, [str(c) for c in candidates], n=1)
    return f" Did you mean {near[0]!r}?" if near else ""

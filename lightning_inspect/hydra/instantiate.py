"""Build the callbacks of the Hydra ``inspect`` group, checking every key before anything is built.
Only an entry's own ``_target_`` (a Lightning ``Callback`` class) is instantiated."""

from __future__ import annotations

import inspect as _pyinspect
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import Callback

from lightning_inspect._validation import closest
from lightning_inspect.errors import ConfigError

__all__ = ["instantiate_callbacks", "validate_callback_config"]

# read by Hydra's instantiate itself, never passed to the constructor
HYDRA_KEYS = ("_target_", "_args_", "_partial_", "_convert_", "_recursive_")


def instantiate_callbacks(cfg: Any, key: str | None = None) -> list[Callback]:
    """The callbacks described by ``cfg`` (usually ``cfg.get("inspect")``), in order.

    ``cfg``: ``None``, a mapping ``name -> {_target_: ..., <arguments>}`` or a list of entries (a
    ``None`` entry or ``_target_`` is skipped); ``key``: the path in messages (default: the node's).
    A ConfigError starts with the key path (``inspect.activations.bins``).

    Example:
        >>> cbs = instantiate_callbacks({"graph": {"_target_": "lightning_inspect.GraphMonitor"}})
        >>> [type(cb).__name__ for cb in cbs]
        ['GraphMonitor']
    """
    if cfg is None:
        return []
    if key is None:  # the node's own path in its Hydra config; a plain dict or list has none
        key = str(getattr(cfg, "_get_full_key", lambda _: None)(None) or "inspect")
    if (entries := _children(cfg, key)) is None:
        raise ConfigError(
            f"{key}={_show(cfg)}: expected a mapping name -> {{_target_: ..., arguments}} (the "
            "inspect group, e.g. +inspect=activations), a list of such entries, or null."
        )
    checked = [(path, e, validate_callback_config(e, path)) for path, e in entries]
    return [_instantiate(e, path, target) for path, e, target in checked if target is not None]


def validate_callback_config(entry: Any, path: str) -> type | None:
    """Check one entry's keys against its target class; return the class (``None``: skipped).

    Example:
        >>> validate_callback_config({"_target_": "lightning_inspect.GraphMonitor"}, "inspect.g")
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
    for child_path, child in _children(entry, path) or ():
        if child_path != f"{path}._target_":
            _refuse_targets(child, child_path)
    return target


def _locate(
    name: Any, path: str
) -> type:  # imported, never called; a ConfigError unless a Callback
    if not isinstance(name, str) or not name:
        raise ConfigError(
            f"{path}={name!r}: expected a dotted class path such as lightning_inspect.ActivationMonitor."
        )
    from hydra.utils import get_object

    try:
        target = get_object(name)
    except Exception as exc:
        known = [f"lightning_inspect.{n}" for n in sys.modules["lightning_inspect"].__all__]
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


def _refuse_targets(value: Any, path: str) -> None:  # a nested _target_ could call any function
    if _is_mapping(value) and "_target_" in value:
        raise ConfigError(
            f"{path}={_show(value)}: a nested _target_ is not allowed. Only the entry's "
            "own _target_ (a Lightning Callback class) is instantiated; its arguments must be "
            "plain values (numbers, strings, lists, mappings without _target_)."
        )
    for child_path, child in _children(value, path) or ():
        _refuse_targets(child, child_path)


def _check_keys(entry: Any, path: str, target: type) -> None:
    params = _pyinspect.signature(target).parameters.values()
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
    if missing := [n for n, p in named.items() if p.default is p.empty and n not in given]:
        raise ConfigError(
            f"{path}: missing required key(s) {', '.join(missing)} of {entry['_target_']}."
        )


def _instantiate(entry: Any, path: str, target: type) -> Callback:
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    cause: BaseException | None = None
    try:
        callback = instantiate(entry, **({} if "_convert_" in entry else {"_convert_": "all"}))
    except (InstantiationException, ConfigError) as exc:
        cause = exc  # the constructor's error, wrapped by Hydra
        while isinstance(cause, InstantiationException) and (cause.__cause__ or cause.__context__):
            cause = cause.__cause__ or cause.__context__
    # raised outside the handler: no chained copy of the same message
    if isinstance(cause, ConfigError):
        raise type(cause)(f"{path}: {cause}")
    if cause is not None:
        raise ConfigError(
            f"{path}: building {target.__module__}.{target.__qualname__} failed: "
            f"{type(cause).__name__}: {cause}"
        ) from cause
    if not isinstance(callback, Callback):  # e.g. _partial_: true
        raise ConfigError(
            f"{path}: instantiating {entry['_target_']} gave {type(callback).__name__}, not a "
            "Lightning Callback."
        )
    return callback


def _shipped_entries() -> list[str]:  # activations, gradients, ...
    from omegaconf import OmegaConf

    options = sorted((Path(__file__).parents[1] / "conf" / "inspect").glob("*.yaml"))
    return [str(k) for path in options for k in OmegaConf.load(path) if k != "defaults"]


def _omegaconf(name: str) -> Any:  # () while omegaconf is not imported: then no value is one
    return getattr(sys.modules.get("omegaconf"), name, ())


def _is_mapping(value: Any) -> bool:
    return isinstance(value, (Mapping, _omegaconf("DictConfig")))


def _children(value: Any, path: str) -> list[tuple[str, Any]] | None:  # None: not a collection
    if _is_mapping(value):
        return [(f"{path}.{name}", _get(value, name)) for name in value]
    if isinstance(value, (list, tuple, _omegaconf("ListConfig"))):
        return [(f"{path}[{i}]", item) for i, item in enumerate(value)]
    return None


def _get(cfg: Any, name: Any) -> Any:  # unresolved if its interpolation fails outside a Hydra run
    try:
        return cfg[name]
    except Exception:  # a DictConfig or ListConfig: its item exists
        return cfg._get_node(name)._value()


def _show(value: Any) -> str:
    if isinstance(value, (_omegaconf("DictConfig"), _omegaconf("ListConfig"))):
        return repr(_omegaconf("OmegaConf").to_container(value, resolve=False))
    return repr(value)


def _did_you_mean(value: str, candidates: Iterable[Any]) -> str:
    near = closest(value, [str(c) for c in candidates], n=1)
    return f" Did you mean {near[0]!r}?" if near else ""

"""Build the callbacks of the Hydra ``inspect`` group, checking every key before training starts.

The group's options (``activations``, ``gradients``, ``weights``, ``graph``, ``all``, ``debug``,
``probes``) each add ``name -> {_target_: <Callback class>, <arguments>}`` to ``cfg.inspect``.
:func:`instantiate_callbacks` turns that mapping into a list of Lightning callbacks; it is the one
line a Hydra training script adds:

Example::

    import hydra
    import lightning as L
    from lightning_inspect import instantiate_callbacks

    @hydra.main(config_path="conf", config_name="config", version_base="1.3")
    def main(cfg):
        trainer = L.Trainer(callbacks=instantiate_callbacks(cfg.get("inspect")))  # [] without +inspect
        ...

    # python train.py +inspect=activations inspect.activations.every_n_steps=10

A key the callback does not take (``inspect.activations.every_n_step=5``) raises
:class:`~lightning_inspect.errors.ConfigError` naming the full key, the valid keys and the
closest one; a bad value raises the callback's own ConfigError, prefixed with the key path
(once: not chained to a copy of itself). Only an entry's own ``_target_`` is instantiated, and
only when it is a Lightning ``Callback`` class; a ``_target_`` nested in an argument
(``inspect.activations.modules={_target_: builtins.open}``) is a ConfigError naming that key, and
nothing is called.

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
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from lightning.pytorch.callbacks import Callback

from lightning_inspect._validation import closest
from lightning_inspect.errors import ConfigError

__all__ = ["instantiate_callbacks", "validate_callback_config"]

#: Keys Hydra's ``instantiate`` reads itself; never passed to the constructor.
HYDRA_KEYS = ("_target_", "_args_", "_partial_", "_convert_", "_recursive_")
_DEFAULT_KEY = "inspect"
#: The callbacks the shipped options name, for "did you mean" hints.
KNOWN_TARGETS = tuple(
    f"lightning_inspect.{name}"
    for name in (
        "ActivationMonitor",
        "GradientMonitor",
        "WeightMonitor",
        "GraphMonitor",
        "ProbeSwitch",
        "HealthMonitor",
        "ShapeTracer",
        "RunRecord",
    )
)
#: The entry names the shipped options use.
KNOWN_ENTRIES = (
    "activations",
    "gradients",
    "weights",
    "graph",
    "probes",
    "health",
    "shapes",
    "record",
)


def instantiate_callbacks(cfg: Any, key: str | None = None) -> list[Callback]:
    """The callbacks described by ``cfg`` (usually ``cfg.get("inspect")``), in order.

    Args:
        cfg: ``None`` or empty (no ``+inspect`` given: returns ``[]``), a mapping
            ``name -> {_target_: ..., <arguments>}`` (DictConfig or dict), or a list of such
            entries. An entry that is ``None`` or whose ``_target_`` is ``None`` is skipped, so
            ``inspect.gradients=null`` switches one monitor off. ``enabled: false`` is passed to
            the callback, which then stays attached but inspects nothing.
        key: the key path used in messages; default: the node's own path in the Hydra config
            (``inspect``).

    Raises:
        ConfigError: before anything is built, for an entry that is not a mapping, has no
            ``_target_``, names a class that cannot be imported or is not a Lightning
            callback, has a key the class does not take, or holds a nested ``_target_`` in an
            argument; afterwards, for a value the callback
            rejects. Every message starts with the key path (``inspect.activations.bins``).

    Example:
        >>> cbs = instantiate_callbacks({"graph": {"_target_": "lightning_inspect.GraphMonitor"}})
        >>> [type(cb).__name__ for cb in cbs]
        ['GraphMonitor']
    """
    if cfg is None:
        return []
    root = key if key is not None else _node_path(cfg)
    entries = list(_entries(cfg, root))
    checked = [(path, entry, validate_callback_config(entry, path)) for path, entry in entries]
    callbacks: list[Callback] = []
    for path, entry, target in checked:
        if target is None:
            continue
        callbacks.append(_instantiate(entry, path, target))
    return callbacks


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
        name = path.rsplit(".", 1)[-1]
        raise ConfigError(
            f"{path}: no _target_ (keys: {', '.join(map(str, entry)) or 'none'}).{did_you_mean(name, KNOWN_ENTRIES)} "
            "Each entry names its callback class (_target_: lightning_inspect.ActivationMonitor); add "
            "the option before overriding its keys: +inspect=activations inspect.activations.every_n_steps=10."
        )
    target_name = entry["_target_"]
    if target_name is None:
        return None
    target = _locate(target_name, f"{path}._target_")
    _check_keys(entry, path, target)
    _refuse_nested_targets(entry, path)
    return target


# -- workers --------------------------------------------------------------------------------------


def _entries(cfg: Any, root: str) -> Iterator[tuple[str, Any]]:
    if _is_mapping(cfg):
        for name in cfg:
            yield f"{root}.{name}", _get(cfg, name)
    elif _is_sequence(cfg):
        for i, entry in enumerate(cfg):
            yield f"{root}[{i}]", entry
    else:
        raise ConfigError(
            f"{root}={_show(cfg)}: expected a mapping name -> {{_target_: ..., arguments}} (the "
            "inspect group, e.g. +inspect=activations), a list of such entries, or null."
        )


def _locate(target_name: Any, path: str) -> type:
    """The class ``target_name`` names, imported, never called; a ConfigError unless a Callback."""
    if not isinstance(target_name, str) or not target_name:
        raise ConfigError(
            f"{path}={target_name!r}: expected a dotted class path such as lightning_inspect.ActivationMonitor."
        )
    from hydra.utils import get_object

    try:
        target = get_object(target_name)
    except Exception as exc:
        raise ConfigError(
            f"{path}={target_name!r}: no such class can be imported.{did_you_mean(target_name, KNOWN_TARGETS)}"
        ) from exc
    if not (isinstance(target, type) and issubclass(target, Callback)):
        kind = target.__qualname__ if isinstance(target, type) else f"a {type(target).__name__}"
        raise ConfigError(
            f"{path}={target_name!r}: {kind} is not a Lightning Callback; only Callback classes "
            "are instantiated."
        )
    return target


def _refuse_nested_targets(entry: Any, path: str) -> None:
    """A ConfigError naming the first argument of ``entry`` that holds a ``_target_`` of its own.

    Only an entry's own ``_target_`` is instantiated: a nested one would call any importable
    function (``builtins.open``) with arguments taken from the command line.
    """
    for name in entry:
        if str(name) != "_target_":
            _find_target(_get(entry, name), f"{path}.{name}")


def _find_target(value: Any, path: str) -> None:
    if _is_mapping(value):
        if "_target_" in value:
            raise ConfigError(
                f"{path}={_show(value)}: a nested _target_ is not allowed. Only the entry's "
                "own _target_ (a Lightning Callback class) is instantiated; its arguments must be "
                "plain values (numbers, strings, lists, mappings without _target_)."
            )
        for name in value:
            _find_target(_get(value, name), f"{path}.{name}")
    elif _is_sequence(value):
        for i, item in enumerate(value):
            _find_target(item, f"{path}[{i}]")


def _check_keys(entry: Any, path: str, target: type) -> None:
    params = _init_parameters(target)
    if params is None:  # the constructor takes **kwargs: leave the checks to it
        return
    given = [str(k) for k in entry if str(k) not in HYDRA_KEYS]
    for name in given:
        if name not in params:
            value = _get(entry, name)
            raise ConfigError(
                f"{path}.{name}: unknown key for {entry['_target_']} (value {_show(value)})."
                f"{did_you_mean(name, params)} Valid keys: {', '.join(params) or 'none'}."
            )
    if "_args_" in entry or entry.get("_partial_", False):
        return
    missing = [
        n for n, p in params.items() if p.default is p.empty and p.kind is not p.VAR_POSITIONAL
    ]
    missing = [n for n in missing if n not in given]
    if missing:
        raise ConfigError(
            f"{path}: missing required key(s) {', '.join(missing)} of {entry['_target_']}."
        )


def _init_parameters(target: type) -> dict[str, _pyinspect.Parameter] | None:
    try:
        signature = _pyinspect.signature(target)
    except (TypeError, ValueError):
        return None
    params: dict[str, _pyinspect.Parameter] = {}
    for name, param in signature.parameters.items():
        if param.kind is param.VAR_KEYWORD:
            return None
        if param.kind is not param.VAR_POSITIONAL and param.kind is not param.POSITIONAL_ONLY:
            params[name] = param
    return params


def _instantiate(entry: Any, path: str, target: type) -> Callback:
    """Build one checked entry; a callback's ConfigError is raised once, prefixed with ``path``."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    extra: dict[str, Any] = {} if "_convert_" in entry else {"_convert_": "all"}
    rejected: ConfigError | None = None
    try:
        callback = instantiate(entry, **extra)
    except InstantiationException as exc:
        cause = _root_cause(exc)
        if not isinstance(cause, ConfigError):
            raise ConfigError(
                f"{path}: building {target.__module__}.{target.__qualname__} failed: "
                f"{type(cause).__name__}: {cause}"
            ) from cause
        rejected = cause
    except ConfigError as exc:
        rejected = exc
    if rejected is not None:
        # raised outside the handler: no chained copy of the same message in the traceback
        raise type(rejected)(f"{path}: {rejected}")
    if not isinstance(callback, Callback):  # e.g. _partial_: true
        raise ConfigError(
            f"{path}: instantiating {entry['_target_']} gave {type(callback).__name__}, not a Lightning Callback."
        )
    return callback


def _root_cause(exc: BaseException) -> BaseException:
    """The first non-Hydra exception in the cause chain (Hydra wraps constructor errors)."""
    from hydra.errors import InstantiationException

    seen: set[int] = set()
    current: BaseException = exc
    while isinstance(current, InstantiationException) and id(current) not in seen:
        seen.add(id(current))
        nxt = current.__cause__ or current.__context__
        if nxt is None:
            break
        current = nxt
    return current


def _node_path(cfg: Any) -> str:
    """``cfg``'s own key path in its Hydra config (``inspect``), else ``inspect``."""
    get_full_key: Callable[[Any], str] | None = getattr(cfg, "_get_full_key", None)
    if get_full_key is None:
        return _DEFAULT_KEY
    try:
        full = get_full_key(None)
    except Exception:
        return _DEFAULT_KEY
    return str(full) if full else _DEFAULT_KEY


def _is_mapping(value: Any) -> bool:
    if isinstance(value, Mapping):
        return True
    from omegaconf import DictConfig

    return isinstance(value, DictConfig)


def _is_sequence(value: Any) -> bool:
    from omegaconf import ListConfig

    return isinstance(value, (list, tuple, ListConfig))


def _get(cfg: Any, name: Any) -> Any:
    """A value without resolving interpolations that may fail outside a Hydra run."""
    from omegaconf import DictConfig

    if isinstance(cfg, DictConfig):
        node = cfg._get_node(name)
        try:
            return cfg[name]
        except Exception:
            return node._value() if node is not None else None
    return cfg[name]


def _show(value: Any) -> str:
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(value, (DictConfig, ListConfig)):
        try:
            return repr(OmegaConf.to_container(value, resolve=False))
        except Exception:
            return str(value)
    return repr(value)


def did_you_mean(value: str, candidates: Any) -> str:
    """``" Did you mean 'x'?"`` with the single closest candidate, or ``""``.

    >>> did_you_mean("every_n_step", ["every_n_steps", "start_step"])
    " Did you mean 'every_n_steps'?"
    """
    near = closest(value, [str(c) for c in candidates], n=1)
    return f" Did you mean {near[0]!r}?" if near else ""

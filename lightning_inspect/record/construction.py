"""Construction records: a Hydra config that rebuilds an object, from explicit sources only."""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.util
import inspect
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple, NoReturn, TypeVar

import torch
from torch import nn

from lightning_inspect.core.selection import normalise_name
from lightning_inspect.errors import ConfigError
from lightning_inspect.record.config import dump_yaml, to_plain
from lightning_inspect.record.data import fixed_random_state

T = TypeVar("T")
#: The ``_target_`` of a placeholder for an argument that could not be recorded.
UNRECORDED_TARGET = "lightning_inspect.record.unrecorded"
#: How to give an object an explicit construction record.
HOW_TO_RECORD = (
    "decorate its class with lightning_inspect.record_init, build it from a Hydra _target_ config, "
    "or call save_hyperparameters() in its __init__"
)
_INIT_ATTR = "_lightning_inspect_init_args"


def unrecorded(type: str = "?", reason: str = "", **_: Any) -> NoReturn:
    """Target of a placeholder: building it fails, saying which argument to supply and why."""
    raise ConfigError(
        f"a construction record holds a placeholder for a {type} argument ({reason}); supply this "
        "argument yourself, e.g. instantiate(record, <argument>=value) or by editing the record."
    )


def _placeholder(value: Any, reason: str | None = None) -> dict[str, Any] | None:
    """A placeholder for ``value``; without ``reason``, only for a tensor or an array (described,
    never kept), else ``None``."""
    cls = value if isinstance(value, type) else type(value)
    if reason is None and not isinstance(value, torch.Tensor) and cls.__name__ != "ndarray":
        return None
    if reason is None:
        what = "a tensor" if isinstance(value, torch.Tensor) else "an array"
        reason = (
            f"{what} of shape {tuple(value.shape)} ({value.dtype}); its values are not recorded"
        )
    kind = value if isinstance(value, str) else f"{cls.__module__}.{cls.__qualname__}"
    return {"_target_": UNRECORDED_TARGET, "type": kind, "reason": reason}


class _InitArgs(NamedTuple):
    cls: type
    params: tuple[inspect.Parameter, ...]
    arguments: dict[str, Any]


def record_init(cls: type[T]) -> type[T]:
    """Class decorator: every instance remembers its ``__init__`` arguments (taken in ``__new__``).

    Example:
        >>> @record_init
        ... class Block(nn.Module):
        ...     def __init__(self, width: int, act: type[nn.Module] = nn.ReLU) -> None:
        ...         super().__init__()
        ...         self.net = nn.Sequential(nn.Linear(width, width), act())
        >>> recorded_init_args(Block(4)).arguments
        {'width': 4, 'act': <class 'torch.nn.modules.activation.ReLU'>}
    """
    if not isinstance(cls, type):
        raise ConfigError(f"record_init({cls!r}): expected a class to decorate.")
    own_new = cls.__dict__.get("__new__")
    own_new = getattr(own_new, "__func__", own_new)

    def __new__(subcls: type, *args: Any, **kwargs: Any) -> Any:
        parent_new = own_new or super(cls, subcls).__new__  # type: ignore[misc]
        plain = parent_new is object.__new__
        obj = parent_new(subcls) if plain else parent_new(subcls, *args, **kwargs)
        holder = getattr(obj, "__dict__", None)
        try:  # copy and pickle call __new__ without the arguments: nothing to bind
            signature = inspect.signature(subcls.__init__)  # type: ignore[misc]
            bound = signature.bind(None, *args, **kwargs)
        except (TypeError, ValueError):
            return obj
        if holder is not None and _INIT_ATTR not in holder:
            bound.apply_defaults()
            params = tuple(signature.parameters.values())[1:]
            kept = {k: _placeholder(v) or v for k, v in list(bound.arguments.items())[1:]}
            holder[_INIT_ATTR] = _InitArgs(subcls, params, kept)
        return obj

    cls.__new__ = staticmethod(__new__)  # type: ignore[assignment]
    return cls


@record_init
class RecordInit:
    """Mixin: like :func:`record_init` for the class and all its subclasses.

    Example:
        >>> class Head(RecordInit, nn.Linear):
        ...     pass
        >>> recorded_init_args(Head(8, 3)).arguments
        {'in_features': 8, 'out_features': 3, 'bias': True, 'device': None, 'dtype': None}
    """


def recorded_init_args(obj: Any) -> _InitArgs | None:
    """What :func:`record_init` remembered for ``obj`` (for its own class only)."""
    stored = getattr(obj, "__dict__", {}).get(_INIT_ATTR)
    return stored if isinstance(stored, _InitArgs) and stored.cls is type(obj) else None


@dataclasses.dataclass
class ConstructionRecord:
    """``instantiate(record.config)`` builds an equivalent object; ``verified``: rebuild checked."""

    config: dict[str, Any]
    source: str
    notes: list[str] = dataclasses.field(default_factory=list)
    verified: bool | None = None

    def to_yaml(self, title: str = "model") -> str:
        checked = {True: "yes, same modules and parameter shapes", False: "NO (see notes)"}
        head = [
            f"Construction record of the {title}: hydra.utils.instantiate(<this file, loaded>)",
            "builds an equivalent object; load the trained weights with load_state_dict.",
            f"Source of the arguments: {self.source}.",
            f"Rebuild checked: {checked.get(self.verified, 'no')}.",  # type: ignore[arg-type]
            *(f"Note: {note}" for note in self.notes),
        ]
        return "".join(f"# {line}\n" for line in head) + dump_yaml(self.config)


def _path(obj: Any) -> str | None:
    """The dotted path at which ``obj`` (a class or function) is found again, or ``None``."""
    module, name = getattr(obj, "__module__", None), getattr(obj, "__qualname__", "")
    try:
        found = functools.reduce(getattr, name.split("."), importlib.import_module(module))
    except Exception:  # defined inside a function, or not importable
        return None
    return f"{module}.{name}" if found is obj else None


def _record(value: Any, path: str, notes: list[str]) -> Any:
    """``value`` as a Hydra config node; objects from an explicit source, else a placeholder."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    listed = isinstance(value, Sequence) and not hasattr(value, "_fields")  # a namedtuple: no
    if listed and not isinstance(value, bytes):
        return [_record(v, f"{path}.{i}", notes) for i, v in enumerate(value)]
    node = _placeholder(value)
    if isinstance(value, Mapping):
        if value.get("_target_") != UNRECORDED_TARGET:
            return {str(k): _record(v, f"{path}.{k}", notes) for k, v in value.items()}
        node = dict(value)  # a placeholder made when the arguments were taken
    named = isinstance(value, type) or inspect.isroutine(value)
    target = _path(value if named else type(value))
    if node is None and target is None:
        node = _placeholder(value, "defined inside a function or not importable by name")
    elif node is None and named:
        return {"_target_": "hydra.utils.get_object", "path": target}
    elif node is None and (init := recorded_init_args(value) or _from_hparams(value, path, notes)):
        return _call(target, init, path, notes)
    elif node is None:
        why = f"its constructor arguments were not recorded: {HOW_TO_RECORD}"
        node = _placeholder(value, why)
    notes.append(f"{path}: not recorded ({node['type']}: {node['reason']})")
    return node


def _from_hparams(obj: Any, path: str, notes: list[str]) -> _InitArgs | None:
    """Arguments from ``save_hyperparameters``; placeholders for those left out without a default."""
    saved = getattr(obj, "hparams", None) if "_hparams" in getattr(obj, "__dict__", {}) else None
    if not isinstance(saved, Mapping) or not saved:
        return None
    saved = dict(saved)
    params = tuple(inspect.signature(type(obj).__init__).parameters.values())[1:]
    by_name = {p.name: p for p in params}
    whole = getattr(obj, "_hparams_name", None)  # save_hyperparameters(config): one mapping
    if whole in by_name and by_name[whole].kind is not inspect.Parameter.VAR_KEYWORD:
        return _InitArgs(type(obj), params, {whole: saved})
    any_kwargs = any(p.kind is p.VAR_KEYWORD for p in params)
    arguments = {k: v for k, v in saved.items() if k in by_name or any_kwargs}
    for p in params:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.name in arguments:
            continue
        if p.default is p.empty:
            why = f"argument {p.name!r} is not in the saved hyperparameters; {HOW_TO_RECORD}"
            arguments[p.name] = _placeholder("?", why)
        else:
            default = f"its default ({p.default!r}) is used"
            notes.append(f"{path}.{p.name}: not in the saved hyperparameters; {default}")
    return _InitArgs(type(obj), params, arguments)


def _call(target: str | None, init: _InitArgs, path: str, notes: list[str]) -> dict[str, Any]:
    """``{"_target_": target, "_args_": [...], **kwargs}`` from ``init``'s bound arguments."""
    out: dict[str, Any] = {"_target_": target}
    kinds = {p.name: p.kind for p in init.params}
    for name, value in init.arguments.items():
        kind = kinds.get(name)
        if kind is inspect.Parameter.VAR_KEYWORD:
            out.update({str(k): _record(v, f"{path}.{k}", notes) for k, v in value.items()})
        elif kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.VAR_POSITIONAL):
            items = value if kind is inspect.Parameter.VAR_POSITIONAL else [value]
            out.setdefault("_args_", []).extend(_record(v, f"{path}.{name}", notes) for v in items)
        else:
            out[name] = _record(value, f"{path}.{name}", notes)
    return out


def rebuild_mismatch(config: Mapping[str, Any], original: nn.Module) -> str | None:
    """How ``instantiate(config)``, built on the meta device, differs from ``original``, or None."""
    from hydra.utils import instantiate

    try:
        with fixed_random_state(0), torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the constructors' own advice is noise here
            rebuilt = instantiate(dict(config))
    except Exception as exc:
        return f"building it failed ({type(exc).__name__}: {(str(exc).splitlines() or [''])[0]})"
    if type(rebuilt) is not type(original):
        return f"it builds a {type(rebuilt).__qualname__}, not a {type(original).__qualname__}"

    def layout(model: nn.Module) -> dict[str, Any]:
        tensors = [*model.named_parameters(), *model.named_buffers()]
        out = {
            f"module {normalise_name(n) or '<root>'!r}": type(m).__qualname__
            for n, m in model.named_modules()
        }
        return {**out, **{f"shape of {normalise_name(n)!r}": tuple(t.shape) for n, t in tensors}}

    want, got = layout(original), layout(rebuilt)
    problems = [
        f"{k}: {want.get(k)} vs rebuilt {got.get(k)}"
        for k in {**want, **got}
        if want.get(k) != got.get(k)
    ]
    more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
    return "; ".join(problems[:5]) + more if problems else None


def construction_record(
    obj: Any,
    hydra_node: Mapping[str, Any] | None = None,
    hydra_key: str = "model",
    verify: bool = True,
) -> ConstructionRecord:
    """A Hydra-instantiable config that builds an object equivalent to ``obj``.

    Sources: :func:`record_init`, ``hydra_node`` (at ``hydra_key``), ``save_hyperparameters``;
    with ``verify``, the first that rebuilds the same modules and shapes is taken.

    Example:
        >>> node = {"_target_": "torch.nn.Linear", "in_features": 2, "out_features": 4}
        >>> record = construction_record(nn.Linear(2, 4), node)
        >>> record.source, record.verified
        ("hydra config at 'model'", True)
        >>> construction_record(nn.Linear(2, 4)).source
        'none'
    """
    notes: list[str] = []
    config = {**_record(obj, hydra_key or "model", notes), "_convert_": "all"}
    source = "none" if config["_target_"] == UNRECORDED_TARGET else "hparams"
    source = "record_init" if recorded_init_args(obj) is not None else source
    own = (config, source, notes)
    candidates = [own] if source == "record_init" else []
    if hydra_node is not None:
        candidates.append((to_plain(hydra_node), f"hydra config at {hydra_key!r}", []))
    candidates += [own] if source == "hparams" else []
    hydra = importlib.util.find_spec("hydra") is not None
    if not candidates or not verify or not hydra or not isinstance(obj, nn.Module):
        return ConstructionRecord(*(candidates or [own])[0])
    failures = []
    for config, source, found in candidates:
        problem = rebuild_mismatch(config, obj)
        if problem is None:
            return ConstructionRecord(config, source, list(found), True)
        failures.append(f"rebuild check failed from {source}: {problem}")
    config, source, found = candidates[0]
    return ConstructionRecord(config, source, [*found, *failures], False)

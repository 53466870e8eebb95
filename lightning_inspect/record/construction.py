"""Construction records: a Hydra config that rebuilds an object, from explicit sources only.

The sources are the arguments remembered by :func:`record_init`, the Hydra ``_target_`` node the
object was built from, and ``save_hyperparameters``; nothing is guessed from attributes.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import importlib.util
import inspect
import pathlib
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, NoReturn, TypeVar

import numpy as np
import torch
from torch import nn

from lightning_inspect.core.selection import normalise_name
from lightning_inspect.errors import ConfigError
from lightning_inspect.record.config import dump_yaml, locate, to_plain
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
_SMALL_ARRAY = 64


def unrecorded(type: str = "?", reason: str = "", **_: Any) -> NoReturn:
    """Target of a placeholder: building it fails, saying which argument to supply and why.

    Example:
        >>> unrecorded(type="torch.Tensor", reason="a large tensor")
        Traceback (most recent call last):
        ...
        lightning_inspect.errors.ConfigError: a construction record holds a placeholder for a torch.Tensor argument (a large tensor); supply this argument yourself, e.g. instantiate(record, <argument>=value) or by editing the record.
    """
    raise ConfigError(
        f"a construction record holds a placeholder for a {type} argument ({reason}); supply this "
        "argument yourself, e.g. instantiate(record, <argument>=value) or by editing the record."
    )


@dataclasses.dataclass(frozen=True)
class _Placeholder:
    type: str
    reason: str


@dataclasses.dataclass(frozen=True)
class _InitArgs:
    cls: type
    params: tuple[inspect.Parameter, ...]
    arguments: dict[str, Any]


def _large(value: Any) -> _Placeholder | None:
    """A description of a tensor or array whose values are not recorded (large, sparse, meta)."""
    if isinstance(value, torch.Tensor):
        small = (
            value.numel() <= _SMALL_ARRAY and value.layout == torch.strided and not value.is_meta
        )
        kind, what = "torch.Tensor", "a tensor"
    elif isinstance(value, np.ndarray):
        small, kind, what = (
            value.size <= _SMALL_ARRAY and value.dtype != object,
            "numpy.ndarray",
            "an array",
        )
    else:
        return None
    why = f"{what} of shape {tuple(value.shape)} ({value.dtype}); its values are not recorded"
    return None if small else _Placeholder(kind, why)


def record_init(cls: type[T]) -> type[T]:
    """Class decorator: every instance remembers the arguments it was constructed with.

    They are bound to ``__init__``'s signature (defaults filled in) in ``__new__``, so
    ``__init__``, ``save_hyperparameters``, copies, pickling and subclasses are unchanged. Large
    tensors and arrays are kept only as a description.

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
        parent_new = super(cls, subcls).__new__  # type: ignore[misc]
        if own_new is not None:
            obj = own_new(subcls, *args, **kwargs)
        else:
            obj = (
                parent_new(subcls)
                if parent_new is object.__new__
                else parent_new(subcls, *args, **kwargs)
            )
        holder = getattr(obj, "__dict__", None)
        if holder is not None and _INIT_ATTR not in holder:
            try:
                signature = inspect.signature(subcls.__init__)  # type: ignore[misc]
                bound = signature.bind(None, *args, **kwargs)
            except (TypeError, ValueError):  # copy and pickle call __new__ without arguments
                return obj
            bound.apply_defaults()
            params = tuple(signature.parameters.values())[1:]
            names = {p.name for p in params}
            kept = {k: _large(v) or v for k, v in bound.arguments.items() if k in names}
            holder[_INIT_ATTR] = _InitArgs(subcls, params, kept)
        return obj

    cls.__new__ = staticmethod(__new__)  # type: ignore[assignment]
    return cls


@record_init
class RecordInit:
    """Mixin: like :func:`record_init` for the class and all its subclasses.

    Example:
        >>> class Head(RecordInit, nn.Module):
        ...     def __init__(self, features: int, classes: int) -> None:
        ...         super().__init__()
        ...         self.fc = nn.Linear(features, classes)
        >>> recorded_init_args(Head(8, 3)).arguments
        {'features': 8, 'classes': 3}
    """


def recorded_init_args(obj: Any) -> _InitArgs | None:
    """What :func:`record_init` remembered for ``obj``, if it was for ``obj``'s own class."""
    stored = getattr(obj, "__dict__", {}).get(_INIT_ATTR)
    return stored if isinstance(stored, _InitArgs) and stored.cls is type(obj) else None


def object_path(obj: Any) -> str | None:
    """A dotted path at which ``obj`` (a class or function) can be found again, or ``None``.

    Example:
        >>> object_path(nn.Linear), object_path(torch.relu)
        ('torch.nn.modules.linear.Linear', 'torch.relu')
    """
    module, name = getattr(obj, "__module__", None), getattr(obj, "__name__", "")
    paths = [f"{module}.{getattr(obj, '__qualname__', name)}", f"{module}.{name}"] if module else []
    for path in [*paths, *(f"{m}.{name}" for m in ("torch", "torch.nn.functional", "math"))]:
        try:
            if "<" not in path and locate(path) is obj:
                return path
        except Exception:
            continue
    return None


def _type_name(obj: Any) -> str:
    cls = obj if isinstance(obj, type) else type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def _saved_hparams(obj: Any) -> dict[str, Any] | None:
    """``save_hyperparameters`` values of a LightningModule / LightningDataModule, if any."""
    if "_hparams" not in getattr(obj, "__dict__", {}):
        return None
    hparams = getattr(obj, "hparams", None)
    return dict(hparams) if isinstance(hparams, Mapping) and hparams else None


@dataclasses.dataclass
class ConstructionRecord:
    """How an object was built: ``hydra.utils.instantiate(record.config)`` builds an equivalent one.

    Attributes:
        config: ``{"_target_": ..., **arguments}``, nested for components.
        source: ``"record_init"``, ``"hydra config at <key>"``, ``"hparams"``, ``"structure"``
            (module containers, dataclasses, named tuples) or ``"none"`` (a placeholder).
        notes: arguments defaulted or replaced by placeholders, by path; failed rebuild checks.
        verified: whether a rebuild on the meta device had the same modules and shapes (``None``:
            not checked).
    """

    config: dict[str, Any]
    source: str
    notes: list[str] = dataclasses.field(default_factory=list)
    verified: bool | None = None

    def to_yaml(self, title: str = "model") -> str:
        """The config as YAML, with the source, the check and the notes as comments on top."""
        checked = {True: "yes, same modules and parameter shapes", False: "NO (see notes)"}
        lines = [
            f"# Construction record of the {title}: hydra.utils.instantiate(yaml.safe_load(<this file>))",
            "# builds an equivalent object; load the trained weights with load_state_dict.",
            f"# Source of the arguments: {self.source}.",
            f"# Rebuild checked: {checked.get(self.verified, 'no')}.",  # type: ignore[arg-type]
            *(f"# Note: {note}" for note in self.notes),
        ]
        return "\n".join(lines) + "\n" + dump_yaml(self.config)


class _Recorder:
    """Turns objects into Hydra-instantiable configs, collecting notes by path."""

    def __init__(self) -> None:
        self.notes: list[str] = []

    def placeholder(self, path: str, type_name: str, reason: str) -> dict[str, Any]:
        self.notes.append(f"{path}: not recorded ({type_name}: {reason})")
        return {"_target_": UNRECORDED_TARGET, "type": type_name, "reason": reason}

    def value(self, value: Any, path: str) -> Any:
        large = value if isinstance(value, _Placeholder) else _large(value)
        if large is not None:
            return self.placeholder(path, large.type, large.reason)
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        if isinstance(value, np.generic):
            return value.item()
        if isinstance(value, torch.Tensor):
            return {
                "_target_": "torch.tensor",
                "data": value.tolist(),
                "dtype": self.value(value.dtype, path),
            }
        if isinstance(value, np.ndarray):
            return {"_target_": "numpy.array", "object": value.tolist(), "dtype": value.dtype.str}
        if isinstance(value, (enum.Enum, pathlib.PurePath, torch.device)):
            cls = pathlib.Path if isinstance(value, pathlib.PurePath) else type(value)
            arg = value.value if isinstance(value, enum.Enum) else str(value)
            return {"_target_": object_path(cls), "_args_": [self.value(arg, path)]}
        if isinstance(value, torch.dtype):
            return {"_target_": "hydra.utils.get_object", "path": str(value)}
        if type(value).__module__.startswith("omegaconf"):
            return self.value(to_plain(value), path)
        if isinstance(value, Mapping):
            if "_target_" in value:  # already a config (a Hydra node passed through)
                return to_plain(value)
            return {str(k): self.value(v, f"{path}.{k}") for k, v in value.items()}
        if isinstance(value, (list, tuple, set, frozenset)) and not hasattr(value, "_fields"):
            items = value if isinstance(value, (list, tuple)) else sorted(value, key=repr)
            return [self.value(v, f"{path}.{i}") for i, v in enumerate(items)]
        if isinstance(value, functools.partial):
            call = self.value(value.func, path)
            if call.get("_target_") != "hydra.utils.get_object":
                return call
            args = [self.value(v, f"{path}.{i}") for i, v in enumerate(value.args)]
            kwargs = {k: self.value(v, f"{path}.{k}") for k, v in value.keywords.items()}
            return {
                "_target_": call["path"],
                "_partial_": True,
                **({"_args_": args} if args else {}),
                **kwargs,
            }
        if isinstance(value, type) or inspect.isroutine(value):
            target = object_path(value)
            if target is None:
                lam = getattr(value, "__name__", "") == "<lambda>"
                why = "a lambda" if lam else "defined inside a function or not importable"
                return self.placeholder(
                    path, _type_name(value), f"{why}: it cannot be found by name"
                )
            return {"_target_": "hydra.utils.get_object", "path": target}
        return self.object(value, path)

    def object(self, obj: Any, path: str) -> dict[str, Any]:
        """``obj`` from an explicit source only; else a placeholder saying how to add one."""
        cls = type(obj)
        target = object_path(cls)
        if target is None:
            why = "its class is defined inside a function or cannot be imported by name"
            return self.placeholder(path, _type_name(obj), why)
        if target.startswith("__main__."):
            self.notes.append(
                f"{path}: {cls.__qualname__} is defined in the running script (__main__): "
                "rebuild it from that script, or move the class into a module"
            )
        if cls in (nn.Identity, nn.Sequential, nn.ModuleList, nn.ModuleDict):
            children = {n: self.value(m, f"{path}.{n}") for n, m in obj.named_children()}
            if cls is nn.ModuleDict:
                return {"_target_": target, "modules": children}
            key = "_args_" if cls in (nn.Sequential, nn.Identity) else "modules"
            return {"_target_": target, **({key: list(children.values())} if children else {})}
        recorded = recorded_init_args(obj)
        if recorded is not None:
            return self.arguments(target, recorded.params, recorded.arguments, path)
        if dataclasses.is_dataclass(obj) or hasattr(obj, "_asdict"):  # named tuples
            fields = obj._asdict() if hasattr(obj, "_asdict") else {
                f.name: getattr(obj, f.name) for f in dataclasses.fields(obj) if f.init
            }  # fmt: skip
            return {
                "_target_": target,
                **{k: self.value(v, f"{path}.{k}") for k, v in fields.items()},
            }
        saved = _saved_hparams(obj)
        if saved is None:
            return self.placeholder(
                path,
                _type_name(obj),
                f"its constructor arguments were not recorded: {HOW_TO_RECORD}",
            )
        params = tuple(inspect.signature(cls.__init__).parameters.values())[1:]  # type: ignore[misc]
        by_name = {p.name: p for p in params}
        whole = getattr(obj, "_hparams_name", None)  # save_hyperparameters(config): one mapping
        if whole in by_name and by_name[whole].kind is not inspect.Parameter.VAR_KEYWORD:
            return self.arguments(target, params, {whole: saved}, path)
        takes_kwargs = any(p.kind is p.VAR_KEYWORD for p in params)
        arguments = {k: v for k, v in saved.items() if k in by_name or takes_kwargs}
        for p in params:
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.name in arguments:
                continue
            if p.default is p.empty:
                why = f"argument {p.name!r} is not in the saved hyperparameters; {HOW_TO_RECORD}"
                arguments[p.name] = _Placeholder("?", why)
            else:
                self.notes.append(
                    f"{path}.{p.name}: not in the saved hyperparameters; its default ({p.default!r}) is used"
                )
        return self.arguments(target, params, arguments, path)

    def arguments(
        self,
        target: str,
        params: Sequence[inspect.Parameter],
        arguments: Mapping[str, Any],
        path: str,
    ) -> dict[str, Any]:
        """``{"_target_": target, "_args_": [...], **kwargs}`` from arguments bound to ``params``."""
        positional: list[Any] = []
        kwargs: dict[str, Any] = {}
        kinds = {p.name: p.kind for p in params}
        for name, value in arguments.items():
            kind = kinds.get(name)
            if kind is inspect.Parameter.POSITIONAL_ONLY:
                positional.append(self.value(value, f"{path}.{name}"))
            elif kind is inspect.Parameter.VAR_POSITIONAL:
                positional += [self.value(v, f"{path}.{name}.{i}") for i, v in enumerate(value)]
            elif kind is inspect.Parameter.VAR_KEYWORD:
                kwargs.update({str(k): self.value(v, f"{path}.{k}") for k, v in value.items()})
            else:
                kwargs[name] = self.value(value, f"{path}.{name}")
        return {"_target_": target, **({"_args_": positional} if positional else {}), **kwargs}


def rebuild_mismatch(
    config: Mapping[str, Any], original: nn.Module, max_params: int = 50_000_000
) -> str | None:
    """``None`` when ``hydra.utils.instantiate(config)`` builds ``original``'s modules and shapes.

    Built on the meta device (no memory, random generators restored), or on the CPU where that
    fails and ``original`` is small; otherwise a sentence saying what differs.

    Example:
        >>> rebuild_mismatch({"_target_": "torch.nn.Linear", "in_features": 2, "out_features": 3}, nn.Linear(2, 3)) is None
        True
    """
    from hydra.utils import instantiate

    def build(device: str) -> Any:
        with fixed_random_state(0), torch.device(device), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the constructors' own advice is noise here
            return instantiate(dict(config))

    try:
        rebuilt = build("meta")
    except Exception as exc:
        if sum(p.numel() for p in original.parameters()) > max_params:
            return f"could not be built on the meta device ({type(exc).__name__}: {exc})"
        try:
            rebuilt = build("cpu")
        except Exception as exc2:
            return (
                f"building it failed ({type(exc2).__name__}: {(str(exc2).splitlines() or [''])[0]})"
            )
    if type(rebuilt) is not type(original):
        return f"it builds a {_type_name(rebuilt)}, not a {_type_name(original)}"

    def signature(model: nn.Module) -> dict[str, Any]:
        tensors = [*model.named_parameters(), *model.named_buffers()]
        shapes = {f"shape of {normalise_name(n)!r}": tuple(t.shape) for n, t in tensors}
        types = {
            f"module {normalise_name(n) or '<root>'!r}": type(m).__qualname__
            for n, m in model.named_modules()
        }
        return {**types, **shapes}

    want, got = signature(original), signature(rebuilt)
    problems = [
        f"{name}: {want.get(name)} vs rebuilt {got.get(name)}"
        for name in sorted(set(want) | set(got), key=lambda n: (n[0] == "s", n))
        if want.get(name) != got.get(name)
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

    Candidates, in order: the arguments remembered by :func:`record_init`; ``hydra_node`` (the
    ``_target_`` node at ``hydra_key``); ``save_hyperparameters``. Object arguments get their own
    records from the same sources; what has none becomes a placeholder (``_target_:
    lightning_inspect.record.unrecorded``) that fails clearly when built. With ``verify`` (and
    ``obj`` a module) the first candidate that rebuilds the same modules and shapes is taken.

    Example:
        >>> node = {"_target_": "torch.nn.Linear", "in_features": 2, "out_features": 4}
        >>> record = construction_record(nn.Linear(2, 4), node)
        >>> record.source, record.verified
        ("hydra config at 'model'", True)
        >>> construction_record(nn.Linear(2, 4)).source
        'none'
    """
    recorder = _Recorder()
    config = {**recorder.object(obj, hydra_key or "model"), "_convert_": "all"}
    if recorded_init_args(obj) is not None:
        source = "record_init"
    elif config["_target_"] == UNRECORDED_TARGET:
        source = "none"
    else:
        source = "hparams" if _saved_hparams(obj) else "structure"
    own = (config, source, recorder.notes)
    candidates = [own] if source == "record_init" else []
    if hydra_node is not None:
        candidates.append((to_plain(hydra_node), f"hydra config at {hydra_key!r}", []))
    if source not in ("record_init", "none"):
        candidates.append(own)
    if not candidates:
        return ConstructionRecord(*own)
    if not verify or not isinstance(obj, nn.Module) or importlib.util.find_spec("hydra") is None:
        return ConstructionRecord(*candidates[0])
    failures = []
    for config, source, notes in candidates:
        problem = rebuild_mismatch(config, obj)
        if problem is None:
            return ConstructionRecord(config, source, list(notes), True)
        failures.append(f"rebuild check failed from {source}: {problem}")
    config, source, notes = candidates[0]
    return ConstructionRecord(config, source, [*notes, *failures], False)

"""The run's config (given, the running Hydra app's, or LightningCLI's) as plain values."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np


@dataclasses.dataclass
class ConfigRecord:
    """``source``: ``argument``, ``hydra``, ``lightning_cli`` or ``none``; ``notes``: what failed."""

    config: dict[str, Any] | None = None
    overrides: list[str] = dataclasses.field(default_factory=list)
    choices: dict[str, Any] = dataclasses.field(default_factory=dict)
    source: str = "none"
    output_dir: str | None = None
    notes: list[str] = dataclasses.field(default_factory=list)


def to_plain(
    config: Any, notes: list[str] | None = None, skip: Iterable[str] = (), leaf: Any = None
) -> Any:
    """A config as plain dicts and lists, resolved; what does not resolve is kept as written and
    named in ``notes``. Top-level ``skip`` keys are left out; ``leaf`` converts the other values.

    Example:
        >>> from omegaconf import OmegaConf
        >>> to_plain(OmegaConf.create({"a": 1, "b": "${a}", "c": "${oops}"}), notes := [])
        {'a': 1, 'b': 1, 'c': '${oops}'}
    """
    omega = sys.modules.get("omegaconf")  # a DictConfig exists only once omegaconf is imported
    notes = [] if notes is None else notes

    def child(node: Any, key: Any, path: str) -> Any:
        if not (omega and isinstance(node, omega.Container)):
            return walk(node[key], path)
        if omega.OmegaConf.is_missing(node, key):
            return "???"
        try:
            return walk(node[key], path)
        except Exception as exc:  # an unresolvable interpolation
            why = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"
            notes.append(f"{path}: not resolved ({why}); recorded as written")
            return omega.OmegaConf.to_container(node, resolve=False)[key]  # type: ignore[index]

    def walk(node: Any, path: str) -> Any:
        if omega and isinstance(node, omega.Container) and node._is_none():
            return None
        dotted = f"{path}." if path else ""
        if isinstance(node, Mapping):
            return {str(k): child(node, k, f"{dotted}{k}") for k in node if path or k not in skip}
        if isinstance(node, Sequence) and not isinstance(node, (str, bytes)):
            return [child(node, i, f"{dotted}{i}") for i in range(len(node))]
        return node if leaf is None else leaf(node)

    return walk(config, "")


def config_record(
    config: Any = None, overrides: Sequence[str] | None = None, callbacks: Sequence[Any] = ()
) -> ConfigRecord:
    """The run's config: ``config`` (its ``hydra`` node gives overrides and choices), else the
    running Hydra app's (``.hydra/config.yaml``, resolved), else LightningCLI's.
    """
    record = ConfigRecord()
    hydra_config = sys.modules.get("hydra.core.hydra_config")
    cli = sys.modules.get("lightning.pytorch.cli")  # imported by every LightningCLI run
    savers = [cb for cb in callbacks if cli and isinstance(cb, cli.SaveConfigCallback)]
    if config is not None:
        record.source, hydra = "argument", node_at(config, "hydra")
        with_hydra = node_at(hydra, "overrides") is not None
        if with_hydra:
            _from_hydra(record, hydra)
        record.config = to_plain(config, record.notes, skip=("hydra",) if with_hydra else ())
    elif hydra_config is not None and hydra_config.HydraConfig.initialized():
        runtime = hydra_config.HydraConfig.get()
        _from_hydra(record, runtime)
        record.source, subdir = "hydra", runtime.output_subdir
        path = Path(record.output_dir or "") / (subdir or "") / "config.yaml"
        if subdir and path.is_file():
            record.config = to_plain(sys.modules["omegaconf"].OmegaConf.load(path), record.notes)
        else:
            record.notes.append(
                "the Hydra run directory has no saved config (hydra.output_subdir is null?); "
                "pass RunRecord(config=cfg) to record it"
            )
    elif savers:
        import yaml

        # Positional (format, skip_none, skip_default, skip_check): jsonargparse renamed them.
        text = savers[0].parser.dump(savers[0].config, "yaml", False, False, True)
        record.source, record.config = "lightning_cli", yaml.safe_load(text)
    if overrides is not None:
        record.overrides = [str(o) for o in overrides]
    return record


def _from_hydra(record: ConfigRecord, hydra: Any) -> None:
    record.overrides = [str(o) for o in node_at(hydra, "overrides.task") or []]
    choices = (node_at(hydra, "runtime.choices") or {}).items()
    record.choices = {str(k): v if v is None else str(v) for k, v in choices if k[:6] != "hydra/"}
    with contextlib.suppress(Exception):  # an unresolvable interpolation outside a running app
        output_dir = node_at(hydra, "runtime.output_dir")
        record.output_dir = None if output_dir is None else str(output_dir)


def node_at(config: Any, dotted: str | None) -> Any:
    """The node at ``dotted`` (keys and list indices) inside ``config``, or ``None``."""
    node = config
    for part in filter(None, (dotted or "").split(".")):
        if isinstance(node, Mapping) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node


def find_target(config: Any, cls: type, prefer: str) -> str | None:
    """The key of the node whose ``_target_`` is ``cls``: ``prefer``, else the shallowest."""
    try:
        from hydra.utils import get_object
    except ImportError:  # no Hydra: no node names a target
        return None
    found, stack = [], [("", config)]
    while stack:
        path, node = stack.pop()
        with contextlib.suppress(Exception):  # not a node with a _target_ that resolves
            if isinstance(node, Mapping) and get_object(node["_target_"]) is cls:
                found.append(path)
        if isinstance(node, Mapping | list):
            items = node.items() if isinstance(node, Mapping) else enumerate(node)
            stack += [(f"{path}.{k}" if path else str(k), v) for k, v in items]
    return prefer if prefer in found else min(found, key=lambda p: (p.count("."), p), default=None)


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings as ``{"a/b": leaf}``; lists stay whole (as JSON text)."""
    if not isinstance(value, Mapping):
        return {
            prefix: json.dumps(value, default=str) if isinstance(value, list | tuple) else value
        }
    out = {} if value or not prefix else {prefix: "{}"}
    for key, item in value.items():
        out.update(flatten(item, f"{prefix}/{key}" if prefix else str(key)))
    return out


def dump_yaml(value: Any) -> str:
    """``value`` as block YAML, in plain YAML types (other objects as their text)."""
    import yaml

    def leaf(v: Any) -> Any:
        if isinstance(v, (set, frozenset)):
            return [to_plain(x, leaf=leaf) for x in v]
        v = v.item() if isinstance(v, np.generic) else v
        kind = next((t for t in (bool, int, float, str) if isinstance(v, t)), None)
        return kind(v) if kind else None if v is None else str(v)

    return yaml.safe_dump(to_plain(value, leaf=leaf), sort_keys=False, allow_unicode=True)

"""Module selection: name patterns over a model -> ``{qualified_name: module}``. Names lose the
wrappers' components (``_orig_mod``, FSDP, checkpointing, DDP's leading ``module``); patterns are
whole-name globs (``*`` crosses dots) or regexes prefixed ``re:``.

Example:
    >>> import torch.nn as nn
    >>> net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
    >>> list(select_modules(net, ["0", "re:[12]"]))
    ['0', '1', '2']
    >>> list(select_modules(net))  # default: modules that own parameters
    ['0', '2']
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from torch import nn

from lightning_inspect._validation import closest, compile_pattern
from lightning_inspect.errors import SelectionError

#: Name components inserted by wrappers; removed wherever they appear.
WRAPPER_COMPONENTS = ("_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module")


def normalise_name(name: str, data_parallel_root: bool = False) -> str:
    """Strip wrapper components from a qualified name; with ``data_parallel_root`` (the name comes
    from a DDP / DataParallel wrapper) also the leading ``module.``.

    >>> normalise_name("model._orig_mod.encoder._checkpoint_wrapped_module.0")
    'model.encoder.0'
    >>> normalise_name("module.head.module", data_parallel_root=True)
    'head.module'
    """
    parts = [p for p in name.split(".") if p and p not in WRAPPER_COMPONENTS]
    if data_parallel_root and parts and parts[0] == "module":
        parts.pop(0)
    return ".".join(parts)


def named_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every submodule but the root by normalised name: a shared module under its first name; a
    wrapper whose normalised name is its child's gives way to the child."""
    wrapped = isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel))
    names = ((normalise_name(raw, wrapped), module) for raw, module in model.named_modules())
    return {name: module for name, module in names if name}  # a child overwrites its wrapper


def _compile(texts: Iterable[str], kind: str = "module") -> list[tuple[str, re.Pattern[str]]]:
    return [(text, compile_pattern(text, kind)) for text in texts]


def select_modules(
    model: nn.Module,
    modules: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    *,
    owner: str = "select_modules",
) -> dict[str, nn.Module]:
    """``{normalised_name: module}`` in registration order; ``modules=None``: modules that own
    parameters directly. A pattern matching nothing raises :class:`SelectionError` with the
    closest names; ``owner`` names the caller in messages."""
    modules = [modules] if isinstance(modules, str) else modules
    exclude = [exclude] if isinstance(exclude, str) else exclude
    candidates = named_modules(model)
    if modules:
        chosen: set[str] = set()
        for text, pattern in _compile(modules):
            hits = [n for n in candidates if pattern.fullmatch(n)]
            if not hits:
                raise SelectionError(_no_match_message(owner, text, "module", candidates))
            chosen.update(hits)
        selected = {n: m for n, m in candidates.items() if n in chosen}
    else:
        selected = {n: m for n, m in candidates.items() if list(m.parameters(recurse=False))}
    excluded = _compile(exclude or ())
    return {n: m for n, m in selected.items() if not any(p.fullmatch(n) for _, p in excluded)}


def empty_selection_message(
    model: nn.Module, modules: Sequence[str], exclude: Sequence[str], owner: str
) -> str:
    """Why ``select_modules`` returned nothing, and what to do, for a warning at fit start."""
    before = select_modules(model, modules, None, owner=owner)
    if before:
        shown = ", ".join(list(before)[:8]) + (", ..." if len(before) > 8 else "")
        chosen = f"modules={list(modules)!r}" if modules else "the default selection"
        why = f"exclude={list(exclude)!r} removes all {len(before)} modules of {chosen} ({shown})"
    else:
        why = (
            "no module of the model owns parameters (the default selection); "
            "name modules with modules=[...]"
        )
    return (
        f"{owner}: nothing to inspect: {why}. This callback logs nothing in this fit; narrow "
        "exclude, or pass enabled=False to switch the callback off."
    )


def select_parameters(
    modules: dict[str, nn.Module],
    params: Sequence[str] = (),
    exclude_params: Sequence[str] = (),
    *,
    owner: str = "select_parameters",
) -> dict[str, nn.Parameter]:
    """The parameters of the selected modules (recursively, each once) by normalised name, kept by
    ``params`` (empty: all; one matching none raises :class:`SelectionError`), minus
    ``exclude_params``."""
    out: dict[str, nn.Parameter] = {}
    seen: set[int] = set()
    for prefix, module in modules.items():
        for raw, param in module.named_parameters():
            if id(param) not in seen:
                seen.add(id(param))
                out[normalise_name(f"{prefix}.{raw}")] = param
    if params:
        included = _compile(params, "parameter")
        for text, pattern in included:
            if not any(pattern.fullmatch(n) for n in out):
                raise SelectionError(_no_match_message(owner, text, "parameter", out))
        out = {n: p for n, p in out.items() if any(q.fullmatch(n) for _, q in included)}
    excluded = _compile(exclude_params, "parameter")
    return {n: p for n, p in out.items() if not any(q.fullmatch(n) for _, q in excluded)}


def _no_match_message(owner: str, text: str, kind: str, candidates: dict[str, object]) -> str:
    names = list(candidates)
    body = text[3:] if text.startswith("re:") else text
    literal = re.sub(r"[*?\[\]^$()+{}|\\]", "", body).strip(".")
    # the close names; when none is close, still the most similar ones (difflib's ranking)
    near = closest(literal, names) or closest(literal, names, cutoff=0.0) if literal else names[:5]
    glob = not text.startswith("re:") and "*" not in text
    hint = " Patterns are whole-name globs: use '*' to match a prefix or suffix." if glob else ""
    where = "the model" if kind == "module" else "the selected modules"
    none = "(the model has no submodules)" if kind == "module" else "(they have no parameters)"
    return (
        f"{owner}: {kind} pattern {text!r} matches no {kind} of {where} "
        f"({len(names)} {kind}s). Closest {kind} names: {', '.join(near) or none}.{hint}"
    )

"""Module selection: name patterns over a model -> ``{qualified_name: module}``.

Names are normalised first (wrappers' ``_orig_mod.``, ``_fsdp_wrapped_module.``,
``_checkpoint_wrapped_module.`` and DDP's leading ``module.`` removed), so patterns written
against the user's own model work under every wrapper. Patterns are shell-style globs over the
whole name (``*`` crosses dots: ``encoder.*`` selects everything below ``encoder``), or regular
expressions prefixed ``re:`` (matched with :func:`re.fullmatch`).

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


def is_data_parallel(model: nn.Module) -> bool:
    """Whether ``model`` is a ``DistributedDataParallel`` or ``DataParallel`` wrapper."""
    return isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel))


class Pattern:
    """One compiled selection pattern: a glob, or a regex when written ``re:<regex>``.

    ``kind`` (``"module"`` or ``"parameter"``) names what the pattern matches, in messages.
    """

    def __init__(self, text: str, kind: str = "module") -> None:
        self.text, self.kind = text, kind
        self._regex = compile_pattern(text, kind)

    def matches(self, name: str) -> bool:
        """Whether the whole ``name`` matches."""
        return self._regex.fullmatch(name) is not None

    @property
    def literal_part(self) -> str:
        """The pattern without glob/regex syntax, used to suggest close names."""
        body = self.text[3:] if self.text.startswith("re:") else self.text
        return re.sub(r"[*?\[\]^$()+{}|\\]", "", body).strip(".")


def named_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every submodule (the root excluded) by normalised qualified name: a shared module once,
    under its first name; a wrapper whose normalised name equals its child's gives way to it."""
    out: dict[str, nn.Module] = {}
    wrapped = is_data_parallel(model)
    for raw, module in model.named_modules():
        name = normalise_name(raw, wrapped)
        if not name:
            continue
        out[name] = module  # a wrapper comes before its child: the child overwrites it
    return out


def owns_parameters(module: nn.Module) -> bool:
    """Whether ``module`` holds parameters directly (not only through its children)."""
    return any(True for _ in module.parameters(recurse=False))


def _patterns(texts: Iterable[str], kind: str = "module") -> list[Pattern]:
    return [Pattern(t, kind) for t in texts]


def select_modules(
    model: nn.Module,
    modules: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    *,
    owner: str = "select_modules",
) -> dict[str, nn.Module]:
    """Resolve patterns to ``{normalised_name: module}`` in the model's registration order.

    ``modules``: patterns to include; ``None`` or empty: every module that owns parameters
    directly (leaf layers with weights, ``nn.MultiheadAttention``...). ``exclude``: patterns
    removed. ``owner``: the caller's name in messages. A pattern in ``modules`` that matches
    nothing raises :class:`SelectionError` listing the closest module names.
    """
    modules = [modules] if isinstance(modules, str) else modules
    exclude = [exclude] if isinstance(exclude, str) else exclude
    candidates = named_modules(model)
    if modules:
        chosen: dict[str, nn.Module] = {}
        for pattern in _patterns(modules):
            hits = [n for n in candidates if pattern.matches(n)]
            if not hits:
                raise SelectionError(_no_match_message(owner, pattern, candidates))
            for name in hits:
                chosen[name] = candidates[name]
        selected = {n: m for n, m in candidates.items() if n in chosen}
    else:
        selected = {n: m for n, m in candidates.items() if owns_parameters(m)}
    if exclude:
        excluded = _patterns(exclude)
        selected = {n: m for n, m in selected.items() if not any(p.matches(n) for p in excluded)}
    return selected


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
    """The parameters of the selected modules (recursively), by normalised qualified name.

    A parameter reachable from several selected modules appears once. ``params``: patterns over
    those names (``"*.weight"``; empty: all); one that matches none raises :class:`SelectionError`
    with the closest names. ``exclude_params``: patterns of names removed (``"*.bias"``).
    """
    out: dict[str, nn.Parameter] = {}
    seen: set[int] = set()
    for prefix, module in modules.items():
        for raw, param in module.named_parameters():
            if id(param) not in seen:
                seen.add(id(param))
                out[normalise_name(f"{prefix}.{raw}")] = param
    if params:
        included = _patterns(params, "parameter")
        for pattern in included:
            if not any(pattern.matches(n) for n in out):
                raise SelectionError(_no_match_message(owner, pattern, out))
        out = {n: p for n, p in out.items() if any(q.matches(n) for q in included)}
    if exclude_params:
        excluded = _patterns(exclude_params, "parameter")
        out = {n: p for n, p in out.items() if not any(q.matches(n) for q in excluded)}
    return out


def _no_match_message(owner: str, pattern: Pattern, candidates: dict[str, object]) -> str:
    kind = pattern.kind
    names = list(candidates)
    # the close names; when none is close, still the most similar ones (difflib's ranking)
    literal = pattern.literal_part
    near = closest(literal, names) or closest(literal, names, cutoff=0.0) if literal else names[:5]
    glob = not pattern.text.startswith("re:") and "*" not in pattern.text
    hint = " Patterns are whole-name globs: use '*' to match a prefix or suffix." if glob else ""
    where = "the model" if kind == "module" else "the selected modules"
    none = "(the model has no submodules)" if kind == "module" else "(they have no parameters)"
    return (
        f"{owner}: {kind} pattern {pattern.text!r} matches no {kind} of {where} "
        f"({len(names)} {kind}s). Closest {kind} names: {', '.join(near) or none}.{hint}"
    )

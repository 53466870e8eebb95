"""The metric-key scheme, the same in every backend: ``<kind>/<name>[/<output path>]/<stat>``.

Kinds: ``activations`` (module outputs), ``activation_grads`` (their gradients), ``param_grads``
and ``weights`` (parameters). A module with several output tensors adds each one's path
(``attn/0``, see :mod:`lightning_inspect.core.outputs`); histograms use the key without the
statistic; extra scalars: ``param_grads/global_norm``, ``weights/<param>/update_ratio``. Names are
single segments: :func:`escape_name` writes ``%`` as ``%25`` and ``/`` as ``%2F``, so a module
``"head/logits"`` never merges with the output ``logits`` of a module ``head``. MLflow accepts
only letters, digits, ``_ - . /``, space and 250 characters: :class:`MlflowKeys` replaces anything
else with ``_`` and adds a short hash where two keys would collide.

Example:
    >>> metric_key("activations", escape_name("head/logits"), "mean")
    'activations/head%2Flogits/mean'
    >>> unescape_name("head%2Flogits")
    'head/logits'
    >>> keys = MlflowKeys()
    >>> keys("activations/blocks[0]/mean"), keys("activations/blocks(0)/mean")
    ('activations/blocks_0_/mean', 'activations/blocks_0_/mean-91ac2049')
"""

from __future__ import annotations

import hashlib
import re

KINDS = ("activations", "activation_grads", "param_grads", "weights")
#: Kinds whose values differ between data-parallel ranks (combined across ranks); the others
#: are the same on every rank (parameters, gradients after the all-reduce).
PER_RANK_KINDS = ("activations", "activation_grads")


def is_per_rank(key: str) -> bool:
    """Whether the values under ``key`` are combined across data-parallel ranks."""
    return key.split("/", 1)[0] in PER_RANK_KINDS


#: TensorBoard text: the health findings of the fit so far as a JSON list (for the overview).
FINDINGS_KEY = "health/findings"
MLFLOW_MAX_KEY_LENGTH = 250
_MLFLOW_INVALID = re.compile(r"[^\w\-./ ]")
_ESCAPED = re.compile("%(25|2F)")


def escape_name(name: str) -> str:
    """``name`` as one key segment: ``%`` written ``%25``, then ``/`` written ``%2F``."""
    return name.replace("%", "%25").replace("/", "%2F")


def unescape_name(segment: str) -> str:
    """The name that :func:`escape_name` wrote as ``segment``."""
    return _ESCAPED.sub(lambda m: "%" if m.group(1) == "25" else "/", segment)


def metric_key(*parts: str) -> str:
    """Join non-empty key parts with ``/`` (names among them already escaped)."""
    return "/".join(p for p in parts if p)


def split_key(key: str) -> tuple[str, str, str, str]:
    """``(kind, name, output path, stat)`` of a scalar key; the inverse of :func:`metric_key`.

    Keys of a whole kind (``param_grads/global_norm``) have an empty name; a key of one part has
    an empty kind. Every key parser of the library goes through this function.

    >>> split_key("activations/encoder.0/attn/0/mean")
    ('activations', 'encoder.0', 'attn/0', 'mean')
    >>> split_key("param_grads/global_norm")
    ('param_grads', '', '', 'global_norm')
    """
    parts = key.split("/")
    if len(parts) < 3:
        return ("", "", "", key) if len(parts) == 1 else (parts[0], "", "", parts[1])
    return parts[0], parts[1], "/".join(parts[2:-1]), parts[-1]


class MlflowKeys:
    """Sanitise keys for MLflow, stable for a run and without collisions."""

    def __init__(self) -> None:
        self._by_original: dict[str, str] = {}
        self._taken: set[str] = set()

    def __call__(self, key: str) -> str:
        known = self._by_original.get(key)
        if known is not None:
            return known
        clean = _MLFLOW_INVALID.sub("_", key)
        # MLflow also rejects empty, "." and ".." path segments and a leading "/".
        clean = (
            "/".join(s if s not in ("", ".", "..") else "_" for s in clean.split("/"))
            if clean
            else "_"
        )
        candidate, attempt = clean, 0
        while len(candidate) > MLFLOW_MAX_KEY_LENGTH or candidate in self._taken:
            digest = hashlib.sha1(
                f"{key}#{attempt}".encode() if attempt else key.encode()
            ).hexdigest()[:8]
            candidate = f"{clean[: MLFLOW_MAX_KEY_LENGTH - 9]}-{digest}"
            attempt += 1
        clean = candidate
        self._by_original[key] = clean
        self._taken.add(clean)
        return clean

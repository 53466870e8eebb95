"""The metric-key scheme of every backend: ``<kind>/<name>[/<output path>]/<stat>``; histograms
drop ``/<stat>``. Names are single segments (:func:`escape_name`: ``%`` -> ``%25``, ``/`` ->
``%2F``); :class:`MlflowKeys` makes keys MLflow accepts, adding a short hash against collisions.

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
#: Kinds whose values differ between data-parallel ranks (combined across ranks).
PER_RANK_KINDS = ("activations", "activation_grads")


def is_per_rank(key: str) -> bool:
    return key.split("/", 1)[0] in PER_RANK_KINDS


#: TensorBoard text: the health findings of the fit so far as a JSON list (for the overview).
FINDINGS_KEY = "health/findings"
MLFLOW_MAX_KEY_LENGTH = 250
_MLFLOW_INVALID = re.compile(r"[^\w\-./ ]")
_ESCAPED = re.compile("%(25|2F)")


def escape_name(name: str) -> str:
    return name.replace("%", "%25").replace("/", "%2F")


def unescape_name(segment: str) -> str:
    return _ESCAPED.sub(lambda m: "%" if m.group(1) == "25" else "/", segment)


def metric_key(*parts: str) -> str:
    """Join non-empty key parts with ``/`` (names among them already escaped)."""
    return "/".join(p for p in parts if p)


def split_key(key: str) -> tuple[str, str, str, str]:
    """``(kind, name, output path, stat)`` of a scalar key: the library's one key parser.

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
    """Keys for MLflow (letters, digits, ``_-./`` and space; 250 characters), stable and distinct."""

    def __init__(self) -> None:
        self._by_original: dict[str, str] = {}
        self._taken: set[str] = set()

    def __call__(self, key: str) -> str:
        known = self._by_original.get(key)
        if known is not None:
            return known
        # MLflow also rejects empty, "." and ".." path segments and a leading "/".
        segments = _MLFLOW_INVALID.sub("_", key).split("/")
        clean = candidate = "/".join(s if s not in ("", ".", "..") else "_" for s in segments)
        attempt = 0
        while len(candidate) > MLFLOW_MAX_KEY_LENGTH or candidate in self._taken:
            salted = f"{key}#{attempt}" if attempt else key
            digest = hashlib.sha1(salted.encode()).hexdigest()[:8]
            candidate = f"{clean[: MLFLOW_MAX_KEY_LENGTH - 9]}-{digest}"
            attempt += 1
        self._by_original[key] = candidate
        self._taken.add(candidate)
        return candidate

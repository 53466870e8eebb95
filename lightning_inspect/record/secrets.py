"""Masking of secrets in everything the run record writes (rules: docs/run_record.md, Secrets)."""

from __future__ import annotations

import dataclasses
import fnmatch
import re
from collections.abc import Mapping, Sequence
from typing import Any

#: What a masked value is replaced with.
MASK = "***"
_ANY_WORDS = frozenset(
    ["password", "passwd", "secret", "apikey", "credential", "credentials", "auth", "passphrase"]
)
_LAST_WORDS = _ANY_WORDS | {"token", "key", "authorization"}
_GLUED = tuple((_ANY_WORDS - {"auth"}) | {"token"})
_WORD = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|\d+")
_URL_CREDENTIALS = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*://[^\s:/@]*:)[^\s/@]+@")
_KNOWN_TOKENS = re.compile(
    r"\b(?:gh[pousr]_[A-Za-z0-9]{20,}|github_pat_\w{20,}|sk-[A-Za-z0-9_\-]{20,}|hf_[A-Za-z0-9]{20,}"
    r"|AKIA[0-9A-Z]{16}|xox[abposr]-[A-Za-z0-9\-]{10,})\b"
)


@dataclasses.dataclass(frozen=True)
class SecretMasker:
    """Replaces values under secret-looking keys, URL passwords and known tokens with ``"***"``.

    Args:
        extra: more key globs to mask (case-insensitive, over the key or its dotted path).
        exempt: key globs never masked, e.g. ``["pad_token"]``.
    """

    extra: tuple[str, ...] = ()
    exempt: tuple[str, ...] = ()

    def is_secret(self, key: Any, path: str = "") -> bool:
        """Whether ``key`` (at dotted ``path``) looks like a secret."""
        names = (str(key).lower(), (path or str(key)).lower())

        def hit(patterns: tuple[str, ...]) -> bool:
            return any(fnmatch.fnmatchcase(n, p.lower()) for p in patterns for n in names)

        words = [w.lower() for w in _WORD.findall(str(key))]
        return not hit(self.exempt) and (
            hit(self.extra)
            or not _LAST_WORDS.isdisjoint(words[-1:])
            or not _ANY_WORDS.isdisjoint(words)
            or "".join(words).endswith(_GLUED)
        )

    def mask(self, value: Any, path: str = "") -> Any:
        """A masked copy of ``value`` (mappings, sequences, strings, parsed override values)."""
        if isinstance(value, Mapping):
            out = {}
            for key, item in value.items():
                where = f"{path}.{key}" if path else str(key)
                secret = key != "_target_" and self.is_secret(key, where)
                out[key] = MASK if secret and item not in (None, "") else self.mask(item, where)
            return out
        if isinstance(value, (list, tuple)):
            return [self.mask(v, f"{path}.{i}" if path else str(i)) for i, v in enumerate(value)]
        if isinstance(value, str):
            return self.text(value)
        kind = type(value).__name__  # Hydra's parsed override values
        if kind == "QuotedString":
            return dataclasses.replace(value, text=self.text(value.text))
        if kind == "ChoiceSweep":
            return dataclasses.replace(value, list=[self.mask(v, path) for v in value.list])
        return value

    def text(self, text: str) -> str:
        """``text`` with URL passwords and well-known token formats masked."""
        return _KNOWN_TOKENS.sub(MASK, _URL_CREDENTIALS.sub(rf"\g<1>{MASK}@", text))

    def override(self, override: str) -> str:
        """A Hydra override, parsed by Hydra's parser, with its secrets masked at any depth."""
        try:
            from hydra.core.override_parser.overrides_parser import OverridesParser

            parsed = OverridesParser.create().parse_override(override)
        except Exception:
            key, sep, _ = override.partition("=")
            path = key.split("@", 1)[0].strip().lstrip("~+-")
            names = [path, re.split(r"[./]", path)[-1], *re.findall(r"[A-Za-z_][\w\-]*", override)]
            secret = sep and any(self.is_secret(name) for name in names)
            return f"{key}={MASK}" if secret else self.text(override)
        if parsed.value_type is None:  # ~key
            return override
        key, value = parsed.key_or_group, parsed._value  # _value keeps the quotes
        secret = self.is_secret(re.split(r"[./]", key)[-1], key) and value not in (None, "")
        masked = MASK if secret else self.mask(value, key)
        if masked == value:
            return override
        return f"{override.split('=', 1)[0]}={_override_text(masked)}"

    def command(self, argv: Sequence[str]) -> list[str]:
        """A command line with ``key=value`` secrets and values after ``--secret`` flags masked."""
        out: list[str] = []
        for before, token in zip(["", *argv], argv, strict=False):
            flag = before.lstrip("-").replace("-", "_")
            value = before.startswith("-") and "=" not in before and not token.startswith("-")
            plain = self.override(token) if "=" in token else self.text(token)
            out.append(MASK if value and flag and self.is_secret(flag) else plain)
        return out


def _override_text(value: Any) -> str:
    """Override syntax for a parsed value: ``{a:1,b:[x,y]}``, ``'quoted'``, ``choice(a,b)``."""
    from hydra.core.override_parser.types import ChoiceSweep, Override

    if isinstance(value, ChoiceSweep):
        items = ",".join(_override_text(item) for item in value.list)
        return items if value.simple_form else f"choice({items})"
    return Override._get_value_element_as_str(value)

"""What a run record is made of, collected by plain functions (no Trainer needed).

:class:`lightning_inspect.RunRecord` calls these once per run; each also works on its own:

* secrets: :class:`SecretMasker` (keys that look like secrets, credentials inside URLs, well-known
  token formats);
* git: :func:`git_info` (commit, branch, dirty flag, uncommitted diff) through the ``git`` CLI;
* environment: :func:`seed_info`, :func:`host_info`, :func:`version_info`,
  :func:`installed_packages`, :func:`peak_memory`, :func:`env_var_values`;
* configuration: :func:`config_record` (the resolved Hydra config, overrides and group choices);
* data: :func:`fingerprint_loaders` (sizes and a content hash of a sample of items);
* model: :func:`record_init` / :class:`RecordInit` and :func:`construction_record`, a
  Hydra-instantiable description of how an object was built.

Example:
    >>> SecretMasker().mask({"db": {"password": "hunter2", "host": "db.local"}})
    {'db': {'password': '***', 'host': 'db.local'}}
"""

from __future__ import annotations

import dataclasses
import enum
import fnmatch
import functools
import hashlib
import importlib
import importlib.metadata
import inspect
import json
import os
import pathlib
import platform
import random
import re
import socket
import subprocess
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, NoReturn, TypeVar

import numpy as np
import torch
from torch import nn

from lightning_inspect.core.selection import normalise_name
from lightning_inspect.errors import ConfigError

__all__ = [
    "MASK",
    "UNRECORDED_TARGET",
    "ConfigRecord",
    "ConstructionRecord",
    "GitInfo",
    "RecordInit",
    "SecretMasker",
    "config_record",
    "construction_record",
    "content_hash",
    "env_var_values",
    "fingerprint_dataset",
    "fingerprint_loaders",
    "git_info",
    "host_info",
    "installed_packages",
    "peak_memory",
    "rebuild_mismatch",
    "record_init",
    "seed_info",
    "unrecorded",
    "version_info",
]

T = TypeVar("T")

# --------------------------------------------------------------------------------------------
# Secrets
# --------------------------------------------------------------------------------------------

#: What a masked value is replaced with.
MASK = "***"

_LAST_WORDS = frozenset(
    {
        "token",
        "password",
        "passwd",
        "secret",
        "key",
        "apikey",
        "credential",
        "credentials",
        "auth",
        "passphrase",
        "authorization",
    }
)
_ANY_WORDS = frozenset(
    {"password", "passwd", "secret", "apikey", "credential", "credentials", "auth", "passphrase"}
)
_GLUED_SUFFIXES = (
    "token",
    "password",
    "passwd",
    "secret",
    "apikey",
    "credential",
    "credentials",
    "passphrase",
)
_WORD = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|\d+")
_URL_CREDENTIALS = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*://[^\s:/@]*:)[^\s/@]+@")
_KNOWN_TOKENS = re.compile(
    r"\b(?:gh[pousr]_[A-Za-z0-9]{20,}|github_pat_\w{20,}|sk-[A-Za-z0-9_\-]{20,}|hf_[A-Za-z0-9]{20,}"
    r"|AKIA[0-9A-Z]{16}|xox[abposr]-[A-Za-z0-9\-]{10,})\b"
)
_IDENTIFIER = re.compile(r"[A-Za-z_][\w\-]*")


@dataclasses.dataclass(frozen=True)
class SecretMasker:
    """Replaces values that look like secrets with ``"***"``.

    A key looks like a secret when its last word (words split at ``_ - . /`` and camelCase) is one
    of token, password, passwd, secret, key, apikey, credential(s), auth, passphrase,
    authorization; when it contains the word password, passwd, secret, apikey, credential(s), auth
    or passphrase anywhere; or when it ends with token, password, secret, apikey or credential
    glued on (``mytoken``). ``key_dim``, ``num_tokens`` and ``author`` are not secrets;
    ``api_key``, ``GITHUB_TOKEN``, ``authToken`` and ``db_password`` are. The whole value under a
    secret key is masked (also a nested mapping); ``None`` and ``""`` are kept.

    In every string value, the password of a URL (``scheme://user:password@host``) and
    well-known token formats (GitHub, OpenAI, Hugging Face, AWS access key, Slack) are masked too.

    Args:
        extra: more key patterns to mask (globs, case-insensitive, over the key or its dotted path).
        exempt: key patterns never masked (globs over the key or its dotted path), e.g.
            ``["pad_token", "eos_token"]``.

    Example:
        >>> masker = SecretMasker(exempt=("pad_token",))
        >>> masker.mask({"api_key": "abc", "pad_token": "<pad>", "key_dim": 64})
        {'api_key': '***', 'pad_token': '<pad>', 'key_dim': 64}
        >>> masker.override("+db.password=hunter2")
        '+db.password=***'
    """

    extra: tuple[str, ...] = ()
    exempt: tuple[str, ...] = ()

    def is_secret(self, key: Any, path: str = "") -> bool:
        """Whether ``key`` (at dotted ``path``, optional) looks like a secret."""
        name = str(key)
        candidates = (name.lower(), path.lower()) if path else (name.lower(),)
        if any(fnmatch.fnmatchcase(c, p.lower()) for p in self.exempt for c in candidates):
            return False
        if any(fnmatch.fnmatchcase(c, p.lower()) for p in self.extra for c in candidates):
            return True
        words = [w.lower() for w in _WORD.findall(name)]
        if not words:
            return False
        if words[-1] in _LAST_WORDS or any(w in _ANY_WORDS for w in words):
            return True
        return "".join(words).endswith(_GLUED_SUFFIXES)

    def mask(self, value: Any, path: str = "") -> Any:
        """A copy of ``value`` (plain mappings, sequences, scalars) with secrets masked."""
        if isinstance(value, Mapping):
            out: dict[Any, Any] = {}
            for key, item in value.items():
                where = f"{path}.{key}" if path else str(key)
                if (
                    key not in ("_target_",)
                    and self.is_secret(key, where)
                    and item not in (None, "")
                ):
                    out[key] = MASK
                else:
                    out[key] = self.mask(item, where)
            return out
        if isinstance(value, (list, tuple)):
            return [
                self.mask(item, f"{path}.{i}" if path else str(i)) for i, item in enumerate(value)
            ]
        if isinstance(value, str):
            return self.text(value)
        return value

    def text(self, text: str) -> str:
        """``text`` with URL passwords and well-known token formats masked."""
        text = _URL_CREDENTIALS.sub(rf"\g<1>{MASK}@", text)
        return _KNOWN_TOKENS.sub(MASK, text)

    def override(self, override: str) -> str:
        """A Hydra override (``[+|++|~]key[@package]=value``) with its secrets masked.

        The override is parsed with Hydra's own override parser. The whole value of a secret key
        is masked; inside a value, secret keys of inline mappings (nested, in lists, in
        ``choice(...)``) are masked, and strings are masked as in :meth:`text`. A changed value is
        written back from the parsed value; an unchanged override is returned as given. An
        override that does not parse (or Hydra is not installed) has its whole value masked when
        its key or text names a secret.

        >>> SecretMasker().override("+db={user: a, conn: {password: [hunter2, x]}}")
        '+db={user:a,conn:{password:***}}'
        >>> SecretMasker().override("+db={password:[hunter2,x]")
        '+db=***'
        """
        parsed = _parse_override(override)
        if parsed is None:
            return self._unparsed(override)
        if parsed.value_type is None:  # ~key: nothing to mask
            return override
        key = parsed.key_or_group
        value = parsed._value  # as parsed, quotes kept (value() drops them)
        if self.is_secret(re.split(r"[./]", key)[-1], key) and value not in (None, ""):
            masked = MASK
        else:
            masked = self._mask_parsed(value, key)
        if masked == value:
            return override
        return f"{override.split('=', 1)[0]}={_override_value_text(masked)}"

    def command(self, argv: Sequence[str]) -> list[str]:
        """A command line with ``key=value`` secrets and the values after ``--secret`` flags masked."""
        out: list[str] = []
        mask_next = False
        for token in argv:
            if mask_next and not token.startswith("-"):
                out.append(MASK)
                mask_next = False
                continue
            mask_next = False
            if "=" in token:
                out.append(self.override(token))
            else:
                out.append(self.text(token))
                flag = token.lstrip("-")
                mask_next = (
                    token.startswith("-") and bool(flag) and self.is_secret(flag.replace("-", "_"))
                )
        return out

    def _mask_parsed(self, value: Any, path: str) -> Any:
        """A parsed override value (mapping, list, quoted string, choice sweep), secrets masked."""
        from hydra.core.override_parser.types import ChoiceSweep, QuotedString

        if isinstance(value, dict):
            out: dict[Any, Any] = {}
            for key, item in value.items():
                where = f"{path}.{key}"
                secret = self.is_secret(key, where) and item not in (None, "")
                out[key] = MASK if secret else self._mask_parsed(item, where)
            return out
        if isinstance(value, list):
            return [self._mask_parsed(item, f"{path}.{i}") for i, item in enumerate(value)]
        if isinstance(value, ChoiceSweep):
            choices = [self._mask_parsed(item, path) for item in value.list]
            return dataclasses.replace(value, list=choices)
        if isinstance(value, QuotedString):
            return dataclasses.replace(value, text=self.text(value.text))
        if isinstance(value, str):
            return self.text(value)
        return value

    def _unparsed(self, override: str) -> str:
        """An override Hydra cannot parse: value masked whole if its key or text names a secret."""
        key, sep, _ = override.partition("=")
        if not sep:
            return self.text(override)
        path = key.split("@", 1)[0].strip().lstrip("~+-")
        names = [path, re.split(r"[./]", path)[-1], *_IDENTIFIER.findall(override)]
        if any(self.is_secret(name) for name in names):
            return f"{key}={MASK}"
        return self.text(override)


def _parse_override(text: str) -> Any:
    """``text`` parsed by Hydra's override parser; ``None`` if it does not parse."""
    try:
        from hydra.core.override_parser.overrides_parser import OverridesParser
    except ImportError:
        return None
    try:
        return OverridesParser.create().parse_override(text)
    except Exception:
        return None


def _override_value_text(value: Any) -> str:
    """Override syntax for a parsed value: ``{a:1,b:[x,y]}``, ``'quoted'``, ``choice(a,b)``."""
    from hydra.core.override_parser.types import ChoiceSweep, Override

    if isinstance(value, ChoiceSweep):
        items = ",".join(_override_value_text(item) for item in value.list)
        return items if value.simple_form else f"choice({items})"
    return Override._get_value_element_as_str(value)


# --------------------------------------------------------------------------------------------
# Git
# --------------------------------------------------------------------------------------------

#: Diffs longer than this many characters are cut (with a note at the end).
MAX_DIFF_CHARS = 20_000_000


@dataclasses.dataclass(frozen=True)
class GitInfo:
    """The state of the working tree a run was started from.

    ``notice`` says, in words, why something is missing (not a repository, git not installed, no
    commits yet, a timeout); the other fields are then ``None`` or empty.
    """

    commit: str | None = None
    branch: str | None = None
    dirty: bool | None = None
    diff: str = ""
    untracked: tuple[str, ...] = ()
    root: str | None = None
    notice: str | None = None

    def summary(self) -> dict[str, Any]:
        """Everything but the diff, as plain values."""
        return {
            "commit": self.commit,
            "branch": self.branch,
            "dirty": self.dirty,
            "untracked": list(self.untracked),
            "root": self.root,
            "notice": self.notice,
        }


class _GitFailed(Exception):
    """A git command failed; the message is the notice to record."""


def _git(args: Sequence[str], cwd: str, timeout: float) -> str:
    env = {
        **os.environ,
        "GIT_TERMINAL_PROMPT": "0",
        "GIT_PAGER": "cat",
        "GIT_OPTIONAL_LOCKS": "0",
        "LC_ALL": "C",
    }
    try:
        done = subprocess.run(
            ["git", *args],
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
            check=False,
        )
    except FileNotFoundError as exc:
        raise _GitFailed("git is not installed (no 'git' executable on PATH)") from exc
    except subprocess.TimeoutExpired as exc:
        raise _GitFailed(f"'git {' '.join(args)}' did not finish within {timeout:g} s") from exc
    except OSError as exc:
        raise _GitFailed(f"git could not be started ({exc})") from exc
    if done.returncode != 0:
        message = done.stderr.decode("utf-8", "replace").strip().splitlines()
        raise _GitFailed(
            message[0] if message else f"'git {' '.join(args)}' exited with {done.returncode}"
        )
    return done.stdout.decode("utf-8", "replace")


def git_info(
    repo_dir: str | os.PathLike[str] | None = None, timeout: float = 10.0, diff: bool = True
) -> GitInfo:
    """Commit, branch, dirty flag and uncommitted diff of the repository holding ``repo_dir``.

    Uses the ``git`` command line (each call limited to ``timeout`` seconds) from ``repo_dir``,
    default the current working directory. Never raises: what could not be read is explained in
    :attr:`GitInfo.notice`. ``dirty`` means tracked files differ from the commit (staged or not);
    untracked files are listed separately and are not part of the diff. The diff is ``git diff
    HEAD`` (text; binary files are named only).

    Example:
        >>> import tempfile
        >>> git_info(tempfile.mkdtemp()).commit is None
        True
    """
    where = str(pathlib.Path(repo_dir if repo_dir is not None else os.getcwd()).resolve())
    if not pathlib.Path(where).is_dir():
        return GitInfo(notice=f"{where} is not a directory")
    try:
        root = _git(["rev-parse", "--show-toplevel"], where, timeout).strip()
    except _GitFailed as exc:
        text = str(exc)
        if "not a git repository" in text.lower():
            text = f"{where} is not inside a git repository"
        return GitInfo(notice=text)
    try:
        commit = _git(["rev-parse", "--verify", "HEAD"], root, timeout).strip()
    except _GitFailed:
        return GitInfo(root=root, notice=f"the repository at {root} has no commits yet")
    notices: list[str] = []
    try:
        branch: str | None = (
            _git(["symbolic-ref", "--short", "-q", "HEAD"], root, timeout).strip() or None
        )
    except _GitFailed:
        branch = None
        notices.append("detached HEAD (no branch)")
    dirty: bool | None = None
    untracked: list[str] = []
    try:
        status = _git(["status", "--porcelain=v1", "-z", "--untracked-files=normal"], root, timeout)
        entries = status.split("\0")
        dirty = False
        skip = False
        for entry in entries:
            if skip or not entry:
                skip = False
                continue
            code, path = entry[:2], entry[3:]
            if code == "??":
                untracked.append(path)
            else:
                dirty = True
                skip = code[0] in "RC"  # a rename/copy is followed by its source path
    except _GitFailed as exc:
        notices.append(f"status unavailable: {exc}")
    patch = ""
    if diff and dirty:
        try:
            patch = _git(
                ["diff", "HEAD", "--no-color", "--no-ext-diff", "--no-textconv"], root, timeout
            )
        except _GitFailed as exc:
            notices.append(f"diff unavailable: {exc}")
        if len(patch) > MAX_DIFF_CHARS:
            patch = (
                patch[:MAX_DIFF_CHARS]
                + f"\n# [lightning-inspect: diff cut at {MAX_DIFF_CHARS} characters]\n"
            )
    return GitInfo(
        commit=commit,
        branch=branch,
        dirty=dirty,
        diff=patch,
        untracked=tuple(untracked),
        root=root,
        notice="; ".join(notices) or None,
    )


# --------------------------------------------------------------------------------------------
# Environment
# --------------------------------------------------------------------------------------------


def seed_info() -> dict[str, Any]:
    """The seed given to Lightning's ``seed_everything`` (``PL_GLOBAL_SEED``), or ``None``.

    Example:
        >>> import lightning as L
        >>> _ = L.seed_everything(7, verbose=False)
        >>> seed_info()["seed"]
        7
    """
    raw = os.environ.get("PL_GLOBAL_SEED")
    try:
        seed: int | str | None = int(raw) if raw is not None else None
    except ValueError:
        seed = raw
    workers = os.environ.get("PL_SEED_WORKERS")
    return {"seed": seed, "seed_workers": workers == "1" if workers is not None else None}


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``, ``sysctl`` on macOS, else ``platform``)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    if sys.platform == "darwin":
        try:
            out = subprocess.run(
                ["sysctl", "-n", "machdep.cpu.brand_string"],
                capture_output=True,
                timeout=5,
                check=False,
            )
            if out.returncode == 0 and out.stdout.strip():
                return out.stdout.decode().strip()
        except (OSError, subprocess.TimeoutExpired):
            pass
    return platform.processor() or platform.machine() or "unknown"


def gpu_info(timeout: float = 10.0) -> dict[str, Any]:
    """GPU model names and count, without initialising CUDA when it is not in use yet.

    Names come from PyTorch when CUDA is already initialised, else from ``nvidia-smi``.
    """
    info: dict[str, Any] = {"gpu_count": 0, "gpu_model": None}
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        names: list[str] = []
        if torch.cuda.is_initialized():
            names = [torch.cuda.get_device_name(i) for i in range(count)]
        else:
            try:
                out = subprocess.run(
                    ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                    capture_output=True,
                    timeout=timeout,
                    check=False,
                )
                if out.returncode == 0:
                    names = [n.strip() for n in out.stdout.decode().splitlines() if n.strip()]
            except (OSError, subprocess.TimeoutExpired):
                pass
        info["gpu_count"] = count
        info["gpu_model"] = _count_names(names) if names else "unknown"
    elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        info.update(gpu_count=1, gpu_model="Apple MPS")
    return info


def _count_names(names: Sequence[str]) -> str:
    counts: dict[str, int] = {}
    for name in names:
        counts[name] = counts.get(name, 0) + 1
    return ", ".join(f"{n} x {name}" if n > 1 else name for name, n in counts.items())


def host_info() -> dict[str, Any]:
    """Host name, operating system, CPU model and count, GPU model and count.

    Read directly rather than with ``torch.utils.collect_env.get_env_info()``, which calls
    ``torch.cuda.init()`` when CUDA is available, runs about ten subprocesses without a timeout
    (0.3-1 s on a CPU machine) and reports the system ``nvcc``'s CUDA version, not PyTorch's.

    Example:
        >>> sorted(host_info())[:3]
        ['cpu_count', 'cpu_model', 'cpu_usable']
    """
    try:
        usable: int | None = len(os.sched_getaffinity(0))  # type: ignore[attr-defined]
    except (AttributeError, OSError):
        usable = os.cpu_count()
    return {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_usable": usable,
        **gpu_info(),
    }


def _dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def version_info() -> dict[str, str | None]:
    """Python, PyTorch, Lightning, CUDA and cuDNN versions, and those of the tracking stack.

    Example:
        >>> version_info()["torch"] == torch.__version__
        True
    """
    try:
        cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    except Exception:  # a broken cuDNN install must not stop the record
        cudnn = None
    lightning_version = _dist_version("lightning") or _dist_version("pytorch-lightning")
    return {
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "torch": torch.__version__,
        "lightning": lightning_version,
        "cuda": torch.version.cuda,
        "cudnn": str(cudnn) if cudnn is not None else None,
        "numpy": np.__version__,
        "hydra-core": _dist_version("hydra-core"),
        "omegaconf": _dist_version("omegaconf"),
        "tensorboard": _dist_version("tensorboard"),
        "mlflow": _dist_version("mlflow") or _dist_version("mlflow-skinny"),
        "lightning-inspect": _dist_version("lightning-inspect"),
    }


def installed_packages() -> list[str]:
    """Every installed distribution as ``name==version``, sorted; editable installs say from where.

    Example:
        >>> any(line.startswith("torch==") for line in installed_packages())
        True
    """
    lines: dict[str, str] = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"] if dist.metadata else None
        if not name or name.lower() in lines:
            continue
        line = f"{name}=={dist.version}"
        try:
            direct = json.loads(dist.read_text("direct_url.json") or "null")
        except (ValueError, OSError):
            direct = None
        if isinstance(direct, dict):
            if direct.get("dir_info", {}).get("editable"):
                line += f"  # editable install from {direct.get('url')}"
            elif "vcs_info" in direct:
                vcs = direct["vcs_info"]
                line += f"  # from {vcs.get('vcs')}+{direct.get('url')}@{vcs.get('commit_id')}"
        lines[name.lower()] = line
    return [lines[k] for k in sorted(lines)]


def peak_memory() -> dict[str, int | None]:
    """Peak resident memory of this process (and of its finished children, e.g. data workers),
    and the peak CUDA memory allocated by PyTorch (``None`` when CUDA is not in use), in bytes.

    Example:
        >>> peak_memory()["peak_rss_bytes"] > 0
        True
    """
    out: dict[str, int | None] = {
        "peak_rss_bytes": None,
        "peak_rss_children_bytes": None,
        "cuda_max_allocated_bytes": None,
    }
    try:
        import resource

        scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
        out["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
        out["peak_rss_children_bytes"] = (
            resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * scale
        )
    except (ImportError, OSError, ValueError):
        pass
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda_max_allocated_bytes"] = max(
            torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count())
        )
    return out


def env_var_values(patterns: Iterable[str], masker: SecretMasker | None = None) -> dict[str, str]:
    """The environment variables named by ``patterns`` (names or globs), secrets masked.

    Example:
        >>> os.environ["RECORD_DEMO_TOKEN"] = "abc"
        >>> env_var_values(["RECORD_DEMO_*"])
        {'RECORD_DEMO_TOKEN': '***'}
    """
    masker = masker or SecretMasker()
    patterns = list(patterns)
    found = {
        k: v for k, v in os.environ.items() if any(fnmatch.fnmatchcase(k, p) for p in patterns)
    }
    return {
        k: (MASK if masker.is_secret(k) and v else masker.text(v)) for k, v in sorted(found.items())
    }


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ConfigRecord:
    """The resolved configuration of a run, its command-line overrides and config-group choices.

    ``source`` is ``"argument"``, ``"hydra"`` (read from the Hydra run directory),
    ``"lightning_cli"`` (a LightningCLI's parsed config) or ``"none"``; ``notes`` lists what could
    not be resolved.
    """

    config: dict[str, Any] | None = None
    overrides: list[str] = dataclasses.field(default_factory=list)
    choices: dict[str, Any] = dataclasses.field(default_factory=dict)
    source: str = "none"
    output_dir: str | None = None
    notes: list[str] = dataclasses.field(default_factory=list)


def to_plain(config: Any, notes: list[str] | None = None, skip: Iterable[str] = ()) -> Any:
    """An OmegaConf config (or plain mapping) as plain dicts and lists, interpolations resolved.

    An interpolation that cannot be resolved here is kept as written and named in ``notes``;
    ``???`` stays ``"???"``. Top-level keys in ``skip`` are left out.

    Example:
        >>> from omegaconf import OmegaConf
        >>> to_plain(OmegaConf.create({"a": 1, "b": "${a}", "c": "${oops}"}), notes := [])
        {'a': 1, 'b': 1, 'c': '${oops}'}
        >>> notes[0].startswith("c: not resolved")
        True
    """
    notes = notes if notes is not None else []
    skipped = set(skip)
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf
    except ImportError:  # no OmegaConf: plain values only
        return (
            {k: v for k, v in config.items() if k not in skipped}
            if isinstance(config, Mapping)
            else config
        )

    def child(parent: Any, key: Any, path: str) -> Any:
        if OmegaConf.is_missing(parent, key):
            return "???"
        try:
            value = parent[key]
        except Exception as exc:  # unresolvable interpolation: keep it as written
            raw = OmegaConf.to_container(parent, resolve=False)[key]  # type: ignore[index]
            notes.append(
                f"{path}: not resolved ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); recorded as written"
            )
            return raw
        return walk(value, path)

    def walk(node: Any, path: str) -> Any:
        if isinstance(node, DictConfig):
            if node._is_none():
                return None
            return {
                str(k): child(node, k, f"{path}.{k!s}" if path else str(k))
                for k in node
                if not (path == "" and k in skipped)
            }
        if isinstance(node, ListConfig):
            if node._is_none():
                return None
            return [child(node, i, f"{path}.{i}" if path else str(i)) for i in range(len(node))]
        if isinstance(node, Mapping):
            return {
                str(k): walk(v, f"{path}.{k}" if path else str(k))
                for k, v in node.items()
                if not (path == "" and k in skipped)
            }
        if isinstance(node, (list, tuple)):
            return [walk(v, f"{path}.{i}" if path else str(i)) for i, v in enumerate(node)]
        return node

    return walk(config, "")


def _hydra_runtime() -> Any | None:
    """Hydra's ``HydraConfig`` node inside a running Hydra app, else ``None``."""
    module = sys.modules.get("hydra.core.hydra_config")
    if module is None:
        return None
    try:
        if not module.HydraConfig.initialized():
            return None
        return module.HydraConfig.get()
    except Exception:  # a half-initialised Hydra
        return None


def config_record(
    config: Any = None, overrides: Sequence[str] | None = None, callbacks: Sequence[Any] = ()
) -> ConfigRecord:
    """The run's configuration: from ``config``, else the running Hydra app, else LightningCLI.

    ``config`` may be a DictConfig or a mapping, e.g. from ``hydra.compose``; when it carries a
    ``hydra`` node (``compose(..., return_hydra_config=True)``), the overrides and group choices are
    read from it and the node itself is left out. Inside a Hydra app the config is read from the run
    directory (``<output_dir>/.hydra/config.yaml``, resolved) and the overrides and choices from
    ``HydraConfig``. Otherwise, when ``callbacks`` (the Trainer's) hold LightningCLI's
    ``SaveConfigCallback``, the config is the one it saves (the parsed ``cli.config`` of the
    subcommand). ``overrides``, when given, wins over the ones found.

    Example:
        >>> config_record({"model": {"hidden": 8}}, overrides=["model.hidden=8"]).overrides
        ['model.hidden=8']
    """
    record = ConfigRecord()
    if config is not None:
        record.source = "argument"
        hydra_node = _node_at(config, "hydra")
        skip: tuple[str, ...] = ()
        if _node_at(hydra_node, "overrides") is not None:
            skip = ("hydra",)
            record.overrides = [str(o) for o in _node_at(hydra_node, "overrides.task") or []]
            record.choices = _user_choices(_node_at(hydra_node, "runtime.choices"))
            record.output_dir = _safe_str(lambda: _node_at(hydra_node, "runtime.output_dir"))
        record.config = to_plain(config, record.notes, skip=skip)
    else:
        runtime = _hydra_runtime()
        if runtime is not None:
            record.source = "hydra"
            record.overrides = [str(o) for o in runtime.overrides.task]
            record.choices = _user_choices(runtime.runtime.choices)
            record.output_dir = str(runtime.runtime.output_dir)
            subdir = runtime.output_subdir
            path = pathlib.Path(record.output_dir) / subdir / "config.yaml" if subdir else None
            if path is not None and path.is_file():
                from omegaconf import OmegaConf

                record.config = to_plain(OmegaConf.load(path), record.notes)
            else:
                record.notes.append(
                    "the Hydra run directory has no saved config (hydra.output_subdir is null?); "
                    "pass RunRecord(config=cfg) to record it"
                )
        else:
            _read_cli_config(record, callbacks)
    if overrides is not None:
        record.overrides = [str(o) for o in overrides]
    return record


def _read_cli_config(record: ConfigRecord, callbacks: Sequence[Any]) -> None:
    """Fill ``record`` from LightningCLI's ``SaveConfigCallback`` among ``callbacks``, if any."""
    module = sys.modules.get("lightning.pytorch.cli")  # imported by every LightningCLI run
    if module is None:
        return
    saver = next((cb for cb in callbacks if isinstance(cb, module.SaveConfigCallback)), None)
    if saver is None:
        return
    import yaml

    # Positional: (format, keep None values, keep defaults, skip validation); the keywords were
    # renamed in jsonargparse 4.49 (skip_none -> skip_unset) and the old names warn.
    text = saver.parser.dump(saver.config, "yaml", False, False, True)
    record.source = "lightning_cli"
    record.config = yaml.safe_load(text)


def _node_at(config: Any, dotted: str | None) -> Any:
    """The node at ``dotted`` (keys and list indices) inside ``config``, or ``None``."""
    node = config
    for part in (dotted or "").split("."):
        if not part:
            continue
        if isinstance(node, Mapping) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node


def _safe_str(get: Callable[[], Any]) -> str | None:
    try:
        value = get()
        return None if value is None else str(value)
    except Exception:
        return None


def _user_choices(choices: Any) -> dict[str, Any]:
    if choices is None:
        return {}
    items = choices.items() if hasattr(choices, "items") else []
    return {
        str(k): (None if v is None else str(v)) for k, v in items if not str(k).startswith("hydra/")
    }


def flatten(value: Any, prefix: str = "", sep: str = "/") -> dict[str, Any]:
    """Nested mappings as ``{"a/b": leaf}``; lists stay whole (as JSON text when not scalar).

    Example:
        >>> flatten({"model": {"hidden": 8, "sizes": [1, 2]}}, "config")
        {'config/model/hidden': 8, 'config/model/sizes': '[1, 2]'}
    """
    out: dict[str, Any] = {}
    if isinstance(value, Mapping):
        if not value and prefix:
            out[prefix] = "{}"
        for key, item in value.items():
            out.update(flatten(item, f"{prefix}{sep}{key}" if prefix else str(key), sep))
    elif isinstance(value, (list, tuple)):
        out[prefix] = json.dumps(value, default=str)
    else:
        out[prefix] = value
    return out


# --------------------------------------------------------------------------------------------
# Data fingerprint
# --------------------------------------------------------------------------------------------

_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def _feed(h: Any, value: Any, depth: int = 0) -> None:
    """Feed ``value`` into hash ``h``: type-tagged, length-prefixed, independent of memory layout."""

    def put(tag: str, payload: bytes = b"") -> None:
        head = tag.encode()
        h.update(len(head).to_bytes(4, "little") + head + len(payload).to_bytes(8, "little"))
        h.update(payload)

    if depth > 50:
        put("deep")
        return
    if isinstance(value, torch.Tensor):
        t = value.detach()
        if t.layout != torch.strided:
            t = t.to_dense()
        t = t.cpu().resolve_conj().resolve_neg().contiguous()
        put(f"tensor:{t.dtype}:{tuple(t.shape)}", t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(value, np.ndarray):
        if value.dtype == object:
            put(f"ndarray:object:{value.shape}")
            for item in value.reshape(-1).tolist():
                _feed(h, item, depth + 1)
        else:
            put(f"ndarray:{value.dtype.str}:{value.shape}", np.ascontiguousarray(value).tobytes())
    elif isinstance(value, np.generic):
        _feed(h, np.asarray(value), depth + 1)
    elif value is None or isinstance(value, (bool, int, float, complex)):
        put(f"{type(value).__name__}:{value!r}")
    elif isinstance(value, str):
        put("str", value.encode("utf-8", "surrogatepass"))
    elif isinstance(value, (bytes, bytearray, memoryview)):
        put("bytes", bytes(value))
    elif isinstance(value, Mapping):
        put(f"map:{len(value)}")
        for key in sorted(value, key=repr):
            _feed(h, key, depth + 1)
            _feed(h, value[key], depth + 1)
    elif isinstance(value, (list, tuple)):
        put(f"seq:{type(value).__name__}:{len(value)}")
        for item in value:
            _feed(h, item, depth + 1)
    elif isinstance(value, (set, frozenset)):
        put(f"set:{len(value)}")
        for item in sorted(value, key=repr):
            _feed(h, item, depth + 1)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        put(f"dataclass:{type(value).__qualname__}")
        for field in dataclasses.fields(value):
            _feed(h, field.name, depth + 1)
            _feed(h, getattr(value, field.name), depth + 1)
    elif (
        hasattr(value, "tobytes") and hasattr(value, "mode") and hasattr(value, "size")
    ):  # PIL image
        put(f"image:{value.mode}:{value.size}", value.tobytes())
    else:
        put(
            f"object:{type(value).__module__}.{type(value).__qualname__}",
            _ADDRESS.sub("", repr(value)).encode(),
        )


def content_hash(value: Any) -> str:
    """A SHA-256 of ``value``'s content: tensors by dtype, shape and bytes; containers recursively.

    The same values give the same hash on every machine and run, whatever the memory layout
    (strides, device, conjugation bits).

    Example:
        >>> a = torch.arange(6.0).reshape(2, 3)
        >>> content_hash({"x": a.t().contiguous().t()}) == content_hash({"x": a})
        True
    """
    h = hashlib.sha256()
    _feed(h, value)
    return h.hexdigest()


@contextmanager
def fixed_random_state(seed: int = 0) -> Iterator[None]:
    """Seed Python, NumPy and PyTorch (CPU) with ``seed`` inside, and restore their states after.

    Random transforms of a dataset then give the same items on every fingerprint, and the
    training run's own random streams are left exactly where they were.
    """
    py_state = random.getstate()
    np_state = np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def _sample_indices(size: int, items: int) -> list[int]:
    if size <= 0 or items <= 0:
        return []
    if items >= size:
        return list(range(size))
    if items == 1:
        return [0]
    return sorted({round(i * (size - 1) / (items - 1)) for i in range(items)})


def _size(obj: Any) -> int | None:
    try:
        return len(obj)
    except Exception:
        return None


def fingerprint_dataset(dataset: Any, items: int = 32) -> dict[str, Any]:
    """Size and content hash of ``items`` items spread evenly over a dataset.

    A map-style dataset (``__getitem__`` and ``__len__``) is sampled at evenly spaced indices; an
    iterable one gives its first ``items`` items. Items are read with Python, NumPy and PyTorch
    seeded to 0 (random transforms give the same result each time) and the generators restored
    afterwards. ``deterministic`` is ``False`` when the first item read twice differs (a transform
    with its own unseeded generator): the hash then changes between runs.

    Example:
        >>> from torch.utils.data import TensorDataset
        >>> fp = fingerprint_dataset(TensorDataset(torch.arange(10.0)), items=4)
        >>> fp["size"], fp["items_hashed"], len(fp["hash"])
        (10, 4, 64)
    """
    out: dict[str, Any] = {
        "dataset": f"{type(dataset).__module__}.{type(dataset).__qualname__}",
        "size": _size(dataset),
        "items_hashed": 0,
        "hash": None,
        "deterministic": None,
    }
    if items <= 0:
        return out
    h = hashlib.sha256()
    size = out["size"]
    map_style = (
        hasattr(dataset, "__getitem__")
        and size is not None
        and not isinstance(dataset, torch.utils.data.IterableDataset)
    )
    try:
        with fixed_random_state(0):
            if map_style:
                indices = _sample_indices(size, items)
                for index in indices:
                    _feed(h, index)
                    _feed(h, dataset[index])
                out["items_hashed"] = len(indices)
            else:
                iterator = iter(dataset)
                if iterator is dataset:
                    out["note"] = "a one-shot iterator: not read (reading it would consume it)"
                    return out
                count = 0
                for count, item in enumerate(iterator, start=1):
                    _feed(h, item)
                    if count >= items:
                        break
                out["items_hashed"] = count
        out["hash"] = h.hexdigest()
        first = 0 if map_style else None
        with fixed_random_state(0):
            one = content_hash(dataset[first]) if first is not None and size else None
        with fixed_random_state(0):
            two = content_hash(dataset[first]) if first is not None and size else None
        out["deterministic"] = one == two if one is not None else None
    except Exception as exc:  # a dataset that cannot be read here: say why
        out["hash"] = None
        out["note"] = f"items could not be read ({type(exc).__name__}: {exc})"
    return out


def _named_loaders(obj: Any, prefix: str) -> list[tuple[str, Any]]:
    if obj is None:
        return []
    if hasattr(obj, "iterables") and not isinstance(
        obj, torch.utils.data.DataLoader
    ):  # CombinedLoader
        return _named_loaders(obj.iterables, prefix)
    if isinstance(obj, Mapping):
        return [pair for k, v in obj.items() for pair in _named_loaders(v, f"{prefix}/{k}")]
    if isinstance(obj, (list, tuple)):
        if len(obj) == 1:
            return _named_loaders(obj[0], prefix)
        return [pair for i, v in enumerate(obj) for pair in _named_loaders(v, f"{prefix}/{i}")]
    return [(prefix, obj)]


def fingerprint_loaders(loaders: Mapping[str, Any], items: int = 32) -> dict[str, dict[str, Any]]:
    """One fingerprint per data loader: ``{"train": {...}, "val/0": {...}}``.

    ``loaders`` maps a stage name to what the Trainer holds for it (a DataLoader, a list or dict of
    them, a CombinedLoader). For each loader: dataset type and size, number of batches, batch size
    and :func:`fingerprint_dataset` of its dataset. An ``"all"`` entry combines every hash.

    Example:
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> fp = fingerprint_loaders({"train": DataLoader(TensorDataset(torch.zeros(8, 2)), batch_size=4)}, items=2)
        >>> fp["train"]["batches"], fp["train"]["size"]
        (2, 8)
    """
    out: dict[str, dict[str, Any]] = {}
    for stage, obj in loaders.items():
        for name, loader in _named_loaders(obj, stage):
            dataset = getattr(loader, "dataset", None)
            batch_size = getattr(loader, "batch_size", None)
            if batch_size is None:
                batch_size = getattr(getattr(loader, "batch_sampler", None), "batch_size", None)
            entry = fingerprint_dataset(dataset if dataset is not None else loader, items)
            entry = {"batches": _size(loader), "batch_size": batch_size, **entry}
            out[name] = entry
    hashes = [f"{k}:{v.get('hash')}:{v.get('size')}" for k, v in sorted(out.items())]
    if out:
        out["all"] = {"hash": hashlib.sha256("\n".join(hashes).encode()).hexdigest()}
    return out


# --------------------------------------------------------------------------------------------
# Construction records
# --------------------------------------------------------------------------------------------

#: The ``_target_`` of a placeholder for an argument that could not be recorded.
UNRECORDED_TARGET = "lightning_inspect.record.parts.unrecorded"
_INIT_ATTR = "_lightning_inspect_init_args"
_SMALL_ARRAY = 64
#: How to give an object an explicit construction record.
_HOW_TO_RECORD = (
    "decorate its class with lightning_inspect.record_init, build it from a Hydra _target_ config, "
    "or call save_hyperparameters() in its __init__"
)
_NO_EXPLICIT_SOURCE = f"its constructor arguments were not recorded: {_HOW_TO_RECORD}"


def unrecorded(type: str = "?", reason: str = "", **_: Any) -> NoReturn:  # the record's key
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


def _lighten(value: Any, depth: int = 0) -> Any:
    """Large arrays replaced by a description, so a record never keeps them alive."""
    if isinstance(value, torch.Tensor) and value.numel() > _SMALL_ARRAY:
        return _Placeholder(
            "torch.Tensor",
            f"a tensor of shape {tuple(value.shape)} ({value.dtype}); its values are not recorded",
        )
    if isinstance(value, np.ndarray) and value.size > _SMALL_ARRAY:
        return _Placeholder(
            "numpy.ndarray",
            f"an array of shape {value.shape} ({value.dtype}); its values are not recorded",
        )
    if depth < 3 and isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return type(value)(_lighten(v, depth + 1) for v in value)
    if depth < 3 and type(value) is dict:
        return {k: _lighten(v, depth + 1) for k, v in value.items()}
    return value


def _remember(obj: Any, cls: type, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    holder = getattr(obj, "__dict__", None)
    if holder is None or _INIT_ATTR in holder:
        return
    try:
        signature = inspect.signature(cls.__init__)  # type: ignore[misc]
        bound = signature.bind(None, *args, **kwargs)
    except (TypeError, ValueError):  # e.g. copy/pickle call __new__ without arguments
        return
    bound.apply_defaults()
    params = tuple(signature.parameters.values())[1:]
    names = {p.name for p in params}
    arguments = {k: _lighten(v) for k, v in bound.arguments.items() if k in names}
    holder[_INIT_ATTR] = _InitArgs(cls, params, arguments)


def record_init(cls: type[T]) -> type[T]:
    """Class decorator: every instance remembers the arguments it was constructed with.

    The arguments are bound to ``__init__``'s signature (defaults filled in) when the object is
    created, in ``__new__``, so ``__init__``, ``save_hyperparameters`` and subclasses are
    unchanged; subclasses are recorded with their own ``__init__``. Large tensors and arrays are
    kept only as a description. :func:`construction_record` uses what was remembered.

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
        if own_new is not None:
            obj = own_new(subcls, *args, **kwargs)
        else:
            parent_new = super(cls, subcls).__new__  # type: ignore[misc]
            obj = (
                parent_new(subcls)
                if parent_new is object.__new__
                else parent_new(subcls, *args, **kwargs)
            )
        _remember(obj, subcls, args, kwargs)
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


def _locate(path: str) -> Any:
    """The object at dotted ``path`` (module, then attributes), like Hydra's ``_locate``."""
    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(path)


def object_path(obj: Any) -> str | None:
    """A dotted path at which ``obj`` (a class or function) can be found again, or ``None``.

    Example:
        >>> object_path(nn.Linear), object_path(torch.relu)
        ('torch.nn.modules.linear.Linear', 'torch.relu')
    """
    module = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", None)
    name = getattr(obj, "__name__", None)
    candidates = []
    if module and qualname:
        candidates.append(f"{module}.{qualname}")
    if module and name:
        candidates.append(f"{module}.{name}")
    if name:
        candidates += [
            f"torch.{name}",
            f"torch.nn.functional.{name}",
            f"math.{name}",
            f"operator.{name}",
        ]
    for path in candidates:
        if "<" in path:
            continue
        try:
            if _locate(path) is obj:
                return path
        except Exception:
            continue
    return None


def _get_object(path: str) -> dict[str, Any]:
    return {"_target_": "hydra.utils.get_object", "path": path}


def _placeholder(type_name: str, reason: str) -> dict[str, Any]:
    return {"_target_": UNRECORDED_TARGET, "type": type_name, "reason": reason}


def _type_name(obj: Any) -> str:
    cls = obj if isinstance(obj, type) else type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


@dataclasses.dataclass
class ConstructionRecord:
    """How an object was built, as a Hydra-instantiable config.

    ``hydra.utils.instantiate(record.config)`` builds an equivalent object (for a model: same
    modules and parameter shapes; load the trained ``state_dict`` for the weights).

    Attributes:
        config: ``{"_target_": ..., **arguments}``, nested for components.
        source: where the arguments came from: ``"record_init"``, ``"hydra config at <key>"``,
            ``"hparams"`` (``save_hyperparameters``), ``"structure"`` (a module container from
            its children, a dataclass or named tuple from its fields) or ``"none"`` (no explicit
            source: ``config`` is a placeholder saying how to add one).
        notes: arguments that are defaulted or replaced by placeholders, by path.
        verified: ``True`` when rebuilding it (on the meta device) gave the same modules and
            shapes, ``False`` when not (see ``notes``), ``None`` when not checked.
    """

    config: dict[str, Any]
    source: str
    notes: list[str] = dataclasses.field(default_factory=list)
    verified: bool | None = None

    def to_yaml(self, title: str = "model") -> str:
        """The config as YAML, with the source, verification and notes as comments on top."""
        import yaml

        lines = [
            f"# Construction record of the {title}: hydra.utils.instantiate(yaml.safe_load(<this file>))",
            "# builds an equivalent object; load the trained weights with load_state_dict.",
            f"# Source of the arguments: {self.source}.",
            f"# Rebuild checked: {({True: 'yes, same modules and parameter shapes', False: 'NO (see notes)', None: 'no'})[self.verified]}.",
        ]
        lines += [f"# Note: {note}" for note in self.notes]
        body = yaml.safe_dump(
            _yaml_safe(self.config), sort_keys=False, default_flow_style=False, allow_unicode=True
        )
        return "\n".join(lines) + "\n" + body


def _yaml_safe(value: Any) -> Any:
    """Plain YAML types only (other objects as their text)."""
    if isinstance(value, Mapping):
        return {str(k): _yaml_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_yaml_safe(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    for kind in (
        bool,
        int,
        float,
        str,
    ):  # subclasses too (version strings, IntEnum) as the plain type
        if isinstance(value, kind):
            return kind(value)
    return None if value is None else str(value)


class _Recorder:
    """Turns objects into Hydra-instantiable configs, collecting notes by path."""

    def __init__(self) -> None:
        self.notes: list[str] = []
        self._active: set[int] = set()

    def note(self, path: str, text: str) -> None:
        self.notes.append(f"{path}: {text}")

    def value(self, value: Any, path: str) -> Any:
        if isinstance(value, _Placeholder):
            self.note(path, f"not recorded ({value.type}: {value.reason})")
            return _placeholder(value.type, value.reason)
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        if isinstance(value, np.generic):
            return value.item()
        if isinstance(value, enum.Enum):
            target = object_path(type(value))
            if target:
                return {"_target_": target, "_args_": [self.value(value.value, path)]}
        if isinstance(value, pathlib.PurePath):
            return {"_target_": "pathlib.Path", "_args_": [str(value)]}
        if isinstance(value, torch.dtype):
            return _get_object(str(value))
        if isinstance(value, torch.device):
            return {"_target_": "torch.device", "_args_": [str(value)]}
        if isinstance(value, torch.Size):
            return list(value)
        if isinstance(value, torch.Tensor):
            if (
                value.numel() <= _SMALL_ARRAY
                and value.layout == torch.strided
                and value.device.type != "meta"
            ):
                return {
                    "_target_": "torch.tensor",
                    "data": value.detach().cpu().tolist(),
                    "dtype": _get_object(str(value.dtype)),
                }
            return self.placeholder(
                path,
                "torch.Tensor",
                f"a tensor of shape {tuple(value.shape)} ({value.dtype}); its values are not recorded",
            )
        if isinstance(value, np.ndarray):
            if value.size <= _SMALL_ARRAY and value.dtype != object:
                return {
                    "_target_": "numpy.array",
                    "object": value.tolist(),
                    "dtype": value.dtype.str,
                }
            return self.placeholder(
                path,
                "numpy.ndarray",
                f"an array of shape {value.shape}; its values are not recorded",
            )
        if _is_omegaconf(value):
            return self.value(to_plain(value), path)
        if isinstance(value, Mapping):
            if "_target_" in value:  # already a config (e.g. a Hydra node passed through)
                return to_plain(value)
            return {str(k): self.value(v, f"{path}.{k}") for k, v in value.items()}
        if isinstance(value, (list, tuple, set, frozenset)) and not hasattr(value, "_fields"):
            items = value if isinstance(value, (list, tuple)) else sorted(value, key=repr)
            return [self.value(v, f"{path}.{i}") for i, v in enumerate(items)]
        if isinstance(value, functools.partial):
            target = object_path(value.func)
            if target is None:
                return self.placeholder(
                    path,
                    "functools.partial",
                    f"its function {value.func!r} cannot be found by name",
                )
            out: dict[str, Any] = {"_target_": target, "_partial_": True}
            if value.args:
                out["_args_"] = [self.value(v, f"{path}.{i}") for i, v in enumerate(value.args)]
            out.update({k: self.value(v, f"{path}.{k}") for k, v in value.keywords.items()})
            return out
        if isinstance(value, type) or inspect.isroutine(value):
            target = object_path(value)
            if target is None:
                why = (
                    "a lambda"
                    if getattr(value, "__name__", "") == "<lambda>"
                    else "defined inside a function or not importable"
                )
                return self.placeholder(
                    path, _type_name(value), f"{why}: it cannot be found by name"
                )
            return _get_object(target)
        return self.object(value, path)

    def placeholder(self, path: str, type_name: str, reason: str) -> dict[str, Any]:
        self.note(path, f"not recorded ({type_name}: {reason})")
        return _placeholder(type_name, reason)

    def object(self, obj: Any, path: str) -> dict[str, Any]:
        cls = type(obj)
        target = object_path(cls)
        if target is None:
            return self.placeholder(
                path,
                _type_name(obj),
                "its class is defined inside a function or cannot be imported by name",
            )
        if id(obj) in self._active:
            return self.placeholder(path, _type_name(obj), "a circular reference")
        self._active.add(id(obj))
        try:
            return self._object(obj, cls, target, path)
        finally:
            self._active.discard(id(obj))

    def _object(self, obj: Any, cls: type, target: str, path: str) -> dict[str, Any]:
        """``obj`` from an explicit source only; else a placeholder saying how to add one."""
        if target.startswith("__main__."):
            self.note(
                path,
                f"{cls.__qualname__} is defined in the running script (__main__): "
                "rebuild it from that script, or move the class into a module",
            )
        # Containers of the standard library of modules: their children are their arguments.
        if cls is nn.Identity:
            return {"_target_": target}
        if cls in (nn.Sequential, nn.ModuleList, nn.ModuleDict):
            children = {n: self.value(m, f"{path}.{n}") for n, m in obj.named_children()}
            if cls is nn.ModuleDict:
                return {"_target_": target, "modules": children}
            key = "_args_" if cls is nn.Sequential else "modules"
            return {"_target_": target, key: list(children.values())}
        recorded = recorded_init_args(obj)
        if recorded is not None:
            return self._from_arguments(target, recorded.params, recorded.arguments, path)
        if dataclasses.is_dataclass(obj):
            fields = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj) if f.init}
            return {
                "_target_": target,
                **{k: self.value(v, f"{path}.{k}") for k, v in fields.items()},
            }
        if hasattr(obj, "_fields") and hasattr(obj, "_asdict"):  # NamedTuple
            items = obj._asdict().items()
            return {"_target_": target, **{k: self.value(v, f"{path}.{k}") for k, v in items}}
        saved = _saved_hparams(obj)
        if saved is None:
            return self.placeholder(path, _type_name(obj), _NO_EXPLICIT_SOURCE)
        try:
            params = tuple(inspect.signature(cls.__init__).parameters.values())[1:]  # type: ignore[misc]
        except (TypeError, ValueError):
            return self.placeholder(
                path, _type_name(obj), "its constructor's signature cannot be read"
            )
        arguments = self._hparams_arguments(obj, params, saved, path)
        return self._from_arguments(target, params, arguments, path)

    def _hparams_arguments(
        self, obj: Any, params: Sequence[inspect.Parameter], saved: dict[str, Any], path: str
    ) -> dict[str, Any]:
        """Constructor arguments from ``save_hyperparameters``; placeholders for missing ones."""
        by_name = {p.name: p for p in params}
        takes_kwargs = any(p.kind is p.VAR_KEYWORD for p in params)
        # save_hyperparameters(config) with one mapping argument names that argument.
        whole = getattr(obj, "_hparams_name", None)
        if whole in by_name and by_name[whole].kind is not inspect.Parameter.VAR_KEYWORD:
            return {whole: saved}
        arguments = {k: v for k, v in saved.items() if k in by_name or takes_kwargs}
        for p in params:
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.name in arguments:
                continue
            if p.default is p.empty:
                why = f"argument {p.name!r} is not in the saved hyperparameters; {_HOW_TO_RECORD}"
                arguments[p.name] = _Placeholder("?", why)
            else:
                self.note(
                    f"{path}.{p.name}",
                    f"not in the saved hyperparameters; its default ({p.default!r}) is used",
                )
        return arguments

    def _from_arguments(
        self,
        target: str,
        params: Sequence[inspect.Parameter],
        arguments: Mapping[str, Any],
        path: str,
    ) -> dict[str, Any]:
        out: dict[str, Any] = {"_target_": target}
        positional: list[Any] = []
        kwargs: dict[str, Any] = {}
        by_name = {p.name: p for p in params}
        for name, value in arguments.items():
            p = by_name.get(name)
            if p is not None and p.kind is p.POSITIONAL_ONLY:
                positional.append(self.value(value, f"{path}.{name}"))
            elif p is not None and p.kind is p.VAR_POSITIONAL:
                positional += [self.value(v, f"{path}.{name}.{i}") for i, v in enumerate(value)]
            elif p is not None and p.kind is p.VAR_KEYWORD:
                kwargs.update({str(k): self.value(v, f"{path}.{k}") for k, v in value.items()})
            else:
                kwargs[name] = self.value(value, f"{path}.{name}")
        if positional:
            out["_args_"] = positional
        out.update(kwargs)
        return out


def _is_omegaconf(value: Any) -> bool:
    module = type(value).__module__
    return module.startswith("omegaconf.") and type(value).__name__ in ("DictConfig", "ListConfig")


def _saved_hparams(obj: Any) -> dict[str, Any] | None:
    """``save_hyperparameters`` values of a LightningModule / LightningDataModule, if any."""
    if "_hparams" not in getattr(obj, "__dict__", {}):
        return None
    try:
        hparams = obj.hparams
    except Exception:
        return None
    return dict(hparams) if isinstance(hparams, Mapping) and hparams else None


def _module_signature(model: nn.Module) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    shapes = {
        normalise_name(n): tuple(t.shape)
        for n, t in [*model.named_parameters(), *model.named_buffers()]
    }
    types = {normalise_name(n): type(m).__qualname__ for n, m in model.named_modules()}
    return shapes, types


def rebuild_mismatch(
    config: Mapping[str, Any], original: nn.Module, max_params: int = 50_000_000
) -> str | None:
    """``None`` when ``hydra.utils.instantiate(config)`` builds ``original``'s modules and shapes.

    The copy is built on the meta device (no memory, no weights), with the random generators
    restored afterwards; where that fails and ``original`` has at most ``max_params`` parameter
    elements, on the CPU. Otherwise a sentence saying what differs or why it could not be built.

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
        size = sum(p.numel() for p in original.parameters())
        if size > max_params:
            return f"could not be built on the meta device ({type(exc).__name__}: {exc})"
        try:
            rebuilt = build("cpu")
        except Exception as exc2:
            return f"building it failed ({type(exc2).__name__}: {str(exc2).splitlines()[0] if str(exc2) else ''})"
    if not isinstance(rebuilt, nn.Module):
        return f"it builds a {type(rebuilt).__name__}, not a torch.nn.Module"
    if type(rebuilt) is not type(original):
        return f"it builds a {_type_name(rebuilt)}, not a {_type_name(original)}"
    want_shapes, want_types = _module_signature(original)
    got_shapes, got_types = _module_signature(rebuilt)
    problems: list[str] = []
    for name in sorted(set(want_types) | set(got_types)):
        if want_types.get(name) != got_types.get(name):
            problems.append(
                f"module {name or '<root>'!r}: {want_types.get(name)} vs rebuilt {got_types.get(name)}"
            )
    for name in sorted(set(want_shapes) | set(got_shapes)):
        if want_shapes.get(name) != got_shapes.get(name):
            problems.append(
                f"tensor {name!r}: shape {want_shapes.get(name)} vs rebuilt {got_shapes.get(name)}"
            )
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        return "; ".join(problems[:5]) + more
    return None


def construction_record(
    obj: Any,
    hydra_node: Mapping[str, Any] | None = None,
    hydra_key: str = "model",
    verify: bool = True,
) -> ConstructionRecord:
    """A Hydra-instantiable config that builds an object equivalent to ``obj``.

    Only explicit sources are used. Candidates, in order: the arguments remembered by
    :func:`record_init`; ``hydra_node`` (the ``_target_`` config ``obj`` was instantiated from,
    found at ``hydra_key``); the saved hyperparameters (``save_hyperparameters``). Arguments that
    are objects become their own records from the same sources, recursively (``nn.Sequential``,
    ``nn.ModuleList`` and ``nn.ModuleDict`` from their children, dataclasses and named tuples
    from their fields); classes and functions become ``hydra.utils.get_object`` lookups; what has
    no explicit source becomes a placeholder (``_target_:
    lightning_inspect.record.parts.unrecorded`` with ``type`` and ``reason``) that fails clearly
    when built and says how to record it. With ``verify`` (and ``obj`` a module) each candidate
    is rebuilt on the meta device and the first one with the same modules and parameter shapes
    is taken.

    Example:
        >>> node = {"_target_": "torch.nn.Linear", "in_features": 2, "out_features": 4}
        >>> record = construction_record(nn.Linear(2, 4), node)
        >>> record.source, record.verified
        ("hydra config at 'model'", True)
        >>> construction_record(nn.Linear(2, 4)).source
        'none'
    """
    root = hydra_key or "model"
    recorder = _Recorder()
    config = {**recorder.object(obj, root), "_convert_": "all"}
    if recorded_init_args(obj) is not None:
        source = "record_init"
    elif config["_target_"] == UNRECORDED_TARGET:
        source = "none"
    else:
        source = "hparams" if _saved_hparams(obj) else "structure"
    own = (source, config, recorder.notes)
    candidates = [own] if source == "record_init" else []
    if hydra_node is not None:
        candidates.append((f"hydra config at {hydra_key!r}", to_plain(hydra_node), []))
    if source not in ("record_init", "none"):
        candidates.append(own)
    if not candidates:
        return ConstructionRecord(config, source, list(recorder.notes), None)
    if not verify or not isinstance(obj, nn.Module):
        source, config, notes = candidates[0]
        return ConstructionRecord(config, source, list(notes), None)
    try:
        import hydra.utils  # noqa: F401
    except ImportError:
        source, config, notes = candidates[0]
        return ConstructionRecord(
            config, source, [*notes, "not checked: hydra-core is not installed"], None
        )
    failures: list[str] = []
    for source, config, notes in candidates:
        problem = rebuild_mismatch(config, obj)
        if problem is None:
            return ConstructionRecord(config, source, list(notes), True)
        failures.append(f"from {source}: {problem}")
    source, config, notes = candidates[0]
    checked = [*notes, *(f"rebuild check failed {f}" for f in failures)]
    return ConstructionRecord(config, source, checked, False)

"""The code, seed, machine and software of a run (``git`` CLI; ``torch.utils.collect_env``)."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import fnmatch
import importlib.metadata
import os
import platform
import re
import socket
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from torch.utils import collect_env

from lightning_inspect.record.secrets import MASK, SecretMasker

_VERSIONS = ("lightning", "lightning-inspect", "numpy", "hydra-core", "omegaconf", "tensorboard")


def _run(command: str | list[str]) -> tuple[int, str, str]:
    """``collect_env``'s command runner, with a timeout."""
    try:
        done = subprocess.run(
            command, shell=isinstance(command, str), capture_output=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return 1, "", str(exc)
    out, err = (b.decode("utf-8", "replace").strip() for b in (done.stdout, done.stderr))
    return done.returncode, out, err


def _version(name: str) -> str | None:
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        return importlib.metadata.version(name)
    return None


def environment(
    env_vars: Iterable[str] = (), masker: SecretMasker | None = None, packages: bool = False
) -> dict[str, Any]:
    """The seed given to ``seed_everything``, the host, the versions, the environment variables
    named by ``env_vars`` (names or globs; secrets masked) and, with ``packages``, every installed
    package as ``name==version`` (``pip list``, else the metadata). CUDA is not initialised.
    """
    seed, workers = os.environ.get("PL_GLOBAL_SEED"), os.environ.get("PL_SEED_WORKERS")
    seed = int(seed) if seed is not None and seed.lstrip("-").isdigit() else seed
    cpu = re.search(r"^Model name:\s*(.+)$", collect_env.get_cpu_info(_run) or "", re.M)
    gpus = (collect_env.get_gpu_info(_run) or "").splitlines()
    names = collections.Counter(re.sub(r"^GPU \d+: ", "", g).strip() for g in gpus if g.strip())
    if not names and torch.backends.mps.is_available():
        names["Apple MPS"] = 1
    host = {
        "host": socket.gethostname(),
        "os": collect_env.get_os(_run),
        "cpu": cpu.group(1).strip() if cpu else platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "gpu_count": torch.cuda.device_count() if torch.cuda.is_available() else names.total(),
        "gpu": ", ".join(f"{n} x {g}" if n > 1 else g for g, n in names.items()) or None,
        "nvidia_driver": collect_env.get_nvidia_driver_version(_run),
    }
    # cudnn.version() initialises CUDA: read it only where CUDA is in use already
    cudnn = torch.backends.cudnn.version() if torch.cuda.is_initialized() else None
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    versions.update(cuda=torch.version.cuda, cudnn=None if cudnn is None else str(cudnn))
    versions.update({name: _version(name) for name in (*_VERSIONS, "mlflow")})
    masker, patterns = masker or SecretMasker(), list(env_vars)
    env = {
        k: MASK if masker.is_secret(k) and v else masker.text(v)
        for k, v in sorted(os.environ.items())
        if any(fnmatch.fnmatchcase(k, p) for p in patterns)
    }
    seed_info = {"seed": seed, "seed_workers": None if workers is None else workers == "1"}
    out = {"seed": seed_info, "host": host, "versions": versions, "env": env, "packages": None}
    if packages:
        with mock.patch.dict(os.environ):  # collect_env sets PIP_DISABLE_PIP_VERSION_CHECK
            listed = collect_env.get_pip_packages(_run, patterns=[""])[1]
        found = (f"{d.metadata['Name']}=={d.version}" for d in importlib.metadata.distributions())
        out["packages"] = listed.splitlines() if listed else sorted(found)
    return out


def peak_memory() -> dict[str, int | None]:
    """Peak RSS of this process and of its finished children, peak CUDA memory allocated, bytes."""
    import resource

    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    rss = {
        f"peak_rss{part}_bytes": resource.getrusage(who).ru_maxrss * scale
        for part, who in (("", resource.RUSAGE_SELF), ("_children", resource.RUSAGE_CHILDREN))
    }
    devices = range(torch.cuda.device_count()) if torch.cuda.is_initialized() else ()
    cuda = max((torch.cuda.max_memory_allocated(i) for i in devices), default=None)
    return {**rss, "cuda_max_allocated_bytes": cuda}


#: Diffs longer than this many characters are cut (with a note at the end).
MAX_DIFF_CHARS = 20_000_000


@dataclasses.dataclass(frozen=True)
class GitInfo:
    """Commit, branch, dirty flag, diff and untracked files; ``notice`` says what is missing."""

    commit: str | None = None
    branch: str | None = None
    dirty: bool | None = None
    diff: str = ""
    untracked: tuple[str, ...] = ()
    notice: str | None = None


def _git(*args: str, cwd: str, timeout: float) -> str:
    """``git args`` output; a ``RuntimeError`` whose message is the notice to record."""
    env = {**os.environ, "GIT_TERMINAL_PROMPT": "0", "GIT_OPTIONAL_LOCKS": "0", "LC_ALL": "C"}
    try:
        done = subprocess.run(
            ["git", *args], cwd=cwd, env=env, capture_output=True, timeout=timeout
        )
    except FileNotFoundError as exc:
        raise RuntimeError("git is not installed (no 'git' executable on PATH)") from exc
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RuntimeError(f"'git {args[0]}' failed or took over {timeout:g} s ({exc})") from exc
    if done.returncode != 0:
        lines = done.stderr.decode("utf-8", "replace").strip().splitlines()
        raise RuntimeError(lines[0] if lines else f"'git {args[0]}' exited with {done.returncode}")
    return done.stdout.decode("utf-8", "replace")


def git_info(
    repo_dir: str | os.PathLike[str] | None = None, timeout: float = 10.0, diff: bool = True
) -> GitInfo:
    """The git state of the repository holding ``repo_dir`` (default: the working directory).

    Never raises: what could not be read is in ``notice``. The diff is ``git diff HEAD``.
    """
    where = str(Path(repo_dir or os.getcwd()).resolve())
    try:
        status = _git("status", "--porcelain=v2", "--branch", "-z", cwd=where, timeout=timeout)
    except RuntimeError as exc:
        outside = "not a git repository" in str(exc).lower() or not Path(where).is_dir()
        return GitInfo(notice=f"{where} is not inside a git repository" if outside else str(exc))
    entries, notices = status.split("\0"), []
    heads = dict(e.split(" ", 2)[1:] for e in entries if e.startswith("# branch."))
    commit, branch = heads.get("branch.oid"), heads.get("branch.head")
    untracked = tuple(e[2:] for e in entries if e.startswith("? "))
    dirty = any(e[:2] in ("1 ", "2 ", "u ") for e in entries)  # changed, renamed, unmerged
    if commit in (None, "(initial)"):
        return GitInfo(notice=f"the repository at {where} has no commits yet")
    if branch == "(detached)":
        branch = None
        notices.append("detached HEAD (no branch)")
    patch = ""
    if diff and dirty:
        try:
            args = ("diff", "HEAD", "--no-color", "--no-ext-diff", "--no-textconv")
            patch = _git(*args, cwd=where, timeout=timeout)
        except RuntimeError as exc:
            notices.append(f"diff unavailable: {exc}")
        if len(patch) > MAX_DIFF_CHARS:
            patch = f"{patch[:MAX_DIFF_CHARS]}\n# [diff cut at {MAX_DIFF_CHARS} characters]\n"
    return GitInfo(commit, branch, dirty, patch, untracked, "; ".join(notices) or None)

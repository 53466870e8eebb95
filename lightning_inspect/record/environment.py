"""The machine and software of a run: ``torch.utils.collect_env`` where it covers it, plus seed,
peak memory and the environment variables asked for."""

from __future__ import annotations

import collections
import fnmatch
import importlib.metadata
import os
import platform
import re
import socket
import subprocess
import sys
from collections.abc import Iterable
from typing import Any
from unittest import mock

import torch
from torch.utils import collect_env

from lightning_inspect.record.secrets import MASK, SecretMasker

_DISTRIBUTIONS = ("numpy", "hydra-core", "omegaconf", "tensorboard", "mlflow", "lightning-inspect")


def _run(command: str | list[str], timeout: float = 10.0) -> tuple[int, str, str]:
    """``collect_env``'s command runner, with a timeout."""
    try:
        done = subprocess.run(
            command, shell=isinstance(command, str), capture_output=True, timeout=timeout
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return 1, "", str(exc)
    out, err = (b.decode("utf-8", "replace").strip() for b in (done.stdout, done.stderr))
    return done.returncode, out, err


def seed_info() -> dict[str, Any]:
    """The seed given to Lightning's ``seed_everything`` (``PL_GLOBAL_SEED``), or ``None``.

    Example:
        >>> import lightning as L
        >>> _ = L.seed_everything(7, verbose=False)
        >>> seed_info()["seed"]
        7
    """
    raw, workers = os.environ.get("PL_GLOBAL_SEED"), os.environ.get("PL_SEED_WORKERS")
    seed = int(raw) if raw is not None and raw.lstrip("-").isdigit() else raw
    return {"seed": seed, "seed_workers": None if workers is None else workers == "1"}


def host_info() -> dict[str, Any]:
    """Host, OS, CPU model and count, GPU models (``nvidia-smi -L``: CUDA is not initialised).

    Example:
        >>> sorted(host_info())[:3]
        ['cpu_count', 'cpu_model', 'gpu_count']
    """
    cpu = re.search(r"^Model name:\s*(.+)$", collect_env.get_cpu_info(_run) or "", re.M)
    gpus = [
        re.sub(r"^GPU \d+: ", "", g) for g in (collect_env.get_gpu_info(_run) or "").splitlines()
    ]
    names = collections.Counter(g.strip() for g in gpus if g.strip())
    mps = getattr(torch.backends, "mps", None)
    if not names and mps is not None and mps.is_available():
        names["Apple MPS"] = 1
    return {
        "hostname": socket.gethostname(),
        "os": collect_env.get_os(_run),
        "platform": collect_env.get_python_platform(),
        "cpu_model": cpu.group(1).strip() if cpu else platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "gpu_count": torch.cuda.device_count()
        if torch.cuda.is_available()
        else sum(names.values()),
        "gpu_model": ", ".join(f"{n} x {g}" if n > 1 else g for g, n in names.items()) or None,
        "nvidia_driver": collect_env.get_nvidia_driver_version(_run),
    }


def version_info() -> dict[str, str | None]:
    """Python, PyTorch, Lightning, CUDA (PyTorch's build) and cuDNN versions, and the tracking stack's.

    Example:
        >>> version_info()["torch"] == torch.__version__
        True
    """

    def dist(name: str) -> str | None:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": dist("lightning") or dist("pytorch-lightning"),
        "cuda": torch.version.cuda,
        "cudnn": None if cudnn is None else str(cudnn),
        **{name: dist(name) for name in _DISTRIBUTIONS},
    }


def installed_packages() -> list[str]:
    """Every installed distribution as ``name==version`` (``pip list`` through ``collect_env``).

    Example:
        >>> any(line.startswith("torch==") for line in installed_packages())
        True
    """
    with mock.patch.dict(os.environ):  # collect_env sets PIP_DISABLE_PIP_VERSION_CHECK
        out = collect_env.get_pip_packages(_run, patterns=[""])[1]
    if out:
        return out.splitlines()
    return sorted(f"{d.metadata['Name']}=={d.version}" for d in importlib.metadata.distributions())


def peak_memory() -> dict[str, int | None]:
    """Peak RSS of this process and of its finished children, peak CUDA memory allocated (bytes).

    Example:
        >>> peak_memory()["peak_rss_bytes"] > 0
        True
    """
    import resource

    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    return {
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale,
        "peak_rss_children_bytes": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * scale,
        "cuda_max_allocated_bytes": max(
            torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count())
        )
        if cuda
        else None,
    }


def env_var_values(patterns: Iterable[str], masker: SecretMasker | None = None) -> dict[str, str]:
    """The environment variables named by ``patterns`` (names or globs), secrets masked.

    Example:
        >>> os.environ["RECORD_DEMO_TOKEN"] = "abc"
        >>> env_var_values(["RECORD_DEMO_*"])
        {'RECORD_DEMO_TOKEN': '***'}
    """
    masker, patterns = masker or SecretMasker(), list(patterns)
    return {
        k: MASK if masker.is_secret(k) and v else masker.text(v)
        for k, v in sorted(os.environ.items())
        if any(fnmatch.fnmatchcase(k, p) for p in patterns)
    }

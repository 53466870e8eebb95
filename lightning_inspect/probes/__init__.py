"""Probes: a user's own inspection code, switched on by tag (``probe``, ``probing``, ``ProbeSwitch``)."""

from lightning_inspect.probes.context import (
    ENV_VAR,
    ProbeContext,
    ProbeWarning,
    current_context,
    enabled,
    probe,
    probing,
    reload_env,
)
from lightning_inspect.probes.switch import ProbeSwitch

__all__ = [
    "ENV_VAR",
    "ProbeContext",
    "ProbeSwitch",
    "ProbeWarning",
    "current_context",
    "enabled",
    "probe",
    "probing",
    "reload_env",
]

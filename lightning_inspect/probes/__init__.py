"""Probes: a user's own inspection code, switched on by tag (``probe``, ``probing``, ``ProbeSwitch``)."""

from lightning_inspect.probes.context import ProbeContext, current_context, enabled, probe, probing
from lightning_inspect.probes.switch import ProbeSwitch

__all__ = ["ProbeContext", "ProbeSwitch", "current_context", "enabled", "probe", "probing"]

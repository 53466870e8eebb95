"""lightning-inspect: look inside Lightning models while they train.

Example:
    >>> from lightning_inspect import ActivationMonitor, GradientMonitor
    >>> callbacks = [ActivationMonitor(modules="encoder.*", every_n_steps=50), GradientMonitor()]
"""

from lightning_inspect.backends import MemorySink, Sink
from lightning_inspect.backends.read_stats import read_stats
from lightning_inspect.core.monitor import ModuleMonitor
from lightning_inspect.core.selection import normalise_name, select_modules
from lightning_inspect.core.stats import ALL_STATS, DEFAULT_STATS, tensor_stats
from lightning_inspect.errors import (
    BackendError,
    ConfigError,
    InspectError,
    NonFiniteError,
    SelectionError,
)
from lightning_inspect.health.monitor import HealthMonitor
from lightning_inspect.health.nonfinite import FirstNonFiniteError, NonFiniteOrigin
from lightning_inspect.health.rules import Finding, HealthReport, HealthRules, HealthThresholds
from lightning_inspect.hydra.instantiate import instantiate_callbacks, validate_callback_config
from lightning_inspect.monitors.activations import ActivationMonitor
from lightning_inspect.monitors.gradients import GradientMonitor
from lightning_inspect.monitors.graph import GraphMonitor
from lightning_inspect.monitors.weights import WeightMonitor
from lightning_inspect.overview import OverviewPage
from lightning_inspect.probes.context import ProbeContext, current_context, enabled, probe, probing
from lightning_inspect.probes.switch import ProbeSwitch
from lightning_inspect.record import RecordInit, RunRecord, construction_record, record_init
from lightning_inspect.shapes.tracer import ShapeTracer

__version__ = "0.1.0"

__all__ = [
    "ALL_STATS", "DEFAULT_STATS", "ActivationMonitor", "BackendError", "ConfigError", "Finding",
    "FirstNonFiniteError", "GradientMonitor", "GraphMonitor", "HealthMonitor", "HealthReport",
    "HealthRules", "HealthThresholds", "InspectError", "MemorySink", "ModuleMonitor",
    "NonFiniteError", "NonFiniteOrigin", "OverviewPage", "ProbeContext", "ProbeSwitch",
    "RecordInit", "RunRecord", "SelectionError", "ShapeTracer", "Sink", "WeightMonitor",
    "construction_record", "current_context", "enabled", "instantiate_callbacks", "normalise_name",
    "probe", "probing", "read_stats", "record_init", "select_modules", "tensor_stats",
    "validate_callback_config",
]  # fmt: skip

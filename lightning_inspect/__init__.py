"""lightning-inspect: look inside Lightning models while they train.

Example:
    >>> from lightning_inspect import ActivationMonitor, GradientMonitor
    >>> callbacks = [ActivationMonitor(modules="encoder.*", every_n_steps=50), GradientMonitor()]
"""

from lightning_inspect.callbacks import (
    ActivationMonitor,
    GradientMonitor,
    GraphMonitor,
    HealthMonitor,
    ModuleMonitor,
    ProbeSwitch,
    RunRecord,
    ShapeTracer,
    WeightMonitor,
)
from lightning_inspect.config import instantiate_callbacks, validate_callback_config
from lightning_inspect.diagnostics import Finding, HealthReport, HealthRules, HealthThresholds
from lightning_inspect.errors import (
    BackendError,
    ConfigError,
    InspectError,
    NonFiniteError,
    SelectionError,
)
from lightning_inspect.health_nonfinite import FirstNonFiniteError, NonFiniteOrigin
from lightning_inspect.overview import OverviewPage
from lightning_inspect.probes import ProbeContext, current_context, enabled, probe, probing
from lightning_inspect.read_stats import read_stats
from lightning_inspect.run_record import RecordInit, construction_record, record_init
from lightning_inspect.selection import normalise_name, select_modules
from lightning_inspect.sinks import MemorySink, Sink
from lightning_inspect.stats import ALL_STATS, DEFAULT_STATS, tensor_stats

__version__ = "0.1.0"

__all__ = [
    "ALL_STATS",
    "DEFAULT_STATS",
    "ActivationMonitor",
    "BackendError",
    "ConfigError",
    "Finding",
    "FirstNonFiniteError",
    "GradientMonitor",
    "GraphMonitor",
    "HealthMonitor",
    "HealthReport",
    "HealthRules",
    "HealthThresholds",
    "InspectError",
    "MemorySink",
    "ModuleMonitor",
    "NonFiniteError",
    "NonFiniteOrigin",
    "OverviewPage",
    "ProbeContext",
    "ProbeSwitch",
    "RecordInit",
    "RunRecord",
    "SelectionError",
    "ShapeTracer",
    "Sink",
    "WeightMonitor",
    "construction_record",
    "current_context",
    "enabled",
    "instantiate_callbacks",
    "normalise_name",
    "probe",
    "probing",
    "read_stats",
    "record_init",
    "select_modules",
    "tensor_stats",
    "validate_callback_config",
]

"""Lightning callbacks: thin glue between the Trainer and the inspection machinery."""

from lightning_inspect.callbacks.activations import ActivationMonitor
from lightning_inspect.callbacks.base import ModuleMonitor
from lightning_inspect.callbacks.gradients import GradientMonitor
from lightning_inspect.callbacks.graph import GraphMonitor
from lightning_inspect.callbacks.health import HealthMonitor
from lightning_inspect.callbacks.probes import ProbeSwitch
from lightning_inspect.callbacks.run_record import RunRecord
from lightning_inspect.callbacks.shapes import ShapeTracer
from lightning_inspect.callbacks.weights import WeightMonitor

__all__ = [
    "ActivationMonitor",
    "GradientMonitor",
    "GraphMonitor",
    "HealthMonitor",
    "ModuleMonitor",
    "ProbeSwitch",
    "RunRecord",
    "ShapeTracer",
    "WeightMonitor",
]

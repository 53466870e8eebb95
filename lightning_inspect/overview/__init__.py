"""The overview page: layers x steps per statistic, findings, drill-down; in MLflow and TensorBoard."""

from lightning_inspect.overview.callback import OverviewPage

__all__ = ["OverviewPage"]

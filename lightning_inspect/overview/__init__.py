"""The overview page: layers x steps heatmaps per statistic, findings, drill-down to a layer.

One frontend (``static/``) is served by the TensorBoard plugin (:mod:`.tensorboard_plugin`, the
"Inspect" tab) and inlined into the self-contained HTML file that :class:`OverviewPage` writes to
MLflow. :mod:`.model` holds the data model, :mod:`.reader` reads it from a TensorBoard log dir.
"""

from lightning_inspect.overview.callback import OverviewPage

__all__ = ["OverviewPage"]

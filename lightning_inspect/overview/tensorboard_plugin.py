"""TensorBoard's "Inspect" tab (entry point ``tensorboard_plugins``), routes under
``/data/plugin/inspect/``: the static files, ``runs``, ``meta``, ``matrix``, ``histograms``."""

from __future__ import annotations

import json
from typing import Any, NoReturn

from tensorboard import plugin_util
from tensorboard.backend import http_util
from tensorboard.context import RequestContext
from tensorboard.plugins import base_plugin
from werkzeug import wrappers
from werkzeug.exceptions import abort

from lightning_inspect.overview.model import RunData
from lightning_inspect.overview.page import ASSETS, asset
from lightning_inspect.overview.reader import LogDirReader

PLUGIN_NAME = "inspect"


class InspectPlugin(base_plugin.TBPlugin):
    """Serves the overview page and its data, read through ``context.data_provider``."""

    plugin_name = PLUGIN_NAME

    def __init__(self, context: base_plugin.TBContext) -> None:
        self._reader = LogDirReader(context.data_provider, context.logdir or "")
        self._cache: dict[str, tuple[Any, RunData]] = {}

    def get_plugin_apps(self) -> dict[str, Any]:
        apps: dict[str, Any] = {f"/{name}": self._serve_static for name in ASSETS}
        routes = ("runs", "meta", "matrix", "histograms")
        return apps | {f"/{name}": getattr(self, f"_serve_{name}") for name in routes}

    def is_active(self) -> bool:
        return bool(self._reader.runs(RequestContext()))

    def data_plugin_names(self) -> tuple[str, ...]:
        return ()  # active only when is_active() finds the library's keys

    def frontend_metadata(self) -> base_plugin.FrontendMetadata:
        return base_plugin.FrontendMetadata(es_module_path="/index.js", tab_name="Inspect")

    @wrappers.Request.application
    def _serve_static(self, request: wrappers.Request) -> wrappers.Response:
        name = request.path.rsplit("/", 1)[-1]
        return http_util.Respond(request, asset(name), ASSETS[name])

    @wrappers.Request.application
    def _serve_runs(self, request: wrappers.Request) -> wrappers.Response:
        return _json(request, self._reader.runs(plugin_util.context(request.environ)))

    @wrappers.Request.application
    def _serve_meta(self, request: wrappers.Request) -> wrappers.Response:
        return _json(request, self._run_data(request).meta())

    @wrappers.Request.application
    def _serve_matrix(self, request: wrappers.Request) -> wrappers.Response:
        run = self._run_data(request)
        kind, stat = request.args.get("kind", ""), request.args.get("stat", "")
        if kind not in run.kinds or stat not in run.kinds[kind].stats:
            _not_found(request, f"no statistic {stat!r} of kind {kind!r} in this run")
        steps = run.steps(kind)
        matrix = {"layers": list(run.kinds[kind].layers), "steps": steps}
        return _json(request, matrix | {"values": run.matrix(kind, stat, steps)})

    @wrappers.Request.application
    def _serve_histograms(self, request: wrappers.Request) -> wrappers.Response:
        args = [request.args.get(name, "") for name in ("run", "kind", "layer")]
        return _json(request, self._reader.histograms(plugin_util.context(request.environ), *args))

    def _run_data(self, request: wrappers.Request) -> RunData:
        """The run named by ``?run=``, read once per change of its data."""
        ctx, run = plugin_util.context(request.environ), request.args.get("run", "")
        if run not in self._reader.runs(ctx):
            _not_found(request, f"no lightning-inspect data in run {run!r}")
        version = self._reader.version(ctx, run)
        cached = self._cache.get(run)  # one dict read or write is atomic: no lock
        if cached is None or cached[0] != version:
            cached = self._cache[run] = (version, self._reader.run_data(ctx, run))
        return cached[1]


class InspectLoader(base_plugin.TBLoader):
    """The entry point's target: builds :class:`InspectPlugin` for TensorBoard."""

    def load(self, context: base_plugin.TBContext) -> InspectPlugin:
        return InspectPlugin(context)


def _json(request: wrappers.Request, value: Any) -> wrappers.Response:
    return http_util.Respond(request, json.dumps(value, allow_nan=False), "application/json")


def _not_found(request: wrappers.Request, message: str) -> NoReturn:
    body = json.dumps({"error": message})
    abort(http_util.Respond(request, body, "application/json", code=404))

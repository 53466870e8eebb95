"""Helpers of the overview tests: a run written by the monitors, TensorBoard serving it."""

from __future__ import annotations

import json
import threading
import urllib.parse
import urllib.request
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from conftest import IN_FEATURES, TinyModule, loader, make_trainer
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn

from lightning_inspect import ActivationMonitor, GradientMonitor, HealthMonitor, WeightMonitor
from lightning_inspect.core.keys import escape_name

#: A module name that would break out of a <script> element if the page did not escape it.
HOSTILE = "</script><img src=x onerror=alert(1)>"


class OrderModel(TinyModule):
    """Modules named against the alphabet (``zeta`` runs first), one with a hostile name, and
    a ReLU behind a huge negative bias (dead units: a health finding)."""

    def __init__(self) -> None:
        super().__init__()
        self.zeta = nn.Linear(IN_FEATURES, 8)
        self.add_module(HOSTILE, nn.Linear(8, 8))
        self.alpha = nn.Linear(8, 1)
        with torch.no_grad():
            getattr(self, HOSTILE).bias.fill_(-100.0)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.alpha(
            self.relu(getattr(self, HOSTILE)(self.zeta(x))) + 0.1 * x.sum(1, keepdim=True)
        )


#: The execution order of the selected modules of :class:`OrderModel`.
#: layers as the overview names them: as in the metric keys, a "/" in a name escaped ("%2F")
ORDER = ["zeta", escape_name(HOSTILE), "alpha"]


def monitors(every: int = 1) -> list[Any]:
    """The four monitors, logging every ``every`` steps."""
    return [
        ActivationMonitor(every_n_steps=every),
        GradientMonitor(every_n_steps=every),
        WeightMonitor(every_n_steps=every),
        HealthMonitor(every_n_steps=every, console=False, pictures=False),
    ]


def write_run(
    root: Path,
    version: str,
    steps: int = 6,
    extra: list[Any] | None = None,
    loggers: list[Any] | None = None,
) -> Path:
    """Fit :class:`OrderModel` with the monitors into ``root/<version>``; returns the run dir."""
    torch.manual_seed(0)
    tb = TensorBoardLogger(str(root), name="", version=version)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the findings' warnings: not what these tests check
        make_trainer(
            steps, logger=[tb, *(loggers or [])], callbacks=[*(extra or []), *monitors()]
        ).fit(OrderModel(), loader(n=48))
    return root / version


@contextmanager
def tensorboard(logdir: Path, load_fast: str = "false") -> Iterator[str]:
    """A TensorBoard server on 127.0.0.1 (default plugins + the Inspect plugin); yields its URL.

    ``load_fast="true"``: read the log dir with TensorBoard's Rust data server, as
    ``tensorboard --logdir`` does by default where ``tensorboard-data-server`` is installed.
    """
    from tensorboard import default, program

    from lightning_inspect.overview.tensorboard_plugin import InspectLoader

    # where the package is installed, TensorBoard already finds the plugin by its entry point
    others = [
        p for p in default.get_plugins() if getattr(p, "__name__", "") != InspectLoader.__name__
    ]
    tb = program.TensorBoard(plugins=[*others, InspectLoader()])
    tb.configure(
        argv=[
            None,
            "--logdir",
            str(logdir),
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--load_fast",
            load_fast,
            "--reload_interval",
            "0",
        ]
    )
    server = tb._make_server()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.get_url()
    finally:
        server.shutdown()
        thread.join(timeout=10)


def get(url: str, route: str, **args: str) -> Any:
    """A route of the Inspect plugin: JSON decoded, static files as bytes."""
    query = urllib.parse.urlencode(args)
    with urllib.request.urlopen(f"{url}data/plugin/inspect/{route}?{query}", timeout=60) as r:
        body = r.read()
        return (
            json.loads(body) if r.headers["Content-Type"].startswith("application/json") else body
        )

"""The built wheel: it ships the ``inspect`` group and the Hydra plugin, and works in a fresh venv.

The fresh venv sees the dependencies already installed here (a ``.pth`` file pointing at this
environment's site-packages) but its own copy of lightning-inspect, installed from the wheel; an
unrelated Hydra app written into a temporary folder then switches inspection on with
``+inspect=activations``.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GROUP_OPTIONS = ["activations", "gradients", "weights", "graph", "all", "debug"]

pytestmark = pytest.mark.slow

APP = '''
"""A tiny Hydra app that knows nothing about lightning-inspect but the one line."""
import hydra
import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_inspect
from lightning_inspect import instantiate_callbacks


class Regressor(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.body(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg) -> None:
    torch.manual_seed(0)
    callbacks = instantiate_callbacks(cfg.get("inspect"))
    data = DataLoader(TensorDataset(torch.randn(64, 4), torch.randn(64, 1)), batch_size=16)
    trainer = L.Trainer(
        max_steps=cfg.steps, logger=TensorBoardLogger(cfg.out, name="tb", version=""), callbacks=callbacks,
        accelerator="cpu", enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
    )
    trainer.fit(Regressor(), data)
    print("LIGHTNING_INSPECT_FILE", lightning_inspect.__file__)
    print("CALLBACKS", [type(c).__name__ for c in callbacks])


if __name__ == "__main__":
    main()
'''


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    # With the build backend (setuptools, from the `test` extra) installed here, build without an
    # isolated environment (no download); otherwise let the build frontend make one.
    local_backend = importlib.util.find_spec("setuptools") is not None
    if importlib.util.find_spec("build"):  # the `test` extra installs it
        flags = ["--no-isolation"] if local_backend else []
        command = [
            sys.executable,
            "-m",
            "build",
            "--wheel",
            *flags,
            "--outdir",
            str(out),
            str(ROOT),
        ]
    else:
        flags = ["--no-build-isolation"] if local_backend else []
        command = [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            *flags,
            "-w",
            str(out),
            str(ROOT),
        ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (path,) = out.glob("lightning_inspect-*.whl")
    return path


def test_wheel_contents(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    for option in GROUP_OPTIONS:
        assert f"lightning_inspect/conf/inspect/{option}.yaml" in names, sorted(names)
    assert "lightning_inspect/conf/__init__.py" in names
    for package in (
        "core",
        "backends",
        "monitors",
        "health",
        "shapes",
        "probes",
        "record",
        "hydra",
    ):
        assert f"lightning_inspect/{package}/__init__.py" in names, package  # every feature package
    assert "lightning_inspect/py.typed" in names
    assert "hydra_plugins/lightning_inspect_searchpath/lightning_inspect_searchpath.py" in names
    assert "hydra_plugins/lightning_inspect_searchpath/__init__.py" in names
    assert "hydra_plugins/__init__.py" not in names  # a namespace package shared with other plugins
    assert not any(n.startswith(("tests/", "examples/", "conf/")) for n in names)
    assert not any(n.endswith(".c") for n in names)  # the kernels' source stays in the sdist
    if any(shutil.which(cc) for cc in ("cc", "gcc", "clang")):  # the kernels build where they can
        assert any(
            n.startswith("lightning_inspect/core/_kernels.") and n.endswith((".so", ".pyd"))
            for n in names
        )


def _site_packages(python: Path) -> Path:
    out = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    )
    return Path(out.stdout.strip())


@pytest.fixture(scope="module")
def fresh_venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A venv with the wheel installed and this environment's packages visible; its python."""
    venv = tmp_path_factory.mktemp("venv")
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120
    )
    python = venv / "bin" / "python"
    here = Path(sysconfig.get_paths()["purelib"])
    # A path line in a .pth adds the folder to sys.path without running the .pth files inside it,
    # so this environment's editable install of lightning-inspect stays out of the new venv.
    (_site_packages(python) / "_parent_env.pth").write_text(f"{here}\n")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "--no-deps",
            "--no-index",
            "--ignore-installed",
            "--quiet",
            str(wheel),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return python


def test_unrelated_hydra_app_switches_inspection_on(fresh_venv: Path, tmp_path: Path) -> None:
    app = tmp_path / "app"
    (app / "conf").mkdir(parents=True)
    (app / "conf" / "config.yaml").write_text(
        "# A plain app config.\nsteps: 3\nout: ${hydra:runtime.output_dir}\n"
    )
    (app / "app.py").write_text(textwrap.dedent(APP))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [
            str(fresh_venv),
            "app.py",
            f"hydra.run.dir={run_dir}",
            "+inspect=activations",
            "inspect.activations.every_n_steps=1",
        ],
        cwd=app,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    venv_root = fresh_venv.parent.parent
    file_line = next(
        line for line in result.stdout.splitlines() if line.startswith("LIGHTNING_INSPECT_FILE")
    )
    assert Path(file_line.split(maxsplit=1)[1]).resolve().is_relative_to(venv_root.resolve()), (
        file_line
    )
    assert "CALLBACKS ['ActivationMonitor']" in result.stdout

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0, "histograms": 0})
    events.Reload()
    tags = events.Tags()
    assert "activations/body.0/mean" in tags["scalars"], tags["scalars"]
    assert [e.step for e in events.Scalars("activations/body.0/mean")] == [0, 1, 2]
    assert "activations/body.2" in tags["histograms"]

    from_plugin = subprocess.run(
        [
            str(fresh_venv),
            "-c",
            "from hydra_plugins.lightning_inspect_searchpath.lightning_inspect_searchpath "
            "import conf_search_path; print(conf_search_path())",
        ],
        cwd=app,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert from_plugin.returncode == 0, from_plugin.stderr
    assert (
        Path(from_plugin.stdout.strip().removeprefix("file://"))
        .resolve()
        .is_relative_to(venv_root.resolve())
    )


def test_wheel_ships_the_tensorboard_plugin(wheel: Path) -> None:
    archive = zipfile.ZipFile(wheel)
    names = set(archive.namelist())
    for name in ("index.js", "overview.js", "overview.css"):
        assert f"lightning_inspect/overview/static/{name}" in names, sorted(names)
    (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    text = archive.read(entry_points).decode()
    assert "[tensorboard_plugins]" in text
    assert "inspect = lightning_inspect.overview.tensorboard_plugin:InspectLoader" in text


def test_installed_entry_point_loads_the_plugin(fresh_venv: Path, tmp_path: Path) -> None:
    """TensorBoard finds plugins through this entry point group: load it as TensorBoard does."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    script = (
        "from importlib.metadata import entry_points\n"
        "(ep,) = [e for e in entry_points(group='tensorboard_plugins') if e.name == 'inspect']\n"
        "loader = ep.load()()\n"
        "from tensorboard.plugins.base_plugin import TBContext\n"
        "plugin = loader.load(TBContext(logdir='.'))\n"
        "print(type(plugin).__module__, plugin.frontend_metadata().tab_name, sorted(plugin.get_plugin_apps()))\n"
    )
    result = subprocess.run(
        [str(fresh_venv), "-c", script],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    module, tab, routes = result.stdout.split(" ", 2)
    assert module == "lightning_inspect.overview.tensorboard_plugin" and tab == "Inspect"
    assert "/index.js" in routes and "/meta" in routes

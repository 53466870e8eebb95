"""End to end: the example app (examples/train.py) with ``+inspect=...``, read back from the loggers.

Each test runs the app in a subprocess inside a temporary directory (the Hydra run directory and
the MLflow database both land there), then reads what was written with TensorBoard's
``EventAccumulator`` and ``MlflowClient``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "examples" / "train.py"
#: Small and quick: one epoch at most, two validation batches.
QUICK = ["trainer.max_epochs=1", "trainer.limit_val_batches=2", "trainer.enable_progress_bar=false"]

pytestmark = pytest.mark.slow


def run_example(
    tmp_path: Path, *overrides: str, timeout: float = 180, quick: bool = True
) -> subprocess.CompletedProcess[str]:
    """``python examples/train.py <overrides>`` with ``tmp_path`` as working and run directory."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONWARNINGS": "ignore",
        "HYDRA_FULL_ERROR": "0",
    }
    short = QUICK if quick else ["trainer.enable_progress_bar=false"]
    command = [sys.executable, str(TRAIN), f"hydra.run.dir={tmp_path / 'run'}", *short, *overrides]
    return subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout
    )


def read_tensorboard(log_dir: Path) -> Any:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert list(log_dir.glob("events.out.tfevents.*")), f"no event file in {log_dir}"
    everything = {"scalars": 0, "histograms": 0, "images": 0, "tensors": 0}
    events = EventAccumulator(str(log_dir), size_guidance=everything)
    events.Reload()
    return events


def scalar_steps(events: Any, tag: str) -> list[int]:
    return [e.step for e in events.Scalars(tag)]


def _ok(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, (
        f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    )


def test_activations_on_the_cnn_reach_tensorboard_and_mlflow(tmp_path: Path) -> None:
    result = run_example(
        tmp_path,
        "+inspect=activations",
        "inspect.activations.every_n_steps=2",
        "trainer.max_steps=5",
    )
    _ok(result)
    run_dir = tmp_path / "run"

    events = read_tensorboard(run_dir / "tensorboard")
    scalars = set(events.Tags()["scalars"])
    histograms = set(events.Tags()["histograms"])
    modules = [
        "features.0",
        "features.3",
        "classifier.1",
        "classifier.4",
    ]  # the layers with weights
    for module in modules:
        for stat in ("mean", "std", "min", "max", "zero_fraction"):
            assert f"activations/{module}/{stat}" in scalars, sorted(scalars)
        assert f"activations/{module}" in histograms, sorted(histograms)
    assert scalar_steps(events, "activations/features.0/mean") == [0, 2, 4]
    assert not any(
        tag.startswith(("activation_grads/", "weights/", "param_grads/")) for tag in scalars
    )
    relu = events.Scalars("activations/classifier.1/zero_fraction")[0].value
    assert 0.0 <= relu <= 1.0
    histogram = events.Histograms("activations/features.0")[0]
    assert histogram.step == 0 and histogram.histogram_value.num > 0

    import mlflow

    client = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlruns.db'}")
    experiment = client.get_experiment_by_name("lightning-inspect-digits")
    assert experiment is not None
    (run,) = client.search_runs([experiment.experiment_id])
    assert "summary/activations/mean/max" in run.data.metrics  # MLflow gets headline metrics
    history = client.get_metric_history(run.info.run_id, "summary/activations/mean/max")
    assert sorted(m.step for m in history) == [0, 2, 4]
    from lightning_inspect import read_stats  # and every value in its table artifact

    table = read_stats(run.info.run_id, tracking_uri=f"sqlite:///{tmp_path / 'mlruns.db'}")
    means = table[(table.module == "features.0") & (table.stat == "mean")]
    assert means.step.tolist() == [0, 2, 4]

    assert "tensorboard --logdir" in result.stdout
    assert f"mlflow ui --backend-store-uri sqlite:///{tmp_path / 'mlruns.db'}" in result.stdout
    assert "Inspection: ActivationMonitor" in result.stdout


def test_activations_and_gradients_on_the_transformer(tmp_path: Path) -> None:
    result = run_example(
        tmp_path,
        "model=transformer",
        "+inspect=[activations,gradients]",
        "inspect.activations.modules=[encoder.*]",
        "inspect.gradients.modules=[*.linear1,head]",
        "trainer.max_steps=3",
        "logger.mlflow=null",
    )
    _ok(result)
    assert "Inspection: ActivationMonitor, GradientMonitor" in result.stdout
    assert not (tmp_path / "mlruns.db").exists()

    events = read_tensorboard(tmp_path / "run" / "tensorboard")
    scalars = set(events.Tags()["scalars"])
    activations = {t.split("/")[1] for t in scalars if t.startswith("activations/")}
    assert (
        "encoder.layers.0.linear1" in activations and "encoder.layers.1.self_attn" in activations
    ), activations
    assert all(name.startswith("encoder.") for name in activations), activations
    assert "activation_grads/head/mean" in scalars
    assert "activation_grads/encoder.layers.0.linear1/mean" in scalars
    assert "param_grads/head.weight/l2_norm" in scalars
    assert "param_grads/global_norm" in scalars
    assert scalar_steps(events, "param_grads/global_norm") == [0]
    assert "activation_grads/head" in set(events.Tags()["histograms"])


def test_a_mistyped_key_stops_before_training(tmp_path: Path) -> None:
    result = run_example(tmp_path, "+inspect=activations", "+inspect.activations.every_n_step=5")
    assert result.returncode != 0
    assert "inspect.activations.every_n_step: unknown key" in result.stderr
    assert "Did you mean 'every_n_steps'?" in result.stderr
    assert not (tmp_path / "run" / "tensorboard").exists()  # nothing was built, no step was taken
    assert "Epoch" not in result.stdout + result.stderr


def test_attention_probe_of_the_transformer_is_switched_on_from_the_command_line(
    tmp_path: Path,
) -> None:
    result = run_example(
        tmp_path,
        "model=transformer",
        "+inspect=probes",
        "inspect.probes.tags=[attention]",
        "inspect.probes.every_n_steps=3",
        "trainer.max_steps=7",
    )
    _ok(result)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    assert [e.step for e in events.Images("probes/show_attention/layer0")] == [0, 3, 6]
    picture = events.Images("probes/show_attention/layer0")[0]
    assert (picture.width, picture.height) == (128, 128)  # the 8x8 attention map, scaled up


def _readme_block(marker: str) -> str:
    text = (ROOT / "README.md").read_text()
    return text.split(f"<!-- {marker} -->", 1)[1].split(f"<!-- /{marker} -->", 1)[0]


def test_the_readme_run_command_draws_curves_in_the_tabs_the_readme_lists(tmp_path: Path) -> None:
    """The training part of the README's run-command, as written (46 steps), read back."""
    import re
    import shlex

    training = _readme_block("run-command").replace("```", "").split("&&")[-1]
    words = shlex.split(training)
    assert words[:2] == ["python", "examples/train.py"]
    result = run_example(tmp_path, *words[2:], timeout=600, quick=False)
    _ok(result)
    events = read_tensorboard(tmp_path / "run" / "tensorboard")
    tags = events.Tags()
    prefixes = ("activations/", "activation_grads/", "param_grads/", "weights/")
    monitored = [t for t in tags["scalars"] if t.startswith(prefixes)]
    assert len(monitored) > 100
    assert min(len(events.Scalars(t)) for t in monitored) >= 10
    assert min(len(events.Histograms(t)) for t in tags["histograms"]) >= 10
    filled = {
        "Inspect": bool(monitored),
        "Scalars": bool(tags["scalars"]),
        "Custom Scalars": _has_plugin(events, "custom_scalars"),
        "Histograms": bool(tags["histograms"]),
        "Distributions": bool(tags["distributions"]),
        "Time Series": bool(tags["scalars"] or tags["histograms"]),
        "Images": bool(tags["images"]),
        "Graphs": tags["graph"],
        "Text": _has_plugin(events, "text"),
        "HParams": _has_plugin(events, "hparams"),
    }
    lines = (ROOT / "README.md").read_text().splitlines()
    line = next(x for x in lines if x.startswith("tensorboard --logdir outputs"))
    listed = {t.strip() for t in re.split(r"#", line, maxsplit=1)[1].split(",")}
    assert listed == {tab for tab, on in filled.items() if on}


def _has_plugin(events: Any, name: str) -> bool:
    try:
        return bool(events.PluginTagToContent(name))
    except KeyError:
        return False

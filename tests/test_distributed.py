"""Data-parallel training (two CPU processes, gloo): statistics combined across ranks, rank 0 writes."""

from __future__ import annotations

import glob
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

SCRIPT = Path(__file__).parent / "scripts" / "ddp_train.py"
SPAWN_HYDRA_SCRIPT = Path(__file__).parent / "scripts" / "ddp_spawn_hydra.py"


def _run(tmp_path: Path, *extra: str) -> EventAccumulator:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path), *extra],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    files = glob.glob(str(tmp_path / "**" / "events.out.tfevents.*"), recursive=True)
    assert len(files) == 1, f"rank 0 alone writes one event file, found {files}"
    acc = EventAccumulator(files[0], size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    return acc


def _values(acc: EventAccumulator, key: str) -> dict[int, float]:
    return {e.step: e.value for e in acc.Scalars(key)}


@pytest.mark.slow
def test_statistics_are_combined_over_ranks_and_an_unused_module_does_not_hang(
    tmp_path: Path,
) -> None:
    acc = _run(tmp_path, "unused_on_rank1")
    # Step 0: body.weight = 0.5, bias 0; rank r feeds inputs of r + 1 -> outputs 2.0 (rank 0)
    # and 4.0 (rank 1), 12 values each.
    assert _values(acc, "activations/body/mean")[0] == pytest.approx(3.0)
    assert _values(acc, "activations/body/std")[0] == pytest.approx(1.0)
    assert _values(acc, "activations/body/min")[0] == pytest.approx(2.0)
    assert _values(acc, "activations/body/max")[0] == pytest.approx(4.0)
    assert _values(acc, "activations/body/l2_norm")[0] == pytest.approx(
        math.sqrt(12 * 4 + 12 * 16), rel=1e-6
    )
    assert acc.Histograms("activations/body")[0].histogram_value.num == 24  # both ranks' counts
    # ``extra`` runs on rank 0 only: logged from rank 0's values, at every step, without a hang.
    assert sorted(_values(acc, "activations/extra/mean")) == [0, 1, 2]
    assert acc.Histograms("activations/extra")[0].histogram_value.num == 12
    # Parameters and their gradients are identical on all ranks after the all-reduce: not added up.
    assert sorted(_values(acc, "param_grads/global_norm")) == [0, 1, 2]
    assert acc.Histograms("weights/body.weight")[0].histogram_value.num == 16
    # GraphMonitor traces the LightningModule's own forward on rank 0, not DDP's redirected step.
    ops = [n.op for n in acc.Graph().node]
    assert ops.count("aten::linear") == 2 and "aten::add" in ops


@pytest.mark.slow
def test_ddp_spawn_from_a_hydra_app_records_the_config_and_the_graph(tmp_path: Path) -> None:
    """``ddp_spawn``: the ranks are new processes, without the Hydra app that started them."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, str(SPAWN_HYDRA_SCRIPT), f"hydra.run.dir={run_dir}", "model.hidden=6"],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    record_dir = run_dir / "tb" / "run_record"
    config = yaml.safe_load((record_dir / "config.yaml").read_text())
    expected = {"model": {"hidden": 6}, "trainer": {"max_steps": 2}, "log_dir": str(run_dir / "tb")}
    assert config == expected
    assert yaml.safe_load((record_dir / "overrides.yaml").read_text()) == ["model.hidden=6"]
    assert yaml.safe_load((record_dir / "record.yaml").read_text())["config"]["source"] == "hydra"
    [events] = glob.glob(str(run_dir / "tb" / "events.out.tfevents.*"))
    acc = EventAccumulator(events)
    acc.Reload()
    # The batch is an [x, y] list; the graph is that of self(x) inside training_step.
    ops = [n.op for n in acc.Graph().node]
    assert ops.count("aten::linear") == 2 and "aten::relu" in ops


@pytest.mark.slow
def test_fsdp2_sharded_parameters_are_read_through_their_local_shard(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).parent / "scripts" / "fsdp2_train.py"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    acc = EventAccumulator(
        glob.glob(str(tmp_path / "events.out.tfevents.*"))[0],
        size_guidance={"scalars": 0, "histograms": 0},
    )
    acc.Reload()
    # Layers are selected after configure_model sharded them: the optimizer's parameters are seen.
    assert all(v > 0 for v in _values(acc, "weights/body.0.weight/update_ratio").values())
    assert sorted(_values(acc, "param_grads/body.0.weight/l2_norm")) == [0, 1]
    # Parameters: rank 0's shard (half of body.0.weight's 6 x 4); activations: both ranks' batches.
    assert acc.Histograms("weights/body.0.weight")[0].histogram_value.num == 12
    assert acc.Histograms("activations/body.0")[0].histogram_value.num == 2 * 3 * 6

"""The benchmark scripts keep working: a quick overhead run prints its table and targets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_overhead_benchmark_quick_run(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "overhead.py"),
            "--quick",
            "--models",
            "cnn",
            "--no-wandb",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    scenarios = {row["scenario"] for row in result["summary"] if row["model"] == "cnn"}
    assert {"plain", "off", "every_step", "every_50", "handwritten"} <= scenarios
    assert "Targets" in proc.stdout and "Floor" in proc.stdout
    assert result["probes"]["probe_off_ns"] > 0


def _overhead(*args: str, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "overhead.py"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )


def test_overhead_benchmark_gpu_variant_refuses_without_cuda() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: tests/test_gpu.py runs the GPU variant")
    proc = _overhead("--accelerator", "gpu", "--quick", timeout=120)
    assert proc.returncode == 2
    assert "--accelerator gpu" in proc.stdout and "no CUDA device" in proc.stdout


def _real_size(*args: str, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "real_size.py"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )


@pytest.mark.slow
def test_real_size_benchmark_reports_keys_publishing_and_ratios(tmp_path: Path) -> None:
    out = tmp_path / "real.json"
    proc = _real_size(
        "--models",
        "resnet",
        "--steps",
        "13",
        "--costly-steps",
        "1",
        "--repeats",
        "1",
        "--json",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    (published,) = result["publishing"]
    assert published["model"] == "resnet"
    # ~50 modules: thousands of keys
    assert published["scalars"] > 2000 and published["histograms"] > 200
    assert published["tensorboard_s"] > 0 and published["mlflow_worker_s"] > 0
    assert {row["scenario"] for row in result["summary"]} == {"plain", "every_50", "every_step"}
    assert "Targets" in proc.stdout and "Publishing one logged step" in proc.stdout


@pytest.mark.slow
def test_real_size_scaling_fits_a_line_through_the_layer_counts(tmp_path: Path) -> None:
    out = tmp_path / "scaling.json"
    proc = _real_size(
        "--scaling",
        "--layers",
        "1,2,3",
        "--costly-steps",
        "1",
        "--repeats",
        "1",
        "--json",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    keys = [row["scalars"] + row["histograms"] for row in result["scaling"]]
    assert keys == sorted(keys) and len(set(keys)) == 3  # each layer adds the same keys
    assert keys[2] - keys[1] == keys[1] - keys[0]
    assert result["fits"]["all inside the library"]["b_us_per_key"] > 0

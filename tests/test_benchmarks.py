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
        [sys.executable, str(ROOT / "benchmarks" / "overhead.py"), "--quick", "--models", "cnn", "--no-wandb",
         "--json", str(out)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    scenarios = {row["scenario"] for row in result["summary"] if row["model"] == "cnn"}
    assert {"plain", "off", "every_step", "every_50", "handwritten"} <= scenarios
    assert "Targets" in proc.stdout and "Floor" in proc.stdout
    assert result["probes"]["probe_off_ns"] > 0

"""Cost of lightning-inspect on real-size models, with TensorBoard and a SQLite MLflow attached.

Models (``overhead.py`` defines them): ``transformer12``, a 12-layer ``nn.TransformerEncoder``
(d_model 128, 4 heads, FF 512, seq 32, batch 16, AdamW; 74 modules, 147 parameters), and
``resnet``, a ResNet-style CNN with BatchNorm (49 modules). Every scenario, ``plain`` included,
logs to a ``TensorBoardLogger`` and an ``MLFlowLogger`` on one SQLite store (the example app's
set-up). Scenarios, interleaved in one process as in ``overhead.py``:

    plain        no monitor
    every_50     ActivationMonitor + GradientMonitor + WeightMonitor, defaults, every 50 steps
                 (from step 10, so that the steps after a logged one fall in the measured window)
    every_step   the same, every step

Per model it prints: keys per logged step (scalars, histograms), the publishing time of a logged
step per backend, measured inside the library (the monitors' own publishing: statistics and keys;
TensorBoard's writes; MLflow's enqueue on the training thread and its worker thread's CPU time),
that time per key, the every-50 and every-step ratios to plain (wall clock, CPU time, time inside
the library), and how the steps after a logged one compare with plain's steps.

``--scaling`` instead runs every_step on the transformer with 2 / 6 / 12 / 24 layers and fits
publishing time and time inside the library against the number of keys (least squares).

Usage:
    python benchmarks/real_size.py                # both models, ~5 min on 2 busy CPU cores
    python benchmarks/real_size.py --quick        # smoke test, ~1.5 min
    python benchmarks/real_size.py --scaling      # 2 / 6 / 12 / 24 layers
    python benchmarks/real_size.py --json out.json
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import MLFlowLogger, TensorBoardLogger

sys.path.insert(0, str(Path(__file__).resolve().parent))
from overhead import (
    REAL_SIZE_MODELS,
    PeakRSS,
    Run,
    _Attribution,
    _monitors,
    _quiet,
    fit_once,
    print_table,
    summarise,
)

import lightning_inspect

SCENARIOS = ("plain", "every_50", "every_step")
EVERY = 50
FIRST_LOGGED = (
    10  # every_50 logs steps 10, 60, ...: inside the measured window, with steps after it
)
AFTER = 5  # steps after a logged one compared with plain's steps
MONITORS = 3

#: Publishing of one logged step, by part (labels of :class:`PublishMeter`).
MONITOR_PUBLISH = "publish: summarise rows, keys, non-finite check"
TB_SCALARS = "TensorBoard writes: scalars"
TB_HISTOGRAMS = "TensorBoard writes: histograms"
MLFLOW_ENQUEUE = "MLflow: enqueue on the training thread"
MLFLOW_WORKER = "MLflow worker thread (CPU): metrics, table, histogram spool"


class PublishMeter(_Attribution):
    """``overhead.py``'s attribution plus MLflow's two halves: the enqueue on the training thread
    and the worker thread's CPU time (the time it holds the GIL at most)."""

    def __enter__(self) -> PublishMeter:
        super().__enter__()
        run = "lightning_inspect.backends.mlflow"
        for attr in ("log_scalars", "log_histograms"):
            self.patch(MLFLOW_ENQUEUE, f"{run}:MlflowRunSink", attr)
        self.patch(MLFLOW_ENQUEUE, f"{run}:MlflowRun", "send")  # the step's one call, queued
        self.patch(MLFLOW_WORKER, f"{run}:MlflowSink", "log_step", background=True)
        if self.missing:
            raise RuntimeError(f"publishing attribution: not found: {self.missing}")
        return self


@dataclass
class Publishing:
    """What one logged step publishes and what that costs, per part (seconds per logged step)."""

    model: str
    scalars: float
    histograms: float
    monitor_s: float
    tensorboard_s: float
    mlflow_enqueue_s: float
    mlflow_worker_s: float
    inside_s: float  # everything inside the library per logged step (training thread)

    @property
    def keys(self) -> float:
        return self.scalars + self.histograms


def publishing(model: str, meter: PublishMeter) -> Publishing:
    """Per logged step, from an every_step fit's meter (every step of it was logged)."""
    logged = meter.calls.get(TB_SCALARS, 0) / MONITORS
    if not logged:
        raise RuntimeError(f"{model}: no logged step was published to TensorBoard")

    def per_step(*labels: str) -> float:
        return sum(meter.time.get(label, 0.0) for label in labels) / logged

    return Publishing(
        model,
        meter.keys.get(TB_SCALARS, 0) / logged,
        meter.keys.get(TB_HISTOGRAMS, 0) / logged,
        per_step(MONITOR_PUBLISH),
        per_step(TB_SCALARS, TB_HISTOGRAMS),
        per_step(MLFLOW_ENQUEUE),
        per_step(MLFLOW_WORKER),
        meter.total() / logged,
    )


def scenario_callbacks(scenario: str, tmp: str) -> list[Callback]:
    if scenario == "plain":
        return []
    if scenario == "every_50":
        return _monitors(EVERY, start_step=FIRST_LOGGED)
    if scenario == "every_step":
        return _monitors(1)
    raise ValueError(scenario)


def logger_factory(tmp: str) -> Any:
    """A TensorBoardLogger and an MLFlowLogger on one SQLite store, per fit (a new run each)."""
    uri = f"sqlite:///{tmp}/mlflow.db"

    def loggers(name: str) -> list[Any]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mlflow = MLFlowLogger(
                experiment_name="real-size",
                tracking_uri=uri,
                artifact_location=f"{tmp}/mlartifacts",
            )
        return [TensorBoardLogger(save_dir=tmp, name=name), mlflow]

    return loggers


def after_logged_ratio(every_50: Run, plain: Run, warmup: int) -> tuple[float, float]:
    """every_50's steps other than the logged ones, against plain's median step: (the AFTER steps
    right after a logged step, every step that is not logged), medians."""
    logged = [
        i
        for i in range(len(every_50.gaps_s))
        if warmup + i >= FIRST_LOGGED and (warmup + i - FIRST_LOGGED) % EVERY == 0
    ]
    after = [i + k for i in logged for k in range(1, AFTER + 1) if i + k < len(every_50.gaps_s)]
    others = [g for i, g in enumerate(every_50.gaps_s) if i not in logged]
    base = statistics.median(plain.gaps_s)
    return statistics.median(every_50.gaps_s[i] for i in after) / base, statistics.median(
        others
    ) / base


def run_models(args: argparse.Namespace, tmp: str, memory: PeakRSS) -> dict[str, Any]:
    loggers = logger_factory(tmp)
    runs: list[Run] = []
    meters: dict[str, list[Publishing]] = {}
    after: dict[str, list[tuple[float, float]]] = {}
    started = time.perf_counter()
    for model in args.models:
        for scenario in SCENARIOS:  # not recorded: lazy imports, the SQLite schema, first writers
            fit_once(model, scenario, 0, 1, tmp, -1, memory, loggers, scenario_callbacks)
        for rep in range(args.repeats):
            k = rep % len(SCENARIOS)
            by_scenario = {}
            for scenario in SCENARIOS[k:] + SCENARIOS[:k]:
                steps = args.costly_steps if scenario == "every_step" else args.steps
                meter = PublishMeter()
                run = fit_once(
                    model,
                    scenario,
                    args.warmup,
                    steps,
                    tmp,
                    rep,
                    memory,
                    loggers,
                    scenario_callbacks,
                    meter,
                )
                runs.append(run)
                by_scenario[scenario] = run
                if scenario == "every_step":
                    meters.setdefault(model, []).append(publishing(model, meter))
            after.setdefault(model, []).append(
                after_logged_ratio(by_scenario["every_50"], by_scenario["plain"], args.warmup)
            )
            print(
                f"  {model}: repetition {rep + 1}/{args.repeats} done "
                f"({time.perf_counter() - started:.0f} s)",
                flush=True,
            )
    summaries = summarise(runs, list(SCENARIOS))
    print()
    print_table(summaries)
    published = {m: _median_publishing(m, ps) for m, ps in meters.items()}
    print_publishing(list(published.values()))
    print(
        "\nSteps that are not logged (every_50), median step / plain's median step, "
        "median over repetitions:"
    )
    nonlogged = {}
    for model, pairs in after.items():
        nonlogged[model] = (
            statistics.median(p[0] for p in pairs),
            statistics.median(p[1] for p in pairs),
        )
        print(
            f"  {model:<14} the {AFTER} steps after a logged step {nonlogged[model][0]:.3f}; "
            f"every step not logged {nonlogged[model][1]:.3f}"
        )
    by = {(s.model, s.scenario): s for s in summaries}
    targets = []
    for model in args.models:
        s, p = by[(model, "every_50")], published[model]
        targets += [
            (
                model,
                "every_50 <= 1.03 x plain (wall | CPU | in-lib)",
                f"{s.ratio:.3f} | {s.cpu_ratio:.3f} | {s.inside_ratio:.3f}",
                s.inside_ratio <= 1.03,
            ),
            (
                model,
                "TensorBoard publishing <= 10 us/key",
                f"{p.tensorboard_s / p.keys * 1e6:.2f} us",
                p.tensorboard_s / p.keys <= 10e-6,
            ),
            (
                model,
                "MLflow publishing <= 10 us/key (enqueue + worker CPU)",
                f"{(p.mlflow_enqueue_s + p.mlflow_worker_s) / p.keys * 1e6:.2f} us",
                (p.mlflow_enqueue_s + p.mlflow_worker_s) / p.keys <= 10e-6,
            ),
            (
                model,
                "steps after a logged one <= 1.03 x plain's",
                f"{nonlogged[model][0]:.3f}",
                nonlogged[model][0] <= 1.03,
            ),
        ]
    print(
        "\nTargets (every_50 judged on the time inside the library; "
        "the wall and CPU ratios are shown):"
    )
    for model, name, value, ok in targets:
        print(f"  {model:<14}{name:<56}{'PASS' if ok else 'FAIL'} {value}")
    return {
        "runs": [asdict(r) for r in runs],
        "summary": [asdict(s) for s in summaries],
        "publishing": [asdict(p) for p in published.values()],
        "not_logged": nonlogged,
        "targets": [
            dict(zip(("model", "target", "value", "pass"), t, strict=True)) for t in targets
        ],
    }


def _median_publishing(model: str, items: list[Publishing]) -> Publishing:
    fields = [f for f in Publishing.__dataclass_fields__ if f != "model"]
    return Publishing(model, *(statistics.median(getattr(p, f) for p in items) for f in fields))


def print_publishing(items: list[Publishing]) -> None:
    print("\nPublishing one logged step (every_step, median over repetitions), ms and us per key:")
    head = (
        f"{'model':<14}{'scalars':>8}{'hists':>7}{'monitors':>15}{'TensorBoard':>17}"
        f"{'MLflow enqueue':>17}{'MLflow worker':>17}{'all in lib':>12}"
    )
    print(head)
    print("-" * len(head))
    for p in items:
        cells = [
            f"{t * 1e3:7.1f} ({t / p.keys * 1e6:4.1f})"
            for t in (p.monitor_s, p.tensorboard_s, p.mlflow_enqueue_s, p.mlflow_worker_s)
        ]
        print(
            f"{p.model:<14}{p.scalars:>8.0f}{p.histograms:>7.0f}{cells[0]:>15}{cells[1]:>17}"
            f"{cells[2]:>17}{cells[3]:>17}{p.inside_s * 1e3:>10.1f}ms"
        )


def run_scaling(args: argparse.Namespace, tmp: str, memory: PeakRSS) -> dict[str, Any]:
    loggers = logger_factory(tmp)
    fit_once("transformer2", "every_step", 0, 1, tmp, -1, memory, loggers, scenario_callbacks)
    rows: dict[int, list[Publishing]] = {}
    for rep in range(args.repeats):
        for layers in args.layers:
            meter = PublishMeter()
            fit_once(
                f"transformer{layers}",
                "every_step",
                args.warmup,
                args.costly_steps,
                tmp,
                rep,
                memory,
                loggers,
                scenario_callbacks,
                meter,
            )
            rows.setdefault(layers, []).append(publishing(f"transformer{layers}", meter))
    med = {layers: _median_publishing(f"transformer{layers}", ps) for layers, ps in rows.items()}
    print_publishing(list(med.values()))
    keys = [p.keys for p in med.values()]
    fits = {}
    print("\nLeast-squares fit against keys per logged step, t = a + b * keys:")
    for label, get in (
        ("publishing, TensorBoard", lambda p: p.monitor_s + p.tensorboard_s),
        ("MLflow worker CPU", lambda p: p.mlflow_worker_s),
        ("all inside the library", lambda p: p.inside_s),
    ):
        ys = [get(p) for p in med.values()]
        b, a = _line(keys, ys)
        worst = max(abs(y - (a + b * x)) / y for x, y in zip(keys, ys, strict=True))
        fits[label] = {"a_ms": a * 1e3, "b_us_per_key": b * 1e6, "worst_relative_residual": worst}
        print(
            f"  {label:<26} a = {a * 1e3:6.2f} ms, b = {b * 1e6:5.2f} us/key; "
            f"largest deviation from the line {worst:.1%}"
        )
    return {"scaling": [asdict(p) for p in med.values()], "fits": fits}


def _line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Slope and intercept of the least-squares line through (xs, ys)."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum(
        (x - mx) ** 2 for x in xs
    )
    return slope, my - slope * mx


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--quick", action="store_true", help="smoke test: --steps 15 --costly-steps 2 --repeats 1"
    )
    p.add_argument("--steps", type=int, help="measured steps of plain and every_50 (default 50)")
    p.add_argument("--costly-steps", type=int, help="measured steps of every_step (default 5)")
    p.add_argument("--warmup", type=int, default=3, help="steps run before measuring (default 3)")
    p.add_argument("--repeats", type=int, help="repetitions of the round-robin (default 3)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--models", default=",".join(REAL_SIZE_MODELS), help="comma-separated")
    p.add_argument(
        "--scaling", action="store_true", help="every_step on 2 / 6 / 12 / 24 transformer layers"
    )
    p.add_argument("--layers", default="2,6,12,24", help="layer counts of --scaling")
    p.add_argument("--json", type=Path, help="write every measurement here")
    args = p.parse_args(argv)
    args.steps = args.steps or (15 if args.quick else EVERY)
    args.costly_steps = args.costly_steps or (2 if args.quick else 5)
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    bad = [m for m in args.models if m not in REAL_SIZE_MODELS]
    if bad:
        p.error(f"--models: unknown {bad}; choose from {list(REAL_SIZE_MODELS)}")
    args.layers = [int(n) for n in args.layers.split(",")]
    if args.warmup + args.steps <= FIRST_LOGGED + AFTER:
        p.error(
            f"--warmup + --steps must exceed {FIRST_LOGGED + AFTER}: "
            f"every_50 logs step {FIRST_LOGGED}"
        )
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _quiet()
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "ERROR")  # read when mlflow is first imported
    logging.getLogger("alembic").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    gc.collect()
    gc.freeze()
    print(
        f"lightning-inspect {lightning_inspect.__version__} real-size benchmark; python "
        f"{platform.python_version()}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), "
        f"lightning {pl.__version__}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}"
    )
    print(
        f"{args.repeats} repetitions x ({args.warmup} warm-up + {args.steps} measured steps, "
        f"{args.costly_steps} for every_step); loggers: TensorBoard + MLflow (SQLite)"
    )
    started = time.perf_counter()
    memory = PeakRSS()
    with tempfile.TemporaryDirectory(prefix="li-real-") as tmp:
        result = run_scaling(args, tmp, memory) if args.scaling else run_models(args, tmp, memory)
    elapsed = time.perf_counter() - started
    print(f"\nfinished in {elapsed:.0f} s; load average now {os.getloadavg()[0]:.2f}")
    if args.json:
        settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        args.json.write_text(
            json.dumps({"settings": settings, **result, "elapsed_s": elapsed}, indent=2)
        )
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

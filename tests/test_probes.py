"""Tests for lightning_inspect.probes.context and the ProbeSwitch callback (CPU, tiny models)."""

from __future__ import annotations

import asyncio
import contextvars
import json
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_inspect.errors import ConfigError
from lightning_inspect.probes.context import (
    ENV_VAR,
    ProbeContext,
    ProbeWarning,
    current_context,
    enabled,
    probe,
    probing,
    reload_env,
    tag_matches,
)
from lightning_inspect.probes.switch import ProbeSwitch

ROOT = Path(__file__).resolve().parents[1]
PROBES_YAML = ROOT / "lightning_inspect" / "conf" / "inspect" / "probes.yaml"


# ------------------------------------------------------------------------------------------
# Probes used by the tests (module level, so that DDP workers can unpickle the model)
# ------------------------------------------------------------------------------------------


@probe("model.attention")
def inspect_layer(
    records: list[dict[str, Any]], out: torch.Tensor, step: int, *, ctx: ProbeContext
) -> str:
    records.append(
        {
            "step": ctx.step,
            "caller_step": step,
            "epoch": ctx.epoch,
            "rank": ctx.rank,
            "tag": ctx.tag,
            "probe": ctx.probe,
            "output_dir": ctx.output_dir,
        }
    )
    ctx.log_text("summary", f"mean {out.mean().item():.4f}")
    ctx.log_image("map", torch.rand(3, 4, 5))
    ctx.log_histogram("out", out)
    return "ran"


@probe("model.validation")
def inspect_validation(records: list[dict[str, Any]], sanity: bool, *, ctx: ProbeContext) -> None:
    records.append({"step": ctx.step, "sanity": sanity})


@probe("model.failing")
def failing_probe(calls: list[int], *, ctx: ProbeContext) -> None:
    calls.append(ctx.step)
    if ctx.step >= 1:
        raise RuntimeError(f"boom at step {ctx.step}")


@probe("ddp.files")
def write_rank_file(*, ctx: ProbeContext) -> None:
    ctx.path(".txt").write_text(f"rank {ctx.rank} step {ctx.step}")


@probe("ddp.zero")
def write_zero_file(*, ctx: ProbeContext) -> None:
    ctx.path(".log").write_text(f"rank {ctx.rank}")


class TinyModel(L.LightningModule):
    """A linear layer that calls probes inside training_step and validation_step."""

    def __init__(self, failing: bool = False, ddp: bool = False) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 2)
        self.failing = failing
        self.ddp = ddp
        self.records: list[dict[str, Any]] = []
        self.val_records: list[dict[str, Any]] = []
        self.failing_calls: list[int] = []
        self.trainer_steps: list[int] = []

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        out = self.layer(batch[0])
        self.trainer_steps.append(self.trainer.global_step)
        inspect_layer(self.records, out, self.global_step)
        if self.failing:
            failing_probe(self.failing_calls)
        if self.ddp:
            write_rank_file()
            with probing("ddp.zero", ranks="zero"):  # keeps the trainer's rank, step and directory
                write_zero_file()
        return out.pow(2).mean()

    def validation_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
        inspect_validation(self.val_records, self.trainer.sanity_checking)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(torch.randn(16, 4)), batch_size=4)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(torch.randn(8, 4)), batch_size=4)


def make_trainer(tmp_path: Path, callbacks: list[Any], **kwargs: Any) -> L.Trainer:
    options: dict[str, Any] = dict(
        max_steps=5,
        logger=TensorBoardLogger(str(tmp_path / "tb")),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        limit_val_batches=0,
        accelerator="cpu",
        devices=1,
        default_root_dir=str(tmp_path),
    )
    options.update(kwargs)
    return L.Trainer(callbacks=callbacks, **options)


@pytest.fixture
def counter() -> tuple[list[int], Any]:
    calls: list[int] = []

    @probe("attention")
    def counted(x: int) -> int:
        calls.append(x)
        return x

    return calls, counted


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every test starts without LIGHTNING_INSPECT and re-reads the variable afterwards."""
    monkeypatch.delenv(ENV_VAR, raising=False)
    reload_env()
    yield
    monkeypatch.delenv(ENV_VAR, raising=False)
    reload_env()


# ------------------------------------------------------------------------------------------
# Off means off
# ------------------------------------------------------------------------------------------


def test_off_probe_returns_none_and_body_never_runs(counter: Any) -> None:
    calls, counted = counter
    assert [counted(i) for i in range(100)] == [None] * 100
    assert calls == []
    assert enabled("attention") is False
    assert current_context("attention") is None


def test_off_call_is_cheap(counter: Any) -> None:
    _, counted = counter
    n = 200_000
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(n):
            counted(1)
        best = min(best, (time.perf_counter() - start) / n)
    assert best < 2e-6, f"an off probe call took {best * 1e9:.0f} ns"


def test_tags_of_another_probe_do_not_switch_this_one_on(counter: Any) -> None:
    calls, counted = counter
    with probing("encoder", output_dir="unused"):
        assert counted(1) is None
    assert calls == []


# ------------------------------------------------------------------------------------------
# Switch: probing() context manager
# ------------------------------------------------------------------------------------------


def test_probing_switches_on_inside_the_block_only(counter: Any, tmp_path: Path) -> None:
    calls, counted = counter
    with probing("attention", output_dir=tmp_path) as out:
        assert out == tmp_path
        assert counted(1) == 1
        assert enabled("attention")
    assert counted(2) is None
    assert calls == [1]
    assert not enabled("attention")


def test_probing_blocks_nest_and_add_tags(tmp_path: Path) -> None:
    with probing("a", output_dir=tmp_path):
        with probing("b"):
            assert enabled("a") and enabled("b")
            ctx = current_context("b")
            assert ctx is not None and ctx.output_dir == tmp_path  # inherited directory
        assert enabled("a") and not enabled("b")
    assert not enabled("a")


def test_switches_closed_out_of_order_leave_nothing_on(tmp_path: Path) -> None:
    outer, inner = probing("a", output_dir=tmp_path), probing("b")
    outer.__enter__()
    inner.__enter__()
    outer.__exit__(None, None, None)  # closed before the block opened inside it
    assert enabled("b")
    inner.__exit__(None, None, None)
    assert not enabled("a") and not enabled("b")


@pytest.mark.parametrize(
    ("pattern", "tag", "on"),
    [
        ("attention", "attention", True),
        ("model", "model.attention", True),
        ("model.*", "model.attention", True),
        ("model.*", "model.attention.heads", True),
        ("model.*", "model", False),
        ("*", "anything.at.all", True),
        ("encoder.*", "decoder.features", False),
        ("*.features", "encoder.features", True),
        ("enc*", "encoder.features", True),
        ("model", "modelling", False),
        ("Attention", "attention", False),
    ],
)
def test_tag_globs_and_hierarchy(pattern: str, tag: str, on: bool, tmp_path: Path) -> None:
    assert tag_matches(pattern, tag) is on
    with probing(pattern, output_dir=tmp_path):
        assert enabled(tag) is on


def test_probe_with_several_tags_reports_the_matching_one(tmp_path: Path) -> None:
    @probe("attention", "encoder.features")
    def show(*, ctx: ProbeContext) -> str:
        return ctx.tag

    with probing("encoder", output_dir=tmp_path):
        assert show() == "encoder.features"
    with probing("*", output_dir=tmp_path):
        assert show() == "attention"


# ------------------------------------------------------------------------------------------
# Switch: environment variable
# ------------------------------------------------------------------------------------------


def test_env_var_switches_on_after_reload(
    monkeypatch: pytest.MonkeyPatch, counter: Any, tmp_path: Path
) -> None:
    calls, counted = counter
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(ENV_VAR, " attention , encoder.* ,")
    assert counted(1) is None  # not re-read yet
    assert reload_env() == ("attention", "encoder.*")
    assert counted(2) == 2
    assert enabled("encoder.features")
    ctx = current_context("attention")
    assert ctx is not None and ctx.output_dir == Path("probes")  # ./probes without a trainer
    monkeypatch.delenv(ENV_VAR)
    assert reload_env() == ()
    assert counted(3) is None
    assert calls == [2]


def test_env_var_is_the_default_for_new_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_VAR, "attention")
    reload_env()
    seen: list[bool] = []
    thread = threading.Thread(target=lambda: seen.append(enabled("attention")))
    thread.start()
    thread.join()
    assert seen == [True]


# ------------------------------------------------------------------------------------------
# Context injection and contents
# ------------------------------------------------------------------------------------------


def test_ctx_is_injected_by_parameter_name(tmp_path: Path) -> None:
    @probe("t")
    def keyword_only(x: int, *, ctx: ProbeContext) -> tuple[int, str]:
        return x, ctx.tag

    @probe("t")
    def positional_or_keyword(x: int, ctx: ProbeContext) -> tuple[int, str]:
        return x, ctx.probe

    @probe("t")
    def no_context(x: int) -> int:
        return x * 2

    with probing("t", output_dir=tmp_path, step=7):
        assert keyword_only(1) == (1, "t")
        assert positional_or_keyword(2) == (2, "positional_or_keyword")
        assert no_context(3) == 6


def test_ctx_positional_only_is_rejected_at_decoration() -> None:
    def show(ctx: Any, /) -> None: ...

    with pytest.raises(ConfigError, match="keyword-only"):
        probe("t")(show)


def test_ctx_passed_by_the_caller_is_a_probe_error(tmp_path: Path) -> None:
    @probe("t")
    def show(*, ctx: ProbeContext) -> None: ...

    with (
        probing("t", output_dir=tmp_path),
        pytest.warns(ProbeWarning, match="got ctx from its caller"),
    ):
        show(ctx="mine")
    with (
        probing("t", output_dir=tmp_path, on_error="raise"),
        pytest.raises(TypeError, match="supplied by lightning_inspect"),
    ):
        show(ctx="mine")


def test_context_contents_without_trainer(tmp_path: Path) -> None:
    @probe("attention", name="attn")
    def show(*, ctx: ProbeContext) -> ProbeContext:
        return ctx

    with probing("attention", output_dir=tmp_path / "out", step=12):
        ctx = show()
    assert (ctx.probe, ctx.tag, ctx.step, ctx.epoch) == ("attn", "attention", 12, 0)
    assert (ctx.rank, ctx.trainer) == (0, None)
    assert ctx.qualname.endswith("show")
    assert ctx.tensorboard is None and ctx.mlflow is None
    assert not (tmp_path / "out").exists()  # created lazily
    assert ctx.output_dir == tmp_path / "out" and (tmp_path / "out").is_dir()


def test_paths_never_overwrite(tmp_path: Path) -> None:
    ctx = ProbeContext(probe="attn", tag="attention", step=42, rank=3, output_dir=tmp_path)
    first, second = ctx.path(".png"), ctx.path(".png")
    assert first.name == "attn_00000042_rank3.png"
    assert second.name == "attn_00000042_rank3_1.png"
    assert ctx.path("heads.npy").name == "attn_00000042_rank3_heads.npy"
    assert ctx.path("heads.npy").name == "attn_00000042_rank3_heads_1.npy"
    assert ctx.path().name == "attn_00000042_rank3"
    # A file left by an earlier run in the same directory is not overwritten either.
    (tmp_path / "attn_00000042_rank3.txt").write_text("old")
    fresh = ProbeContext(probe="attn", tag="attention", step=42, rank=3, output_dir=tmp_path)
    assert fresh.path(".txt").name == "attn_00000042_rank3_1.txt"
    with pytest.raises(ConfigError, match="without directories"):
        ctx.path("../escape.txt")


def test_log_helpers_write_files_without_loggers(tmp_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    @probe("viz")
    def visualise(*, ctx: ProbeContext) -> None:
        ctx.log_text("note", "hello")
        ctx.log_image("chw", torch.rand(3, 6, 5))
        ctx.log_image("hwc", torch.rand(6, 5, 3).numpy())
        ctx.log_image("gray", torch.rand(6, 5))
        fig, ax = plt.subplots()
        ax.plot([0, 1], [1, 0])
        ctx.log_figure("curve", fig)
        ctx.log_histogram("weights", torch.tensor([0.0, 1.0, 1.0, float("nan"), float("inf")]))

    with probing("viz", output_dir=tmp_path, step=3):
        visualise()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [
        "visualise_00000003_rank0_chw.png",
        "visualise_00000003_rank0_curve.png",
        "visualise_00000003_rank0_gray.png",
        "visualise_00000003_rank0_hwc.png",
        "visualise_00000003_rank0_note.txt",
        "visualise_00000003_rank0_weights.json",
    ]
    histogram = json.loads((tmp_path / "visualise_00000003_rank0_weights.json").read_text())
    assert (histogram["num"], histogram["nan"], histogram["inf"]) == (3, 1, 1)
    assert sum(histogram["counts"]) == 3
    assert (tmp_path / "visualise_00000003_rank0_note.txt").read_text() == "hello"
    assert not plt.get_fignums()  # figures are closed after logging


# ------------------------------------------------------------------------------------------
# Errors in probes
# ------------------------------------------------------------------------------------------


def test_probe_error_warns_once_and_disables_the_probe(tmp_path: Path) -> None:
    calls: list[int] = []

    @probe("fragile")
    def fragile(x: int) -> None:
        calls.append(x)
        raise ValueError("bad shape")

    with probing("fragile", output_dir=tmp_path), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert fragile(1) is None
        assert fragile(2) is None
        assert fragile(3) is None
    probe_warnings = [w for w in caught if issubclass(w.category, ProbeWarning)]
    assert len(probe_warnings) == 1
    message = str(probe_warnings[0].message)
    assert "fragile" in message and "'fragile'" in message and "ValueError: bad shape" in message
    assert calls == [1]
    # A new run starts with the probe switched on again.
    with probing("fragile", output_dir=tmp_path), pytest.warns(ProbeWarning):
        fragile(4)
    assert calls == [1, 4]


def test_probe_error_reraised_with_on_error_raise(tmp_path: Path) -> None:
    @probe("fragile")
    def fragile() -> None:
        raise ValueError("bad shape")

    with (
        probing("fragile", output_dir=tmp_path, on_error="raise"),
        pytest.raises(ValueError, match="bad shape"),
    ):
        fragile()


# ------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "fragments"),
    [
        (lambda: probe(""), ["empty tag"]),
        (lambda: probe(3), ["tag", "3", "int"]),
        (lambda: probe(), ["at least one tag"]),
        (lambda: probe(lambda: None), ["@probe('attention')"]),
        (lambda: probe("encoder.*"), ["'encoder.*'", "glob"]),
        (lambda: probe("a b"), ["'a b'", "whitespace"]),
        (lambda: probing(), ["at least one tag pattern"]),
        (lambda: probing(""), ["tags", "empty tag pattern"]),
        (lambda: probing(5), ["tags", "5", "int"]),
        (lambda: probing("a", ranks="some"), ["ranks", "'some'", "'zero'", "'all'"]),
        (lambda: probing("a", on_error="ignore"), ["on_error", "'ignore'", "'disable'", "'raise'"]),
        (lambda: probing("a", rank=-1), ["rank", "-1"]),
        (lambda: ProbeSwitch(tags=[""]), ["ProbeSwitch", "tags", "empty tag pattern"]),
        (lambda: ProbeSwitch(tags=["ok", 7]), ["ProbeSwitch", "tags", "7", "int"]),
        (lambda: ProbeSwitch(tags=5), ["ProbeSwitch", "tags", "5"]),
        (lambda: ProbeSwitch(ranks="some"), ["ranks", "'some'", "'zero'", "'all'"]),
        (lambda: ProbeSwitch(on_error="ignore"), ["on_error", "'ignore'", "'disable'", "'raise'"]),
        (lambda: ProbeSwitch(every_n_steps=0), ["every_n_steps", "0", ">= 1"]),
        (lambda: ProbeSwitch(every_n_steps=True), ["every_n_steps", "True"]),
    ],
)
def test_bad_arguments_raise_config_error(build: Any, fragments: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        build()
    assert isinstance(info.value, ValueError)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_enabled_rejects_non_string_tags() -> None:
    with pytest.raises(ConfigError, match="tag"):
        enabled("")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="tag"):
        enabled(None)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------
# Ranks
# ------------------------------------------------------------------------------------------


def test_rank_zero_policy_switches_other_ranks_off(counter: Any, tmp_path: Path) -> None:
    calls, counted = counter
    with probing("attention", output_dir=tmp_path, rank=1):
        assert counted(1) is None
        assert not enabled("attention")
    with probing("attention", output_dir=tmp_path, rank=1, ranks="all"):
        assert counted(2) == 2
        ctx = current_context("attention")
        assert ctx is not None and ctx.rank == 1
        assert ctx.path(".txt").name == "attention_00000000_rank1.txt"
    assert calls == [2]


def test_rank_is_read_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, counter: Any, tmp_path: Path
) -> None:
    calls, counted = counter
    monkeypatch.setenv("RANK", "2")
    with probing("attention", output_dir=tmp_path):
        assert counted(1) is None
    with probing("attention", output_dir=tmp_path, ranks="all"):
        assert current_context("attention").rank == 2  # type: ignore[union-attr]
    assert calls == []


# ------------------------------------------------------------------------------------------
# ContextVar isolation
# ------------------------------------------------------------------------------------------


def test_switches_are_isolated_between_threads(counter: Any, tmp_path: Path) -> None:
    calls, counted = counter
    inside = threading.Barrier(2)
    checked = threading.Barrier(2)
    results: dict[str, Any] = {}

    def switched_thread() -> None:
        with probing("attention", output_dir=tmp_path):
            inside.wait()
            results["switched"] = counted("switched")
            checked.wait()

    def plain_thread() -> None:
        inside.wait()  # the other thread is inside its probing() block now
        results["plain"] = (counted("plain"), enabled("attention"))
        checked.wait()

    threads = [threading.Thread(target=switched_thread), threading.Thread(target=plain_thread)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == {"switched": "switched", "plain": (None, False)}
    assert calls == ["switched"]
    assert not enabled("attention")  # the main thread never saw it


def test_copied_context_carries_the_switch_into_a_thread(tmp_path: Path) -> None:
    seen: list[bool] = []
    with probing("attention", output_dir=tmp_path):
        context = contextvars.copy_context()
        thread = threading.Thread(target=lambda: seen.append(enabled("attention")))
        thread.start()
        thread.join()
    context.run(lambda: seen.append(enabled("attention")))
    assert seen == [False, True]  # a new thread starts with an empty context


def test_switches_are_isolated_between_asyncio_tasks(tmp_path: Path) -> None:
    async def switched(started: asyncio.Event, done: asyncio.Event) -> bool:
        with probing("attention", output_dir=tmp_path):
            started.set()
            await done.wait()
            return enabled("attention")

    async def plain(started: asyncio.Event, done: asyncio.Event) -> bool:
        await started.wait()
        result = enabled("attention")
        done.set()
        return result

    async def main() -> list[bool]:
        started, done = asyncio.Event(), asyncio.Event()
        return list(await asyncio.gather(switched(started, done), plain(started, done)))

    assert asyncio.run(main()) == [True, False]


# ------------------------------------------------------------------------------------------
# Hydra option and Hydra run directory
# ------------------------------------------------------------------------------------------


def test_hydra_option_builds_a_probe_switch() -> None:
    from hydra.utils import instantiate

    cfg = OmegaConf.load(PROBES_YAML)
    overrides = ["probes.tags=[attention,encoder.*]", "probes.every_n_steps=10"]
    cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(overrides))
    callbacks = instantiate(cfg)
    switch = callbacks["probes"]
    assert isinstance(switch, ProbeSwitch)
    assert switch.tags == ("attention", "encoder.*")
    assert (switch.every_n_steps, switch.ranks, switch.on_error) == (10, "zero", "disable")
    assert switch.output_dir is None and switch.validation is False
    default = instantiate(OmegaConf.load(PROBES_YAML))["probes"]
    assert default.tags == () and default.every_n_steps == 1


def test_hydra_option_comments_every_key() -> None:
    lines = PROBES_YAML.read_text().splitlines()
    for index, line in enumerate(lines):
        stripped = line.strip()
        if not stripped or stripped.startswith("#") or ":" not in stripped:
            continue
        above = lines[index - 1].strip() if index else ""
        assert "#" in line or above.startswith("#"), f"key without a comment: {line!r}"


def test_hydra_run_dir_is_the_default_output_root(tmp_path: Path) -> None:
    from hydra.conf import HydraConf
    from hydra.core.hydra_config import HydraConfig

    cfg = OmegaConf.create({"hydra": OmegaConf.structured(HydraConf)})
    cfg.hydra.runtime.output_dir = str(tmp_path / "hydra_run")
    HydraConfig.instance().set_config(cfg)
    try:
        with probing("attention"):
            ctx = current_context("attention")
        assert ctx is not None and ctx.output_dir == tmp_path / "hydra_run" / "probes"
    finally:
        HydraConfig.instance().cfg = None  # type: ignore[assignment]


# ------------------------------------------------------------------------------------------
# ProbeSwitch inside a real Trainer.fit
# ------------------------------------------------------------------------------------------


def test_probe_switch_runs_probes_in_training_step_on_due_steps(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model = TinyModel()
    switch = ProbeSwitch(tags=["model.*"], every_n_steps=2)
    trainer = make_trainer(tmp_path, [switch], limit_val_batches=2, num_sanity_val_steps=1)
    trainer.fit(model)

    assert trainer.global_step == 5
    assert model.trainer_steps == [0, 1, 2, 3, 4]
    assert [r["step"] for r in model.records] == [0, 2, 4]
    for record in model.records:
        assert record["step"] == record["caller_step"]
        assert (record["rank"], record["tag"]) == (0, "model.attention")
        assert record["probe"] == "inspect_layer"
        assert record["epoch"] == record["step"] // 4  # 4 batches per epoch
        assert record["output_dir"] == Path(trainer.log_dir) / "probes"
    assert model.val_records == []  # validation=False, sanity check never
    assert not enabled("model.attention")  # switched off again after fit
    assert inspect_layer([], torch.zeros(1), 0) is None

    keep_all = {"tensors": 0, "images": 0, "histograms": 0}
    events = EventAccumulator(trainer.log_dir, size_guidance=keep_all)
    events.Reload()
    text_tag = "probes/inspect_layer/summary/text_summary"
    assert text_tag in events.Tags()["tensors"]
    assert [e.step for e in events.Tensors(text_tag)] == [0, 2, 4]
    assert [e.step for e in events.Images("probes/inspect_layer/map")] == [0, 2, 4]
    assert [e.step for e in events.Histograms("probes/inspect_layer/out")] == [0, 2, 4]


def test_probe_switch_gives_env_tags_context_and_files_without_logger(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(ENV_VAR, "model.attention")
    reload_env()
    model = TinyModel()
    trainer = make_trainer(tmp_path, [ProbeSwitch(every_n_steps=3)], logger=False, max_steps=4)
    trainer.fit(model)
    assert [r["step"] for r in model.records] == [0, 3]  # env tags follow the switch's schedule
    probes_dir = tmp_path / "probes"  # trainer.log_dir is default_root_dir without a logger
    assert sorted(p.name for p in probes_dir.glob("*.txt")) == [
        "inspect_layer_00000000_rank0_summary.txt",
        "inspect_layer_00000003_rank0_summary.txt",
    ]
    assert len(list(probes_dir.glob("*_map.png"))) == 2


def test_probe_switch_contains_errors_and_runs_validation_when_asked(tmp_path: Path) -> None:
    model = TinyModel(failing=True)
    switch = ProbeSwitch(tags=["model.*"], validation=True, output_dir=tmp_path / "out")
    trainer = make_trainer(
        tmp_path, [switch], logger=False, limit_val_batches=2, num_sanity_val_steps=1
    )
    expected = r"failing_probe \(tag 'model.failing'\) raised RuntimeError: boom at step 1"
    with pytest.warns(ProbeWarning, match=expected):
        trainer.fit(model)
    assert trainer.global_step == 5  # training went on
    assert model.failing_calls == [0, 1]  # switched off after the first error
    assert [r["step"] for r in model.records] == [0, 1, 2, 3, 4]
    assert model.val_records and not any(r["sanity"] for r in model.val_records)
    assert {r["output_dir"] for r in model.records} == {tmp_path / "out"}


def test_probe_switch_on_error_raise_stops_fit_and_switches_off(tmp_path: Path) -> None:
    model = TinyModel(failing=True)
    switch = ProbeSwitch(tags=["model.failing"], on_error="raise")
    trainer = make_trainer(tmp_path, [switch], logger=False)
    with pytest.raises(RuntimeError, match="boom at step 1"):
        trainer.fit(model)
    assert not enabled("model.failing")


def test_two_probe_switches_in_one_trainer_are_rejected(tmp_path: Path) -> None:
    switches = [ProbeSwitch(tags=["a"]), ProbeSwitch(tags=["b"])]
    trainer = make_trainer(tmp_path, switches, logger=False)
    with pytest.raises(ConfigError, match="2 ProbeSwitch callbacks"):
        trainer.fit(TinyModel())
    assert not enabled("a") and not enabled("b")


def test_probe_switch_sends_to_mlflow(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    pytest.importorskip("mlflow")
    from lightning.pytorch.loggers import MLFlowLogger

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    logger = MLFlowLogger(tracking_uri=f"file:{tmp_path / 'mlruns'}")
    model = TinyModel()
    switch = ProbeSwitch(tags=["model.attention"], every_n_steps=2)
    trainer = make_trainer(tmp_path, [switch], logger=logger, max_steps=3)
    trainer.fit(model)
    client, run_id = logger.experiment, logger.run_id
    artifacts = sorted(a.path for a in client.list_artifacts(run_id, "lightning_inspect/probes"))
    assert artifacts == [  # texts and pictures: one artifact per step
        f"lightning_inspect/probes/inspect_layer_{step:08d}_rank0_{name}"
        for step in (0, 2)
        for name in ("map.png", "summary.md")
    ]
    # Histograms: MLflow's histogram table (a line per step) and a picture of the key over steps.
    spool = client.download_artifacts(run_id, "lightning_inspect/histograms", str(tmp_path))
    lines = [json.loads(x) for x in (Path(spool) / "ProbeSwitch.jsonl").read_text().splitlines()]
    assert [(x["key"], x["step"]) for x in lines] == [
        ("probes/inspect_layer/out", s) for s in (0, 2)
    ]
    assert (Path(spool) / "probes" / "inspect_layer" / "out.png").is_file()


def test_probe_switch_reports_the_calls_and_where_they_wrote(
    tmp_path: Path, lightning_info: list[str]
) -> None:
    from lightning.pytorch.loggers import MLFlowLogger
    from mlflow import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow = MLFlowLogger(tracking_uri=uri, artifact_location=str(tmp_path / "artifacts"))
    tb = TensorBoardLogger(str(tmp_path / "tb"))
    switch = ProbeSwitch(tags=["model.attention"], every_n_steps=2)
    make_trainer(tmp_path, [switch], logger=[tb, mlflow]).fit(TinyModel())
    [line] = [x for x in lightning_info if x.startswith("ProbeSwitch: tag 'model.attention'")]
    # Steps 0, 2 and 4; each call logs a text, an image and a histogram.
    assert "3 probe calls ran (test_probes.inspect_layer 3)" in line
    assert f"TensorBoardLogger {tb.log_dir}: 9 items" in line
    assert f"MLFlowLogger {mlflow.run_id}: 9 items" in line
    events = EventAccumulator(tb.log_dir, size_guidance={"images": 0})
    events.Reload()
    assert [e.step for e in events.Images("probes/inspect_layer/map")] == [0, 2, 4]
    assert len(MlflowClient(uri).list_artifacts(mlflow.run_id, "lightning_inspect/probes")) == 6


def test_context_handles_come_from_the_backends_and_scalar_loggers_get_files(
    tmp_path: Path,
) -> None:
    from lightning.pytorch.loggers import CSVLogger, MLFlowLogger

    tb = TensorBoardLogger(str(tmp_path / "tb"))
    mlflow = MLFlowLogger(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    switch = ProbeSwitch(tags=["handles"])
    switch.setup(make_trainer(tmp_path, [switch], logger=[tb, mlflow]), TinyModel(), "fit")
    ctx = current_context("handles")
    assert ctx is not None and ctx.tensorboard is tb.experiment
    assert ctx.mlflow is not None and ctx.mlflow[1] == mlflow.run_id
    with pytest.warns(RuntimeWarning, match="'handles' matches no registered probe"):
        switch.teardown(switch.trainer, TinyModel(), "fit")
    # A logger that shows scalars only (CSV) gets nothing from probes: their output goes to files.
    switch = ProbeSwitch(tags=["handles"], output_dir=tmp_path / "out")
    switch.setup(make_trainer(tmp_path, [switch], logger=CSVLogger(tmp_path)), TinyModel(), "fit")
    ctx = current_context("handles")
    assert ctx is not None and ctx.tensorboard is None and ctx.mlflow is None
    ctx.log_text("note", "hello")
    with pytest.warns(RuntimeWarning, match="'handles' matches no registered probe"):
        switch.teardown(switch.trainer, TinyModel(), "fit")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["handles_00000000_rank0_note.txt"]


def test_probe_switch_warns_for_a_tag_that_matches_no_probe(
    tmp_path: Path, lightning_info: list[str]
) -> None:
    out = tmp_path / "out"
    switch = ProbeSwitch(tags=["atention", "model.attention", "model.validation"], output_dir=out)
    trainer = make_trainer(tmp_path, [switch], logger=False, max_steps=2)
    with pytest.warns(RuntimeWarning) as caught:
        trainer.fit(TinyModel())
    [message] = [str(w.message) for w in caught if "'atention'" in str(w.message)]
    assert message.startswith("ProbeSwitch: tag pattern 'atention' matches no registered probe, so")
    assert "Known probe tags: " in message and "model.attention" in message.split("tags: ")[1]
    assert not [x for x in lightning_info if "'atention'" in x]
    # A probe that exists but is never called: said too.
    [never] = [str(w.message) for w in caught if "'model.validation'" in str(w.message)]
    assert "switches on test_probes.inspect_validation, but no call of it ran" in never
    # The other tag ran; without a logger its output went to files.
    [line] = [x for x in lightning_info if x.startswith("ProbeSwitch: tag 'model.attention'")]
    assert "2 probe calls ran" in line and f"files in {out}: 6 items" in line
    assert len(list(out.iterdir())) == 6


@pytest.mark.slow  # starts two worker processes (about 10 s)
def test_ddp_ranks_all_writes_per_rank_files_ranks_zero_only_rank_zero(tmp_path: Path) -> None:
    model = TinyModel(ddp=True)
    switch = ProbeSwitch(tags=["ddp.*"], ranks="all", every_n_steps=2, output_dir=tmp_path / "ddp")
    trainer = make_trainer(
        tmp_path, [switch], logger=False, strategy="ddp_spawn", devices=2, max_steps=3
    )
    trainer.fit(model)
    names = sorted(p.name for p in (tmp_path / "ddp").glob("*.txt"))
    assert names == [
        "write_rank_file_00000000_rank0.txt",
        "write_rank_file_00000000_rank1.txt",
        "write_rank_file_00000002_rank0.txt",
        "write_rank_file_00000002_rank1.txt",
    ]
    assert (tmp_path / "ddp" / "write_rank_file_00000002_rank1.txt").read_text() == "rank 1 step 2"
    zero_only = sorted(p.name for p in (tmp_path / "ddp").glob("*.log"))
    assert zero_only == [f"write_zero_file_{step:08d}_rank0.log" for step in (0, 1, 2)]

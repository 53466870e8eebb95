"""The Hydra side: the ``inspect`` config group, the search-path plugin and ``instantiate_callbacks``.

Configs are composed with Hydra's compose API against the example app's ``conf/`` (which knows
nothing of the group: the plugin puts it on the search path), then instantiated.
"""

from __future__ import annotations

import inspect as pyinspect
import json
import math
import re
import subprocess
import sys
import textwrap
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import ConfigCompositionException
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_inspect import (
    ActivationMonitor,
    GradientMonitor,
    GraphMonitor,
    HealthMonitor,
    OverviewPage,
    RunRecord,
    ShapeTracer,
    WeightMonitor,
    instantiate_callbacks,
    validate_callback_config,
)
from lightning_inspect.errors import ConfigError, NonFiniteError

ROOT = Path(__file__).resolve().parents[1]
APP_CONF = ROOT / "conf"
GROUP_DIR = ROOT / "lightning_inspect" / "conf" / "inspect"
PLUGIN_FILE = (
    ROOT / "hydra_plugins" / "lightning_inspect_searchpath" / "lightning_inspect_searchpath.py"
)

MONITORS: dict[str, type] = {
    "activations": ActivationMonitor,
    "gradients": GradientMonitor,
    "weights": WeightMonitor,
    "graph": GraphMonitor,
}
#: Options whose YAML is a single callback entry with the constructor's defaults.
SINGLE_OPTIONS = [*MONITORS, "probes"]
ALL_OPTIONS = [*SINGLE_OPTIONS, "all", "debug"]


def _option(name: str) -> Any:
    if name == "probes" and not (GROUP_DIR / "probes.yaml").exists():
        return pytest.param(
            name, marks=pytest.mark.skip(reason="inspect/probes.yaml is not in the package")
        )
    return name


def _composer(config_dir: Path) -> Iterator[Any]:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        yield lambda *overrides: compose(config_name="config", overrides=list(overrides))
    GlobalHydra.instance().clear()


@pytest.fixture
def compose_app(tmp_path: Path) -> Iterator[Any]:
    """``compose_app(*overrides) -> DictConfig`` of an app without its own ``inspect`` group.

    The options composed are the shipped ones (the example app replaces ``all`` with its own).
    """
    (tmp_path / "app_conf").mkdir()
    (tmp_path / "app_conf" / "config.yaml").write_text("seed: 0\n")
    yield from _composer(tmp_path / "app_conf")


@pytest.fixture
def compose_example() -> Iterator[Any]:
    """``compose_example(*overrides) -> DictConfig`` of the example app's config (``conf/``)."""
    yield from _composer(APP_CONF)


def _inspect(cfg: DictConfig) -> DictConfig:
    return cfg.inspect


def _class_of(target: str) -> type:
    return hydra.utils.get_class(target)


# -- the plugin ---------------------------------------------------------------------------------


def test_plugin_is_discovered_and_points_at_the_group() -> None:
    from hydra.core.config_search_path import ConfigSearchPath
    from hydra.core.plugins import Plugins
    from hydra.plugins.search_path_plugin import SearchPathPlugin

    found = {f"{p.__module__}.{p.__name__}" for p in Plugins.instance().discover(SearchPathPlugin)}
    name = "hydra_plugins.lightning_inspect_searchpath.lightning_inspect_searchpath.LightningInspectSearchPathPlugin"
    assert name in found

    from hydra_plugins.lightning_inspect_searchpath.lightning_inspect_searchpath import (
        LightningInspectSearchPathPlugin,
        conf_search_path,
    )

    class Recorder(ConfigSearchPath):
        def __init__(self) -> None:
            self.appended: list[tuple[str, str]] = []

        def get_path(self) -> Any:
            return []

        def append(self, provider: str, path: str, anchor: Any = None) -> None:
            self.appended.append((provider, path))

        def prepend(self, provider: str, path: str, anchor: Any = None) -> None:
            raise AssertionError("the plugin appends, so an app's own inspect/*.yaml wins")

    recorder = Recorder()
    LightningInspectSearchPathPlugin().manipulate_search_path(recorder)
    assert recorder.appended == [("lightning-inspect", conf_search_path())]
    path = conf_search_path()
    assert path.startswith("file://")
    assert (Path(path[len("file://") :]) / "inspect" / "activations.yaml").is_file()


def test_no_hydra_plugins_init() -> None:
    assert not (ROOT / "hydra_plugins" / "__init__.py").exists()


def _fresh_python(code: str, cwd: Path) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_plugin_and_composing_import_neither_torch_nor_lightning(tmp_path: Path) -> None:
    """Every Hydra app imports the plugin and consults its search path: both must stay light."""
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "config.yaml").write_text("x: 1\n")
    code = f"""
        import json, sys
        import hydra_plugins.lightning_inspect_searchpath.lightning_inspect_searchpath as plugin
        after_import = sorted(m for m in ("torch", "lightning", "lightning_inspect") if m in sys.modules)
        from hydra import compose, initialize_config_dir
        with initialize_config_dir(config_dir={str(tmp_path / "conf")!r}, version_base="1.3"):
            plain = compose(config_name="config")
            after_compose = sorted(m for m in ("torch", "lightning", "lightning_inspect") if m in sys.modules)
            with_inspect = compose(config_name="config", overrides=["+inspect=all"])
        print(json.dumps({{"after_import": after_import, "after_compose": after_compose,
                           "entries": sorted(with_inspect.inspect), "x": plain.x,
                           "still": sorted(m for m in ("torch", "lightning") if m in sys.modules)}}))
    """
    result = _fresh_python(code, tmp_path)
    assert result["after_import"] == []
    assert result["after_compose"] == []
    assert result["still"] == []
    assert result["entries"] == [
        "activations",
        "gradients",
        "graph",
        "overview",
        "record",
        "weights",
    ]


# -- the YAML files -------------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(GROUP_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_every_yaml_key_has_a_comment(path: Path) -> None:
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        match = re.match(r"^(\s*)(- )?([\w.]+):", line)
        list_item = re.match(r"^(\s*)- ([\w/@.]+)\s*$", line)
        if not (match or list_item):
            continue
        indent = (match or list_item).group(1)  # type: ignore[union-attr]
        previous = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        assert previous.strip().startswith("#") and previous.startswith(indent), (
            f"{path.name}:{i + 1}: {line.strip()!r} has no '#' comment on the line above"
        )


@pytest.mark.parametrize("option", [_option(o) for o in SINGLE_OPTIONS])
def test_single_option_yaml_matches_the_constructor(option: str) -> None:
    """Each key is an argument of the class, every argument is there, with the class default."""
    entry = OmegaConf.load(GROUP_DIR / f"{option}.yaml")[option]
    cls = _class_of(entry._target_)
    params = {n: p for n, p in pyinspect.signature(cls).parameters.items()}
    keys = [k for k in entry if k != "_target_"]
    assert sorted(keys) == sorted(params)
    for key in keys:
        default = params[key].default
        value = OmegaConf.to_container(entry, resolve=False)[key]
        if isinstance(default, tuple):
            default = list(default)
        assert value == default, (
            f"{option}.{key}: YAML {value!r} != {cls.__name__} default {default!r}"
        )


# -- composing and instantiating -------------------------------------------------------------------


def test_no_inspect_by_default(compose_app: Any) -> None:
    cfg = compose_app()
    assert "inspect" not in cfg
    assert instantiate_callbacks(cfg.get("inspect")) == []


@pytest.mark.parametrize("option", [_option(o) for o in SINGLE_OPTIONS])
def test_each_option_instantiates_its_callback(compose_app: Any, option: str) -> None:
    cfg = compose_app(f"+inspect={option}")
    assert list(cfg.inspect) == [option]
    callbacks = instantiate_callbacks(cfg.get("inspect"))
    assert len(callbacks) == 1
    expected = MONITORS.get(option) or _class_of(cfg.inspect[option]._target_)
    assert type(callbacks[0]) is expected
    # and the contract: hydra.utils.instantiate(cfg.inspect) gives {name: Callback}
    built = hydra.utils.instantiate(cfg.inspect, _convert_="all")
    assert list(built) == [option] and type(built[option]) is expected


@pytest.mark.parametrize("path", sorted(GROUP_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_option_composes_into_callbacks(compose_app: Any, path: Path) -> None:
    """Also the options other parts of the library add to the group."""
    cfg = compose_app(f"+inspect={path.stem}")
    for name, entry in cfg.inspect.items():
        try:
            _class_of(entry._target_)
        except Exception as exc:  # an option whose class is not exported yet
            pytest.skip(f"inspect.{name}._target_={entry._target_!r} is not importable: {exc}")
    callbacks = instantiate_callbacks(cfg.inspect)
    assert len(callbacks) == len(cfg.inspect) >= 1
    assert all(isinstance(cb, L.Callback) for cb in callbacks)


def test_monitor_defaults(compose_app: Any) -> None:
    callbacks = instantiate_callbacks(compose_app("+inspect=all").inspect)
    act, grad, weights, graph, _record, _overview = callbacks
    assert [type(cb) for cb in callbacks] == [
        ActivationMonitor,
        GradientMonitor,
        WeightMonitor,
        GraphMonitor,
        RunRecord,
        OverviewPage,
    ]
    for monitor in (act, grad, weights):
        assert monitor.modules == [] and monitor.exclude == []
        assert monitor.schedule.every_n_steps == 50
        assert monitor.histograms is True and monitor.bins == 64
        assert monitor.on_nonfinite == "warn" and monitor.enabled is True
        assert monitor.backends is None and monitor.mlflow_metrics == "summary"
    assert grad.outputs and grad.parameters and grad.global_norm
    assert weights.update_ratio is True
    assert graph.graph and graph.structure and graph.enabled


def test_all_gives_the_four_monitors_the_run_record_and_the_overview(compose_app: Any) -> None:
    cfg = compose_app("+inspect=all")
    assert sorted(cfg.inspect) == [
        "activations",
        "gradients",
        "graph",
        "overview",
        "record",
        "weights",
    ]
    assert "defaults" not in cfg.inspect
    types = {type(cb) for cb in instantiate_callbacks(cfg.inspect)}
    assert types == {
        ActivationMonitor,
        GradientMonitor,
        WeightMonitor,
        GraphMonitor,
        RunRecord,
        OverviewPage,
    }


def test_the_example_apps_all_is_the_shipped_all_every_4_steps(compose_example: Any) -> None:
    example = compose_example("+inspect=all").inspect
    names = ("activations", "gradients", "weights", "graph", "record", "overview")
    shipped = {n: OmegaConf.load(GROUP_DIR / f"{n}.yaml")[n] for n in names}
    assert sorted(example) == sorted(shipped)
    for name, entry in shipped.items():
        changed = {k for k in entry if example[name][k] != entry[k]}
        expected = {"every_n_steps"} if name in ("activations", "gradients", "weights") else set()
        assert changed == expected, name
    callbacks = instantiate_callbacks(example)
    assert [cb.schedule.every_n_steps for cb in callbacks[:3]] == [4, 4, 4]
    # the example's other options are the shipped ones
    assert compose_example("+inspect=activations").inspect.activations == shipped["activations"]


def test_options_compose_as_a_list(compose_app: Any) -> None:
    cfg = compose_app("+inspect=[activations,gradients]")
    callbacks = instantiate_callbacks(cfg.inspect)
    assert [type(cb) for cb in callbacks] == [ActivationMonitor, GradientMonitor]


def test_debug_is_every_module_every_step_and_raises(compose_app: Any) -> None:
    cfg = compose_app("+inspect=debug")
    assert sorted(cfg.inspect) == ["activations", "gradients", "health", "shapes"]
    act, grad, health, shapes = instantiate_callbacks(cfg.inspect)
    assert (type(act), type(grad), type(health), type(shapes)) == (
        ActivationMonitor,
        GradientMonitor,
        HealthMonitor,
        ShapeTracer,
    )
    for monitor in (act, grad, health):
        assert monitor.modules == ["*"]
        assert monitor.schedule.every_n_steps == 1
    assert health.on_nonfinite == "raise"  # the health monitor stops at the first NaN/Inf


def test_overrides(compose_app: Any) -> None:
    cfg = compose_app(
        "+inspect=[activations,weights]",
        "inspect.activations.every_n_steps=10",
        "inspect.activations.modules=[features.*,classifier.1]",
        "inspect.activations.stats=[mean,rms]",
        "inspect.weights.exclude=[*.bias]",
        "inspect.weights.update_ratio=false",
        "inspect.weights.backends=tensorboard",
    )
    act, weights = instantiate_callbacks(cfg.inspect)
    assert act.schedule.every_n_steps == 10
    assert act.modules == ["features.*", "classifier.1"] and type(act.modules) is list
    assert act.stats == ("mean", "rms")
    assert weights.exclude == ["*.bias"]
    assert weights.update_ratio is False
    assert weights.backends == ("tensorboard",)


def test_null_and_disabled_entries(compose_app: Any) -> None:
    cfg = compose_app(
        "+inspect=all",
        "inspect.gradients=null",
        "inspect.graph._target_=null",
        "inspect.weights.enabled=false",
    )
    callbacks = instantiate_callbacks(cfg.inspect)
    assert [type(cb) for cb in callbacks] == [
        ActivationMonitor,
        WeightMonitor,
        RunRecord,
        OverviewPage,
    ]
    assert callbacks[1].enabled is False


@pytest.mark.parametrize("empty", [None, {}, OmegaConf.create({}), []])
def test_nothing_to_instantiate(empty: Any) -> None:
    assert instantiate_callbacks(empty) == []


# -- errors -------------------------------------------------------------------------------------


def test_unknown_key_names_the_path_the_valid_keys_and_the_closest(compose_app: Any) -> None:
    cfg = compose_app("+inspect=activations", "+inspect.activations.every_n_step=5")
    with pytest.raises(ConfigError) as info:
        instantiate_callbacks(cfg.get("inspect"))
    message = str(info.value)
    assert message.startswith("inspect.activations.every_n_step:")
    assert "Did you mean 'every_n_steps'?" in message
    assert "lightning_inspect.ActivationMonitor" in message and "(value 5)" in message
    assert "Valid keys: modules, exclude, every_n_steps, start_step" in message


def test_unknown_key_is_caught_before_any_callback_is_built(
    compose_app: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    built: list[Any] = []
    monkeypatch.setattr(ActivationMonitor, "__init__", lambda self, **kw: built.append(kw))
    cfg = compose_app("+inspect=[activations,gradients]", "+inspect.gradients.outptus=false")
    with pytest.raises(
        ConfigError, match=r"inspect\.gradients\.outptus: .*Did you mean 'outputs'\?"
    ):
        instantiate_callbacks(cfg.inspect)
    assert built == []


def test_key_not_in_the_option_without_plus_is_refused_by_hydra(compose_app: Any) -> None:
    with pytest.raises(ConfigCompositionException) as info:
        compose_app("+inspect=activations", "inspect.activations.every_n_step=5")
    assert "Could not override 'inspect.activations.every_n_step'" in str(info.value)


def test_misspelt_entry_name(compose_app: Any) -> None:
    cfg = compose_app("+inspect=activations", "+inspect.activaions.every_n_steps=5")
    with pytest.raises(
        ConfigError, match=r"inspect\.activaions: no _target_.*Did you mean 'activations'\?"
    ):
        instantiate_callbacks(cfg.inspect)


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        (
            "inspect.activations.bins=1",
            r"^inspect\.activations: ActivationMonitor\(bins=1\): expected an integer >= 2",
        ),
        ("inspect.activations.every_n_steps=0", r"^inspect\.activations: .*every_n_steps=0"),
        (
            "inspect.activations.on_nonfinite=rase",
            r"^inspect\.activations: .*'rase'.*Did you mean 'raise'\?",
        ),
        ("inspect.activations.stats=[mean,median]", r"^inspect\.activations: .*'median'"),
        (
            "inspect.activations.backends=tensorbord",
            r"^inspect\.activations: .*'tensorbord'.*Did you mean 'tensorboard'\?",
        ),
        ("inspect.activations.histograms=maybe", r"^inspect\.activations: .*histograms='maybe'"),
    ],
)
def test_bad_value_reaches_the_user_as_a_config_error(
    compose_app: Any, override: str, expected: str
) -> None:
    cfg = compose_app("+inspect=activations", override)
    with pytest.raises(ConfigError, match=expected) as info:
        instantiate_callbacks(cfg.inspect)
    assert "InstantiationException" not in str(info.value)
    # the message is printed once: no chained exception repeats it
    assert info.value.__cause__ is None and info.value.__context__ is None
    printed = "".join(traceback.format_exception(info.value))
    assert printed.count(str(info.value).split(": ", 1)[1]) == 1


def test_a_bad_element_is_shown_in_the_list_as_given(compose_app: Any) -> None:
    cfg = compose_app("+inspect=activations", "inspect.activations.stats=[mean,median]")
    with pytest.raises(ConfigError) as info:
        instantiate_callbacks(cfg.inspect)
    message = str(info.value)
    assert message.startswith(
        "inspect.activations: ActivationMonitor(stats=['mean', 'median']): "
        "'median' is not one of 'mean', 'std'"
    )
    assert "'inf_count'. Did you mean 'mean'" in message


# -- nothing but the entry's own Callback class is ever called ------------------------------------


def test_a_nested_target_from_the_command_line_is_refused_before_anything_runs(
    compose_app: Any, tmp_path: Path
) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    override = f"inspect.activations.modules={{_target_:builtins.open,_args_:['{victim}',w]}}"
    cfg = compose_app("+inspect=activations", override)
    expected = r"^inspect\.activations\.modules=.*builtins\.open.*nested _target_ is not allowed"
    with pytest.raises(ConfigError, match=expected):
        instantiate_callbacks(cfg.inspect)
    assert victim.read_text() == "precious"


@pytest.mark.parametrize(
    ("target", "args"),
    [
        ("builtins.open", ["{victim}", "w"]),
        ("os.symlink", ["{victim}", "{new}"]),
        ("shutil.copyfile", ["{victim}", "{new}"]),
        ("torch.save", [1, "{new}"]),
    ],
)
def test_nested_targets_anywhere_in_the_arguments_are_never_called(
    tmp_path: Path, target: str, args: list[Any]
) -> None:
    victim, new = tmp_path / "victim.txt", tmp_path / "new"
    victim.write_text("precious")
    filled = [a.format(victim=victim, new=new) if isinstance(a, str) else a for a in args]
    call = {"_target_": target, "_args_": filled}
    entries = {
        "inspect.a.modules": {
            "a": {"_target_": "lightning_inspect.ActivationMonitor", "modules": call}
        },
        r"inspect.g.exclude\[1\].x": {
            "g": {"_target_": "lightning_inspect.GradientMonitor", "exclude": ["b", {"x": call}]}
        },
    }
    for where, cfg in entries.items():
        with pytest.raises(ConfigError, match=rf"^{where}=.*nested _target_"):
            instantiate_callbacks(OmegaConf.create(cfg))
        with pytest.raises(ConfigError, match=rf"^{where}="):
            instantiate_callbacks(cfg)
    assert victim.read_text() == "precious" and not new.exists()


def test_a_top_level_target_that_is_not_a_callback_is_never_called(tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    expected = r"^inspect\.x\._target_='builtins\.open': a builtin_function_or_method is not a"
    with pytest.raises(ConfigError, match=expected):
        instantiate_callbacks({"x": {"_target_": "builtins.open", "_args_": [str(victim), "w"]}})
    expected = r"^inspect\.x\._target_='pathlib\.Path': Path is not a Lightning Callback"
    with pytest.raises(ConfigError, match=expected):
        instantiate_callbacks({"x": {"_target_": "pathlib.Path", "_args_": [str(victim)]}})
    assert victim.read_text() == "precious"


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        (5, r"^inspect\.x=5: expected a mapping"),
        (
            {"_target_": "lightning_inspect.ActivationMonitr"},
            r"inspect\.x\._target_=.*Did you mean 'lightning_inspect\.ActivationMonitor'\?",
        ),
        ({"_target_": "collections.OrderedDict"}, r"is not a Lightning Callback"),
    ],
)
def test_bad_entries(entry: Any, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        instantiate_callbacks({"x": entry})


def test_not_a_mapping_at_all() -> None:
    with pytest.raises(ConfigError, match=r"^inspect=3: expected a mapping"):
        instantiate_callbacks(3)


def test_key_path_follows_the_node_and_can_be_given() -> None:
    cfg = OmegaConf.create(
        {"callbacks": {"acts": {"_target_": "lightning_inspect.ActivationMonitor", "binz": 3}}}
    )
    with pytest.raises(ConfigError, match=r"^callbacks\.acts\.binz: .*Did you mean 'bins'\?"):
        instantiate_callbacks(cfg.callbacks)
    with pytest.raises(ConfigError, match=r"^my\.group\.acts\.binz:"):
        instantiate_callbacks(OmegaConf.to_container(cfg.callbacks), key="my.group")


def test_validate_returns_the_class_and_skips_null() -> None:
    assert (
        validate_callback_config({"_target_": "lightning_inspect.GraphMonitor"}, "inspect.graph")
        is GraphMonitor
    )
    assert validate_callback_config(None, "inspect.graph") is None
    assert validate_callback_config({"_target_": None}, "inspect.graph") is None


def test_a_list_of_entries_and_plain_dicts() -> None:
    callbacks = instantiate_callbacks(
        [
            {"_target_": "lightning_inspect.ActivationMonitor", "modules": ["a"]},
            {"_target_": "lightning_inspect.GraphMonitor"},
        ]
    )
    assert [type(cb) for cb in callbacks] == [ActivationMonitor, GraphMonitor]
    with pytest.raises(ConfigError, match=r"^inspect\[0\]\.modulez:"):
        instantiate_callbacks(
            [{"_target_": "lightning_inspect.ActivationMonitor", "modulez": ["a"]}]
        )


# -- debug really stops at the first NaN --------------------------------------------------------


class _NaNAfterFirstLayer(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(4, 4)
        self.poison = nn.Linear(4, 4)
        self.last = nn.Linear(4, 1)
        with torch.no_grad():
            self.poison.weight[0, 0] = math.nan

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(self.poison(self.first(x)))

    def training_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
    ) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_debug_stops_training_at_the_first_nan_naming_the_module(
    compose_app: Any, tmp_path: Path
) -> None:
    callbacks = instantiate_callbacks(compose_app("+inspect=debug").inspect)
    data = DataLoader(TensorDataset(torch.randn(32, 4), torch.randn(32, 1)), batch_size=8)
    trainer = L.Trainer(
        max_steps=4,
        logger=False,
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
        accelerator="cpu",
    )
    with pytest.raises(NonFiniteError, match=r"step 0.*module 'poison' \(Linear\)"):
        trainer.fit(_NaNAfterFirstLayer(), data)
    assert trainer.global_step <= 1


# -- the usual Lightning + Hydra project template ------------------------------------------------


def test_template_callbacks_group(tmp_path: Path) -> None:
    """``+inspect@callbacks=...`` and a ``callbacks/inspect.yaml`` both land in ``cfg.callbacks``."""
    (tmp_path / "callbacks").mkdir()
    (tmp_path / "train.yaml").write_text("defaults:\n  - _self_\n  - callbacks: default\n")
    (tmp_path / "callbacks" / "default.yaml").write_text(
        "model_checkpoint:\n  _target_: lightning.pytorch.callbacks.ModelCheckpoint\n  dirpath: null\n"
    )
    (tmp_path / "callbacks" / "inspect.yaml").write_text(
        "defaults:\n  - default\n  - /inspect@_here_: activations\n  - _self_\n"
        "activations:\n  every_n_steps: 10\n"
    )
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(tmp_path), version_base="1.3"):
        on_the_command_line = compose("train", ["+inspect@callbacks=[activations,gradients]"])
        from_a_file = compose("train", ["callbacks=inspect"])
    GlobalHydra.instance().clear()
    from lightning.pytorch.callbacks import ModelCheckpoint

    callbacks = instantiate_callbacks(on_the_command_line.get("callbacks"))
    assert [type(cb) for cb in callbacks] == [ModelCheckpoint, ActivationMonitor, GradientMonitor]
    callbacks = instantiate_callbacks(from_a_file.get("callbacks"))
    assert [type(cb) for cb in callbacks] == [ModelCheckpoint, ActivationMonitor]
    assert callbacks[1].schedule.every_n_steps == 10


# -- the docs: the option tables and every command on the example app ----------------------------

DOC_FILES = [ROOT / "README.md", ROOT / "docs" / "hydra.md", ROOT / "docs" / "diagnostics.md"]


def _option_table(text: str) -> dict[str, tuple[list[str] | None, list[str]]]:
    """``option -> (entries or None, callback class names)`` from a table headed ``| option |``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| option |"))
    rows: dict[str, tuple[list[str] | None, list[str]]] = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        options = re.findall(r"`(\w+)`", cells[0])
        classes = [c for c in re.findall(r"`([A-Z]\w+)`", cells[-1]) if not c.endswith("Error")]
        entries = re.findall(r"`(\w+)`", cells[1]) if len(cells) == 3 else None
        if len(options) > 1:  # one option per class, in order
            assert len(classes) == len(options), line
            rows.update({o: (None, [c]) for o, c in zip(options, classes, strict=False)})
        else:
            rows[options[0]] = (entries, classes)
    return rows


@pytest.mark.parametrize("doc", DOC_FILES[:2], ids=lambda p: p.name)
def test_the_docs_option_table_matches_the_shipped_yaml(compose_app: Any, doc: Path) -> None:
    rows = _option_table(doc.read_text())
    assert sorted(rows) == sorted(p.stem for p in GROUP_DIR.glob("*.yaml"))
    for option, (entries, classes) in rows.items():
        composed = compose_app(f"+inspect={option}").inspect
        targets = sorted({str(e._target_).rsplit(".", 1)[-1] for e in composed.values()})
        assert sorted(set(classes)) == targets, f"{doc.name}: {option}"
        if entries is not None:
            assert entries == list(composed), f"{doc.name}: {option}"


def _example_commands() -> list[str]:
    found = []
    for doc in DOC_FILES:
        text = doc.read_text().replace("\\\n", " ")
        found += [m.group(0) for m in re.finditer(r"python examples/train\.py[^`\n]*", text)]
    return found


def test_every_documented_example_command_selects_example_modules(compose_example: Any) -> None:
    """Each ``python examples/train.py ...`` of the docs composes, builds and selects modules."""
    import shlex

    from lightning_inspect.core.selection import select_modules

    commands = _example_commands()
    assert len(commands) >= 20
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        for command in commands:
            words = shlex.split(command, comments=True)[2:]
            flags = [i for i, w in enumerate(words) if w.startswith("--")]
            overrides = [w for i, w in enumerate(words) if i not in flags and i - 1 not in flags]
            cfg = compose_example(*overrides)
            model = hydra.utils.instantiate(cfg.model, _convert_="all")
            for callback in instantiate_callbacks(cfg.get("inspect")):
                if getattr(callback, "modules", None):
                    assert select_modules(model, callback.modules, callback.exclude), command
    finally:
        sys.path.remove(str(ROOT / "examples"))

"""Tests for lightning_inspect.record and the RunRecord callback (CPU, tiny models)."""

from __future__ import annotations

import copy
import logging
import os
import pickle
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
import yaml
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_inspect.errors import BackendError, ConfigError
from lightning_inspect.record import RunRecord, construction_record, record_init
from lightning_inspect.record.config import config_record, flatten
from lightning_inspect.record.construction import UNRECORDED_TARGET, recorded_init_args
from lightning_inspect.record.data import content_hash, fingerprint_dataset, fingerprint_loaders
from lightning_inspect.record.environment import environment, git_info
from lightning_inspect.record.secrets import MASK, SecretMasker

ROOT = Path(__file__).resolve().parents[1]
RECORD_YAML = ROOT / "lightning_inspect" / "conf" / "inspect" / "record.yaml"
MARKER = "run-record-console-marker"


# ------------------------------------------------------------------------------------------
# Models used by the tests (module level, so that their records can be instantiated)
# ------------------------------------------------------------------------------------------


@record_init
class Encoder(nn.Module):
    """Recorded by the decorator."""

    def __init__(self, in_features: int, hidden: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.in_features, self.hidden, self.dropout = in_features, hidden, dropout
        self.net = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@record_init
class Head(nn.Module):
    """Recorded exactly by the decorator, including a class argument."""

    def __init__(self, hidden: int, classes: int, activation: type[nn.Module] = nn.Tanh) -> None:
        super().__init__()
        self.fc = nn.Sequential(activation(), nn.Linear(hidden, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


class Plain(nn.Module):
    """No decorator, no Hydra, no hparams: no explicit source (its attributes are not guessed)."""

    def __init__(self, in_features: int, hidden: int) -> None:
        super().__init__()
        self.in_features, self.hidden = in_features, hidden
        self.fc = nn.Linear(in_features, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


@record_init
class LitClassifier(L.LightningModule):
    """Components passed in as modules; scalars saved with save_hyperparameters."""

    def __init__(
        self,
        encoder: nn.Module,
        head: nn.Module,
        lr: float = 0.1,
        api_key: str = "not-a-real-key",
        fail_at: int = -1,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["encoder", "head"])
        self.encoder = encoder
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if self.global_step == 0 and batch_idx == 0:
            print(MARKER)
        if self.global_step == self.hparams.fail_at:
            raise RuntimeError("planned failure")
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


class HydraLit(L.LightningModule):
    """Built by hydra.utils.instantiate from a _target_ config."""

    def __init__(self, net: nn.Module, hidden: int, token: str = "") -> None:
        super().__init__()
        self.net = net
        self.out = nn.Linear(net.out_features, hidden)
        self.cls = nn.Linear(hidden, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cls(torch.relu(self.out(self.net(x))))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class SavedLit(L.LightningModule):
    """Not decorated: recorded from save_hyperparameters, which leaves out two arguments."""

    def __init__(
        self, encoder: nn.Module, hidden: int, lr: float = 0.1, momentum: float = 0.0
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["encoder", "momentum"])
        self.encoder = encoder
        self.out = nn.Linear(hidden, 3)


class DictLit(L.LightningModule):
    """save_hyperparameters(config) with one mapping argument."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        self.save_hyperparameters(config)
        self.fc = nn.Linear(4, config["hidden"])


class NoisyDataset(Dataset):
    """Items with a random 'augmentation' drawn from the global generator."""

    def __init__(self, n: int) -> None:
        self.x = torch.arange(n * 4, dtype=torch.float32).reshape(n, 4)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.x[i] + torch.rand(4)


def data(n: int = 32, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g))


def trainer(tmp_path: Path, **kwargs: Any) -> L.Trainer:
    options: dict[str, Any] = dict(
        max_steps=4,
        limit_val_batches=1,
        num_sanity_val_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        accelerator="cpu",
        devices=1,
        default_root_dir=str(tmp_path),
        log_every_n_steps=1,
    )
    options.update(kwargs)
    return L.Trainer(**options)


def git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=repo, check=True, capture_output=True, text=True
    ).stdout.strip()


@pytest.fixture
def dirty_repo(tmp_path: Path) -> Path:
    """A git repository with one commit, an uncommitted change and an untracked file."""
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    git(repo, "config", "user.email", "tests@example.com")
    git(repo, "config", "user.name", "tests")
    (repo / "train.py").write_text("lr = 0.1\n")
    git(repo, "add", "train.py")
    git(repo, "commit", "-q", "-m", "first")
    (repo / "train.py").write_text("lr = 0.2\n")
    (repo / "notes.txt").write_text("untracked\n")
    return repo


# ------------------------------------------------------------------------------------------
# Collection functions
# ------------------------------------------------------------------------------------------


def test_git_info_of_a_dirty_repository(dirty_repo: Path) -> None:
    info = git_info(dirty_repo)
    assert info.commit == git(dirty_repo, "rev-parse", "HEAD")
    assert info.branch == "main" and info.dirty is True and info.notice is None
    assert "-lr = 0.1" in info.diff and "+lr = 0.2" in info.diff
    assert info.untracked == ("notes.txt",)
    git(dirty_repo, "checkout", "--", "train.py")
    clean = git_info(dirty_repo)
    assert clean.dirty is False and clean.diff == ""


def test_git_info_outside_a_repository_and_without_git(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    outside = git_info(tmp_path)
    assert outside.commit is None and "not inside a git repository" in (outside.notice or "")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    missing = git_info(tmp_path)
    assert missing.commit is None and "git is not installed" in (missing.notice or "")


def test_secret_masking() -> None:
    masker = SecretMasker(extra=("db.user",), exempt=("pad_token",))
    for key in (
        "api_key",
        "GITHUB_TOKEN",
        "authToken",
        "db_password",
        "passwd",
        "secret",
        "key",
        "apikey",
        "client_secret",
        "mlflow_credentials",
        "auth",
        "AWS_SECRET_ACCESS_KEY",
        "mytoken",
    ):
        assert masker.is_secret(key), key
    for key in ("key_dim", "num_tokens", "author", "monkey", "lr", "tokenizer", "pad_token"):
        assert not masker.is_secret(key), key
    config = {
        "db": {
            "password": "hunter2",
            "user": "alice",
            "url": "postgresql://alice:hunter2@db:5432/x",
            "auth": {"a": 1},
        },
        "model": {"_target_": "m.M", "key_dim": 8, "pad_token": "<pad>", "token": None},
        "items": [{"api_key": "abc"}],
        "note": "uses ghp_abcdefghijklmnopqrstuvwxyz0123",
    }
    assert masker.mask(config) == {
        "db": {
            "password": MASK,
            "user": MASK,
            "url": f"postgresql://alice:{MASK}@db:5432/x",
            "auth": MASK,
        },
        "model": {"_target_": "m.M", "key_dim": 8, "pad_token": "<pad>", "token": None},
        "items": [{"api_key": MASK}],
        "note": f"uses {MASK}",
    }
    assert masker.override("+db.password=hunter2") == f"+db.password={MASK}"
    assert masker.override("model.hidden=16") == "model.hidden=16"
    assert masker.override("+db={host: x, password: y}") == f"+db={{host:x,password:{MASK}}}"
    # parsed by Hydra's override parser: nested mappings, lists, quoted strings, sweeps
    assert masker.override("+db={password:[hunter2,x]}") == f"+db={{password:{MASK}}}"
    assert masker.override("+db={conn:{password:x}}") == f"+db={{conn:{{password:{MASK}}}}}"
    for given, expected in [
        ("+db=[{token:a},{n:1,api_key:'b c'}]", "+db=[{token:***},{n:1,api_key:***}]"),
        ("+db=choice({password:a},{user:b})", "+db=choice({password:***},{user:***})"),
        ("db.password=choice(a,b)", "db.password=***"),
        ("db.host='postgresql://u:pw@h/x'", "db.host='postgresql://u:***@h/x'"),
        ("++db@pkg={host:x,pass_phrase:y}", "++db@pkg={host:x,pass_phrase:***}"),
    ]:
        assert masker.override(given) == expected.replace("***", MASK)
    assert masker.override("~db.password") == "~db.password"
    assert masker.override("model.layers=[1, 2]") == "model.layers=[1, 2]"  # unchanged: as given
    # an override that does not parse: the whole value, if its key or text names a secret
    assert masker.override("+db={password:[hunter2,x]") == f"+db={MASK}"
    assert masker.override("+db={user:[a") == "+db={user:[a"
    assert masker.command(["train.py", "--api-key", "abc", "--lr", "0.1", "--token=t"]) == [
        "train.py",
        "--api-key",
        MASK,
        "--lr",
        "0.1",
        f"--token={MASK}",
    ]
    os.environ["RR_UNIT_TOKEN"], os.environ["RR_UNIT_NAME"] = "t0k", "job"
    try:
        assert environment(["RR_UNIT_*"])["env"] == {"RR_UNIT_NAME": "job", "RR_UNIT_TOKEN": MASK}
    finally:
        del os.environ["RR_UNIT_TOKEN"], os.environ["RR_UNIT_NAME"]


def test_data_fingerprint_is_deterministic_and_leaves_random_streams_alone() -> None:
    base = data(16)
    same = TensorDataset(base.tensors[0].t().contiguous().t().clone(), base.tensors[1].clone())
    changed = TensorDataset(base.tensors[0].clone(), base.tensors[1].clone())
    changed.tensors[0][15, 0] += 1.0  # the last item is always sampled
    assert fingerprint_dataset(base, 4)["hash"] == fingerprint_dataset(same, 4)["hash"]
    assert fingerprint_dataset(base, 4)["hash"] != fingerprint_dataset(changed, 4)["hash"]
    assert content_hash(torch.ones(2, dtype=torch.bfloat16)) != content_hash(
        torch.ones(2, dtype=torch.float16)
    )

    torch.manual_seed(5), random.seed(5), np.random.seed(5)
    expected = (torch.rand(1), random.random(), np.random.rand())
    torch.manual_seed(5), random.seed(5), np.random.seed(5)
    noisy = [fingerprint_dataset(NoisyDataset(8), 3) for _ in range(2)]
    assert (
        torch.rand(1),
        random.random(),
        np.random.rand(),
    ) == expected  # training's streams untouched
    assert noisy[0]["hash"] == noisy[1]["hash"] and noisy[0]["deterministic"] is True

    loaders = fingerprint_loaders(
        {"train": DataLoader(base, batch_size=4), "val": [DataLoader(data(8, 1), batch_size=8)]},
        items=4,
    )
    assert (
        loaders["train"]["size"],
        loaders["train"]["batches"],
        loaders["train"]["batch_size"],
    ) == (16, 4, 4)
    assert loaders["val"]["size"] == 8 and len(loaders["all"]["hash"]) == 64
    assert fingerprint_dataset(base, 0)["hash"] is None  # sizes only
    assert fingerprint_dataset(base, 4)["items_hashed"] == 4


def test_config_helpers() -> None:
    flat = flatten({"model": {"hidden": 8, "sizes": [1, 2]}}, "config")
    assert flat == {"config/model/hidden": 8, "config/model/sizes": "[1, 2]"}  # lists as JSON
    given = config_record({"model": {"hidden": 8}}, overrides=["model.hidden=8"])
    assert given.overrides == ["model.hidden=8"] and given.source == "argument"


def test_seed_from_seed_everything() -> None:
    L.seed_everything(123, verbose=False)
    assert environment()["seed"]["seed"] == 123


def test_construction_record_from_record_init_rebuilds_the_model() -> None:
    from hydra.utils import instantiate

    model = LitClassifier(Encoder(4, 8, dropout=0.1), Head(8, 3, activation=nn.GELU), lr=0.05)
    record = construction_record(model)
    assert record.verified is True and record.source == "record_init"
    config = record.config
    assert config["_target_"] == "test_run_record.LitClassifier" and config["lr"] == 0.05
    assert config["encoder"] == {
        "_target_": "test_run_record.Encoder",
        "in_features": 4,
        "hidden": 8,
        "dropout": 0.1,
    }
    assert config["head"]["activation"] == {
        "_target_": "hydra.utils.get_object",
        "path": "torch.nn.modules.activation.GELU",
    }

    rebuilt = instantiate(yaml.safe_load(record.to_yaml()))
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
        k: v.shape for k, v in model.state_dict().items()
    }
    rebuilt.load_state_dict(model.state_dict())
    x = torch.randn(5, 4)
    model.eval(), rebuilt.eval()
    assert torch.equal(model(x), rebuilt(x))


def test_construction_record_uses_only_explicit_sources() -> None:
    from hydra.utils import instantiate

    for obj in (Plain(4, 8), nn.Linear(2, 3)):  # attributes are not read as arguments
        record = construction_record(obj)
        assert record.source == "none" and record.verified is None
        assert record.config["_target_"] == UNRECORDED_TARGET
        reason = record.config["reason"]
        sources = ("record_init", "Hydra _target_", "save_hyperparameters")
        assert all(source in reason for source in sources)
        with pytest.raises(Exception, match=f"placeholder for a {record.config['type']} argument"):
            instantiate(record.config)

    record = construction_record(SavedLit(Plain(4, 8), hidden=8, lr=0.05))
    config = record.config
    assert record.source == "hparams" and (config["hidden"], config["lr"]) == (8, 0.05)
    assert "momentum" not in config and any("momentum: not in the saved" in n for n in record.notes)
    assert config["encoder"]["_target_"] == UNRECORDED_TARGET
    assert "'encoder' is not in the saved hyperparameters" in config["encoder"]["reason"]
    assert record.verified is False
    assert any(n.startswith("rebuild check failed from hparams") for n in record.notes)
    assert instantiate(config, encoder=Plain(4, 8)).out.in_features == 8

    record = construction_record(DictLit({"hidden": 5}))
    assert record.source == "hparams" and record.verified is True
    expected = {"_target_": "test_run_record.DictLit", "config": {"hidden": 5}, "_convert_": "all"}
    assert record.config == expected


def test_construction_record_placeholders_and_copies() -> None:
    from hydra.utils import instantiate

    @record_init
    class Local(nn.Module):
        def __init__(self, width: int) -> None:
            super().__init__()
            self.fc = nn.Linear(width, width)

    @record_init
    class Embed(nn.Module):
        def __init__(self, weights: torch.Tensor, scale: float = 2.0) -> None:
            super().__init__()
            self.weight = nn.Parameter(weights.clone())

    Embed.__module__, Embed.__qualname__ = __name__, "Embed"
    globals()["Embed"] = Embed
    try:
        record = construction_record(Embed(torch.randn(10, 10)), verify=False)
        placeholder = record.config["weights"]
        assert (
            placeholder["_target_"] == UNRECORDED_TARGET and placeholder["type"] == "torch.Tensor"
        )
        assert "shape (10, 10)" in placeholder["reason"] and any(
            "weights" in n for n in record.notes
        )
        with pytest.raises(Exception, match=r"placeholder for a torch\.Tensor argument"):
            instantiate(record.config)
        assert instantiate(record.config, weights=torch.zeros(10, 10)).weight.shape == (10, 10)
    finally:
        del globals()["Embed"]

    head = Head(8, 3)
    assert recorded_init_args(copy.deepcopy(head)).arguments == {
        "hidden": 8,
        "classes": 3,
        "activation": nn.Tanh,
    }
    assert recorded_init_args(pickle.loads(pickle.dumps(head))).arguments["classes"] == 3
    assert construction_record(Local(3), verify=False).config["_target_"] == UNRECORDED_TARGET


def test_bad_arguments_name_the_argument_and_the_allowed_values(tmp_path: Path) -> None:
    cases = [
        (dict(fingerprint_items=-1), "fingerprint_items=-1"),
        (dict(backends="wandb"), "backends='wandb'"),
        (dict(repo_dir=str(tmp_path / "nope")), "existing directory"),
        (dict(git_timeout=0), "git_timeout=0"),
        (dict(config=5), "config=5"),
        (dict(capture_output="yes"), "capture_output='yes'"),
        (dict(env_vars=[""]), "env_vars"),
    ]
    for kwargs, text in cases:
        with pytest.raises(ConfigError, match=text.replace("(", r"\(")):
            RunRecord(**kwargs)
    model = LitClassifier(Encoder(4, 8), Head(8, 3))
    with pytest.raises(BackendError, match="MLFlowLogger"):
        trainer(tmp_path, logger=False, callbacks=[RunRecord(backends="mlflow")]).fit(
            model, DataLoader(data(), batch_size=8)
        )
    with pytest.raises(ConfigError, match="model_key='nope'"):
        trainer(
            tmp_path,
            logger=False,
            callbacks=[RunRecord(config={"model": {"a": 1}}, model_key="nope")],
        ).fit(model, DataLoader(data(), batch_size=8))


def test_option_file_documents_every_key_and_instantiates() -> None:
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    lines = RECORD_YAML.read_text().splitlines()
    for i, line in enumerate(lines):
        if line.strip() and not line.lstrip().startswith("#"):
            assert lines[i - 1].lstrip().startswith("#"), f"no comment above {line!r}"
    cfg = OmegaConf.load(RECORD_YAML)
    assert cfg.record._target_ == "lightning_inspect.RunRecord"
    cfg.record._target_ = (
        "lightning_inspect.record.callback.RunRecord"  # the same class, by its module
    )
    assert isinstance(instantiate(cfg)["record"], RunRecord)


# ------------------------------------------------------------------------------------------
# The callback, end to end
# ------------------------------------------------------------------------------------------


def test_run_record_to_mlflow_and_tensorboard(
    tmp_path: Path, dirty_repo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from hydra.utils import instantiate
    from lightning.pytorch.loggers import MLFlowLogger
    from mlflow import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow_logger = MLFlowLogger(
        experiment_name="run-record",
        tracking_uri=uri,
        artifact_location=str(tmp_path / "artifacts"),
    )
    tb_logger = TensorBoardLogger(str(tmp_path / "tb"), name="run")
    os.environ["RR_TEST_JOB"], os.environ["RR_TEST_TOKEN"] = "job-7", "do-not-record"
    L.seed_everything(123, verbose=False)
    model = LitClassifier(Encoder(4, 8), Head(8, 3), lr=0.05, api_key="sk-live-0000")
    callback = RunRecord(
        repo_dir=dirty_repo, capture_output=True, env_vars=["RR_TEST_*"], fingerprint_items=8
    )
    stdout = sys.stdout
    try:
        trainer(tmp_path, logger=[tb_logger, mlflow_logger], callbacks=[callback]).fit(
            model, DataLoader(data(32), batch_size=8), DataLoader(data(8, 1), batch_size=8)
        )
    finally:
        del os.environ["RR_TEST_JOB"], os.environ["RR_TEST_TOKEN"]
    assert (
        sys.stdout is stdout and MARKER in capsys.readouterr().out
    )  # restored; console still saw it
    commit = git(dirty_repo, "rev-parse", "HEAD")

    client = MlflowClient(uri)
    run = client.get_run(mlflow_logger.run_id)
    tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
    assert tags["run_record/git/commit"] == commit and tags["run_record/git/dirty"] == "true"
    assert tags["run_record/git/branch"] == "main" and tags["run_record/status"] == "finished"
    assert tags["run_record/torch"] == torch.__version__ and tags["run_record/cpu_count"] == str(
        os.cpu_count()
    )
    assert (
        tags["run_record/env/RR_TEST_JOB"] == "job-7"
        and tags["run_record/env/RR_TEST_TOKEN"] == MASK
    )
    assert params["run_record/seed"] == "123"
    assert (
        params["run_record/data/train/size"] == "32" and params["run_record/data/val/size"] == "8"
    )
    assert len(params["run_record/data/train/hash"]) == 64
    assert (
        metrics["run_record/steps"] == 4
        and metrics["run_record/steps_per_s"] > 0
        and metrics["run_record/peak_rss_mib"] > 0
    )

    files = tmp_path / "downloaded"
    root = Path(
        client.download_artifacts(run.info.run_id, "lightning_inspect/run_record", str(files))
    )
    assert {
        "record.yaml",
        "git.diff",
        "packages.txt",
        "hparams.yaml",
        "model.yaml",
        "output.log",
    } <= {p.name for p in root.iterdir()}
    assert "+lr = 0.2" in (root / "git.diff").read_text()
    assert f"torch=={torch.__version__}" in (root / "packages.txt").read_text()
    assert MARKER in (root / "output.log").read_text()
    assert yaml.safe_load((root / "hparams.yaml").read_text())["api_key"] == MASK
    record = yaml.safe_load((root / "record.yaml").read_text())
    assert (
        record["status"] == "finished"
        and record["time"]["steps"] == 4
        and record["seed"]["seed"] == 123
    )
    assert (
        record["git"]["untracked"] == ["notes.txt"] and record["model"]["rebuild_checked"] is True
    )
    assert record["data"]["train"]["hash"] == params["run_record/data/train/hash"]

    rebuilt = instantiate(yaml.safe_load((root / "model.yaml").read_text()))
    assert rebuilt.hparams.api_key == MASK  # the secret did not travel into the record
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
        k: v.shape for k, v in model.state_dict().items()
    }
    rebuilt.load_state_dict(model.state_dict())
    x = torch.randn(3, 4)
    model.eval(), rebuilt.eval()
    assert torch.equal(model(x), rebuilt(x))

    events = EventAccumulator(tb_logger.log_dir, size_guidance={"tensors": 0})
    events.Reload()
    summary = (
        events.Tensors("run_record/summary/text_summary")[0].tensor_proto.string_val[0].decode()
    )
    assert commit in summary and "dirty" in summary
    assert (
        "+lr = 0.2"
        in events.Tensors("run_record/git_diff/text_summary")[0].tensor_proto.string_val[0].decode()
    )
    start = HParamsPluginData.FromString(
        events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    )
    hparams = start.session_start_info.hparams
    assert hparams["run_record/seed"].number_value == 123 and hparams["lr"].number_value == 0.05
    assert (
        hparams["run_record/git/commit"].string_value == commit
        and hparams["api_key"].string_value == MASK
    )
    assert (Path(tb_logger.log_dir) / "run_record" / "output.log").is_file()


def test_secrets_in_inline_overrides_are_masked_in_every_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Overrides and the command line, read back from the record's files, MLflow and TensorBoard."""
    from hydra import compose, initialize_config_dir
    from lightning.pytorch.loggers import MLFlowLogger
    from mlflow import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    overrides = [
        "+db={conn:{password:hunter2}}",
        "+pw={password:[hunter2,x]}",
        "+url='sqlite://u:hunter2@h/x'",
    ]
    masked = [
        f"+db={{conn:{{password:{MASK}}}}}",
        f"+pw={{password:{MASK}}}",
        f"+url='sqlite://u:{MASK}@h/x'",
    ]
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "config.yaml").write_text("seed: 1\n")
    with initialize_config_dir(config_dir=str(tmp_path / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
    argv = ["train.py", *overrides, "--api-key", "hunter2", "+broken={token:[hunter2"]
    monkeypatch.setattr(sys, "argv", argv)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow_logger = MLFlowLogger(
        experiment_name="masking", tracking_uri=uri, artifact_location=str(tmp_path / "artifacts")
    )
    tb_logger = TensorBoardLogger(str(tmp_path / "tb"), name="run")
    callback = RunRecord(config=cfg, git=False, packages=False, model=False)
    fit = trainer(
        tmp_path,
        logger=[tb_logger, mlflow_logger],
        callbacks=[callback],
        max_steps=1,
        limit_val_batches=0,
    )
    fit.fit(LitClassifier(Encoder(4, 8), Head(8, 3)), DataLoader(data(8), batch_size=8))

    run = MlflowClient(uri).get_run(mlflow_logger.run_id)
    assert run.data.params["run_record/overrides"] == " ".join(masked)
    command = run.data.tags["run_record/command"]
    assert command.endswith(f"train.py {' '.join(masked)} --api-key {MASK} +broken={MASK}"), command
    download = MlflowClient(uri).download_artifacts
    root = Path(download(run.info.run_id, "lightning_inspect/run_record", str(tmp_path / "dl")))
    assert yaml.safe_load((root / "overrides.yaml").read_text()) == masked
    record = yaml.safe_load((root / "record.yaml").read_text())
    assert record["config"]["overrides"] == masked
    assert record["command"][-len(masked) - 3 : -3] == masked
    assert yaml.safe_load((root / "config.yaml").read_text())["db"] == {"conn": {"password": MASK}}

    events = EventAccumulator(tb_logger.log_dir, size_guidance={"tensors": 0})
    events.Reload()
    text = events.Tensors("run_record/overrides/text_summary")[0]
    written = text.tensor_proto.string_val[0].decode()
    assert all(m in written for m in masked)
    files = [*Path(tb_logger.log_dir).rglob("*"), *root.rglob("*")]
    leaked = [f.name for f in files if f.is_file() and b"hunter2" in f.read_bytes()]
    assert any(f.name.startswith("events.out.tfevents") for f in files) and leaked == []


def test_run_record_of_a_hydra_composed_run_outside_git(tmp_path: Path) -> None:
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    conf = tmp_path / "conf"
    (conf / "model").mkdir(parents=True)
    (conf / "config.yaml").write_text(
        "defaults:\n  - model: small\n  - _self_\ndb:\n  host: localhost\n  password: hunter2\nseed: 7\n"
    )
    (conf / "model" / "small.yaml").write_text(
        "_target_: test_run_record.HydraLit\nhidden: 8\ntoken: abc\n"
        "net:\n  _target_: torch.nn.Linear\n  in_features: 4\n  out_features: ${..hidden}\n"
    )
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose(
            "config", overrides=["model.hidden=16", "+db.api_key=abc123"], return_hydra_config=True
        )
    model = instantiate(cfg.model)
    outside = tmp_path / "not_a_repo"
    outside.mkdir()
    callback = RunRecord(config=cfg, repo_dir=outside, packages=False)
    tb_logger = TensorBoardLogger(str(tmp_path / "tb"), name="hydra")
    with pytest.warns(
        RuntimeWarning, match="no git commit is recorded: .*not inside a git repository"
    ):
        trainer(
            tmp_path, logger=tb_logger, callbacks=[callback], max_steps=2, limit_val_batches=0
        ).fit(model, DataLoader(data(16), batch_size=8))
    folder = Path(tb_logger.log_dir) / "run_record"
    config = yaml.safe_load((folder / "config.yaml").read_text())
    assert "hydra" not in config and config["db"] == {
        "host": "localhost",
        "password": MASK,
        "api_key": MASK,
    }
    assert config["model"]["hidden"] == 16 and config["model"]["net"]["out_features"] == 16
    assert yaml.safe_load((folder / "overrides.yaml").read_text()) == [
        "model.hidden=16",
        f"+db.api_key={MASK}",
    ]
    record = callback.record
    assert record["config"]["choices"] == {"model": "small"} and record["git"]["commit"] is None
    assert (
        record["model"]["source"] == "hydra config at 'model'"
        and record["model"]["rebuild_checked"] is True
    )
    assert record["status"] == "finished" and "notice" in record["git"]

    model_record = yaml.safe_load((folder / "model.yaml").read_text())
    assert model_record["token"] == MASK
    rebuilt = instantiate(model_record)
    rebuilt.load_state_dict(model.state_dict())
    x = torch.randn(2, 4)
    model.eval(), rebuilt.eval()
    assert torch.equal(model(x), rebuilt(x))


class CliModel(L.LightningModule):
    """Built by LightningCLI from ``--model.*`` arguments."""

    def __init__(self, hidden: int = 8, lr: float = 0.1) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(4, hidden), nn.ReLU(), nn.Linear(hidden, 3))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(data(16), batch_size=8)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


@pytest.mark.filterwarnings("ignore::DeprecationWarning:lightning.pytorch.cli")  # jsonargparse
def test_run_record_of_a_lightning_cli_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning.pytorch.cli import LightningCLI

    monkeypatch.setattr(sys, "argv", ["main.py"])  # the command line is ``args``

    args = [
        "fit",
        "--seed_everything=7",
        "--model.hidden=6",
        "--trainer.max_steps=2",
        "--trainer.accelerator=cpu",
        "--trainer.devices=1",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_checkpointing=false",
        "--trainer.enable_model_summary=false",
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.logger=lightning.pytorch.loggers.TensorBoardLogger",
        f"--trainer.logger.save_dir={tmp_path}",
        "--trainer.callbacks+=lightning_inspect.RunRecord",
        "--trainer.callbacks.git=false",
        "--trainer.callbacks.packages=false",
    ]
    cli = LightningCLI(CliModel, args=args)
    folder = Path(cli.trainer.logger.log_dir) / "run_record"
    config = yaml.safe_load((folder / "config.yaml").read_text())
    assert config["model"] == {"hidden": 6, "lr": 0.1} and config["trainer"]["max_steps"] == 2
    assert config["trainer"]["callbacks"][0]["class_path"] == "lightning_inspect.RunRecord"
    record = yaml.safe_load((folder / "record.yaml").read_text())
    assert record["config"]["source"] == "lightning_cli" and record["seed"]["seed"] == 7
    # The same config LightningCLI saves itself next to the logs.
    assert config == yaml.safe_load((Path(cli.trainer.logger.log_dir) / "config.yaml").read_text())


def test_a_failing_run_is_recorded_and_the_console_restored(tmp_path: Path) -> None:
    model = LitClassifier(Encoder(4, 8), Head(8, 3), fail_at=2)
    callback = RunRecord(
        capture_output=True,
        git=False,
        packages=False,
        verify_model=False,
        output_dir=tmp_path / "record",
    )
    streams = (sys.stdout, sys.stderr)
    with pytest.raises(RuntimeError, match="planned failure"):
        trainer(tmp_path, logger=False, callbacks=[callback], limit_val_batches=0).fit(
            model, DataLoader(data(), batch_size=8)
        )
    assert (sys.stdout, sys.stderr) == streams
    record = yaml.safe_load((tmp_path / "record" / "record.yaml").read_text())
    assert record["status"] == "failed" and record["error"] == "RuntimeError: planned failure"
    assert record["time"]["steps"] == 2
    assert MARKER in (tmp_path / "record" / "output.log").read_text()


def test_run_record_reaches_any_logger_through_its_sink(tmp_path: Path) -> None:
    """A CSVLogger: the record's params land in its hparams.yaml, its metrics in metrics.csv."""
    from lightning.pytorch.loggers import CSVLogger

    logger = CSVLogger(str(tmp_path), name="csv", version=0)
    callback = RunRecord(git=False, packages=False, model=False, fingerprint_items=4)
    trainer(tmp_path, logger=logger, callbacks=[callback], limit_val_batches=0).fit(
        LitClassifier(Encoder(4, 8), Head(8, 3)), DataLoader(data(16), batch_size=8)
    )
    hparams = yaml.safe_load((Path(logger.log_dir) / "hparams.yaml").read_text())
    assert (
        hparams["run_record/overrides"] == "(none)" and hparams["run_record/data/train/size"] == 16
    )
    metrics = (Path(logger.log_dir) / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "run_record/steps" in metrics and "run_record/duration_s" in metrics
    assert (tmp_path / "run_record" / "record.yaml").is_file()  # no logger uploads files


def test_recorded_run_name_is_the_mlflow_runs_own(tmp_path: Path) -> None:
    """A config read again at setup resolves ``${now:...}`` later than the logger did: the param
    and config.yaml must carry the name the MLflow run was created with."""
    from lightning.pytorch.loggers import MLFlowLogger
    from mlflow import MlflowClient
    from omegaconf import OmegaConf

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow_logger = MLFlowLogger(
        experiment_name="names",
        tracking_uri=uri,
        run_name="train-18-46-10",
        artifact_location=str(tmp_path / "art"),
    )
    node = {"_target_": "lightning.pytorch.loggers.MLFlowLogger", "run_name": "train-18-46-22"}
    config = OmegaConf.create({"logger": {"mlflow": node}})
    callback = RunRecord(
        git=False, packages=False, model=False, config=config, output_dir=tmp_path / "record"
    )
    model = LitClassifier(Encoder(4, 8), Head(8, 3))
    fit = trainer(tmp_path, logger=[mlflow_logger], callbacks=[callback])
    fit.fit(model, DataLoader(data(), batch_size=8))
    run = MlflowClient(uri).get_run(mlflow_logger.run_id)
    assert run.info.run_name == "train-18-46-10"
    assert run.data.params["config/logger/mlflow/run_name"] == "train-18-46-10"
    saved = yaml.safe_load((tmp_path / "record" / "config.yaml").read_text())
    assert saved["logger"]["mlflow"]["run_name"] == "train-18-46-10"
    assert any("train-18-46-22" in note for note in callback.record["config"]["notes"])


class _Streams(L.Callback):
    """Sees sys.stdout during training; optionally fails in setup, before fit starts."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.during: Any = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.fail:
            raise RuntimeError("setup failed")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.during = sys.stdout


def test_console_capture_is_opt_in_and_restored_when_setup_fails(tmp_path: Path) -> None:
    streams = (sys.stdout, sys.stderr)
    seen = _Streams()
    model = HydraLit(nn.Linear(4, 4), hidden=8)  # no explicit construction source
    callback = RunRecord(git=False, packages=False, output_dir=tmp_path / "plain")
    fit = trainer(tmp_path, logger=False, callbacks=[callback, seen], max_steps=1)
    with pytest.warns(RuntimeWarning, match="the model has no explicit construction") as caught:
        fit.fit(model, DataLoader(data(8), batch_size=8))
    assert seen.during is streams[0]  # capture_output=False: sys.stdout is never replaced
    assert sum("construction record" in str(w.message) for w in caught) == 1
    entry = callback.record["model"]
    assert (entry["source"], entry["rebuild_checked"]) == ("none", None)
    model_yaml = yaml.safe_load((tmp_path / "plain" / "model.yaml").read_text())
    assert model_yaml["_target_"] == UNRECORDED_TARGET

    callback = RunRecord(
        capture_output=True, git=False, packages=False, model=False, output_dir=tmp_path / "failed"
    )
    with pytest.raises(RuntimeError, match="setup failed"):
        trainer(tmp_path, logger=False, callbacks=[callback, _Streams(fail=True)]).fit(
            model, DataLoader(data(8), batch_size=8)
        )
    assert (sys.stdout, sys.stderr) == streams
    assert yaml.safe_load((tmp_path / "failed" / "record.yaml").read_text())["status"] == "failed"


class _StuckHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A console handler that refuses a new stream."""

    def setStream(self, stream: Any) -> Any:  # logging's name
        raise OSError("stream is fixed")


def test_console_capture_that_cannot_start_leaves_the_streams_alone(tmp_path: Path) -> None:
    streams = (sys.stdout, sys.stderr)
    handler = _StuckHandler(sys.stdout)
    logger = logging.getLogger("run_record_test_stuck")
    logger.addHandler(handler)
    seen = _Streams()
    callback = RunRecord(
        capture_output=True, git=False, packages=False, model=False, output_dir=tmp_path
    )
    fit = trainer(tmp_path, logger=False, callbacks=[callback, seen], max_steps=1)
    try:
        with pytest.warns(RuntimeWarning, match="could not record the console output .*is fixed"):
            fit.fit(HydraLit(nn.Linear(4, 4), hidden=8), DataLoader(data(8), batch_size=8))
    finally:
        logger.removeHandler(handler)
    assert seen.during is streams[0] and (sys.stdout, sys.stderr) == streams
    assert callback.record["status"] == "finished"

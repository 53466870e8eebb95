"""RunRecord: everything needed to trust, compare and rebuild a training run, logged once per fit."""

from __future__ import annotations

import dataclasses
import datetime
import math
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info

from lightning_inspect import _validation as check
from lightning_inspect import backends as bk
from lightning_inspect.errors import ConfigError
from lightning_inspect.record import config as conf
from lightning_inspect.record import environment as env
from lightning_inspect.record.console import ConsoleCapture
from lightning_inspect.record.construction import HOW_TO_RECORD, construction_record
from lightning_inspect.record.data import fingerprint_loaders
from lightning_inspect.record.secrets import SecretMasker

__all__ = ["RunRecord"]

#: Prefix of every key the record logs, and the folder of its files.
PREFIX = "run_record"
_BACKENDS = ("tensorboard", "mlflow")
_FLAGS = ("git", "git_diff", "packages", "config_params", "model", "verify_model")
#: Files also shown as text pages (``run_record/config``, ``run_record/git_diff``, ...).
_PAGES = ("config.yaml", "overrides.yaml", "model.yaml", "datamodule.yaml", "git.diff")
_TEXT_CHARS = 200_000


@dataclasses.dataclass
class _Fit:
    """State of one fit; ``sinks``: (logger, its guarded sink)."""

    sinks: list[tuple[Any, bk.GuardedSink]]
    output_dir: Path
    temporary: bool
    config: conf.ConfigRecord
    model_key: str | None
    deadline: bk.EndOfFit
    start_wall: float = dataclasses.field(default_factory=time.time)
    start_perf: float = dataclasses.field(default_factory=time.perf_counter)
    train_start: float | None = None
    train_end: float | None = None
    start_step: int = 0
    end_step: int | None = None
    capture: ConsoleCapture | None = None
    files: dict[str, Path] = dataclasses.field(default_factory=dict)
    texts: dict[str, str] = dataclasses.field(default_factory=dict)  # as written, cut for a page


class RunRecord(Callback):
    """Record the git state and diff, seed, machine, software, resolved config, hyperparameters,
    the model's construction record, a data fingerprint and the outcome, once per fit.

    Sent from global rank 0 to every attached logger; secrets are masked; faults warn once and
    never stop training. The arguments, and the tags, params, metrics, pages and files logged
    under ``run_record/``: docs/run_record.md.

    Example:
        >>> import lightning as L
        >>> trainer = L.Trainer(callbacks=[RunRecord(env_vars=["SLURM_JOB_ID"], capture_output=True)])
    """

    def __init__(
        self,
        *,
        git: bool = True,
        git_diff: bool = True,
        repo_dir: str | os.PathLike[str] | None = None,
        git_timeout: float = 10.0,
        env_vars: Sequence[str] | str | None = (),
        packages: bool = True,
        config: Mapping[str, Any] | None = None,
        overrides: Sequence[str] | None = None,
        config_params: bool = True,
        model: bool = True,
        model_key: str | None = None,
        verify_model: bool = True,
        fingerprint_items: int = 32,
        capture_output: bool = False,
        output_dir: str | os.PathLike[str] | None = None,
        mask_keys: Sequence[str] | str | None = (),
        unmask_keys: Sequence[str] | str | None = (),
        backends: str | Sequence[str] | None = None,
        enabled: bool = True,
    ) -> None:
        owner, given, path = type(self).__name__, dict(locals()), (str, os.PathLike)
        for name in (*_FLAGS, "capture_output", "enabled"):
            setattr(self, name, check.check_bool(owner, name, given[name]))
        is_dir = isinstance(repo_dir, path) and Path(repo_dir).is_dir()
        for name, ok, allowed in [
            ("repo_dir", is_dir, "an existing directory"),
            ("config", isinstance(config, Mapping), "a DictConfig or a mapping"),
            ("model_key", isinstance(model_key, str) and model_key, "a dotted key such as 'model'"),
            ("output_dir", isinstance(output_dir, path), "a directory path"),
        ]:
            if given[name] is not None and not ok:
                raise ConfigError(f"{owner}({name}={given[name]!r}): expected None or {allowed}.")
        self.repo_dir, self.config, self.model_key = repo_dir, config, model_key
        self.output_dir, self.backends = output_dir, backends
        self.git_timeout = check.check_number(owner, "git_timeout", git_timeout, 0, math.inf, "(]")
        self.env_vars = check.as_str_list(owner, "env_vars", env_vars)
        if overrides is not None:
            overrides = check.as_str_list(owner, "overrides", overrides)
        self.overrides = overrides
        items = check.check_positive_int(owner, "fingerprint_items", fingerprint_items, 0)
        self.fingerprint_items = items
        masks = (tuple(check.as_str_list(owner, n, given[n])) for n in ("mask_keys", "unmask_keys"))
        self.masker = SecretMasker(*masks)
        if backends is not None:
            self.backends = check.check_choices(owner, "backends", backends, _BACKENDS, _BACKENDS)
        #: The last fit's record (plain values), also written as ``record.yaml``.
        self.record: dict[str, Any] = {}
        self._fit: _Fit | None = None
        self._warned: set[str] = set()
        self._launch_config: conf.ConfigRecord | None = None  # in copies pickled for spawned ranks

    def __getstate__(self) -> dict[str, Any]:
        """Pickled for ``ddp_spawn``: the launching Hydra app's config travels to the ranks."""
        state = self.__dict__.copy()
        if self.config is None and self._launch_config is None and self.enabled:
            launch = self._collect("configuration", conf.config_record, None, self.overrides)
            state["_launch_config"] = launch if launch and launch.source == "hydra" else None
        return state

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or not self.enabled or not trainer.is_global_zero:
            return
        if self._fit is not None:
            self._finish(trainer, "interrupted", None)
        chosen = bk.select_loggers(trainer, self.backends, "RunRecord")
        loggers = [(logger, bk.logger_sink(name, logger)) for name, logger in chosen]
        args = (self.config, self.overrides, trainer.callbacks)
        config = self._launch_config or self._collect("configuration", conf.config_record, *args)
        config = config or conf.ConfigRecord(notes=["the configuration could not be read"])
        key = self._model_key(config, pl_module)
        output_dir, temporary = self._output_dir(trainer, [s for _, s in loggers], config)
        sinks = [(lg, bk.GuardedSink(s, output_dir, owner="RunRecord")) for lg, s in loggers]
        fit = _Fit(sinks, output_dir, temporary, config, key, bk.EndOfFit.for_fit(trainer))
        self.record = {"status": "running"}
        if self.capture_output:
            capture = ConsoleCapture(output_dir / "output.log")
            fit.capture = self._collect("console output", capture.start)
        self._fit = fit

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._fit is not None:
            self._collect("run record", self._log_start, self._fit, trainer, pl_module)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._fit is not None:
            self._fit.train_start, self._fit.start_step = time.perf_counter(), trainer.global_step
            self._collect("data fingerprint", self._log_data, self._fit, trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._fit is not None:
            self._fit.train_end, self._fit.end_step = time.perf_counter(), trainer.global_step

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        status = "interrupted" if isinstance(exception, KeyboardInterrupt) else "failed"
        self._finish(trainer, status, exception)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._finish(trainer, "finished", None)

    def _model_key(self, config: conf.ConfigRecord, pl_module: pl.LightningModule) -> str | None:
        """The config key holding the model's ``_target_`` node (checked when given)."""
        if not self.model or self.model_key is None:
            return conf.find_target(config.config, type(pl_module), "model") if self.model else None
        node = conf.node_at(config.config, self.model_key)
        if isinstance(node, Mapping) and "_target_" in node:
            return self.model_key
        where = "a config, but none was found (pass config= or run inside a Hydra app)"
        if config.config is not None:
            where = f"the recorded config (top-level keys: {sorted(config.config)})"
        raise ConfigError(
            f"RunRecord(model_key={self.model_key!r}): expected the dotted key of a node with "
            f"a _target_ in {where}."
        )

    def _output_dir(
        self, trainer: pl.Trainer, sinks: list[Any], config: conf.ConfigRecord
    ) -> tuple[Path, bool]:
        tensorboard = bk.attached_loggers(trainer).get("tensorboard")
        path, temporary = Path(trainer.default_root_dir) / PREFIX, False
        if self.output_dir is not None:
            path = Path(self.output_dir)
        elif tensorboard is not None and "tensorboard" in {s.name for s in sinks}:
            path = Path(tensorboard.log_dir) / PREFIX
        elif config.source == "hydra" and config.output_dir:
            path = Path(config.output_dir) / PREFIX
        elif sinks and all(hasattr(s, "log_files") for s in sinks):
            path, temporary = Path(tempfile.mkdtemp(prefix="lightning_inspect_run_record_")), True
        else:
            rank_zero_info(f"RunRecord: no TensorBoard or MLflow logger; files go to {path}.")
        path.mkdir(parents=True, exist_ok=True)
        return path, temporary

    def _warn(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(f"RunRecord: {message}", RuntimeWarning, stacklevel=3)

    def _collect(self, what: str, fn: Any, *args: Any) -> Any:
        """Run one step of the record; a fault warns once and the record goes on without it."""
        try:
            return fn(*args)
        except Exception as exc:
            why = f"{type(exc).__name__}: {exc}"
            self._warn(what, f"could not record the {what} ({why}). Training continues.")
            return None

    @staticmethod
    def _write(fit: _Fit, name: str, value: Any) -> None:
        """A file of the record: ``value`` as it is (a string) or as YAML."""
        fit.files[name] = fit.output_dir / name
        text = value if isinstance(value, str) else conf.dump_yaml(value)
        fit.files[name].write_text(text, encoding="utf-8")
        fit.texts[name] = text[: _TEXT_CHARS + 1]  # a page shows this much (_text cuts the rest)

    @staticmethod
    def _emit(fit: _Fit, method: str, *args: Any) -> list[Any]:
        """``method`` on every sink that has it, ``None`` values left out of a mapping."""
        if args and isinstance(args[0], Mapping):
            args = ({k: v for k, v in args[0].items() if v is not None}, *args[1:])
        return [sink.call(method, *args) for _, sink in fit.sinks if hasattr(sink.inner, method)]

    @staticmethod
    def _text(fit: _Fit, page: str, value: Any, step: int) -> None:
        """A text page (``value`` as it is or as YAML); loggers that keep the files get none."""
        text = value if isinstance(value, str) else conf.dump_yaml(value)
        if len(text) > _TEXT_CHARS:
            text = f"{text[:_TEXT_CHARS]}\n... [cut at {_TEXT_CHARS} characters; see the file]"
        lang = {"git_diff": "diff", "packages": "text"}.get(page, "yaml")
        for _, sink in fit.sinks:
            if not hasattr(sink.inner, "log_files"):
                sink.call("log_text", f"{PREFIX}/{page}", f"````{lang}\n{text}\n````", step)

    def _save(self, fit: _Fit, upload: list[Path] | None = None) -> None:
        """Write ``record.yaml``; send it with ``upload`` to the loggers that keep files."""
        self._write(fit, "record.yaml", self.record)
        if upload is not None:
            self._emit(fit, "log_files", [*upload, fit.files["record.yaml"]], PREFIX)
        self._emit(fit, "flush")

    def _params(self, fit: _Fit, values: Mapping[str, Any]) -> None:
        found = self._emit(fit, "log_params", values)  # MLflow: the keys that held other values
        if conflicts := sorted({k for keys in found for k in keys or ()}):
            self._warn(
                "params",
                "these parameters already hold other values in the MLflow run, which keeps the "
                f"first: {conflicts[:10]}. The values of this fit are in record.yaml.",
            )

    def _log_start(self, fit: _Fit, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        masker, record, start = self.masker, self.record, _iso(fit.start_wall)
        command = masker.command([sys.executable, *sys.argv])
        args = (self.env_vars, masker, self.packages)
        found = self._collect("environment", env.environment, *args) or {}
        record.update(command=command, cwd=os.getcwd(), time={"start": start})
        record["seed"] = found.get("seed", {})
        tags = {"start_time": start, "status": "running", "command": " ".join(command)}
        if self.git:
            tags.update(self._log_git(fit))
        record["host"] = host = found.get("host", {})
        host.update(accelerator=type(trainer.accelerator).__name__, devices=trainer.num_devices)
        host.update(nodes=trainer.num_nodes, world_size=trainer.world_size)
        host.update(strategy=type(trainer.strategy).__name__, precision=str(trainer.precision))
        record["versions"] = found.get("versions", {})
        tags.update({**host, **record["versions"]})
        if found.get("packages") is not None:
            self._write(fit, "packages.txt", "\n".join(found["packages"]) + "\n")
        if self.env_vars:
            record["env"] = found.get("env", {})
            tags.update({f"env/{k}": v for k, v in record["env"].items()})
        params = self._log_config(fit, trainer)
        hparams = self._collect("hyperparameters", _module_hparams, pl_module, trainer)
        hparams = masker.mask(hparams or {})
        if hparams:
            self._write(fit, "hparams.yaml", hparams)
        owners = {"model": pl_module, "datamodule": getattr(trainer, "datamodule", None)}
        for what, obj in owners.items() if self.model else ():
            if obj is not None:
                tags.update(self._construction(fit, what, obj))

        tags = {f"{PREFIX}/{k}": v for k, v in tags.items()}
        self._emit(fit, "log_tags", tags)
        self._params(fit, params)
        # TensorBoard keeps the first HPARAMS entry of a run: this one, written before Lightning's
        # own, carries the module's hyperparameters too.
        shown = {k: v for k, v in tags.items() if "/env/" not in k and not k.endswith("/command")}
        for logger, sink in fit.sinks:
            if hasattr(sink.inner, "log_hparams"):  # compared on these scalars
                default = ["hp_metric"] if getattr(logger, "_default_hp_metric", False) else []
                metrics = [*default, f"{PREFIX}/steps_per_s", f"{PREFIX}/duration_s"]
                sink.call("log_hparams", {**conf.flatten(hparams), **params, **shown}, metrics)
        self._text(fit, "summary", record, trainer.global_step)
        for name in (n for n in (*_PAGES, "packages.txt") if n in fit.files):
            page = name.replace(".diff", "_diff").split(".")[0]
            self._text(fit, page, fit.texts[name], trainer.global_step)
        self._save(fit, list(fit.files.values()))

    def _log_git(self, fit: _Fit) -> dict[str, Any]:
        args = (self.repo_dir, self.git_timeout, self.git_diff)
        info = self._collect("git state", env.git_info, *args)
        info = info or env.GitInfo(notice="the git state could not be read")
        self.record["git"] = {k: v for k, v in vars(info).items() if k != "diff"}
        if info.diff:
            self._write(fit, "git.diff", info.diff)
        if info.commit is None:
            self._warn("git", f"no git commit is recorded: {info.notice}. Training continues.")
        tags = {"commit": info.commit, "branch": info.branch, "dirty": _flag(info.dirty)}
        tags.update(untracked=info.commit and str(len(info.untracked)), notice=info.notice)
        return {f"git/{k}": v for k, v in tags.items()}

    def _log_config(self, fit: _Fit, trainer: pl.Trainer) -> dict[str, Any]:
        """Write the config's files; its params."""
        config = fit.config
        self._collect("MLflow run name", _record_run_name, config, trainer)
        overrides = [self.masker.override(o) for o in config.overrides]
        self.record["config"] = {"source": config.source, "overrides": overrides}
        self.record["config"].update(choices=config.choices, notes=config.notes)
        params = {f"{PREFIX}/seed": self.record["seed"].get("seed")}
        params[f"{PREFIX}/overrides"] = " ".join(overrides) or "(none)"
        params.update({f"choices/{k}": v for k, v in config.choices.items()})
        if config.config is not None:
            masked = self.masker.mask(config.config)
            self._write(fit, "config.yaml", masked)
            params.update(conf.flatten(masked, "config") if self.config_params else {})
        if config.source != "none":
            self._write(fit, "overrides.yaml", overrides)
        return params

    def _construction(self, fit: _Fit, what: str, obj: Any) -> dict[str, Any]:
        """Write ``<what>.yaml`` (the model's or the datamodule's); its tags."""
        key, config = fit.model_key, fit.config.config
        if what != "model":
            key = conf.find_target(config, type(obj), what)
        node = conf.node_at(config, key) if key else None
        args = (obj, node, key or what, self.verify_model and what == "model")
        found = self._collect(f"{what} construction", construction_record, *args)
        if found is None:
            return {}
        found.config = self.masker.mask(found.config)
        self._write(fit, f"{what}.yaml", found.to_yaml(what))
        cls = f"{type(obj).__module__}.{type(obj).__qualname__}"
        entry = {"class": cls, "source": found.source, "rebuild_checked": found.verified}
        self.record[what] = {**entry, "notes": found.notes, "file": f"{what}.yaml"}
        if isinstance(obj, torch.nn.Module):
            total = sum(p.numel() for p in obj.parameters())
            trainable = sum(p.numel() for p in obj.parameters() if p.requires_grad)
            self.record[what].update(parameters=total, trainable_parameters=trainable)
        if found.source == "none":
            why = f"so {what}.yaml holds a placeholder: {HOW_TO_RECORD}"
            self._warn(f"{what} record", f"the {what} has no explicit construction record, {why}.")
        elif found.verified is False:
            failed = next((n for n in found.notes if n.startswith("rebuild check failed")), "")
            self._warn(
                f"{what} record",
                f"the {what}'s construction record does not rebuild the same {what} ({failed}). "
                f"It is still written to {what}.yaml; for an exact record, {HOW_TO_RECORD}.",
            )
        entry["rebuild_checked"] = _flag(found.verified)
        return {f"{what}/{k}": v for k, v in entry.items()}

    def _log_data(self, fit: _Fit, trainer: pl.Trainer) -> None:
        loaders = {"train": trainer.train_dataloader, "val": trainer.val_dataloaders}
        self.record["data"] = data = fingerprint_loaders(loaders, self.fingerprint_items)
        for name, note in ((n, e["note"]) for n, e in data.items() if e.get("note")):
            self._warn(f"data {name}", f"the {name} data fingerprint is incomplete: {note}.")
        fields = ("size", "batches", "batch_size", "hash")
        params = {f"{PREFIX}/data/{n}/{f}": e.get(f) for n, e in data.items() for f in fields}
        self._params(fit, params)
        self._text(fit, "data", data, trainer.global_step)
        self._save(fit)

    def _finish(self, trainer: pl.Trainer, status: str, exception: BaseException | None) -> None:
        fit, self._fit = self._fit, None
        if fit is None:
            return
        for _, sink in fit.sinks:
            sink.deadline = fit.deadline
        try:
            self._collect("outcome", self._log_end, fit, trainer, status, exception)
        finally:
            if fit.capture is not None:
                self._collect("console output", fit.capture.stop)
            log = [fit.capture.path] if fit.capture is not None else []
            self._collect("record files", self._save, fit, log)
            if fit.temporary and not any(sink.failed for _, sink in fit.sinks):
                shutil.rmtree(fit.output_dir, ignore_errors=True)

    def _log_end(
        self, fit: _Fit, trainer: pl.Trainer, status: str, exception: BaseException | None
    ) -> None:
        now, record = time.perf_counter(), self.record
        end_step = trainer.global_step if fit.end_step is None else fit.end_step
        steps = max(end_step - fit.start_step, 0) if fit.train_start is not None else 0
        train_s = (fit.train_end or now) - fit.train_start if fit.train_start is not None else 0.0
        times = record.setdefault("time", {"start": _iso(fit.start_wall)})
        times.update(end=_iso(time.time()), duration_s=round(now - fit.start_perf, 3))
        times.update(train_duration_s=round(train_s, 3), steps=steps)
        times["steps_per_s"] = round(steps / train_s, 4) if train_s > 0 and steps else None
        record["memory"] = memory = self._collect("peak memory", env.peak_memory) or {}
        record["status"] = status
        if exception is not None:
            first = (str(exception).splitlines() or [""])[0]
            record["error"] = self.masker.text(f"{type(exception).__name__}: {first}")
        metrics = {k: times[k] for k in ("duration_s", "train_duration_s", "steps", "steps_per_s")}
        metrics.update({k.replace("_bytes", "_mib"): v and v / 2**20 for k, v in memory.items()})
        end = {"status": status, "end_time": times["end"], "error": record.get("error")}
        self._emit(fit, "log_tags", {f"{PREFIX}/{k}": v for k, v in end.items()})
        metrics = {f"{PREFIX}/{k}": v for k, v in metrics.items()}
        self._emit(fit, "log_scalars", metrics, trainer.global_step)
        result = {k: record.get(k) for k in ("status", "error", "time", "memory")}
        self._text(fit, "result", result, trainer.global_step)


def _flag(value: bool | None) -> str | None:
    return None if value is None else str(value).lower()


def _iso(timestamp: float) -> str:
    return datetime.datetime.fromtimestamp(timestamp).astimezone().isoformat(timespec="seconds")


def _record_run_name(config: conf.ConfigRecord, trainer: pl.Trainer) -> None:
    """Put the MLflow run's own name in its logger's config node: read again, a ``${now:...}``
    in ``run_name`` would give a later time than the run was created with."""
    logger = bk.attached_loggers(trainer).get("mlflow")
    key = conf.find_target(config.config, type(logger), "logger.mlflow") if logger else None
    node = conf.node_at(config.config, key)
    if key is None or not isinstance(node, dict) or "run_name" not in node:
        return
    name = logger.experiment.get_run(logger.run_id).info.run_name
    if node["run_name"] != name:
        was = f"{key}.run_name: {node['run_name']!r} when read again"
        config.notes.append(f"{was}; recorded as the run's name {name!r}")
        node["run_name"] = name


def _module_hparams(pl_module: pl.LightningModule, trainer: pl.Trainer) -> dict[str, Any]:
    """The hyperparameters Lightning logs itself: the module's and the datamodule's."""
    hparams: dict[str, Any] = {}
    for owner in (pl_module, getattr(trainer, "datamodule", None)):
        hparams.update(conf.to_plain(dict(getattr(owner, "hparams", None) or {})))
    return hparams

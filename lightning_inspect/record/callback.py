"""RunRecord: everything needed to trust, compare and rebuild a training run, logged once per fit."""

from __future__ import annotations

import dataclasses
import datetime
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

from lightning_inspect._validation import as_str_list, check_bool, check_choices, check_positive_int
from lightning_inspect.backends import (
    EndOfFit,
    GuardedSink,
    Sink,
    attached_loggers,
    logger_sink,
    select_loggers,
)
from lightning_inspect.errors import ConfigError
from lightning_inspect.record import config as conf
from lightning_inspect.record import environment as env
from lightning_inspect.record.config import ConfigRecord
from lightning_inspect.record.console import ConsoleCapture
from lightning_inspect.record.construction import HOW_TO_RECORD, construction_record
from lightning_inspect.record.data import fingerprint_loaders
from lightning_inspect.record.git import GitInfo, git_info
from lightning_inspect.record.secrets import SecretMasker

__all__ = ["RunRecord"]

#: Where the record's files go in MLflow (next to the monitors' ``lightning_inspect/`` artifacts).
ARTIFACT_PATH = "lightning_inspect/run_record"
#: Prefix of every key the record logs (tags, params, metrics, TensorBoard text).
PREFIX = "run_record"
_BACKENDS = ("tensorboard", "mlflow")
_TEXT_CHARS = 200_000


# --------------------------------------------------------------------------------------------
# Backends: the record's calls on each attached logger's sink (lightning_inspect.backends)
# --------------------------------------------------------------------------------------------

#: The record's calls and the Sink methods that make them (a sink without one skips it).
_CALLS = {"tags": "log_tags", "params": "log_params", "metrics": "log_scalars", "text": "log_text"}
_CALLS.update(files="log_files", hparams="log_hparams", flush="flush")


class _Writer:
    """One attached logger and its sink."""

    def __init__(self, logger: Any, sink: Sink) -> None:
        self.logger, self.sink, self.name = logger, sink, sink.name


class _TensorBoardWriter(_Writer):
    """Its logger's directory keeps the record's files (``<log_dir>/run_record``)."""


class _Guarded(GuardedSink):
    """A writer's sink behind the backends' guard (fallback file next to the record's files)."""

    def __init__(self, inner: _Writer, where: Path) -> None:
        super().__init__(inner.sink, fallback_dir=where, owner="RunRecord")
        self.writer = inner

    def __call__(self, method: str, *args: Any) -> Any:
        name = _CALLS.get(method, "")  # end_of_fit: nothing to do, calls are bounded from the start
        if not hasattr(self.inner, name) or (method == "text" and hasattr(self.inner, "log_files")):
            return None  # a logger that takes the files needs no text pages of them
        if method in ("tags", "params", "metrics"):  # None: no value
            args = ({k: v for k, v in args[0].items() if v is not None}, *args[1:])
        elif method == "files":
            args = (args[0], "run_record")
        elif method == "hparams":  # compared on these scalars in TensorBoard's HPARAMS tab
            default = (
                ["hp_metric"] if getattr(self.writer.logger, "_default_hp_metric", False) else []
            )
            args = (args[0], [*default, f"{PREFIX}/steps_per_s", f"{PREFIX}/duration_s"])
        return self.call(name, *args)


@dataclasses.dataclass
class _Fit:
    """State of one fit."""

    writers: list[_Guarded]
    output_dir: Path
    temporary: bool
    config: ConfigRecord
    model_key: str | None
    deadline: EndOfFit
    start_wall: float = dataclasses.field(default_factory=time.time)
    start_perf: float = dataclasses.field(default_factory=time.perf_counter)
    train_start: float | None = None
    train_end: float | None = None
    start_step: int = 0
    end_step: int | None = None
    capture: ConsoleCapture | None = None
    files: dict[str, Path] = dataclasses.field(default_factory=dict)
    started: bool = False
    data_done: bool = False


class RunRecord(Callback):
    """Record everything needed to trust, compare and rebuild a training run, once per fit.

    On global rank 0, to every attached backend: the git state and diff, the seed, the machine and
    software (``torch.utils.collect_env``), the resolved config with its overrides and choices,
    the hyperparameters, a construction record that rebuilds the model and datamodule (explicit
    sources only), a data fingerprint, and at the end the outcome, durations and peak memory.
    Secrets are masked; faults warn once and never stop training. See docs/run_record.md.

    Args:
        git: record the git state.
        git_diff: record the uncommitted diff as ``git.diff``.
        repo_dir: a directory inside the repository; ``None``: the working directory.
        git_timeout: seconds each git command may take.
        env_vars: environment variable names or globs to record (no others are).
        packages: record the installed packages as ``packages.txt``.
        config: the run's config (DictConfig or mapping); ``None``: from Hydra, else LightningCLI.
        overrides: the command-line overrides; ``None``: from Hydra (or ``config``'s hydra node).
        config_params: also log the flattened config as params / hparams (``config/<path>``).
        model: record how the model (and datamodule) were built, as ``model.yaml``.
        model_key: dotted key of the model's ``_target_`` node; ``None``: found by its class.
        verify_model: check that the record rebuilds the same modules and shapes (meta device).
        fingerprint_items: items per dataset hashed for the data fingerprint (0: sizes only).
        capture_output: opt in to tee ``sys.stdout``/``sys.stderr`` (and console logging
            handlers) into ``output.log`` for the fit; ``False``: nothing is patched.
        output_dir: where the files go; ``None``: ``<TensorBoard log_dir>/run_record``, else
            ``<Hydra run dir>/run_record``, else a temporary directory for MLflow, else
            ``<default_root_dir>/run_record``.
        mask_keys: more key globs whose values are masked.
        unmask_keys: key globs never masked, e.g. ``["pad_token"]``.
        backends: ``"tensorboard"``, ``"mlflow"`` or a list; ``None``: every attached one.
        enabled: ``False`` records nothing.

    Logged metrics:
        Tags ``run_record/{git/*,host,cpu,gpu,torch,...,status}``; params ``run_record/seed``,
        ``run_record/overrides``, ``run_record/data/<loader>/{size,batches,batch_size,hash}``,
        ``choices/<group>``, ``config/<path>``; metrics ``run_record/{duration_s,steps,
        steps_per_s,peak_rss_mib,...}``; files under ``lightning_inspect/run_record/``;
        TensorBoard text ``run_record/{summary,config,model,git_diff,data,result,...}``, HPARAMS.

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
            setattr(self, name, check_bool(owner, name, given[name]))
        number = isinstance(git_timeout, (int, float)) and not isinstance(git_timeout, bool)
        checks = {
            "repo_dir": (
                isinstance(repo_dir, path) and Path(repo_dir).is_dir(),
                "an existing directory",
            ),
            "git_timeout": (number and git_timeout > 0, "a number of seconds > 0"),
            "config": (isinstance(config, Mapping), "a DictConfig or a mapping"),
            "model_key": (
                isinstance(model_key, str) and model_key != "",
                "a dotted key such as 'model'",
            ),
            "output_dir": (isinstance(output_dir, path), "a directory path"),
        }
        for name, (ok, expected) in checks.items():
            if not ok and (name == "git_timeout" or given[name] is not None):
                none = "" if name == "git_timeout" else "None or "
                raise ConfigError(f"{owner}({name}={given[name]!r}): expected {none}{expected}.")
        self.repo_dir, self.git_timeout, self.config = repo_dir, float(git_timeout), config
        self.model_key, self.output_dir = model_key, output_dir
        self.env_vars = as_str_list(owner, "env_vars", env_vars)
        self.overrides = None if overrides is None else as_str_list(owner, "overrides", overrides)
        self.fingerprint_items = check_positive_int(
            owner, "fingerprint_items", fingerprint_items, 0
        )
        masks = (tuple(as_str_list(owner, n, given[n])) for n in ("mask_keys", "unmask_keys"))
        self.masker = SecretMasker(*masks)
        self.backends = (
            None
            if backends is None
            else check_choices(owner, "backends", backends, _BACKENDS, _BACKENDS)
        )
        #: The last fit's record (plain values), also written as ``record.yaml``.
        self.record: dict[str, Any] = {}
        self._fit: _Fit | None = None
        self._warned: set[str] = set()
        self._launch_config: ConfigRecord | None = None  # set in copies pickled for spawned ranks

    def __getstate__(self) -> dict[str, Any]:
        """Pickled for ``ddp_spawn``: the ranks run no Hydra app; the launching app's config
        travels with the callback."""
        state = self.__dict__.copy()
        if self.config is None and self._launch_config is None and self.enabled:
            launch = self._collect("configuration", conf.config_record, None, self.overrides)
            state["_launch_config"] = launch if launch and launch.source == "hydra" else None
        return state

    # ---------------------------------------------------------------- Lightning hooks (thin)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or not self.enabled or not trainer.is_global_zero:
            return
        if self._fit is not None:
            self._finish(trainer, "interrupted", None)
        writers = self._writers(trainer)
        config = self._launch_config or self._collect(
            "configuration", conf.config_record, self.config, self.overrides, trainer.callbacks
        )
        config = config or ConfigRecord(notes=["the configuration could not be read"])
        key = self._model_key(config, pl_module)
        output_dir, temporary = self._output_dir(trainer, writers, config)
        guarded = [_Guarded(w, output_dir) for w in writers]
        fit = _Fit(guarded, output_dir, temporary, config, key, EndOfFit.for_fit(trainer))
        self.record = {"status": "running"}
        if self.capture_output:
            capture = ConsoleCapture(output_dir / "output.log")
            fit.capture = self._collect("console output", capture.start)
        self._fit = fit

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._fit is not None and not self._fit.started:
            self._fit.started = True
            self._collect("run record", self._log_start, self._fit, trainer, pl_module)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        fit = self._fit
        if fit is not None:
            fit.train_start, fit.start_step = time.perf_counter(), trainer.global_step
            if not fit.data_done:
                fit.data_done = True
                self._collect("data fingerprint", self._log_data, fit, trainer)

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

    # ---------------------------------------------------------------- set-up helpers

    def _writers(self, trainer: pl.Trainer) -> list[_Writer]:
        loggers = select_loggers(trainer, self.backends, "RunRecord")
        return [
            (_TensorBoardWriter if name == "tensorboard" else _Writer)(lg, logger_sink(name, lg))
            for name, lg in loggers
        ]

    def _model_key(self, config: ConfigRecord, pl_module: pl.LightningModule) -> str | None:
        """The config key holding the model's ``_target_`` node (checked when given)."""
        if not self.model or self.model_key is None:
            return conf.find_target(config.config, type(pl_module), "model") if self.model else None
        node = conf.node_at(config.config, self.model_key)
        if not isinstance(node, Mapping) or "_target_" not in node:
            where = (
                f"the recorded config (top-level keys: {sorted(config.config)})"
                if config.config is not None
                else "a config, but none was found (pass config= or run inside a Hydra app)"
            )
            raise ConfigError(
                f"RunRecord(model_key={self.model_key!r}): expected the dotted key of a node with "
                f"a _target_ in {where}."
            )
        return self.model_key

    def _output_dir(
        self, trainer: pl.Trainer, writers: list[Any], config: ConfigRecord
    ) -> tuple[Path, bool]:
        tensorboard = attached_loggers(trainer).get("tensorboard")
        path, temporary = Path(trainer.default_root_dir) / "run_record", False
        if self.output_dir is not None:
            path = Path(self.output_dir)
        elif tensorboard is not None and "tensorboard" in {w.name for w in writers}:
            path = Path(tensorboard.log_dir) / "run_record"
        elif config.source == "hydra" and config.output_dir:
            path = Path(config.output_dir) / "run_record"
        elif writers and all(hasattr(w.sink, "log_files") for w in writers):
            path, temporary = Path(tempfile.mkdtemp(prefix="lightning_inspect_run_record_")), True
        else:
            rank_zero_info(
                f"RunRecord: no TensorBoard or MLflow logger; the record goes to {path}."
            )
        path.mkdir(parents=True, exist_ok=True)
        return path, temporary

    # ---------------------------------------------------------------- the record

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
    def _write(fit: _Fit, name: str, text: str) -> None:
        fit.files[name] = fit.output_dir / name
        fit.files[name].write_text(text, encoding="utf-8")

    @staticmethod
    def _emit(fit: _Fit, method: str, *args: Any) -> list[Any]:
        return [writer(method, *args) for writer in fit.writers]

    def _params(self, fit: _Fit, values: Mapping[str, Any]) -> None:
        conflicts = sorted({k for found in self._emit(fit, "params", values) for k in found or ()})
        if conflicts:
            self._warn(
                "params",
                "these parameters already hold other values in the MLflow run, which keeps the "
                f"first: {conflicts[:10]}. The values of this fit are in record.yaml.",
            )

    def _log_start(self, fit: _Fit, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        masker, record, config = self.masker, self.record, fit.config
        command = masker.command([sys.executable, *sys.argv])
        record.update(command=command, cwd=os.getcwd(), time={"start": _iso(fit.start_wall)})
        record["seed"] = env.seed_info()
        tags: dict[str, Any] = {"start_time": record["time"]["start"], "status": "running"}
        params: dict[str, Any] = {"seed": record["seed"]["seed"]}
        if self.git:
            info = self._collect(
                "git state", git_info, self.repo_dir, self.git_timeout, self.git_diff
            )
            info = info or GitInfo(notice="the git state could not be read")
            record["git"] = info.summary()
            if info.diff:
                self._write(fit, "git.diff", info.diff)
            if info.commit is None:
                self._warn("git", f"no git commit is recorded: {info.notice}. Training continues.")
            dirty = None if info.dirty is None else str(info.dirty).lower()
            untracked = str(len(info.untracked)) if info.commit else None
            git = {"commit": info.commit, "branch": info.branch, "dirty": dirty}
            git.update(untracked=untracked, notice=info.notice)
            tags.update({f"git/{k}": v for k, v in git.items()})
        record["host"] = host = {
            **(self._collect("host", env.host_info) or {}),
            **_trainer_info(trainer),
        }
        record["versions"] = versions = self._collect("versions", env.version_info) or {}
        aliases = {"host": "hostname", "cpu": "cpu_model", "gpu": "gpu_model"}
        for key in ("host", "os", "cpu", "cpu_count", "gpu", "gpu_count", *_TRAINER_KEYS):
            tags[key] = host.get(aliases.get(key, key))
        tags.update({k: versions.get(k) for k in ("python", "torch", "lightning", "cuda", "cudnn")})
        tags["command"] = " ".join(command)
        lines = (
            self._collect("installed packages", env.installed_packages) if self.packages else None
        )
        if lines is not None:
            self._write(fit, "packages.txt", "\n".join(lines) + "\n")
        if self.env_vars:
            found = self._collect(
                "environment variables", env.env_var_values, self.env_vars, masker
            )
            record["env"] = found or {}
            tags.update({f"env/{k}": v for k, v in record["env"].items()})

        self._collect("MLflow run name", _record_run_name, config, trainer)
        overrides = [masker.override(o) for o in config.overrides]
        record["config"] = {"source": config.source, "overrides": overrides}
        record["config"].update(choices=config.choices, notes=config.notes)
        params["overrides"] = " ".join(overrides) or "(none)"
        params = {f"{PREFIX}/{k}": v for k, v in params.items()}
        params.update({f"choices/{k}": v for k, v in config.choices.items()})
        if config.config is not None:
            masked = masker.mask(config.config)
            self._write(fit, "config.yaml", conf.dump_yaml(masked))
            params.update(conf.flatten(masked, "config") if self.config_params else {})
        if config.source != "none":
            self._write(fit, "overrides.yaml", conf.dump_yaml(overrides))
        hparams = self._collect("hyperparameters", _module_hparams, pl_module, trainer)
        hparams = masker.mask(hparams or {})
        if hparams:
            self._write(fit, "hparams.yaml", conf.dump_yaml(hparams))
        if self.model:
            self._construction(fit, "model", pl_module, fit.model_key, self.verify_model, tags)
            datamodule = getattr(trainer, "datamodule", None)
            if datamodule is not None:
                key = conf.find_target(config.config, type(datamodule), "datamodule")
                self._construction(fit, "datamodule", datamodule, key, False, tags)

        tags = {f"{PREFIX}/{k}": v for k, v in tags.items()}
        self._emit(fit, "tags", tags)
        self._params(fit, params)
        # TensorBoard keeps the first HPARAMS entry of a run: this one, written before Lightning's
        # own, carries the module's hyperparameters too.
        shown = {k: v for k, v in tags.items() if "/env/" not in k and not k.endswith("/command")}
        self._emit(fit, "hparams", {**conf.flatten(hparams), **params, **shown})
        self._text(fit, "summary", conf.dump_yaml(record), trainer)
        for key, name in _TEXT_FILES.items():
            if name in fit.files:
                self._text(fit, key, fit.files[name].read_text(encoding="utf-8"), trainer)
        self._write(fit, "record.yaml", conf.dump_yaml(record))
        self._emit(fit, "files", list(fit.files.values()))
        self._emit(fit, "flush")

    def _text(self, fit: _Fit, key: str, text: str, trainer: pl.Trainer) -> None:
        if len(text) > _TEXT_CHARS:
            text = f"{text[:_TEXT_CHARS]}\n... [cut at {_TEXT_CHARS} characters; see the file]"
        lang = {"git_diff": "diff", "packages": "text"}.get(key, "yaml")
        self._emit(fit, "text", f"{PREFIX}/{key}", f"````{lang}\n{text}\n````", trainer.global_step)

    def _construction(
        self, fit: _Fit, what: str, obj: Any, key: str | None, verify: bool, tags: dict[str, Any]
    ) -> None:
        node = conf.node_at(fit.config.config, key) if key else None
        args = (obj, node, key or what, verify)
        found = self._collect(f"{what} construction", construction_record, *args)
        if found is None:
            return
        found.config = self.masker.mask(found.config)
        self._write(fit, f"{what}.yaml", found.to_yaml(what))
        cls = f"{type(obj).__module__}.{type(obj).__qualname__}"
        entry = {"class": cls, "source": found.source, "rebuild_checked": found.verified}
        self.record[what] = {**entry, "notes": found.notes, "file": f"{what}.yaml"}
        if isinstance(obj, torch.nn.Module):
            self.record[what]["parameters"] = sum(p.numel() for p in obj.parameters())
            trainable = sum(p.numel() for p in obj.parameters() if p.requires_grad)
            self.record[what]["trainable_parameters"] = trainable
        entry["rebuild_checked"] = None if found.verified is None else str(found.verified).lower()
        tags.update({f"{what}/{k}": v for k, v in entry.items()})
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

    def _log_data(self, fit: _Fit, trainer: pl.Trainer) -> None:
        loaders = {"train": trainer.train_dataloader, "val": trainer.val_dataloaders}
        self.record["data"] = data = fingerprint_loaders(loaders, self.fingerprint_items)
        for name, entry in data.items():
            if entry.get("note"):
                self._warn(
                    f"data {name}", f"the {name} data fingerprint is incomplete: {entry['note']}."
                )
        fields = ("size", "batches", "batch_size", "hash")
        params = {f"{PREFIX}/data/{n}/{f}": e.get(f) for n, e in data.items() for f in fields}
        self._params(fit, {k: v for k, v in params.items() if v is not None})
        self._text(fit, "data", conf.dump_yaml(data), trainer)
        self._write(fit, "record.yaml", conf.dump_yaml(self.record))
        self._emit(fit, "flush")

    def _finish(self, trainer: pl.Trainer, status: str, exception: BaseException | None) -> None:
        fit, self._fit = self._fit, None
        if fit is None:
            return
        for writer in fit.writers:
            writer.deadline = fit.deadline
        try:
            self._collect("outcome", self._log_end, fit, trainer, status, exception)
        finally:
            if fit.capture is not None:
                self._collect("console output", fit.capture.stop)
                fit.files["output.log"] = fit.capture.path
            self._collect("record files", self._upload_end, fit)

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
        self._emit(fit, "tags", {f"{PREFIX}/{k}": v for k, v in end.items()})
        metrics = {f"{PREFIX}/{k}": v for k, v in metrics.items()}
        self._emit(fit, "metrics", metrics, trainer.global_step)
        result = {k: record.get(k) for k in ("status", "error", "time", "memory")}
        self._text(fit, "result", conf.dump_yaml(result), trainer)

    def _upload_end(self, fit: _Fit) -> None:
        self._write(fit, "record.yaml", conf.dump_yaml(self.record))
        files = [fit.files[n] for n in ("record.yaml", "output.log") if n in fit.files]
        self._emit(fit, "files", files)
        self._emit(fit, "flush")
        if fit.temporary and not any(w.failed for w in fit.writers):
            shutil.rmtree(fit.output_dir, ignore_errors=True)


_FLAGS = ("git", "git_diff", "packages", "config_params", "model", "verify_model")
_TRAINER_KEYS = ("accelerator", "devices", "strategy", "precision")
#: TensorBoard text pages of the record's readable files.
_TEXT_FILES = {
    "config": "config.yaml",
    "overrides": "overrides.yaml",
    "model": "model.yaml",
    "datamodule": "datamodule.yaml",
    "git_diff": "git.diff",
    "packages": "packages.txt",
}


def _iso(timestamp: float) -> str:
    utc = datetime.datetime.fromtimestamp(timestamp, datetime.timezone.utc)
    return utc.astimezone().isoformat(timespec="seconds")


def _record_run_name(config: ConfigRecord, trainer: pl.Trainer) -> None:
    """Put the MLflow run's own name in its logger's config node: read again, a ``${now:...}``
    in ``run_name`` would give a later time than the run was created with."""
    logger = attached_loggers(trainer).get("mlflow")
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
    owners = (pl_module, getattr(trainer, "datamodule", None))
    return {
        k: v
        for o in owners
        if getattr(o, "hparams", None)
        for k, v in conf.to_plain(dict(o.hparams)).items()
    }


def _trainer_info(trainer: pl.Trainer) -> dict[str, Any]:
    return {
        "accelerator": type(trainer.accelerator).__name__,
        "devices": trainer.num_devices,
        "nodes": trainer.num_nodes,
        "world_size": trainer.world_size,
        "strategy": type(trainer.strategy).__name__,
        "precision": str(trainer.precision),
    }

"""RunRecord: everything needed to trust, compare and rebuild a training run, logged once per fit."""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
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
from lightning_inspect.record.parts import (
    _HOW_TO_RECORD,
    ConfigRecord,
    ConstructionRecord,
    GitInfo,
    SecretMasker,
    _locate,
    _node_at,
    _yaml_safe,
    config_record,
    construction_record,
    env_var_values,
    fingerprint_loaders,
    flatten,
    git_info,
    host_info,
    installed_packages,
    peak_memory,
    seed_info,
    to_plain,
    version_info,
)

__all__ = ["RunRecord"]

#: Where the record's files go in MLflow (next to the monitors' ``lightning_inspect/`` artifacts).
ARTIFACT_PATH = "lightning_inspect/run_record"
#: Prefix of every key the record logs (tags, params, metrics, TensorBoard text).
PREFIX = "run_record"
_BACKENDS = ("tensorboard", "mlflow")
_TEXT_CHARS = 200_000
_MIB = 1024 * 1024


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


# --------------------------------------------------------------------------------------------
# Output capture
# --------------------------------------------------------------------------------------------


class _Tee:
    """A text stream that writes through to the original and copies to the capture file."""

    def __init__(self, original: Any, capture: _OutputCapture) -> None:
        self._original = original
        self._capture = capture
        self.active = True
        self.pending = ""

    def write(self, text: str) -> int:
        written = self._original.write(text)
        if self.active:
            self._capture.collect(self, text)
        return written if isinstance(written, int) else len(text)

    def writelines(self, lines: Sequence[str]) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        self._original.flush()

    def isatty(self) -> bool:
        return bool(self._original.isatty())

    def fileno(self) -> int:
        return int(self._original.fileno())

    def __getattr__(self, name: str) -> Any:
        return getattr(self._original, name)


def _stream_handlers() -> Iterator[logging.StreamHandler[Any]]:
    loggers: list[Any] = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
    seen: set[int] = set()
    for logger in loggers:
        for handler in getattr(logger, "handlers", []):
            stream = isinstance(handler, logging.StreamHandler)
            if stream and not isinstance(handler, logging.FileHandler) and id(handler) not in seen:
                seen.add(id(handler))
                yield handler


class _OutputCapture:
    """Tees ``sys.stdout``/``sys.stderr`` (and logging handlers writing to them) into a file.

    Progress bars redrawn with carriage returns are kept as their last state per line.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = path.open("w", encoding="utf-8", errors="replace")
        self._lock = threading.Lock()
        self._streams: list[tuple[str, Any, _Tee]] = []
        self._handlers: list[tuple[logging.StreamHandler[Any], Any, _Tee]] = []

    def start(self) -> None:
        by_original: dict[int, _Tee] = {}
        for name in ("stdout", "stderr"):
            original = getattr(sys, name)
            tee = _Tee(original, self)
            setattr(sys, name, tee)
            self._streams.append((name, original, tee))
            by_original[id(original)] = tee
        for handler in _stream_handlers():
            target = by_original.get(id(handler.stream))
            if target is not None:
                self._handlers.append((handler, handler.stream, target))
                handler.setStream(target)  # type: ignore[arg-type]

    def collect(self, tee: _Tee, text: str) -> None:
        with self._lock:
            if self._file.closed:
                return
            *lines, rest = (tee.pending + text).replace("\r\n", "\n").split("\n")
            for line in lines:
                self._file.write(line.rsplit("\r", 1)[-1] + "\n")
            cut = rest.rfind("\r", 0, len(rest) - 1)
            tee.pending = rest[cut + 1 :] if cut >= 0 else rest
            if lines:
                self._file.flush()

    def stop(self) -> None:
        """Restore the streams (where nothing else replaced them since) and close the file."""
        for handler, stream, tee in self._handlers:
            if handler.stream is tee:
                handler.setStream(stream)
        for name, original, tee in self._streams:
            tee.active = False
            if getattr(sys, name) is tee:
                setattr(sys, name, original)
        with self._lock:
            for _, _, tee in self._streams:
                if tee.pending:
                    self._file.write(tee.pending.rsplit("\r", 1)[-1] + "\n")
                    tee.pending = ""
            self._file.close()
        self._handlers.clear()
        self._streams.clear()


# --------------------------------------------------------------------------------------------
# The callback
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Fit:
    """State of one fit."""

    writers: list[_Guarded]
    output_dir: Path
    temporary: bool
    config: ConfigRecord
    hydra_model_key: str | None
    deadline: EndOfFit
    start_wall: float = dataclasses.field(default_factory=time.time)
    start_perf: float = dataclasses.field(default_factory=time.perf_counter)
    train_start: float | None = None
    train_end: float | None = None
    start_step: int = 0
    end_step: int | None = None
    capture: _OutputCapture | None = None
    files: dict[str, Path] = dataclasses.field(default_factory=dict)
    started: bool = False
    data_done: bool = False


class RunRecord(Callback):
    """Record everything needed to trust, compare and rebuild a training run, once per fit.

    On global rank 0, to every attached backend (TensorBoard, MLflow), it records:

    * **code**: git commit, branch, dirty flag, untracked files and the uncommitted diff (a file),
      read with the ``git`` CLI from ``repo_dir`` (default: the working directory); outside a
      repository, without git or on a timeout it records why and warns once;
    * **seed**: the value given to Lightning's ``seed_everything`` (``PL_GLOBAL_SEED``);
    * **machine**: host, CPU model and count, GPU model and count, accelerator, strategy,
      precision; Python, PyTorch, Lightning, CUDA and cuDNN versions; every installed package
      (a file); the environment variables named in ``env_vars`` (no others);
    * **configuration**: the full resolved Hydra config, the command-line overrides and the
      config-group choices (from the Hydra run directory, or ``config=``/``overrides=``; under
      ``ddp_spawn`` the launching app's, taken when the callback is pickled for the spawned
      processes), or else a LightningCLI's parsed config;
    * **model**: a construction record, a Hydra config that rebuilds the model
      (``hydra.utils.instantiate``), checked by rebuilding it on the meta device; the same for
      the datamodule when there is one (see :func:`lightning_inspect.record.parts.construction_record`);
    * **data**: per data loader, dataset size, batches, batch size and a content hash of
      ``fingerprint_items`` items spread over the dataset;
    * **outcome** (at the end of fit, also after an exception): status, start and end time,
      duration, optimizer steps and steps per second, peak memory (process RSS; CUDA max
      allocated on GPU); with ``capture_output`` the console output as a file.

    Values under keys that look like secrets (token, password, secret, key, api_key, credential,
    auth...) are masked (``"***"``) in configs, hyperparameters, overrides and the command line.

    Args:
        git: record the git state.
        git_diff: record the uncommitted diff as a file (``git diff HEAD``).
        repo_dir: directory inside the repository; ``None``: the working directory.
        git_timeout: seconds each git command may take.
        env_vars: environment variable names or globs to record (e.g. ``["SLURM_JOB_ID", "CUDA_*"]``).
        packages: record the installed packages.
        config: the run's config (a DictConfig or mapping), for apps that compose it themselves;
            ``None``: read it from the running Hydra app, else from LightningCLI.
        overrides: the command-line overrides; ``None``: from Hydra (or ``config``'s ``hydra`` node).
        config_params: also log the flattened config as MLflow params and TensorBoard hparams
            (``config/<path>``).
        model: record how the model (and datamodule) were built.
        model_key: dotted key of the model's ``_target_`` node in the config; ``None``: the node
            whose ``_target_`` is the model's class, if any.
        verify_model: check that the construction record rebuilds the same modules and shapes.
        fingerprint_items: items per dataset hashed for the data fingerprint (0: sizes only).
        capture_output: copy stdout/stderr to ``output.log`` (the console still shows them). This
            replaces ``sys.stdout``/``sys.stderr`` (and points logging's console handlers at the
            replacements) from ``setup`` to the end of fit on rank 0; ``False``: nothing is patched.
        output_dir: where the record's files are written; ``None``: ``<TensorBoard log_dir>/run_record``,
            else ``<Hydra run dir>/run_record``, else a temporary directory when MLflow is attached
            (the files become artifacts), else ``<default_root_dir>/run_record``.
        mask_keys: more key patterns (globs) whose values are masked.
        unmask_keys: key patterns (globs) never masked, e.g. ``["pad_token"]``.
        backends: ``"tensorboard"``, ``"mlflow"`` or a list; ``None``: every attached one.
        enabled: ``False`` records nothing.

    Logged metrics:
        MLflow: tags ``run_record/git/*``, ``run_record/host``, ``run_record/torch``...,
        ``run_record/status``; params ``run_record/seed``, ``run_record/overrides``,
        ``run_record/data/<loader>/{size,batches,batch_size,hash}``, ``choices/<group>``,
        ``config/<path>``; metrics ``run_record/{duration_s,steps_per_s,peak_rss_mib,...}``;
        artifacts under ``lightning_inspect/run_record/``: ``record.yaml``, ``git.diff``,
        ``packages.txt``, ``config.yaml``, ``overrides.yaml``, ``hparams.yaml``, ``model.yaml``,
        ``datamodule.yaml``, ``output.log``. TensorBoard: text ``run_record/{summary,config,
        overrides,model,git_diff,packages,data,result}``, the same scalars, and an HPARAMS entry
        with the params, tags and the model's own hyperparameters.

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
        owner = type(self).__name__
        self.git = check_bool(owner, "git", git)
        self.git_diff = check_bool(owner, "git_diff", git_diff)
        if repo_dir is not None and (
            not isinstance(repo_dir, (str, os.PathLike)) or not Path(repo_dir).is_dir()
        ):
            raise ConfigError(
                f"{owner}(repo_dir={repo_dir!r}): expected None or an existing directory."
            )
        self.repo_dir = repo_dir
        if (
            isinstance(git_timeout, bool)
            or not isinstance(git_timeout, (int, float))
            or not git_timeout > 0
        ):
            raise ConfigError(
                f"{owner}(git_timeout={git_timeout!r}): expected a number of seconds > 0."
            )
        self.git_timeout = float(git_timeout)
        self.env_vars = as_str_list(owner, "env_vars", env_vars)
        self.packages = check_bool(owner, "packages", packages)
        if config is not None and not isinstance(config, Mapping):
            raise ConfigError(
                f"{owner}(config={config!r}): expected None, a DictConfig or a mapping."
            )
        self.config = config
        self.overrides = None if overrides is None else as_str_list(owner, "overrides", overrides)
        self.config_params = check_bool(owner, "config_params", config_params)
        self.model = check_bool(owner, "model", model)
        if model_key is not None and (not isinstance(model_key, str) or not model_key):
            raise ConfigError(
                f"{owner}(model_key={model_key!r}): expected None or a dotted key such as 'model'."
            )
        self.model_key = model_key
        self.verify_model = check_bool(owner, "verify_model", verify_model)
        self.fingerprint_items = check_positive_int(
            owner, "fingerprint_items", fingerprint_items, minimum=0
        )
        self.capture_output = check_bool(owner, "capture_output", capture_output)
        if output_dir is not None and not isinstance(output_dir, (str, os.PathLike)):
            raise ConfigError(
                f"{owner}(output_dir={output_dir!r}): expected None or a directory path."
            )
        self.output_dir = output_dir
        self.masker = SecretMasker(
            extra=tuple(as_str_list(owner, "mask_keys", mask_keys)),
            exempt=tuple(as_str_list(owner, "unmask_keys", unmask_keys)),
        )
        self.backends = (
            None
            if backends is None
            else check_choices(owner, "backends", backends, _BACKENDS, _BACKENDS)
        )
        self.enabled = check_bool(owner, "enabled", enabled)
        #: The last fit's record (plain values), also written as ``record.yaml``.
        self.record: dict[str, Any] = {}
        self._fit: _Fit | None = None
        self._warned: set[str] = set()
        self._launch_config: ConfigRecord | None = None  # set in copies pickled for spawned ranks

    def __getstate__(self) -> dict[str, Any]:
        """Pickled for processes started by ``strategy="ddp_spawn"``: they run no Hydra app, so
        the config of the app that launched them travels with the callback."""
        state = self.__dict__.copy()
        if self.config is None and self._launch_config is None and self.enabled:
            launch = self._collect("configuration", config_record, None, self.overrides)
            from_hydra = launch is not None and launch.source == "hydra"
            state["_launch_config"] = launch if from_hydra else None
        return state

    # ---------------------------------------------------------------- Lightning hooks (thin)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or not self.enabled or not trainer.is_global_zero:
            return
        if self._fit is not None:
            self._finish(trainer, "interrupted", None)
        writers = self._writers(trainer)
        config = (
            self._launch_config
            or self._collect(
                "configuration", config_record, self.config, self.overrides, trainer.callbacks
            )
            or ConfigRecord(notes=["the configuration could not be read"])
        )
        key = self._model_key(config, pl_module)
        output_dir, temporary = self._output_dir(trainer, writers, config)
        guarded = [_Guarded(w, output_dir) for w in writers]
        fit = _Fit(guarded, output_dir, temporary, config, key, EndOfFit.for_fit(trainer))
        self.record = {"status": "running"}
        if self.capture_output:
            fit.capture = self._collect("console output", _start_capture, output_dir / "output.log")
        self._fit = fit

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        fit = self._fit
        if fit is not None and not fit.started:
            fit.started = True
            self._collect("run record", self._log_start, fit, trainer, pl_module)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        fit = self._fit
        if fit is None:
            return
        fit.train_start = time.perf_counter()
        fit.start_step = trainer.global_step
        if not fit.data_done:
            fit.data_done = True
            self._collect("data fingerprint", self._log_data, fit, trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._fit is not None:
            self._fit.train_end = time.perf_counter()
            self._fit.end_step = trainer.global_step

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
        if not self.model:
            return None
        if self.model_key is not None:
            node = _node_at(config.config, self.model_key)
            if not isinstance(node, Mapping) or "_target_" not in node:
                where = (
                    f"the recorded config (top-level keys: {sorted(config.config)})"
                    if config.config is not None
                    else "a config, but none was found (pass config= or run inside a Hydra app)"
                )
                raise ConfigError(
                    f"RunRecord(model_key={self.model_key!r}): expected the dotted key of a node with a "
                    f"_target_ in {where}."
                )
            return self.model_key
        return _find_target(config.config, type(pl_module), prefer="model")

    def _output_dir(
        self, trainer: pl.Trainer, writers: Sequence[_Writer], config: ConfigRecord
    ) -> tuple[Path, bool]:
        temporary = False
        tensorboard = [w for w in writers if isinstance(w, _TensorBoardWriter)]
        if self.output_dir is not None:
            path = Path(self.output_dir)
        elif tensorboard:
            path = Path(tensorboard[0].logger.log_dir) / "run_record"
        elif config.source == "hydra" and config.output_dir:
            path = Path(config.output_dir) / "run_record"
        elif writers and all(hasattr(w.sink, "log_files") for w in writers):
            path, temporary = Path(tempfile.mkdtemp(prefix="lightning_inspect_run_record_")), True
        else:
            path = Path(trainer.default_root_dir) / "run_record"
            rank_zero_info(
                f"RunRecord: no TensorBoard or MLflow logger is attached; the record is written to {path}."
            )
        path.mkdir(parents=True, exist_ok=True)
        return path, temporary

    # ---------------------------------------------------------------- the record

    def _warn(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(f"RunRecord: {message}", RuntimeWarning, stacklevel=3)

    def _collect(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Run one step of the record; a fault warns once and the record goes on without it."""
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            self._warn(
                what,
                f"could not record the {what} ({type(exc).__name__}: {exc}). Training continues.",
            )
            return None

    @staticmethod
    def _write(fit: _Fit, name: str, text: str) -> Path:
        path = fit.output_dir / name
        path.write_text(text, encoding="utf-8")
        fit.files[name] = path
        return path

    @staticmethod
    def _emit(fit: _Fit, method: str, *args: Any) -> list[Any]:
        return [writer(method, *args) for writer in fit.writers]

    def _params(self, fit: _Fit, values: Mapping[str, Any]) -> None:
        conflicts = sorted(
            {k for found in self._emit(fit, "params", values) if found for k in found}
        )
        if conflicts:
            self._warn(
                "params",
                "these parameters already hold other values in the MLflow run, which keeps the first: "
                f"{conflicts[:10]}{' ...' if len(conflicts) > 10 else ''}. The values of this fit are in record.yaml.",
            )

    def _log_start(self, fit: _Fit, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        masker = self.masker
        record = self.record
        record["lightning_inspect"] = version_info().get("lightning-inspect")
        record["command"] = masker.command([sys.executable, *sys.argv])
        record["cwd"] = os.getcwd()
        record["time"] = {"start": _iso(fit.start_wall)}
        record["seed"] = seed_info()
        tags: dict[str, Any] = {
            f"{PREFIX}/start_time": record["time"]["start"],
            f"{PREFIX}/status": "running",
        }
        params: dict[str, Any] = {f"{PREFIX}/seed": record["seed"]["seed"]}

        if self.git:
            info = self._collect(
                "git state", git_info, self.repo_dir, self.git_timeout, self.git_diff
            ) or GitInfo(notice="the git state could not be read")
            record["git"] = info.summary()
            if info.diff:
                self._write(fit, "git.diff", info.diff)
                record["git"]["diff_file"] = "git.diff"
            if info.commit is None:
                self._warn("git", f"no git commit is recorded: {info.notice}. Training continues.")
            tags.update(
                {
                    f"{PREFIX}/git/commit": info.commit,
                    f"{PREFIX}/git/branch": info.branch,
                    f"{PREFIX}/git/dirty": None if info.dirty is None else str(info.dirty).lower(),
                    f"{PREFIX}/git/untracked": str(len(info.untracked)) if info.commit else None,
                    f"{PREFIX}/git/notice": info.notice,
                }
            )

        host = {**(self._collect("host", host_info) or {}), **_trainer_info(trainer)}
        versions = self._collect("versions", version_info) or {}
        record["host"], record["versions"] = host, versions
        tags.update(
            {
                f"{PREFIX}/host": host.get("hostname"),
                f"{PREFIX}/cpu": host.get("cpu_model"),
                f"{PREFIX}/cpu_count": host.get("cpu_count"),
                f"{PREFIX}/gpu": host.get("gpu_model"),
                f"{PREFIX}/gpu_count": host.get("gpu_count"),
                f"{PREFIX}/accelerator": host.get("accelerator"),
                f"{PREFIX}/devices": host.get("devices"),
                f"{PREFIX}/strategy": host.get("strategy"),
                f"{PREFIX}/precision": host.get("precision"),
                **{
                    f"{PREFIX}/{k}": versions.get(k)
                    for k in ("python", "torch", "lightning", "cuda", "cudnn")
                },
                f"{PREFIX}/command": " ".join(record["command"]),
            }
        )
        if self.packages:
            lines = self._collect("installed packages", installed_packages)
            if lines is not None:
                self._write(fit, "packages.txt", "\n".join(lines) + "\n")
        if self.env_vars:
            record["env"] = (
                self._collect("environment variables", env_var_values, self.env_vars, masker) or {}
            )
            tags.update({f"{PREFIX}/env/{k}": v for k, v in record["env"].items()})

        config = fit.config
        self._collect("MLflow run name", _record_run_name, config, trainer)
        overrides = [masker.override(o) for o in config.overrides]
        record["config"] = {
            "source": config.source,
            "overrides": overrides,
            "choices": config.choices,
            "notes": config.notes,
        }
        params[f"{PREFIX}/overrides"] = " ".join(overrides) if overrides else "(none)"
        params.update({f"choices/{k}": v for k, v in config.choices.items()})
        if config.config is not None:
            masked_config = masker.mask(config.config)
            self._write(fit, "config.yaml", _yaml(masked_config))
            if self.config_params:
                params.update(flatten(masked_config, "config"))
        if config.source != "none":
            self._write(fit, "overrides.yaml", _yaml(overrides))
        masked_hparams = masker.mask(
            self._collect("hyperparameters", _module_hparams, pl_module, trainer) or {}
        )
        if masked_hparams:
            self._write(fit, "hparams.yaml", _yaml(masked_hparams))

        if self.model:
            self._record_construction(
                fit, "model", pl_module, fit.hydra_model_key, self.verify_model, tags
            )
            datamodule = getattr(trainer, "datamodule", None)
            if datamodule is not None:
                key = _find_target(config.config, type(datamodule), prefer="datamodule")
                self._record_construction(fit, "datamodule", datamodule, key, False, tags)

        self._emit(fit, "tags", tags)
        self._params(fit, params)
        # TensorBoard keeps the first HPARAMS entry of a run: this one is written before Lightning's
        # own, so it carries the module's hyperparameters too.
        table = {**flatten(masked_hparams), **params}
        table.update(
            {k: v for k, v in tags.items() if "/env/" not in k and not k.endswith("/command")}
        )
        self._emit(fit, "hparams", table)
        self._emit(fit, "text", f"{PREFIX}/summary", _summary_markdown(record), trainer.global_step)
        for name, key, lang in (
            ("config.yaml", "config", "yaml"),
            ("overrides.yaml", "overrides", "yaml"),
            ("model.yaml", "model", "yaml"),
            ("datamodule.yaml", "datamodule", "yaml"),
            ("git.diff", "git_diff", "diff"),
            ("packages.txt", "packages", "text"),
        ):
            if name in fit.files:
                text = fit.files[name].read_text(encoding="utf-8")
                self._emit(fit, "text", f"{PREFIX}/{key}", _fenced(text, lang), trainer.global_step)
        self._write(fit, "record.yaml", _yaml(record))
        self._emit(fit, "files", list(fit.files.values()))
        self._emit(fit, "flush")

    def _record_construction(
        self, fit: _Fit, what: str, obj: Any, key: str | None, verify: bool, tags: dict[str, Any]
    ) -> None:
        node = _node_at(fit.config.config, key) if key else None
        record: ConstructionRecord | None = self._collect(
            f"{what} construction", construction_record, obj, node, key or what, verify
        )
        if record is None:
            return
        masked = ConstructionRecord(
            self.masker.mask(record.config), record.source, record.notes, record.verified
        )
        self._write(fit, f"{what}.yaml", masked.to_yaml(what))
        entry: dict[str, Any] = {
            "class": f"{type(obj).__module__}.{type(obj).__qualname__}",
            "source": record.source,
            "rebuild_checked": record.verified,
            "notes": record.notes,
            "file": f"{what}.yaml",
        }
        if hasattr(obj, "parameters"):
            entry["parameters"] = sum(p.numel() for p in obj.parameters())
            entry["trainable_parameters"] = sum(
                p.numel() for p in obj.parameters() if p.requires_grad
            )
        self.record[what] = entry
        tags.update(
            {
                f"{PREFIX}/{what}/class": entry["class"],
                f"{PREFIX}/{what}/source": record.source,
                f"{PREFIX}/{what}/rebuild_checked": None
                if record.verified is None
                else str(record.verified).lower(),
            }
        )
        if record.source == "none":
            self._warn(
                f"{what} record",
                f"the {what} has no explicit construction record, so {what}.yaml holds a "
                f"placeholder: {_HOW_TO_RECORD}.",
            )
        elif record.verified is False:
            failed = (n for n in reversed(record.notes) if n.startswith("rebuild check failed"))
            self._warn(
                f"{what} record",
                f"the {what}'s construction record does not rebuild the same {what} "
                f"({next(failed, 'see its notes')}). It is still written to {what}.yaml; for an "
                f"exact record, {_HOW_TO_RECORD}.",
            )

    def _log_data(self, fit: _Fit, trainer: pl.Trainer) -> None:
        loaders = {"train": trainer.train_dataloader}
        if trainer.val_dataloaders is not None:
            loaders["val"] = trainer.val_dataloaders
        data = fingerprint_loaders(loaders, self.fingerprint_items)
        self.record["data"] = data
        for name, entry in data.items():
            if entry.get("note"):
                self._warn(
                    f"data {name}", f"the {name} data fingerprint is incomplete: {entry['note']}."
                )
        params = {
            f"{PREFIX}/data/{name}/{field}": entry.get(field)
            for name, entry in data.items()
            for field in ("size", "batches", "batch_size", "hash")
            if entry.get(field) is not None
        }
        self._params(fit, params)
        self._emit(fit, "text", f"{PREFIX}/data", _data_markdown(data), trainer.global_step)
        self._write(fit, "record.yaml", _yaml(self.record))
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
        now = time.perf_counter()
        train_end = fit.train_end if fit.train_end is not None else now
        end_step = fit.end_step if fit.end_step is not None else trainer.global_step
        steps = max(end_step - fit.start_step, 0) if fit.train_start is not None else 0
        train_s = train_end - fit.train_start if fit.train_start is not None else 0.0
        times = self.record.setdefault("time", {"start": _iso(fit.start_wall)})
        times.update(
            {
                "end": _iso(time.time()),
                "duration_s": round(now - fit.start_perf, 3),
                "train_duration_s": round(train_s, 3),
                "steps": steps,
                "steps_per_s": round(steps / train_s, 4) if train_s > 0 and steps else None,
            }
        )
        memory = self._collect("peak memory", peak_memory) or {}
        self.record["memory"] = memory
        self.record["status"] = status
        if exception is not None:
            first = str(exception).splitlines()[0] if str(exception) else ""
            self.record["error"] = self.masker.text(f"{type(exception).__name__}: {first}")
        metrics = {
            f"{PREFIX}/duration_s": times["duration_s"],
            f"{PREFIX}/train_duration_s": times["train_duration_s"],
            f"{PREFIX}/steps": float(steps),
            f"{PREFIX}/steps_per_s": times["steps_per_s"],
            **{
                f"{PREFIX}/{k.replace('_bytes', '_mib')}": (v / _MIB if v is not None else None)
                for k, v in memory.items()
            },
        }
        end_tags = {
            f"{PREFIX}/status": status,
            f"{PREFIX}/end_time": times["end"],
            f"{PREFIX}/error": self.record.get("error"),
        }
        self._emit(fit, "tags", end_tags)
        self._emit(fit, "metrics", metrics, trainer.global_step)
        self._emit(
            fit, "text", f"{PREFIX}/result", _result_markdown(self.record), trainer.global_step
        )

    def _upload_end(self, fit: _Fit) -> None:
        self._write(fit, "record.yaml", _yaml(self.record))
        self._emit(
            fit, "files", [fit.files[n] for n in ("record.yaml", "output.log") if n in fit.files]
        )
        self._emit(fit, "flush")
        if fit.temporary and not any(w.failed for w in fit.writers):
            shutil.rmtree(fit.output_dir, ignore_errors=True)


def _start_capture(path: Path) -> _OutputCapture:
    """A started capture; one that fails to start restores what it had patched."""
    capture = _OutputCapture(path)
    try:
        capture.start()
    except BaseException:
        capture.stop()
        raise
    return capture


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _iso(timestamp: float) -> str:
    return (
        datetime.datetime.fromtimestamp(timestamp, datetime.timezone.utc)
        .astimezone()
        .isoformat(timespec="seconds")
    )


def _yaml(value: Any) -> str:
    import yaml

    return yaml.safe_dump(
        _yaml_safe(value), sort_keys=False, default_flow_style=False, allow_unicode=True
    )


def _fenced(text: str, lang: str) -> str:
    if len(text) > _TEXT_CHARS:
        text = (
            text[:_TEXT_CHARS]
            + f"\n... [cut at {_TEXT_CHARS} characters; the whole file is in the record]"
        )
    return f"````{lang}\n{text}\n````"


def _find_target(config: Any, cls: type, prefer: str) -> str | None:
    """The dotted key of the config node whose ``_target_`` is ``cls`` (``prefer`` first, then shallowest)."""
    found: list[str] = []

    def walk(node: Any, path: str) -> None:
        if isinstance(node, Mapping):
            target = node.get("_target_")
            if isinstance(target, str):
                try:
                    if _locate(target) is cls:
                        found.append(path)
                except Exception:
                    pass
            for key, value in node.items():
                walk(value, f"{path}.{key}" if path else str(key))
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{path}.{i}" if path else str(i))

    walk(config, "")
    if not found:
        return None
    return prefer if prefer in found else min(found, key=lambda p: (p.count("."), p))


def _record_run_name(config: ConfigRecord, trainer: pl.Trainer) -> None:
    """Put the MLflow run's own name in the config node of its ``MLFlowLogger``.

    The config is resolved again when it is recorded, so a ``${now:...}`` in ``run_name`` would
    give a later time than the one the run was created with.
    """
    logger = attached_loggers(trainer).get("mlflow")
    if logger is None:
        return
    key = _find_target(config.config, type(logger), prefer="logger.mlflow")
    node = _node_at(config.config, key) if key is not None else None
    if not isinstance(node, dict) or "run_name" not in node:
        return
    name = logger.experiment.get_run(logger.run_id).info.run_name
    if node["run_name"] != name:
        config.notes.append(
            f"{key}.run_name: {node['run_name']!r} when read again; recorded as the run's name "
            f"{name!r}"
        )
        node["run_name"] = name


def _module_hparams(pl_module: pl.LightningModule, trainer: pl.Trainer) -> dict[str, Any]:
    """The hyperparameters Lightning logs itself: the module's and the datamodule's."""
    out: dict[str, Any] = {}
    for owner in (pl_module, getattr(trainer, "datamodule", None)):
        if owner is not None and getattr(owner, "hparams", None):
            out.update(to_plain(dict(owner.hparams)))
    return out


def _trainer_info(trainer: pl.Trainer) -> dict[str, Any]:
    return {
        "accelerator": type(trainer.accelerator).__name__,
        "devices": trainer.num_devices,
        "nodes": trainer.num_nodes,
        "world_size": trainer.world_size,
        "strategy": type(trainer.strategy).__name__,
        "precision": str(trainer.precision),
    }


def _row(name: str, value: Any) -> str:
    text = "" if value is None else str(value)
    return f"| {name} | {text.replace('|', '&#124;')} |"


def _summary_markdown(record: Mapping[str, Any]) -> str:
    git = record.get("git", {})
    host = record.get("host", {})
    versions = record.get("versions", {})
    model = record.get("model", {})
    config = record.get("config", {})
    commit = git.get("commit")
    git_text = (
        (
            f"`{commit}` on {git.get('branch') or 'detached HEAD'}{' (dirty: see git_diff)' if git.get('dirty') else ''}"
            if commit
            else f"not recorded: {git.get('notice')}"
        )
        if git
        else "not recorded (git=False)"
    )
    rows = [
        "| | |",
        "|---|---|",
        _row("started", record.get("time", {}).get("start")),
        _row("git", git_text),
        _row("seed", record.get("seed", {}).get("seed")),
        _row(
            "host",
            f"{host.get('hostname')}: {host.get('cpu_model')} x {host.get('cpu_count')}; GPU: {host.get('gpu_model') or 'none'} ({host.get('gpu_count')})",
        ),
        _row(
            "trainer",
            f"{host.get('accelerator')}, {host.get('devices')} device(s), {host.get('strategy')}, precision {host.get('precision')}",
        ),
        _row("versions", ", ".join(f"{k} {v}" for k, v in versions.items() if v)),
        _row("command", " ".join(record.get("command", []))),
        _row("overrides", " ".join(config.get("overrides", [])) or "(none)"),
        _row("config source", config.get("source")),
    ]
    if model:
        rows.append(
            _row(
                "model",
                f"{model.get('class')} from {model.get('source')}; rebuild checked: {model.get('rebuild_checked')}",
            )
        )
    return "\n".join(rows)


def _data_markdown(data: Mapping[str, Mapping[str, Any]]) -> str:
    rows = [
        "| loader | dataset | size | batches | batch size | items hashed | hash |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for name, entry in data.items():
        rows.append(
            f"| {name} | {entry.get('dataset', '')} | {entry.get('size', '')} | {entry.get('batches', '')} | "
            f"{entry.get('batch_size', '')} | {entry.get('items_hashed', '')} | `{entry.get('hash')}` |"
        )
    return "\n".join(rows)


def _result_markdown(record: Mapping[str, Any]) -> str:
    times = record.get("time", {})
    memory = record.get("memory", {})
    rows = ["| | |", "|---|---|", _row("status", record.get("status"))]
    if record.get("error"):
        rows.append(_row("error", record["error"]))
    rows += [
        _row("started / ended", f"{times.get('start')} / {times.get('end')}"),
        _row("duration (s)", times.get("duration_s")),
        _row("training (s)", times.get("train_duration_s")),
        _row("optimizer steps", times.get("steps")),
        _row("steps per second", times.get("steps_per_s")),
    ]
    rows += [
        _row(k.replace("_bytes", " (MiB)"), None if v is None else round(v / _MIB, 1))
        for k, v in memory.items()
    ]
    return "\n".join(rows)

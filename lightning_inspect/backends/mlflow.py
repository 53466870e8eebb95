"""MLflow through the Trainer's ``MLFlowLogger``: headline metrics, every value in a table per
callback, histograms, texts and pictures as artifacts; one background writer per run; calls to a
tracking server with a bounded retry budget (:data:`HTTP_BUDGET`)."""

from __future__ import annotations

import csv
import functools
import hashlib
import json
import math
import os
import posixpath
import shutil
import tempfile
import time
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lightning_inspect.backends.base import BackgroundSink, EndOfFit, text_value
from lightning_inspect.backends.pictures import histogram_picture
from lightning_inspect.core.keys import KINDS, MlflowKeys, split_key
from lightning_inspect.core.recorder import StepCoordinator
from lightning_inspect.core.stats import Histogram

ARTIFACT_ROOT = "lightning_inspect"
STATS_ARTIFACT_DIR = f"{ARTIFACT_ROOT}/stats"
#: What MLflow receives as metrics: headline values only, or every value too.
METRIC_MODES = ("summary", "all")
#: Statistics whose summary over modules is exact: the extremes and the counts.
_EXACT = {"min": min, "max": max, "nan_count": math.fsum, "inf_count": math.fsum}
Scalars = dict[str, dict[str, float]]  # one step of several callbacks: {owner: {key: value}}
Histograms = dict[str, dict[str, Histogram]]
_split_key = functools.lru_cache(maxsize=1 << 16)(split_key)
_RUNS: weakref.WeakKeyDictionary[Any, dict[str, MlflowRun]] = weakref.WeakKeyDictionary()

#: Retries, back-off factor and timeout (s) of the library's calls to a tracking server: MLflow's
#: defaults retry for minutes, and its environment variables would change every client's.
HTTP_BUDGET: dict[str, Any] = {"max_retries": 1, "backoff_factor": 0.5, "backoff_jitter": 0.0}
HTTP_BUDGET.update(timeout=5, respect_retry_after_header=False)
#: The longest one call can take against a server that never answers: every try times out.
LONGEST_CALL_S = (HTTP_BUDGET["max_retries"] + 1) * HTTP_BUDGET["timeout"] + 1.0


def bounded_client(client: Any) -> Any:
    """``client`` itself, or a :class:`BoundedClient` over it when it talks to a tracking server."""
    from mlflow.store.tracking.rest_store import RestStore

    store = getattr(getattr(client, "_tracking_client", None), "store", None)
    return BoundedClient(client, store) if isinstance(store, RestStore) else client


class BoundedClient:
    """The ``MlflowClient`` calls the library makes, over HTTP with :data:`HTTP_BUDGET`."""

    def __init__(self, client: Any, store: Any) -> None:
        self.client = client
        self.store = store
        self._repos: dict[str, Any] = {}  # run id -> its artifact repository

    def _call(self, api: Any, body: Any) -> Any:
        from mlflow.utils.proto_json_utils import message_to_json, parse_dict
        from mlflow.utils.rest_utils import http_request, verify_rest_response

        endpoint, method = self.store._METHOD_TO_INFO[api]
        data = {"params" if method == "GET" else "json": json.loads(message_to_json(body))}
        creds = self.store.get_host_creds()
        response = http_request(creds, endpoint, method, **HTTP_BUDGET, **data)
        parse_dict(verify_rest_response(response, endpoint).json(), answer := api.Response())
        return answer

    def log_batch(self, run_id: str, **entities: Sequence[Any]) -> None:
        from mlflow.protos.service_pb2 import LogBatch

        protos = {k: [e.to_proto() for e in v] for k, v in entities.items()}
        self._call(LogBatch, LogBatch(run_id=run_id, **protos))

    def get_run(self, run_id: str) -> Any:
        from mlflow.entities import Run
        from mlflow.protos.service_pb2 import GetRun

        return Run.from_proto(self._call(GetRun, GetRun(run_id=run_id, run_uuid=run_id)).run)

    def log_artifact(self, run_id: str, local_path: str, artifact_path: str | None = None) -> None:
        """To the server's own artifact store: one bounded PUT."""
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
        from mlflow.store.artifact.http_artifact_repo import HttpArtifactRepository
        from mlflow.utils.credentials import get_default_host_creds
        from mlflow.utils.mime_type_utils import _guess_mime_type
        from mlflow.utils.rest_utils import augmented_raise_for_status, http_request

        if (repo := self._repos.get(run_id)) is None:
            uri = self.get_run(run_id).info.artifact_uri
            tracking_uri = self.client.tracking_uri
            repo = self._repos[run_id] = get_artifact_repository(uri, tracking_uri=tracking_uri)
        if not isinstance(repo, HttpArtifactRepository):
            return self.client.log_artifact(run_id, local_path, artifact_path)
        name = os.path.basename(local_path)
        endpoint = posixpath.join("/", artifact_path or "", name)
        creds = get_default_host_creds(repo.artifact_uri)
        headers = {"Content-Type": _guess_mime_type(name)}
        with open(local_path, "rb") as f:
            put = http_request(creds, endpoint, "PUT", data=f, extra_headers=headers, **HTTP_BUDGET)
        augmented_raise_for_status(put)

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        with tempfile.TemporaryDirectory(prefix="lightning_inspect_text_") as tmp:
            path = Path(tmp) / posixpath.basename(artifact_file)
            path.write_text(text, encoding="utf-8")
            self.log_artifact(run_id, str(path), posixpath.dirname(artifact_file) or None)


def artifact_file(key: str, suffix: str) -> str:
    """``key + suffix`` as a relative path whose every part fits in a file name (255 bytes): a
    part too long is cut and ends with 8 hex digits of its SHA-1."""
    *folders, name = key.split("/")
    out = []
    for part, end in [(f, "") for f in folders] + [(name, suffix)]:
        if len((part + end).encode()) > 255:
            digest = hashlib.sha1(part.encode()).hexdigest()[:8]
            room = 255 - len(end.encode()) - len(digest) - 1
            part = f"{part.encode()[:room].decode('utf-8', 'ignore')}-{digest}"
        out.append(part + end)
    return "/".join(out)


@functools.lru_cache(maxsize=1 << 16)
def _csv_cell(key: str) -> str:
    """``key`` as a CSV cell (quoted where it holds a comma, a quote or a line break)."""
    return f'"{key.replace(chr(34), chr(34) * 2)}"' if any(c in key for c in ',"\r\n') else key


def headline_metrics(values: Mapping[str, float]) -> dict[str, float]:
    """The metrics of one step in ``"summary"`` mode (README, "MLflow gets headline metrics").

    >>> headline_metrics({"weights/a/max": 1.0, "weights/b/max": 3.0, "param_grads/global_norm": 2.0})
    {'param_grads/global_norm': 2.0, 'summary/weights/max': 3.0}
    """
    out: dict[str, float] = {}
    groups: dict[tuple[str, str], list[float]] = {}
    for key, value in values.items():
        kind, name, _, stat = _split_key(key)
        if kind not in KINDS or not name:
            out[key] = value
        elif not math.isnan(value):
            groups.setdefault((kind, stat), []).append(value)
    for (kind, stat), group in groups.items():
        base = f"summary/{kind}/{stat}"
        if stat == "l2_norm":
            out[base] = math.sqrt(math.fsum(v * v for v in group))
        elif stat in _EXACT:
            out[base] = float(_EXACT[stat](group))
        else:
            out[f"{base}/min"], out[f"{base}/max"] = min(group), max(group)
    return out


def load_histogram_spool(path: Path) -> dict[str, list[tuple[int, float, float, np.ndarray]]]:
    """A histogram spool / artifact file: ``{key: [(step, lo, hi, counts), ...]}``."""
    series: dict[str, list[tuple[int, float, float, np.ndarray]]] = {}
    with Path(path).open() as f:
        for d in map(json.loads, f):
            point = (d["step"], d["lo"], d["hi"], np.asarray(d["counts"]))
            series.setdefault(d["key"], []).append(point)
    return series


def render_histogram_pictures(spool: Path, out_dir: Path, keys: MlflowKeys) -> list[Path]:
    """One PNG per key of a histogram spool, under ``out_dir``."""
    from PIL import Image

    written = []
    for key, points in load_histogram_spool(spool).items():
        path = out_dir / artifact_file(keys(key), ".png")
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(histogram_picture(key, points)).save(path)
        written.append(path)
    return written


class MlflowSink:
    """Writes metrics, tables, histograms, texts, pictures, params, tags and files to a run
    (through :func:`bounded_client`). ``owner`` names the table and histogram files (``None``:
    values as metrics only)."""

    name = "mlflow"
    remote = True  # once the fit's end-of-fit deadline is set, calls wait only until it

    def __init__(
        self, client: Any, run_id: str, owner: str | None = "inspect", metrics: str = "summary"
    ) -> None:
        self.client = bounded_client(client)
        self.run_id = run_id
        self.owner = owner
        self.modes: dict[str | None, str] = {owner: metrics}
        self.keys = MlflowKeys()
        self._spool: Path | None = None
        self._dirty: dict[Path, None] = {}  # spooled files not uploaded since they changed

    def _batch(self, kind: str, items: list[Any], size: int) -> None:
        for start in range(0, len(items), size):
            self.client.log_batch(self.run_id, **{kind: items[start : start + size]})

    def _file(self, folder: str, name: str) -> Path:
        if self._spool is None:
            self._spool = Path(tempfile.mkdtemp(prefix="lightning_inspect_mlflow_"))
        (path := self._spool / folder / name).parent.mkdir(parents=True, exist_ok=True)
        return path

    def log_step(self, step: int, scalars: Scalars, histograms: Histograms) -> None:
        """Several owners' values of one step: metrics in one ``log_batch``, then tables and spools
        (after the metrics: a refused call sent again adds lines once)."""
        from mlflow.entities import Metric

        sent: dict[str, float] = {}
        for owner, values in scalars.items():
            every = self.modes.get(owner) == "all"
            sent.update(values if every else headline_metrics(values))
        now = int(time.time() * 1000)
        metrics = [Metric(self.keys(k), float(v), now, step) for k, v in sent.items()]
        self._batch("metrics", metrics, 1000)
        for owner, values in scalars.items():
            if owner is not None:
                self._dirty[path := self._file("stats", f"{owner}.csv")] = None
                head = "" if path.exists() else "step,key,value\n"
                lines = [f"{step},{_csv_cell(k)},{float(v)!r}\n" for k, v in values.items()]
                with path.open("a", newline="") as f:  # floats as repr writes them: exact
                    f.write(head + "".join(lines))
        for owner, hists in histograms.items():
            if hists:
                self._dirty[path := self._file("histograms", f"{owner}.jsonl")] = None
                with path.open("a") as f:
                    for key, h in hists.items():
                        line = {"key": key, "step": step, "lo": h.min, "hi": h.max}
                        f.write(json.dumps({**line, "counts": h.counts.tolist()}) + "\n")

    def log_scalars(self, values: Mapping[str, float], step: int) -> None:
        self.log_step(step, {self.owner: dict(values)}, {})  # type: ignore[dict-item]

    def log_histograms(self, histograms: Mapping[str, Histogram], step: int) -> None:
        self.log_step(step, {}, {self.owner: dict(histograms)})  # type: ignore[dict-item]

    def _upload(self, path: Path, name: str) -> None:
        folder = posixpath.dirname(f"{ARTIFACT_ROOT}/{name}")
        self.client.log_artifact(self.run_id, str(path), folder)

    def log_text(self, key: str, text: str, step: int) -> None:
        name = artifact_file(self.keys(key), ".md")
        self.client.log_text(self.run_id, text, f"{ARTIFACT_ROOT}/{name}")

    def log_image(self, key: str, image: np.ndarray, step: int) -> None:
        """``lightning_inspect/<key>.png`` (a later picture of the key replaces it)."""
        from PIL import Image

        path = self._file("images", name := artifact_file(self.keys(key), ".png"))
        Image.fromarray(np.asarray(image, dtype=np.uint8)).save(path)
        self._upload(path, name)

    def log_params(self, values: Mapping[str, Any]) -> list[str]:
        """Params (a run keeps a param's first value); returns the keys that held another value."""
        from mlflow.entities import Param

        existing = self.client.get_run(self.run_id).data.params
        new, conflicts = [], []
        for key, value in values.items():
            name, text = self.keys(key), text_value(value, 6000)
            if name not in existing:
                new.append(Param(name, text))
            elif existing[name] != text:
                conflicts.append(key)
        self._batch("params", new, 100)
        return conflicts

    def log_tags(self, values: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        tags = [RunTag(self.keys(k), text_value(v, 5000)) for k, v in values.items()]
        self._batch("tags", tags, 100)

    def log_files(self, paths: Sequence[Path], folder: str) -> None:
        for path in map(Path, paths):
            self._upload(path, f"{folder}/{path.name}")

    def flush(self) -> None:
        """Upload the tables and histogram spools (with pictures) changed since their last upload."""
        for path in list(self._dirty):
            self._upload(path, f"{path.parent.name}/{path.name}")
            if path.suffix == ".jsonl":
                out = path.parent / path.stem
                for picture in render_histogram_pictures(path, out, self.keys):
                    self._upload(picture, f"histograms/{picture.relative_to(out).as_posix()}")
            del self._dirty[path]

    def unsent(self) -> list[dict[str, Any]]:
        """What the uploads did not deliver (tables, spooled histograms) as fallback records."""
        records: list[dict[str, Any]] = []
        for path in self._dirty:
            by_step: dict[int, dict[str, Any]] = {}
            with path.open(newline="") as f:
                if tables := path.suffix == ".csv":
                    for row in csv.DictReader(f):
                        by_step.setdefault(int(row["step"]), {})[row["key"]] = float(row["value"])
                else:
                    for d in map(json.loads, f):
                        by_step.setdefault(d.pop("step"), {})[d.pop("key")] = d
            call, field = ("log_scalars", "values") if tables else ("log_histograms", "histograms")
            records += [{"call": call, "step": s, field: by_step[s]} for s in sorted(by_step)]
        return records

    def close(self) -> None:
        """Remove the local spool."""
        if self._spool is not None:
            shutil.rmtree(self._spool, ignore_errors=True)


class MlflowRun:
    """One fit's MLflow run: each step's values of every callback, once the Trainer's
    ``StepCoordinator`` has published the step, go to its background writer as one call."""

    def __init__(self, client: Any, run_id: str, trainer: Any) -> None:
        self.writer = MlflowSink(client, run_id, owner=None)
        self.background = BackgroundSink(self.writer, deadline=EndOfFit.for_fit(trainer))
        self.coordinator = StepCoordinator.for_trainer(trainer)
        self.coordinator.flushed.append(self.send)
        self._pending: dict[int, tuple[Scalars, Histograms]] = {}
        self._open: set[MlflowRunSink] = set()
        self.closed = False

    @classmethod
    def for_fit(cls, trainer: Any, logger: Any) -> MlflowRun:
        """The writer of ``logger``'s run in ``trainer``'s current fit (created on first use)."""
        runs = _RUNS.setdefault(trainer, {})
        run = runs.get(run_id := str(logger.run_id))
        if run is None or run.closed:
            run = runs[run_id] = cls(logger.experiment, run_id, trainer)
        return run

    def sink(self, owner: str, metrics: str = "summary") -> MlflowRunSink:
        """A callback's sink; the worker stops once every sink handed out is closed."""
        modes = self.writer.modes
        modes[owner] = "all" if "all" in (metrics, modes.get(owner)) else "summary"
        self._open.add(sink := MlflowRunSink(self, owner))
        return sink

    def add(self, owner: str, step: int, values: Mapping[str, Any], hists: bool = False) -> None:
        if values:
            owners = self._pending.setdefault(step, ({}, {}))[hists]
            owners.setdefault(owner, {}).update(values)

    def send(self) -> None:
        """Queue every gathered step, oldest first."""
        pending, self._pending = self._pending, {}
        for step in sorted(pending):
            self.background.log_step(step, *pending[step])

    def release(self, sink: MlflowRunSink) -> None:
        self._open.discard(sink)
        if self._open or self.closed:
            return
        self.closed = True
        self.send()
        if self.send in self.coordinator.flushed:
            self.coordinator.flushed.remove(self.send)
        self.background.close()


class MlflowRunSink:
    """One callback's sink to the fit's :class:`MlflowRun`."""

    name = "mlflow"

    def __init__(self, run: MlflowRun, owner: str) -> None:
        self.run = run
        self.owner = owner

    def log_scalars(self, values: Mapping[str, float], step: int) -> None:
        self.run.add(self.owner, step, values)

    def log_histograms(self, histograms: Mapping[str, Histogram], step: int) -> None:
        self.run.add(self.owner, step, histograms, hists=True)

    def log_text(self, key: str, text: str, step: int) -> None:
        self.run.background.log_text(key, text, step)

    def log_image(self, key: str, image: np.ndarray, step: int) -> None:
        self.run.background.log_image(key, image, step)

    def flush(self) -> None:
        self.run.send()
        self.run.background.flush()

    def close(self) -> None:
        self.run.release(self)

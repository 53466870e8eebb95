"""The library's own MLflow calls to a tracking server, each with a bounded retry budget.

MLflow retries a failing HTTP request with exponential back-off, about four minutes with its
defaults; its ``MLFLOW_HTTP_REQUEST_*`` environment variables would change that for the whole
process, the user's own MLflow calls included. :func:`bounded_client` instead gives the library's
writers a client whose calls pass :data:`HTTP_BUDGET` to MLflow's ``http_request`` one by one: a
call to a dead or hung server fails within about :data:`LONGEST_CALL_S` seconds, and the library's
guard keeps what it carried (fallback file, sent again once the server answers).

Only ``http(s)://`` tracking URIs are affected; file and database stores, and artifact stores other
than the tracking server's own (``mlflow-artifacts:``, ``http(s)://``), go through the public
``MlflowClient`` unchanged.
"""

from __future__ import annotations

import json
import os
import posixpath
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

#: Retries, back-off factor (s) and per-request timeout (s) of every library call to the server.
HTTP_BUDGET: dict[str, Any] = {
    "max_retries": 1,
    "backoff_factor": 0.5,
    "backoff_jitter": 0.0,
    "timeout": 5,
    "respect_retry_after_header": False,
}
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
        data = json.loads(message_to_json(body))
        where = {"params" if method == "GET" else "json": data}
        creds = self.store.get_host_creds()
        response = http_request(creds, endpoint, method, **HTTP_BUDGET, **where)
        response = verify_rest_response(response, endpoint)
        answer = api.Response()
        parse_dict(response.json(), answer)
        return answer

    def log_batch(
        self,
        run_id: str,
        metrics: Sequence[Any] = (),
        params: Sequence[Any] = (),
        tags: Sequence[Any] = (),
    ) -> None:
        """``MlflowClient.log_batch``."""
        from mlflow.protos.service_pb2 import LogBatch

        self._call(
            LogBatch,
            LogBatch(
                run_id=run_id,
                metrics=[m.to_proto() for m in metrics],
                params=[p.to_proto() for p in params],
                tags=[t.to_proto() for t in tags],
            ),
        )

    def get_run(self, run_id: str) -> Any:
        """``MlflowClient.get_run``."""
        from mlflow.entities import Run
        from mlflow.protos.service_pb2 import GetRun

        return Run.from_proto(self._call(GetRun, GetRun(run_id=run_id, run_uuid=run_id)).run)

    def _repo(self, run_id: str) -> Any:
        repo = self._repos.get(run_id)
        if repo is None:
            from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

            uri = self.get_run(run_id).info.artifact_uri
            tracking = self.client.tracking_uri
            repo = self._repos[run_id] = get_artifact_repository(uri, tracking_uri=tracking)
        return repo

    def log_artifact(self, run_id: str, local_path: str, artifact_path: str | None = None) -> None:
        """``MlflowClient.log_artifact`` (to the server's artifact store: one bounded PUT)."""
        from mlflow.store.artifact.http_artifact_repo import HttpArtifactRepository

        repo = self._repo(run_id)
        if not isinstance(repo, HttpArtifactRepository):
            self.client.log_artifact(run_id, local_path, artifact_path)
            return
        from mlflow.utils.credentials import get_default_host_creds
        from mlflow.utils.mime_type_utils import _guess_mime_type
        from mlflow.utils.rest_utils import augmented_raise_for_status, http_request

        name = os.path.basename(local_path)
        endpoint = posixpath.join("/", *([artifact_path] if artifact_path else []), name)
        headers = {"Content-Type": _guess_mime_type(name)}
        with open(local_path, "rb") as f:
            response = http_request(
                get_default_host_creds(repo.artifact_uri),
                endpoint,
                "PUT",
                data=f,
                extra_headers=headers,
                **HTTP_BUDGET,
            )
        augmented_raise_for_status(response)

    def log_artifacts(self, run_id: str, local_dir: str, artifact_path: str | None = None) -> None:
        """``MlflowClient.log_artifacts``: every file under ``local_dir``, one call each."""
        root = Path(local_dir)
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            folder = path.parent.relative_to(root).as_posix()
            parts = [p for p in (artifact_path, folder if folder != "." else None) if p]
            self.log_artifact(run_id, str(path), "/".join(parts) or None)

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        """``MlflowClient.log_text``."""
        with tempfile.TemporaryDirectory(prefix="lightning_inspect_text_") as tmp:
            path = Path(tmp) / posixpath.basename(artifact_file)
            path.write_text(text, encoding="utf-8")
            self.log_artifact(run_id, str(path), posixpath.dirname(artifact_file) or None)

    def log_image(self, run_id: str, image: np.ndarray, artifact_file: str) -> None:
        """``MlflowClient.log_image`` of a height x width x 3 uint8 picture, as a PNG file."""
        from PIL import Image

        with tempfile.TemporaryDirectory(prefix="lightning_inspect_image_") as tmp:
            path = Path(tmp) / posixpath.basename(artifact_file)
            Image.fromarray(np.asarray(image, dtype=np.uint8)).save(path, format="PNG")
            self.log_artifact(run_id, str(path), posixpath.dirname(artifact_file) or None)

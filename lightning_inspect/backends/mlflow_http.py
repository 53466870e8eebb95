"""The library's own calls to an MLflow tracking server, each with a bounded retry budget
(:data:`HTTP_BUDGET`; MLflow's default retries last minutes, and its environment variables would
change them for the whole process). Other stores go through the ``MlflowClient`` unchanged."""

from __future__ import annotations

import json
import os
import posixpath
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

#: Retries, back-off factor (s) and per-request timeout (s) of every library call to the server.
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

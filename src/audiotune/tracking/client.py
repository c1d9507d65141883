"""The tracking server: its URI, a client, experiments, and the parent run of a pipeline run.

Tracking URI, in order: ``TrackingConfig.uri``, the ``MLFLOW_TRACKING_URI`` environment variable, a
local store ``sqlite:///<cwd>/mlruns/mlflow.db`` with artifacts in ``<cwd>/mlruns/artifacts``.
"""

from __future__ import annotations

import http.client
import logging
import os
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from audiotune.errors import AudiotuneError

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from audiotune.config import TrackingConfig

log = logging.getLogger(__name__)

PARENT_TAG = "mlflow.parentRunId"
STAGE_TAG = "audiotune.stage"
PLUGIN_RUN_ENV = "MLFLOW_RUN_ID"  # set in a task's pod by the KFP >= 2.17 MLflow plugin: that task's run
_REACH_TIMEOUT_S = 5.0


class TrackingError(AudiotuneError, RuntimeError):
    """The tracking server cannot be used (unreachable, unknown parent run, deleted experiment)."""


def is_active(cfg: TrackingConfig) -> bool:
    """Whether this process logs: tracking enabled and rank 0 (``RANK`` unset or ``"0"``)."""
    return bool(cfg.enabled) and os.environ.get("RANK", "0") in ("", "0")


def _local_root() -> Path:
    return Path.cwd() / "mlruns"


def resolve_uri(cfg: TrackingConfig) -> str:
    """The tracking URI: ``cfg.uri``, else ``MLFLOW_TRACKING_URI``, else the local store under ``./mlruns``."""
    if cfg.uri:
        return cfg.uri
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{_local_root() / 'mlflow.db'}"


def _is_default_local(uri: str) -> bool:
    return uri == f"sqlite:///{_local_root() / 'mlflow.db'}"


def probe_health(uri: str, timeout: float) -> None:
    """GET ``<uri>/health`` of an HTTP tracking server; an HTTP error status counts as an answer.

    Authentication or routing is MLflow's business: a server that answers at all is reachable.

    Raises:
        OSError: The server does not answer (``urllib.error.URLError`` is one), or the other errors of
            :func:`urllib.request.urlopen` for a malformed URI.
    """
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout):
            pass
    except urllib.error.HTTPError:
        pass


def _check_reachable(uri: str) -> None:
    """Fail fast, with the URI in the message, when an HTTP tracking server does not answer.

    Raises:
        CredentialsInURIError: The URI carries ``user:password@`` (refused as the command line does, the
            password never shown), whoever calls (the SDK, a component).
        TrackingError: The server does not answer, or the URI is malformed.
    """
    from audiotune import credentials

    source = "MLFLOW_TRACKING_URI" if uri == os.environ.get("MLFLOW_TRACKING_URI") else "tracking.uri"
    credentials.refuse({source: uri})
    if not uri.startswith(("http://", "https://")):
        return
    try:
        probe_health(uri, _REACH_TIMEOUT_S)
    except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as err:  # InvalidURL: a bad port
        reason = credentials.redact(str(getattr(err, "reason", err)))
        raise TrackingError(f"MLflow tracking server {credentials.redact(uri)} is unreachable ({reason}); start it, "
                            "fix tracking.uri / MLFLOW_TRACKING_URI, or set tracking.enabled=false") from err


_HTTP_ENV = ("MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR",
             "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER")


@contextmanager
def bounded_requests(cfg: TrackingConfig) -> Iterator[None]:
    """Bound MLflow's HTTP requests inside the block by ``cfg.request_timeout_s`` and ``cfg.request_retries``.

    MLflow reads these limits only from its environment variables, per request; they are set for the block
    and restored after it (MLflow's defaults retry for minutes against a server that is down).
    """
    saved = {name: os.environ.get(name) for name in _HTTP_ENV}
    os.environ.update(dict(zip(_HTTP_ENV, (f"{cfg.request_timeout_s:g}", str(cfg.request_retries), "1", "0.5"),
                               strict=True)))
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _client(uri: str) -> MlflowClient:
    from mlflow import MlflowClient

    _check_reachable(uri)
    if _is_default_local(uri):
        _local_root().mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=uri)


def client_for(cfg: TrackingConfig) -> MlflowClient:
    """A client (tracking and registry) for ``cfg``'s URI; TrackingError when an HTTP server does not answer."""
    return _client(resolve_uri(cfg))


def _experiment_id(client: MlflowClient, uri: str, name: str) -> str:
    """The id of experiment ``name``, created when missing (with ``./mlruns/artifacts`` for the local store)."""
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is None:
        location = (_local_root() / "artifacts").as_uri() if _is_default_local(uri) else None
        try:
            return client.create_experiment(name, artifact_location=location)
        except MlflowException as err:  # another stage created it first
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise TrackingError(f"cannot create MLflow experiment {name!r} at {uri}: {err}") from err
    if exp.lifecycle_stage != "active":
        raise TrackingError(f"MLflow experiment {name!r} at {uri} is deleted; restore it or choose another "
                            "tracking.experiment")
    return exp.experiment_id


def start_parent_run(cfg: TrackingConfig, name: str, tags: Mapping[str, Any] | None = None) -> str | None:
    """Create the parent run of one pipeline run; stages nest under it via ``tracking.parent_run_id``.

    The run stays RUNNING; finish it with :func:`end_run`.

    Args:
        cfg: Tracking configuration.
        name: Run name shown in the MLflow UI.
        tags: Extra tags for the run.

    Returns:
        The run id, or None when tracking is off for this process.

    Raises:
        TrackingError: When the tracking server cannot be reached.
    """
    if not is_active(cfg):
        return None
    uri = resolve_uri(cfg)
    with bounded_requests(cfg):
        client = _client(uri)
        run = client.create_run(
            _experiment_id(client, uri, cfg.experiment),
            run_name=name,
            tags={k: str(v) for k, v in (tags or {}).items()},
        )
    log.info("MLflow parent run %s (%s) at %s", run.info.run_id, name, uri)
    return run.info.run_id


def end_run(cfg: TrackingConfig, run_id: str | None, status: str = "FINISHED") -> None:
    """Mark a run (typically the parent run) as ended with ``status`` (FINISHED, FAILED or KILLED)."""
    if run_id is None or not is_active(cfg):
        return
    with bounded_requests(cfg):
        _client(resolve_uri(cfg)).set_terminated(run_id, status)


def plugin_run_id() -> str | None:
    """The run the KFP MLflow plugin opened for this task (``MLFLOW_RUN_ID``), or None: a stage logs into it
    instead of opening its own, and leaves ending it to the plugin."""
    return os.environ.get(PLUGIN_RUN_ENV) or None


def spool_path(cfg: TrackingConfig, run_id: str) -> Path:
    """Where an outage keeps what run ``run_id`` could not send: ``<spool_dir>/<run id>.jsonl``."""
    return Path(cfg.spool_dir or _local_root() / "unsent") / f"{run_id}.jsonl"

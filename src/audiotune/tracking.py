"""MLflow tracking: one parent run per pipeline run, one nested run per stage.

Everything goes through an explicit :class:`mlflow.MlflowClient` bound to the resolved tracking URI,
so nothing here touches MLflow's global state. Only rank 0 logs: in a torchrun worker with
``RANK`` other than ``0``, or with tracking disabled, every call is a no-op and the tracker is inert.

Tracking URI, in order: ``TrackingConfig.uri``, the ``MLFLOW_TRACKING_URI`` environment variable, a
local store ``sqlite:///<cwd>/mlruns/mlflow.db`` with artifacts in ``<cwd>/mlruns/artifacts``.

An outage of the server during a stage does not stop the stage: requests are bounded
(``tracking.request_timeout_s``, ``request_retries``); what could not be sent is kept in order, appended to
``<spool_dir>/<run id>.jsonl``, and sent when the server answers again (tried every ``retry_every_s``); what is
still unsent at the end of the stage is reported in one warning naming that file.
"""

from __future__ import annotations

import http.client
import json
import logging
import math
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from audiotune.errors import AudiotuneError

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from audiotune.config import TrackingConfig

log = logging.getLogger(__name__)

MAX_PARAM_VALUE_LENGTH = 6000  # MLflow's limit on a parameter value
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
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=_REACH_TIMEOUT_S):
            pass
    except urllib.error.HTTPError:
        pass  # it answered; authentication or routing is MLflow's business
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


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested mappings into dotted keys: ``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def _param_value(value: Any) -> str:
    text = json.dumps(value, default=str) if isinstance(value, (list, tuple)) else str(value)
    return text[:MAX_PARAM_VALUE_LENGTH]


def final_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """A stage's end-of-run figures as metric names: numbers only, ``final_`` prefixed unless already qualified."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        out[key if key.startswith(("final_", "best_", "first_")) else f"final_{key}"] = value
    return out


def _failures() -> tuple[type[BaseException], ...]:
    """What a request to the tracking store raises when the server or the network fails."""
    import requests
    from mlflow.exceptions import MlflowException

    return MlflowException, requests.RequestException, OSError


class StageTracker:
    """Logs to one stage run; inert (every method a no-op, ``run_id`` None) when tracking is off.

    A request that fails (server down, network, timeout) does not stop the stage: the tracker keeps what it
    could not send, in order, in memory and appended to ``spool`` (JSON lines), tries again at most every
    ``retry_every_s`` (after a ``/health`` probe of an HTTP server), and sends it all once the server answers.

    Args:
        client: Client bound to the tracking URI, or None for an inert tracker.
        run_id: The stage run, or None for an inert tracker.
        uri: The tracking URI (for messages and the health probe).
        spool: File that receives what an outage kept from the server.
        retry_every_s: Least time between two attempts during an outage.
    """

    def __init__(self, client: MlflowClient | None = None, run_id: str | None = None, uri: str = "",
                 spool: Path | None = None, retry_every_s: float = 60.0) -> None:
        self._client = client
        self.run_id = run_id
        self.uri = uri
        self.spool = spool
        self.retry_every_s = retry_every_s
        self.pending: list[dict[str, Any]] = []  # batches not sent yet, oldest first
        self.outage_since: float | None = None
        self._next_try = 0.0

    @property
    def active(self) -> bool:
        """Whether this tracker logs anything."""
        return self._client is not None and self.run_id is not None

    # ----------------------------------------------------------------------------- sending, and outages
    def _post(self, batch: dict[str, Any]) -> None:
        from mlflow.entities import Metric, Param, RunTag

        self._client.log_batch(self.run_id, metrics=[Metric(*m) for m in batch.get("metrics", [])],
                               params=[Param(*p) for p in batch.get("params", [])],
                               tags=[RunTag(*t) for t in batch.get("tags", [])])

    def _send(self, batch: dict[str, Any]) -> None:
        """Send ``batch`` now, or keep it for later (during an outage, or when sending fails)."""
        if self.outage_since is None:
            try:
                self._post(batch)
                return
            except _failures() as err:
                self.outage_since = time.monotonic()
                self._next_try = self.outage_since + self.retry_every_s
                log.warning("MLflow at %s failed (%s); training goes on, and what is logged is kept in %s and "
                            "sent when the server answers again", self.uri, str(err).splitlines()[0][:300],
                            self.spool)
        self._keep(batch)
        self.flush()

    def _keep(self, batch: dict[str, Any]) -> None:
        self.pending.append(batch)
        if self.spool is not None:
            try:
                self.spool.parent.mkdir(parents=True, exist_ok=True)
                with open(self.spool, "a", encoding="utf-8") as f:
                    f.write(json.dumps(batch) + "\n")
            except OSError as err:
                log.warning("cannot write %s (%s); the unsent metrics are kept in memory only", self.spool, err)

    def _answers(self) -> bool:
        if not self.uri.startswith(("http://", "https://")):
            return True
        try:
            with urllib.request.urlopen(self.uri.rstrip("/") + "/health", timeout=2):
                return True
        except urllib.error.HTTPError:
            return True
        except (urllib.error.URLError, OSError):
            return False

    def flush(self, force: bool = False) -> bool:
        """Send what an outage kept, when the server answers (at most every ``retry_every_s`` unless
        ``force``); True when nothing is left unsent."""
        if self.outage_since is None or not self.pending:
            self.outage_since = None
            return True
        now = time.monotonic()
        if not force and now < self._next_try:
            return False
        self._next_try = now + self.retry_every_s
        if not self._answers():
            return False
        try:
            while self.pending:
                self._post(self.pending[0])
                self.pending.pop(0)
        except _failures() as err:
            log.warning("MLflow at %s still fails (%s); %d batches kept in %s", self.uri,
                        str(err).splitlines()[0][:300], len(self.pending), self.spool)
            return False
        log.info("MLflow at %s answers again after %.0f s: everything kept meanwhile was sent", self.uri,
                 now - self.outage_since)
        self.outage_since = None
        if self.spool is not None:
            self.spool.unlink(missing_ok=True)
        return True

    def unsent_summary(self) -> str:
        """What is still unsent, in words (empty when nothing is)."""
        if not self.pending:
            return ""
        steps = [m[3] for b in self.pending for m in b.get("metrics", [])]
        values = sum(len(b.get("metrics", [])) for b in self.pending)
        span = f" of steps {min(steps)}-{max(steps)}" if steps else ""
        others = sum(1 for b in self.pending if not b.get("metrics"))
        return f"{values} metric values{span} and {others} batches of params or tags"

    # ----------------------------------------------------------------------------------------- logging
    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log parameters; nested mappings become dotted keys, values are stringified and truncated."""
        if not self.active:
            return
        # one batch: MlflowClient.log_batch splits it into requests within MLflow's per-request limits
        self._send({"params": [[k, _param_value(v)] for k, v in flatten(params).items()]})

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Log numeric metrics (nested mappings become dotted keys) at ``step`` (default 0).

        Raises:
            TypeError: When a value is not a number, naming its key.
        """
        if not self.active:
            return
        from mlflow.utils.time import get_current_time_millis

        now = get_current_time_millis()
        items = []
        for key, value in flatten(metrics).items():
            try:
                number = float(value)
            except (TypeError, ValueError) as err:
                raise TypeError(f"metric {key!r} must be a number, got {value!r}") from err
            if math.isinf(number):
                log.warning("metric %s is infinite", key)
            items.append([key, number, now, step or 0])
        self._send({"metrics": items})  # MlflowClient.log_batch chunks it

    def _upload(self, what: str, call: Callable[[], Any]) -> None:
        """Upload an artifact now; during an outage it is not kept (it may be a temporary file): a warning names
        it."""
        if self.outage_since is None:
            try:
                call()
                return
            except _failures() as err:
                log.warning("MLflow at %s failed (%s)", self.uri, str(err).splitlines()[0][:300])
                self.outage_since = time.monotonic()
                self._next_try = self.outage_since + self.retry_every_s
        log.warning("%s not uploaded to MLflow run %s (the server does not answer)", what, self.run_id)

    def log_artifact(self, local_path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """Upload one file to the run's artifacts (under ``artifact_path`` when given)."""
        if self.active:
            self._upload(str(local_path), lambda: self._client.log_artifact(self.run_id, str(local_path),
                                                                            artifact_path))

    def log_artifacts(self, local_dir: str | os.PathLike, artifact_path: str | None = None) -> None:
        """Upload every file below ``local_dir`` to the run's artifacts."""
        if self.active:
            self._upload(str(local_dir), lambda: self._client.log_artifacts(self.run_id, str(local_dir),
                                                                            artifact_path))

    def log_dict(self, obj: Any, filename: str) -> None:
        """Store ``obj`` as a JSON (or YAML, by extension) artifact named ``filename``."""
        if self.active:
            self._upload(filename, lambda: self._client.log_dict(self.run_id, obj, filename))

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set run tags; values are stringified."""
        if self.active:
            self._send({"tags": [[k, str(v)] for k, v in tags.items()]})


def plugin_run_id() -> str | None:
    """The run the KFP MLflow plugin opened for this task (``MLFLOW_RUN_ID``), or None: a stage logs into it
    instead of opening its own, and leaves ending it to the plugin."""
    return os.environ.get(PLUGIN_RUN_ENV) or None


def _spool_path(cfg: TrackingConfig, run_id: str) -> Path:
    return Path(cfg.spool_dir or _local_root() / "unsent") / f"{run_id}.jsonl"


def _end(tracker: StageTracker, client: MlflowClient, status: str) -> None:
    """Flush what an outage kept and end the run; an unreachable server is reported, not raised."""
    tracker.flush(force=True)
    if tracker.run_id == plugin_run_id() and not tracker.pending:  # the KFP MLflow plugin ends its own run
        return
    if tracker.pending:
        log.warning("MLflow at %s did not answer by the end of the stage: %s of run %s were not sent; they are in "
                    "%s (metrics also in the artifact's history.json)", tracker.uri, tracker.unsent_summary(),
                    tracker.run_id, tracker.spool)
        return
    try:
        client.set_terminated(tracker.run_id, status)
    except _failures() as err:
        log.warning("MLflow at %s: cannot mark run %s %s (%s)", tracker.uri, tracker.run_id, status,
                    str(err).splitlines()[0][:300])


@contextmanager
def stage_run(cfg: TrackingConfig, stage: str) -> Iterator[StageTracker]:
    """Run a stage inside its own MLflow run, nested under ``cfg.parent_run_id`` when set.

    The run ends FINISHED when the block succeeds, FAILED when it raises (the error propagates),
    KILLED on an interrupt. Requests are bounded by :func:`bounded_requests`; an outage of the server during
    the block is survived (see :class:`StageTracker`).

    Args:
        cfg: Tracking configuration.
        stage: Stage name; the run name unless ``cfg.run_name`` is set, and the ``audiotune.stage`` tag.

    Yields:
        The tracker of the stage run (inert when tracking is off for this process).

    Raises:
        TrackingError: When the server is unreachable or the parent run does not exist at the start.
    """
    if not is_active(cfg):
        yield StageTracker()
        return
    with bounded_requests(cfg):
        uri = resolve_uri(cfg)
        client = _client(uri)
        tags = {STAGE_TAG: stage}
        if cfg.parent_run_id:
            from mlflow.exceptions import MlflowException

            try:
                experiment_id = client.get_run(cfg.parent_run_id).info.experiment_id
            except MlflowException as err:
                raise TrackingError(f"parent run {cfg.parent_run_id} not found at {uri}: {err.message}") from err
            tags[PARENT_TAG] = cfg.parent_run_id
        else:
            experiment_id = _experiment_id(client, uri, cfg.experiment)
        run_id = plugin_run_id()  # the KFP MLflow plugin's run of this task, else one of our own
        if run_id:
            client.set_tag(run_id, STAGE_TAG, stage)
        else:
            run_id = client.create_run(experiment_id, run_name=cfg.run_name or stage, tags=tags).info.run_id
        log.info("MLflow run %s for stage %s at %s", run_id, stage, uri)
        tracker = StageTracker(client, run_id, uri, _spool_path(cfg, run_id), cfg.retry_every_s)
        try:
            yield tracker
        except Exception:
            _end(tracker, client, "FAILED")
            raise
        except BaseException:
            _end(tracker, client, "KILLED")
            raise
        _end(tracker, client, "FINISHED")

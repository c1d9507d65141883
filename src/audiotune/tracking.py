"""MLflow tracking: one parent run per pipeline run, one nested run per stage.

Everything goes through an explicit :class:`mlflow.MlflowClient` bound to the resolved tracking URI,
so nothing here touches MLflow's global state. Only rank 0 logs: in a torchrun worker with
``RANK`` other than ``0``, or with tracking disabled, every call is a no-op and the tracker is inert.

Tracking URI, in order: ``TrackingConfig.uri``, the ``MLFLOW_TRACKING_URI`` environment variable, a
local store ``sqlite:///<cwd>/mlruns/mlflow.db`` with artifacts in ``<cwd>/mlruns/artifacts``.
"""

from __future__ import annotations

import json
import logging
import math
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

MAX_PARAM_VALUE_LENGTH = 6000  # MLflow's limit on a parameter value
MAX_PARAMS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000
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
    """Fail fast, with the URI in the message, when an HTTP tracking server does not answer."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=_REACH_TIMEOUT_S):
            pass
    except urllib.error.HTTPError:
        pass  # it answered; authentication or routing is MLflow's business
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise TrackingError(f"MLflow tracking server {uri} is unreachable ({reason}); start it, fix "
                            "tracking.uri / MLFLOW_TRACKING_URI, or set tracking.enabled=false") from err


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


class StageTracker:
    """Logs to one stage run; inert (every method a no-op, ``run_id`` None) when tracking is off.

    Args:
        client: Client bound to the tracking URI, or None for an inert tracker.
        run_id: The stage run, or None for an inert tracker.
    """

    def __init__(self, client: MlflowClient | None = None, run_id: str | None = None) -> None:
        self._client = client
        self.run_id = run_id

    @property
    def active(self) -> bool:
        """Whether this tracker logs anything."""
        return self._client is not None and self.run_id is not None

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log parameters; nested mappings become dotted keys, values are stringified and truncated."""
        if not self.active:
            return
        from mlflow.entities import Param

        items = [Param(k, _param_value(v)) for k, v in flatten(params).items()]
        for start in range(0, len(items), MAX_PARAMS_PER_BATCH):
            self._client.log_batch(self.run_id, params=items[start:start + MAX_PARAMS_PER_BATCH])

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Log numeric metrics (nested mappings become dotted keys) at ``step`` (default 0).

        Raises:
            TypeError: When a value is not a number, naming its key.
        """
        if not self.active:
            return
        from mlflow.entities import Metric
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
            items.append(Metric(key, number, now, step or 0))
        for start in range(0, len(items), MAX_METRICS_PER_BATCH):
            self._client.log_batch(self.run_id, metrics=items[start:start + MAX_METRICS_PER_BATCH])

    def log_artifact(self, local_path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """Upload one file to the run's artifacts (under ``artifact_path`` when given)."""
        if self.active:
            self._client.log_artifact(self.run_id, str(local_path), artifact_path)

    def log_artifacts(self, local_dir: str | os.PathLike, artifact_path: str | None = None) -> None:
        """Upload every file below ``local_dir`` to the run's artifacts."""
        if self.active:
            self._client.log_artifacts(self.run_id, str(local_dir), artifact_path)

    def log_dict(self, obj: Any, filename: str) -> None:
        """Store ``obj`` as a JSON (or YAML, by extension) artifact named ``filename``."""
        if self.active:
            self._client.log_dict(self.run_id, obj, filename)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set run tags; values are stringified."""
        if not self.active:
            return
        from mlflow.entities import RunTag

        self._client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def plugin_run_id() -> str | None:
    """The run the KFP MLflow plugin opened for this task (``MLFLOW_RUN_ID``), or None: a stage logs into it
    instead of opening its own, and leaves ending it to the plugin."""
    return os.environ.get(PLUGIN_RUN_ENV) or None


@contextmanager
def stage_run(cfg: TrackingConfig, stage: str) -> Iterator[StageTracker]:
    """Run a stage inside its own MLflow run, nested under ``cfg.parent_run_id`` when set.

    The run ends FINISHED when the block succeeds, FAILED when it raises (the error propagates),
    KILLED on an interrupt.

    Args:
        cfg: Tracking configuration.
        stage: Stage name; the run name unless ``cfg.run_name`` is set, and the ``audiotune.stage`` tag.

    Yields:
        The tracker of the stage run (inert when tracking is off for this process).

    Raises:
        TrackingError: When the server is unreachable or the parent run does not exist.
    """
    if not is_active(cfg):
        yield StageTracker()
        return
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

    def end(status: str) -> None:
        if run_id != plugin_run_id():  # the KFP MLflow plugin ends its own run
            client.set_terminated(run_id, status)

    try:
        yield StageTracker(client, run_id)
    except Exception:
        end("FAILED")
        raise
    except BaseException:
        end("KILLED")
        raise
    end("FINISHED")

"""StageTracker: logs params, metrics, tags and artifacts to one MLflow run, and survives an outage.

A request that fails (server down, network, timeout) does not stop the stage: what could not be sent is kept
in order, in memory and appended to a spool file (JSON lines), and sent once the server answers again.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from audiotune.tracking.client import probe_health

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger(__name__)

MAX_PARAM_VALUE_LENGTH = 6000  # MLflow's limit on a parameter value


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


def first_line(err: BaseException) -> str:
    """The first line of an error's message, at most 300 characters (MLflow's errors carry whole responses)."""
    return str(err).splitlines()[0][:300]


def failures() -> tuple[type[BaseException], ...]:
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

    def _outage_starts(self) -> None:
        self.outage_since = time.monotonic()
        self._next_try = self.outage_since + self.retry_every_s

    def _send(self, batch: dict[str, Any]) -> None:
        """Send ``batch`` now, or keep it for later (during an outage, or when sending fails)."""
        if self.outage_since is None:
            try:
                self._post(batch)
                return
            except failures() as err:
                self._outage_starts()
                log.warning("MLflow at %s failed (%s); training goes on, and what is logged is kept in %s and "
                            "sent when the server answers again", self.uri, first_line(err), self.spool)
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
            probe_health(self.uri, 2)
        except OSError:  # urllib.error.URLError is one
            return False
        return True

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
        except failures() as err:
            log.warning("MLflow at %s still fails (%s); %d batches kept in %s", self.uri, first_line(err),
                        len(self.pending), self.spool)
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
            except failures() as err:
                log.warning("MLflow at %s failed (%s)", self.uri, first_line(err))
                self._outage_starts()
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

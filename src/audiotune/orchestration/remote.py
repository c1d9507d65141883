"""Talking to a Kubeflow Pipelines host beyond what ``kfp.Client`` does: a reachability and auth probe
with one-line errors, the tasks of a run and their states, the last log lines of a failed task.

Kept free of ``kfp`` imports: it reads the run objects the client returns by attribute. Credentials: an explicit
bearer token, else the projected ServiceAccount token of the pod (:func:`bearer`).
"""

from __future__ import annotations

import json
import logging
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from audiotune.errors import ClusterError

log = logging.getLogger(__name__)

HEALTHZ = "/apis/v2beta1/healthz"
POD_LOGS = "/k8s/pod/logs"  # served by the Kubeflow Pipelines UI (the same host behind the usual ingress)
FINAL_STATES = ("SUCCEEDED", "FAILED", "SKIPPED", "CANCELED", "CANCELLED")
_GROUP_PREFIXES = ("exit-handler", "condition", "for-loop", "root")
SA_TOKEN_ENV = "KF_PIPELINES_SA_TOKEN_PATH"  # kfp's: a projected ServiceAccount token (audience pipelines.kubeflow.org)
SA_TOKEN_PATH = "/var/run/secrets/kubeflow/pipelines/token"  # kfp's default path of that token


class SubmitError(ClusterError, RuntimeError):
    """The Kubeflow host cannot be used (unreachable, refused credentials, an API error); one line."""


def sa_token_path() -> str | None:
    """The projected ServiceAccount token for the Kubeflow API (``$KF_PIPELINES_SA_TOKEN_PATH``, else kfp's default
    path) when that file exists: how a pod (e.g. the chart's retraining CronJob) authenticates."""
    path = os.environ.get(SA_TOKEN_ENV) or SA_TOKEN_PATH
    return path if os.path.isfile(path) else None


def bearer(token: str | None) -> str | None:
    """The bearer token to send: ``token``, else the ServiceAccount token (read each time: the kubelet rotates it)."""
    if token:
        return token
    path = sa_token_path()
    if path is None:
        return None
    with open(path, encoding="utf-8") as f:
        return f.read().strip() or None


def _headers(token: str | None, cookies: str | None) -> dict[str, str]:
    headers = {"Accept": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    if cookies:
        headers["Cookie"] = cookies
    return headers


def probe(host: str, token: str | None = None, cookies: str | None = None, timeout: float = 10.0) -> None:
    """Check that ``host`` answers the Kubeflow Pipelines API and accepts the credentials.

    Raises:
        SubmitError: Unreachable, credentials refused, or not a Kubeflow Pipelines API.
    """
    url = host.rstrip("/") + HEALTHZ
    request = urllib.request.Request(url, headers=_headers(token, cookies))
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            reply.read()
    except urllib.error.HTTPError as err:
        if err.code in (401, 403):
            raise SubmitError(f"Kubeflow Pipelines at {host} refused the credentials (HTTP {err.code}); pass a "
                              "token (--token or $KF_PIPELINES_TOKEN; in a pod, a ServiceAccount token at "
                              "$KF_PIPELINES_SA_TOKEN_PATH) or session cookies") from None
        if err.code in (302, 303, 307):
            raise SubmitError(f"Kubeflow Pipelines at {host} redirects to a login page (HTTP {err.code}); "
                              "authenticate with a token or session cookies") from None
        raise SubmitError(f"{host} answered HTTP {err.code} on {HEALTHZ}: is it a Kubeflow Pipelines "
                          "API endpoint?") from None
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise SubmitError(f"Kubeflow Pipelines at {host} is unreachable ({reason})") from None


def api_error(host: str, err: Exception) -> SubmitError:
    """One line for an error the Kubeflow client raised (an ``ApiException`` or a connection error)."""
    status = getattr(err, "status", None)
    if status in (401, 403):
        return SubmitError(f"Kubeflow Pipelines at {host} refused the credentials (HTTP {status})")
    if status is not None:
        body = getattr(err, "body", "") or ""
        try:
            message = json.loads(body).get("message") or json.loads(body).get("error") or body
        except (ValueError, AttributeError):
            message = body
        return SubmitError(f"Kubeflow Pipelines at {host}: HTTP {status} {getattr(err, 'reason', '')}: "
                           f"{str(message).strip()[:300]}")
    return SubmitError(f"Kubeflow Pipelines at {host} is unreachable ({type(err).__name__}: {err})")


def state_of(obj: Any) -> str:
    """A run's or task's state as an upper-case string ('' when unknown)."""
    state = getattr(obj, "state", None)
    return str(state or "").upper()


@dataclass
class TaskState:
    """One executor task of a run."""

    name: str
    state: str
    error: str
    pod: str | None


def tasks(run: Any) -> list[TaskState]:
    """The executor tasks of a run (DAG groups such as conditions and the exit handler left out)."""
    details = getattr(getattr(run, "run_details", None), "task_details", None) or []
    out = []
    for task in details:
        name = getattr(task, "display_name", "") or ""
        if not name or name.startswith(_GROUP_PREFIXES) or name == getattr(run, "display_name", None):
            continue
        pods = [getattr(c, "pod_name", None) for c in (getattr(task, "child_tasks", None) or [])]
        pod = getattr(task, "pod_name", None) or next((p for p in reversed(pods) if p), None)
        error = getattr(getattr(task, "error", None), "message", None) or ""
        out.append(TaskState(name, state_of(task), error, pod))
    return out


def failed_tasks(run: Any) -> list[TaskState]:
    """Tasks of a run that failed."""
    return [t for t in tasks(run) if t.state == "FAILED"]


def pod_logs(host: str, pod: str, namespace: str | None, token: str | None = None, cookies: str | None = None,
             lines: int = 30, run_id: str | None = None) -> list[str] | None:
    """The last ``lines`` log lines of a task's pod through the Kubeflow UI's log endpoint (None: not available)."""
    query = {"podname": pod}
    if namespace:
        query["podnamespace"] = namespace
    if run_id:
        query["runid"] = run_id
    url = f"{host.rstrip('/')}{POD_LOGS}?{urllib.parse.urlencode(query)}"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=_headers(token, cookies)),
                                    timeout=10) as reply:
            text = reply.read().decode("utf-8", errors="replace")
    except (urllib.error.URLError, OSError) as err:
        log.debug("no logs for %s: %s", pod, err)
        return None
    return text.rstrip("\n").splitlines()[-lines:]


def follow(get_run: Callable[[], Any], run_id: str, timeout: float, poll_s: float,
           progress: Callable[[str], None] | None, url: str) -> str:
    """Poll a run until it ends, calling ``progress`` with a line on each change of the run's or a task's state.

    Returns:
        The final state: SUCCEEDED, FAILED, CANCELED or SKIPPED.

    Raises:
        TimeoutError: The run did not end within ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    seen: dict[str, str] = {}
    while True:
        run = get_run()
        state = state_of(run)
        if progress is not None:
            for task in tasks(run):
                if seen.get(task.name) != task.state:
                    seen[task.name] = task.state
                    progress(f"{task.name}: {task.state.lower()}")
            if seen.get("<run>") != state:
                seen["<run>"] = state
                progress(f"run {run_id}: {state.lower() or 'pending'}")
        if state in FINAL_STATES:
            return "CANCELED" if state == "CANCELLED" else state
        if time.monotonic() > deadline:
            raise TimeoutError(f"run {run_id} still {state or 'pending'} after {timeout:.0f}s: {url}")
        time.sleep(poll_s)


def failure_lines(run: Any, run_id: str, logs_of: Callable[[str], list[str] | None],
                  namespace: str | None) -> list[str]:
    """Lines naming each failed task of ``run``, its error and the last lines of its pod's log (``logs_of``)."""
    failed = failed_tasks(run)
    if not failed:
        error = getattr(getattr(run, "error", None), "message", None)
        return [f"run {run_id} {state_of(run).lower()}" + (f": {error}" if error else "")]
    out = []
    for task in failed:
        out.append(f"failed task: {task.name}" + (f": {task.error}" if task.error else ""))
        logs = logs_of(task.pod) if task.pod else None
        if logs:
            out.append(f"last {len(logs)} log lines of {task.name} (pod {task.pod}):")
            out += [f"  {line}" for line in logs]
        elif task.pod:
            out.append(f"  (logs: kubectl logs -n {namespace or '<namespace>'} {task.pod} -c main)")
    return out

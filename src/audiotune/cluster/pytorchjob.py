"""Multi-node training through a Kubeflow PyTorchJob (kubeflow.org/v1, the Training Operator).

A training stage with ``cluster.num_nodes > 1`` does not schedule pods itself: it describes the job in a
:class:`JobSpec`, and :func:`run_pytorchjob` builds the manifest (one Master and ``num_nodes - 1`` Workers, the same
image and the same ``torchrun`` command, GPUs, ``/dev/shm``, secrets as environment, node selector and
tolerations), creates it, follows the master's log, waits for ``Succeeded`` or ``Failed``, cleans up, and raises
:class:`JobFailedError` with the operator's reason when the job fails.

The job's name is derived from the pipeline run id and the task name, so a retried task finds its own job:

- a job of that name that is still running is re-attached to (nothing new is created);
- one that succeeded is taken as the result (the task failed after the training, e.g. while cleaning up);
- one that failed is deleted and created again (the retry is a new attempt);
- one that belongs to another run or task (its annotations differ) is an error, never touched.

A job that runs past ``JobSpec.timeout_s`` is deleted (it would hold its GPUs otherwise; the operator's
``activeDeadlineSeconds`` is the same limit on the server side), and so is one whose task gets SIGTERM (the
pipeline run was terminated). An API server that is away for up to five minutes is waited for.

This module never imports ``kfp``: the KFP component calls :func:`run_pytorchjob`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from audiotune.errors import ClusterError
from audiotune.train.pytorchjob_manifest import (
    RUN_ID_KEY,
    TASK_KEY,
    JobSpec,
    JobStatus,
    build_manifest,
    job_command,
    job_name,
    job_status,
    write_manifest,
)

__all__ = ["JobSpec", "JobResult", "JobStatus", "PyTorchJobError", "JobFailedError", "JobTimeoutError",
           "JobConflictError", "JobCancelledError", "build_manifest", "job_command", "job_name", "job_status",
           "write_manifest", "run_pytorchjob"]

log = logging.getLogger(__name__)


class PyTorchJobError(ClusterError, RuntimeError):
    """A PyTorchJob that could not be created, followed or cleaned up; the message says what to change."""


class JobFailedError(PyTorchJobError):
    """The job reached ``Failed``; ``reason`` and ``message`` come from its status condition."""

    def __init__(self, namespace: str, name: str, reason: str, message: str, kept: bool):
        self.namespace, self.name, self.reason, self.message, self.kept = namespace, name, reason, message, kept
        where = (f"kept for debugging: kubectl -n {namespace} describe pytorchjob {name}" if kept
                 else "deleted (delete_on_failure)")
        super().__init__(f"PyTorchJob {namespace}/{name} failed: {reason}: {message} ({where})")


class JobTimeoutError(PyTorchJobError):
    """The job did not finish within the timeout; it has been deleted."""


class JobConflictError(PyTorchJobError):
    """A job of the derived name exists but belongs to another pipeline run or task."""


class JobCancelledError(PyTorchJobError):
    """This process was asked to stop (SIGTERM, e.g. the pipeline run was terminated); the job was deleted."""


@dataclass
class JobResult:
    """How a PyTorchJob ended (successfully; failures raise).

    Attributes:
        name: The job's name.
        namespace: Its namespace.
        state: ``Succeeded``.
        created: This call created the job (False: it re-attached to one from an earlier attempt).
        replaced: A failed job of the same name from an earlier attempt was deleted first.
        deleted: The job was deleted after it succeeded.
        duration_s: Seconds this call waited.
        log_lines: Lines of the master's log that were followed.
        manifest: The manifest that was (or would have been) created.
    """

    name: str
    namespace: str
    state: str
    created: bool
    replaced: bool
    deleted: bool
    duration_s: float
    log_lines: int
    manifest: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Cancelled(BaseException):
    pass


@contextlib.contextmanager
def _sigterm_cancels() -> Iterator[None]:
    """In the main thread, turn SIGTERM into :class:`_Cancelled` so the job can be deleted before exiting."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise _Cancelled()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _api_error(err, action: str, namespace: str, name: str) -> PyTorchJobError:
    from audiotune.train.kube import api_message

    detail = api_message(err)
    if err.status == 403:
        hint = (f"the service account of this pod may not {action} in namespace {namespace}; bind the audiotune "
                f"chart's Role to it (chart value rbac.extraSubjects)")
    elif err.status == 404 and action.startswith("create"):
        hint = ("is the Kubeflow Training Operator (kubeflow.org/v1 PyTorchJob CRD) installed, and does the "
                f"namespace {namespace} exist?")
    elif err.status == 422:
        hint = "the API server rejected the manifest (see the message; the manifest artifact has the full job)"
    else:
        hint = "Kubernetes API error"
    return PyTorchJobError(f"cannot {action} PyTorchJob {namespace}/{name}: HTTP {err.status}: {detail} ({hint})")


@contextlib.contextmanager
def _api(action: str, namespace: str, name: str) -> Iterator[None]:
    from kubernetes.client.exceptions import ApiException

    try:
        yield
    except ApiException as err:
        raise _api_error(err, action, namespace, name) from None


def _owned(job: dict[str, Any], spec: JobSpec) -> bool:
    notes = (job.get("metadata") or {}).get("annotations") or {}
    return notes.get(RUN_ID_KEY) == str(spec.run_id) and notes.get(TASK_KEY) == str(spec.task)


def _create_or_attach(jobs, manifest: dict[str, Any], spec: JobSpec, poll_s: float,
                      deadline: float | None) -> tuple[dict[str, Any], bool, bool]:
    """Create the job, or re-attach to / replace the one an earlier attempt left. Returns (job, created, replaced)."""
    ns, name = jobs.namespace, manifest["metadata"]["name"]
    replaced = False
    for _ in range(3):
        existing = _read_job(jobs, name, poll_s, deadline)
        if existing is not None:
            if not _owned(existing, spec):
                notes = (existing.get("metadata") or {}).get("annotations") or {}
                raise JobConflictError(
                    f"PyTorchJob {ns}/{name} exists but belongs to run {notes.get(RUN_ID_KEY)!r}, task "
                    f"{notes.get(TASK_KEY)!r} (this is run {spec.run_id!r}, task {spec.task!r}); delete it or use "
                    f"another task name")
            status = job_status(existing)
            gone = bool((existing.get("metadata") or {}).get("deletionTimestamp"))
            if not gone and status.state != "Failed":
                log.info("re-attaching to PyTorchJob %s/%s from an earlier attempt (state %s)", ns, name,
                         status.state)
                return existing, False, replaced
            if not gone:
                log.info("replacing PyTorchJob %s/%s: an earlier attempt failed (%s: %s)", ns, name,
                         status.reason, status.message)
                with _api("delete", ns, name):
                    jobs.delete(name)
            replaced = True
            budget = 600.0 if deadline is None else max(1.0, deadline - time.monotonic())
            try:
                with _api("read", ns, name):
                    jobs.wait_gone(name, min(budget, 600.0), poll_s)
            except TimeoutError as err:
                raise PyTorchJobError(str(err)) from None
        from kubernetes.client.exceptions import ApiException

        try:
            created = jobs.create(manifest)
        except ApiException as err:
            if err.status == 409:  # created meanwhile (a concurrent attempt): look again
                continue
            raise _api_error(err, "create", ns, name) from None
        log.info("created PyTorchJob %s/%s: %d node(s) x %d GPU(s)", ns, name, spec.num_nodes, spec.gpus_per_node)
        return created, True, replaced
    raise PyTorchJobError(f"PyTorchJob {ns}/{name}: kept appearing and disappearing while creating it")


TRANSIENT_STATUS = (429, 500, 502, 503, 504)
TRANSIENT_BUDGET_S = 300.0  # how long the API may be unreachable while a job runs before the task gives up


def _read_job(jobs, name: str, poll_s: float, deadline: float | None) -> dict[str, Any] | None:
    """Read the job, riding out an API server that is briefly away (restart, upgrade, overload)."""
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    give_up = time.monotonic() + TRANSIENT_BUDGET_S
    if deadline is not None:
        give_up = min(give_up, max(deadline, time.monotonic() + poll_s))
    delay = max(poll_s, 0.01)
    while True:
        try:
            return jobs.get(name)
        except ApiException as err:
            if err.status not in TRANSIENT_STATUS or time.monotonic() >= give_up:
                raise _api_error(err, "read", jobs.namespace, name) from None
            problem = f"HTTP {err.status}"
        except (HTTPError, OSError) as err:
            if time.monotonic() >= give_up:
                raise PyTorchJobError(f"cannot read PyTorchJob {jobs.namespace}/{name}: the Kubernetes API has "
                                      f"not answered for {TRANSIENT_BUDGET_S:.0f}s ({err})") from None
            problem = str(err)
        log.warning("reading PyTorchJob %s/%s failed (%s); trying again in %.0fs", jobs.namespace, name, problem,
                    delay)
        time.sleep(delay)
        delay = min(delay * 2, 30.0)


def _wait(jobs, name: str, first: dict[str, Any], deadline: float | None, poll_s: float,
          watch_s: float) -> dict[str, Any]:
    """Follow the job until Succeeded or Failed: a watch between reads, a read after every watch window."""
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    ns, job, state = jobs.namespace, first, None
    while True:
        status = job_status(job)
        if status.state != state:
            log.info("PyTorchJob %s/%s: %s%s", ns, name, status.state, f" ({status.message})" if status.message
                     else "")
            state = status.state
        if status.terminal:
            return job
        now = time.monotonic()
        if deadline is not None and now >= deadline:
            raise JobTimeoutError(f"PyTorchJob {ns}/{name} did not finish in time (still {status.state})")
        window = watch_s if deadline is None else min(watch_s, deadline - now)
        started = time.monotonic()
        try:
            for obj in jobs.watch(name, (job.get("metadata") or {}).get("resourceVersion"),
                                  max(1, int(math.ceil(window)))):
                if job_status(obj).terminal:
                    return obj
                if deadline is not None and time.monotonic() >= deadline:
                    break
        except ApiException as err:  # e.g. 410 Gone (resource version too old): read again
            log.debug("watch of %s/%s ended: %s %s", ns, name, err.status, err.reason)
        except (HTTPError, OSError) as err:  # a dropped connection: the read below decides
            log.debug("watch of %s/%s broke: %s", ns, name, err)
        pause = poll_s - (time.monotonic() - started)
        if pause > 0:
            time.sleep(pause if deadline is None else max(0.0, min(pause, deadline - time.monotonic())))
        latest = _read_job(jobs, name, poll_s, deadline)
        if latest is None:
            raise PyTorchJobError(f"PyTorchJob {ns}/{name} disappeared while running (deleted by someone else?)")
        job = latest


def _delete(jobs, name: str, why: str) -> bool:
    with _api("delete", jobs.namespace, name):
        gone = jobs.delete(name)
    log.info("deleted PyTorchJob %s/%s (%s)", jobs.namespace, name, why)
    return gone


def run_pytorchjob(spec: JobSpec, *, api_client=None, manifest_path: str | Path | None = None,
                   log_sink: Callable[[str], None] | None = None, follow_logs: bool = True,
                   poll_interval_s: float = 5.0, watch_timeout_s: float = 60.0,
                   log_drain_s: float = 30.0) -> JobResult:
    """Create (or re-attach to) the PyTorchJob for ``spec``, follow it to the end, and clean up.

    Args:
        spec: The job.
        api_client: A ``kubernetes.client.ApiClient``; default: in-cluster service account, else kubeconfig.
        manifest_path: Where to write the manifest (YAML) before creating it, e.g. an output artifact's path.
        log_sink: Receives each line of the master's log; default: this module's logger at INFO.
        follow_logs: Follow the master's log at all.
        poll_interval_s: Least time between two reads of the job (and of the master pod while it is pending).
        watch_timeout_s: Length of one watch request on the job.
        log_drain_s: After the job ends, how long the rest of the master's log may take to arrive.

    Returns:
        A :class:`JobResult` for a job that succeeded.

    Raises:
        JobFailedError: The job failed (reason and message from its Failed condition).
        JobTimeoutError: It ran past ``spec.timeout_s``; it was deleted.
        JobConflictError: A job of the same name belongs to another run or task.
        JobCancelledError: SIGTERM arrived while waiting; the job was deleted.
        PyTorchJobError: Any Kubernetes API failure, with what to change (RBAC, CRD, manifest).
    """
    from audiotune.train.kube import JobClient, LogFollower, current_namespace, load_api_client

    namespace = spec.namespace or current_namespace()
    manifest = build_manifest(spec, namespace)
    name = manifest["metadata"]["name"]
    if manifest_path is not None:
        write_manifest(manifest, manifest_path)
    if api_client is None:
        try:
            api_client = load_api_client()
        except RuntimeError as err:
            raise PyTorchJobError(str(err)) from None
    jobs = JobClient(api_client, namespace)
    started = time.monotonic()
    deadline = None if spec.timeout_s is None else started + spec.timeout_s
    sink = log_sink or (lambda line: log.info("[%s master] %s", name, line))

    job, created, replaced = _create_or_attach(jobs, manifest, spec, poll_interval_s, deadline)
    follower = LogFollower(jobs, name, sink, poll_interval_s) if follow_logs else None
    if follower is not None:
        follower.start()
    try:
        try:
            with _sigterm_cancels():
                final = _wait(jobs, name, job, deadline, poll_interval_s, watch_timeout_s)
        except BaseException:  # whatever stops the wait stops the log follower first
            if follower is not None:
                follower.abort()
            raise
    except JobTimeoutError:
        _delete(jobs, name, "timed out")
        raise JobTimeoutError(f"PyTorchJob {namespace}/{name} did not finish within {spec.timeout_s:.0f}s; "
                              f"it was deleted") from None
    except _Cancelled:
        _delete(jobs, name, "this task was stopped")
        raise JobCancelledError(f"stopped by SIGTERM while waiting for PyTorchJob {namespace}/{name}; it was "
                                f"deleted") from None
    if follower is not None:
        follower.finish()
        follower.join(log_drain_s)
        if follower.is_alive():
            log.warning("the master's log of %s did not end within %.0fs of the job", name, log_drain_s)
            follower.abort()
    status = job_status(final)
    lines = follower.lines if follower is not None else 0
    if status.state == "Failed":
        kept = not spec.delete_on_failure
        if not kept:
            _delete(jobs, name, "failed, delete_on_failure")
        raise JobFailedError(namespace, name, status.reason or "Failed", status.message or "(no message)", kept)
    deleted = _delete(jobs, name, "succeeded") if spec.delete_on_success else False
    return JobResult(name=name, namespace=namespace, state=status.state, created=created, replaced=replaced,
                     deleted=deleted, duration_s=time.monotonic() - started, log_lines=lines, manifest=manifest)

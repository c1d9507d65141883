"""Create, follow and clean up one training job on Kubernetes, whatever its kind (TrainJob or PyTorchJob).

:func:`follow_job` is the life cycle both launchers share (:mod:`audiotune.cluster.trainjob`,
:mod:`audiotune.cluster.pytorchjob`); only the manifest and the reading of its status conditions differ.

The job's name is derived from the pipeline run id and the task name, so a retried task finds its own job:

- a job of that name that is still running is re-attached to (nothing new is created);
- one that succeeded is taken as the result (the task failed after the training, e.g. while cleaning up);
- one that failed is deleted and created again (the retry is a new attempt);
- one that belongs to another run or task (its annotations differ) is an error, never touched.

A job that runs past ``JobSpec.timeout_s`` is deleted (it would hold its GPUs otherwise; the job's own
``activeDeadlineSeconds`` is the same limit on the server side), and so is one whose task gets SIGTERM (the
pipeline run was terminated). An API server that is away for up to five minutes is waited for. Node 0's log is
streamed while the job runs; a job that succeeded is deleted (``delete_on_success``), one that failed is kept for
debugging unless ``delete_on_failure``.

This module never imports ``kfp``.
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

import yaml

from audiotune.cluster.status import JobStatus, progress_line
from audiotune.errors import ClusterError

log = logging.getLogger(__name__)

RUN_ID_KEY, TASK_KEY = "audiotune.io/run-id", "audiotune.io/task"
def write_manifest(manifest: dict[str, Any], path: str | Path) -> Path:
    """Write the manifest as YAML (``kubectl apply -f`` ready) for debugging."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(manifest, sort_keys=False), encoding="utf-8")
    return path


class JobError(ClusterError, RuntimeError):
    """A training job that could not be created, followed or cleaned up; the message says what to change."""


class JobFailedError(JobError):
    """The job reached ``Failed``; ``reason`` and ``message`` come from its status condition."""

    def __init__(self, namespace: str, name: str, reason: str, message: str, kept: bool, kind: str = "PyTorchJob"):
        self.namespace, self.name, self.reason, self.message, self.kept = namespace, name, reason, message, kept
        where = (f"kept for debugging: kubectl -n {namespace} describe {kind.lower()} {name}" if kept
                 else "deleted (delete_on_failure)")
        super().__init__(f"{kind} {namespace}/{name} failed: {reason}: {message} ({where})")


class JobTimeoutError(JobError):
    """The job did not finish within the timeout; it has been deleted."""


class JobConflictError(JobError):
    """A job of the derived name exists but belongs to another pipeline run or task."""


class JobCancelledError(JobError):
    """This process was asked to stop (SIGTERM, e.g. the pipeline run was terminated); the job was deleted."""


@dataclass
class JobResult:
    """How a training job ended (successfully; failures raise).

    Attributes:
        name: The job's name.
        namespace: Its namespace.
        state: ``Succeeded`` (PyTorchJob) or ``Complete`` (TrainJob).
        created: This call created the job (False: it re-attached to one from an earlier attempt).
        replaced: A failed job of the same name from an earlier attempt was deleted first.
        deleted: The job was deleted after it succeeded.
        duration_s: Seconds this call waited.
        log_lines: Lines of node 0's log that were followed.
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


def _api_error(err, action: str, jobs, name: str) -> JobError:
    from audiotune.cluster.kube import api_message

    namespace, kind = jobs.namespace, jobs.kind

    detail = api_message(err)
    if err.status == 403:
        hint = (f"the service account of this pod may not {action} in namespace {namespace}; bind the audiotune "
                f"chart's Role to it (chart value rbac.extraSubjects)")
    elif err.status == 404 and action.startswith("create"):
        hint = f"{kind.install_hint}, and does the namespace {namespace} exist?"
    elif err.status == 422:
        hint = "the API server rejected the manifest (see the message; the manifest artifact has the full job)"
    else:
        hint = "Kubernetes API error"
    return JobError(f"cannot {action} {kind.kind} {namespace}/{name}: HTTP {err.status}: {detail} ({hint})")


@contextlib.contextmanager
def _api(action: str, jobs, name: str) -> Iterator[None]:
    from kubernetes.client.exceptions import ApiException

    try:
        yield
    except ApiException as err:
        raise _api_error(err, action, jobs, name) from None


def _owned(job: dict[str, Any], spec) -> bool:
    notes = (job.get("metadata") or {}).get("annotations") or {}
    return notes.get(RUN_ID_KEY) == str(spec.run_id) and notes.get(TASK_KEY) == str(spec.task)


def _create_or_attach(jobs, manifest: dict[str, Any], spec, poll_s: float,
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
                    f"{jobs.kind.kind} {ns}/{name} exists but belongs to run {notes.get(RUN_ID_KEY)!r}, task "
                    f"{notes.get(TASK_KEY)!r} (this is run {spec.run_id!r}, task {spec.task!r}); delete it or use "
                    f"another task name")
            status = jobs.status(existing)
            gone = bool((existing.get("metadata") or {}).get("deletionTimestamp"))
            if not gone and status.state != "Failed":
                log.info("re-attaching to %s %s/%s from an earlier attempt (state %s)", jobs.kind.kind, ns, name,
                         status.state)
                return existing, False, replaced
            if not gone:
                log.info("replacing %s %s/%s: an earlier attempt failed (%s: %s)", jobs.kind.kind, ns, name,
                         status.reason, status.message)
                with _api("delete", jobs, name):
                    jobs.delete(name)
            replaced = True
            budget = 600.0 if deadline is None else max(1.0, deadline - time.monotonic())
            try:
                with _api("read", jobs, name):
                    jobs.wait_gone(name, min(budget, 600.0), poll_s)
            except TimeoutError as err:
                raise JobError(str(err)) from None
        from kubernetes.client.exceptions import ApiException

        try:
            created = jobs.create(manifest)
        except ApiException as err:
            if err.status == 409:  # created meanwhile (a concurrent attempt): look again
                continue
            raise _api_error(err, "create", jobs, name) from None
        log.info("created %s %s/%s: %d node(s) x %d GPU(s)", jobs.kind.kind, ns, name, spec.num_nodes,
             spec.gpus_per_node)
        return created, True, replaced
    raise JobError(f"{jobs.kind.kind} {ns}/{name}: kept appearing and disappearing while creating it")


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
                raise _api_error(err, "read", jobs, name) from None
            problem = f"HTTP {err.status}"
        except (HTTPError, OSError) as err:
            if time.monotonic() >= give_up:
                raise JobError(f"cannot read {jobs.kind.kind} {jobs.namespace}/{name}: the Kubernetes API has "
                                      f"not answered for {TRANSIENT_BUDGET_S:.0f}s ({err})") from None
            problem = str(err)
        log.warning("reading %s %s/%s failed (%s); trying again in %.0fs", jobs.kind.kind, jobs.namespace, name,
                    problem, delay)
        time.sleep(delay)
        delay = min(delay * 2, 30.0)


def _wait(jobs, name: str, first: dict[str, Any], deadline: float | None, poll_s: float,
          watch_s: float) -> dict[str, Any]:
    """Follow the job until it succeeds or fails: a watch between reads, a read after every watch window."""
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    ns, job, state, progress = jobs.namespace, first, None, None
    what = jobs.kind.kind

    def show(obj: dict[str, Any]) -> JobStatus:
        nonlocal state, progress
        status = jobs.status(obj)
        if status.state != state:
            log.info("%s %s/%s: %s%s", what, ns, name, status.state, f" ({status.message})" if status.message
                     else "")
            state = status.state
        line = progress_line(obj)
        if line and line != progress:
            log.info("%s %s/%s progress: %s", what, ns, name, line)
            progress = line
        return status

    while True:
        status = show(job)
        if status.terminal:
            return job
        now = time.monotonic()
        if deadline is not None and now >= deadline:
            raise JobTimeoutError(f"{what} {ns}/{name} did not finish in time (still {status.state})")
        window = watch_s if deadline is None else min(watch_s, deadline - now)
        started = time.monotonic()
        try:
            for obj in jobs.watch(name, (job.get("metadata") or {}).get("resourceVersion"),
                                  max(1, int(math.ceil(window)))):
                if show(obj).terminal:
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
            raise JobError(f"{what} {ns}/{name} disappeared while running (deleted by someone else?)")
        job = latest


def _delete(jobs, name: str, why: str) -> bool:
    with _api("delete", jobs, name):
        gone = jobs.delete(name)
    log.info("deleted %s %s/%s (%s)", jobs.kind.kind, jobs.namespace, name, why)
    return gone


def follow_job(kind, manifest: dict[str, Any], spec, status: Callable[[dict[str, Any]], JobStatus], *,
               api_client=None, manifest_path: str | Path | None = None,
               log_sink: Callable[[str], None] | None = None, follow_logs: bool = True,
               poll_interval_s: float = 5.0, watch_timeout_s: float = 60.0,
               log_drain_s: float = 30.0) -> JobResult:
    """Create (or re-attach to) the job ``manifest`` describes, follow it to the end, and clean up.

    Args:
        kind: The job's :class:`~audiotune.cluster.kube.JobKind`.
        manifest: The job (with ``metadata.name`` and ``metadata.namespace``).
        spec: Its :class:`~audiotune.cluster.pytorchjob_manifest.JobSpec` (run, task, timeout, clean-up).
        status: Reads a job object's state from its conditions.
        api_client: A ``kubernetes.client.ApiClient``; default: in-cluster service account, else kubeconfig.
        manifest_path: Where to write the manifest (YAML) before creating it, e.g. an output artifact's path.
        log_sink: Receives each line of node 0's log; default: this module's logger at INFO.
        follow_logs: Follow node 0's log at all.
        poll_interval_s: Least time between two reads of the job (and of node 0's pod while it is pending).
        watch_timeout_s: Length of one watch request on the job.
        log_drain_s: After the job ends, how long the rest of node 0's log may take to arrive.

    Returns:
        A :class:`JobResult` for a job that succeeded.

    Raises:
        JobFailedError: The job failed (reason and message from its Failed condition).
        JobTimeoutError: It ran past ``spec.timeout_s``; it was deleted.
        JobConflictError: A job of the same name belongs to another run or task.
        JobCancelledError: SIGTERM arrived while waiting; the job was deleted.
        JobError: Any Kubernetes API failure, with what to change (RBAC, CRD, manifest).
    """
    from audiotune.cluster.kube import JobClient, LogFollower, load_api_client

    namespace, name = manifest["metadata"]["namespace"], manifest["metadata"]["name"]
    if manifest_path is not None:
        write_manifest(manifest, manifest_path)
    if api_client is None:
        try:
            api_client = load_api_client()
        except RuntimeError as err:
            raise JobError(str(err)) from None
    jobs = JobClient(api_client, namespace, kind, status)
    started = time.monotonic()
    deadline = None if spec.timeout_s is None else started + spec.timeout_s
    sink = log_sink or (lambda line: log.info("[%s node-0] %s", name, line))

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
        raise JobTimeoutError(f"{kind.kind} {namespace}/{name} did not finish within {spec.timeout_s:.0f}s; "
                              f"it was deleted") from None
    except _Cancelled:
        _delete(jobs, name, "this task was stopped")
        raise JobCancelledError(f"stopped by SIGTERM while waiting for {kind.kind} {namespace}/{name}; it was "
                                f"deleted") from None
    if follower is not None:
        follower.finish()
        follower.join(log_drain_s)
        if follower.is_alive():
            log.warning("node 0's log of %s did not end within %.0fs of the job", name, log_drain_s)
            follower.abort()
    final_status = status(final)
    lines = follower.lines if follower is not None else 0
    if final_status.state == "Failed":
        kept = not spec.delete_on_failure
        if not kept:
            _delete(jobs, name, "failed, delete_on_failure")
        raise JobFailedError(namespace, name, final_status.reason or "Failed",
                             final_status.message or "(no message)", kept, kind.kind)
    deleted = _delete(jobs, name, "succeeded") if spec.delete_on_success else False
    return JobResult(name=name, namespace=namespace, state=final_status.state, created=created, replaced=replaced,
                     deleted=deleted, duration_s=time.monotonic() - started, log_lines=lines, manifest=manifest)

"""Multi-node training through a Kubeflow PyTorchJob (kubeflow.org/v1, the Training Operator).

A training stage with ``cluster.num_nodes > 1`` does not schedule pods itself: it describes the job in a
:class:`JobSpec`, and :func:`run_pytorchjob` builds the manifest (one Master and ``num_nodes - 1`` Workers, the same
image and the same ``torchrun`` command, GPUs, ``/dev/shm``, secrets as environment, node selector and
tolerations), creates it, follows the master's log, waits for ``Succeeded`` or ``Failed``, cleans up, and raises
:class:`JobFailedError` with the operator's reason when the job fails.

Kubeflow's distribution removed the Training Operator after 26.03; this launcher stays for older clusters
(``cluster.launcher: pytorchjob``). Re-attach on retry, timeouts, SIGTERM and clean-up are
:func:`audiotune.cluster.jobs.follow_job`'s, shared with the TrainJob launcher.

This module never imports ``kfp``: the KFP component calls :func:`run_pytorchjob`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from audiotune.cluster.jobs import (
    JobCancelledError,
    JobConflictError,
    JobError,
    JobFailedError,
    JobResult,
    JobTimeoutError,
    follow_job,
    write_manifest,
)
from audiotune.cluster.pytorchjob_manifest import JobSpec, build_manifest, job_command, job_name, job_status
from audiotune.cluster.status import JobStatus

__all__ = ["JobSpec", "JobResult", "JobStatus", "PyTorchJobError", "JobFailedError", "JobTimeoutError",
           "JobConflictError", "JobCancelledError", "build_manifest", "job_command", "job_name", "job_status",
           "write_manifest", "run_pytorchjob"]

PyTorchJobError = JobError  # the name callers of this launcher catch


def run_pytorchjob(spec: JobSpec, *, api_client=None, manifest_path: str | Path | None = None,
                   log_sink: Callable[[str], None] | None = None, follow_logs: bool = True,
                   poll_interval_s: float = 5.0, watch_timeout_s: float = 60.0,
                   log_drain_s: float = 30.0) -> JobResult:
    """Create (or re-attach to) the PyTorchJob for ``spec``, follow it to the end, and clean up.

    Arguments and errors as :func:`audiotune.cluster.jobs.follow_job`; the log followed is the master's.
    """
    from audiotune.cluster.kube import PYTORCHJOB, current_namespace

    manifest = build_manifest(spec, spec.namespace or current_namespace())
    return follow_job(PYTORCHJOB, manifest, spec, job_status, api_client=api_client, manifest_path=manifest_path,
                      log_sink=log_sink, follow_logs=follow_logs, poll_interval_s=poll_interval_s,
                      watch_timeout_s=watch_timeout_s, log_drain_s=log_drain_s)

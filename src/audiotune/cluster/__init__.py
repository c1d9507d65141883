"""Launching a multi-node training on Kubernetes: a Kubeflow Trainer v2 ``TrainJob`` (the default) or a Training
Operator ``PyTorchJob`` (``cluster.launcher: pytorchjob``, for older clusters), behind one small interface.

:func:`launcher` gives the :class:`Launcher` for the ``cluster`` settings; its :meth:`~Launcher.build` returns the
manifest and :meth:`~Launcher.run` creates (or re-attaches to) the job, follows it to the end and cleans up. Both
share :func:`audiotune.cluster.jobs.follow_job`. :class:`JobSpec` describes the job for either kind.

This package never imports ``kfp``; :mod:`audiotune.orchestration.training` calls it from a pipeline task.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from audiotune.cluster.jobs import (
    JobCancelledError,
    JobConflictError,
    JobError,
    JobFailedError,
    JobResult,
    JobTimeoutError,
)
from audiotune.cluster.pytorchjob_manifest import JobSpec

__all__ = ["Launcher", "launcher", "JobSpec", "JobResult", "JobError", "JobFailedError", "JobTimeoutError",
           "JobConflictError", "JobCancelledError"]


@dataclass(frozen=True)
class Launcher:
    """One way to run a :class:`JobSpec` on several nodes.

    Attributes:
        name: ``trainjob`` or ``pytorchjob`` (``cluster.launcher``).
        kind: The job's Kubernetes kind (``TrainJob``, ``PyTorchJob``).
        options: Keyword arguments of the kind's builder and runner (TrainJob: ``runtime``, ``secret_keys``).
    """

    name: str
    kind: str
    options: dict[str, Any] = field(default_factory=dict)

    def _impl(self) -> tuple[Callable[..., dict[str, Any]], Callable[..., JobResult]]:
        if self.name == "trainjob":
            from audiotune.cluster.trainjob import build_trainjob, run_trainjob

            return build_trainjob, run_trainjob
        from audiotune.cluster.pytorchjob import build_manifest, run_pytorchjob

        return build_manifest, run_pytorchjob

    def build(self, spec: JobSpec, namespace: str | None = None) -> dict[str, Any]:
        """The job's manifest (no API call)."""
        return self._impl()[0](spec, namespace, **self.options)

    def run(self, spec: JobSpec, **kwargs: Any) -> JobResult:
        """Create or re-attach, follow to the end, clean up (keyword arguments: ``follow_job``'s)."""
        return self._impl()[1](spec, **self.options, **kwargs)


def launcher(settings) -> Launcher:
    """The launcher for a :class:`~audiotune.config.ClusterSettings` section (``cluster.launcher``)."""
    if settings.launcher == "pytorchjob":
        return Launcher("pytorchjob", "PyTorchJob")
    from audiotune.cluster.trainjob import MLFLOW_KEYS, S3_KEYS

    keys: dict[str, tuple[str, ...]] = {}
    if settings.s3_secret:
        keys[settings.s3_secret] = S3_KEYS
    if settings.mlflow_secret:
        keys[settings.mlflow_secret] = keys.get(settings.mlflow_secret, ()) + MLFLOW_KEYS
    return Launcher("trainjob", "TrainJob", {"runtime": settings.runtime, "secret_keys": keys})

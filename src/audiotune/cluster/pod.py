"""What a training node's pod holds, the same for a PyTorchJob and a TrainJob: plain core/v1 dicts from a JobSpec.

The labels and annotations of the job and its pods, the container's environment (plain settings, the model
cache variables, single Secret keys; each kind orders them itself), resources, the ``/dev/shm`` and model-cache
volumes with their mounts, and the pod security context. :mod:`audiotune.cluster.pytorchjob_manifest` places
them in a PyTorchJob's pod template; :mod:`audiotune.cluster.trainjob` reads them into the trainer API's models.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from audiotune.cluster.jobs import RUN_ID_KEY, TASK_KEY

if TYPE_CHECKING:
    from audiotune.cluster.pytorchjob_manifest import JobSpec


def _label_value(text: str) -> str:
    value = re.sub(r"[^A-Za-z0-9._-]+", "-", text)[:63]
    return re.sub(r"^[^A-Za-z0-9]+|[^A-Za-z0-9]+$", "", value)


def labels(spec: JobSpec) -> dict[str, str]:
    """The labels of the job and its pods: ours, the run and task ids, then ``spec.labels``."""
    out = {"app.kubernetes.io/name": "audiotune", "app.kubernetes.io/component": "training",
           "app.kubernetes.io/managed-by": "audiotune", RUN_ID_KEY: _label_value(spec.run_id),
           TASK_KEY: _label_value(spec.task)}
    out.update(spec.labels)
    return out


def annotations(spec: JobSpec) -> dict[str, str]:
    """The job's annotations: the run and task ids in full, then ``spec.annotations``."""
    return {RUN_ID_KEY: str(spec.run_id), TASK_KEY: str(spec.task), **spec.annotations}


def plain_env(spec: JobSpec) -> list[dict[str, Any]]:
    """``spec.env`` as variables (values as strings)."""
    return [{"name": k, "value": str(v)} for k, v in spec.env.items()]


def cache_env(spec: JobSpec) -> list[dict[str, Any]]:
    """``XDG_CACHE_HOME`` and ``HF_HOME`` in the model cache when a PVC holds it (else none)."""
    if not spec.model_cache_pvc:
        return []
    path = spec.model_cache_path.rstrip("/")
    return [{"name": "XDG_CACHE_HOME", "value": path}, {"name": "HF_HOME", "value": f"{path}/huggingface"}]


def secret_key_env(name: str, secret: str, key: str, optional: bool = False) -> dict[str, Any]:
    """Variable ``name`` from key ``key`` of Secret ``secret`` (``secretKeyRef``; ``optional`` when it may be
    missing)."""
    ref: dict[str, Any] = {"name": secret, "key": key}
    if optional:
        ref["optional"] = True
    return {"name": name, "valueFrom": {"secretKeyRef": ref}}


def resources(spec: JobSpec) -> dict[str, dict[str, Any]]:
    """``requests`` (CPU, memory, GPUs) and ``limits`` (memory, GPUs) of one node, each only when not empty."""
    requests: dict[str, Any] = {}
    limits: dict[str, Any] = {}
    if spec.cpu:
        requests["cpu"] = str(spec.cpu)
    if spec.memory:
        requests["memory"] = limits["memory"] = str(spec.memory)
    if spec.gpus_per_node > 0:
        requests[spec.gpu_resource] = limits[spec.gpu_resource] = spec.gpus_per_node
    return {k: v for k, v in (("requests", requests), ("limits", limits)) if v}


def volumes(spec: JobSpec) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The pod's volumes and the container's mounts: a memory-backed ``/dev/shm``, the model-cache PVC."""
    vols, mounts = [], []
    if spec.shm_size:
        vols.append({"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": str(spec.shm_size)}})
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
    if spec.model_cache_pvc:
        vols.append({"name": "model-cache", "persistentVolumeClaim": {"claimName": spec.model_cache_pvc}})
        mounts.append({"name": "model-cache", "mountPath": spec.model_cache_path})
    return vols, mounts


def security_context(spec: JobSpec) -> dict[str, Any] | None:
    """Non-root as ``spec.run_as_user`` (user, group and fsGroup), or None to keep the image's user."""
    if spec.run_as_user is None:
        return None
    return {"runAsNonRoot": True, "runAsUser": spec.run_as_user, "runAsGroup": spec.run_as_user,
            "fsGroup": spec.run_as_user}

"""The PyTorchJob (kubeflow.org/v1) manifest of a multi-node training: its spec, name, pods and status.

Pure functions over plain dicts, no API calls: :mod:`audiotune.cluster.pytorchjob` creates and follows the job.
The manifest is what the Kubeflow Training Operator expects: a Master (1 replica) and ``num_nodes - 1`` Workers
with the same pod template, the training container named ``pytorch`` with a port named ``pytorchjob-port``, and
a ``torchrun`` command whose ``$(RANK)``, ``$(MASTER_ADDR)`` and ``$(MASTER_PORT)`` the kubelet fills in from the
variables the operator adds to the container (see :func:`audiotune.train.launch.torchrun_command`).
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, field
from typing import Any

from audiotune.cluster import pod
from audiotune.cluster.jobs import write_manifest  # noqa: F401 - write_manifest re-exported
from audiotune.cluster.status import JobStatus, conditions_status
from audiotune.train.launch import torchrun_command

API_VERSION, KIND = "kubeflow.org/v1", "PyTorchJob"
MASTER_PORT = 23456  # the operator's default; it reads the port named pytorchjob-port
MAX_NAME_LEN = 45  # pods and services are named <job>-worker-<i>: room for the suffix within 63 characters
_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")
_LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-._A-Za-z0-9]{0,61}[A-Za-z0-9])?)?$")


@dataclass
class JobSpec:
    """Everything a PyTorchJob needs. Build it with :meth:`from_settings` from the ``cluster`` config section.

    Args:
        run_id: Pipeline run id (KFP: ``dsl.PIPELINE_JOB_ID_PLACEHOLDER``); part of the job's name.
        task: Task name (KFP: ``dsl.PIPELINE_TASK_NAME_PLACEHOLDER``, plus a loop index inside a ParallelFor).
        image: The training image (``audiotune.images.CUDA_IMAGE``).
        argv: Arguments of ``audiotune`` each node runs under torchrun, e.g. ``["train", "llm", "--tokens", ...]``.
        num_nodes: Nodes: one Master and ``num_nodes - 1`` Workers.
        gpus_per_node: GPUs requested per node and torchrun processes per node (0: one CPU process, no GPU).
        gpu_resource: Extended resource name of a GPU.
        cpu: CPU request per node (quantity), or None.
        memory: Memory request and limit per node (quantity), or None.
        shm_size: Size of the memory-backed ``/dev/shm``; None mounts none.
        node_selector: Node labels the pods must match.
        tolerations: core/v1 tolerations (camelCase keys: ``key``, ``operator``, ``value``, ``effect``, ...).
        env: Plain environment variables.
        secrets: Secrets whose keys all become environment variables (``envFrom``).
        secret_env: Single variables from Secrets: ``{"HF_TOKEN": "hf-secret:token"}`` (``secretKeyRef``).
        namespace: Namespace of the job; None: the namespace of this pod.
        service_account: ServiceAccount of the pods; None: the namespace's default.
        model_cache_pvc: PVC mounted at ``model_cache_path`` (XDG_CACHE_HOME and HF_HOME point there).
        model_cache_path: Where the model cache is mounted.
        image_pull_policy: ``Always``, ``IfNotPresent`` or ``Never``; None: the cluster's default.
        image_pull_secrets: Secrets for a private registry.
        labels: Extra labels on the job and its pods.
        annotations: Extra annotations on the job.
        restart_policy: ``OnFailure`` or ``Never`` for every replica.
        backoff_limit: Pod restarts before the job counts as failed.
        run_as_user: UID of the container (the images' non-root user is 1000); None leaves the image's.
        command: The container command; None: torchrun over ``argv`` (:func:`job_command`).
        python: Interpreter in the default command.
        delete_on_success: Delete the job when it succeeds.
        delete_on_failure: Delete the job when it fails (False keeps it and its pods for debugging).
        ttl_seconds_after_finished: Let the operator delete a finished job after this many seconds.
        timeout_s: Longest the job may run (client-side, and ``runPolicy.activeDeadlineSeconds``); None: no limit.
    """

    run_id: str
    task: str
    image: str
    argv: list[str]
    num_nodes: int = 2
    gpus_per_node: int = 1
    gpu_resource: str = "nvidia.com/gpu"
    cpu: str | None = "8"
    memory: str | None = "64Gi"
    shm_size: str | None = "16Gi"
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: list[dict[str, Any]] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    secrets: list[str] = field(default_factory=list)
    secret_env: dict[str, str] = field(default_factory=dict)
    namespace: str | None = None
    service_account: str | None = None
    model_cache_pvc: str | None = None
    model_cache_path: str = "/cache"
    image_pull_policy: str | None = None
    image_pull_secrets: list[str] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    restart_policy: str = "OnFailure"
    backoff_limit: int = 3
    run_as_user: int | None = 1000
    command: list[str] | None = None
    python: str = "python"
    delete_on_success: bool = True
    delete_on_failure: bool = False
    ttl_seconds_after_finished: int | None = None
    timeout_s: float | None = 72 * 3600.0

    def __post_init__(self) -> None:
        problems = []
        if not str(self.run_id).strip():
            problems.append("run_id is empty")
        if not str(self.task).strip():
            problems.append("task is empty")
        if not self.image:
            problems.append("image is empty")
        if self.num_nodes < 1:
            problems.append(f"num_nodes={self.num_nodes} (expected >= 1)")
        if self.gpus_per_node < 0:
            problems.append(f"gpus_per_node={self.gpus_per_node} (expected >= 0)")
        for key in ("cpu", "memory", "shm_size"):
            value = getattr(self, key)
            if value is not None and not _QUANTITY.match(str(value)):
                problems.append(f"{key}={value!r} is not a Kubernetes quantity (e.g. 8, 500m, 64Gi)")
        if self.restart_policy not in ("OnFailure", "Never"):
            problems.append(f"restart_policy={self.restart_policy!r} (expected OnFailure or Never)")
        for env, ref in self.secret_env.items():
            if ref.count(":") != 1 or not all(ref.split(":")):
                problems.append(f"secret_env[{env!r}]={ref!r} (expected 'secret-name:key')")
        for key, value in self.labels.items():
            if not _LABEL_VALUE.match(str(value)):
                problems.append(f"labels[{key!r}]={value!r} is not a valid label value")
        if self.timeout_s is not None and self.timeout_s <= 0:
            problems.append(f"timeout_s={self.timeout_s} (expected > 0 or None)")
        if problems:
            raise ValueError("invalid PyTorchJob spec: " + "; ".join(problems))

    @classmethod
    def from_settings(cls, settings, *, run_id: str, task: str, image: str, argv: list[str],
                      **overrides: Any) -> "JobSpec":
        """A spec from a :class:`audiotune.config.ClusterSettings` section; ``overrides`` replace any field."""
        secrets = [s for s in (settings.s3_secret, settings.mlflow_secret) if s] + list(settings.extra_secrets)
        tolerations = [_toleration(t.model_dump()) for t in settings.tolerations]
        node_selector = dict(settings.node_selector)
        if settings.gpu_type:
            node_selector.setdefault(settings.gpu_type_label, settings.gpu_type)
        values: dict[str, Any] = dict(
            run_id=run_id, task=task, image=image, argv=list(argv), num_nodes=settings.num_nodes,
            gpus_per_node=settings.gpus_per_node, gpu_resource=settings.gpu_resource, cpu=settings.cpu,
            memory=settings.memory, shm_size=settings.shm_size, node_selector=node_selector,
            tolerations=tolerations, secrets=secrets, secret_env=dict(settings.secret_env),
            namespace=settings.namespace,
            service_account=settings.service_account, model_cache_pvc=settings.model_cache_pvc,
            model_cache_path=settings.model_cache_path, image_pull_secrets=list(settings.image_pull_secrets),
            labels=dict(settings.labels), restart_policy=settings.restart_policy,
            backoff_limit=settings.backoff_limit, delete_on_success=settings.delete_on_success,
            delete_on_failure=settings.delete_on_failure,
            ttl_seconds_after_finished=settings.ttl_seconds_after_finished,
            timeout_s=settings.timeout_hours * 3600.0,
        )
        values.update(overrides)
        return cls(**values)


def _toleration(t: dict[str, Any]) -> dict[str, Any]:
    names = {"toleration_seconds": "tolerationSeconds"}
    return {names.get(k, k): v for k, v in t.items() if v is not None}


def _slug(text: str) -> str:
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9]+", "-", text.lower())).strip("-")


def job_name(run_id: str, task: str) -> str:
    """A DNS-1035 name (lower case, starts with a letter, at most 45 characters) for this run and task.

    ``<task>-<first 8 of the run id>-<8 hex of sha256(run id, task)>``: readable, the same on every retry of the
    task, and distinct for different runs or tasks even when the readable part is cut short.
    """
    digest = hashlib.sha256(f"{run_id}\x00{task}".encode()).hexdigest()[:8]
    run = _slug(run_id)[:8].strip("-")
    room = MAX_NAME_LEN - len(digest) - 1 - (len(run) + 1 if run else 0)
    task_part = _slug(task)[:room].strip("-")
    base = "-".join(p for p in (task_part, run) if p) or "job"
    if not base[0].isalpha():
        base = ("j" + base)[: MAX_NAME_LEN - len(digest) - 1].rstrip("-")
    return f"{base}-{digest}"


def job_command(spec: JobSpec) -> list[str]:
    """The container command: torchrun over ``audiotune <argv>`` with the operator's rendezvous variables."""
    if spec.command:
        return list(spec.command)
    return torchrun_command(max(1, spec.gpus_per_node), list(spec.argv), nnodes=spec.num_nodes,
                            python=spec.python)


def _container(spec: JobSpec) -> dict[str, Any]:
    env = pod.plain_env(spec)
    for name, ref in spec.secret_env.items():
        secret, key = ref.split(":")
        env.append(pod.secret_key_env(name, secret, key))
    env += pod.cache_env(spec)
    _, mounts = pod.volumes(spec)
    container: dict[str, Any] = {
        "name": "pytorch",
        "image": spec.image,
        "command": job_command(spec),
        "ports": [{"name": "pytorchjob-port", "containerPort": MASTER_PORT, "protocol": "TCP"}],
        "resources": pod.resources(spec),
    }
    if spec.image_pull_policy:
        container["imagePullPolicy"] = spec.image_pull_policy
    if env:
        container["env"] = env
    if spec.secrets:
        container["envFrom"] = [{"secretRef": {"name": s}} for s in spec.secrets]
    if mounts:
        container["volumeMounts"] = mounts
    return container


def _pod_template(spec: JobSpec) -> dict[str, Any]:
    template: dict[str, Any] = {"containers": [_container(spec)]}
    volumes, _ = pod.volumes(spec)
    if volumes:
        template["volumes"] = volumes
    if spec.service_account:
        template["serviceAccountName"] = spec.service_account
    if spec.node_selector:
        template["nodeSelector"] = dict(spec.node_selector)
    if spec.tolerations:
        template["tolerations"] = [dict(t) for t in spec.tolerations]
    if spec.image_pull_secrets:
        template["imagePullSecrets"] = [{"name": s} for s in spec.image_pull_secrets]
    security = pod.security_context(spec)
    if security is not None:
        template["securityContext"] = security
    return {"metadata": {"labels": pod.labels(spec)}, "spec": template}


def build_manifest(spec: JobSpec, namespace: str | None = None) -> dict[str, Any]:
    """The PyTorchJob (kubeflow.org/v1) for ``spec`` in ``namespace`` (default: ``spec.namespace``)."""
    namespace = namespace or spec.namespace or "default"
    replicas: dict[str, Any] = {
        "Master": {"replicas": 1, "restartPolicy": spec.restart_policy, "template": _pod_template(spec)}}
    if spec.num_nodes > 1:  # its own copy of the template: the same content, no shared objects
        replicas["Worker"] = {"replicas": spec.num_nodes - 1, "restartPolicy": spec.restart_policy,
                              "template": _pod_template(spec)}
    run_policy: dict[str, Any] = {"cleanPodPolicy": "None", "backoffLimit": spec.backoff_limit}
    if spec.timeout_s:
        run_policy["activeDeadlineSeconds"] = int(math.ceil(spec.timeout_s))
    if spec.ttl_seconds_after_finished is not None:
        run_policy["ttlSecondsAfterFinished"] = spec.ttl_seconds_after_finished
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {"name": job_name(spec.run_id, spec.task), "namespace": namespace, "labels": pod.labels(spec),
                     "annotations": pod.annotations(spec)},
        "spec": {"nprocPerNode": str(max(1, spec.gpus_per_node)), "runPolicy": run_policy,
                 "pytorchReplicaSpecs": replicas},
    }


def job_status(job: dict[str, Any]) -> JobStatus:
    """The state of a PyTorchJob object (``Pending`` before the operator has written any condition)."""
    return conditions_status(job, "Succeeded")


__all__ = ["JobSpec", "JobStatus", "build_manifest", "job_command", "job_name", "job_status", "write_manifest"]

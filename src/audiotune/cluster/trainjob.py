"""Multi-node training through a Kubeflow Trainer v2 ``TrainJob`` (trainer.kubeflow.org/v1alpha1, Trainer >= 2.2).

A training stage with ``cluster.num_nodes > 1`` and ``cluster.launcher: trainjob`` (the default) describes the job
in a :class:`~audiotune.cluster.pytorchjob_manifest.JobSpec`; :func:`build_trainjob` turns it into a TrainJob on the
``torch-distributed`` ClusterTrainingRuntime (not the MPI-based ``deepspeed-distributed`` one: our stages start
DeepSpeed under torchrun), and :func:`run_trainjob` creates it, streams node 0's log, follows it to ``Complete`` or
``Failed`` and cleans up (:func:`audiotune.cluster.jobs.follow_job`, shared with the PyTorchJob launcher).

What goes where:

- ``spec.trainer``: our image and command, ``numNodes``, ``numProcPerNode`` (the GPUs of a node),
  ``resourcesPerNode`` and ``env``: plain settings, the MLflow run ids (``MLFLOW_RUN_ID``, ``MLFLOW_EXPERIMENT_ID``
  and ``MLFLOW_PARENT_RUN_ID`` when the task has them) and secrets *by reference* (``secretKeyRef``: the trainer
  API has no ``envFrom``, so the S3 and MLflow Secrets' well-known keys are referenced one by one, optional).
- ``spec.runtimePatches`` (one entry, manager ``audiotune.io/launcher``): volumes (``/dev/shm``, the model cache
  PVC), node selector, tolerations, service account, image pull secrets and the pod security context, patched
  onto the runtime's ``node`` job. (``podTemplateOverrides`` was removed in Trainer 2.2.)
- The Trainer's torch plugin sets ``PET_NNODES``, ``PET_NPROC_PER_NODE``, ``PET_NODE_RANK``, ``PET_MASTER_ADDR``
  and ``PET_MASTER_PORT`` in the ``node`` container; torchrun reads its defaults from ``PET_*``, so the command is
  a plain ``python -m torch.distributed.run -m audiotune.cli ...`` without rendezvous flags.

Which client: the manifest is built from the generated ``kubeflow-trainer-api`` models (pydantic, typed, validated
on construction, the same models the ``kubeflow`` SDK builds its TrainJobs from) and sent with the official
``kubernetes`` client, rather than through the SDK's ``TrainerClient`` (``kubeflow`` 0.5.0). ``TrainerClient.train``
names jobs itself (a random name unless an option overrides it), reads the ClusterTrainingRuntime (a cluster-scoped
``get`` our namespaced Role could not grant) and a ConfigMap in ``kubeflow-system``, turns every API error into a
bare ``RuntimeError`` (the 409 / 404 / 403 that re-attach and the error hints need are lost), polls instead of
watching, and would pull in ``kubeflow-katib-api`` as well. With the models we keep a name derived from run and
task (re-attach on retry), exact HTTP statuses, a watch, and a Role of six verbs; the status is read back through
the same models (:func:`trainjob_status`).

This module never imports ``kfp``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from audiotune.cluster import pod
from audiotune.cluster.jobs import JobError, JobResult, follow_job
from audiotune.cluster.pytorchjob_manifest import JobSpec, job_name
from audiotune.cluster.status import JobStatus, conditions_status

__all__ = ["RUNTIME", "MANAGER", "S3_KEYS", "MLFLOW_KEYS", "FORWARDED_ENV", "build_trainjob", "trainjob_command",
           "trainjob_status", "run_trainjob"]

RUNTIME = "torch-distributed"
MANAGER = "audiotune.io/launcher"
NODE = "node"  # the runtime's replicated job and container of the training nodes
S3_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION")
MLFLOW_KEYS = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
               "MLFLOW_TRACKING_TOKEN")
# Set by the KFP MLflow plugin in the task's pod: passed on so rank 0 of node 0 logs into the task's run
FORWARDED_ENV = ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_PARENT_RUN_ID")


def trainjob_command(spec: JobSpec) -> list[str]:
    """The ``node`` container's command: torchrun over ``audiotune <argv>``; rendezvous from the ``PET_*`` env."""
    if spec.command:
        return list(spec.command)
    return [spec.python, "-m", "torch.distributed.run", "-m", "audiotune.cli", *spec.argv]


def _env(spec: JobSpec, secret_keys: dict[str, tuple[str, ...]]) -> list[Any]:
    from kubeflow_trainer_api import models as m

    env = pod.plain_env(spec) + pod.cache_env(spec)
    refs: dict[str, tuple[str, str, bool]] = {}
    for secret in spec.secrets:
        if secret not in secret_keys:
            raise JobError(f"Secret {secret!r}: a TrainJob's trainer has no envFrom, so every variable must be "
                           f"named; list them in cluster.secret_env (VARIABLE: secret:key)")
        for key in secret_keys[secret]:
            refs.setdefault(key, (secret, key, True))
    for name, ref in spec.secret_env.items():
        secret, key = ref.split(":")
        refs[name] = (secret, key, False)
    taken = {e["name"] for e in env}
    for name, (secret, key, optional) in refs.items():
        if name in taken:
            raise JobError(f"environment variable {name} is set both plainly and from Secret {secret!r}")
        env.append(pod.secret_key_env(name, secret, key, optional))
    return [m.IoK8sApiCoreV1EnvVar.from_dict(e) for e in env]


def _resources(spec: JobSpec):
    from kubeflow_trainer_api import models as m

    # quantities as strings: the model's Quantity takes a string (a GPU count too)
    return m.IoK8sApiCoreV1ResourceRequirements.from_dict(
        {part: {k: str(v) for k, v in values.items()} for part, values in pod.resources(spec).items()})


def _runtime_patch(spec: JobSpec):
    """Volumes, scheduling, identity and security of the ``node`` pods, as one runtime patch."""
    from kubeflow_trainer_api import models as m

    volumes, mounts = pod.volumes(spec)
    security = pod.security_context(spec)
    patch = m.TrainerV1alpha1PodSpecPatch(
        containers=[m.TrainerV1alpha1ContainerPatch(
            name=NODE, volumeMounts=[m.IoK8sApiCoreV1VolumeMount.from_dict(v) for v in mounts])] if mounts else None,
        volumes=[m.IoK8sApiCoreV1Volume.from_dict(v) for v in volumes] or None,
        nodeSelector=dict(spec.node_selector) or None,
        tolerations=[m.IoK8sApiCoreV1Toleration.from_dict(t) for t in spec.tolerations] or None,
        serviceAccountName=spec.service_account,
        imagePullSecrets=[m.IoK8sApiCoreV1LocalObjectReference(name=s) for s in spec.image_pull_secrets] or None,
        securityContext=m.IoK8sApiCoreV1PodSecurityContext.from_dict(security) if security is not None else None,
    )
    labels = m.IoK8sApimachineryPkgApisMetaV1ObjectMeta(labels=pod.labels(spec))
    job = m.TrainerV1alpha1JobTemplatePatch(spec=m.TrainerV1alpha1JobSpecPatch(
        template=m.TrainerV1alpha1PodTemplatePatch(metadata=labels, spec=patch)))
    template = m.TrainerV1alpha1JobSetTemplatePatch(spec=m.TrainerV1alpha1JobSetSpecPatch(
        replicatedJobs=[m.TrainerV1alpha1ReplicatedJobPatch(name=NODE, template=job)]))
    return m.TrainerV1alpha1RuntimePatch(manager=MANAGER, trainingRuntimeSpec=(
        m.TrainerV1alpha1TrainingRuntimeSpecPatch(template=template)))


def build_trainjob(spec: JobSpec, namespace: str | None = None, runtime: str = RUNTIME,
                   secret_keys: dict[str, tuple[str, ...]] | None = None) -> dict[str, Any]:
    """The TrainJob (trainer.kubeflow.org/v1alpha1) for ``spec`` in ``namespace``, as the API server gets it.

    Args:
        spec: The job.
        namespace: Its namespace (default: ``spec.namespace``, else ``default``).
        runtime: The ClusterTrainingRuntime (``torch-distributed``).
        secret_keys: For each Secret in ``spec.secrets``, the keys it holds (each becomes a variable of that name,
            optional); a Secret not listed is an error (the trainer API has no ``envFrom``).

    Raises:
        JobError: A Secret whose keys are unknown, or a variable set twice.
    """
    from kubeflow_trainer_api import models as m

    namespace = namespace or spec.namespace or "default"
    trainer = m.TrainerV1alpha1Trainer(
        image=spec.image, command=trainjob_command(spec), numNodes=spec.num_nodes,
        numProcPerNode=max(1, spec.gpus_per_node), resourcesPerNode=_resources(spec),
        env=_env(spec, secret_keys or {}) or None)
    job = m.TrainerV1alpha1TrainJob(
        apiVersion="trainer.kubeflow.org/v1alpha1", kind="TrainJob",
        metadata=m.IoK8sApimachineryPkgApisMetaV1ObjectMeta(name=job_name(spec.run_id, spec.task),
                                                            namespace=namespace, labels=pod.labels(spec),
                                                            annotations=pod.annotations(spec)),
        spec=m.TrainerV1alpha1TrainJobSpec(
            runtimeRef=m.TrainerV1alpha1RuntimeRef(name=runtime, kind="ClusterTrainingRuntime",
                                                   apiGroup="trainer.kubeflow.org"),
            trainer=trainer, runtimePatches=[_runtime_patch(spec)],
            activeDeadlineSeconds=int(math.ceil(spec.timeout_s)) if spec.timeout_s else None))
    return job.to_dict()


def trainjob_status(job: dict[str, Any]) -> JobStatus:
    """The state of a TrainJob object: ``Complete`` or ``Failed`` (terminal), else its latest true condition
    (``Created``, ``Suspended``, ...), ``Pending`` before the controller wrote one. The object is read through the
    trainer API models, so a malformed status is one clear error."""
    from kubeflow_trainer_api import models as m
    from pydantic import ValidationError

    try:
        m.TrainerV1alpha1TrainJobStatus.from_dict((job or {}).get("status") or {})
    except ValidationError as err:
        name = ((job or {}).get("metadata") or {}).get("name")
        raise JobError(f"TrainJob {name}: unexpected status from the API server: {err.errors()[0]['msg']}") \
            from None
    return conditions_status(job, "Complete")


def run_trainjob(spec: JobSpec, *, runtime: str = RUNTIME, secret_keys: dict[str, tuple[str, ...]] | None = None,
                 api_client=None, manifest_path: str | Path | None = None,
                 log_sink: Callable[[str], None] | None = None, follow_logs: bool = True,
                 poll_interval_s: float = 5.0, watch_timeout_s: float = 60.0,
                 log_drain_s: float = 30.0) -> JobResult:
    """Create (or re-attach to) the TrainJob for ``spec``, follow it to the end with node 0's log, and clean up.

    ``runtime`` and ``secret_keys`` as in :func:`build_trainjob`; the rest, and the errors, as
    :func:`audiotune.cluster.jobs.follow_job`.
    """
    from audiotune.cluster.kube import TRAINJOB, current_namespace

    manifest = build_trainjob(spec, spec.namespace or current_namespace(), runtime, secret_keys)
    return follow_job(TRAINJOB, manifest, spec, trainjob_status, api_client=api_client,
                      manifest_path=manifest_path, log_sink=log_sink, follow_logs=follow_logs,
                      poll_interval_s=poll_interval_s, watch_timeout_s=watch_timeout_s, log_drain_s=log_drain_s)

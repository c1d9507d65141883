"""Where the pipeline runs: the Kubeflow pipeline section and the Kubernetes cluster settings."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from audiotune.config.base import _Section

_QUANTITY = r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$"


class TolerationSettings(_Section):
    """One Kubernetes toleration (core/v1 Toleration) for the training pods."""

    key: str | None = Field(None, description="Taint key the toleration applies to; unset with Exists matches all.")
    operator: Literal["Equal", "Exists"] = Field("Equal", description="Equal compares value; Exists ignores it.")
    value: str | None = Field(None, description="Taint value to match (operator Equal).")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        None, description="Taint effect to match; unset matches every effect."
    )
    toleration_seconds: int | None = Field(
        None, ge=0, description="NoExecute only: seconds the pod stays bound after the taint appears."
    )


class ClusterSettings(_Section):
    """Where training stages run on Kubernetes: one multi-GPU pod, or several nodes through a TrainJob (Kubeflow
    Trainer v2) or a PyTorchJob (Training Operator v1)."""

    num_nodes: int = Field(
        1, ge=1, description="Nodes of a training stage. 1: the stage's own pod runs torchrun; above 1: the stage "
        "submits a job of cluster.launcher on num_nodes nodes and follows it to the end."
    )
    launcher: Literal["trainjob", "pytorchjob"] = Field(
        "trainjob", description="Job that runs a multi-node training: trainjob (Kubeflow Trainer v2 >= 2.2, "
        "trainer.kubeflow.org/v1alpha1 TrainJob on cluster.runtime) or pytorchjob (the Training Operator's "
        "kubeflow.org/v1 PyTorchJob, for clusters that still run it)."
    )
    runtime: str = Field(
        "torch-distributed", pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$",
        description="ClusterTrainingRuntime of a TrainJob; torch-distributed runs our torchrun command (not the "
        "MPI-based deepspeed-distributed).",
    )
    gpus_per_node: int = Field(
        1, ge=0, description="GPUs requested per node, and torchrun processes per node (0: one CPU process)."
    )
    gpu_resource: str = Field("nvidia.com/gpu", description="Extended resource name of a GPU on the cluster.")
    gpu_type: str | None = Field(
        None, description="GPU model to run on (e.g. NVIDIA-H100-80GB-HBM3); added to the node selector under "
        "gpu_type_label. Unset: any GPU."
    )
    gpu_type_label: str = Field(
        "nvidia.com/gpu.product", description="Node label that names the GPU model (GPU feature discovery's)."
    )
    cpu: str | None = Field("8", pattern=_QUANTITY, description="CPU request per node (Kubernetes quantity).")
    memory: str | None = Field(
        "64Gi", pattern=_QUANTITY, description="Memory request and limit per node (Kubernetes quantity)."
    )
    shm_size: str | None = Field(
        "16Gi", pattern=_QUANTITY,
        description="Size of the memory-backed /dev/shm (NCCL and data loaders need more than the default 64Mi); "
        "null: no /dev/shm volume.",
    )
    node_selector: dict[str, str] = Field(
        default_factory=dict, description="Node labels a training pod must match (e.g. a GPU node pool)."
    )
    tolerations: list[TolerationSettings] = Field(
        default_factory=list, description="Tolerations of the training pods (e.g. for tainted GPU nodes)."
    )
    namespace: str | None = Field(
        None, description="Namespace of the TrainJob / PyTorchJob; unset: the namespace of the pipeline's own pod."
    )
    service_account: str | None = Field(
        None, description="ServiceAccount of the training pods; unset: the namespace's default. The pipeline "
        "task that creates the job needs the chart's Role (trainjobs or pytorchjobs, pods, pods/log)."
    )
    s3_secret: str | None = Field(
        None, description="Secret whose keys become environment variables of every training pod (AWS_ACCESS_KEY_ID, "
        "AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, ...); the chart creates `<release>-s3`."
    )
    mlflow_secret: str | None = Field(
        None, description="Secret with the MLflow client settings (MLFLOW_TRACKING_URI, optional "
        "MLFLOW_TRACKING_USERNAME/PASSWORD/TOKEN) as environment variables; the chart creates `<release>-mlflow`."
    )
    extra_secrets: list[str] = Field(
        default_factory=list, description="More Secrets whose keys all become environment variables (PyTorchJob "
        "only: a TrainJob's trainer has no envFrom; use secret_env there)."
    )
    secret_env: dict[str, str] = Field(
        default_factory=dict, description="Single environment variables from Secrets, by reference: "
        "{VARIABLE: 'secret-name:key'}, e.g. {HF_TOKEN: 'hf:token'}; the value never enters a manifest."
    )
    workspace_size: str | None = Field(
        None, pattern=_QUANTITY, description="KFP >= 2.17 pipeline workspace: a PVC of this size that every task "
        "mounts (dsl.PipelineConfig(workspace=...)); base models are cached there and training tasks keep their "
        "checkpoints there. Unset: no workspace."
    )
    workspace_storage_class: str | None = Field(
        None, description="StorageClass of the workspace PVC (ReadWriteMany for parallel tasks); unset: the "
        "cluster's default."
    )
    model_cache_pvc: str | None = Field(
        None, description="PersistentVolumeClaim mounted at model_cache_path for downloaded base models "
        "(ReadWriteMany when num_nodes > 1); the chart creates `<release>-model-cache`."
    )
    model_cache_path: str = Field(
        "/cache", pattern=r"^/", description="Mount path of the model cache; XDG_CACHE_HOME and HF_HOME point there."
    )
    image_pull_secrets: list[str] = Field(
        default_factory=list, description="Secrets for pulling the training image from a private registry."
    )
    labels: dict[str, str] = Field(
        default_factory=dict, description="Extra labels on the job and its pods (e.g. a team or cost centre)."
    )
    restart_policy: Literal["OnFailure", "Never"] = Field(
        "OnFailure", description="PyTorchJob only: restart policy of the replicas; OnFailure restarts a crashed "
        "pod, up to backoff_limit times (a TrainJob takes both from its runtime)."
    )
    backoff_limit: int = Field(3, ge=0, description="PyTorchJob only: pod restarts before it counts as failed.")
    delete_on_success: bool = Field(True, description="Delete the TrainJob / PyTorchJob (and its pods) when it "
                                    "succeeds.")
    delete_on_failure: bool = Field(
        False, description="Delete the job when it fails; false keeps it and its pods for debugging."
    )
    ttl_seconds_after_finished: int | None = Field(
        None, ge=0, description="PyTorchJob only: let the Training Operator delete a finished job after this many "
        "seconds (a backstop for jobs kept on failure)."
    )
    timeout_hours: float = Field(
        72.0, gt=0, description="Longest a multi-node training may run; the job is then deleted and the task fails."
    )


class PipelineConfig(_Section):
    """The Kubeflow pipeline around the stages (``audiotune run --local``, ``compile``, ``submit``)."""

    mode: Literal["llm", "flow", "both", "acestep"] = Field(
        "llm", description="What to train: the LLM, the flow decoder, or both (then the joint stage when "
        "joint.train.epochs > 0); acestep: a LoRA on ACE-Step 1.5 (convert → encode → train → export, "
        "acestep.base_model)."
    )
    output_uri: str | None = Field(
        None, description="Durable location (s3:// or a shared path) of training outputs, their checkpoints and the "
        "export, under <output_uri>/<run.name>/<pipeline run id>/; a retried training task resumes from there. "
        "Unset: inside the pipeline's artifact store."
    )
    root: str | None = Field(
        None, description="Pipeline root where KFP keeps the artifacts handed between tasks (s3://... on a "
        "cluster; unset: the cluster's default). For `audiotune run --local` a local folder, default ./kfp-local."
    )
    enable_caching: bool = Field(
        True, description="Reuse the convert and tokenize outputs of an earlier run when the source data (by "
        "fingerprint) and their settings are unchanged. Training and export always run."
    )
    data_parallelism: int = Field(
        0, ge=0, le=256, description="Convert fan-out: work units converted at once, one pod each (plan, "
        "ParallelFor, merge; see docs/scaling.md). 0: one convert task, as before."
    )
    retries: int = Field(2, ge=0, le=10, description="Retries of a failed training task (it resumes from its "
                         "newest checkpoint).")
    retry_backoff_s: int = Field(60, ge=0, description="Seconds before the first retry; doubled for each next one.")

"""Cluster settings of a task, applied with ``kfp.kubernetes`` and the DSL (no effect under ``kfp.local``).

The settings are the config's ``cluster`` section (:class:`audiotune.config.ClusterSettings`), applied at compile
time; the GPU count is the ``gpus`` pipeline parameter, so that a run can change it. Credentials reach the pods
from Kubernetes Secrets as environment variables, never as pipeline parameters.
"""

from typing import Any

from kfp import kubernetes
from kfp.dsl import PipelineTask

# The keys of the S3 and MLflow Secrets that become environment variables (a key the Secret lacks is skipped).
S3_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL",
          "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION")
MLFLOW_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN",
              "MLFLOW_TRACKING_INSECURE_TLS", "MLFLOW_S3_ENDPOINT_URL")
# Other Secrets are mounted here, one folder each; the task exports their keys as environment variables.
SECRETS_DIR = "/var/run/secrets/audiotune"


def apply_common_settings(task: PipelineTask, cluster: Any, model_cache: bool = False) -> PipelineTask:
    """Settings every task gets: S3 and MLflow credentials from Secrets, other Secrets, pull secrets, pod labels.

    Args:
        task: The pipeline task.
        cluster: The config's cluster settings.
        model_cache: Mount the model-cache PVC (tasks that read base models: tokenize, training, export).
    """
    if cluster.s3_secret:
        kubernetes.use_secret_as_env(task, secret_name=cluster.s3_secret, secret_key_to_env={k: k for k in S3_ENV},
                                     optional=True)
    if cluster.mlflow_secret:
        kubernetes.use_secret_as_env(task, secret_name=cluster.mlflow_secret,
                                     secret_key_to_env={k: k for k in MLFLOW_ENV}, optional=True)
    for name in cluster.extra_secrets:
        kubernetes.use_secret_as_volume(task, secret_name=name, mount_path=f"{SECRETS_DIR}/{name}", optional=True)
    if cluster.image_pull_secrets:
        kubernetes.set_image_pull_secrets(task, list(cluster.image_pull_secrets))
    for key, value in cluster.labels.items():
        kubernetes.add_pod_label(task, key, str(value))
    if model_cache and cluster.model_cache_pvc:
        path = cluster.model_cache_path.rstrip("/")
        kubernetes.mount_pvc(task, pvc_name=cluster.model_cache_pvc, mount_path=cluster.model_cache_path)
        task.set_env_variable("XDG_CACHE_HOME", path).set_env_variable("HF_HOME", f"{path}/huggingface")
    return task


def apply_training_settings(task: PipelineTask, cluster: Any, gpus: Any, retries: int = 2,
                            backoff_s: int = 60) -> PipelineTask:
    """Settings of a training task: GPUs, CPU/memory, node selector, tolerations, a memory-backed ``/dev/shm``,
    the model-cache PVC, credentials; retries with backoff (training resumes from its newest checkpoint); no caching.

    With ``cluster.num_nodes > 1`` the task only submits and follows a TrainJob (or PyTorchJob) that gets these
    resources, so its own pod requests none of them.

    Args:
        task: The training task.
        cluster: The config's cluster settings.
        gpus: GPUs per node: the ``gpus`` pipeline parameter (or an int).
        retries: Retries of a failed task.
        backoff_s: Seconds before the first retry, doubled for each next one (at most an hour).
    """
    apply_common_settings(task, cluster, model_cache=cluster.num_nodes == 1)
    if cluster.num_nodes == 1:
        task.set_accelerator_type(cluster.gpu_resource).set_accelerator_limit(gpus)
        if cluster.cpu:
            task.set_cpu_request(cluster.cpu)
        if cluster.memory:
            task.set_memory_request(cluster.memory).set_memory_limit(cluster.memory)
        node_selector = dict(cluster.node_selector)
        if cluster.gpu_type:  # the GPU model, by the label GPU feature discovery puts on the nodes
            node_selector.setdefault(cluster.gpu_type_label, cluster.gpu_type)
        for key, value in node_selector.items():
            kubernetes.add_node_selector(task, key, value)
        for tol in cluster.tolerations:
            kubernetes.add_toleration(task, key=tol.key, operator=tol.operator, value=tol.value, effect=tol.effect,
                                      toleration_seconds=tol.toleration_seconds)
        if cluster.shm_size:
            kubernetes.empty_dir_mount(task, volume_name="dshm", mount_path="/dev/shm", medium="Memory",
                                       size_limit=cluster.shm_size)
    task.set_retry(num_retries=retries, backoff_duration=f"{backoff_s}s", backoff_factor=2.0,
                   backoff_max_duration="3600s")
    return task.set_caching_options(enable_caching=False)

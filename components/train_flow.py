"""The flow training component (see ``audiotune.stages.train_flow``), launched under torchrun."""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Metrics, Model, Output

from audiotune.images import CUDA_IMAGE


@dsl.component(base_image=CUDA_IMAGE, install_kfp_package=False, packages_to_install=[])
def train_flow(
    tokens: Input[Dataset],
    base_flow_uri: str,
    config: str,
    pipeline_run_id: str,
    model: Output[Model],
    metrics: Output[Metrics],
    job_manifest: Output[Artifact],
    workspace_path: str = "",
):
    """Train the conditional flow-matching decoder from audio tokens to mel spectrograms.

    Runs ``torchrun --nproc_per_node <gpus>`` (one process on CPU) with the DeepSpeed ZeRO
    settings of ``flow.train.deepspeed``; checkpoints let a retried task resume.

    Args:
        tokens: The Tokens artifact written by tokenize_data.
        base_flow_uri: Flow decoder to start from (local or s3://); empty uses flow.base_flow.
        config: The run's resolved config (JSON); the flow section drives this stage.
        pipeline_run_id: The Kubeflow run id, which names the durable output location.
        model: The Flow model artifact (config.json, model.safetensors).
        metrics: Steps, first/final training loss, validation loss.
        job_manifest: What was launched: the TrainJob's (or PyTorchJob's) manifest (YAML) with cluster.num_nodes > 1,
            else a YAML note with the torchrun command.
        workspace_path: The KFP workspace in this pod (dsl.WORKSPACE_PATH_PLACEHOLDER when cluster.workspace_size is
            set): the model cache and, on one node without pipeline.output_uri, the checkpoints; empty: none.
    """
    from audiotune.orchestration import steps

    steps.setup(workspace=workspace_path)
    inputs = {"--tokens": tokens.path, "--base-flow": base_flow_uri}
    outcome = steps.train("flow", config, pipeline_run_id, model.path, inputs, job_manifest.path,
                          workspace_path)
    steps.record(outcome, model, metrics)

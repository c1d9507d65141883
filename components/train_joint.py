"""The joint training component (see ``audiotune.stages.train_joint``), launched under torchrun."""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Metrics, Model, Output

from audiotune.images import CUDA_IMAGE


@dsl.component(base_image=CUDA_IMAGE, install_kfp_package=False, packages_to_install=[])
def train_joint(
    tokens: Input[Dataset],
    llm: Input[Model],
    flow: Input[Model],
    config: str,
    pipeline_run_id: str,
    llm_model: Output[Model],
    flow_model: Output[Model],
    metrics: Output[Metrics],
    job_manifest: Output[Artifact],
    workspace_path: str = "",
):
    """Train the LLM and the flow decoder together (weighted sum of both losses, lower learning rates).

    Runs ``torchrun --nproc_per_node <gpus>`` (one process on CPU) with the DeepSpeed ZeRO
    settings of ``joint.train.deepspeed``; checkpoints let a retried task resume.

    Args:
        tokens: The Tokens artifact written by tokenize_data.
        llm: The LLM model artifact written by train_llm.
        flow: The Flow model artifact written by train_flow.
        config: The run's resolved config (JSON); the joint section drives this stage.
        pipeline_run_id: The Kubeflow run id, which names the durable output location.
        llm_model: The jointly trained LLM model artifact.
        flow_model: The jointly trained Flow model artifact.
        metrics: Steps, LLM, flow and combined losses.
        job_manifest: What was launched: the TrainJob's (or PyTorchJob's) manifest (YAML) with cluster.num_nodes > 1,
            else a YAML note with the torchrun command.
        workspace_path: The KFP workspace in this pod (dsl.WORKSPACE_PATH_PLACEHOLDER when cluster.workspace_size is
            set): the model cache and, on one node without pipeline.output_uri, the checkpoints; empty: none.
    """
    from audiotune.orchestration import steps

    steps.setup(workspace=workspace_path)
    outcome = steps.train_joint(config, pipeline_run_id, tokens.path, llm.path, flow.path,
                                llm_model.path, flow_model.path, job_manifest.path, workspace_path)
    steps.record(outcome, llm_model, metrics)
    steps.record(outcome, flow_model, None)

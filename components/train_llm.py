"""The llm training component (see ``audiotune.stages.train_llm``), launched under torchrun."""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Metrics, Model, Output

from audiotune.images import CUDA_IMAGE


@dsl.component(base_image=CUDA_IMAGE, install_kfp_package=False, packages_to_install=[])
def train_llm(
    tokens: Input[Dataset],
    base_model_uri: str,
    config: str,
    pipeline_run_id: str,
    model: Output[Model],
    metrics: Output[Metrics],
    job_manifest: Output[Artifact],
    workspace_path: str = "",
):
    """Train the causal LM (LoRA, full or from scratch) on interleaved text/audio sequences.

    Runs ``torchrun --nproc_per_node <gpus>`` (one process on CPU) with the DeepSpeed ZeRO
    settings of ``llm.train.deepspeed``; checkpoints let a retried task resume.

    Args:
        tokens: The Tokens artifact written by tokenize_data.
        base_model_uri: Base causal LM (Hugging Face layout, local or s3://); empty uses llm.base_model.
        config: The run's resolved config (JSON); the llm section drives this stage.
        pipeline_run_id: The Kubeflow run id, which names the durable output location.
        model: The LLM model artifact (adapter or full model, tokenizer, metrics).
        metrics: Steps, first/final training loss, validation loss.
        job_manifest: What was launched: the TrainJob's (or PyTorchJob's) manifest (YAML) with cluster.num_nodes > 1,
            else a YAML note with the torchrun command.
        workspace_path: The KFP workspace in this pod (dsl.WORKSPACE_PATH_PLACEHOLDER when cluster.workspace_size is
            set): the model cache and, on one node without pipeline.output_uri, the checkpoints; empty: none.
    """
    from audiotune.orchestration import steps

    steps.setup(workspace=workspace_path)
    inputs = {"--tokens": tokens.path, "--base-model": base_model_uri}
    outcome = steps.train("llm", config, pipeline_run_id, model.path, inputs, job_manifest.path,
                          workspace_path)
    steps.record(outcome, model, metrics)

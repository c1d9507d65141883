"""The ACE-Step components (``mode: acestep``): encode the Dataset once, train the LoRA, export it.

See ``audiotune.stages.encode_acestep``, ``train_acestep`` and ``export_acestep``.
"""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Metrics, Model, Output

from audiotune.images import CPU_IMAGE, CUDA_IMAGE


@dsl.component(base_image=CUDA_IMAGE, install_kfp_package=False, packages_to_install=[])
def encode_acestep(
    dataset: Input[Dataset],
    config: str,
    latents: Output[Dataset],
    metrics: Output[Metrics],
    workspace_path: str = "",
):
    """Encode every song once with the base AceStepPipeline's own VAE, text encoder and condition encoder.

    Args:
        dataset: The Dataset artifact written by convert_data (an ACE-Step folder).
        config: The run's resolved config (JSON); the acestep section drives this stage (acestep.base_model).
        latents: The ACE-Step Latents artifact (VAE latents and packed conditioning per song).
        metrics: Songs encoded per split, rows skipped, seconds.
        workspace_path: The KFP workspace in this pod (the model cache); empty: none.
    """
    from audiotune.orchestration import acestep_steps, steps

    steps.setup(workspace=workspace_path)
    outcome = acestep_steps.encode(config, dataset.path, latents.path)
    steps.record(outcome, latents, metrics)


@dsl.component(base_image=CUDA_IMAGE, install_kfp_package=False, packages_to_install=[])
def train_acestep(
    latents: Input[Dataset],
    config: str,
    pipeline_run_id: str,
    model: Output[Model],
    metrics: Output[Metrics],
    job_manifest: Output[Artifact],
    workspace_path: str = "",
):
    """Train a LoRA on ACE-Step 1.5's diffusion transformer (flow matching on the cached latents).

    Runs ``torchrun --nproc_per_node <gpus>`` (one process on CPU) with ``acestep.train.deepspeed``;
    checkpoints let a retried task resume.

    Args:
        latents: The ACE-Step Latents artifact written by encode_acestep.
        config: The run's resolved config (JSON); the acestep section drives this stage.
        pipeline_run_id: The Kubeflow run id, which names the durable output location.
        model: The ACE-Step LoRA artifact (lora/pytorch_lora_weights.safetensors in diffusers' format).
        metrics: Steps, first/final training loss, validation loss.
        job_manifest: What was launched (the torchrun command, or the multi-node job's manifest).
        workspace_path: The KFP workspace in this pod (model cache, one-node checkpoints); empty: none.
    """
    from audiotune.orchestration import steps

    steps.setup(workspace=workspace_path)
    outcome = steps.train("acestep", config, pipeline_run_id, model.path, {"--tokens": latents.path},
                          job_manifest.path, workspace_path)
    steps.record(outcome, model, metrics)


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False, packages_to_install=[])
def export_acestep(
    model: Input[Model],
    config: str,
    pipeline_run_id: str,
    exported: Output[Model],
    metrics: Output[Metrics],
    workspace_path: str = "",
):
    """Check that AceStepPipeline.load_lora_weights takes the whole LoRA; package it (fused too with acestep.fuse).

    Args:
        model: The ACE-Step LoRA artifact written by train_acestep.
        config: The run's resolved config (JSON); the acestep section drives this stage.
        pipeline_run_id: The Kubeflow run id, which names the durable output location.
        exported: The export (lora/ in diffusers' format, pipeline/ when fused).
        metrics: The training metrics carried over.
        workspace_path: The KFP workspace in this pod (the model cache); empty: none.
    """
    from audiotune.orchestration import acestep_steps, steps

    steps.setup(workspace=workspace_path)
    outcome = acestep_steps.export(config, pipeline_run_id, model.path, exported.path)
    steps.record(outcome, exported, metrics)

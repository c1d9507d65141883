"""The run's bookkeeping components: resolve the config and open the MLflow parent run, nest the
data stages' runs, close the parent run (see ``audiotune.orchestration.runs``)."""

from typing import NamedTuple

from kfp import dsl

from audiotune.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False, packages_to_install=[])
def prepare_run(
    config: dict,
    source_uri: str,
    source_format: str,
    base_model_uri: str,
    base_flow_uri: str,
    mode: str,
    llm_epochs: float,
    llm_lr: float,
    flow_epochs: float,
    flow_lr: float,
    joint_epochs: float,
    joint_lr_scale: float,
    lora_r: int,
    lora_alpha: float,
    lora_targets: str,
    zero_stage: str,
    gpus: int,
    output_uri: str,
    mlflow_experiment: str,
    registered_model_name: str,
    pipeline_run_id: str,
) -> NamedTuple("Prepared", [
    ("config", str), ("convert_config", str), ("tokenize_config", str), ("parent_run_id", str), ("mode", str),
    ("run_joint", bool), ("source_uri", str), ("source_format", str), ("base_model_uri", str),
    ("llm_base_model_uri", str), ("base_flow_uri", str), ("source_fingerprint", str),
]):
    """Resolve the run's config (defaults, then these parameters, then the config mapping), validate it,
    fingerprint the source data and open the MLflow parent run. A bad config fails here, naming the field.

    Args:
        config: Config mapping for everything the typed parameters do not cover (the audiotune schema).
        source_uri: Source corpus, a manifest file or a folder, local or s3://.
        source_format: Source layout (jsonl, acestep, kaldi, text); empty autodetects it.
        base_model_uri: Base causal LM (local or s3://); empty: none.
        base_flow_uri: Base flow decoder (local or s3://); empty: train from scratch.
        mode: What to train: llm, flow or both.
        llm_epochs: Epochs of the llm stage.
        llm_lr: Peak learning rate of the llm stage.
        flow_epochs: Epochs of the flow stage.
        flow_lr: Peak learning rate of the flow stage.
        joint_epochs: Epochs of the joint stage; 0 skips it (even with joint.train.max_steps set).
        joint_lr_scale: The joint stage's learning rates are llm_lr and flow_lr times this.
        lora_r: LoRA rank.
        lora_alpha: LoRA alpha.
        lora_targets: LoRA target modules, comma-separated, or all-linear.
        zero_stage: DeepSpeed ZeRO stage of the training stages: 0-3, or auto (picked at launch).
        gpus: GPUs per training pod (0: CPU).
        output_uri: Durable location of training outputs and the export; empty: the artifact store.
        mlflow_experiment: MLflow experiment of the runs.
        registered_model_name: MLflow registered model name of the export; empty: not registered.
        pipeline_run_id: The Kubeflow run id; tags the MLflow parent run.

    Returns:
        The resolved config (whole, and the sections the cached data tasks read), the MLflow parent
        run id, the mode, whether the joint stage runs, the source and its fingerprint.
    """
    from audiotune.orchestration import steps

    steps.setup()
    typed = {k: v for k, v in locals().items() if k not in ("config", "pipeline_run_id", "steps")}
    p = steps.prepare(config, typed, pipeline_run_id)
    return (p.config, p.convert_config, p.tokenize_config, p.parent_run_id, p.mode, p.run_joint,
            p.source_uri, p.source_format, p.base_model_uri, p.llm_base_model_uri, p.base_flow_uri,
            p.source_fingerprint)


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False, packages_to_install=[])
def link_runs(config: str, convert_run_id: str, tokenize_run_id: str):
    """Nest the MLflow runs of the (cacheable) data stages under the pipeline's parent run; for a stage
    served from the Kubeflow cache, record the earlier run in a nested ``<stage> (cached)`` run.

    Args:
        config: The run's resolved config (JSON; its tracking section names the parent run).
        convert_run_id: MLflow run id returned by convert_data.
        tokenize_run_id: MLflow run id returned by tokenize_data.
    """
    from audiotune.orchestration import steps

    steps.setup()
    steps.link(config, {"convert": convert_run_id, "tokenize": tokenize_run_id})


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False, packages_to_install=[])
def finish_run(config: dict, mlflow_experiment: str, pipeline_run_id: str, status: dsl.PipelineTaskFinalStatus):
    """Exit handler: end the MLflow parent run FINISHED or FAILED (with the error), whatever happened.

    Args:
        config: The config mapping the pipeline was started with (for the tracking settings).
        mlflow_experiment: MLflow experiment of the runs.
        pipeline_run_id: The Kubeflow run id that tags the parent run.
        status: Final status of the pipeline's tasks, filled in by Kubeflow.
    """
    from audiotune.orchestration import steps

    steps.setup()
    final = {"state": status.state, "pipeline_task_name": status.pipeline_task_name,
             "error": {"message": status.error_message}}
    steps.finish(config, {"mlflow_experiment": mlflow_experiment}, pipeline_run_id, final)

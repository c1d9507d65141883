"""The fine-tuning pipeline: the DAG of docs/architecture.md.

    prepare_run ─► convert_data ─► tokenize_data ─┬─► link_runs
                                                   ├─ mode llm:  train_llm ──────────► export_model
                                                   ├─ mode flow: train_flow ─────────► export_model
                                                   └─ mode both: train_llm ∥ train_flow
                                                        ├─ joint epochs > 0: train_joint ─► export_model
                                                        └─ otherwise ────────────────────► export_model
    mode acestep: convert_data ─► encode_acestep ─► train_acestep ─► export_acestep (no tokenize)
    finish_run: the exit handler (ends the MLflow parent run, success or failure)
    pipeline.data_parallelism > 0: convert_data is plan_data ─► ParallelFor(convert_unit) ─► merge_data (same Dataset),
        tokenize_data is prepare_tokenizer ─► ParallelFor(tokenize_unit) ─► merge_tokens (same Tokens)

Every branch ends in the export, then evaluate_model (which registers the model with its eval metrics;
see components/evaluate.py); exactly one branch runs. :func:`build` makes the pipeline for a
config (its cluster settings are baked in at compile time; its values become the parameters'
defaults); :data:`finetune` is the one built from the schema defaults, compiled into
``compiled/finetune.yaml`` for upload in the Kubeflow UI.

With ``cluster.workspace_size`` the pipeline asks KFP (>= 2.17) for a workspace, a PVC of that size (and
``cluster.workspace_storage_class``) that lives as long as the run: the tasks that read base models cache them
there, and a one-node training task without ``pipeline.output_uri`` keeps its checkpoints there, so a retried task
resumes. Multi-node jobs do not see it (their pods are the TrainJob's): they keep ``model_cache_pvc`` and S3.
"""

from typing import Any, Optional

from audiotune.components import (
    apply_common_settings,
    apply_training_settings,
    convert_data,
    convert_unit,
    encode_acestep,
    evaluate_model,
    export_acestep,
    export_model,
    finish_run,
    link_runs,
    merge_data,
    merge_tokens,
    plan_data,
    prepare_run,
    prepare_tokenizer,
    tokenize_data,
    tokenize_unit,
    train_acestep,
    train_flow,
    train_joint,
    train_llm,
)
from kfp import dsl

from audiotune.config import AudiotuneConfig
from audiotune.orchestration import params

PIPELINE_NAME = "audiotune-finetune"
DESCRIPTION = ("Fine-tune an audio-token LLM and/or its flow-matching mel decoder: convert, tokenize, train "
               "(LoRA/full, DeepSpeed ZeRO), joint, export; tracked in MLflow.")


def _small(task: dsl.PipelineTask, cluster: Any, name: str, cache: bool = False,
           model_cache: bool = False) -> dsl.PipelineTask:
    """A task on the CPU image: credentials, labels, caching as given (on only for convert and tokenize)."""
    apply_common_settings(task, cluster, model_cache=model_cache)
    return task.set_display_name(name).set_caching_options(enable_caching=cache)


def convert_fanout(cfg: AudiotuneConfig, cluster: Any, cache: bool, source_uri: Any, source_format: Any,
                   source_fingerprint: Any, conf: Any) -> dsl.PipelineTask:
    """The convert stage over work units: plan_data, convert_unit per unit (``pipeline.data_parallelism`` at
    once, each retried alone, each cached on its unit id), merge_data. The merge task's outputs are
    convert_data's (``dataset``, ``Output``). With ``convert.plan_uri`` the unit tasks read the durable plan (not
    the plan artifact), so their cache keys hold across runs. The other arguments are convert_data's inputs."""
    planned = _small(plan_data(source_uri=source_uri, source_format=source_format,
                               source_fingerprint=source_fingerprint, config=conf), cluster, "plan data", cache=cache)
    durable = {} if cfg.convert.plan_uri else {"plan": planned.outputs["plan"]}
    with dsl.ParallelFor(planned.outputs["Output"], parallelism=cfg.pipeline.data_parallelism,
                         name="data-units") as unit_id:
        unit = _small(convert_unit(unit_id=unit_id, config=conf, **durable),
                      cluster, "convert unit", cache=cache)
        unit.set_retry(num_retries=cfg.pipeline.retries, backoff_duration=f"{cfg.pipeline.retry_backoff_s}s",
                       backoff_factor=2.0, backoff_max_duration="3600s")
    return _small(merge_data(plan=planned.outputs["plan"], parts=dsl.Collected(unit.outputs["part_uri"]),
                             config=conf), cluster, "merge data", cache=cache)


def tokenize_fanout(cfg: AudiotuneConfig, cluster: Any, cache: bool, merged: dsl.PipelineTask, base_model_uri: Any,
                    conf: Any, ws: dict) -> dsl.PipelineTask:
    """The tokenize stage over the convert fan-out's units: prepare_tokenizer once (the one codebook fit, on a
    sample across the units), tokenize_unit per unit's part (``pipeline.data_parallelism`` at once, retried and
    cached each), merge_tokens. ``merged`` is :func:`convert_fanout`'s merge task; the merge task returned here has
    tokenize_data's outputs (``tokens``, ``Output``)."""
    setup = _small(prepare_tokenizer(dataset_uri=merged.outputs["dataset_uri"], part_uris=merged.outputs["part_uris"],
                                     base_model_uri=base_model_uri, config=conf, **ws),
                   cluster, "prepare tokenizer", cache=cache, model_cache=True)
    with dsl.ParallelFor(setup.outputs["Output"], parallelism=cfg.pipeline.data_parallelism,
                         name="token-units") as part_uri:
        unit = _small(tokenize_unit(part_uri=part_uri, setup=setup.outputs["setup"], config=conf),
                      cluster, "tokenize unit", cache=cache)
        unit.set_retry(num_retries=cfg.pipeline.retries, backoff_duration=f"{cfg.pipeline.retry_backoff_s}s",
                       backoff_factor=2.0, backoff_max_duration="3600s")
    return _small(merge_tokens(setup=setup.outputs["setup"], parts=dsl.Collected(unit.outputs["tokens_part_uri"]),
                               config=conf),
                  cluster, "merge tokens", cache=cache)


def build(cfg: Optional[AudiotuneConfig] = None) -> Any:
    """The pipeline for ``cfg``: its values are the parameters' defaults, its cluster section the pods'.

    Args:
        cfg: A config; None builds from the schema defaults.

    Returns:
        The ``@dsl.pipeline`` function.
    """
    cfg = cfg or AudiotuneConfig()
    typed, mapping = params.split(cfg)
    cluster = cfg.cluster
    retries, backoff, cache = cfg.pipeline.retries, cfg.pipeline.retry_backoff_s, cfg.pipeline.enable_caching
    t = typed
    pipeline_config, ws = None, {}
    if cluster.workspace_size:  # KFP's per-run workspace PVC for the model cache and one-node checkpoints
        patch = {"storageClassName": cluster.workspace_storage_class} if cluster.workspace_storage_class else {}
        pipeline_config = dsl.PipelineConfig(workspace=dsl.WorkspaceConfig(
            size=cluster.workspace_size, kubernetes=dsl.KubernetesWorkspaceConfig(pvcSpecPatch=patch)))
        ws = {"workspace_path": dsl.WORKSPACE_PATH_PLACEHOLDER}

    @dsl.pipeline(name=PIPELINE_NAME, description=DESCRIPTION, pipeline_config=pipeline_config)
    def finetune(
        source_uri: str = t["source_uri"],
        source_format: str = t["source_format"],
        base_model_uri: str = t["base_model_uri"],
        base_flow_uri: str = t["base_flow_uri"],
        mode: str = t["mode"],
        llm_epochs: float = t["llm_epochs"],
        llm_lr: float = t["llm_lr"],
        flow_epochs: float = t["flow_epochs"],
        flow_lr: float = t["flow_lr"],
        joint_epochs: float = t["joint_epochs"],
        joint_lr_scale: float = t["joint_lr_scale"],
        lora_r: int = t["lora_r"],
        lora_alpha: float = t["lora_alpha"],
        lora_targets: str = t["lora_targets"],
        zero_stage: str = t["zero_stage"],
        gpus: int = t["gpus"],
        output_uri: str = t["output_uri"],
        mlflow_experiment: str = t["mlflow_experiment"],
        registered_model_name: str = t["registered_model_name"],
        config: dict = mapping,
    ):
        """Fine-tune an audio-token LLM and/or its flow decoder.

        Args:
            source_uri: Source corpus, a manifest file or a folder, local or s3://.
            source_format: Source layout (jsonl, acestep, kaldi, text); empty autodetects it.
            base_model_uri: Base causal LM (Hugging Face layout, local or s3://); its tokenizer is used. Empty: none.
            base_flow_uri: Base flow decoder to fine-tune (local or s3://). Empty: train from scratch.
            mode: What to train: llm, flow or both (then the joint stage when joint_epochs > 0), or acestep
                (ACE-Step 1.5 LoRA: convert, encode, train, export; acestep.base_model in config).
            llm_epochs: Epochs of the llm stage.
            llm_lr: Peak learning rate of the llm stage.
            flow_epochs: Epochs of the flow stage.
            flow_lr: Peak learning rate of the flow stage.
            joint_epochs: Epochs of the joint stage (mode both); 0 skips it, even when config sets
                joint.train.max_steps.
            joint_lr_scale: The joint stage's learning rates are llm_lr and flow_lr times this.
            lora_r: LoRA rank.
            lora_alpha: LoRA alpha.
            lora_targets: LoRA target modules, comma-separated, or all-linear.
            zero_stage: DeepSpeed ZeRO stage of the training stages: 0-3, or auto (picked at launch from the
                model's size, the GPUs and their memory).
            gpus: GPUs per training pod, one torchrun process each (0: CPU, one process).
            output_uri: Durable location (s3://...) of the training outputs, checkpoints and export. Empty: the
                pipeline's artifact store.
            mlflow_experiment: MLflow experiment of the runs.
            registered_model_name: MLflow registered model the export is registered as. Empty: not registered.
            config: Everything else, as a mapping in the audiotune config schema (sections run, convert,
                tokenize, llm, flow, joint, export, ...); it wins over the parameters above where both set a field.
        """
        run_id = dsl.PIPELINE_JOB_ID_PLACEHOLDER
        finish = finish_run(config=config, mlflow_experiment=mlflow_experiment, pipeline_run_id=run_id)
        _small(finish, cluster, "finish run")
        with dsl.ExitHandler(finish, name="audiotune"):
            prep = _small(prepare_run(
                config=config, source_uri=source_uri, source_format=source_format, base_model_uri=base_model_uri,
                base_flow_uri=base_flow_uri, mode=mode, llm_epochs=llm_epochs, llm_lr=llm_lr, flow_epochs=flow_epochs,
                flow_lr=flow_lr, joint_epochs=joint_epochs, joint_lr_scale=joint_lr_scale, lora_r=lora_r,
                lora_alpha=lora_alpha, lora_targets=lora_targets, zero_stage=zero_stage, gpus=gpus,
                output_uri=output_uri, mlflow_experiment=mlflow_experiment, registered_model_name=registered_model_name,
                pipeline_run_id=run_id,
            ), cluster, "prepare run")
            resolved = prep.outputs["config"]

            if cfg.pipeline.data_parallelism:  # plan ─► ParallelFor(convert_unit) ─► merge: same Dataset
                data = convert_fanout(cfg, cluster, cache, prep.outputs["source_uri"], prep.outputs["source_format"],
                                      prep.outputs["source_fingerprint"], prep.outputs["convert_config"])
            else:
                data = _small(convert_data(
                    source_uri=prep.outputs["source_uri"], source_format=prep.outputs["source_format"],
                    source_fingerprint=prep.outputs["source_fingerprint"], config=prep.outputs["convert_config"],
                ), cluster, "convert", cache=cache)
            with dsl.If(prep.outputs["mode"] == "acestep", name="mode-acestep"):
                enc = encode_acestep(dataset=data.outputs["dataset"], config=resolved, **ws)
                apply_training_settings(enc.set_display_name("encode acestep"), cluster, gpus, retries, backoff)
                ace = train_acestep(latents=enc.outputs["latents"], config=resolved, pipeline_run_id=run_id, **ws)
                apply_training_settings(ace.set_display_name("train acestep"), cluster, gpus, retries, backoff)
                _small(export_acestep(model=ace.outputs["model"], config=resolved, pipeline_run_id=run_id, **ws),
                       cluster, "export acestep", model_cache=True)
            with dsl.Else(name="mode-tts"):
                if cfg.pipeline.data_parallelism:  # prepare ─► ParallelFor(tokenize_unit) ─► merge: same Tokens
                    tok = tokenize_fanout(cfg, cluster, cache, data, prep.outputs["base_model_uri"],
                                          prep.outputs["tokenize_config"], ws)
                else:
                    tok = _small(tokenize_data(
                        dataset=data.outputs["dataset"], base_model_uri=prep.outputs["base_model_uri"],
                        config=prep.outputs["tokenize_config"], **ws,
                    ), cluster, "tokenize", cache=cache, model_cache=True)
                _small(link_runs(config=resolved, convert_run_id=data.outputs["Output"],
                                 tokenize_run_id=tok.outputs["Output"]), cluster, "link MLflow runs")
                tokens = tok.outputs["tokens"]

                def llm_task() -> dsl.PipelineTask:
                    task = train_llm(tokens=tokens, base_model_uri=prep.outputs["llm_base_model_uri"], config=resolved,
                                     pipeline_run_id=run_id, **ws)
                    return apply_training_settings(task.set_display_name("train llm"), cluster, gpus, retries, backoff)

                def flow_task() -> dsl.PipelineTask:
                    task = train_flow(tokens=tokens, base_flow_uri=prep.outputs["base_flow_uri"], config=resolved,
                                      pipeline_run_id=run_id, **ws)
                    return apply_training_settings(task.set_display_name("train flow"), cluster, gpus, retries, backoff)

                def export_task(**models: Any) -> dsl.PipelineTask:
                    task = export_model(tokens=tokens, config=resolved, pipeline_run_id=run_id, **ws, **models)
                    _small(task, cluster, "export", model_cache=True)
                    scored = evaluate_model(exported=task.outputs["exported"], config=resolved, pipeline_run_id=run_id,
                                            **ws)
                    return _small(scored, cluster, "evaluate", model_cache=True)

                with dsl.If(prep.outputs["mode"] == "llm", name="mode-llm"):
                    export_task(llm=llm_task().outputs["model"])
                with dsl.Elif(prep.outputs["mode"] == "flow", name="mode-flow"):
                    export_task(flow=flow_task().outputs["model"])
                with dsl.Else(name="mode-both"):
                    llm, flow = llm_task(), flow_task()
                    with dsl.If(prep.outputs["run_joint"] == True, name="joint"):  # noqa: E712 - a DSL condition
                        joint = train_joint(tokens=tokens, llm=llm.outputs["model"], flow=flow.outputs["model"],
                                            config=resolved, pipeline_run_id=run_id, **ws)
                        apply_training_settings(joint.set_display_name("train joint"), cluster, gpus, retries, backoff)
                        export_task(llm=joint.outputs["llm_model"], flow=joint.outputs["flow_model"])
                    with dsl.Else(name="no-joint"):
                        export_task(llm=llm.outputs["model"], flow=flow.outputs["model"])

    return finetune


finetune = build()

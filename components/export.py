"""The export component (see ``audiotune.stages.export``): merge, verify, package, upload, register."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from audiotune.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False, packages_to_install=[])
def export_model(
    tokens: Input[Dataset],
    config: str,
    pipeline_run_id: str,
    exported: Output[Model],
    metrics: Output[Metrics],
    llm: Input[Model] = None,
    flow: Input[Model] = None,
    workspace_path: str = "",
) -> str:
    """Merge LoRA into the base, verify the merge, package with tokenizers, model card and audio samples,
    upload to the output URI and register the model in MLflow.

    Args:
        tokens: The Tokens artifact (its tokenizers go into the package).
        config: The run's resolved config (JSON); the export section drives this stage.
        pipeline_run_id: The Kubeflow run id, which names the durable output location.
        exported: The Export artifact (its metadata says where it was uploaded and registered).
        metrics: Merge check, sample count, sizes.
        llm: The LLM model artifact (modes llm and both).
        flow: The Flow model artifact (modes flow and both).
        workspace_path: The KFP workspace in this pod (dsl.WORKSPACE_PATH_PLACEHOLDER when cluster.workspace_size is
            set): the model cache; empty: none.

    Returns:
        The registered model version, or an empty string when nothing was registered.
    """
    from audiotune.orchestration import steps

    steps.setup(workspace=workspace_path)
    outcome = steps.export(config, pipeline_run_id, exported.path, llm.path if llm else None,
                           flow.path if flow else None, tokens.path)
    steps.record(outcome, exported, metrics)
    return outcome.metadata.get("registered_version", "")

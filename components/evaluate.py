"""The evaluate component (see ``audiotune.stages.evaluate``): synthesize a fixed eval set with the export, score
it, publish the Eval artifact and register the model with the eval metrics."""

from kfp import dsl
from kfp.dsl import Artifact, Input, Metrics, Model, Output

from audiotune.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False, packages_to_install=[])
def evaluate_model(
    exported: Input[Model],
    config: str,
    pipeline_run_id: str,
    evaluation: Output[Artifact],
    metrics: Output[Metrics],
    workspace_path: str = "",
) -> str:
    """Evaluate the export as TTS papers do: WER/CER, speaker similarity, DNSMOS, MCD, F0 and the empty /
    truncated / max-length rates on a fixed, fingerprinted eval set; register the model with those metrics.

    Args:
        exported: The Export artifact written by export_model (its metadata says where it was uploaded).
        config: The run's resolved config (JSON); the evaluate section drives this stage.
        pipeline_run_id: The Kubeflow run id, which names the durable output location.
        evaluation: The Eval artifact: per-utterance Parquet, summary, card table, plots, WAVs.
        metrics: The summary means of every metric.
        workspace_path: The KFP workspace in this pod (dsl.WORKSPACE_PATH_PLACEHOLDER when cluster.workspace_size is
            set): the model cache and the durable output without pipeline.output_uri; empty: none.

    Returns:
        The registered model version, or an empty string when nothing was registered.
    """
    from audiotune.orchestration import steps

    steps.setup(workspace=workspace_path)
    outcome = steps.evaluate(config, pipeline_run_id, evaluation.path, exported.metadata.get("uri") or exported.path,
                             workspace_path)
    steps.record(outcome, evaluation, metrics)
    return outcome.metadata.get("registered_version", "")

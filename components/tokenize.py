"""The tokenize component: a Dataset → a Tokens artifact (see ``audiotune.stages.tokenize``)."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Output

from audiotune.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False, packages_to_install=[])
def tokenize_data(
    dataset: Input[Dataset],
    base_model_uri: str,
    config: str,
    tokens: Output[Dataset],
    metrics: Output[Metrics],
    workspace_path: str = "",
) -> str:
    """Tokenize a Dataset: text ids, discrete audio codes, target mels and speaker features.

    Args:
        dataset: The Dataset artifact written by convert_data.
        base_model_uri: Base model whose text tokenizer is used (local or s3://); empty trains one.
        config: The run, tracking and tokenize sections of the run's config (JSON).
        tokens: The Tokens artifact (tokenizers, train/val shards, report).
        metrics: Rows, audio hours, token counts, sequence lengths, throughput.
        workspace_path: The KFP workspace in this pod (dsl.WORKSPACE_PATH_PLACEHOLDER when cluster.workspace_size is
            set): the model cache; empty: none.

    Returns:
        The id of the stage's MLflow run (nested under the pipeline's run by link_runs).
    """
    from audiotune.orchestration import steps

    steps.setup(workspace=workspace_path)
    outcome = steps.tokenize(config, dataset.path, base_model_uri, tokens.path)
    steps.record(outcome, tokens, metrics)
    return outcome.run_id

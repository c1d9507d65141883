"""The convert component: a source corpus → a Dataset artifact (see ``audiotune.stages.convert``)."""

from kfp import dsl
from kfp.dsl import Dataset, Metrics, Output

from audiotune.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False, packages_to_install=[])
def convert_data(
    source_uri: str,
    source_format: str,
    source_fingerprint: str,
    config: str,
    dataset: Output[Dataset],
    metrics: Output[Metrics],
) -> str:
    """Convert a source corpus into a Dataset artifact: decode, resample, validate, split, Parquet shards.

    Args:
        source_uri: Source corpus, a manifest file or a folder, local or s3://.
        source_format: Source layout (jsonl, acestep, kaldi, text); empty autodetects it.
        source_fingerprint: Fingerprint of the source files. Part of the cache key, so that changed
            data re-runs this task while unchanged data reuses the cached Dataset.
        config: The run, tracking and convert sections of the run's config (JSON).
        dataset: The Dataset artifact (train/val Parquet shards, quarantine, report).
        metrics: Rows kept and quarantined, hours of audio, throughput.

    Returns:
        The id of the stage's MLflow run (nested under the pipeline's run by link_runs).
    """
    from audiotune.orchestration import steps

    steps.setup()
    outcome = steps.convert(config, source_uri, source_format, dataset.path)
    steps.record(outcome, dataset, metrics)
    return outcome.run_id

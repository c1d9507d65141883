"""The convert fan-out components (``pipeline.data_parallelism > 0``): plan the source into work units,
convert each unit in its own task (``dsl.ParallelFor``), merge the parts into one Dataset.

See ``audiotune.stages.convert_units`` and ``audiotune.orchestration.data_fanout``.
"""

from typing import List, Optional

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Metrics, Output

from audiotune.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False, packages_to_install=[])
def plan_data(
    source_uri: str,
    source_format: str,
    source_fingerprint: str,
    config: str,
    plan: Output[Artifact],
) -> List[str]:
    """List the source page by page (no download of its audio) and cut it into work units of bounded size.

    Args:
        source_uri: Source corpus, a manifest file or a folder, local or s3://.
        source_format: Source layout (jsonl, acestep, kaldi, text); empty autodetects it.
        source_fingerprint: Fingerprint of the source files (part of the cache key).
        config: The run, tracking and convert sections of the run's config (JSON); convert.unit_max_bytes,
            unit_max_rows, max_units and plan_uri shape the plan.
        plan: The plan (plan.json and one file per unit).

    Returns:
        The unit ids (hashes of their records): the items of the fan-out.
    """
    from audiotune.orchestration import data_fanout, steps

    steps.setup()
    return data_fanout.plan(config, source_uri, source_format, plan.path)


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False, packages_to_install=[])
def convert_unit(
    unit_id: str,
    config: str,
    part: Output[Dataset],
    metrics: Output[Metrics],
    plan: Optional[Input[Artifact]] = None,
):
    """Convert one work unit: stream its audio (ranged GETs, at most convert.max_local_disk_bytes on disk),
    decode, validate, split by id hash, write its Parquet shards, quarantine and partial report.

    Args:
        unit_id: The unit (a hash of its records and their audio's ETags): with the config, the cache key.
        config: The run, tracking and convert sections of the run's config (JSON); with convert.plan_uri the
            unit is read from that durable plan.
        part: The unit's part of the Dataset.
        metrics: Rows, seconds, S3 bytes read, peak spool bytes and RSS of the unit.
        plan: The plan artifact (when convert.plan_uri is unset).
    """
    from audiotune.orchestration import data_fanout, steps

    steps.setup()
    outcome = data_fanout.convert_unit(config, plan.path if plan else "", unit_id, part.path)
    steps.record(outcome, part, metrics)


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False, packages_to_install=[])
def merge_data(
    plan: Input[Artifact],
    parts: Input[List[Dataset]],
    config: str,
    dataset: Output[Dataset],
    metrics: Output[Metrics],
) -> str:
    """Merge the units' parts into one Dataset: every shard in the manifest (rows, sha256), reports summed,
    quarantines concatenated, published atomically.

    Args:
        plan: The plan the parts were converted from (every unit must have its part).
        parts: The parts written by convert_unit (dsl.Collected over the fan-out).
        config: The run, tracking and convert sections of the run's config (JSON).
        dataset: The Dataset artifact, as convert_data writes it.
        metrics: Rows kept and quarantined, hours, S3 bytes read, peak disk and RSS of a unit.

    Returns:
        The id of the merge's MLflow run (the convert stage's run, nested under the pipeline's run by link_runs).
    """
    from audiotune.orchestration import data_fanout, steps

    steps.setup()
    outcome = data_fanout.merge(config, plan.path, [p.path for p in parts], dataset.path)
    steps.record(outcome, dataset, metrics)
    return outcome.run_id

"""The data fan-out components (``pipeline.data_parallelism > 0``): plan the source into work units,
convert each unit in its own task (``dsl.ParallelFor``), merge the parts into one Dataset; then set the
tokenizers up once, tokenize each unit's part in its own task, merge the parts into one Tokens artifact.

See ``audiotune.stages.convert_units``, ``audiotune.stages.tokenize_units`` and
``audiotune.orchestration.data_fanout``.
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
    part_uri: dsl.OutputPath(str),
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
    data_fanout.write_parameter(part_uri, data_fanout.readable_uri(part.uri))


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False, packages_to_install=[])
def merge_data(
    plan: Input[Artifact],
    parts: List[str],
    config: str,
    dataset: Output[Dataset],
    metrics: Output[Metrics],
    dataset_uri: dsl.OutputPath(str),
    part_uris: dsl.OutputPath(list),
) -> str:
    """Merge the units' parts into one Dataset: every shard in the manifest (rows, sha256), reports summed,
    quarantines concatenated, published atomically.

    Args:
        plan: The plan the parts were converted from (every unit must have its part).
        parts: The URIs of the parts written by convert_unit (dsl.Collected over the fan-out): parameters, not
            input artifacts, so that KFP's launcher does not download the corpus to this pod first.
        config: The run, tracking and convert sections of the run's config (JSON).
        dataset: The Dataset artifact, as convert_data writes it (published straight to its URI when that is on
            S3: the parts' shards are copied server side).
        metrics: Rows kept and quarantined, hours, S3 bytes read, peak disk and RSS of a unit.
        dataset_uri: The Dataset's URI (the tokenize fan-out reads its manifest only).
        part_uris: The parts' URIs (each tokenize unit fetches its own part only).

    Returns:
        The id of the merge's MLflow run (the convert stage's run, nested under the pipeline's run by link_runs).
    """
    from audiotune.orchestration import data_fanout, steps

    steps.setup()
    outcome = data_fanout.merge(config, plan.path, parts, data_fanout.publish_target(dataset.uri, dataset.path))
    steps.record(outcome, dataset, metrics)
    data_fanout.hand_on(dataset_uri, dataset.uri, part_uris, parts)
    return outcome.run_id


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False, packages_to_install=[])
def prepare_tokenizer(
    dataset_uri: str,
    part_uris: List[str],
    base_model_uri: str,
    config: str,
    setup: Output[Artifact],
    workspace_path: str = "",
) -> List[str]:
    """Build the tokenizers once for the tokenize fan-out: the text tokenizer, the speaker table and the one
    codebook fit of the built-in tokenizer, on a sample drawn across the units (bounded per unit, seeded).

    Args:
        dataset_uri: The merged Dataset (its manifest: the units in plan order, the fingerprint).
        part_uris: The convert parts, one per unit.
        base_model_uri: Base model whose text tokenizer is used (local or s3://); empty trains one.
        config: The run, tracking and tokenize sections of the run's config (JSON).
        setup: The set-up (tokenizer/ and setup.json) every tokenize_unit uses.
        workspace_path: The KFP workspace in this pod (the model cache); empty: none.

    Returns:
        The parts' URIs in plan order: the items of the tokenize fan-out.
    """
    from audiotune.orchestration import data_fanout, steps

    steps.setup(workspace=workspace_path)
    return data_fanout.prepare_tokenizer(config, dataset_uri, part_uris, base_model_uri, setup.path)


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False, packages_to_install=[])
def tokenize_unit(
    part_uri: str,
    setup: Input[Artifact],
    config: str,
    part: Output[Dataset],
    metrics: Output[Metrics],
    tokens_part_uri: dsl.OutputPath(str),
):
    """Tokenize one unit's convert part with the set-up's tokenizers: text ids, audio codes, mels, speaker
    features, its shards, quarantine and partial report.

    Args:
        part_uri: The unit's convert part (fetched by this task alone).
        setup: The tokenizer set-up written by prepare_tokenizer.
        config: The run, tracking and tokenize sections of the run's config (JSON).
        part: The unit's part of the Tokens.
        metrics: Rows, audio seconds, seconds and peak RSS of the unit.
        tokens_part_uri: The URI of ``part`` (merge_tokens reads the parts by URI).
    """
    from audiotune.orchestration import data_fanout, steps

    steps.setup()
    outcome = data_fanout.tokenize_unit(config, setup.path, part_uri, part.path)
    steps.record(outcome, part, metrics)
    data_fanout.write_parameter(tokens_part_uri, data_fanout.readable_uri(part.uri))


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False, packages_to_install=[])
def merge_tokens(
    setup: Input[Artifact],
    parts: List[str],
    config: str,
    tokens: Output[Dataset],
    metrics: Output[Metrics],
) -> str:
    """Merge the units' Tokens parts into one Tokens artifact, as tokenize_data writes it: the set-up's
    tokenizers, every shard in the manifest, reports summed, quarantines concatenated, published atomically.

    Args:
        setup: The tokenizer set-up the parts were tokenized with.
        parts: The URIs of the parts written by tokenize_unit (dsl.Collected over the fan-out; parameters, so
            that the launcher does not download them to this pod).
        config: The run, tracking and tokenize sections of the run's config (JSON).
        tokens: The Tokens artifact.
        metrics: Rows, audio hours, token counts, sequence lengths, throughput.

    Returns:
        The id of the merge's MLflow run (the tokenize stage's run, nested under the pipeline's run by link_runs).
    """
    from audiotune.orchestration import data_fanout, steps

    steps.setup()
    outcome = data_fanout.merge_tokens(config, setup.path, parts, data_fanout.publish_target(tokens.uri, tokens.path))
    steps.record(outcome, tokens, metrics)
    return outcome.run_id

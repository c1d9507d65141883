"""The steps of the data fan-out (``pipeline.data_parallelism > 0``): plan, one convert per unit, merge; then
the tokenizer set-up once, one tokenize per unit, merge into Tokens.

The component bodies (``components/fanout.py``) are thin calls into here. A unit task's cache key is
its inputs: the unit id (a hash of its records and their audio stamps) and the config. With
``convert.plan_uri`` the unit reads that durable plan rather than the plan artifact (whose URI changes every
run), so a unit whose records did not change is a cache hit (see :mod:`audiotune.data.plan`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from audiotune import artifacts, storage
from audiotune.orchestration import runs
from audiotune.orchestration.steps import Outcome, StepError, load, numeric

log = logging.getLogger(__name__)


def plan(config: str, source_uri: str, source_format: str, plan_path: str) -> list[str]:
    """Plan the source into ``plan_path`` (and ``convert.plan_uri`` when set); the unit ids."""
    from audiotune.stages import convert_units

    cfg = load(config, "plan_data config")
    planned = convert_units.plan(cfg, plan_path, source=source_uri or None, fmt=source_format or None)
    units = [u["id"] for u in planned["units"]]
    log.info("%d units of at most %d rows / %d bytes", len(units), max(u["rows"] for u in planned["units"]),
             max(u["bytes"] for u in planned["units"]))
    return units


def convert_unit(config: str, plan_path: str, unit_id: str, part_path: str) -> Outcome:
    """Convert one unit into ``part_path``, read from ``convert.plan_uri`` when set, else from ``plan_path``."""
    from audiotune.stages import convert_units

    cfg = load(config, "convert_unit config")
    plan_dir = cfg.convert.plan_uri or plan_path
    if not plan_dir:
        raise StepError("convert_unit got no plan: set convert.plan_uri or pass the plan artifact")
    part = convert_units.convert_unit(cfg, plan_dir, unit_id, part_path)
    return Outcome(metrics=numeric(part, ("figures",)) | numeric(part["report"], ("rows",)),
                   metadata={"kind": convert_units.PART, "unit": unit_id})


def merge(config: str, plan_dir: str, parts: list[str], output: str) -> Outcome:
    """Merge the units' parts into the Dataset at ``output``."""
    from audiotune.stages import convert_units

    cfg = load(config, "merge_data config")
    cfg.tracking.run_name = runs.unique_run_name("convert")
    result = convert_units.merge(cfg, plan_dir, parts, output)
    return Outcome(
        metrics=numeric(result.report, ("rows", "bad_fraction", "hours", "throughput")),
        metadata={"kind": artifacts.DATASET, "fingerprint": result.manifest.get("fingerprint"),
                  "source": result.manifest.get("source"), "units": len(result.manifest["units"])},
        run_id=runs.claim(cfg.tracking, cfg.tracking.run_name, "convert") or "",
    )


def readable_uri(uri: str) -> str:
    """An artifact URI as :mod:`audiotune.storage` reads it: KFP's MinIO store (``minio://bucket/key``) through
    its S3 API (``s3://bucket/key``, at ``AWS_ENDPOINT_URL``); local paths and ``s3://`` as they are."""
    return "s3://" + uri[len("minio://"):] if uri.startswith("minio://") else uri


def publish_target(artifact_uri: str, local_path: str) -> str:
    """Where a merge publishes its output artifact: straight to the artifact's URI when storage reads it as
    ``s3://`` (the parts' shards are then copied server side, and the launcher finds an empty local folder to
    upload), else the local path KFP gives (kfp.local, a mounted store)."""
    uri = readable_uri(artifact_uri)
    if not storage.is_s3(uri):
        return local_path
    Path(local_path).mkdir(parents=True, exist_ok=True)
    return uri


def write_parameter(path: str, value: str) -> None:
    """An output parameter of a component (``dsl.OutputPath(str)``)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(value, encoding="utf-8")


def hand_on(dataset_uri_path: str, dataset_uri: str, part_uris_path: str, part_uris: list[str]) -> None:
    """Write the merged Dataset's URI and its parts' URIs (the merge task's parameter outputs) for the tokenize
    fan-out, which reads only the manifest of the one and one part each of the others."""
    write_parameter(dataset_uri_path, readable_uri(dataset_uri))
    write_parameter(part_uris_path, json.dumps([readable_uri(u) for u in part_uris]))


def prepare_tokenizer(config: str, dataset_uri: str, part_uris: list[str], base_model_uri: str,
                      output: str) -> list[str]:
    """Build the tokenizers once (the one codebook fit on a sample across the units) into ``output``; the parts'
    URIs in plan order, the items of the tokenize fan-out."""
    from audiotune.stages import tokenize_units

    cfg = load(config, "prepare_tokenizer config")
    described = tokenize_units.prepare(cfg, dataset_uri, part_uris, output, base_model_uri or None)
    return described["parts"]


def tokenize_unit(config: str, setup_path: str, part_uri: str, output: str) -> Outcome:
    """Tokenize one convert part (``part_uri``) with the set-up at ``setup_path`` into ``output``."""
    from audiotune.stages import tokenize_units

    cfg = load(config, "tokenize_unit config")
    part = tokenize_units.tokenize_unit(cfg, setup_path, part_uri, output)
    return Outcome(metrics=numeric(part, ("figures",)) | numeric(part["report"], ("rows",)),
                   metadata={"kind": tokenize_units.PART, "unit": part["unit"]})


def merge_tokens(config: str, setup_path: str, parts: list[str], output: str) -> Outcome:
    """Merge the units' Tokens parts into the Tokens artifact at ``output``."""
    from audiotune.stages import tokenize_units

    cfg = load(config, "merge_tokens config")
    cfg.tracking.run_name = runs.unique_run_name("tokenize")
    result = tokenize_units.merge(cfg, setup_path, parts, output)
    return Outcome(
        metrics=numeric(result.report, ("rows", "bad_fraction", "audio_hours", "text_tokens", "audio_frames",
                                        "sequence_length_percentiles", "throughput")),
        metadata={"kind": artifacts.TOKENS, "units": len(result.manifest["units"])},
        run_id=runs.claim(cfg.tracking, cfg.tracking.run_name, "tokenize") or "",
    )

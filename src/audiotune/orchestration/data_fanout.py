"""The steps of the convert fan-out (``pipeline.data_parallelism > 0``): plan, one convert per unit, merge.

The component bodies (``components/fanout.py``) are thin calls into here. A unit task's cache key is
its inputs: the unit id (a hash of its records and their audio stamps) and the config. With
``convert.plan_uri`` the unit reads that durable plan rather than the plan artifact (whose URI changes every
run), so a unit whose records did not change is a cache hit (see :mod:`audiotune.data.plan`).
"""

from __future__ import annotations

import logging

from audiotune import artifacts
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

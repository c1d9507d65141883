"""Merging the fan-out's unit parts into one Dataset folder: shards renumbered in plan order,
quarantines concatenated (the plan's own first), partial reports summed. The tokenize fan-out's
merge (:mod:`audiotune.stages.tokenize_units`) places its parts' shards with :func:`place_shards` too.

A part is what :func:`audiotune.stages.convert_units.convert_unit` wrote: ``train/`` and ``val/`` shards,
``quarantine.jsonl`` and ``part.json``. The split of every row was already chosen by its id hash in
the unit, so the merged Dataset holds the same rows in the same order as the one-task stage.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

from audiotune.data.report import ConvertReport
from audiotune.data.schema import SPLITS
from audiotune.errors import DataError

log = logging.getLogger(__name__)


class MergeError(DataError):
    """Parts that do not make up the plan (a unit missing, one twice, one from another plan)."""


def _link_or_copy(src: Path, dst: Path) -> None:
    """A hard link to an (immutable) part's shard where the file system allows it, else a copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def place_shards(folder: Path, part_splits: dict[str, Any], staging: Path, splits: dict[str, dict[str, Any]]) -> None:
    """Link a part's shards (``part_splits``: its ``{split: {"shards": [{file, rows}]}}``) into ``staging``,
    numbered after those already in ``splits`` (updated: the manifest's ``splits``). Dataset and Tokens parts
    alike."""
    for split in SPLITS:
        (staging / split).mkdir(exist_ok=True)
        for shard in part_splits[split]["shards"]:
            name = f"part-{len(splits[split]['shards']):05d}.parquet"
            _link_or_copy(folder / split / shard["file"], staging / split / name)
            splits[split]["shards"].append({"file": name, "rows": shard["rows"]})
            splits[split]["rows"] += shard["rows"]


def read_part(directory: Path) -> dict[str, Any]:
    """The ``part.json`` of a local part folder.

    Raises:
        MergeError: missing or unreadable, naming the folder.
    """
    try:
        return json.loads((Path(directory) / "part.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise MergeError(f"{directory}: not a converted unit (part.json: {err})") from None


def order_parts(plan: dict[str, Any], parts: dict[str, Path]) -> list[tuple[str, Path]]:
    """``parts`` (``{unit id: folder}``) in the plan's unit order; every unit of the plan exactly once.

    Raises:
        MergeError: naming the first unit missing, or a part of a unit the plan does not have.
    """
    wanted = [u["id"] for u in plan["units"]]
    extra = sorted(set(parts) - set(wanted))
    if extra:
        raise MergeError(f"part of unit {extra[0]!r} is not in the plan (a part of another plan?)")
    missing = [u for u in wanted if u not in parts]
    if missing:
        raise MergeError(f"unit {missing[0]!r} has no converted part ({len(missing)} of {len(wanted)} missing); "
                         "re-run its convert task")
    return [(u, parts[u]) for u in wanted]


def sum_reports(plan: dict[str, Any], infos: list[dict[str, Any]]) -> ConvertReport:
    """One report from the plan's quarantined rows and every part's counts, durations and speakers."""
    report = ConvertReport()
    report.input_rows = int(plan["input_rows"])
    for bad in plan["quarantine"]:
        report.reasons[bad["reason"]] += 1
        report.reason_fields[f"{bad['reason']}:{bad['field']}"] += 1
    for info in infos:
        r = info["report"]
        report.kept.update({s: r["rows"][s] for s in SPLITS})
        report.tasks.update(r["tasks"])
        report.reasons.update(r["quarantine_reasons"])
        report.reason_fields.update(info["reason_fields"])
        report.durations.extend(info["durations"])
        for split, seconds in info["seconds"].items():
            report.seconds[split] += seconds
        for name, spk in info["speakers"].items():
            report.speakers[name]["rows"] += spk["rows"]
            report.speakers[name]["hours"] += spk["hours"]
    return report


def merge_parts(plan: dict[str, Any], parts: list[tuple[str, Path]], staging: Path) -> dict[str, Any]:
    """Copy the parts' shards into ``staging`` renumbered in plan order, concatenate the quarantines.

    Returns:
        ``report`` (a :class:`ConvertReport`), ``splits`` (rows and shards per split, as the one-task stage
        writes them), ``fingerprint`` (sha256 of the units' fingerprints in plan order), ``figures`` per unit.
    """
    splits: dict[str, dict[str, Any]] = {s: {"rows": 0, "shards": []} for s in SPLITS}
    fingerprint = hashlib.sha256()
    infos, figures = [], {}
    with open(staging / "quarantine.jsonl", "w", encoding="utf-8") as quarantine:
        for bad in plan["quarantine"]:
            quarantine.write(json.dumps(bad, ensure_ascii=False) + "\n")
        for unit_id, folder in parts:
            info = read_part(folder)
            if info.get("unit") != unit_id:
                raise MergeError(f"{folder}: holds unit {info.get('unit')!r}, expected {unit_id!r}")
            infos.append(info)
            figures[unit_id] = info["figures"]
            fingerprint.update(info["fingerprint"].encode())
            place_shards(Path(folder), info["splits"], staging, splits)
            with open(Path(folder) / "quarantine.jsonl", encoding="utf-8") as f:
                shutil.copyfileobj(f, quarantine)
    counts = Counter({s: splits[s]["rows"] for s in SPLITS})
    log.info("merged %d units: %d train / %d val rows", len(parts), counts["train"], counts["val"])
    return {"report": sum_reports(plan, infos), "splits": splits, "fingerprint": fingerprint.hexdigest(),
            "figures": figures}

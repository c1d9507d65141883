"""Merging the fan-out's unit parts into one Dataset folder: shards renumbered in plan order,
quarantines concatenated (the plan's own first), partial reports summed. The tokenize fan-out's
merge (:mod:`audiotune.stages.tokenize_units`) places its parts' shards with :func:`place_shards` too.

A part is what :func:`audiotune.stages.convert_units.convert_unit` wrote: ``train/`` and ``val/`` shards,
``quarantine.jsonl`` and ``part.json``. The split of every row was already chosen by its id hash in
the unit, so the merged Dataset holds the same rows in the same order as the one-task stage.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import os
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

from audiotune import artifacts, publish, storage
from audiotune.data.report import ConvertReport
from audiotune.data.schema import SPLITS
from audiotune.errors import DataError

log = logging.getLogger(__name__)


class MergeError(DataError):
    """Parts that do not make up the plan (a unit missing, one twice, one from another plan)."""


def fetch_part(uri: str | os.PathLike, workdir: Path) -> tuple[Path, str | Path]:
    """A part's small files (``part.json``, quarantine, embeddings) as a local folder, and where its shards are.

    A local part is used where it is. Of a part on S3 only the files that are not shards are downloaded (into
    ``workdir``); its shards stay on S3 and are copied to the merged artifact server side when it is published
    (:func:`place_shards`), so a merge never holds the corpus on its disk.
    """
    if not storage.is_s3(uri):
        return Path(uri), Path(uri)
    uri = str(uri).rstrip("/")
    local = Path(workdir) / hashlib.sha256(uri.encode()).hexdigest()[:16]
    for rel in storage.list_files(uri):
        if not fnmatch.fnmatch(rel, artifacts.SHARD_GLOB):
            storage.download(storage.join(uri, rel), storage.inside(local, rel, uri))
    return local, uri


def place_shards(folder: str | Path, part: dict[str, Any], staging: Path, splits: dict[str, dict[str, Any]],
                 shard_files: list[dict[str, Any]]) -> None:
    """Place a part's shards (``part``: its part.json, ``{"splits": {split: {"shards": [{file, rows}]}}}`` and
    ``shard_files``) into the artifact staged in ``staging``, numbered after those already in ``splits``.

    ``splits`` (the manifest's) and ``shard_files`` (its list of path, rows, bytes and sha256) are extended.
    A local shard is hard-linked (or copied) into ``staging``; a shard on S3 is copied at publish time
    (:func:`audiotune.publish.place_remote`) with the checksum its unit recorded. Dataset and Tokens parts alike.

    Raises:
        MergeError: a part on S3 that recorded no checksums of its shards (written by an older version).
    """
    recorded = {e["path"]: e for e in part.get("shard_files") or []}
    for split in SPLITS:
        (staging / split).mkdir(exist_ok=True)
        for shard in part["splits"][split]["shards"]:
            name = f"{split}/part-{len(splits[split]['shards']):05d}.parquet"
            source = f"{split}/{shard['file']}"
            entry = recorded.get(source)
            if storage.is_s3(folder):
                if entry is None:
                    raise MergeError(f"{folder}: part.json lists no checksum of {source}; re-run its unit")
                publish.place_remote(staging, name, storage.join(str(folder), source))
            else:
                _link_or_copy(Path(folder) / source, staging / name)
                entry = entry or artifacts.shard_files(staging, name)[0]
            shard_files.append({**entry, "path": name})
            splits[split]["shards"].append({"file": name.split("/", 1)[1], "rows": shard["rows"]})
            splits[split]["rows"] += shard["rows"]


def _link_or_copy(src: Path, dst: Path) -> None:
    """A hard link to an (immutable) part's shard where the file system allows it, else a copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def read_part(directory: Path) -> dict[str, Any]:
    """The ``part.json`` of a local part folder.

    Raises:
        MergeError: missing or unreadable, naming the folder.
    """
    try:
        return json.loads((Path(directory) / "part.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise MergeError(f"{directory}: not a converted unit (part.json: {err})") from None


def in_unit_order(units: list[str], found: dict[str, Any], what: str, task: str, where: str,
                  error: type[Exception] = MergeError) -> list[Any]:
    """``found`` (unit id → anything) in ``units`` order, every unit exactly once.

    Raises:
        error: naming the first unit missing (and the task to re-run), or a unit ``where`` does not have.
    """
    extra = sorted(set(found) - set(units))
    if extra:
        raise error(f"{what} of unit {extra[0]!r} is not in {where}")
    missing = [u for u in units if u not in found]
    if missing:
        raise error(f"unit {missing[0]!r} has no {what} ({len(missing)} of {len(units)} missing); "
                    f"re-run its {task} task")
    return [found[u] for u in units]


def order_parts(plan: dict[str, Any], parts: dict[str, Any]) -> list[tuple[str, Any]]:
    """``parts`` (``{unit id: part}``) as ``(unit id, part)`` in the plan's unit order; every unit exactly once.

    Raises:
        MergeError: naming the first unit missing, or a part of a unit the plan does not have.
    """
    wanted = [u["id"] for u in plan["units"]]
    ordered = in_unit_order(wanted, parts, "converted part", "convert", "the plan (a part of another plan?)")
    return list(zip(wanted, ordered, strict=True))


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


Fetched = tuple[Path, str | Path]  # (a local folder of a part's small files, where its shards are)


def merge_parts(plan: dict[str, Any], parts: list[tuple[str, Fetched]], staging: Path) -> dict[str, Any]:
    """Place the parts' shards in ``staging`` renumbered in plan order, concatenate the quarantines.

    Args:
        parts: ``(unit id, (local folder of its small files, where its shards are))`` (:func:`fetch_part`).

    Returns:
        ``report`` (a :class:`ConvertReport`), ``splits`` (rows and shards per split, as the one-task stage
        writes them), ``shard_files`` (for the manifest), ``fingerprint`` (sha256 of the units' fingerprints in
        plan order), ``figures`` per unit.
    """
    splits: dict[str, dict[str, Any]] = {s: {"rows": 0, "shards": []} for s in SPLITS}
    files: list[dict[str, Any]] = []
    fingerprint = hashlib.sha256()
    infos, figures = [], {}
    with open(staging / "quarantine.jsonl", "w", encoding="utf-8") as quarantine:
        for bad in plan["quarantine"]:
            quarantine.write(json.dumps(bad, ensure_ascii=False) + "\n")
        for unit_id, (folder, shards) in parts:
            info = read_part(folder)
            if info.get("unit") != unit_id:
                raise MergeError(f"{folder}: holds unit {info.get('unit')!r}, expected {unit_id!r}")
            infos.append(info)
            figures[unit_id] = info["figures"]
            fingerprint.update(info["fingerprint"].encode())
            place_shards(shards, info, staging, splits, files)
            with open(Path(folder) / "quarantine.jsonl", encoding="utf-8") as f:
                shutil.copyfileobj(f, quarantine)
    counts = Counter({s: splits[s]["rows"] for s in SPLITS})
    log.info("merged %d units: %d train / %d val rows", len(parts), counts["train"], counts["val"])
    return {"report": sum_reports(plan, infos), "splits": splits, "fingerprint": fingerprint.hexdigest(),
            "figures": figures, "shard_files": sorted(files, key=lambda e: e["path"])}

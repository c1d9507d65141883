"""The fan-out plan of a corpus: work units of bounded size whose ids come from their content.

A plan is a folder: ``plan.json`` (the source, its format, the units' ids, row and byte counts, and
what reading the source quarantined) and ``units/<unit id>.json`` (each unit's records). It is made
from a paginated listing of an S3 source (:func:`audiotune.data.stream.list_objects`): only index files
(manifests, ``wav.scp``, prompt texts) are copied, audio objects are only listed. A local source is read in
place, each audio file its records name stat'ed.

Units are stable under added data: a unit's id is a hash of its records and of the stamps (ETag, or
size and mtime) of their audio, and given the previous plan every unit whose records are all still
there is kept as it was, so the records that are new or changed land in new units and the KFP cache
holds for the rest (:func:`pack`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from audiotune import storage
from audiotune.data.sources.base import BadRecord, SourceRecord
from audiotune.data.stream import ObjectInfo, is_audio, list_objects
from audiotune.errors import DataError

log = logging.getLogger(__name__)

PLAN = "plan.json"
PLAN_KIND = "audiotune.data_plan"
PLAN_VERSION = 1
AUDIO_FIELDS = ("audio_path", "prompt_audio_path")


class PlanError(DataError):
    """A plan that cannot be made or read (no rows, a unit file missing, another kind)."""


@dataclass(frozen=True)
class Limits:
    """Bounds of one unit (``convert.unit_max_bytes``, ``unit_max_rows``, ``max_units``)."""

    max_bytes: int
    max_rows: int
    max_units: int


@dataclass
class SourceIndex:
    """A source as the plan reads it: a local root holding its index files, and its listing."""

    root_uri: str
    local_root: Path
    read_path: Path
    listing: dict[str, ObjectInfo] | None  # None: a local source, whose audio files are stat'ed one by one


def index_source(uri: str, workdir: Path) -> SourceIndex:
    """List ``uri`` page by page; for S3 copy its non-audio files under ``workdir`` (audio is only listed; see
    :func:`add_placeholders` for the layouts that look for audio files).

    A single file (a manifest) is read with its folder: its audio paths are relative to that folder.
    """
    if not storage.is_s3(uri):
        path = Path(uri)
        root = path.parent if path.is_file() else path
        return SourceIndex(str(root), root, path, None)
    bucket, key = storage.split_s3(uri)
    single = storage.head_object(bucket, key) is not None
    root_uri = uri.rstrip("/").rpartition("/")[0] if single else uri.rstrip("/")
    local = workdir / "index"
    listing, copied = {}, 0
    for obj in list_objects(root_uri):
        listing[obj.rel] = obj
        target = storage.inside(local, obj.rel, root_uri)
        if not is_audio(obj.rel):
            target.parent.mkdir(parents=True, exist_ok=True)
            storage.download(storage.join(root_uri, obj.rel), target)
            copied += obj.size
    log.info("%s: listed %d files, copied %d bytes of index files", root_uri, len(listing), copied)
    read_path = local / uri.rstrip("/").rpartition("/")[2] if single else local
    return SourceIndex(root_uri, local, read_path, listing)


def add_placeholders(index: SourceIndex) -> None:
    """An empty local file per listed audio object of an S3 source, for layouts found by their audio files
    (ACE-Step folders); a manifest or ``wav.scp`` names its audio and needs none."""
    if not storage.is_s3(index.root_uri):
        return
    for rel in index.listing:
        if is_audio(rel):
            target = storage.inside(index.local_root, rel, index.root_uri)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.touch()


def make_entry(item: SourceRecord | BadRecord, index: SourceIndex, target: str) -> dict[str, Any]:
    """A plan entry: the record with its audio paths as URIs, each with its listed size and stamp.

    Audio a record names but the listing lacks gets size -1 (the unit quarantines it as missing).
    """
    if isinstance(item, BadRecord):
        return {"bad": dataclasses.asdict(item), "target": target}
    record = dataclasses.asdict(item)
    sizes, stamps = {}, {}
    real_root = os.path.realpath(index.local_root)
    for field in AUDIO_FIELDS:
        path = record.get(field)
        if path is None:
            continue
        rel = os.path.relpath(path, real_root).replace(os.sep, "/")
        info = index.listing.get(rel) if index.listing is not None else _stat(path)
        if storage.is_s3(index.root_uri):
            record[field] = storage.join(index.root_uri, rel)
        sizes[field] = info.size if info else -1
        stamps[field] = info.etag if info else ""
    key = hashlib.sha256(json.dumps([record, stamps, target], sort_keys=True, ensure_ascii=False).encode())
    return {"record": record, "sizes": sizes, "stamps": stamps, "target": target, "key": key.hexdigest()}


def _stat(path: str) -> ObjectInfo | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return ObjectInfo(path, st.st_size, f"{st.st_size}-{st.st_mtime_ns}")


def _bytes(entry: dict[str, Any]) -> int:
    return sum(max(0, s) for s in entry.get("sizes", {}).values())


def _unit(entries: list[tuple[int, dict]]) -> dict[str, Any]:
    digest = hashlib.sha256()
    for _, e in entries:
        digest.update(e["key"].encode() + b"\0")
    return {"id": f"u-{digest.hexdigest()[:20]}", "rows": len(entries), "bytes": sum(_bytes(e) for _, e in entries),
            "first": entries[0][0], "entries": [e for _, e in entries]}


def _greedy(entries: list[tuple[int, dict]], max_rows: int, max_bytes: int) -> list[dict[str, Any]]:
    units, current, size = [], [], 0
    for pos, entry in entries:
        b = _bytes(entry)
        if current and (len(current) >= max_rows or size + b > max_bytes):
            units.append(_unit(current))
            current, size = [], 0
        current.append((pos, entry))
        size += b
    if current:
        units.append(_unit(current))
    return units


def pack(entries: list[dict[str, Any]], limits: Limits,
         previous: dict[str, list[str]] | None = None) -> list[dict[str, Any]]:
    """Cut record entries (source order) into units, keeping the previous plan's units that are intact.

    Args:
        entries: Entries of :func:`make_entry` for the good records, in source order.
        limits: Unit bounds; when more than ``max_units`` units would come out, the row and byte
            bounds are raised evenly to fit.
        previous: The previous plan's ``{unit id: [entry keys]}``; a unit whose entries are all still
            present (unchanged) is kept with its id, the other entries go to new units.

    Returns:
        Units ``{id, rows, bytes, entries}`` ordered by their first record's place in the source.
    """
    positioned = list(enumerate(entries))
    by_key = {e["key"]: (pos, e) for pos, e in positioned}
    kept, taken = [], set()
    for keys in (previous or {}).values():
        if keys and all(k in by_key and k not in taken for k in keys):
            kept.append(_unit([by_key[k] for k in keys]))
            taken.update(keys)
    rest = [(pos, e) for pos, e in positioned if e["key"] not in taken]
    budget = max(1, limits.max_units - len(kept))
    max_rows = max(limits.max_rows, math.ceil(len(rest) / budget))
    max_bytes = max(limits.max_bytes, math.ceil(sum(_bytes(e) for _, e in rest) / budget))
    units = kept + _greedy(rest, max_rows, max_bytes)
    if len(units) > limits.max_units:
        log.warning("%d units (%d kept from the previous plan) is above max_units=%d", len(units), len(kept),
                    limits.max_units)
    units.sort(key=lambda u: u["first"])
    for u in units:
        u.pop("first")
    log.info("plan: %d units (%d kept from the previous plan), %d rows", len(units), len(kept), len(entries))
    return units


def write_plan(directory: str, units: list[dict[str, Any]], bad: Iterable[dict], **fields: Any) -> dict[str, Any]:
    """Write ``units/<id>.json`` for each unit, then ``plan.json`` (last: a reader that finds it finds all)."""
    for u in units:
        unit_uri = storage.join(directory, "units", f"{u['id']}.json")
        storage.write_text(unit_uri, json.dumps({"id": u["id"], "entries": u["entries"]}, ensure_ascii=False))
    plan = {"kind": PLAN_KIND, "schema_version": PLAN_VERSION, **fields,
            "units": [{k: u[k] for k in ("id", "rows", "bytes")} for u in units],
            "unit_keys": {u["id"]: [e["key"] for e in u["entries"]] for u in units},
            "quarantine": list(bad)}
    storage.write_text(storage.join(directory, PLAN), json.dumps(plan, ensure_ascii=False, indent=1) + "\n")
    return plan


def read_plan(directory: str) -> dict[str, Any]:
    """The ``plan.json`` of a plan folder.

    Raises:
        PlanError: missing, unreadable or of another kind.
    """
    uri = storage.join(directory, PLAN)
    try:
        plan = json.loads(storage.read_text(uri))
    except FileNotFoundError:
        raise PlanError(f"{uri} is missing: run the plan step first") from None
    except ValueError as err:
        raise PlanError(f"{uri}: not valid JSON ({err})") from None
    if not isinstance(plan, dict) or plan.get("kind") != PLAN_KIND or plan.get("schema_version") != PLAN_VERSION:
        raise PlanError(f"{uri}: not an {PLAN_KIND} v{PLAN_VERSION} plan")
    return plan


def read_unit(directory: str, unit_id: str) -> list[dict[str, Any]]:
    """The entries of one unit of a plan folder.

    Raises:
        PlanError: the unit file is missing or names another unit.
    """
    uri = storage.join(directory, "units", f"{unit_id}.json")
    try:
        unit = json.loads(storage.read_text(uri))
    except FileNotFoundError:
        raise PlanError(f"{uri} is missing: unit {unit_id!r} is not in the plan at {directory}") from None
    if unit.get("id") != unit_id:
        raise PlanError(f"{uri} holds unit {unit.get('id')!r}, not {unit_id!r}")
    return unit["entries"]


def previous_units(directory: str | None) -> dict[str, list[str]] | None:
    """``{unit id: [entry keys]}`` of the plan in ``directory``, or None when there is none."""
    if not directory or not storage.exists(storage.join(directory, PLAN)):
        return None
    return read_plan(directory)["unit_keys"]

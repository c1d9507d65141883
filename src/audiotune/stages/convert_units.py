"""The convert stage fanned out: plan the source into units, convert each unit on its own, merge.

Recipe of the pipeline's data fan-out (``pipeline.data_parallelism > 0``):

1. :func:`plan` lists the source page by page and writes a plan of work units (:mod:`audiotune.data.plan`);
2. :func:`convert_unit`, one task per unit, streams the unit's audio (ranged GETs under a local-disk cap,
   :mod:`audiotune.data.stream`) and writes the unit's Parquet shards, quarantine and partial report;
3. :func:`audiotune.data.merge.merge_units` assembles one Dataset from the parts.

:func:`convert_fanout` runs the three in this process, one unit after another (tests, figures). The one-task
stage (:func:`audiotune.stages.convert.convert`, ``audiotune convert``, ``make demo``) is unchanged.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import resource
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from functools import partial
from pathlib import Path
from typing import Any, Iterator

from audiotune import artifacts, publish, storage, tracking
from audiotune.config import AudiotuneConfig, dump_config
from audiotune.data import merge as merge_mod
from audiotune.data import plan as plan_mod
from audiotune.data.quarantine import check_kept, dedupe, quarantine_line, utf8_only
from audiotune.data.report import ConvertReport, ConvertResult
from audiotune.data.rows import RowSettings, convert_record
from audiotune.data.schema import COLUMNS, ShardWriter, fingerprint_row, split_of
from audiotune.data.sources import get_reader, resolve_source
from audiotune.data.sources.base import BadRecord, SourceError, SourceOptions, SourceRecord
from audiotune.data.stream import DiskBudget, Spool
from audiotune.data.workers import num_workers, stop_on_signals, worker_pool

log = logging.getLogger(__name__)

PART = "audiotune.dataset_part"


def plan(cfg: AudiotuneConfig, plan_dir: str, source: str | None = None, fmt: str | None = None) -> dict[str, Any]:
    """Plan the source into units and write the plan to ``plan_dir`` (see :mod:`audiotune.data.plan`).

    The previous plan is read from ``convert.plan_uri`` when set (and the new one is written there too).

    Raises:
        SourceError: no source, an unknown layout, or no rows.
    """
    c = cfg.convert
    source, fmt = source or c.source, fmt or c.format
    if not source:
        raise SourceError("no source given: pass --source or set convert.source")
    log.info("plan: %s -> %s\n%s", source, plan_dir, dump_config(cfg))
    options = SourceOptions(text_field=c.text_field, repeat_count=c.repeat_count)
    with tempfile.TemporaryDirectory(prefix="audiotune-plan-") as tmp:
        seen: set[str] = set()
        entries, bad, fmt_name = [], [], None
        for target, uri in (("split", source), ("val", c.val_source)):
            if not uri:
                continue
            if not storage.is_s3(uri) and not Path(uri).exists():
                raise SourceError(f"source {uri} does not exist")
            index = plan_mod.index_source(uri, Path(tmp) / target)
            name, read_path = _resolve(index, fmt)
            fmt_name = fmt_name or name
            for item in dedupe(utf8_only(get_reader(name).read(read_path, options)), seen):
                entry = plan_mod.make_entry(item, index, target)
                (bad if "bad" in entry else entries).append(entry)
        if not entries and not bad:
            raise SourceError(f"source {source} holds no rows ({fmt_name} format)")
        limits = plan_mod.Limits(c.unit_max_bytes, c.unit_max_rows, c.max_units)
        units = plan_mod.pack(entries, limits, plan_mod.previous_units(c.plan_uri))
    fields = dict(source=source, format=fmt_name, input_rows=len(entries) + len(bad),
                  source_bytes=sum(u["bytes"] for u in units))
    written = plan_mod.write_plan(plan_dir, units, (b["bad"] for b in bad), **fields)
    if c.plan_uri and storage.join(c.plan_uri, "") != storage.join(plan_dir, ""):
        plan_mod.write_plan(c.plan_uri, units, (b["bad"] for b in bad), **fields)
    return written


def _resolve(index: plan_mod.SourceIndex, fmt: str | None) -> tuple[str, Path]:
    """The format and read path of an indexed source; ACE-Step folders (found by their audio) get placeholders."""
    if fmt == "acestep":
        plan_mod.add_placeholders(index)
    try:
        name, read_path = resolve_source(index.read_path, fmt)
    except SourceError:
        if fmt is not None or not storage.is_s3(index.root_uri):
            raise
        plan_mod.add_placeholders(index)
        name, read_path = resolve_source(index.read_path, fmt)
    if name == "acestep":
        plan_mod.add_placeholders(index)
    return name, read_path


def _spooled(entries: list[dict], spool: Spool, held: collections.deque, ahead: int) -> Iterator[SourceRecord]:
    """The unit's records with their audio on local disk, fetched up to ``ahead`` at a time; what each holds is
    appended to ``held`` in order. Bytes are reserved here, in order, and only while no fetched record waits to be
    handed on: a wait for bytes is a wait for records the consumer already has, so it never deadlocks."""
    with ThreadPoolExecutor(max_workers=ahead) as pool:
        futures: collections.deque = collections.deque()

        def fetch(entry: dict) -> tuple[SourceRecord, list]:
            record = dict(entry["record"])
            taken = []
            for field, size in entry["sizes"].items():
                if size >= 0:
                    local, reserved = spool.open(record[field], size, entry["stamps"].get(field, ""))
                    taken.append((local, reserved, record[field]))
                    record[field] = local
            return SourceRecord(**record), taken

        def hand_on() -> SourceRecord:
            rec, taken = futures.popleft().result()
            held.append(taken)
            return rec

        for entry in entries:
            need = sum(size for field, size in entry["sizes"].items()
                       if size >= 0 and storage.is_s3(entry["record"][field]))
            what = entry["record"].get("audio_path") or entry["record"]["id"]
            while futures and not spool.budget.take(need, what, wait=False):
                yield hand_on()
            if not futures:
                spool.budget.take(need, what)
            futures.append(pool.submit(fetch, entry))
            if len(futures) >= ahead:
                yield hand_on()
        while futures:
            yield hand_on()


def _rename_paths(bad: BadRecord, taken: list) -> BadRecord:
    for local, _, uri in taken:
        bad.detail = bad.detail.replace(local, uri)
    return bad


def convert_unit(cfg: AudiotuneConfig, plan_dir: str, unit_id: str, output: str) -> dict[str, Any]:
    """Convert one unit of a plan into a Dataset part at ``output``: ``train/``, ``val/`` shards,
    ``quarantine.jsonl`` and ``part.json`` (the partial report, durations, fingerprint, figures).

    Audio on S3 is streamed into a spool folder holding at most ``convert.max_local_disk_bytes``.
    """
    c = cfg.convert
    entries = plan_mod.read_unit(plan_dir, unit_id)
    workers = min(num_workers(cfg.run.num_workers), max(1, len(entries)))
    budget = DiskBudget(c.max_local_disk_bytes)
    report = ConvertReport()
    report.input_rows = len(entries)
    fingerprint = hashlib.sha256()
    with stop_on_signals("convert unit"), tempfile.TemporaryDirectory(prefix="audiotune-unit-") as tmp, \
            publish.publish_dir(output, overwrite=True, kind=PART) as staging, ExitStack() as stack:
        start = time.perf_counter()
        spool = Spool(Path(tmp) / "spool", budget)
        writers = {s: ShardWriter(staging / s, c.shard_max_rows, int(c.shard_max_mb * 2**20)) for s in ("train", "val")}
        pool = stack.enter_context(worker_pool(workers)) if workers > 1 else None
        _write_unit(c, entries, spool, pool, workers, writers, report, fingerprint, staging)
        elapsed = time.perf_counter() - start
        part = {
            "kind": PART, "unit": unit_id, "report": report.to_dict(), "durations": report.durations,
            "speakers": {k: dict(v) for k, v in report.speakers.items()},
            "reason_fields": dict(report.reason_fields), "seconds": dict(report.seconds),
            "splits": {s: {"rows": w.rows, "shards": w.shards} for s, w in writers.items()},
            "shard_files": artifacts.shard_files(staging),  # the merge copies them with these checksums
            "fingerprint": fingerprint.hexdigest(),
            "figures": {"elapsed_s": round(elapsed, 3), "workers": workers, "s3_bytes_read": spool.bytes_read,
                        "peak_spool_bytes": budget.peak,
                        "output_bytes": sum(f.stat().st_size for f in staging.glob("*/part-*.parquet")),
                        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024},
        }
        (staging / "part.json").write_text(json.dumps(part, ensure_ascii=False) + "\n")
    log.info("unit %s: %d rows, %d quarantined in %.1f s; %d bytes read from S3, spool peak %d bytes", unit_id,
             len(entries), report.quarantined, elapsed, spool.bytes_read, budget.peak)
    return part


def _write_unit(c, entries: list[dict], spool: Spool, pool, workers: int, writers: dict[str, ShardWriter],
                report: ConvertReport, fingerprint, staging: Path) -> None:
    """Convert the unit's records as they are spooled (on ``pool``), each spool file closed once its row is
    written; kept rows go to their split's shards, bad ones to the quarantine with their S3 paths."""
    settings = RowSettings.of(c)
    held: collections.deque = collections.deque()
    records = _spooled(entries, spool, held, ahead=max(2, 2 * workers))
    results = (pool.imap(partial(convert_record, s=settings), records, chunksize=1) if pool
               else (convert_record(r, settings) for r in records))
    with open(staging / "quarantine.jsonl", "w", encoding="utf-8") as quarantine:
        for entry, result in zip(entries, results, strict=True):
            taken = held.popleft()
            for local, reserved, _ in taken:
                spool.close(local, reserved)
            if isinstance(result, BadRecord):
                report.add_bad(_rename_paths(result, taken))
                quarantine.write(quarantine_line(result))
                continue
            split = "val" if entry["target"] == "val" else split_of(result["id"], c.val_fraction)
            writers[split].add(result)
            report.add_row(result, split)
            fingerprint_row(fingerprint, result)
    for w in writers.values():
        w.flush()


def merge(cfg: AudiotuneConfig, plan_dir: str, parts: list[str], output: str) -> ConvertResult:
    """Assemble the units' parts (local or s3://) into one Dataset at ``output``, published atomically.

    Raises:
        MergeError: a unit of the plan has no part, or a part belongs to another plan.
        ConvertError: as the one-task stage (too many rows quarantined, no training rows).
    """
    c = cfg.convert
    planned = plan_mod.read_plan(plan_dir)
    source = planned["source"]
    publish.require_missing_or_overwrite(output, c.overwrite, artifacts.DATASET, [source, c.val_source])
    local = {}
    work = Path(tempfile.mkdtemp(prefix="audiotune-merge-"))
    for uri in parts:  # their small files only: shards on S3 are copied server side at publish
        folder, shards = merge_mod.fetch_part(uri, work)
        local[merge_mod.read_part(folder)["unit"]] = (folder, shards)
    with tracking.stage_run(cfg.tracking, "convert") as tracker, \
            publish.publish_dir(output, overwrite=c.overwrite, kind=artifacts.DATASET,
                                inputs=[source, c.val_source]) as staging:
        tracker.log_params({"convert": c.model_dump(mode="json"), "run": cfg.run.model_dump(mode="json")})
        merged = merge_mod.merge_parts(planned, merge_mod.order_parts(planned, local), staging)
        report = merged["report"]
        figures = merged["figures"]
        throughput = {"units": len(figures), "unit_elapsed_s": round(sum(f["elapsed_s"] for f in figures.values()), 3),
                      "s3_bytes_read": sum(f["s3_bytes_read"] for f in figures.values()),
                      "source_bytes": planned["source_bytes"],
                      "peak_spool_bytes": max(f["peak_spool_bytes"] for f in figures.values()),
                      "peak_rss_bytes": max(f["peak_rss_bytes"] for f in figures.values())}
        report_dict = report.write(staging, source=source, format=planned["format"], sample_rate=c.sample_rate,
                                   throughput=throughput)
        rows = report_dict["rows"]
        tracker.log_metrics({"rows_input": rows["input"], "rows_train": rows["train"], "rows_val": rows["val"],
                             "rows_quarantined": rows["quarantined"], "bad_fraction": report_dict["bad_fraction"],
                             "hours_train": report_dict["hours"]["train"], "hours_val": report_dict["hours"]["val"],
                             "units": len(figures), "s3_bytes_read": throughput["s3_bytes_read"]})
        for name in ("report.json", "duration_histogram.png", "quarantine.jsonl"):
            tracker.log_artifact(staging / name)
        check_kept(report, c.max_bad_fraction, source, output, staging)
        manifest = artifacts.write_manifest(
            staging, artifacts.DATASET, artifacts.DATASET_VERSION, source=source, format=planned["format"],
            sample_rate=c.sample_rate, columns=COLUMNS, splits=merged["splits"], quarantined=report.quarantined,
            fingerprint=merged["fingerprint"], units=[u["id"] for u in planned["units"]],
            config=c.model_dump(mode="json"), shard_files=merged["shard_files"],
        )
        tracker.set_tags({"dataset_fingerprint": manifest["fingerprint"]})
    shutil.rmtree(work, ignore_errors=True)
    log.info("published dataset %s from %d units", output, len(parts))
    return ConvertResult(output=output, report=report_dict, manifest=manifest)


def convert_fanout(cfg: AudiotuneConfig, output: str, source: str | None = None, fmt: str | None = None,
                   workdir: str | None = None) -> ConvertResult:
    """Plan, convert every unit (here, one after another) and merge: the pipeline's fan-out in one process."""
    own = workdir is None
    root = Path(workdir or tempfile.mkdtemp(prefix="audiotune-fanout-"))
    try:
        planned = plan(cfg, str(root / "plan"), source, fmt)
        parts = []
        for unit in planned["units"]:
            parts.append(str(root / "parts" / unit["id"]))
            convert_unit(cfg, str(root / "plan"), unit["id"], parts[-1])
        return merge(cfg, str(root / "plan"), parts, output)
    finally:
        if own:
            shutil.rmtree(root, ignore_errors=True)

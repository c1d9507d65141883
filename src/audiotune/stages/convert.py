"""The convert stage: a source corpus (local or S3, any supported layout) → a Dataset artifact.

Recipe: read the source → decode and validate rows in parallel → split by id hash →
write Parquet shards, quarantine and report → publish atomically → track.
Every input row ends up either in the Dataset or in ``quarantine.jsonl`` with a reason.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Iterator

from tqdm import tqdm

from audiotune import artifacts, publish, storage, tracking
from audiotune.config import AudiotuneConfig, ConvertConfig, dump_config
from audiotune.data.quarantine import ConvertError, check_kept, dedupe, quarantine_line, utf8_only
from audiotune.data.report import ConvertReport, ConvertResult
from audiotune.data.rows import RowSettings, convert_record
from audiotune.data.schema import COLUMNS, ShardWriter, fingerprint_row, split_of
from audiotune.data.sources import resolve_source
from audiotune.data.sources.base import BadRecord, SourceError, SourceOptions, SourceRecord
from audiotune.data.workers import WorkerPool, num_workers, stop_on_signals, worker_pool

__all__ = ["ConvertError", "ConvertResult", "convert"]

log = logging.getLogger(__name__)


def _read_source(uri: str, fmt: str | None, c: ConvertConfig, workdir: Path, label: str) -> tuple[str, list]:
    """Fetch the source if remote, detect its format, and read its records."""
    if storage.is_s3(uri):
        local = workdir / label
        parent, _, name = uri.rstrip("/").rpartition("/")
        if name in storage.list_files(parent):  # a manifest file: its audio paths are relative to its folder
            log.info("downloading %s (the manifest's folder)", parent)
            path = storage.download(parent, local) / name
        else:
            log.info("downloading %s", uri)
            path = storage.download(uri, local)
    else:
        path = Path(uri)
        if not path.exists():
            raise SourceError(f"source {uri} does not exist")
    fmt_name, read_path = resolve_source(path, fmt)
    options = SourceOptions(text_field=c.text_field, repeat_count=c.repeat_count)
    from audiotune.data.sources import get_reader

    items = list(utf8_only(get_reader(fmt_name).read(read_path, options)))
    log.info("%s: %d rows in %s format", uri, len(items), fmt_name)
    return fmt_name, items


def _process(records: list, settings: RowSettings, pool: WorkerPool | None, workers: int) -> Iterator[Any]:
    """Yield each record's row or BadRecord in input order, converting audio on ``pool`` (None: here)."""
    if pool is None or len(records) < 2:
        for rec in records:
            yield convert_record(rec, settings)
        return
    chunk = max(1, min(4, len(records) // (workers * 8)))
    yield from pool.imap(partial(convert_record, s=settings), records, chunksize=chunk)


@dataclass
class _Written:
    """What the rows of a run came to: the report, the shard writers, the fingerprint and the audio's length."""

    report: ConvertReport
    writers: dict[str, ShardWriter]
    fingerprint: Any
    audio_seconds: float = 0.0


def convert(cfg: AudiotuneConfig, source: str | None = None, output: str | None = None,
            fmt: str | None = None) -> ConvertResult:
    """Run the convert stage.

    Args:
        cfg: The pipeline config; the ``convert`` section drives this stage.
        source: Source URI; defaults to ``cfg.convert.source``.
        output: Dataset URI (local path or s3://).
        fmt: Source format; defaults to ``cfg.convert.format`` (None: autodetect).

    Raises:
        SourceError: unknown layout, missing or empty source.
        ConvertError: more than ``max_bad_fraction`` of the rows are bad (the
            quarantine file and report are written beside the output first).
        FileExistsError: the output exists and ``overwrite`` is off.
        OutputError: the output is, contains or lies inside a source (so also a source manifest's folder), or
            (with ``overwrite``) holds something other than a Dataset or an empty folder; checked before any work.
    """
    c = cfg.convert
    source, fmt, inputs = _setup_inputs(cfg, source, output, fmt)
    workers = num_workers(cfg.run.num_workers)
    # on SIGTERM / SIGINT every block below unwinds: the pool stops first, then the staging folder goes
    with stop_on_signals("convert"), tempfile.TemporaryDirectory(prefix="audiotune-convert-") as tmp, \
            tracking.stage_run(cfg.tracking, "convert") as tracker, \
            publish.publish_dir(output, overwrite=c.overwrite, kind=artifacts.DATASET, inputs=inputs) as staging, \
            ExitStack() as stack:
        start = time.perf_counter()  # the work itself, not MLflow's set-up
        tracker.log_params({"convert": c.model_dump(mode="json"), "run": cfg.run.model_dump(mode="json")})
        fmt_name, streams = _setup_streams(c, source, fmt, Path(tmp))
        input_rows = sum(len(s) for _, s in streams)
        pool = stack.enter_context(worker_pool(workers)) if workers > 1 and input_rows > 1 else None
        written = _write_rows(c, streams, pool, workers, staging, start)
        report_dict = _report(c, written, source, fmt_name, workers, start, staging, tracker)
        check_kept(written.report, c.max_bad_fraction, source, output, staging)
        if c.val_fraction > 0 and written.report.kept["val"] == 0 and not c.val_source:
            log.warning("val split is empty (val_fraction=%s on %d rows)", c.val_fraction,
                        written.report.kept["train"])
        manifest = artifacts.write_manifest(
            staging, artifacts.DATASET, artifacts.DATASET_VERSION, source=source, format=fmt_name,
            sample_rate=c.sample_rate, columns=COLUMNS,
            splits={s: {"rows": w.rows, "shards": w.shards} for s, w in written.writers.items()},
            quarantined=written.report.quarantined, fingerprint=written.fingerprint.hexdigest(),
            config=c.model_dump(mode="json"),
        )
        tracker.set_tags({"dataset_fingerprint": manifest["fingerprint"]})
    log.info("published dataset %s", output)
    return ConvertResult(output=output, report=report_dict, manifest=manifest)


def _setup_inputs(cfg: AudiotuneConfig, source: str | None, output: str | None,
                  fmt: str | None) -> tuple[str, str | None, list]:
    """The source, format and inputs of the run; a missing source or output, or an output to keep, refused."""
    c = cfg.convert
    source = source or c.source
    fmt = fmt or c.format
    if not source:
        raise SourceError("no source given: pass --source or set convert.source")
    if not output:
        raise SourceError("no output given: pass --output")
    log.info("convert: %s -> %s\n%s", source, output, dump_config(cfg))
    # a manifest file as input covers its folder too: an output equal to or above that folder contains it
    inputs = [source, c.val_source]
    publish.require_missing_or_overwrite(output, c.overwrite, artifacts.DATASET, inputs)
    return source, fmt, inputs


def _setup_streams(c: ConvertConfig, source: str, fmt: str | None, workdir: Path) -> tuple[str, list]:
    """The records of the source (split by id hash) and of ``convert.val_source`` (all val), ids deduplicated."""
    fmt_name, items = _read_source(source, fmt, c, workdir, "source")
    seen: set[str] = set()
    streams = [("split", list(dedupe(items, seen)))]
    if c.val_source:
        _, val_items = _read_source(c.val_source, fmt, c, workdir, "val_source")
        streams.append(("val", list(dedupe(val_items, seen))))
    if sum(len(s) for _, s in streams) == 0:
        raise SourceError(f"source {source} holds no rows ({fmt_name} format)")
    return fmt_name, streams


def _write_rows(c: ConvertConfig, streams: list, pool: WorkerPool | None, workers: int, staging: Path,
                start: float) -> _Written:
    """Convert every record (on ``pool``), writing kept rows to their split's shards and bad ones to the
    quarantine."""
    settings = RowSettings.of(c)
    input_rows = sum(len(s) for _, s in streams)
    written = _Written(report=ConvertReport(), fingerprint=hashlib.sha256(), writers={
        s: ShardWriter(staging / s, c.shard_max_rows, int(c.shard_max_mb * 2**20)) for s in ("train", "val")})
    written.report.input_rows = input_rows
    with open(staging / "quarantine.jsonl", "w", encoding="utf-8") as quarantine, \
            tqdm(total=input_rows, desc="convert", unit="row", mininterval=2.0) as bar:
        for target, stream in streams:
            bad_items = [i for i in stream if isinstance(i, BadRecord)]
            records = [i for i in stream if isinstance(i, SourceRecord)]
            for bad in bad_items:
                written.report.add_bad(bad)
                quarantine.write(quarantine_line(bad))
            bar.update(len(bad_items))
            for result in _process(records, settings, pool, workers):
                bar.update(1)
                if isinstance(result, BadRecord):
                    written.report.add_bad(result)
                    quarantine.write(quarantine_line(result))
                    continue
                split = "val" if target == "val" else split_of(result["id"], c.val_fraction)
                written.writers[split].add(result)
                written.report.add_row(result, split)
                written.audio_seconds += result["duration_s"] or 0.0
                fingerprint_row(written.fingerprint, result)
                if bar.n % 200 == 0:
                    bar.set_postfix(audio_x_realtime=f"{written.audio_seconds / (time.perf_counter() - start):.0f}")
    for w in written.writers.values():
        w.flush()
    return written


def _report(c: ConvertConfig, written: _Written, source: str, fmt_name: str, workers: int, start: float,
            staging: Path, tracker) -> dict[str, Any]:
    """Write ``report.json`` with the run's throughput, and log it, the histogram and the quarantine."""
    elapsed, report, audio_seconds = time.perf_counter() - start, written.report, written.audio_seconds
    throughput = {
        "elapsed_s": round(elapsed, 3),
        "workers": workers,
        "rows_per_s": round(report.input_rows / elapsed, 2),
        "audio_s_per_s": round(audio_seconds / elapsed, 2),
        "audio_s_per_s_per_core": round(audio_seconds / elapsed / workers, 2),
    }
    report_dict = report.write(staging, source=source, format=fmt_name, sample_rate=c.sample_rate,
                               throughput=throughput)
    tracker.log_metrics(_metrics(report_dict))
    for name in ("report.json", "duration_histogram.png", "quarantine.jsonl"):
        tracker.log_artifact(staging / name)
    log.info("kept %d train / %d val rows, quarantined %d (%s); %.1fx real time on %d workers",
             report.kept["train"], report.kept["val"], report.quarantined, report.summary_of_reasons(),
             throughput["audio_s_per_s"], workers)
    return report_dict


def _metrics(report: dict[str, Any]) -> dict[str, float]:
    rows = report["rows"]
    t = report["throughput"]
    return {
        "rows_input": rows["input"],
        "rows_train": rows["train"],
        "rows_val": rows["val"],
        "rows_quarantined": rows["quarantined"],
        "bad_fraction": report["bad_fraction"],
        "hours_train": report["hours"]["train"],
        "hours_val": report["hours"]["val"],
        "audio_s_per_s": t["audio_s_per_s"],
        "audio_s_per_s_per_core": t["audio_s_per_s_per_core"],
        "rows_per_s": t["rows_per_s"],
    }


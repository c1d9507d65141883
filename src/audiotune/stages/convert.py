"""The convert stage: a source corpus (local or S3, any supported layout) → a Dataset artifact.

Recipe: read the source → decode and validate rows in parallel → split by id hash →
write Parquet shards, quarantine and report → publish atomically → track.
Every input row ends up either in the Dataset or in ``quarantine.jsonl`` with a reason.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Iterable, Iterator

from tqdm import tqdm

from audiotune import artifacts, publish, storage, tracking
from audiotune.config import AudiotuneConfig, ConvertConfig, dump_config
from audiotune.data import reasons
from audiotune.data.report import ConvertReport
from audiotune.data.rows import RowSettings, convert_record
from audiotune.data.schema import COLUMNS, ShardWriter, split_of
from audiotune.data.sources import resolve_source
from audiotune.data.sources.base import BadRecord, SourceError, SourceOptions, SourceRecord
from audiotune.data.workers import WorkerPool, num_workers, stop_on_signals, worker_pool
from audiotune.errors import DataError

log = logging.getLogger(__name__)


class ConvertError(DataError):
    """The conversion failed as a whole (empty source, too many bad rows)."""


@dataclass
class ConvertResult:
    """What the stage produced."""

    output: str
    report: dict[str, Any]
    manifest: dict[str, Any]


def _settings(c: ConvertConfig) -> RowSettings:
    return RowSettings(
        sample_rate=c.sample_rate,
        trim_silence=c.trim_silence,
        trim_top_db=c.trim_top_db,
        silence_threshold_db=c.silence_threshold_db,
        min_duration_s=c.min_duration_s,
        max_duration_s=c.max_duration_s,
    )


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

    items = list(_utf8_only(get_reader(fmt_name).read(read_path, options)))
    log.info("%s: %d rows in %s format", uri, len(items), fmt_name)
    return fmt_name, items


def _printable(text: str | None) -> str | None:
    """``text`` with what a non-UTF-8 file name decodes to (lone surrogates) shown as ``\\xNN`` escapes."""
    if text is None:
        return None
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _not_utf8(rec: SourceRecord) -> str | None:
    """The first field of ``rec`` holding text that is not valid UTF-8 (a file name's raw bytes), or None."""
    names = ["audio_path", "prompt_audio_path"] + [f.name for f in dataclasses.fields(rec)]
    for name in names:
        value = getattr(rec, name)
        for text in (value if isinstance(value, list) else [value]):
            if isinstance(text, str):
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError:
                    return name
    return None


def _utf8_only(items: Iterable) -> Iterator:
    """Quarantine records whose file names (or other text) are not UTF-8, and make every BadRecord writable."""
    for item in items:
        if isinstance(item, SourceRecord):
            field = _not_utf8(item)
            if field is None:
                yield item
                continue
            value = getattr(item, field)
            yield BadRecord(
                origin=_printable(item.origin), field=field, reason=reasons.INVALID_UTF8, id=_printable(item.id),
                detail=f"{field} {_printable(str(value))} is not valid UTF-8 (its bytes are shown as \\xNN): "
                       "rename the file or fix the text",
            )
        else:
            yield dataclasses.replace(item, **{f.name: _printable(getattr(item, f.name))
                                               for f in dataclasses.fields(item)})


def _dedupe(items: Iterable, seen: set[str]) -> Iterator:
    """Pass records through, turning a repeated id into a quarantined duplicate."""
    first_origin: dict[str, str] = {}
    for item in items:
        if isinstance(item, SourceRecord):
            if item.id in seen:
                yield BadRecord(
                    origin=item.origin, field="id", reason=reasons.DUPLICATE_ID, id=item.id,
                    detail=f"id {item.id!r} already used at {first_origin.get(item.id, 'an earlier row')}",
                )
                continue
            seen.add(item.id)
            first_origin[item.id] = item.origin
        yield item


def _process(records: list, settings: RowSettings, pool: WorkerPool | None, workers: int) -> Iterator[Any]:
    """Yield each record's row or BadRecord in input order, converting audio on ``pool`` (None: here)."""
    if pool is None or len(records) < 2:
        for rec in records:
            yield convert_record(rec, settings)
        return
    chunk = max(1, min(4, len(records) // (workers * 8)))
    yield from pool.imap(partial(convert_record, s=settings), records, chunksize=chunk)


def _quarantine_line(bad: BadRecord) -> str:
    fields = {k: _printable(v) if isinstance(v, str) else v for k, v in dataclasses.asdict(bad).items()}
    return json.dumps(fields, ensure_ascii=False) + "\n"


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
    workers = num_workers(cfg.run.num_workers)
    settings = _settings(c)

    # on SIGTERM / SIGINT every block below unwinds: the pool stops first, then the staging folder goes
    with stop_on_signals("convert"), tempfile.TemporaryDirectory(prefix="audiotune-convert-") as tmp, \
            tracking.stage_run(cfg.tracking, "convert") as tracker, \
            publish.publish_dir(output, overwrite=c.overwrite, kind=artifacts.DATASET, inputs=inputs) as staging, \
            ExitStack() as stack:
        start = time.perf_counter()  # the work itself, not MLflow's set-up
        tracker.log_params({"convert": c.model_dump(mode="json"), "run": cfg.run.model_dump(mode="json")})
        workdir = Path(tmp)
        fmt_name, items = _read_source(source, fmt, c, workdir, "source")
        seen: set[str] = set()
        streams = [("split", list(_dedupe(items, seen)))]
        if c.val_source:
            _, val_items = _read_source(c.val_source, fmt, c, workdir, "val_source")
            streams.append(("val", list(_dedupe(val_items, seen))))
        input_rows = sum(len(s) for _, s in streams)
        if input_rows == 0:
            raise SourceError(f"source {source} holds no rows ({fmt_name} format)")

        pool = stack.enter_context(worker_pool(workers)) if workers > 1 and input_rows > 1 else None
        report = ConvertReport()
        report.input_rows = input_rows
        max_bytes = int(c.shard_max_mb * 2**20)
        writers = {s: ShardWriter(staging / s, c.shard_max_rows, max_bytes) for s in ("train", "val")}
        fingerprint = hashlib.sha256()
        audio_seconds = 0.0
        with open(staging / "quarantine.jsonl", "w", encoding="utf-8") as quarantine, \
                tqdm(total=input_rows, desc="convert", unit="row", mininterval=2.0) as bar:
            for target, stream in streams:
                bad_items = [i for i in stream if isinstance(i, BadRecord)]
                records = [i for i in stream if isinstance(i, SourceRecord)]
                for bad in bad_items:
                    report.add_bad(bad)
                    quarantine.write(_quarantine_line(bad))
                bar.update(len(bad_items))
                for result in _process(records, settings, pool, workers):
                    bar.update(1)
                    if isinstance(result, BadRecord):
                        report.add_bad(result)
                        quarantine.write(_quarantine_line(result))
                        continue
                    split = "val" if target == "val" else split_of(result["id"], c.val_fraction)
                    writers[split].add(result)
                    report.add_row(result, split)
                    audio_seconds += result["duration_s"] or 0.0
                    fingerprint.update(result["id"].encode() + b"\0")
                    fingerprint.update(hashlib.sha1(result["audio"] or b"").digest())
                    fingerprint.update((result["text"] or "").encode() + b"\0")
                    if bar.n % 200 == 0:
                        bar.set_postfix(audio_x_realtime=f"{audio_seconds / (time.perf_counter() - start):.0f}")
        for w in writers.values():
            w.flush()
        elapsed = time.perf_counter() - start
        throughput = {
            "elapsed_s": round(elapsed, 3),
            "workers": workers,
            "rows_per_s": round(input_rows / elapsed, 2),
            "audio_s_per_s": round(audio_seconds / elapsed, 2),
            "audio_s_per_s_per_core": round(audio_seconds / elapsed / workers, 2),
        }
        report_dict = report.write(staging, source=source, format=fmt_name, sample_rate=c.sample_rate,
                                   throughput=throughput)
        tracker.log_metrics(_metrics(report_dict))
        tracker.log_artifact(staging / "report.json")
        tracker.log_artifact(staging / "duration_histogram.png")
        tracker.log_artifact(staging / "quarantine.jsonl")
        log.info("kept %d train / %d val rows, quarantined %d (%s); %.1fx real time on %d workers",
                 report.kept["train"], report.kept["val"], report.quarantined, report.summary_of_reasons(),
                 throughput["audio_s_per_s"], workers)

        if report.bad_fraction > c.max_bad_fraction:
            kept_aside = _keep_rejects(output, staging)
            raise ConvertError(
                f"{report.quarantined} of {input_rows} rows ({report.bad_fraction:.1%}) were quarantined, "
                f"above max_bad_fraction={c.max_bad_fraction}: {report.summary_of_reasons()}. "
                f"See {kept_aside} for each row, file and field."
            )
        if report.kept["train"] == 0:
            raise ConvertError(f"no usable training rows in {source}: {report.summary_of_reasons()}")
        if c.val_fraction > 0 and report.kept["val"] == 0 and not c.val_source:
            log.warning("val split is empty (val_fraction=%s on %d rows)", c.val_fraction, report.kept["train"])

        manifest = artifacts.write_manifest(
            staging,
            artifacts.DATASET,
            artifacts.DATASET_VERSION,
            source=source,
            format=fmt_name,
            sample_rate=c.sample_rate,
            columns=COLUMNS,
            splits={s: {"rows": w.rows, "shards": w.shards} for s, w in writers.items()},
            quarantined=report.quarantined,
            fingerprint=fingerprint.hexdigest(),
            config=c.model_dump(mode="json"),
        )
        tracker.set_tags({"dataset_fingerprint": manifest["fingerprint"]})
    log.info("published dataset %s", output)
    return ConvertResult(output=output, report=report_dict, manifest=manifest)


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


def _keep_rejects(output: str, staging: Path) -> str:
    """Copy the quarantine file and report beside the (unpublished) output."""
    base = output.rstrip("/")
    for name in ("quarantine.jsonl", "report.json"):
        storage.write_bytes(f"{base}.{name}", (staging / name).read_bytes())
    return f"{base}.quarantine.jsonl"

"""What the convert stages (one task, or fanned out into units) do with records that cannot become rows.

Records whose text is not UTF-8 (a file name's raw bytes) and repeated ids are turned into quarantined
:class:`BadRecord` s before any audio is read; each bad record is one line of ``quarantine.jsonl``; a run
that quarantined more than ``convert.max_bad_fraction`` of its rows, or kept no training row, fails as a
whole with :class:`ConvertError`, its quarantine and report kept beside the unpublished output.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Iterable, Iterator

from audiotune import storage
from audiotune.data import reasons
from audiotune.data.sources.base import BadRecord, SourceRecord
from audiotune.errors import DataError

log = logging.getLogger(__name__)


class ConvertError(DataError):
    """The conversion failed as a whole (empty source, too many bad rows)."""


def printable(text: str | None) -> str | None:
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


def utf8_only(items: Iterable) -> Iterator:
    """Quarantine records whose file names (or other text) are not UTF-8, and make every BadRecord writable."""
    for item in items:
        if isinstance(item, SourceRecord):
            field = _not_utf8(item)
            if field is None:
                yield item
                continue
            value = getattr(item, field)
            yield BadRecord(
                origin=printable(item.origin), field=field, reason=reasons.INVALID_UTF8, id=printable(item.id),
                detail=f"{field} {printable(str(value))} is not valid UTF-8 (its bytes are shown as \\xNN): "
                       "rename the file or fix the text",
            )
        else:
            yield dataclasses.replace(item, **{f.name: printable(getattr(item, f.name))
                                               for f in dataclasses.fields(item)})


def dedupe(items: Iterable, seen: set[str]) -> Iterator:
    """Pass records through, turning a repeated id into a quarantined duplicate (``seen`` grows)."""
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


def quarantine_line(bad: BadRecord) -> str:
    """One line of ``quarantine.jsonl``."""
    fields = {k: printable(v) if isinstance(v, str) else v for k, v in dataclasses.asdict(bad).items()}
    return json.dumps(fields, ensure_ascii=False) + "\n"


def keep_rejects(output: str, staging: Path) -> str:
    """Copy the quarantine file and report beside the (unpublished) output; returns the quarantine's URI."""
    base = output.rstrip("/")
    for name in ("quarantine.jsonl", "report.json"):
        storage.write_bytes(f"{base}.{name}", (staging / name).read_bytes())
    return f"{base}.quarantine.jsonl"


def check_kept(report, max_bad_fraction: float, source: str, output: str, staging: Path) -> None:
    """Fail the run when it quarantined more than ``max_bad_fraction`` of its rows (keeping the rejects beside
    ``output``) or kept no training row.

    Raises:
        ConvertError: Naming the fraction, the reasons and where each bad row is listed.
    """
    if report.bad_fraction > max_bad_fraction:
        kept_aside = keep_rejects(output, staging)
        raise ConvertError(
            f"{report.quarantined} of {report.input_rows} rows ({report.bad_fraction:.1%}) were quarantined, "
            f"above max_bad_fraction={max_bad_fraction}: {report.summary_of_reasons()}. "
            f"See {kept_aside} for each row, file and field.")
    if report.kept["train"] == 0:
        raise ConvertError(f"no usable training rows in {source}: {report.summary_of_reasons()}")

"""Reading JSONL line by line without letting one bad line stop the file."""

from __future__ import annotations

import gzip
import json
import zlib
from pathlib import Path
from typing import Iterator, Union

from audiotune.data import reasons
from audiotune.data.sources.base import BadRecord, SourceError

Parsed = Union[tuple[int, dict], BadRecord]


def iter_json_lines(path: Path, label: str | None = None) -> Iterator[Parsed]:
    """Yield ``(line_no, object)`` per non-blank line, or a BadRecord for a line that is not a JSON object.

    Raises:
        SourceError: the file itself cannot be read (e.g. a corrupt or truncated gzip stream).
    """
    label = label or path.name
    opener = gzip.open if path.name.endswith(".gz") else open
    no = 0
    try:
        with opener(path, "rb") as f:
            for no, raw in enumerate(f, start=1):
                if raw.strip():
                    yield _parse(raw, no, f"{label}:{no}")
    except (OSError, EOFError, zlib.error) as err:
        raise SourceError(f"{path}: cannot read past line {no} ({err}); re-create or re-download the file") from err


def _parse(raw: bytes, no: int, origin: str) -> Parsed:
    """One line: ``(no, object)``, or why it is bad."""
    shown = raw[:200].decode("utf-8", "replace").rstrip("\n")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        return BadRecord(origin, "line", reasons.INVALID_UTF8, f"{origin}: not valid UTF-8 at byte {err.start}; "
                         "re-encode the file as UTF-8", raw=shown)
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        return BadRecord(origin, "line", reasons.INVALID_JSON, f"{origin}: invalid JSON ({err.msg} at column "
                         f"{err.colno})", raw=shown)
    if not isinstance(obj, dict):
        return BadRecord(origin, "line", reasons.INVALID_JSON,
                         f"{origin}: expected a JSON object, got {type(obj).__name__}", raw=shown)
    return no, obj


def first_object(path: Path) -> dict | None:
    """The first JSON object of a (possibly gzipped) JSONL file, or None."""
    try:
        for item in iter_json_lines(path):
            if isinstance(item, tuple):
                return item[1]
    except SourceError:
        return None
    return None

"""Reading JSONL line by line without letting one bad line stop the file."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Iterator, Union

from audiotune.data import reasons
from audiotune.data.sources.base import BadRecord

Parsed = Union[tuple[int, dict], BadRecord]


def iter_json_lines(path: Path, label: str | None = None) -> Iterator[Parsed]:
    """Yield ``(line_no, object)`` per non-blank line, or a BadRecord for a line that is not a JSON object."""
    label = label or path.name
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as f:
        for no, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            origin = f"{label}:{no}"
            shown = raw[:200].decode("utf-8", "replace").rstrip("\n")
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                yield BadRecord(origin, "line", reasons.INVALID_UTF8,
                                f"{origin}: not valid UTF-8 at byte {err.start}", raw=shown)
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as err:
                yield BadRecord(origin, "line", reasons.INVALID_JSON, f"{origin}: invalid JSON ({err.msg})", raw=shown)
                continue
            if not isinstance(obj, dict):
                yield BadRecord(origin, "line", reasons.INVALID_JSON,
                                f"{origin}: expected a JSON object, got {type(obj).__name__}", raw=shown)
                continue
            yield no, obj


def first_object(path: Path) -> dict | None:
    """The first JSON object of a (possibly gzipped) JSONL file, or None."""
    try:
        for item in iter_json_lines(path):
            if isinstance(item, tuple):
                return item[1]
    except OSError:
        return None
    return None

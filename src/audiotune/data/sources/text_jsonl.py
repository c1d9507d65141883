"""Text JSONL (``.jsonl`` or ``.jsonl.gz``) documents for text-only language models."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from audiotune.data import reasons
from audiotune.data.sources._lines import first_object, iter_json_lines
from audiotune.data.sources.base import BadRecord, Item, SourceOptions, SourceRecord


def _files(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.name.endswith((".jsonl", ".jsonl.gz")))
    return [path]


class TextJsonlReader:
    """Plain-text documents, one JSON object per line."""

    name = "text"

    def detect(self, path: Path) -> bool:
        """A ``.jsonl.gz`` file, or a ``.jsonl`` whose first object has ``text`` and no audio field."""
        files = _files(path) if path.exists() else []
        if not files or not files[0].name.endswith((".jsonl", ".jsonl.gz")):
            return False
        if files[0].name.endswith(".jsonl.gz"):
            return True
        obj = first_object(files[0])
        return obj is not None and "text" in obj and "audio" not in obj and "target_audio_path" not in obj

    def read(self, path: Path, options: SourceOptions) -> Iterator[Item]:
        """One text record per line of the file, or of every ``.jsonl``/``.jsonl.gz`` under a folder (sorted)."""
        field = options.text_field
        base = path if path.is_dir() else path.parent
        for file in _files(path):
            label = str(file.relative_to(base))
            stem = label.split(".jsonl")[0]
            for item in iter_json_lines(file, label):
                if isinstance(item, BadRecord):
                    yield item
                    continue
                no, obj = item
                origin = f"{label}:{no}"
                rid = str(obj["id"]) if obj.get("id") is not None else f"{stem}-{no}"
                text = obj.get(field)
                if text is None:
                    yield BadRecord(origin, field, reasons.MISSING_FIELD, f"{origin}: field {field!r} is missing",
                                    id=rid)
                elif not isinstance(text, str) or not text.strip():
                    yield BadRecord(origin, field, reasons.EMPTY_TEXT, f"{origin}: field {field!r} is empty", id=rid)
                else:
                    meta = {k: v for k, v in obj.items() if k not in ("id", field)}
                    yield SourceRecord(id=rid, origin=origin, task="text", text=text, meta=meta)


READER = TextJsonlReader()

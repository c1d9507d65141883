"""JSONL manifest: Step-Audio-EditX fields, or the plain ``audio`` / ``text`` / ``speaker`` form.

Paths are relative to the manifest's directory and may not leave it.
"""

from __future__ import annotations

import os
import posixpath
from pathlib import Path
from typing import Iterator

from audiotune.data import reasons
from audiotune.data.sources._lines import first_object, iter_json_lines
from audiotune.data.sources.base import BadRecord, Item, SourceOptions, SourceRecord, resolve_inside

KNOWN = {"id", "audio", "text", "speaker", "target_audio_path", "target_text", "prompt_audio_path",
         "prompt_text", "edit_type", "speaker_id"}


def _str(value) -> str | None:
    return None if value is None else str(value)


def _default_id(root: Path, audio_rel: str, audio_path: str) -> str:
    """The audio path relative to the root, without extension, with ``/`` separators (``spk1/utt003``)."""
    if os.path.isabs(audio_rel):
        rel = os.path.relpath(audio_path, os.path.realpath(root))
    else:
        rel = posixpath.normpath(audio_rel.replace("\\", "/"))
    return posixpath.splitext(rel.replace(os.sep, "/"))[0]


class JsonlManifestReader:
    """Step-Audio-EditX / plain JSONL manifests."""

    name = "jsonl"

    def detect(self, path: Path) -> bool:
        """A ``.jsonl`` file whose first object has ``target_audio_path`` or ``audio``."""
        if not path.is_file() or not path.name.endswith(".jsonl"):
            return False
        obj = first_object(path)
        return obj is not None and ("target_audio_path" in obj or "audio" in obj)

    def read(self, path: Path, options: SourceOptions) -> Iterator[Item]:
        """Yield one record or bad record per non-blank line; audio paths are relative to the manifest's folder."""
        root = path.parent
        for item in iter_json_lines(path):
            if isinstance(item, BadRecord):
                yield item
                continue
            no, obj = item
            yield self._record(obj, root, f"{path.name}:{no}")

    @staticmethod
    def _record(obj: dict, root: Path, origin: str) -> Item:
        editx = "target_audio_path" in obj or "target_text" in obj
        audio_key, text_key, spk_key = (
            ("target_audio_path", "target_text", "speaker_id") if editx else ("audio", "text", "speaker")
        )
        rid = _str(obj.get("id"))

        def bad(field: str, reason: str, detail: str) -> BadRecord:
            return BadRecord(origin, field, reason, f"{origin}: {detail}", id=rid)

        audio_rel = obj.get(audio_key)
        if not isinstance(audio_rel, str) or not audio_rel.strip():
            return bad(audio_key, reasons.MISSING_FIELD, f"field {audio_key!r} is missing or not a path")
        try:
            audio_path = resolve_inside(root, audio_rel)
        except ValueError as err:
            return bad(audio_key, reasons.PATH_ESCAPE, str(err))
        text = obj.get(text_key)
        if text is None:
            return bad(text_key, reasons.MISSING_FIELD, f"field {text_key!r} is missing")
        if not isinstance(text, str):
            return bad(text_key, reasons.MISSING_FIELD, f"field {text_key!r} must be a string, got {text!r}")
        if not text.strip():
            return bad(text_key, reasons.EMPTY_TEXT, f"field {text_key!r} is empty; give the transcript")
        prompt_path = None
        prompt_rel = obj.get("prompt_audio_path")
        if prompt_rel:
            try:
                prompt_path = resolve_inside(root, str(prompt_rel))
            except ValueError as err:
                return bad("prompt_audio_path", reasons.PATH_ESCAPE, str(err))
        if rid is None:
            rid = _default_id(root, audio_rel, audio_path)
        meta = {k: v for k, v in obj.items() if k not in KNOWN}
        edit_type = obj.get("edit_type")
        if edit_type:
            meta["edit_type"] = edit_type
        task = "edit" if edit_type else ("clone" if prompt_path else "tts")
        return SourceRecord(
            id=rid, origin=origin, task=task, text=text.strip(), speaker=_str(obj.get(spk_key)),
            audio_path=audio_path, prompt_text=_str(obj.get("prompt_text")), prompt_audio_path=prompt_path,
            meta=meta,
        )


READER = JsonlManifestReader()

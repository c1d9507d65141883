"""What every source format yields: records to convert, or bad records to quarantine.

A source reader never decodes audio and never raises on a bad row: it yields a
:class:`BadRecord` naming the file, line and field, and goes on. Audio paths are
resolved against the source root and refused when they escape it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Protocol, Union

from audiotune.errors import DataError


class SourceError(DataError):
    """The source as a whole cannot be read (empty, unknown layout, missing files)."""


@dataclass
class SourceRecord:
    """One input row, before audio is decoded.

    Attributes:
        id: Unique row id (the stage quarantines duplicates).
        origin: Where the row came from, for messages: ``"manifest.jsonl:12"``.
        task: ``tts`` | ``edit`` | ``music`` | ``text`` (what the row trains).
        text: Target text (or the text document for ``text`` rows).
        speaker: Speaker label, or None.
        audio_path: Absolute path of the target audio, already checked to lie inside the root.
        prompt_text: Prompt transcript (voice cloning / editing), or None.
        prompt_audio_path: Absolute path of the prompt audio, or None.
        tags: Tags (music).
        lyrics: Lyrics (music), or None.
        meta: Everything else, e.g. ``{"edit_type": "emotion"}``; stored as a JSON string.
        repeat: How many times the row counts in training (ACE-Step ``repeat_count``).
    """

    id: str
    origin: str
    task: str = "tts"
    text: str | None = None
    speaker: str | None = None
    audio_path: str | None = None
    prompt_text: str | None = None
    prompt_audio_path: str | None = None
    tags: list[str] = field(default_factory=list)
    lyrics: str | None = None
    meta: dict = field(default_factory=dict)
    repeat: int = 1


@dataclass
class BadRecord:
    """A row that cannot be used, with the reason it goes to quarantine.

    Attributes:
        origin: ``"file:line"`` or the file path.
        field: The offending field (``"target_audio_path"``, ``"text"``, ``"line"`` ...).
        reason: A short stable code (see ``audiotune.data.reasons``).
        detail: A sentence a user can act on.
        id: Row id when known.
        raw: The raw line (truncated) when there is one.
    """

    origin: str
    field: str
    reason: str
    detail: str
    id: str | None = None
    raw: str | None = None


Item = Union[SourceRecord, BadRecord]


class SourceReader(Protocol):
    """A source format: ``detect`` says whether a path looks like it, ``read`` yields rows."""

    name: str

    def detect(self, path: Path) -> bool: ...

    def read(self, path: Path, options: "SourceOptions") -> Iterator[Item]: ...


@dataclass
class SourceOptions:
    """Format options taken from the convert config."""

    text_field: str = "text"
    repeat_count: int = 1
    default_task: str | None = None


def resolve_inside(root: Path, rel: str) -> str:
    """Resolve ``rel`` against ``root``; raise ValueError if the result leaves ``root``.

    Absolute paths are accepted only when they lie inside the root. Symlinks are
    resolved before the check.
    """
    root_real = os.path.realpath(root)
    candidate = rel if os.path.isabs(rel) else os.path.join(root_real, rel)
    real = os.path.realpath(candidate)
    if real != root_real and not real.startswith(root_real + os.sep):
        raise ValueError(f"path {rel!r} escapes the source root {root_real}")
    return real

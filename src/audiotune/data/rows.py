"""Turn a :class:`SourceRecord` into a Dataset row, or a :class:`BadRecord` saying why not.

This is the per-row work of the convert stage; it runs in worker processes, so it
takes and returns plain picklable objects.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from audiotune.data import audio, reasons
from audiotune.data.sources.base import BadRecord, SourceRecord


@dataclass(frozen=True)
class RowSettings:
    """The slice of the convert config a worker needs."""

    sample_rate: int
    trim_silence: bool
    trim_top_db: float
    silence_threshold_db: float
    min_duration_s: float
    max_duration_s: float

    @classmethod
    def of(cls, c) -> RowSettings:
        """The settings of a ``ConvertConfig``."""
        return cls(sample_rate=c.sample_rate, trim_silence=c.trim_silence, trim_top_db=c.trim_top_db,
                   silence_threshold_db=c.silence_threshold_db, min_duration_s=c.min_duration_s,
                   max_duration_s=c.max_duration_s)


def _bad(rec: SourceRecord, field: str, reason: str, detail: str) -> BadRecord:
    return BadRecord(origin=rec.origin, field=field, reason=reason, detail=detail, id=rec.id)


def _header_limit(s: RowSettings) -> float:
    """The longest duration a file's header may declare before it is refused undecoded.

    ``max_duration_s`` itself, or with ``trim_silence`` (which may shorten a file after decoding) twice
    that plus a minute: still a bound on what one worker decodes.
    """
    return 2 * s.max_duration_s + 60.0 if s.trim_silence else s.max_duration_s


def _load(path: str, rec: SourceRecord, field: str, s: RowSettings) -> np.ndarray | BadRecord:
    try:
        wav = audio.load_audio(path, s.sample_rate, max_seconds=_header_limit(s))
    except audio.AudioError as err:
        if err.reason == reasons.TOO_LONG:
            return _bad(rec, field, err.reason, f"{err.detail} (max_duration_s={s.max_duration_s})")
        return _bad(rec, field, err.reason, err.detail)
    if s.trim_silence and not audio.is_silent(wav, s.silence_threshold_db):
        wav = audio.trim_silence(wav, s.sample_rate, top_db=s.trim_top_db)
    if audio.is_silent(wav, s.silence_threshold_db):
        return _bad(
            rec,
            field,
            reasons.SILENT_AUDIO,
            f"{path}: peak {audio.peak_dbfs(wav):.1f} dBFS is below {s.silence_threshold_db} dBFS",
        )
    return wav


def convert_record(rec: SourceRecord, s: RowSettings) -> dict | BadRecord:
    """Decode, validate and encode one record."""
    meta = dict(rec.meta)
    meta["origin"] = rec.origin
    if rec.repeat != 1:
        meta["repeat_count"] = rec.repeat
    row = {
        "id": rec.id,
        "speaker": rec.speaker,
        "task": rec.task,
        "text": rec.text,
        "audio": None,
        "duration_s": None,
        "prompt_text": rec.prompt_text,
        "prompt_audio": None,
        "tags": list(rec.tags),
        "lyrics": rec.lyrics,
        "meta": None,
    }
    if rec.audio_path is not None:
        field = "audio_path"
        wav = _load(rec.audio_path, rec, field, s)
        if isinstance(wav, BadRecord):
            return wav
        duration = len(wav) / s.sample_rate
        if duration < s.min_duration_s:
            return _bad(
                rec, field, reasons.TOO_SHORT,
                f"{rec.audio_path}: {duration:.2f} s is shorter than min_duration_s={s.min_duration_s}",
            )
        if duration > s.max_duration_s:
            return _bad(
                rec, field, reasons.TOO_LONG,
                f"{rec.audio_path}: {duration:.2f} s is longer than max_duration_s={s.max_duration_s}",
            )
        row["audio"] = audio.encode_flac(wav, s.sample_rate)
        row["duration_s"] = float(duration)
    if rec.prompt_audio_path is not None:
        prompt = _load(rec.prompt_audio_path, rec, "prompt_audio_path", s)
        if isinstance(prompt, BadRecord):
            return prompt
        row["prompt_audio"] = audio.encode_flac(prompt, s.sample_rate)
        meta["prompt_duration_s"] = round(len(prompt) / s.sample_rate, 4)
    row["meta"] = json.dumps(meta, ensure_ascii=False, sort_keys=True)
    return row

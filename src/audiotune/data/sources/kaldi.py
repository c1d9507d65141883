"""Kaldi-style folder (CosyVoice recipes): ``wav.scp``, ``text``, optional ``utt2spk``."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from audiotune.data import reasons
from audiotune.data.sources.base import BadRecord, Item, SourceOptions, SourceRecord, resolve_inside


def _table(path: Path, bad: list[BadRecord]) -> dict[str, tuple[int, str]]:
    """``utt rest-of-line`` → {utt: (line_no, rest)}; bad lines are collected."""
    table: dict[str, tuple[int, str]] = {}
    if not path.exists():
        return table
    for no, raw in enumerate(path.read_bytes().split(b"\n"), start=1):
        if not raw.strip():
            continue
        origin = f"{path.name}:{no}"
        try:
            line = raw.decode("utf-8").strip()
        except UnicodeDecodeError as err:
            bad.append(BadRecord(origin, "line", reasons.INVALID_UTF8, f"{origin}: not valid UTF-8 at byte {err.start}",
                                 raw=raw[:200].decode("utf-8", "replace")))
            continue
        utt, *rest_of_line = line.split(maxsplit=1)  # Kaldi separates with any whitespace
        rest = rest_of_line[0] if rest_of_line else ""
        if utt in table:
            bad.append(BadRecord(origin, "utt", reasons.DUPLICATE_ID,
                                 f"{origin}: utterance {utt!r} already listed at line {table[utt][0]}", id=utt))
            continue
        table[utt] = (no, rest)
    return table


class KaldiReader:
    """Kaldi data directories."""

    name = "kaldi"

    def detect(self, path: Path) -> bool:
        """A folder holding ``wav.scp`` and ``text``."""
        return path.is_dir() and (path / "wav.scp").is_file() and (path / "text").is_file()

    def read(self, path: Path, options: SourceOptions) -> Iterator[Item]:
        """Join ``wav.scp``, ``text`` and ``utt2spk`` on the utterance id, in ``wav.scp`` order."""
        bad: list[BadRecord] = []
        wavs = _table(path / "wav.scp", bad)
        texts = _table(path / "text", bad)
        spk = _table(path / "utt2spk", bad)
        yield from bad
        for utt, (no, location) in wavs.items():
            origin = f"wav.scp:{no}"
            if not location:
                yield BadRecord(origin, "wav.scp", reasons.MISSING_FIELD,
                                f"{origin}: utterance {utt!r} has no audio path", id=utt)
                continue
            if location.endswith("|"):
                yield BadRecord(origin, "wav.scp", reasons.UNSUPPORTED,
                                f"{origin}: piped wav.scp commands are not supported; decode to a file and give its "
                                "path", id=utt)
                continue
            if utt not in texts:
                yield BadRecord(origin, "text", reasons.MISSING_FIELD, f"{origin}: utterance {utt!r} has no transcript",
                                id=utt)
                continue
            text = texts[utt][1]
            if not text.strip():
                yield BadRecord(f"text:{texts[utt][0]}", "text", reasons.EMPTY_TEXT,
                                f"text:{texts[utt][0]}: transcript of {utt!r} is empty", id=utt)
                continue
            try:
                audio = resolve_inside(path, location)
            except ValueError as err:
                yield BadRecord(origin, "wav.scp", reasons.PATH_ESCAPE, f"{origin}: {err}", id=utt)
                continue
            yield SourceRecord(id=utt, origin=origin, task="tts", text=text,
                               speaker=spk[utt][1] if utt in spk else None, audio_path=audio)
        for utt, (no, _) in texts.items():
            if utt not in wavs:
                yield BadRecord(f"text:{no}", "wav.scp", reasons.MISSING_FIELD,
                                f"text:{no}: utterance {utt!r} has no entry in wav.scp", id=utt)


READER = KaldiReader()

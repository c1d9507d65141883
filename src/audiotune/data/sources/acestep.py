"""ACE-Step folder: ``NAME.mp3|wav|flac`` + ``NAME_prompt.txt`` (tags) + optional ``NAME_lyrics.txt``."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from audiotune.data import reasons
from audiotune.data.sources.base import BadRecord, Item, SourceOptions, SourceRecord, resolve_inside

AUDIO_EXTS = (".mp3", ".wav", ".flac", ".ogg")


def _read_text(path: Path, origin: str, field: str) -> str | BadRecord:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        return BadRecord(origin, field, reasons.INVALID_UTF8, f"{path.name}: not valid UTF-8 at byte {err.start}")


class AceStepReader:
    """ACE-Step music folders."""

    name = "acestep"

    def detect(self, path: Path) -> bool:
        """A folder with at least one ``NAME_prompt.txt`` beside an audio file ``NAME.<ext>``."""
        if not path.is_dir():
            return False
        for prompt in path.rglob("*_prompt.txt"):
            stem = prompt.name[: -len("_prompt.txt")]
            if any((prompt.parent / f"{stem}{ext}").exists() for ext in AUDIO_EXTS):
                return True
        return False

    def read(self, path: Path, options: SourceOptions) -> Iterator[Item]:
        """One music record per audio file (sorted); its id is the path relative to ``path`` without extension."""
        audio_files = sorted(p for p in path.rglob("*") if p.suffix.lower() in AUDIO_EXTS and p.is_file())
        for audio in audio_files:
            rel = audio.relative_to(path)
            rid = str(rel.with_suffix("")).replace("\\", "/")
            origin = str(rel)
            prompt = audio.with_name(f"{audio.stem}_prompt.txt")
            if not prompt.exists():
                yield BadRecord(origin, "prompt", reasons.MISSING_FIELD,
                                f"{origin}: {prompt.name} (the comma-separated tags) is missing", id=rid)
                continue
            tags_text = _read_text(prompt, origin, "prompt")
            if isinstance(tags_text, BadRecord):
                tags_text.id = rid
                yield tags_text
                continue
            tags = [t.strip() for t in tags_text.split(",") if t.strip()]
            if not tags:
                yield BadRecord(origin, "prompt", reasons.EMPTY_TEXT, f"{origin}: {prompt.name} holds no tags", id=rid)
                continue
            try:
                audio_path = resolve_inside(path, str(rel))
            except ValueError as err:  # a symlink pointing out of the folder
                yield BadRecord(origin, "audio", reasons.PATH_ESCAPE, f"{origin}: {err}", id=rid)
                continue
            lyrics = None
            lyrics_path = audio.with_name(f"{audio.stem}_lyrics.txt")
            if lyrics_path.exists():
                lyrics_text = _read_text(lyrics_path, origin, "lyrics")
                if isinstance(lyrics_text, BadRecord):
                    lyrics_text.id = rid
                    yield lyrics_text
                    continue
                lyrics = lyrics_text.strip() or None
            yield SourceRecord(id=rid, origin=origin, task="music", text=lyrics, audio_path=audio_path,
                               tags=tags, lyrics=lyrics, repeat=options.repeat_count)


READER = AceStepReader()

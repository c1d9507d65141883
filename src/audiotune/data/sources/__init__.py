"""Source formats: a registry by name, and autodetection when no format is given."""

from __future__ import annotations

from pathlib import Path

from audiotune.data.sources import acestep, jsonl_manifest, kaldi, text_jsonl
from audiotune.data.sources.base import SourceError

READERS = {r.name: r for r in (jsonl_manifest.READER, text_jsonl.READER, kaldi.READER, acestep.READER)}
DETECT_ORDER = ("jsonl", "text", "kaldi", "acestep")


def get_reader(name: str):
    """The reader registered under ``name``."""
    try:
        return READERS[name]
    except KeyError:
        raise SourceError(f"unknown source format {name!r}; known formats: {', '.join(sorted(READERS))}") from None


def detect_format(path: Path) -> str:
    """Name of the first format whose layout ``path`` matches."""
    for name in DETECT_ORDER:
        if READERS[name].detect(path):
            return name
    raise SourceError(
        f"cannot tell the layout of {path}: expected a .jsonl manifest (target_audio_path or audio fields), "
        "a text .jsonl/.jsonl.gz, a Kaldi folder (wav.scp + text) or an ACE-Step folder (NAME.wav + "
        "NAME_prompt.txt); pass --format to choose"
    )


def resolve_source(path: Path, fmt: str | None) -> tuple[str, Path]:
    """The format name and the path to hand to its reader.

    A folder holding exactly one ``.jsonl`` manifest (and no other layout) is read as that manifest.
    """
    path = Path(path)
    if not path.exists():
        raise SourceError(f"source {path} does not exist")
    if fmt is not None:
        get_reader(fmt)
        if fmt == "jsonl" and path.is_dir():
            manifests = sorted(path.glob("*.jsonl"))
            if len(manifests) != 1:
                raise SourceError(f"{path}: expected one .jsonl manifest in the folder, found {len(manifests)}")
            return fmt, manifests[0]
        return fmt, path
    if path.is_dir() and not (READERS["kaldi"].detect(path) or READERS["acestep"].detect(path)):
        manifests = sorted(path.glob("*.jsonl"))
        if len(manifests) == 1 and READERS["jsonl"].detect(manifests[0]):
            return "jsonl", manifests[0]
    return detect_format(path), path

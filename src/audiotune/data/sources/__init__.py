"""Source formats: a registry by name, and autodetection when no format is given."""

from __future__ import annotations

from pathlib import Path

from audiotune.data.sources import acestep, jsonl_manifest, kaldi, text_jsonl
from audiotune.data.sources.base import SourceError, SourceReader

READERS: dict[str, SourceReader] = {
    r.name: r for r in (jsonl_manifest.READER, text_jsonl.READER, kaldi.READER, acestep.READER)
}
DETECT_ORDER = ("jsonl", "text", "kaldi", "acestep")


def get_reader(name: str) -> SourceReader:
    """The reader registered under ``name``.

    Raises:
        SourceError: unknown name (the message lists the known ones).
    """
    try:
        return READERS[name]
    except KeyError:
        raise SourceError(f"unknown source format {name!r}; known formats: {', '.join(sorted(READERS))}") from None


def _lone_manifest(path: Path) -> Path | None:
    """The only ``.jsonl`` file of folder ``path`` when it is an audio manifest, else None."""
    if not path.is_dir():
        return None
    manifests = sorted(path.glob("*.jsonl"))
    if len(manifests) == 1 and READERS["jsonl"].detect(manifests[0]):
        return manifests[0]
    return None


def detect_format(path: Path) -> str:
    """Name of the first format (in ``DETECT_ORDER``) whose layout ``path`` matches.

    A folder that matches no layout but holds exactly one ``.jsonl`` audio manifest is ``jsonl``.

    Raises:
        SourceError: no layout matches.
    """
    path = Path(path)
    for name in DETECT_ORDER:
        if READERS[name].detect(path):
            return name
    if _lone_manifest(path) is not None:
        return "jsonl"
    raise SourceError(
        f"cannot tell the layout of {path}: expected a .jsonl manifest (target_audio_path or audio fields), "
        "a text .jsonl/.jsonl.gz, a Kaldi folder (wav.scp + text) or an ACE-Step folder (NAME.wav + "
        "NAME_prompt.txt), or a folder holding one .jsonl manifest; pass --format to choose"
    )


def resolve_source(path: Path, fmt: str | None) -> tuple[str, Path]:
    """The format name and the path to hand to its reader.

    Args:
        path: The source file or folder.
        fmt: A format name, or None to detect it.

    Returns:
        ``(format name, path for read)``; a folder read as ``jsonl`` becomes its single manifest.

    Raises:
        SourceError: the path does not exist, the format is unknown, or the layout cannot be told.
    """
    path = Path(path)
    if not path.exists():
        raise SourceError(f"source {path} does not exist")
    if fmt is None:
        fmt = detect_format(path)
    else:
        get_reader(fmt)
    if fmt == "jsonl" and path.is_dir():
        manifests = sorted(path.glob("*.jsonl"))
        if len(manifests) != 1:
            raise SourceError(f"{path}: expected one .jsonl manifest in the folder, found {len(manifests)}")
        return fmt, manifests[0]
    return fmt, path

"""Artifact manifests: every artifact directory carries ``manifest.json`` at its root.

``{"kind": "audiotune.<kind>", "schema_version": N, ...}``. A stage checks the kind
and version of what it reads and stops with a clear message when they differ.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from audiotune import __version__, storage
from audiotune.errors import DataError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"

DATASET = "audiotune.dataset"
DATASET_VERSION = 1
TOKENS = "audiotune.tokens"
TOKENS_VERSION = 1
LLM = "audiotune.llm"
LLM_VERSION = 1
FLOW = "audiotune.flow"
FLOW_VERSION = 1
EXPORT = "audiotune.export"
EXPORT_VERSION = 1
EVAL = "audiotune.eval"
EVAL_VERSION = 1


class ArtifactError(DataError):
    """An artifact that is missing, incomplete, or of the wrong kind or version."""


SHARD_GLOB = "*/part-*.parquet"
SHARDED = (DATASET, TOKENS)  # kinds whose manifest lists its shard files (``shard_files``)


def _digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def shard_files(directory: Path, pattern: str = SHARD_GLOB) -> list[dict[str, Any]]:
    """``path`` (relative), ``rows``, ``bytes`` and ``sha256`` of every ``<split>/part-*.parquet`` under
    ``directory`` (or of the files ``pattern`` names), sorted by path."""
    import pyarrow.parquet as pq

    directory = Path(directory)
    return [{"path": p.relative_to(directory).as_posix(), "rows": pq.ParquetFile(p).metadata.num_rows,
             "bytes": p.stat().st_size, "sha256": _digest(p)} for p in sorted(directory.glob(pattern))]


def verify_shards(directory: Path, manifest: dict[str, Any], uri: str) -> None:
    """Check a local copy of a Dataset or Tokens artifact against its manifest's ``shard_files``: every listed
    shard there with its size, row count and checksum, no shard that is not listed, and split totals equal to
    the shards' rows.

    Raises:
        ArtifactError: Naming the first shard (or split) that differs.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    listed = manifest.get("shard_files")
    if listed is None:
        log.warning("%s: its manifest lists no shard files (written by an older audiotune); shards not checked", uri)
        return
    if not isinstance(listed, list) or not all(isinstance(e, dict) and isinstance(e.get("path"), str)
                                               for e in listed):
        raise ArtifactError(f"{uri}: manifest shard_files is not a list of {{path, rows, bytes, sha256}}")
    directory = Path(directory)
    for entry in listed:
        name = entry["path"]
        path = storage.inside(directory, name, f"{uri}: manifest shard_files")
        if not path.is_file():
            raise ArtifactError(f"{uri}: shard {name} listed in its manifest is missing")
        if path.stat().st_size != entry.get("bytes"):
            raise ArtifactError(f"{uri}: shard {name} has {path.stat().st_size} bytes, its manifest says "
                                f"{entry.get('bytes')} (changed after publishing?)")
        try:
            rows = pq.ParquetFile(path).metadata.num_rows
        except (pa.ArrowException, OSError) as err:
            raise ArtifactError(f"{uri}: shard {name} is not a readable Parquet file ({err})") from None
        if rows != entry.get("rows"):
            raise ArtifactError(f"{uri}: shard {name} holds {rows} rows, its manifest says {entry.get('rows')}")
        if _digest(path) != entry.get("sha256"):
            raise ArtifactError(f"{uri}: shard {name} does not match the sha256 in its manifest (changed after "
                                "publishing?)")
    names = {e["path"] for e in listed}
    extra = sorted(p.relative_to(directory).as_posix() for p in directory.glob(SHARD_GLOB)
                   if p.relative_to(directory).as_posix() not in names)
    if extra:
        raise ArtifactError(f"{uri}: shard {extra[0]} is not listed in its manifest (a copy, or left from another "
                            "run?); remove it or re-run the stage that wrote the artifact")
    for split, info in (manifest.get("splits") or {}).items():
        total = sum(int(e.get("rows") or 0) for e in listed if e["path"].startswith(f"{split}/"))
        if isinstance(info, dict) and info.get("rows") != total:
            raise ArtifactError(f"{uri}: manifest splits.{split}.rows is {info.get('rows')!r}, but its {split} "
                                f"shards hold {total} rows")


def write_manifest(directory: Path, kind: str, schema_version: int, **fields: Any) -> dict[str, Any]:
    """Write ``manifest.json`` into a local staging directory and return it; a Dataset's or Tokens' lists its
    shard files (:func:`shard_files`), which readers check (:func:`verify_shards`)."""
    if kind in SHARDED:
        fields.setdefault("shard_files", shard_files(directory))
    manifest = {
        "kind": kind,
        "schema_version": schema_version,
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "audiotune_version": __version__,
        **fields,
    }
    (Path(directory) / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    return manifest


def read_manifest(uri: str, kind: str, schema_version: int) -> dict[str, Any]:
    """Read and check an artifact's manifest (local path or s3:// URI).

    Raises:
        ArtifactError: when the manifest is missing (absent or half-written
            artifact), unreadable, or of another kind or schema version.
    """
    manifest_uri = storage.join(uri, MANIFEST)
    if not storage.exists(manifest_uri):
        raise ArtifactError(
            f"{uri} is not a complete artifact: {MANIFEST} is missing "
            f"(expected a {kind} artifact; is the path right, or was it never published?)"
        )
    try:
        manifest = json.loads(storage.read_text(manifest_uri))
    except json.JSONDecodeError as err:
        raise ArtifactError(f"{manifest_uri}: not valid JSON ({err})") from None
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{manifest_uri}: a {type(manifest).__name__}, not a JSON object (expected a {kind} "
                            "manifest)")
    found_kind = manifest.get("kind")
    if found_kind != kind:
        raise ArtifactError(f"{uri} is a {found_kind!r} artifact, but this stage reads {kind!r}")
    found_version = manifest.get("schema_version")
    if found_version != schema_version:
        raise ArtifactError(
            f"{uri}: {kind} schema_version {found_version!r} is not supported "
            f"(this audiotune {__version__} reads version {schema_version}); re-run the stage that wrote it"
        )
    return manifest

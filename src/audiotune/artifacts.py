"""Artifact manifests: every artifact directory carries ``manifest.json`` at its root.

``{"kind": "audiotune.<kind>", "schema_version": N, ...}``. A stage checks the kind
and version of what it reads and stops with a clear message when they differ.
"""

from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path
from typing import Any

from audiotune import __version__, storage
from audiotune.errors import DataError

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


def write_manifest(directory: Path, kind: str, schema_version: int, **fields: Any) -> dict[str, Any]:
    """Write ``manifest.json`` into a local staging directory and return it."""
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

"""Checkpoints beside the output artifact: complete only once fully written, newest-first resume.

A checkpoint is a directory ``checkpoint-<step>`` under ``<output>.checkpoints`` (local
or S3) written by ``accelerator.save_state`` plus our ``trainer_state.json``, published
with :func:`audiotune.storage.publish_dir`, so its ``manifest.json`` appears last: a
checkpoint without a manifest is incomplete and ignored.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

from audiotune import storage

log = logging.getLogger(__name__)

KIND = "audiotune.checkpoint"
_NAME = re.compile(r"^checkpoint-(\d+)$")


def checkpoints_uri(output: str) -> str:
    """Where the checkpoints of the artifact at ``output`` live."""
    return output.rstrip("/") + ".checkpoints"


def list_complete(root: str) -> list[tuple[int, str]]:
    """``(step, uri)`` of every complete checkpoint under ``root``, oldest first."""
    found: dict[int, str] = {}
    for rel in storage.list_files(root):
        parts = rel.split("/")
        if len(parts) == 2 and parts[1] == "manifest.json":
            match = _NAME.match(parts[0])
            if match:
                found[int(match.group(1))] = storage.join(root, parts[0])
    return sorted(found.items())


def read_state(uri: str) -> dict[str, Any]:
    """The trainer state saved in a checkpoint."""
    return json.loads(storage.read_text(storage.join(uri, "manifest.json")))["trainer_state"]


def find_resume(root: str, resume: str) -> str | None:
    """The checkpoint to resume from: ``auto`` → newest complete, ``never`` → None, else the given URI."""
    if resume == "never":
        return None
    if resume != "auto":
        if not storage.exists(storage.join(resume, "manifest.json")):
            raise FileNotFoundError(f"train.resume={resume}: not a complete checkpoint (no manifest.json)")
        return resume
    complete = list_complete(root)
    return complete[-1][1] if complete else None


def prune(root: str, keep_last: int, best_step: int | None) -> None:
    """Delete complete checkpoints beyond the newest ``keep_last``, keeping the best one."""
    complete = list_complete(root)
    for step, uri in complete[:-keep_last] if keep_last else complete:
        if step != best_step:
            log.info("removing old checkpoint %s", uri)
            storage.delete(uri)


def write_manifest(directory: Path, state: dict[str, Any]) -> None:
    """The checkpoint's manifest (written into the staging dir, published last)."""
    (Path(directory) / "manifest.json").write_text(
        json.dumps({"kind": KIND, "schema_version": 1, "trainer_state": state}, indent=2) + "\n"
    )

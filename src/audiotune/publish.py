"""Atomic publishing of artifact directories, locally and on S3.

A stage writes its artifact into a local staging directory (:func:`publish_dir`); on success it
appears at the target at once: locally by a rename, on S3 by uploading every file and then
``manifest.json`` last, so a reader that waits for the manifest never sees half an artifact.
"""

from __future__ import annotations

import logging
import os
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from audiotune import storage

log = logging.getLogger(__name__)


def holds_artifact(uri: str | os.PathLike) -> bool:
    """Whether ``uri`` holds a published artifact (or anything, for a local path).

    Locally a target only ever appears by a rename, so any existing path counts. On S3 only a
    prefix with ``manifest.json`` at its root holds an artifact: files without one are what an
    interrupted upload left, and the next publish replaces them.
    """
    if not storage.is_s3(uri):
        return storage.exists(uri)
    return storage.exists(storage.join(uri, storage.MANIFEST))


def require_missing_or_overwrite(uri: str | os.PathLike, overwrite: bool) -> None:
    """Refuse a target that holds an artifact unless ``overwrite`` (see :func:`holds_artifact`).

    Raises:
        FileExistsError: When ``uri`` holds an artifact and ``overwrite`` is False.
    """
    if not overwrite and holds_artifact(uri):
        raise FileExistsError(f"{uri} already exists; choose another output or set overwrite")


@contextmanager
def publish_dir(uri: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Stage an artifact directory locally and publish it atomically when the block succeeds.

    Locally the staging directory is a hidden sibling of the target (``.<name>.tmp-<uuid>``) that is
    renamed onto the target. On S3 every file but ``manifest.json`` is uploaded first and
    ``manifest.json`` last, so a reader that waits for the manifest never sees half an artifact.
    When the block raises, the staging directory is removed and nothing is published.

    Args:
        uri: Target directory or S3 prefix.
        overwrite: Replace an existing target. Otherwise an existing target is refused on entry.

    Yields:
        The local staging directory to write the artifact into.

    Raises:
        FileExistsError: When the target exists (on entry, or again at publish) and not ``overwrite``.
    """
    require_missing_or_overwrite(uri, overwrite)
    if storage.is_s3(uri):
        staging = Path(tempfile.mkdtemp(prefix="audiotune-publish-"))
    else:
        target = Path(uri)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex}"
        staging.mkdir()
    try:
        yield staging
        if storage.is_s3(uri):
            _publish_s3(staging, str(uri).rstrip("/"), overwrite)
        else:
            _publish_local(staging, Path(uri), overwrite)
    finally:
        storage.delete(staging)


def _publish_local(staging: Path, target: Path, overwrite: bool) -> None:
    if not (target.exists() or target.is_symlink()):
        os.rename(staging, target)
        log.info("published %s", target)
        return
    if not overwrite:
        raise FileExistsError(f"{target} appeared while it was being written; nothing was published")
    old = target.parent / f".{target.name}.old-{uuid.uuid4().hex}"
    os.rename(target, old)
    try:
        os.rename(staging, target)
    except OSError:
        os.rename(old, target)
        raise
    storage.delete(old)
    log.info("published %s (replaced the previous one)", target)


def _publish_s3(staging: Path, uri: str, overwrite: bool) -> None:
    if holds_artifact(uri):
        if not overwrite:
            raise FileExistsError(f"{uri} appeared while it was being written; nothing was published")
        # from here on no reader takes the old files for a complete artifact
        storage.delete(storage.join(uri, storage.MANIFEST))
    # the old artifact's files, or what an interrupted upload left (odd keys too: they are deleted by exact key)
    previous = set(storage.list_files(uri, check_keys=False))
    if previous:
        log.info("%s: replacing %d files already under the prefix", uri, len(previous))
    rels = storage.list_files(staging)
    has_manifest = storage.MANIFEST in rels
    storage.upload_files(staging, uri, [r for r in rels if r != storage.MANIFEST])
    storage.delete_files(uri, sorted(previous - set(rels)))  # the old artifact's files the new one has not
    if has_manifest:
        storage.upload_files(staging, uri, [storage.MANIFEST])
    else:
        log.warning("published %s without a %s at its root", uri, storage.MANIFEST)
    log.info("published %s (%d files)", uri, len(rels))

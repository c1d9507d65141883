"""Atomic publishing of artifact directories, locally and on S3, and the guard on what may be replaced.

A stage writes its artifact into a local staging directory (:func:`publish_dir`); on success it
appears at the target at once: locally by a rename, on S3 by uploading every file and then
``manifest.json`` last, so a reader that waits for the manifest never sees half an artifact.

One guard (:func:`require_missing_or_overwrite`) decides whether a target may be written, before any
work and again at publish time:

- an output that is, lies inside, or contains one of the stage's inputs is refused, overwrite or not;
- an existing artifact is replaced only with ``overwrite``, and only by one of the same kind;
- with ``overwrite`` an existing local directory is replaced only when it is empty or holds an
  artifact; an S3 prefix with objects but no ``manifest.json`` only when a publish marker
  (``<prefix>.publishing``) says an interrupted publish left them. Anything else is refused, naming it.

A file that already exists elsewhere (a fan-out part's shard) need not pass through the staging disk:
:func:`place_remote` records it, and publishing copies it to the target — S3 to S3 as a server-side copy, so
merging a corpus's parts on S3 never holds the corpus on one disk.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from audiotune import storage
from audiotune.errors import OutputError, OutputExistsError

log = logging.getLogger(__name__)

MARKER_SUFFIX = ".publishing"
REMOTE_LIST = ".audiotune-remote.json"  # in a staging folder: {relative path: source URI}, never published


def place_remote(staging: Path, rel: str, source: str | os.PathLike) -> None:
    """Publish the file ``source`` (local or s3://) as ``rel`` of the artifact staged in ``staging``, copied when
    the artifact is published (on S3, server side from an S3 source) instead of through the staging folder."""
    listed = Path(staging) / REMOTE_LIST
    remote = json.loads(listed.read_text(encoding="utf-8")) if listed.exists() else {}
    remote[storage.check_relative(rel, str(staging))] = str(source)
    listed.write_text(json.dumps(remote), encoding="utf-8")


def _take_remote(staging: Path) -> dict[str, str]:
    listed = staging / REMOTE_LIST
    if not listed.exists():
        return {}
    remote = json.loads(listed.read_text(encoding="utf-8"))
    listed.unlink()
    return remote


def _fetch_remote(staging: Path, remote: dict[str, str]) -> None:
    """Bring the remote files into a local staging folder (a hard link where a local source allows it)."""
    for rel, source in remote.items():
        target = staging / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if storage.is_s3(source):
            storage.download(source, target)
            continue
        try:
            os.link(source, target)
        except OSError:
            shutil.copyfile(source, target)


def _copy_remote(uri: str, remote: dict[str, str]) -> None:
    """Copy the remote files below the S3 prefix ``uri``: server side from S3 (boto3's managed copy, multipart
    for large objects), uploaded from a local path."""
    bucket, key = storage.split_s3(uri)
    prefix = storage.dir_prefix(key)
    s3 = storage.client()

    def copy(rel: str) -> None:
        source = remote[rel]
        if storage.is_s3(source):
            src_bucket, src_key = storage.split_s3(source)
            s3.copy({"Bucket": src_bucket, "Key": src_key}, bucket, prefix + rel)
        else:
            s3.upload_file(str(source), bucket, prefix + rel)

    storage.run_all(copy, sorted(remote))


def holds_artifact(uri: str | os.PathLike) -> bool:
    """Whether ``uri`` holds a published artifact (or anything, for a local path).

    Locally a target only ever appears by a rename, so any existing path counts. On S3 only a
    prefix with ``manifest.json`` at its root holds an artifact: files without one are what an
    interrupted upload left, and the next publish replaces them (see :func:`require_missing_or_overwrite`).
    """
    if not storage.is_s3(uri):
        return storage.exists(uri)
    return storage.exists(storage.join(uri, storage.MANIFEST))


def _location(uri: str | os.PathLike) -> tuple[str, tuple[str, ...]]:
    """A comparable form of a location: ("s3:<bucket>" or "local", its path segments)."""
    if storage.is_s3(uri):
        bucket, key = storage.split_s3(str(uri))
        return f"s3:{bucket}", tuple(p for p in key.split("/") if p)
    return "local", Path(os.path.realpath(os.path.expanduser(str(uri)))).parts


def overlaps(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two locations are the same, or one lies inside the other (symbolic links resolved locally)."""
    (store_a, parts_a), (store_b, parts_b) = _location(a), _location(b)
    n = min(len(parts_a), len(parts_b))
    return store_a == store_b and parts_a[:n] == parts_b[:n]


def _manifest_kind(uri: str | os.PathLike) -> str:
    """The ``kind`` of the manifest at ``uri``; ``""`` when the manifest is unreadable or has none."""
    try:
        manifest = json.loads(storage.read_text(storage.join(uri, storage.MANIFEST)))
    except (OSError, ValueError):
        return ""
    kind = manifest.get("kind") if isinstance(manifest, dict) else None
    return kind if isinstance(kind, str) else ""


def _kind_mismatch(found: str, kind: str | None) -> str | None:
    """What is wrong with replacing an artifact of kind ``found`` by one of ``kind`` (None: any audiotune kind)."""
    if kind is not None and found != kind:
        return f"a {found or 'manifest.json without a kind'!r} artifact, not a {kind!r} one"
    if kind is None and not found.startswith("audiotune."):
        return f"a manifest.json of kind {found!r}, not an audiotune artifact"
    return None


def _check_replaceable(uri: str | os.PathLike, kind: str | None) -> None:
    """Refuse to replace anything at ``uri`` but an empty folder or an artifact of ``kind`` (any kind if None)."""
    what = None
    if storage.is_s3(uri):
        if holds_artifact(uri):
            what = _kind_mismatch(_manifest_kind(uri), kind)
        elif storage.list_files(uri, check_keys=False) and not storage.exists(str(uri).rstrip("/") + MARKER_SUFFIX):
            what = "objects but no manifest.json (not an audiotune artifact)"
    else:
        path = Path(uri)
        if path.is_symlink() or not path.is_dir():
            what = "a file, not an artifact folder"
        elif (path / storage.MANIFEST).is_file():
            what = _kind_mismatch(_manifest_kind(path), kind)
        elif any(path.iterdir()):
            what = "files but no manifest.json (not an audiotune artifact)"
    if what:
        raise OutputError(f"output {uri} holds {what}; overwrite only replaces an artifact of the same kind or an "
                          "empty folder: choose another output or remove it yourself")


def require_missing_or_overwrite(uri: str | os.PathLike, overwrite: bool, kind: str | None = None,
                                 inputs: Iterable[str | os.PathLike | None] = ()) -> None:
    """The one guard on an output: call it before any work; :func:`publish_dir` calls it again.

    Args:
        uri: The output directory or S3 prefix.
        overwrite: Whether an existing artifact may be replaced.
        kind: The manifest kind the stage writes (``audiotune.dataset`` ...); an existing artifact of
            another kind is never replaced. None: any audiotune artifact may be.
        inputs: The stage's input locations (None entries skipped; local ones only if they exist).

    Raises:
        OutputError: The output overlaps an input, or (with ``overwrite``) holds something other than an
            empty folder or an artifact of ``kind`` (exit 2).
        OutputExistsError: The output holds an artifact and ``overwrite`` is False (a FileExistsError).
    """
    for source in inputs:
        if source is None or not str(source) or (not storage.is_s3(source) and not os.path.lexists(source)):
            continue
        if overlaps(uri, source):
            raise OutputError(f"output {uri} is, contains or lies inside the input {source}: writing it would "
                              "destroy the input; choose an output outside it (overwrite does not change this)")
    if not holds_artifact(uri) and not (storage.is_s3(uri) and storage.list_files(uri, check_keys=False)):
        return
    if not overwrite and holds_artifact(uri):
        raise OutputExistsError(f"{uri} already exists; choose another output or set overwrite")
    _check_replaceable(uri, kind)


def _staged_kind(staging: Path) -> str | None:
    try:
        manifest = json.loads((staging / storage.MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    kind = manifest.get("kind") if isinstance(manifest, dict) else None
    return kind if isinstance(kind, str) and kind else None


def remove_stale_staging(target: Path) -> list[Path]:
    """Remove the staging folders (``.<name>.tmp-*``) an interrupted publish of ``target`` left behind.

    A publish holds a file lock (``<staging>.lock``) while its staging folder exists, so a folder
    whose lock can be taken belongs to a process that is gone; a running publish keeps its own. A
    ``.<name>.old-*`` folder (the replaced artifact, deleted right after the swap) goes after a minute.

    Returns:
        The folders removed.
    """
    from filelock import FileLock, Timeout

    removed = []
    for stale in target.parent.glob(f".{target.name}.tmp-*"):
        if stale.name.endswith(".lock") or not stale.is_dir() or stale.is_symlink():
            continue
        lock_path = Path(f"{stale}.lock")
        try:
            with FileLock(str(lock_path), timeout=0):
                shutil.rmtree(stale, ignore_errors=True)
        except Timeout:
            continue  # a publish in progress
        lock_path.unlink(missing_ok=True)
        removed.append(stale)
    for stale in target.parent.glob(f".{target.name}.old-*"):
        if stale.is_dir() and not stale.is_symlink() and time.time() - stale.lstat().st_mtime > 60:
            shutil.rmtree(stale, ignore_errors=True)
            removed.append(stale)
    for stale in removed:
        log.info("removed %s, left by an interrupted publish of %s", stale, target)
    return removed


@contextmanager
def publish_dir(uri: str | os.PathLike, overwrite: bool = False, kind: str | None = None,
                inputs: Iterable[str | os.PathLike | None] = ()) -> Iterator[Path]:
    """Stage an artifact directory locally and publish it atomically when the block succeeds.

    Locally the staging directory is a hidden sibling of the target (``.<name>.tmp-<uuid>``) that is
    renamed onto the target; such folders left by an interrupted run are removed first (see
    :func:`remove_stale_staging`). On S3 a marker ``<prefix>.publishing`` is written, then every file
    but ``manifest.json``, then ``manifest.json``, then the marker is removed, so a reader that waits
    for the manifest never sees half an artifact. When the block raises, the staging directory is
    removed and nothing is published.

    Args:
        uri: Target directory or S3 prefix.
        overwrite: Replace an existing target. Otherwise an existing target is refused on entry.
        kind: The manifest kind written (see :func:`require_missing_or_overwrite`); by default the
            kind of the staged ``manifest.json`` is checked at publish time.
        inputs: The stage's input locations, which the target must not overlap.

    Yields:
        The local staging directory to write the artifact into.

    Raises:
        OutputExistsError: When the target exists (on entry, or again at publish) and not ``overwrite``.
        OutputError: See :func:`require_missing_or_overwrite`.
    """
    from filelock import FileLock

    inputs = list(inputs)
    require_missing_or_overwrite(uri, overwrite, kind, inputs)
    lock = None
    if storage.is_s3(uri):
        staging = Path(tempfile.mkdtemp(prefix="audiotune-publish-"))
    else:
        target = Path(uri)
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_staging(target)
        staging = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex}"
        lock = FileLock(f"{staging}.lock")
        lock.acquire()
        staging.mkdir()
    try:
        yield staging
        kind = kind or _staged_kind(staging)
        remote = _take_remote(staging)
        if storage.is_s3(uri):
            _publish_s3(staging, str(uri).rstrip("/"), overwrite, kind, remote)
        else:
            _fetch_remote(staging, remote)
            _publish_local(staging, Path(uri), overwrite, kind)
    finally:
        storage.delete(staging)
        if lock is not None:
            lock.release()
            Path(lock.lock_file).unlink(missing_ok=True)


def _publish_local(staging: Path, target: Path, overwrite: bool, kind: str | None) -> None:
    if not (target.exists() or target.is_symlink()):
        os.rename(staging, target)
        log.info("published %s", target)
        return
    if not overwrite:
        raise OutputExistsError(f"{target} appeared while it was being written; nothing was published")
    _check_replaceable(target, kind)
    old = target.parent / f".{target.name}.old-{uuid.uuid4().hex}"
    os.rename(target, old)
    try:
        os.rename(staging, target)
    except OSError:
        os.rename(old, target)
        raise
    storage.delete(old)
    log.info("published %s (replaced the previous one)", target)


def _publish_s3(staging: Path, uri: str, overwrite: bool, kind: str | None, remote: dict[str, str]) -> None:
    marker = uri + MARKER_SUFFIX
    if holds_artifact(uri):
        if not overwrite:
            raise OutputExistsError(f"{uri} appeared while it was being written; nothing was published")
        _check_replaceable(uri, kind)
        storage.write_text(marker, json.dumps({"kind": kind, "started": time.time()}))
        # from here on no reader takes the old files for a complete artifact
        storage.delete(storage.join(uri, storage.MANIFEST))
    else:
        _check_replaceable(uri, kind)
        storage.write_text(marker, json.dumps({"kind": kind, "started": time.time()}))
    # the old artifact's files, or what an interrupted upload left (odd keys too: they are deleted by exact key)
    previous = set(storage.list_files(uri, check_keys=False))
    if previous:
        log.info("%s: replacing %d files already under the prefix", uri, len(previous))
    rels = storage.list_files(staging)
    has_manifest = storage.MANIFEST in rels
    storage.upload_files(staging, uri, [r for r in rels if r != storage.MANIFEST])
    _copy_remote(uri, remote)
    rels = sorted({*rels, *remote})
    storage.delete_files(uri, sorted(previous - set(rels)))  # the old artifact's files the new one has not
    if has_manifest:
        storage.upload_files(staging, uri, [storage.MANIFEST])
    else:
        log.warning("published %s without a %s at its root", uri, storage.MANIFEST)
    storage.delete(marker)
    log.info("published %s (%d files)", uri, len(rels))

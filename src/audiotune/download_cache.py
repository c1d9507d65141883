"""The download cache: an S3 file or prefix copied once per machine and reused while unchanged.

A stage reads its inputs through :func:`local_copy` (``storage.local_copy`` is the same call): a local
path is returned as is; an S3 URI is downloaded into ``$XDG_CACHE_HOME/audiotune`` (or ``cache_dir``)
under a name derived from the URI, and downloaded again only when the source changed. Keys that would
land outside the entry are refused by :func:`audiotune.storage.download`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from pathlib import Path

from audiotune import storage

log = logging.getLogger(__name__)


def cache_root(cache_dir: str | os.PathLike | None) -> Path:
    """``cache_dir``, or ``$XDG_CACHE_HOME/audiotune`` (``~/.cache/audiotune``)."""
    if cache_dir is not None:
        return Path(cache_dir)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "audiotune"


def _source_stamp(bucket: str, key: str) -> str | None:
    """What identifies the current content of an S3 file or prefix, or None when nothing is there.

    An artifact: its ``manifest.json``'s ETag and time (written last, so it changes with every publish).
    Any other prefix (e.g. a Hugging Face model folder): every object's key, ETag and size. A file: its ETag.
    """
    head = storage.head_object(bucket, storage.join(key, storage.MANIFEST)) if key else None
    if head is not None:
        return json.dumps(["manifest", head["ETag"], str(head["LastModified"])])
    head = storage.head_object(bucket, key) if key else None
    if head is not None:
        return json.dumps(["file", head["ETag"], head.get("ContentLength")])
    paginator = storage.client().get_paginator("list_objects_v2")
    pages = paginator.paginate(Bucket=bucket, Prefix=storage.dir_prefix(key))
    objects = [(o["Key"], o["ETag"], o["Size"]) for page in pages for o in page.get("Contents", [])]
    if not objects:
        return None
    return json.dumps(["prefix", hashlib.sha256(json.dumps(sorted(objects)).encode()).hexdigest()])


def local_copy(uri: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """A local path holding ``uri``: a local path as is, an S3 file or prefix downloaded once into a cache.

    The cache entry is keyed by the URI and reused while the source is unchanged (see
    :func:`_source_stamp`: an artifact's manifest, or the ETags of every object of a plain prefix such
    as a base model folder). Processes on one machine (torchrun ranks) share the entry: a file lock
    makes one of them download while the others wait and then reuse it. A download goes to a temporary
    name and is renamed into place.

    Args:
        uri: Local path or S3 URI.
        cache_dir: Cache root; defaults to ``$XDG_CACHE_HOME/audiotune`` or ``~/.cache/audiotune``.

    Raises:
        FileNotFoundError: When ``uri`` names neither a file nor a non-empty prefix.
        UnsafePathError: When a key below the prefix would land outside the cache entry (see
            :func:`download`); nothing is cached then.
    """
    if not storage.is_s3(uri):
        return Path(uri)
    from filelock import FileLock

    uri = str(uri).rstrip("/")
    bucket, key = storage.split_s3(uri)
    digest = hashlib.sha256(uri.encode()).hexdigest()[:16]
    name = key.rsplit("/", 1)[-1] or bucket
    root = cache_root(cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    entry = root / f"{name}-{digest}"
    stamp_file = root / f".{name}-{digest}.stamp"
    with FileLock(str(root / f".{name}-{digest}.lock")):
        for stale in root.glob(f".{name}-{digest}.tmp-*"):  # a killed download's; under the lock none is running
            log.info("removing %s, left by an interrupted download", stale)
            storage.remove_local(stale)
        stamp = _source_stamp(bucket, key)
        if stamp is None:
            raise FileNotFoundError(f"{uri} does not exist (no object, no object below the prefix)")
        if entry.exists() and stamp_file.exists() and stamp_file.read_text() == stamp:
            log.debug("cache hit for %s at %s", uri, entry)
            return entry
        stamp_file.unlink(missing_ok=True)
        tmp = root / f".{name}-{digest}.tmp-{uuid.uuid4().hex}"
        try:
            storage.download(uri, tmp)
            storage.remove_local(entry)
            os.rename(tmp, entry)
        finally:
            storage.remove_local(tmp)
        stamp_file.write_text(stamp)
    log.info("downloaded %s to %s", uri, entry)
    return entry

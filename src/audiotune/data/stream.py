"""Streaming reads of a source corpus: paginated listing and ranged GETs, never a whole-corpus copy.

The fan-out convert (:mod:`audiotune.data.plan`, :mod:`audiotune.stages.convert_units`) lists a source
page by page (:func:`list_objects`), copies only its small index files (manifests, ``wav.scp``, prompt
texts) and reads each audio object when a worker needs it, in ranged GETs of ``CHUNK_BYTES``
(:func:`fetch`), into a spool folder whose size a :class:`DiskBudget` bounds. Local sources are read in place.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from audiotune import storage
from audiotune.errors import DataError

log = logging.getLogger(__name__)

CHUNK_BYTES = 8 * 2**20
AUDIO_EXTS = (".wav", ".flac", ".mp3", ".ogg", ".opus", ".m4a")


class StreamError(DataError):
    """An object cannot be streamed (larger than the local-disk cap, changed since it was planned)."""


@dataclass(frozen=True)
class ObjectInfo:
    """One listed file: its path relative to the listed root, its size and a version stamp."""

    rel: str
    size: int
    etag: str


def list_objects(uri: str) -> Iterator[ObjectInfo]:
    """Every file below a local folder or S3 prefix, page by page (S3: ``list_objects_v2``, 1,000 keys a page).

    Local files get ``<size>-<mtime_ns>`` as their stamp, S3 objects their ETag. Keys that are not safe
    relative paths are refused (see :func:`audiotune.storage.check_relative`).
    """
    if not storage.is_s3(uri):
        root = Path(uri)
        if root.is_file():
            st = root.stat()
            yield ObjectInfo(root.name, st.st_size, f"{st.st_size}-{st.st_mtime_ns}")
            return
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            st = path.stat()
            yield ObjectInfo(path.relative_to(root).as_posix(), st.st_size, f"{st.st_size}-{st.st_mtime_ns}")
        return
    bucket, key = storage.split_s3(uri)
    head = storage.head_object(bucket, key)
    if head is not None:  # a single file
        yield ObjectInfo(key.rsplit("/", 1)[-1], int(head["ContentLength"]), head["ETag"].strip('"'))
        return
    prefix = storage.dir_prefix(key)
    paginator = storage.client().get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            if obj["Key"].endswith("/"):
                continue
            rel = storage.check_relative(obj["Key"][len(prefix):], uri)
            yield ObjectInfo(rel, int(obj["Size"]), obj["ETag"].strip('"'))


def is_audio(rel: str) -> bool:
    """Whether a listed file is audio (streamed when needed) rather than an index file (copied by the plan)."""
    return rel.lower().endswith(AUDIO_EXTS)


class DiskBudget:
    """Bytes a process may hold in its spool folder at once; :meth:`take` waits until they are free.

    Args:
        limit: The cap in bytes (``convert.max_local_disk_bytes``); 0: no cap.
    """

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0
        self.peak = 0
        self._cond = threading.Condition()

    def take(self, n: int, what: str, wait: bool = True) -> bool:
        """Reserve ``n`` bytes, waiting while others hold them (``wait``), else only if they are free now.

        Returns:
            Whether the bytes were reserved (always True with ``wait``).

        Raises:
            StreamError: ``n`` alone is above the cap.
        """
        if self.limit and n > self.limit:
            raise StreamError(f"{what}: {n} bytes is more than convert.max_local_disk_bytes={self.limit}; "
                              "raise the cap")
        with self._cond:
            while self.limit and self.used + n > self.limit:
                if not wait:
                    return False
                self._cond.wait()
            self.used += n
            self.peak = max(self.peak, self.used)
            return True

    def give(self, n: int) -> None:
        """Release ``n`` bytes taken before."""
        with self._cond:
            self.used -= n
            self._cond.notify_all()


def fetch(uri: str, size: int, dest: Path, etag: str = "", chunk: int = CHUNK_BYTES) -> int:
    """Copy one S3 object of ``size`` bytes to ``dest`` by ranged GETs of ``chunk`` bytes.

    Args:
        uri: The object.
        size: Its size when planned.
        dest: The local file written.
        etag: Its ETag when planned; every GET is conditional on it (``IfMatch``). Empty: not checked.
        chunk: Bytes per GET.

    Returns:
        The bytes read from S3.

    Raises:
        StreamError: The object changed since the plan (another ETag or size, or it is gone).
    """
    from botocore.exceptions import ClientError

    bucket, key = storage.split_s3(uri)
    s3 = storage.client()
    read = 0
    condition = {"IfMatch": f'"{etag}"'} if etag else {}
    with open(dest, "wb") as f:
        while read < size:
            end = min(size, read + chunk) - 1
            try:
                reply = s3.get_object(Bucket=bucket, Key=key, Range=f"bytes={read}-{end}", **condition)
            except ClientError as err:
                code = str(err.response.get("Error", {}).get("Code", ""))
                if code in {"PreconditionFailed", "412", "InvalidRange", "416", "NoSuchKey", "404"}:
                    raise StreamError(f"{uri}: changed or removed since the plan ({code}); re-plan") from None
                raise
            body = reply["Body"].read()
            if not body:
                break
            f.write(body)
            read += len(body)
    if read != size:
        raise StreamError(f"{uri}: read {read} bytes, the plan listed {size} (changed since planning?); re-plan")
    return read


class Spool:
    """Audio objects materialised under a folder; the caller reserves their bytes in the :class:`DiskBudget`
    before :meth:`open` and :meth:`close` gives them back.

    Args:
        directory: The spool folder (created).
        budget: The shared byte budget.
    """

    def __init__(self, directory: Path, budget: DiskBudget):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.budget = budget
        self.bytes_read = 0
        self._n = 0
        self._lock = threading.Lock()

    def open(self, uri: str, size: int, etag: str = "") -> tuple[str, int]:
        """A local path holding ``uri`` (local paths are returned as they are) and the bytes it holds (reserved
        by the caller); ``etag``: see :func:`fetch`."""
        if not storage.is_s3(uri):
            return uri, 0
        with self._lock:
            self._n += 1
            dest = self.directory / f"{self._n:08d}{os.path.splitext(uri)[1]}"
        try:
            got = fetch(uri, size, dest, etag)
        except BaseException:
            dest.unlink(missing_ok=True)
            raise
        with self._lock:
            self.bytes_read += got
        return str(dest), size

    def close(self, path: str, reserved: int) -> None:
        """Remove a spooled file and release its bytes (a no-op for a local source file)."""
        if reserved:
            Path(path).unlink(missing_ok=True)
            self.budget.give(reserved)

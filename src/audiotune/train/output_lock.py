"""A lease on a training stage's output, so that two runs never train into the same output and checkpoints.

A training stage takes the lease on each of its outputs before it loads anything and keeps it until it has
published; a second run given the same output fails at once, naming the run that holds it.

- Local output: ``<output>.lock``, a file holding the run's identity (host, pid, stage, start time) and locked
  with ``flock`` while the run lives. The kernel frees the lock when the process ends, however it ends, so the
  lease of a dead process is simply taken over.
- S3 output: the object ``<output>.lock`` created with a conditional put (``If-None-Match: *``), so that only
  one of two runs creates it. Its holder renews it (``renewed``) every :data:`RENEW_S`; a lease whose process
  is gone (same host, pid not running) or that was not renewed for :data:`STALE_S` is taken over with a
  conditional put on its ETag (``If-Match``), so that only one of two runs takes it over.

Only the main process takes the lease; its answer is shared with the other processes of the run.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
import weakref
from pathlib import Path
from typing import Any

from audiotune import storage
from audiotune.errors import OutputError

log = logging.getLogger(__name__)

SUFFIX = ".lock"
RENEW_S = 60.0
STALE_S = 600.0


class OutputInUse(OutputError):
    """Another run holds the lease on this output (exit 2: wait for it, or choose another output)."""


def lease_uri(output: str) -> str:
    """Where the lease of ``output`` lives."""
    return output.rstrip("/") + SUFFIX


def _identity(stage: str, output: str) -> dict[str, Any]:
    return {"run": uuid.uuid4().hex, "stage": stage, "output": output, "host": socket.gethostname(),
            "pid": os.getpid(), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "renewed": time.time()}


def _describe(holder: dict[str, Any]) -> str:
    return (f"train {holder.get('stage', '?')}, pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, "
            f"since {holder.get('started', '?')}")


def _in_use(output: str, lease: str, holder: dict[str, Any]) -> OutputInUse:
    return OutputInUse(f"output {output} is in use by another run ({_describe(holder)}; lease {lease}): wait for "
                       "it to finish, or choose another --output")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _LocalLease:
    """``flock`` on ``<output>.lock``; see the module docstring."""

    def __init__(self, output: str, stage: str) -> None:
        import fcntl

        self.path = Path(lease_uri(output))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_json(self.path.read_bytes())
                os.close(fd)
                raise _in_use(output, str(self.path), holder) from None
            try:  # the file we locked must still be the one at the path (a holder unlinks it when it ends)
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        previous = _read_json(self.path.read_bytes())
        if previous:
            log.info("taking over the lease %s of a run that is gone (%s)", self.path, _describe(previous))
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(_identity(stage, output)) + "\n").encode(), 0)
        # given back by release(), or when the lease is garbage (a stage that failed before its `with lease`)
        # or the interpreter exits, whichever comes first
        self.release = weakref.finalize(self, _give_back_local, self.path, fd)


def _give_back_local(path: Path, fd: int) -> None:
    path.unlink(missing_ok=True)  # still ours: nobody else can lock it while we hold it
    os.close(fd)


class _S3Lease:
    """A conditionally created, renewed S3 object; see the module docstring."""

    def __init__(self, output: str, stage: str) -> None:
        self.uri = lease_uri(output)
        self.bucket, self.key = storage.split_s3(self.uri)
        self.identity = _identity(stage, output)
        self.etag = self._take(output)
        self._stop = threading.Event()
        self._renewer = threading.Thread(target=self._renew, name="output-lease", daemon=True)
        self._renewer.start()
        self._finalizer = weakref.finalize(self, _give_back_s3, self.uri, self.bucket, self.key, self._stop)

    def _put(self, **condition: str) -> str:
        body = json.dumps({**self.identity, "renewed": time.time()}).encode()
        return storage.client().put_object(Bucket=self.bucket, Key=self.key, Body=body, **condition)["ETag"]

    def _take(self, output: str) -> str:
        from botocore.exceptions import ClientError

        for _ in range(3):
            try:
                return self._put(IfNoneMatch="*")
            except ClientError as err:
                if _status(err) not in (409, 412):
                    raise
            try:
                found = storage.client().get_object(Bucket=self.bucket, Key=self.key)
            except ClientError as err:
                if _status(err) == 404:
                    continue  # released meanwhile
                raise
            holder = _read_json(found["Body"].read())
            same_host_gone = holder.get("host") == socket.gethostname() and not _alive(int(holder.get("pid", -1)))
            expired = time.time() - float(holder.get("renewed", 0)) > STALE_S
            if not (same_host_gone or expired):
                raise _in_use(output, self.uri, holder)
            log.info("taking over the lease %s of a run that is gone (%s)", self.uri, _describe(holder))
            try:
                return self._put(IfMatch=found["ETag"])
            except ClientError as err:
                if _status(err) not in (404, 409, 412):
                    raise
        raise OutputInUse(f"output {output}: another run keeps taking the lease {self.uri}; try again")

    def _renew(self) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        while not self._stop.wait(RENEW_S):
            try:
                self.etag = self._put(IfMatch=self.etag)
            except (BotoCoreError, ClientError) as err:
                log.warning("cannot renew the lease %s (%s); another run may take over this output", self.uri, err)

    def release(self) -> None:
        self._finalizer()


def _give_back_s3(uri: str, bucket: str, key: str, stop: threading.Event) -> None:
    from botocore.exceptions import BotoCoreError, ClientError

    stop.set()
    try:
        storage.client().delete_object(Bucket=bucket, Key=key)
    except (BotoCoreError, ClientError) as err:
        log.warning("cannot remove the lease %s (%s); it goes stale in %.0f s", uri, err, STALE_S)


def _status(err: Exception) -> int:
    return int(getattr(err, "response", {}).get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


def _read_json(data: bytes) -> dict[str, Any]:
    try:
        found = json.loads(data.decode("utf-8") or "{}")
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return found if isinstance(found, dict) else {}


class Lease:
    """The leases of one run on its outputs; a context manager that releases them (``release()`` too)."""

    def __init__(self, held: list[Any]) -> None:
        self._held = held

    def release(self) -> None:
        """Give the outputs back (idempotent)."""
        while self._held:
            self._held.pop().release()

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def acquire(acc, outputs: list[str], stage: str) -> Lease:
    """Take the lease on every output, in the main process; every process raises when one is held elsewhere.

    Args:
        acc: The run's accelerator (the main process takes the leases; the answer is shared).
        outputs: Output URIs of the stage (local or s3://).
        stage: Stage name, recorded in the lease.

    Raises:
        OutputInUse: When another live run holds the lease of one of the outputs.
    """
    held: list[Any] = []
    error = ""
    if acc.is_main_process:
        try:
            for output in outputs:
                held.append((_S3Lease if storage.is_s3(output) else _LocalLease)(str(output), stage))
        except OutputInUse as err:
            Lease(held).release()
            error = str(err)
    if acc.num_processes > 1:
        import torch.distributed as dist

        shared = [error]
        dist.broadcast_object_list(shared, src=0)
        error = shared[0]
    if error:
        raise OutputInUse(error)
    return Lease(held)

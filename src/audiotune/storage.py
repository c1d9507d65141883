"""Local paths and ``s3://bucket/prefix`` URIs behind one small API; the download cache is
:mod:`audiotune.download_cache`.

S3 goes through boto3 with the standard AWS environment (``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3``,
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``, profiles), so MinIO and other
S3-compatible stores work unchanged. Every artifact is a directory with a ``manifest.json`` at its root;
:mod:`audiotune.publish` makes it appear all at once.

An S3 key is any string, so a key below a prefix can hold ``..`` or start with ``/``: listing and
downloading refuse such keys (:class:`~audiotune.errors.UnsafePathError`, naming the key) rather than
write outside the destination directory.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from audiotune import credentials
from audiotune.errors import UnsafePathError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
_WORKERS = 8
# botocore's retry policy for every S3 request (uploads included): connection errors, throttling and 5xx are retried
# with backoff (``adaptive`` adds client-side rate limiting); permanent errors (AccessDenied, NoSuchBucket, ...) are not
_S3_RETRIES = {"total_max_attempts": 8, "mode": "adaptive"}
_DELETE_BATCH = 1000

_clients: dict[tuple[str | None, ...], Any] = {}
_clients_lock = threading.Lock()


# ---------------------------------------------------------------------------------------------- URIs


def is_s3(uri: str | os.PathLike) -> bool:
    """Whether ``uri`` names an S3 location (``s3://bucket/key``)."""
    return str(uri).startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    """Split ``s3://bucket/some/key`` into ``("bucket", "some/key")``.

    Raises:
        ValueError: When ``uri`` is not an S3 URI or names no bucket.
        CredentialsInURIError: When ``uri`` carries credentials (``s3://KEY:SECRET@bucket``), redacted.
    """
    if not is_s3(uri):
        raise ValueError(f"not an s3:// URI: {uri}")
    bucket, _, key = str(uri)[len("s3://"):].partition("/")
    if not bucket:
        raise ValueError(f"s3 URI without a bucket: {uri}")
    if "@" in bucket:
        credentials.refuse(str(uri), "s3 URI")
    return bucket, key.strip("/")


def join(uri: str | os.PathLike, *parts: str) -> str:
    """Join path parts onto a local path or an S3 URI, with ``/`` separators on S3."""
    if not is_s3(uri):
        return str(Path(uri, *parts))
    base = str(uri).rstrip("/")
    tail = "/".join(p.strip("/") for p in parts if p and p.strip("/"))
    return f"{base}/{tail}" if tail else base



def _client_key() -> tuple[str | None, ...]:
    env = os.environ
    return (
        env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL"),
        env.get("AWS_ACCESS_KEY_ID"),
        env.get("AWS_DEFAULT_REGION") or env.get("AWS_REGION"),
        env.get("AWS_PROFILE"),
    )


def client() -> Any:
    """The boto3 S3 client for the current AWS environment, cached per process and per endpoint.

    A custom endpoint (MinIO, a test server) gets path-style addressing, which such stores expect.
    """
    key = _client_key()
    with _clients_lock:
        cached = _clients.get(key)
        if cached is not None:
            return cached
        import boto3
        from botocore.config import Config

        s3_options = {"addressing_style": "path"} if key[0] else {}
        config = Config(retries=dict(_S3_RETRIES), s3=s3_options)
        made = boto3.session.Session().client("s3", config=config)
        _clients[key] = made
        log.debug("S3 client for endpoint %s", key[0] or "AWS default")
        return made


def _is_missing(err: Exception) -> bool:
    from botocore.exceptions import ClientError

    if not isinstance(err, ClientError):
        return False
    code = str(err.response.get("Error", {}).get("Code", ""))
    return code in {"404", "NoSuchKey", "NotFound"}


def head_object(bucket: str, key: str) -> dict | None:
    """``head_object`` metadata, or None when the object does not exist (other errors propagate)."""
    from botocore.exceptions import ClientError

    if not key:
        return None
    try:
        return client().head_object(Bucket=bucket, Key=key)
    except ClientError as err:
        if _is_missing(err):
            return None
        raise


def _iter_keys(bucket: str, prefix: str) -> Iterator[str]:
    """Every object key below ``prefix`` (a directory prefix ending in ``/`` or empty)."""
    paginator = client().get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            yield obj["Key"]


def dir_prefix(key: str) -> str:
    """The listing prefix of the objects below ``key`` (``key/``; empty for a whole bucket)."""
    return f"{key}/" if key else ""




def exists(uri: str | os.PathLike) -> bool:
    """Whether ``uri`` is an existing file, or a directory / S3 prefix holding at least one object."""
    if not is_s3(uri):
        return Path(uri).exists()
    bucket, key = split_s3(str(uri))
    if head_object(bucket, key) is not None:
        return True
    page = client().list_objects_v2(Bucket=bucket, Prefix=dir_prefix(key), MaxKeys=1)
    return bool(page.get("Contents"))


def read_bytes(uri: str | os.PathLike) -> bytes:
    """The content of a file.

    Raises:
        FileNotFoundError: When the file (or S3 object) does not exist.
    """
    if not is_s3(uri):
        return Path(uri).read_bytes()
    from botocore.exceptions import ClientError

    bucket, key = split_s3(str(uri))
    try:
        return client().get_object(Bucket=bucket, Key=key)["Body"].read()
    except ClientError as err:
        if _is_missing(err):
            raise FileNotFoundError(f"{uri} does not exist") from err
        raise


def read_text(uri: str | os.PathLike, encoding: str = "utf-8") -> str:
    """The content of a text file (see :func:`read_bytes`)."""
    return read_bytes(uri).decode(encoding)


def write_bytes(uri: str | os.PathLike, data: bytes) -> None:
    """Write a file, creating parent directories; a local file is replaced atomically."""
    if is_s3(uri):
        bucket, key = split_s3(str(uri))
        client().put_object(Bucket=bucket, Key=key, Body=data)
        return
    path = Path(uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex}"
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(uri: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    """Write a text file (see :func:`write_bytes`)."""
    write_bytes(uri, text.encode(encoding))


def check_relative(rel: str, where: str) -> str:
    """Return ``rel`` if it is a relative path that stays inside the directory it is joined onto.

    Refused: an empty path, an absolute one (a leading ``/``), a ``.`` or ``..`` segment, a NUL byte.

    Args:
        rel: A ``/``-separated relative path: an S3 key below a prefix, an archive member, a manifest entry.
        where: What ``rel`` was found in (a URI), for the message.

    Raises:
        UnsafePathError: naming ``rel`` and ``where``.
    """
    parts = rel.split("/")
    if not rel or rel.startswith("/") or "\0" in rel or any(p in (".", "..") for p in parts):
        raise UnsafePathError(f"{where}: refusing the object {rel!r}: its relative path is absolute or holds "
                              "'.' or '..', so it would be written outside the destination folder")
    return rel


def inside(root: str | os.PathLike, rel: str, where: str) -> Path:
    """``root / rel``, refused when it does not resolve inside ``root`` (see :func:`check_relative`).

    Beyond :func:`check_relative`, symbolic links already in ``root`` are followed, so a link out of
    ``root`` cannot redirect a write either.

    Raises:
        UnsafePathError: naming ``rel`` and ``where``.
    """
    base = Path(root)
    target = base / check_relative(rel, where)
    if not target.resolve().is_relative_to(base.resolve()):
        raise UnsafePathError(f"{where}: refusing the object {rel!r}: it resolves to {target.resolve()}, "
                              f"outside the destination folder {base}")
    return target


def list_files(uri: str | os.PathLike, check_keys: bool = True) -> list[str]:
    """Relative ``/``-separated paths of every file below a directory or S3 prefix, sorted.

    A missing directory or an empty prefix gives an empty list.

    Args:
        uri: Local directory or S3 prefix.
        check_keys: Refuse S3 keys whose relative path is not safe to join onto a local folder
            (see :func:`check_relative`). Only code that deletes objects by their exact key turns it off.

    Raises:
        UnsafePathError: An S3 key below the prefix is absolute or holds ``.`` / ``..`` segments.
    """
    if not is_s3(uri):
        root = Path(uri)
        if not root.is_dir():
            return []
        return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    bucket, key = split_s3(str(uri))
    prefix = dir_prefix(key)
    rels = sorted(k[len(prefix):] for k in _iter_keys(bucket, prefix) if not k.endswith("/"))
    if check_keys:
        for rel in rels:
            check_relative(rel, str(uri))
    return rels



def download(uri: str | os.PathLike, local_path: str | os.PathLike) -> Path:
    """Copy a file, or every file below a directory / S3 prefix, to ``local_path``.

    Returns:
        ``local_path`` as a Path: the file, or the directory that mirrors the prefix.

    Raises:
        FileNotFoundError: When ``uri`` names neither a file nor a non-empty prefix.
        UnsafePathError: When a key below the prefix would land outside ``local_path``; nothing is
            downloaded then.
    """
    dest = Path(local_path)
    if not is_s3(uri):
        src = Path(uri)
        if src.is_dir():
            shutil.copytree(src, dest, dirs_exist_ok=True)
        elif src.is_file():
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest)
        else:
            raise FileNotFoundError(f"{uri} does not exist")
        return dest
    bucket, key = split_s3(str(uri))
    s3 = client()
    if head_object(bucket, key) is not None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        s3.download_file(bucket, key, str(dest))
        return dest
    files = list_files(uri)
    if not files:
        raise FileNotFoundError(f"{uri} does not exist (no object and no objects below it)")
    prefix = dir_prefix(key)
    targets = {rel: inside(dest, rel, str(uri)) for rel in files}  # every key checked before any write

    def fetch(rel: str) -> None:
        target = targets[rel]
        target.parent.mkdir(parents=True, exist_ok=True)
        s3.download_file(bucket, prefix + rel, str(target))

    run_all(fetch, files)
    log.debug("downloaded %d files from %s to %s", len(files), uri, dest)
    return dest


def run_all(fn: Callable[[str], None], items: list[str]) -> None:
    """Apply ``fn`` to every item on a small thread pool; the first error propagates."""
    if len(items) <= 1:
        for item in items:
            fn(item)
        return
    with ThreadPoolExecutor(max_workers=min(_WORKERS, len(items))) as pool:
        for future in [pool.submit(fn, item) for item in items]:
            future.result()


def upload_files(local_dir: Path, uri: str, rels: list[str]) -> None:
    """Upload the files ``rels`` (relative to ``local_dir``) below ``uri``, in parallel; each request is retried by
    botocore's retry policy (transient failures only, see ``_S3_RETRIES``)."""
    bucket, key = split_s3(uri)
    prefix = dir_prefix(key)
    s3 = client()

    def put(rel: str) -> None:
        s3.upload_file(str(local_dir / rel), bucket, prefix + rel)

    run_all(put, rels)


def upload_dir(local_dir: str | os.PathLike, uri: str | os.PathLike) -> None:
    """Copy every file below ``local_dir`` to a directory or S3 prefix (existing files are replaced)."""
    src = Path(local_dir)
    if not src.is_dir():
        raise FileNotFoundError(f"{src} is not a directory")
    if not is_s3(uri):
        shutil.copytree(src, Path(uri), dirs_exist_ok=True)
        return
    rels = list_files(src)
    upload_files(src, str(uri), rels)
    log.debug("uploaded %d files from %s to %s", len(rels), src, uri)


def delete(uri: str | os.PathLike) -> None:
    """Remove a file or a whole directory / S3 prefix; a missing one is not an error."""
    if not is_s3(uri):
        remove_local(Path(uri))
        return
    bucket, key = split_s3(str(uri))
    keys = list(_iter_keys(bucket, dir_prefix(key)))
    if key and head_object(bucket, key) is not None:
        keys.append(key)
    _delete_keys(bucket, keys, str(uri))


def delete_files(uri: str, rels: list[str]) -> None:
    """Delete the files ``rels`` (relative paths) below the directory or S3 prefix ``uri``."""
    if not is_s3(uri):
        for rel in rels:
            remove_local(Path(uri) / rel)
        return
    bucket, key = split_s3(str(uri).rstrip("/"))
    _delete_keys(bucket, [dir_prefix(key) + rel for rel in rels], str(uri))


def _delete_keys(bucket: str, keys: list[str], uri: str) -> None:
    """Delete objects in batches; any object S3 could not delete is an error."""
    s3 = client()
    for start in range(0, len(keys), _DELETE_BATCH):
        batch = [{"Key": k} for k in keys[start:start + _DELETE_BATCH]]
        reply = s3.delete_objects(Bucket=bucket, Delete={"Objects": batch, "Quiet": True})
        if reply.get("Errors"):
            first = reply["Errors"][0]
            raise OSError(f"could not delete {len(reply['Errors'])} objects under {uri}, e.g. "
                          f"{first.get('Key')}: {first.get('Message')}")


def remove_local(path: Path) -> None:
    """Remove a local file, link or directory tree, if there."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def local_copy(uri: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """A local path holding ``uri``: a local path as is, an S3 file or prefix through the download cache.

    See :func:`audiotune.download_cache.local_copy` (arguments, sharing between processes, errors).
    """
    from audiotune.download_cache import local_copy as cached

    return cached(uri, cache_dir)

"""A fingerprint of source data, so that a cached convert task re-runs when the data changes.

Kubeflow keys its cache on a task's inputs; a source URI alone stays the same when the files
behind it change. The fingerprint covers every file below the source (a folder, or the folder of
a manifest file, whose audio paths are relative to it): name, size and modification time
locally, name, size and ETag on S3. It reads listings only, never the data.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from audiotune import storage


def _local(path: Path, digest: "hashlib._Hash") -> int:
    root = path if path.is_dir() else path.parent
    count = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            full = Path(dirpath, name)
            try:
                st = full.stat()
            except OSError:  # vanished while listing
                continue
            rel = full.relative_to(root).as_posix()
            digest.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
            count += 1
    return count


def _s3(uri: str, digest: "hashlib._Hash") -> int:
    bucket, key = storage.split_s3(uri)
    client = storage.client()
    prefixes = [f"{key}/" if key else ""]
    if key and "/" in key:  # a manifest file: its folder
        prefixes.append(key.rsplit("/", 1)[0] + "/")
    elif key:
        prefixes.append("")
    count = 0
    for prefix in prefixes:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                digest.update(f"{obj['Key'][len(prefix):]}\0{obj['Size']}\0{obj.get('ETag', '')}\n".encode())
                count += 1
        if count:
            break
    return count


def source_fingerprint(*uris: str | None) -> str:
    """``sha256:<hex>`` over the listings of the given sources (None entries are skipped).

    Raises:
        FileNotFoundError: When a source does not exist or holds no files.
    """
    digest = hashlib.sha256()
    for uri in uris:
        if not uri:
            continue
        digest.update(b"--\n")
        if storage.is_s3(uri):
            count = _s3(uri, digest)
        else:
            path = Path(uri)
            if not path.exists():
                raise FileNotFoundError(f"source {uri} does not exist")
            count = _local(path, digest)
        if count == 0:
            raise FileNotFoundError(f"source {uri} holds no files")
    return "sha256:" + digest.hexdigest()

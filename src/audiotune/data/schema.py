"""The Dataset artifact's row schema, its deterministic split, and a bounded shard writer."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from audiotune.errors import DataError, StorageError

log = logging.getLogger(__name__)

DATASET_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("speaker", pa.string()),
        pa.field("task", pa.string(), nullable=False),
        pa.field("text", pa.string()),
        pa.field("audio", pa.binary()),
        pa.field("duration_s", pa.float32()),
        pa.field("prompt_text", pa.string()),
        pa.field("prompt_audio", pa.binary()),
        pa.field("tags", pa.list_(pa.string())),
        pa.field("lyrics", pa.string()),
        pa.field("meta", pa.string()),
    ]
)
COLUMNS = DATASET_SCHEMA.names
SPLITS = ("train", "val")
_SPLIT_SALT = b"audiotune-split-v1:"


def row_bytes(row: dict[str, Any]) -> int:
    """Rough in-memory size of a row, to bound shard size."""
    size = 64
    for value in row.values():
        if isinstance(value, (bytes, str)):
            size += len(value)
        elif isinstance(value, list):
            size += 4 * (sum(len(v) for v in value) if value and isinstance(value[0], list) else len(value))
    return size


def split_of(row_id: str, val_fraction: float) -> str:
    """Deterministic split from a hash of the row id alone.

    The choice depends on nothing but the id, so re-runs and added rows never
    move an existing row between train and val.
    """
    if val_fraction <= 0:
        return "train"
    digest = hashlib.sha256(_SPLIT_SALT + row_id.encode("utf-8")).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    return "val" if u < val_fraction else "train"


def fingerprint_row(digest, row: dict[str, Any]) -> None:
    """Add a kept row (its id, audio bytes and text) to a Dataset's ``fingerprint`` (a ``hashlib.sha256``)."""
    digest.update(row["id"].encode() + b"\0")
    digest.update(hashlib.sha1(row["audio"] or b"").digest())
    digest.update((row["text"] or "").encode() + b"\0")


class ShardWriter:
    """Writes rows of one split into ``part-00000.parquet`` ... bounded by rows and bytes."""

    def __init__(self, directory: Path, max_rows: int, max_bytes: int, schema: pa.Schema = DATASET_SCHEMA,
                 uncompressed: tuple[str, ...] = ("audio", "prompt_audio")):
        self.schema = schema
        # FLAC (or float) blobs barely compress: spending zstd on them costs time and saves little.
        self.compression = {n: ("none" if n in uncompressed else "zstd") for n in schema.names}
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.max_rows = max_rows
        self.max_bytes = max_bytes
        self.shards: list[dict[str, Any]] = []
        self._buffer: list[dict[str, Any]] = []
        self._bytes = 0
        self.rows = 0

    def add(self, row: dict[str, Any]) -> None:
        """Buffer one row; flush a shard when a bound is reached."""
        self._buffer.append(row)
        self._bytes += row_bytes(row)
        self.rows += 1
        if len(self._buffer) >= self.max_rows or self._bytes >= self.max_bytes:
            self.flush()

    def flush(self) -> None:
        """Write the buffered rows as the next shard."""
        if not self._buffer:
            return
        name = f"part-{len(self.shards):05d}.parquet"
        path = self.directory / name
        try:
            table = pa.Table.from_pylist(self._buffer, schema=self.schema)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as err:
            first = self._buffer[0].get("id")
            raise DataError(f"{path}: {len(self._buffer)} rows (the first {first!r}) do not fit the "
                            f"{self.directory.name} schema: {err}") from err
        try:
            pq.write_table(table, path, compression=self.compression, row_group_size=256)
        except OSError as err:  # ENOSPC, EDQUOT, a read-only or vanished folder
            raise StorageError(f"{path}: cannot write the shard: {err.strerror or err}") from err
        self.shards.append({"file": name, "rows": table.num_rows})
        log.debug("wrote %s/%s (%d rows)", self.directory.name, name, table.num_rows)
        self._buffer = []
        self._bytes = 0


def read_shard(path: str | Path, columns: list[str] | None = None) -> list[dict[str, Any]]:
    """The rows of one local Parquet shard.

    Raises:
        DataError: The shard cannot be read (not Parquet, cut short, a column missing), naming it.
    """
    try:
        return pq.read_table(path, columns=columns).to_pylist()
    except (pa.ArrowInvalid, OSError, KeyError) as err:
        raise DataError(f"{path}: not a readable Parquet shard ({err})") from err


def read_rows(directory: str | Path, columns: list[str] | None = None) -> Iterator[dict[str, Any]]:
    """Iterate the rows of every shard of a local split directory, in shard order."""
    for path in sorted(Path(directory).glob("part-*.parquet")):
        yield from read_shard(path, columns)

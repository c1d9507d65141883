"""Some columns of a Dataset folder's Parquet shards, the folder local or on S3.

On S3 a shard is read by ranged GETs (the footer, then only the chunks of the columns asked for), so the
tokenizer set-up can take the ids, durations and speakers of every convert part without fetching their audio.
"""

from __future__ import annotations

import io
import logging
import re
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from audiotune import storage
from audiotune.data.schema import read_shard
from audiotune.errors import DataError

log = logging.getLogger(__name__)

SHARD_NAME = re.compile(r"part-\d+\.parquet")


class ColumnReadError(DataError):
    """A shard on S3 cannot be read (not Parquet, cut short, a column missing), naming it."""


class RangedObject(io.RawIOBase):
    """A seekable, read-only view of one S3 object; every read is one ranged GET.

    Attributes:
        bytes_read: Bytes fetched so far.
    """

    def __init__(self, uri: str):
        super().__init__()
        self.uri = uri
        self._bucket, self._key = storage.split_s3(uri)
        self._s3 = storage.client()
        self.size = int(self._s3.head_object(Bucket=self._bucket, Key=self._key)["ContentLength"])
        self._pos = 0
        self.bytes_read = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer: Any) -> int:
        n = min(len(buffer), self.size - self._pos)
        if n <= 0:
            return 0
        reply = self._s3.get_object(Bucket=self._bucket, Key=self._key, Range=f"bytes={self._pos}-{self._pos + n - 1}")
        data = reply["Body"].read()
        buffer[:len(data)] = data
        self._pos += len(data)
        self.bytes_read += len(data)
        return len(data)


class ColumnReader:
    """Reads columns of the shards below local folders or S3 prefixes; counts the S3 bytes it fetched."""

    def __init__(self) -> None:
        self._open: dict[str, tuple[pq.ParquetFile, RangedObject]] = {}  # S3 shards: footer read once each

    @property
    def s3_bytes_read(self) -> int:
        """Bytes fetched from S3 so far."""
        return sum(raw.bytes_read for _, raw in self._open.values())

    def shards(self, folder: str | Path, split: str) -> list[str | Path]:
        """A folder's Parquet shards of ``split``, in order."""
        if not storage.is_s3(str(folder)):
            return sorted((Path(folder) / split).glob("part-*.parquet"))
        prefix = storage.join(str(folder), split)
        return [storage.join(prefix, rel) for rel in storage.list_files(prefix) if SHARD_NAME.fullmatch(rel)]

    def read(self, shard: str | Path, columns: list[str]) -> list[dict[str, Any]]:
        """``columns`` of every row of one shard.

        Raises:
            DataError: the shard cannot be read, naming it.
        """
        if not storage.is_s3(str(shard)):
            return read_shard(shard, columns)
        try:
            if str(shard) not in self._open:
                raw = RangedObject(str(shard))
                self._open[str(shard)] = (pq.ParquetFile(raw, pre_buffer=False), raw)  # one GET per column chunk
            return self._open[str(shard)][0].read(columns=columns, use_threads=False).to_pylist()
        except (pa.ArrowInvalid, OSError, KeyError) as err:
            raise ColumnReadError(f"{shard}: not a readable Parquet shard with columns {columns} ({err})") from None

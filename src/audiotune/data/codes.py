"""The audio codes of a Tokens artifact, checked against the model that will read them, before training.

A Tokens artifact from another tokenizer (another codebook size, another number of codebooks) would
otherwise reach the model: an embedding lookup past its table fails deep inside training with no row
named, or a silent clamp trains on the wrong codes. :func:`check_codes` reads only the ids and codes of
each shard and stops at the first row a model cannot read, naming the shard, the row and the code.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from audiotune.data.code_stream import step_pairs_from_interleaved
from audiotune.errors import DataError

log = logging.getLogger(__name__)


class CodesOutOfRangeError(DataError):
    """A Tokens row holds a code outside the codebook of the model that reads it."""


def _rows(shard: Path, column: str) -> Iterable[dict[str, Any]]:
    try:
        if column not in pq.read_schema(shard).names:
            return
        for batch in pq.ParquetFile(shard).iter_batches(columns=["id", column], batch_size=512):
            yield from batch.to_pylist()
    except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError
        raise DataError(f"{shard}: not a readable Parquet shard ({err})") from err


def check_codes(tokens_dir: str | Path, codebook_size: int, codebooks: int, reader: str,
                splits: Iterable[str] = ("train", "val"), column: str = "audio_codes",
                row_check: Callable[[np.ndarray], None] | None = None) -> int:
    """Check that every code a model reads from a Tokens artifact lies in ``[0, codebook_size)``.

    Args:
        tokens_dir: A local Tokens artifact (its ``<split>/part-*.parquet`` shards).
        codebook_size: Codes per codebook the model embeds.
        codebooks: Codebooks the model reads (the first ``codebooks`` rows of each row's codes).
        reader: What reads the codes, for the message (``"the flow (codebook_size from its config)"``).
        splits: The splits to check.
        column: The codes column.
        row_check: Instead of the range check, a check of each row's codes ``[codebooks, frames]`` that
            raises ``ValueError`` with the reason (e.g. a stream of LM ids that must follow its layout).

    Returns:
        The number of rows checked.

    Raises:
        CodesOutOfRangeError: Naming the shard, the row, the offending code and the range (one line).
    """
    checked = 0
    for split in splits:
        for shard in sorted((Path(tokens_dir) / split).glob("part-*.parquet")):
            for row in _rows(shard, column):
                value = row.get(column)
                if not value or not value[0]:
                    continue  # no codes: the loader skips and counts such rows
                checked += 1
                codes = np.asarray(value[:codebooks], dtype=np.int64)
                where = f"{split}/{shard.name}: row {row['id']!r}"
                if row_check is not None:
                    try:
                        row_check(codes)
                    except ValueError as err:
                        raise CodesOutOfRangeError(f"{where}: {err}; {reader} cannot read these Tokens (were they "
                                                   "made by another tokenizer?)") from None
                    continue
                bad = (codes < 0) | (codes >= codebook_size)
                if bad.any():
                    k, t = (int(i) for i in np.argwhere(bad)[0])
                    raise CodesOutOfRangeError(
                        f"{where}: code {int(codes[k, t])} (codebook {k}, frame {t}) lies outside [0, {codebook_size}) "
                        f"of {reader}; codes span [{int(codes.min())}, {int(codes.max())}]: were these Tokens made "
                        "by another tokenizer?")
    log.info("%s: the codes of %d rows fit %s", tokens_dir, checked, reader)
    return checked


def check_flow_codes(tokens_dir: str | Path, config: Any, source: str) -> int:
    """:func:`check_codes` for a flow: ours (``codebook_size`` and ``num_codebooks`` from its config) or a
    release flow (its yaml's vocabulary; a Step-Audio-EditX stream of LM ids checked against its layout).

    Args:
        tokens_dir: A local Tokens artifact.
        config: The flow's config (``FlowConfig`` or ``ReleaseFlowConfig``).
        source: Where the flow comes from, for the message (a base flow URI or ``flow.preset=tiny``).
    """
    stream = getattr(config, "code_stream", None)
    reader = f"the flow's codebook ({source})"
    if not stream:
        return check_codes(tokens_dir, int(config.codebook_size), int(config.num_codebooks), reader)

    def follows_stream(codes: np.ndarray) -> None:  # CodeStreamError is a ValueError naming the id and position
        step_pairs_from_interleaved(codes[0], stream["codebook_offsets"], stream["codebook_sizes"],
                                    stream["interleave"])

    return check_codes(tokens_dir, int(config.codebook_size), 1, f"the flow's stream layout ({source})",
                       row_check=follows_stream)

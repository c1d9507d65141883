"""LM training data: Tokens shards → examples (``layouts``) → the engine's batches (:class:`ExampleBatches`).

This module reads a split of a Tokens artifact; the sequence layouts live in
``audiotune.train.layouts`` and batching / collation in ``audiotune.train.batching``,
both re-exported here. The loss is :func:`audiotune.train.objectives.llm_loss`.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import torch

from audiotune.config import TrainSettings
from audiotune.models.vocab import IGNORE_INDEX, AudioVocab
from audiotune.train.batching import (
    PACKING_ATTENTION,
    TokenBudgetSampler,
    collate_packed,
    collate_padded,
    resolve_packing,
    supports_packing,
)
from audiotune.train.layouts import LAYOUTS, TASK_LAYOUT, Example, MissingField, build_example, has_target, truncate

__all__ = [
    "LAYOUTS", "PACKING_ATTENTION", "TASK_LAYOUT", "Example", "TokenBudgetSampler", "build_example",
    "ExampleBatches", "collate_packed", "collate_padded", "load_examples", "resolve_packing", "supports_packing",
]

log = logging.getLogger(__name__)

_COLUMNS = ["id", "task", "text_ids", "prompt_text_ids", "instruction_ids", "audio_codes", "prompt_codes",
            "repeat_count"]
_SHOWN_IDS = 5


def _rows(split_dir: Path):
    for shard in sorted(split_dir.glob("part-*.parquet")):
        columns = [c for c in _COLUMNS if c in pq.read_schema(shard).names]
        for batch in pq.ParquetFile(shard).iter_batches(columns=columns, batch_size=1024):
            for row in batch.to_pylist():
                yield shard, row


def load_examples(split_dir: Path, vocab: AudioVocab, layout: str, max_seq_len: int, overlong: str,
                  repeat: bool = True) -> tuple[list[Example], dict[str, Any]]:
    """Build one example per Tokens row of a split (``part-*.parquet``).

    Rows that lack what their layout needs are skipped; rows longer than ``max_seq_len``
    are dropped or truncated (a truncated row left without any target is dropped). Both
    are counted, and logged with a few row ids.

    Args:
        split_dir: A split directory of a Tokens artifact (``train/`` or ``val/``); a missing
            directory gives no examples.
        vocab: Ids of the LM's vocabulary.
        layout: One of ``LAYOUTS``, or ``auto`` to pick each row's layout from its ``task``.
        max_seq_len: Longest sequence kept.
        overlong: ``drop`` or ``truncate``.
        repeat: Repeat each row ``repeat_count`` times (training); False for validation.

    Returns:
        The examples and stats: ``rows`` read, ``examples`` built, ``skipped_missing`` (rows
        lacking what the layout needs), ``dropped_overlong``, ``truncated``, ``tokens`` (all
        examples' positions, repeats included) and ``layouts`` (examples per layout).
    """
    if layout != "auto" and layout not in LAYOUTS:
        raise ValueError(f"llm.layout: unknown layout {layout!r} (expected auto or one of {', '.join(LAYOUTS)})")
    if overlong not in ("drop", "truncate"):
        raise ValueError(f"llm.overlong: expected 'drop' or 'truncate', got {overlong!r}")
    examples: list[Example] = []
    stats = {"rows": 0, "examples": 0, "skipped_missing": 0, "dropped_overlong": 0, "truncated": 0, "tokens": 0}
    per_layout: Counter[str] = Counter()
    skipped: dict[str, list[str]] = defaultdict(list)
    for shard, row in _rows(Path(split_dir)):
        stats["rows"] += 1
        row_layout = TASK_LAYOUT.get(row.get("task")) if layout == "auto" else layout
        if row_layout is None:
            stats["skipped_missing"] += 1
            skipped[f"task {row.get('task')!r} has no layout"].append(row["id"])
            continue
        try:
            example = build_example(row, row_layout, vocab)
        except MissingField as missing:
            stats["skipped_missing"] += 1
            skipped[f"{row_layout} needs {missing}"].append(row["id"])
            continue
        except ValueError as err:
            raise ValueError(f"{shard}: row {row['id']!r}: {err}") from None
        if len(example) > max_seq_len:
            if overlong == "drop" or not has_target(example := truncate(example, max_seq_len)):
                stats["dropped_overlong"] += 1
                skipped[f"longer than max_seq_len={max_seq_len}"].append(row["id"])
                continue
            stats["truncated"] += 1
        copies = max(1, int(row.get("repeat_count") or 1)) if repeat else 1
        examples.extend([example] * copies)
        per_layout[row_layout] += copies
        stats["tokens"] += len(example) * copies
    stats["examples"] = len(examples)
    stats["layouts"] = dict(per_layout)
    for reason, ids in skipped.items():
        shown = ", ".join(ids[:_SHOWN_IDS]) + (" ..." if len(ids) > _SHOWN_IDS else "")
        log.warning("%s: %d rows skipped (%s): %s", split_dir, len(ids), reason, shown)
    log.info("%s: %d examples from %d rows (%d tokens, %d truncated)", split_dir, stats["examples"],
             stats["rows"], stats["tokens"], stats["truncated"])
    return examples, stats


class ExampleBatches:
    """Token-budget batches of one process's share of the examples, padded or packed."""

    def __init__(self, examples: list, vocab: AudioVocab, train: TrainSettings, seed: int, rank: int,
                 world_size: int, packing: bool, shuffle: bool = True):
        self.examples = examples
        self.vocab = vocab
        self.packing = packing
        self.sampler = TokenBudgetSampler(
            [len(e.input_ids) for e in examples], batch_tokens=train.batch_tokens,
            max_batch_size=train.max_batch_size, seed=seed, shuffle=shuffle, rank=rank, world_size=world_size,
            packing=packing,
        )

    def batches(self, epoch: int) -> list[list[int]]:
        return self.sampler.batches(epoch)

    def repeats(self, epoch: int) -> list[bool]:
        """Per batch of ``epoch``: whether it only repeats another process's (padding; validation weighs it 0)."""
        return self.sampler.repeats(epoch)

    def collate(self, indices: list[int]) -> dict[str, torch.Tensor]:
        chosen = [self.examples[i] for i in indices]
        if self.packing:
            batch = collate_packed(chosen)
        else:
            channel_pad = self.vocab.channel_pad_id if self.vocab.num_codebooks > 1 else None
            batch = collate_padded(chosen, self.vocab.pad_id, channel_pad)
        # counted here, on the CPU, so the training step needs no device sync for its metrics
        batch["n_tokens"] = sum(len(e.input_ids) for e in chosen)
        batch["n_samples"] = len(chosen)
        # the positions whose next token is predicted (labels are aligned with the inputs, the model shifts them);
        # multi-codebook labels are [B, T, C]: counted on channel 0, one per frame
        labels = batch["labels"] if batch["labels"].ndim == 2 else batch["labels"][..., 0]
        batch["n_targets"] = int((labels[:, 1:] != IGNORE_INDEX).sum())
        return batch

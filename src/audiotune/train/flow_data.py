"""Flow training data: Tokens rows → flow examples → mel-frame-budget batches.

Examples are held as a few contiguous arrays (all mels of a split end to end, all codes end to
end, offsets), so a batch is cut out with one vectorised gather. Batches are formed by a total
mel-frame budget (``flow.max_frames_in_batch``, padded frames count: longest × batch size) with
length grouping, and dealt across ranks, by :class:`audiotune.train.batching.TokenBudgetSampler`.

A batch (:meth:`FlowExamples.collate`) is a dict of plain tensors::

    codes            [B, C, T_codes] int64   codebook 0 only (C = 1) or all codebooks, per ``codebooks``
    code_lengths     [B] int64
    mel              [B, n_mels, T] float32 (zero past each length)
    mel_lengths      [B] int64
    speaker_index    [B] int64                (speaker type ``id``)
    speaker_embedding [B, D] float32          (speaker type ``embedding``)
    noise_seed       [B] int64                 (:class:`FlowBatches`) seed of each example's random draws
    n_frames, n_samples                       python ints, counted on the CPU

so another stage (joint) can replace ``codes`` (with predicted codes of the same shape) and call
:func:`audiotune.train.objectives.flow_loss`.

``noise_seed`` (:func:`noise_seeds`) is a hash of the run seed, the epoch and the example's place
in the epoch's item list: an example's time step, noise, prompt and dropout are the same whichever
rank, micro-batch or batch it lands in, so two processes follow the one-process run, and a resumed
run replays the draws without any RNG state.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch

from audiotune.train.batching import TokenBudgetSampler

log = logging.getLogger(__name__)

CODEBOOKS = ("first", "all")
VAL_SEED = 20240917  # fixed noise / time steps for a deterministic validation loss
_COLUMNS = ["id", "audio_codes", "mel", "mel_frames", "speaker_index", "speaker_embedding", "repeat_count"]


@dataclass
class FlowExamples:
    """The flow examples of one split, stored end to end.

    Attributes:
        ids: Row ids.
        mel: ``[Σ frames, n_mels]`` float32.
        mel_offsets: ``[N + 1]`` start of each example's frames in ``mel``.
        codes: ``[C, Σ code frames]`` int32.
        code_offsets: ``[N + 1]``.
        speaker_index: ``[N]`` int64.
        speaker_embedding: ``[N, D]`` float32, or None when the rows carry none.
        repeat_count: ``[N]`` how often each example counts in an epoch.
    """

    ids: list[str]
    mel: np.ndarray
    mel_offsets: np.ndarray
    codes: np.ndarray
    code_offsets: np.ndarray
    speaker_index: np.ndarray
    speaker_embedding: np.ndarray | None
    repeat_count: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def mel_lengths(self) -> np.ndarray:
        return np.diff(self.mel_offsets)

    @property
    def code_lengths(self) -> np.ndarray:
        return np.diff(self.code_offsets)

    @property
    def n_mels(self) -> int:
        return int(self.mel.shape[1])

    @property
    def num_codebooks(self) -> int:
        return int(self.codes.shape[0])

    def subset(self, keep: np.ndarray) -> FlowExamples:
        """The examples where ``keep`` (bool ``[N]``) is True."""
        idx = np.flatnonzero(keep)
        mel_idx = _ranges(self.mel_offsets, idx)
        code_idx = _ranges(self.code_offsets, idx)
        return FlowExamples(
            ids=[self.ids[i] for i in idx], mel=self.mel[mel_idx], mel_offsets=_offsets(self.mel_lengths[idx]),
            codes=self.codes[:, code_idx], code_offsets=_offsets(self.code_lengths[idx]),
            speaker_index=self.speaker_index[idx],
            speaker_embedding=None if self.speaker_embedding is None else self.speaker_embedding[idx],
            repeat_count=self.repeat_count[idx])

    def collate(self, indices: Iterable[int]) -> dict[str, Any]:
        """A padded batch of the given examples (see the module docstring)."""
        idx = np.asarray(list(indices), dtype=np.int64)
        mel_len, code_len = self.mel_lengths[idx], self.code_lengths[idx]
        mel = _gather(self.mel, self.mel_offsets[idx], mel_len)  # [B, T, n_mels]
        codes = _gather(self.codes.T, self.code_offsets[idx], code_len)  # [B, T_codes, C]
        batch: dict[str, Any] = {
            "codes": torch.from_numpy(codes.astype(np.int64)).transpose(1, 2).contiguous(),
            "code_lengths": torch.from_numpy(code_len.astype(np.int64)),
            "mel": torch.from_numpy(mel).transpose(1, 2).contiguous(),
            "mel_lengths": torch.from_numpy(mel_len.astype(np.int64)),
            "speaker_index": torch.from_numpy(self.speaker_index[idx].astype(np.int64)),
            "n_frames": int(mel_len.sum()),
            "n_samples": len(idx),
        }
        if self.speaker_embedding is not None:
            batch["speaker_embedding"] = torch.from_numpy(self.speaker_embedding[idx])
        return batch


def noise_seeds(seed: int, epoch: int, items: Iterable[int]) -> np.ndarray:
    """``[B]`` int64 seeds of the examples' random draws, a hash of ``(seed, epoch, item)`` each.

    Args:
        seed: The run seed.
        epoch: The epoch.
        items: Each example's index in the epoch's item list (a repeated example has several).
    """
    mask = (1 << 64) - 1  # SeedSequence takes non-negative entropy; a negative run seed wraps
    return np.asarray([np.random.SeedSequence([seed & mask, epoch & mask, int(i) & mask]).generate_state(
        1, np.uint64)[0] >> np.uint64(1) for i in items], dtype=np.int64)


def _offsets(lengths: np.ndarray) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int64)


def _ranges(offsets: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Concatenated ``arange(offsets[i], offsets[i + 1])`` for ``i`` in ``idx`` (vectorised)."""
    starts, lengths = offsets[idx], offsets[idx + 1] - offsets[idx]
    if lengths.sum() == 0:
        return np.zeros(0, dtype=np.int64)
    within = np.arange(lengths.sum()) - np.repeat(_offsets(lengths)[:-1], lengths)
    return np.repeat(starts, lengths) + within


def _gather(data: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """``[B, max(lengths), ...]`` rows ``data[starts[b] : starts[b] + lengths[b]]``, zero padded, one gather."""
    longest = int(lengths.max()) if len(lengths) else 0
    pos = np.arange(longest)[None, :]
    valid = pos < lengths[:, None]
    out = data[np.where(valid, starts[:, None] + pos, 0)]
    out[~valid] = 0
    return out


def rows_to_examples(rows: Iterable[dict[str, Any]], n_mels: int, codebooks: str = "all",
                     num_codebooks: int | None = None) -> tuple[FlowExamples, dict[str, Any]]:
    """Turn Tokens rows into flow examples; rows without a mel or codes are skipped and counted.

    Args:
        rows: Tokens rows (dicts with ``id``, ``audio_codes``, ``mel``, ``mel_frames``,
            ``speaker_index``, ``speaker_embedding``, ``repeat_count``).
        n_mels: Mel bins (Tokens ``mel.json``).
        codebooks: ``first`` (codebook 0 only) or ``all``.
        num_codebooks: Codebooks every row must have with ``all`` (default: the first row's).

    Returns:
        The examples and stats ``rows``, ``examples``, ``frames``, ``skipped`` (reason → count).

    Raises:
        ValueError: A row whose mel does not have ``n_mels`` bins or whose codebook count differs.
    """
    if codebooks not in CODEBOOKS:
        raise ValueError(f"flow.codebooks: expected one of {CODEBOOKS}, got {codebooks!r}")
    ids, mels, codes, spk, emb, repeats = [], [], [], [], [], []
    skipped: Counter[str] = Counter()
    n_rows = 0
    for row in rows:
        n_rows += 1
        if row.get("mel") is None or not row.get("mel_frames"):
            skipped["no_mel"] += 1
            continue
        if not row.get("audio_codes") or not row["audio_codes"][0]:
            skipped["no_codes"] += 1
            continue
        mel = np.frombuffer(row["mel"], dtype="<f4")
        if mel.size != int(row["mel_frames"]) * n_mels:
            raise ValueError(f"row {row['id']!r}: mel has {mel.size} values, not mel_frames × n_mels = "
                             f"{row['mel_frames']} × {n_mels}")
        c = np.asarray(row["audio_codes"], dtype=np.int32)
        if codebooks == "first":
            c = c[:1]
        elif num_codebooks is None:
            num_codebooks = c.shape[0]
        elif c.shape[0] != num_codebooks:
            raise ValueError(f"row {row['id']!r}: {c.shape[0]} codebooks, expected {num_codebooks}")
        ids.append(row["id"])
        mels.append(mel.reshape(-1, n_mels))
        codes.append(c)
        spk.append(int(row.get("speaker_index") or 0))
        emb.append(row.get("speaker_embedding"))
        repeats.append(max(1, int(row.get("repeat_count") or 1)))
    have_emb = bool(emb) and all(e is not None for e in emb)
    if emb and not have_emb and any(e is not None for e in emb):
        raise ValueError("some rows carry a speaker_embedding and others not; re-tokenize with one speaker type")
    c_dim = codes[0].shape[0] if codes else (1 if codebooks == "first" else (num_codebooks or 1))
    examples = FlowExamples(
        ids=ids,
        mel=np.concatenate(mels) if mels else np.zeros((0, n_mels), np.float32),
        mel_offsets=_offsets(np.array([len(m) for m in mels], dtype=np.int64)),
        codes=np.concatenate(codes, axis=1) if codes else np.zeros((c_dim, 0), np.int32),
        code_offsets=_offsets(np.array([c.shape[1] for c in codes], dtype=np.int64)),
        speaker_index=np.asarray(spk, dtype=np.int64),
        speaker_embedding=np.asarray(emb, dtype=np.float32) if have_emb else None,
        repeat_count=np.asarray(repeats, dtype=np.int64),
    )
    stats = {"rows": n_rows, "examples": len(ids), "frames": int(examples.mel_lengths.sum()),
             "skipped": dict(skipped)}
    return examples, stats


def load_flow_examples(split_dir: Path, n_mels: int, codebooks: str = "all",
                       num_codebooks: int | None = None) -> tuple[FlowExamples, dict[str, Any]]:
    """:func:`rows_to_examples` over every ``part-*.parquet`` of a Tokens split (a missing split: none)."""

    def rows():
        for shard in sorted(Path(split_dir).glob("part-*.parquet")):
            columns = [c for c in _COLUMNS if c in pq.read_schema(shard).names]
            for batch in pq.ParquetFile(shard).iter_batches(columns=columns, batch_size=256):
                yield from batch.to_pylist()

    examples, stats = rows_to_examples(rows(), n_mels, codebooks, num_codebooks)
    if stats["skipped"]:
        log.warning("%s: skipped %s", split_dir, stats["skipped"])
    log.info("%s: %d flow examples, %d mel frames (%.1f MiB in memory)", split_dir, stats["examples"],
             stats["frames"], examples.mel.nbytes / 2**20)
    return examples, stats


class EpochBatches:
    """A TokenBudgetSampler's batches that remember the epoch last listed, for per-example noise seeds.

    The engine lists an epoch's batches (:meth:`batches`) before it collates them, so ``collate``
    of a subclass can derive each example's seed from ``(seed, epoch, position)``.
    """

    sampler: TokenBudgetSampler
    seed: int
    epoch: int = 0

    def batches(self, epoch: int) -> list[list[int]]:
        """This process's batches of ``epoch``; collate uses this epoch."""
        self.epoch = epoch
        return self.sampler.batches(epoch)


class FlowBatches(EpochBatches):
    """Mel-frame-budget batches of one process's share of the examples (the engine's BatchSource).

    :meth:`collate` adds each example's ``noise_seed`` for the epoch of the latest :meth:`batches`
    call (the engine lists an epoch's batches before collating them).

    Args:
        examples: The split's examples.
        max_frames_in_batch: Budget of one batch in padded mel frames (longest × count); an example
            longer than the budget alone would exceed it (the stage drops those beforehand).
        max_batch_size: Most examples in one batch.
        seed: Base seed of the shuffling and of the examples' noise seeds.
        rank: This process's rank.
        world_size: Number of processes.
        shuffle: Shuffle (training) or a fixed length-sorted order (validation).
        repeat: Count each example ``repeat_count`` times per epoch (training).
    """

    def __init__(self, examples: FlowExamples, max_frames_in_batch: int, max_batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1, shuffle: bool = True, repeat: bool = True) -> None:
        self.examples = examples
        self.items = (np.repeat(np.arange(len(examples)), examples.repeat_count) if repeat
                      else np.arange(len(examples)))
        self.sampler = TokenBudgetSampler(examples.mel_lengths[self.items], batch_tokens=max_frames_in_batch,
                                          max_batch_size=max_batch_size, seed=seed, shuffle=shuffle, rank=rank,
                                          world_size=world_size)
        self.seed, self.epoch = seed, 0

    def collate(self, indices: list[int]) -> dict[str, Any]:
        """The padded batch of these positions, with their ``noise_seed`` for the current epoch."""
        positions = np.asarray(indices, dtype=np.int64)
        batch = self.examples.collate(self.items[positions])
        batch["noise_seed"] = torch.from_numpy(noise_seeds(self.seed, self.epoch, positions))
        return batch



"""Token-budget batches (length grouping), padded and packed collation, packing support.

Packing (padding-free batches) in transformers 5.x — checked in 5.23's
``masking_utils.py`` and ``modeling_flash_attention_utils.py``:

- ``sdpa``, ``eager``, ``flex_attention``: ``create_causal_mask`` calls
  ``find_packed_sequence_indices(position_ids)`` when ``attention_mask is None`` and
  ``past_key_values is None``; a position that does not follow its neighbour by +1 starts
  a new sequence, and the mask becomes block-diagonal causal. The caveat is the cache:
  with ``config.use_cache=True`` (the default of most configs) the model creates an empty
  ``DynamicCache`` even in training, detection is skipped and samples silently attend to
  each other. Train packed batches with ``use_cache=False`` (``model.config.use_cache =
  False``); ``tests/test_llm_data.py`` pins both behaviours.
- ``flash_attention_2/3/4``: no mask; ``_flash_attention_forward`` sees batch size 1 with
  non-monotonic ``position_ids`` (``_is_packed_sequence``) and runs the varlen kernel with
  ``cu_seqlens`` derived from them (independent of the cache).
- Anything else (paged or hub kernels) is not known to honour packing: pad instead.

Models must take and forward ``position_ids`` (every HF causal LM does; a wrapper such as
a multi-codebook model must pass them through).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from audiotune.models.vocab import IGNORE_INDEX

PACKING_ATTENTION = frozenset(
    {"sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3", "flash_attention_4"}
)


def supports_packing(attn_implementation: str | None) -> bool:
    """Whether HF attention of this kind keeps packed samples apart from ``position_ids`` alone."""
    return (attn_implementation or "sdpa") in PACKING_ATTENTION


VARLEN_KERNELS = ("flash_attention_2", "flash_attention_3")


def resolve_packing(setting: str, attn_implementation: str | None) -> bool:
    """Whether to pack for ``train.packing`` (auto | on | off) and this attention kernel.

    ``on`` packs wherever the kernel keeps samples apart (:func:`supports_packing`); ``auto`` only
    where packing is also cheap: variable-length kernels. With sdpa/eager a packed row is one
    long sequence under a block-diagonal mask, so attention costs (Σ lengths)² instead of Σ length².
    """
    if setting == "off" or not supports_packing(attn_implementation):
        return False
    return setting == "on" or attn_implementation in VARLEN_KERNELS


class TokenBudgetSampler:
    """Batches of example indices whose token cost stays within a budget.

    Each epoch, indices are shuffled (seed ``seed + epoch``), cut into mega-batches of
    ``mega_batches`` × the expected batch size, sorted by length inside each (so a batch holds
    similar lengths and little padding), and cut greedily into batches whose cost — longest
    length × count when padding, sum of lengths when packing — is at most ``batch_tokens``
    and whose size is at most ``max_batch_size``. An example longer than the budget forms a
    batch of its own. The batch order is then shuffled. With ``shuffle=False`` (validation)
    all indices are sorted by length once and the order is fixed.

    Distributed: every rank computes the same global batches and takes every
    ``world_size``-th one, starting at ``rank``. So that all ranks run the same number of
    steps (collectives would hang otherwise), the global list is first padded to a multiple
    of ``world_size`` by repeating its last batches: up to ``world_size - 1`` batches are
    seen twice in an epoch. :meth:`repeats` tells which of a rank's batches are such
    repeats, so that validation can run them (ZeRO-3 gathers weights in every forward) and
    give them no weight.

    Args:
        lengths: Length of every example.
        batch_tokens: Token budget of one batch.
        max_batch_size: Most examples in one batch.
        seed: Base seed; epoch e uses ``seed + e``.
        shuffle: Randomise (training) or not (validation).
        rank: This process's rank.
        world_size: Number of processes.
        packing: Cost is the sum of lengths (padding-free) instead of max × count.
        mega_batches: Size of a length-sorting group, in expected batches.
    """

    def __init__(self, lengths: Sequence[int], batch_tokens: int, max_batch_size: int, seed: int,
                 shuffle: bool = True, rank: int = 0, world_size: int = 1, packing: bool = False,
                 mega_batches: int = 50):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        if batch_tokens < 1 or max_batch_size < 1:
            raise ValueError(f"batch_tokens ({batch_tokens}) and max_batch_size ({max_batch_size}) must be ≥ 1")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.batch_tokens, self.max_batch_size = batch_tokens, max_batch_size
        self.seed, self.shuffle, self.packing = seed, shuffle, packing
        self.rank, self.world_size = rank, world_size
        mean = float(self.lengths.mean()) if len(self.lengths) else 1.0
        expected = max(1, min(max_batch_size, int(batch_tokens // max(mean, 1.0))))
        self.mega_size = max(1, mega_batches * expected)
        self.epoch = 0
        self._cache: tuple[int, tuple[list[list[int]], list[bool]]] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _cut(self, indices: np.ndarray) -> list[list[int]]:
        """Greedy cut of length-sorted indices into batches within the budget."""
        batches, current, longest, total = [], [], 0, 0
        for i in indices.tolist():
            n = int(self.lengths[i])
            cost = total + n if self.packing else max(longest, n) * (len(current) + 1)
            if current and (cost > self.batch_tokens or len(current) >= self.max_batch_size):
                batches.append(current)
                current, longest, total = [], 0, 0
            current.append(i)
            longest, total = max(longest, n), total + n
        if current:
            batches.append(current)
        return batches

    def global_batches(self, epoch: int) -> list[list[int]]:
        """Every rank's batches of ``epoch`` before they are dealt out (not padded)."""
        n = len(self.lengths)
        if not self.shuffle:
            return self._cut(np.argsort(-self.lengths, kind="stable"))
        rng = np.random.default_rng(self.seed + epoch)
        order = rng.permutation(n)
        batches: list[list[int]] = []
        for start in range(0, n, self.mega_size):
            chunk = order[start:start + self.mega_size]
            batches.extend(self._cut(chunk[np.argsort(-self.lengths[chunk], kind="stable")]))
        return [batches[k] for k in rng.permutation(len(batches))]

    def batches(self, epoch: int | None = None) -> list[list[int]]:
        """This rank's batches of ``epoch`` (default: the one set by ``set_epoch``), in order."""
        return self._dealt(self.epoch if epoch is None else epoch)[0]

    def repeats(self, epoch: int | None = None) -> list[bool]:
        """For each of this rank's batches of ``epoch``: whether it repeats a batch dealt out before
        (padding to a multiple of ``world_size``), i.e. is seen twice in the epoch."""
        return self._dealt(self.epoch if epoch is None else epoch)[1]

    def _dealt(self, epoch: int) -> tuple[list[list[int]], list[bool]]:
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        batches = self.global_batches(epoch)
        repeats = [False] * len(batches)
        if batches and self.world_size > 1:
            n = len(batches)
            total = math.ceil(n / self.world_size) * self.world_size
            padded = batches + [batches[-1 - k % n] for k in range(total - n)]
            batches = padded[self.rank::self.world_size]
            repeats = [k >= n for k in range(self.rank, total, self.world_size)]
        self._cache = (epoch, (batches, repeats))
        return batches, repeats

    def iter_from(self, epoch: int, start: int = 0) -> Iterator[list[int]]:
        """Batches of ``epoch`` from batch index ``start`` on (exact resume)."""
        yield from self.batches(epoch)[start:]

    def __iter__(self) -> Iterator[list[int]]:
        return self.iter_from(self.epoch)

    def __len__(self) -> int:
        return len(self.batches(self.epoch))


def collate_padded(examples: Sequence, pad_id: int, channel_pad_id: int | None = None) -> dict[str, torch.Tensor]:
    """Right-padded batch: ``input_ids`` [B, T(, C)], ``attention_mask`` [B, T], ``labels`` (IGNORE on padding).

    Args:
        examples: Examples with ``input_ids`` and ``labels`` of shape [T] or [T, C].
        pad_id: Padding id of channel 0.
        channel_pad_id: Padding id of channels 1..C-1 (needed when C > 1).
    """
    longest = max(len(e.input_ids) for e in examples)
    tail = examples[0].input_ids.shape[1:]
    ids = torch.full((len(examples), longest, *tail), pad_id, dtype=torch.long)
    if tail and tail[0] > 1:
        if channel_pad_id is None:
            raise ValueError("collate_padded: channel_pad_id is required for multi-codebook examples")
        ids[..., 1:] = channel_pad_id
    labels = torch.full((len(examples), longest, *tail), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), longest), dtype=torch.long)
    for b, e in enumerate(examples):
        n = len(e.input_ids)
        ids[b, :n] = torch.from_numpy(np.asarray(e.input_ids, dtype=np.int64))
        labels[b, :n] = torch.from_numpy(np.asarray(e.labels, dtype=np.int64))
        mask[b, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def collate_packed(examples: Sequence) -> dict[str, torch.Tensor]:
    """Padding-free batch: all examples in one row, ``position_ids`` restarting at 0 per example.

    Returns ``input_ids`` [1, ΣT(, C)], ``position_ids`` [1, ΣT] and ``labels``; no
    ``attention_mask`` (its absence is what lets transformers detect the packing). Labels
    stay aligned with ``input_ids`` (the model shifts them), so the loss at position t
    predicts token t + 1: the first token of every example after the first is masked,
    otherwise it would be predicted from the previous example's last token.
    """
    ids = np.concatenate([np.asarray(e.input_ids, dtype=np.int64) for e in examples])
    labels = np.concatenate([np.asarray(e.labels, dtype=np.int64) for e in examples])
    lengths = [len(e.input_ids) for e in examples]
    starts = np.cumsum([0, *lengths[:-1]])
    labels[starts[1:]] = IGNORE_INDEX
    positions = np.concatenate([np.arange(n) for n in lengths])
    return {"input_ids": torch.from_numpy(ids)[None], "position_ids": torch.from_numpy(positions)[None],
            "labels": torch.from_numpy(labels)[None]}

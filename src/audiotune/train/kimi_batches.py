"""The llm stage's batches of Kimi-Audio examples (:mod:`audiotune.models.kimi_data` lays them out).

:func:`batches_class_for` picks the batches class for the examples a model's loader produced: these for
Kimi-Audio's two-stream :class:`~audiotune.models.kimi_data.KimiExample`, :class:`ExampleBatches` otherwise.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from audiotune.models.kimi_data import KimiExample
from audiotune.models.vocab import IGNORE_INDEX
from audiotune.train.batching import TokenBudgetSampler
from audiotune.train.llm_data import ExampleBatches


class KimiBatches:
    """Batches of one Kimi example each, as upstream's fine-tuning runs (``llm.train.grad_accum`` makes larger
    steps). Kimi-Audio's code takes one sequence per call; with one per batch every rank makes the same calls,
    which ZeRO-3's per-module gathering needs. Never packed: its attention knows no sample borders."""

    def __init__(self, examples: list[KimiExample], vocab: Any, train: Any, seed: int, rank: int, world_size: int,
                 packing: bool = False, shuffle: bool = True):
        self.examples = examples
        self.pad_id = int(vocab.pad_id)
        self.sampler = TokenBudgetSampler([len(e) for e in examples], batch_tokens=train.batch_tokens,
                                          max_batch_size=1, seed=seed, shuffle=shuffle, rank=rank,
                                          world_size=world_size, packing=False)

    def batches(self, epoch: int) -> list[list[int]]:
        return self.sampler.batches(epoch)

    def repeats(self, epoch: int) -> list[bool]:
        return self.sampler.repeats(epoch)

    def collate(self, indices: list[int]) -> dict[str, Any]:
        """Right-padded streams [B, T], masks, labels, and the log-mels [B, F, n_mels] with their lengths."""
        chosen = [self.examples[i] for i in indices]
        T = max(len(e) for e in chosen)
        F = max((e.mel.shape[0] for e in chosen if e.mel is not None), default=0)
        n_mels = next((e.mel.shape[1] for e in chosen if e.mel is not None), 1)

        def stack(field: str, fill: Any, dtype: torch.dtype) -> torch.Tensor:
            out = torch.full((len(chosen), T), fill, dtype=dtype)
            for b, e in enumerate(chosen):
                out[b, :len(e)] = torch.as_tensor(getattr(e, field), dtype=dtype)
            return out

        mel = torch.zeros(len(chosen), F, n_mels)
        frames = torch.zeros(len(chosen), dtype=torch.long)
        for b, e in enumerate(chosen):
            if e.mel is not None:
                mel[b, :e.mel.shape[0]] = torch.from_numpy(np.array(e.mel))
                frames[b] = e.mel.shape[0]
        attention = torch.zeros(len(chosen), T, dtype=torch.long)
        for b, e in enumerate(chosen):
            attention[b, :len(e)] = 1
        audio_labels = stack("audio_labels", IGNORE_INDEX, torch.long)
        text_labels = stack("text_labels", IGNORE_INDEX, torch.long)
        targets = int((audio_labels[:, 1:] != IGNORE_INDEX).sum() + (text_labels[:, 1:] != IGNORE_INDEX).sum())
        return {"input_ids": stack("audio_ids", self.pad_id, torch.long),
                "text_input_ids": stack("text_ids", self.pad_id, torch.long),
                "is_continuous_mask": stack("continuous", False, torch.bool), "attention_mask": attention,
                "audio_labels": audio_labels, "text_labels": text_labels, "whisper_mel": mel, "whisper_frames": frames,
                "n_tokens": sum(len(e) for e in chosen), "n_samples": len(chosen), "n_targets": targets}


def batches_class_for(examples: list[Any]) -> type:
    """The batches class of the llm stage's ``examples``: :class:`KimiBatches` for Kimi-Audio's
    :class:`~audiotune.models.kimi_data.KimiExample` (its own two-stream collation), else :class:`ExampleBatches`."""
    return KimiBatches if examples and isinstance(examples[0], KimiExample) else ExampleBatches

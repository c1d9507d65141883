"""Batches of LM examples for the engine, and the LM loss."""

from __future__ import annotations

import torch

from audiotune.config import TrainSettings
from audiotune.models.vocab import IGNORE_INDEX, AudioVocab


class ExampleBatches:
    """Token-budget batches of one process's share of the examples, padded or packed."""

    def __init__(self, examples: list, vocab: AudioVocab, train: TrainSettings, seed: int, rank: int,
                 world_size: int, packing: bool, shuffle: bool = True):
        from audiotune.train.data import TokenBudgetSampler

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
        from audiotune.train.data import collate_packed, collate_padded

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


def llm_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean next-token loss of a padded or packed batch, with token, sample and target counts.

    ``target_tokens`` (predicted positions) is what validation weights a batch's mean loss by.
    """
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids", "labels")}
    out = model(**inputs)
    metrics = {"tokens": batch["n_tokens"], "samples": batch["n_samples"], "target_tokens": batch["n_targets"]}
    per_codebook = getattr(out, "per_codebook_loss", None)
    if per_codebook is not None:
        for k, value in enumerate(per_codebook):
            metrics[f"loss_codebook{k}"] = value  # a detached tensor: read at logging time, no sync per step
    return out.loss, metrics

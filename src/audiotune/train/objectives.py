"""The engine's loss functions: ``fn(model, batch) -> (loss, metrics)`` for the llm and flow stages.

The joint stage's loss, which combines the two, is :class:`audiotune.train.joint.JointLoss`.
"""

from __future__ import annotations

from typing import Any

import torch

from audiotune.train.flow_data import VAL_SEED


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


def flow_loss(model: torch.nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
    """The engine's loss function: OT-CFM loss, with ``tokens`` = valid mel frames and ``samples``.

    The random draws (time steps, noise, prompts, dropout) come from each example's ``noise_seed``
    when the batch has them (:class:`FlowBatches`; validation lists epoch 0 every time, so its loss
    is deterministic). A batch without seeds draws from torch's global RNG in training and, in eval
    mode, from a generator seeded with :data:`VAL_SEED`, leaving torch's RNG untouched.
    """
    seeds, generator = batch.get("noise_seed"), None
    if seeds is None and not model.training:
        generator = torch.Generator().manual_seed(VAL_SEED)
    loss = model(codes=batch["codes"], code_lengths=batch["code_lengths"], mel=batch["mel"],
                 mel_lengths=batch["mel_lengths"], speaker_index=batch.get("speaker_index"),
                 speaker_embedding=batch.get("speaker_embedding"), generator=generator, noise_seed=seeds)
    return loss, {"tokens": batch["n_frames"], "samples": batch["n_samples"]}

"""Joint training data and loss: one batch feeds the LLM (its layout) and the flow (codes → mel) of the same rows.

A joint example pairs a row's LM sequence (:mod:`audiotune.train.layouts`) with its flow example
(:mod:`audiotune.train.flow_data`); rows that lack either are left out and counted. Batches follow
the LM token budget (padded, length grouped) and the flow's mel-frame budget at once. Tensors go
to the engine flat, prefixed ``llm.`` and ``flow.``, so the engine moves them as any other batch.
Each pair carries the flow's per-example ``noise_seed`` (:func:`audiotune.train.flow_data.noise_seeds`
of the run seed, the epoch and the pair), so the flow's draws do not depend on the batching or the rank.

With ``flow_condition = llm_predicted`` the flow is conditioned on the LLM's teacher-forced guesses of
the codes: at every target code position the argmax over that channel's code logits, in frame order,
so the decoder learns to cope with the LLM's mistakes.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from audiotune.models.vocab import IGNORE_INDEX, AudioVocab, CodeStream
from audiotune.train.batching import TokenBudgetSampler, collate_padded
from audiotune.train.flow_data import EpochBatches, FlowExamples, noise_seeds
from audiotune.train.objectives import flow_loss

log = logging.getLogger(__name__)


def pair_examples(llm_examples: Sequence, flow_examples: FlowExamples,
                  max_frames: int) -> tuple[list[tuple[int, int]], dict[str, int]]:
    """Pairs ``(llm index, flow index)`` of the rows both have (by row id); counts what was left out."""
    flow_index = {rid: i for i, rid in enumerate(flow_examples.ids)}
    mel_lengths = flow_examples.mel_lengths
    pairs, stats = [], {"llm_only": 0, "too_long_for_flow": 0}
    seen: set[str] = set()
    for i, example in enumerate(llm_examples):
        if example.id in seen:
            continue
        seen.add(example.id)
        j = flow_index.get(example.id)
        if j is None:
            stats["llm_only"] += 1
        elif mel_lengths[j] > max_frames:
            stats["too_long_for_flow"] += 1
        else:
            pairs.append((i, j))
    stats["flow_only"] = len(set(flow_examples.ids) - seen)
    stats["pairs"] = len(pairs)
    return pairs, stats


class JointBatches(EpochBatches):
    """Batches of paired examples within both budgets (the engine's BatchSource).

    :meth:`collate` adds the flow's ``noise_seed`` of each pair for the epoch of the latest
    :meth:`batches` call (the engine lists an epoch's batches before collating them).
    """

    def __init__(self, llm_examples: Sequence, flow_examples: FlowExamples, pairs: list[tuple[int, int]],
                 vocab: AudioVocab, batch_tokens: int, max_frames: int, max_batch_size: int, seed: int,
                 rank: int, world_size: int, shuffle: bool = True):
        self.llm_examples, self.flow_examples, self.pairs, self.vocab = llm_examples, flow_examples, pairs, vocab
        llm_len = np.array([len(llm_examples[i]) for i, _ in pairs], dtype=np.int64)
        mel_len = flow_examples.mel_lengths[[j for _, j in pairs]] if pairs else np.zeros(0, dtype=np.int64)
        # one sampler on a common scale: an example costs the larger share of either budget
        cost = np.maximum(llm_len / batch_tokens, mel_len / max_frames)
        scale = 1_000_000
        self.sampler = TokenBudgetSampler(np.ceil(cost * scale).astype(np.int64), batch_tokens=scale,
                                          max_batch_size=max_batch_size, seed=seed, shuffle=shuffle, rank=rank,
                                          world_size=world_size)
        self.seed, self.epoch = seed, 0

    def collate(self, indices: list[int]) -> dict[str, Any]:
        llm = [self.llm_examples[self.pairs[k][0]] for k in indices]
        channel_pad = self.vocab.channel_pad_id if self.vocab.num_codebooks > 1 else None
        batch = {f"llm.{k}": v for k, v in collate_padded(llm, self.vocab.pad_id, channel_pad).items()}
        flow = self.flow_examples.collate([self.pairs[k][1] for k in indices])
        flow["noise_seed"] = torch.from_numpy(noise_seeds(self.seed, self.epoch, indices))
        batch.update({f"flow.{k}": v for k, v in flow.items()})
        batch["n_tokens"] = sum(len(e) for e in llm)
        return batch


def _channels(out, labels: torch.Tensor, vocab: AudioVocab):
    """(logits, labels, first code id) of every codebook channel the LLM predicts."""
    if labels.ndim == 2:
        return [(out.logits, labels, vocab.audio_offset)]
    found = [(out.logits, labels[..., 0], vocab.audio_offset)]
    for k, logits in enumerate(getattr(out, "codebook_logits", None) or (), start=1):
        found.append((logits, labels[..., k], 0))
    return found


@torch.no_grad()
def predicted_codes(out, labels: torch.Tensor, vocab: AudioVocab, codes: torch.Tensor,
                    code_lengths: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The flow's ``codes`` [B, C, T] with the LLM's teacher-forced guesses where it predicts them.

    Returns the codes and how many (sample, codebook) pairs kept the data's codes because the LLM
    predicts no such target there (e.g. an ``understand`` row) or a different number of frames.
    With Tokens of LM ids (``vocab.code_stream``, e.g. Step-Audio-EditX's interleaved stream) each
    guess is the best id of the codebook its position belongs to, returned as an LM id like the data's.
    """
    predicted = codes.clone()
    kept = 0
    size = vocab.codebook_size
    for k, (logits, target, first) in enumerate(_channels(out, labels, vocab)[: codes.shape[1]]):
        target = target[:, 1:]
        if vocab.code_stream and k == 0:
            guess = _stream_guess(logits[:, :-1], target, vocab.code_stream)  # position t predicts token t + 1
        else:
            guess = logits[:, :-1, first:first + size].argmax(-1)
        is_code = (target >= first) & (target < first + size) & (target != IGNORE_INDEX)
        for b in range(codes.shape[0]):
            values = guess[b][is_code[b]]
            n = int(code_lengths[b])
            if values.numel() == n:
                predicted[b, k, :n] = values
            else:
                kept += 1
    return predicted, kept


def _stream_guess(logits: torch.Tensor, target: torch.Tensor, stream: dict) -> torch.Tensor:
    """LM ids ``[B, T]``: at each position the argmax over the ids of the codebook the target id belongs to
    (positions whose target is no audio id get -1)."""
    guess = torch.full(target.shape, -1, dtype=torch.long, device=target.device)
    for low, high in CodeStream.from_dict(stream).id_ranges:
        inside = (target >= low) & (target < high)
        if bool(inside.any()):
            guess[inside] = logits[..., low:high].argmax(-1)[inside] + low
    return guess


class JointLoss:
    """``w_llm · L_llm + w_flow · L_flow`` over a joint batch; the engine's loss function.

    Args:
        vocab: The LLM's vocabulary (to read codes off its logits).
        w_llm: Weight of the LLM loss.
        w_flow: Weight of the flow loss.
        condition: ``ground_truth`` or ``llm_predicted`` codes for the flow.
    """

    def __init__(self, vocab: AudioVocab, w_llm: float, w_flow: float, condition: str):
        self.vocab, self.w_llm, self.w_flow, self.condition = vocab, w_llm, w_flow, condition

    def __call__(self, model: torch.nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        llm_in = {k[4:]: v for k, v in batch.items() if k.startswith("llm.")}
        flow_in = {k[5:]: v for k, v in batch.items() if k.startswith("flow.")}
        # through the wrapper's forward (DDP, DeepSpeed): they only sync gradients of a forward they saw
        llm_loss, flow_value, flow_metrics, kept = model(llm_in, flow_in, self.condition, self.vocab)
        total = self.w_llm * llm_loss + self.w_flow * flow_value
        metrics: dict[str, float] = {"tokens": batch["n_tokens"], "samples": flow_metrics["samples"],
                                     "frames": flow_metrics["tokens"], "loss_llm": llm_loss.detach(),
                                     "loss_flow": flow_value.detach()}
        if kept is not None:
            metrics["flow_codes_from_data"] = kept
        return total, metrics


class JointModel(torch.nn.Module):
    """The LLM and the flow as one module: one optimizer, one checkpoint, one exact resume."""

    def __init__(self, llm: torch.nn.Module, flow: torch.nn.Module):
        super().__init__()
        self.llm, self.flow = llm, flow

    def forward(self, llm_in: dict[str, torch.Tensor], flow_in: dict[str, torch.Tensor], condition: str,
                vocab: AudioVocab) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any], int | None]:
        """Both losses on one joint batch: ``(L_llm, L_flow, flow metrics, codes kept from the data)``.

        With ``condition == "llm_predicted"`` the flow sees the LLM's teacher-forced guesses of the codes.
        """
        out = self.llm(input_ids=llm_in["input_ids"], attention_mask=llm_in["attention_mask"],
                       labels=llm_in["labels"])
        kept = None
        if condition == "llm_predicted":
            flow_in = dict(flow_in)
            flow_in["codes"], kept = predicted_codes(out, llm_in["labels"], vocab, flow_in["codes"],
                                                     flow_in["code_lengths"])
        flow_value, flow_metrics = flow_loss(self.flow, flow_in)
        return out.loss, flow_value, flow_metrics, kept

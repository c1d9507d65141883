"""Generating audio codes with a trained LLM: one loop for one codebook and for the delay pattern.

The prompt (task marker, text, ``<|audio_start|>``, and a voice prompt's codes for cloning) is laid
out as in training (:mod:`audiotune.train.layouts`) and run once through the backbone with a KV
cache; then one position at a time, each channel's next id is sampled among what the layout allows
there: codes or ``<|audio_end|>`` in channel 0, codes in channel k until its delayed frames run out,
the filler elsewhere. A voice prompt's frames are known and forced. Works for any HF causal LM
and for :class:`~audiotune.models.multicodebook.MultiCodebookLM` around one. With Tokens of LM ids
holding an interleaved stream (``vocab.code_stream``, Step-Audio-EditX's 2 vq02 + 3 vq06 ids per group),
each position samples among its own codebook's ids and ``<|audio_end|>`` comes only after whole groups.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from audiotune.models.multicodebook import MultiCodebookLM
from audiotune.models.vocab import AudioVocab, CodeStream
from audiotune.train.layouts import delay_codes

log = logging.getLogger(__name__)


@dataclass
class Sampling:
    """Settings of the code sampler: temperature 0 is greedy; ``<|audio_end|>`` only after ``min_frames``."""

    temperature: float = 0.8
    top_k: int = 50
    max_frames: int = 500
    seed: int = 0
    min_frames: int = 1


def prompt_ids(vocab: AudioVocab, text_ids: list[int], prompt_text_ids: list[int] | None = None,
               prompt_codes: np.ndarray | None = None) -> tuple[np.ndarray, int]:
    """The layout's context up to ``<|audio_start|>`` (``tts``, or ``clone`` with a voice prompt).

    Returns ids [T] (one codebook) or [T, C] and the number of known prompt frames. With another
    system's chat frame (``vocab.prompt_format``) the context is that frame up to its ``{audio}`` slot,
    the voice prompt's codes inside it (LM ids), so no frames are known.
    """
    if vocab.prompt_format:
        return _format_context(vocab, text_ids, prompt_text_ids, prompt_codes), 0
    s = vocab.special_ids
    if prompt_codes is None:
        context = [s["<|task_tts|>"], *text_ids, s["<|audio_start|>"]]
    else:
        context = [s["<|task_clone|>"], s["<|prompt_start|>"], *(prompt_text_ids or []), s["<|prompt_end|>"],
                   *text_ids, s["<|audio_start|>"]]
    ids = np.asarray(context, dtype=np.int64)
    if vocab.num_codebooks > 1:
        full = np.full((len(ids), vocab.num_codebooks), vocab.channel_pad_id, dtype=np.int64)
        full[:, 0] = ids
        ids = full
    return ids, 0 if prompt_codes is None else int(prompt_codes.shape[1])


def _format_context(vocab: AudioVocab, text_ids: list[int], prompt_text_ids: list[int] | None,
                    prompt_codes: np.ndarray | None) -> np.ndarray:
    name, frames = vocab.prompt_format["name"], vocab.prompt_format["layouts"]
    layout = "tts" if prompt_codes is None else "clone"
    if layout not in frames:
        raise ValueError(f"llm.prompt_format={name} has no {layout} frame to synthesize with")
    prompt = [] if prompt_codes is None else [int(c) if c >= vocab.audio_offset else int(c) + vocab.audio_offset
                                             for c in np.asarray(prompt_codes)[0]]
    slots = {"text": list(text_ids), "prompt_text": list(prompt_text_ids or []), "instruction": [],
             "prompt_audio": prompt}
    context: list[int] = []
    for piece in frames[layout]:
        if piece == "audio":
            break
        context += [int(i) for i in piece] if isinstance(piece, list) else slots[piece]
    return np.asarray(context, dtype=np.int64)


def end_id(vocab: AudioVocab) -> int:
    """The id that ends the generated audio: ``<|audio_end|>``, or the tokenizer's end in another system's frame."""
    return int(vocab.eos_id) if vocab.prompt_format else int(vocab.special_ids["<|audio_end|>"])


def _parts(model: torch.nn.Module):
    if isinstance(model, MultiCodebookLM):
        return (model.backbone.get_input_embeddings(), list(model.codebook_embeddings),
                model.backbone.get_decoder(), model.backbone.get_output_embeddings(), list(model.codebook_heads))
    return model.get_input_embeddings(), [], model.get_decoder(), model.get_output_embeddings(), []


def _pick(logits: torch.Tensor, allowed: torch.Tensor, sampling: Sampling, gen: torch.Generator) -> int:
    logits = logits.float().masked_fill(~allowed, float("-inf"))
    if sampling.temperature <= 0:
        return int(logits.argmax())
    logits = logits / sampling.temperature
    if sampling.top_k > 0:
        k = min(sampling.top_k, int(allowed.sum()))
        threshold = torch.topk(logits, k).values[-1]
        logits = logits.masked_fill(logits < threshold, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs.cpu(), 1, generator=gen))


def _stream_books(vocab: AudioVocab, rows: int, device) -> tuple[list[torch.Tensor] | None, list[int] | None]:
    """For an interleaved stream: each codebook's allowed ids over the ``rows`` logits, and the codebook of
    every position in a group; (None, None) otherwise."""
    if not vocab.code_stream:
        return None, None
    stream = CodeStream.from_dict(vocab.code_stream)
    books = []
    for low, high in stream.id_ranges:
        mask = torch.zeros(rows, dtype=torch.bool, device=device)
        mask[low:high] = True
        books.append(mask)
    return books, [int(k) for k in stream.pattern]


@torch.no_grad()
def generate_codes(model: torch.nn.Module, vocab: AudioVocab, context: np.ndarray, sampling: Sampling,
                   prompt_codes: np.ndarray | None = None) -> np.ndarray:
    """Codes ``[C, F]`` of the generated audio (the voice prompt's frames excluded).

    Args:
        model: The LLM (eval mode), plain or multi-codebook.
        vocab: Its vocabulary layout.
        context: :func:`prompt_ids` output, ending with ``<|audio_start|>``.
        sampling: Sampler settings.
        prompt_codes: ``[C, Fp]`` codes of a voice prompt (cloning), or None.
    """
    from transformers import DynamicCache

    embed, tables, decoder, head, heads = _parts(model)
    device = next(model.parameters()).device
    C, size, end = vocab.num_codebooks, vocab.codebook_size, end_id(vocab)
    if vocab.prompt_format:  # the voice prompt sits in the frame's context (prompt_ids), not in the audio block
        prompt_codes = None
    known = np.zeros((C, 0), dtype=np.int64) if prompt_codes is None else np.asarray(prompt_codes)[:C]
    n_known = known.shape[1]
    gen = torch.Generator().manual_seed(sampling.seed)

    def embed_ids(ids: torch.Tensor) -> torch.Tensor:  # [1, T] or [1, T, C]
        if C == 1:
            return embed(ids)
        out = embed(ids[..., 0])
        for k, table in enumerate(tables, start=1):
            out = out + table(ids[..., k]).to(out.dtype)
        return out

    # the prompt frames are fully known up to position n_known - 1 of the audio block: prefill them with the context
    prefix = context
    if n_known:
        block = delay_codes(known, vocab)[0] if C > 1 else (known[0] + vocab.audio_offset)
        prefix = np.concatenate([context, block[:n_known]])
    ids = torch.as_tensor(prefix, device=device)[None]
    cache = DynamicCache()
    hidden = decoder(inputs_embeds=embed_ids(ids), past_key_values=cache, use_cache=True).last_hidden_state[:, -1]
    channel0 = torch.zeros(head.weight.shape[0], dtype=torch.bool, device=device)
    channel0[vocab.audio_offset:vocab.audio_offset + size] = True
    rows = heads[0].weight.shape[0] if heads else size + 2  # a family sets its own (MOSS-TTSD: codes + pad)
    codes_only = torch.zeros(rows, dtype=torch.bool, device=device)
    codes_only[:size] = True
    books, pattern = _stream_books(vocab, head.weight.shape[0], device) if C == 1 else (None, None)
    frames: list[list[int]] = [[] for _ in range(C)]
    end_at: int | None = None
    p = n_known
    limit = n_known + sampling.max_frames
    while True:
        step = []
        if end_at is None:
            whole = books is None or (p - n_known) % len(pattern) == 0  # a stream ends after whole groups only
            allowed = channel0.clone() if books is None else books[pattern[(p - n_known) % len(pattern)]].clone()
            if p >= limit and whole:
                allowed[:] = False
            if whole and (p >= n_known + max(1, sampling.min_frames) or not allowed.any()):
                allowed[end] = True
            token = _pick(head(hidden)[0], allowed, sampling, gen) if allowed.sum() > 1 or not allowed[end] else end
            if token == end:
                end_at = p
            else:
                frames[0].append(token - vocab.audio_offset)
        else:
            token = end
        step.append(token)
        for k in range(1, C):
            frame = p - k
            if frame < 0 or (end_at is not None and frame >= end_at):
                step.append(vocab.filler_id)
            elif frame < n_known:
                step.append(int(known[k, frame]))
            else:
                code = _pick(heads[k - 1](hidden.to(heads[k - 1].weight.dtype))[0], codes_only, sampling, gen)
                frames[k].append(code)
                step.append(code)
        p += 1
        if end_at is not None and p >= end_at + C - 1:
            break
        x = torch.as_tensor(step, device=device).view(1, 1, C) if C > 1 else torch.as_tensor([[step[0]]], device=device)
        hidden = decoder(inputs_embeds=embed_ids(x), past_key_values=cache, use_cache=True).last_hidden_state[:, -1]
    count = len(frames[0])
    if end_at is not None and end_at >= limit:
        log.warning("generation hit the limit of %d frames without its end id %d", sampling.max_frames, end)
    return np.asarray([f[:count] for f in frames], dtype=np.int64).reshape(C, count)

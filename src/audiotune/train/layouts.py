"""Sequence layouts: one Tokens row → the LM's input ids and labels.

Labels follow the Hugging Face convention: aligned with ``input_ids`` (the model shifts
them by one inside its loss), ``IGNORE_INDEX`` where a position is no target. ``M`` below
is ``vocab.special_ids[M]``, ``codes`` are audio codes mapped to LM ids, ``*`` marks the
positions that carry loss:

- ``tts``:        ``<task_tts> text <audio_start> codes* <audio_end>* eos*``
- ``clone``:      ``<task_clone> <prompt_start> prompt_text <prompt_end> text <audio_start>
  prompt_codes target_codes* <audio_end>* eos*``
- ``edit``:       ``<task_edit> <instruction> instruction <prompt_start> prompt_text <prompt_end> text
  <audio_start> prompt_codes target_codes* <audio_end>* eos*``
- ``understand``: ``<task_understand> <audio_start> codes <audio_end> text* eos*`` (Kimi-Audio style)
- ``music``:      ``<task_music> <instruction> tags <prompt_start> lyrics <prompt_end> <audio_start>
  codes* <audio_end>* eos*`` (tags are the row's ``instruction_ids``, lyrics its ``text_ids``)
- ``text``:       ``text* [eos*]`` (eos appended unless the window already ends with it)

One codebook: ids are 1-D [T]; code c → ``vocab.audio_offset + c``. A row with more codebooks
than the vocabulary uses the first ``vocab.num_codebooks`` (the coarsest of an RVQ).

C > 1 codebooks (MOSS-TTSD style): ids are [T, C]. Text and marker positions carry their id
in channel 0 and ``vocab.channel_pad_id`` in channels 1..C-1 (never a target there). Audio
uses the delay pattern: codebook k is shifted right by k frames, so F frames take F + C - 1
positions; channel 0 is never delayed (``audio_offset + code``), channels k ≥ 1 hold their
raw codes (their own tables) and ``vocab.filler_id`` in the k leading and C-1-k trailing
gaps. The fillers are real targets of their channel (the model learns the pattern). In
channel 0 the C-1 trailing positions hold ``<audio_end>``: the first one is the end marker
itself, so no separate marker position follows; the model learns to repeat it while the
higher codebooks flush. A filler or trailing marker belongs to the frame beside it for the
loss mask (prompt frames carry no loss, target frames do).

Tokens of LM ids (``vocab.code_stream``, Step-Audio-EditX's interleaved stream) hold ``audio_offset
+ code`` already; they are read back to codes first, so every layout above applies unchanged.

Another system's chat frame (``vocab.prompt_format``, e.g. ``step-audio-editx``; see
``audiotune.models.vocab.PROMPT_FORMATS``) replaces the markers for the layouts it frames: fixed
ids and pre-tokenized text around the row's ids, its audio ids without an end marker, then eos.
Step-Audio-EditX's, as its ``tts.py`` builds them (``B``/``T``/``E`` are ids 1/4/3):

- ``clone``: ``B T "system\\n<clone header>[speaker_start]\\nspeaker name: clone\\nspeaker prompt text: \\n"
  prompt_text "\\nspeaker audio tokens: \\n" prompt_codes "\\n[speaker_end]\\n" E T "human\\n" text E T
  "assistant\\n" codes* eos*``
- ``edit``: ``B T "system\\n<edit system prompt>" E T "human\\n" instruction "\\n" prompt_codes "\\n" E T
  "assistant\\n" codes* eos*`` (instruction: the row's ``meta.instruction``, e.g. upstream's "Make the
  following audio more happy. The text corresponding to the audio is: ...\\n", else its ``edit_type``)
- ``tts``: ``B T "system\\n<clone header>" E T "human\\n" text E T "assistant\\n" codes* eos*`` (upstream has
  no prompt-less mode; this is its clone frame without the speaker block)

Rows of layouts the frame does not cover are skipped and counted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from audiotune.errors import DataError
from audiotune.models.vocab import IGNORE_INDEX, AudioVocab

LAYOUTS = ("tts", "clone", "edit", "understand", "music", "text")
TASK_LAYOUT = {name: name for name in LAYOUTS}  # layout=auto: a row's task names its layout


@dataclass
class Example:
    """One training sequence.

    Attributes:
        input_ids: int32 [T] (one codebook) or [T, C] (C codebooks).
        labels: Same shape; ``IGNORE_INDEX`` where there is no loss.
        id: The Tokens row's id.
        layout: The layout it was built with.
    """

    input_ids: np.ndarray
    labels: np.ndarray
    id: str
    layout: str = ""

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


class MissingField(DataError, ValueError):
    """A row lacks what its layout needs (the row is skipped and counted)."""


@dataclass
class _Tokens:
    ids: list[int]
    loss: bool


@dataclass
class _Audio:
    codes: np.ndarray  # [C, F]
    loss_from: int  # frames before this index are context (prompt), the rest are targets


def _text(row: dict[str, Any], key: str, required: bool) -> list[int]:
    value = row.get(key) or []
    if required and not value:
        raise MissingField(key)
    return [int(x) for x in value]


def _codes(row: dict[str, Any], key: str, vocab: AudioVocab, required: bool = True) -> np.ndarray | None:
    value = row.get(key)
    if value is None or len(value) == 0 or len(value[0]) == 0:
        if required:
            raise MissingField(key)
        return None
    codes = np.asarray(value, dtype=np.int64)
    if codes.ndim != 2:
        raise ValueError(f"{key} must be codebooks × frames, got shape {codes.shape}")
    if codes.shape[0] < vocab.num_codebooks:
        raise ValueError(f"{key} has {codes.shape[0]} codebooks; the vocabulary needs {vocab.num_codebooks}")
    codes = codes[: vocab.num_codebooks]
    if vocab.code_stream is not None:  # Tokens of LM ids: back to codes counted from audio_offset
        codes = codes - vocab.audio_offset
    if codes.min() < 0 or codes.max() >= vocab.codebook_size:
        raise ValueError(f"{key} holds codes outside [0, {vocab.codebook_size}): "
                         f"min {codes.min()}, max {codes.max()}")
    return codes


def _segments(row: dict[str, Any], layout: str, vocab: AudioVocab) -> list[_Tokens | _Audio]:
    s = vocab.special_ids
    eos = _Tokens([vocab.eos_id], True)
    if layout == "text":
        ids = _text(row, "text_ids", True)
        return [_Tokens(ids if ids[-1] == vocab.eos_id else [*ids, vocab.eos_id], True)]
    if layout == "tts":
        text, codes = _text(row, "text_ids", True), _codes(row, "audio_codes", vocab)
        return [_Tokens([s["<|task_tts|>"], *text, s["<|audio_start|>"]], False), _Audio(codes, 0), eos]
    if layout in ("clone", "edit"):
        text, target = _text(row, "text_ids", True), _codes(row, "audio_codes", vocab)
        prompt = _codes(row, "prompt_codes", vocab)
        head = [s["<|task_clone|>"]]
        if layout == "edit":
            head = [s["<|task_edit|>"], s["<|instruction|>"], *_text(row, "instruction_ids", True)]
        context = [*head, s["<|prompt_start|>"], *_text(row, "prompt_text_ids", False), s["<|prompt_end|>"],
                   *text, s["<|audio_start|>"]]
        return [_Tokens(context, False), _Audio(np.concatenate([prompt, target], axis=1), prompt.shape[1]), eos]
    if layout == "understand":
        codes, text = _codes(row, "audio_codes", vocab), _text(row, "text_ids", True)
        return [_Tokens([s["<|task_understand|>"], s["<|audio_start|>"]], False), _Audio(codes, codes.shape[1]),
                _Tokens([*text, vocab.eos_id], True)]
    if layout == "music":
        codes = _codes(row, "audio_codes", vocab)
        context = [s["<|task_music|>"], s["<|instruction|>"], *_text(row, "instruction_ids", False),
                   s["<|prompt_start|>"], *_text(row, "text_ids", False), s["<|prompt_end|>"], s["<|audio_start|>"]]
        return [_Tokens(context, False), _Audio(codes, 0), eos]
    raise ValueError(f"unknown layout {layout!r} (expected one of {', '.join(LAYOUTS)})")


_FORMAT_TEXT = {"text": ("text_ids", True), "prompt_text": ("prompt_text_ids", False),
                "instruction": ("instruction_ids", True)}


def _format_segments(row: dict[str, Any], layout: str, vocab: AudioVocab) -> list[_Tokens]:
    """The row in ``vocab.prompt_format``'s frame of ``layout`` (one codebook only)."""
    name, frames = vocab.prompt_format["name"], vocab.prompt_format["layouts"]
    if layout not in frames:
        raise MissingField(f"a {layout} frame in llm.prompt_format={name} (it frames {', '.join(sorted(frames))})")
    if vocab.num_codebooks != 1:
        raise ValueError(f"llm.prompt_format={name} frames one codebook; the Tokens have {vocab.num_codebooks}")
    out = []
    for piece in frames[layout]:
        if isinstance(piece, list):
            out.append(_Tokens([int(i) for i in piece], False))
        elif piece in _FORMAT_TEXT:
            out.append(_Tokens(_text(row, *_FORMAT_TEXT[piece]), False))
        elif piece in ("prompt_audio", "audio"):
            codes = _codes(row, "prompt_codes" if piece == "prompt_audio" else "audio_codes", vocab)
            out.append(_Tokens([int(c) + vocab.audio_offset for c in codes[0]], piece == "audio"))
        elif piece == "eos":
            out.append(_Tokens([vocab.eos_id], True))
        else:
            raise ValueError(f"llm.prompt_format={name}: unknown slot {piece!r} in the {layout} frame")
    return out


def _tokens_block(seg: _Tokens, num_codebooks: int, channel_pad: int) -> tuple[np.ndarray, np.ndarray]:
    ids = np.asarray(seg.ids, dtype=np.int64)
    labels = ids.copy() if seg.loss else np.full_like(ids, IGNORE_INDEX)
    if num_codebooks == 1:
        return ids, labels
    full_ids = np.full((len(ids), num_codebooks), channel_pad, dtype=np.int64)
    full_labels = np.full((len(ids), num_codebooks), IGNORE_INDEX, dtype=np.int64)
    full_ids[:, 0], full_labels[:, 0] = ids, labels
    return full_ids, full_labels


def delay_codes(codes: np.ndarray, vocab: AudioVocab) -> tuple[np.ndarray, np.ndarray]:
    """Codes [C, F] → (ids [F + C - 1, C], owning frame of every cell) under the delay pattern.

    Channel 0 holds ``audio_offset + code`` and then ``<audio_end>``; channel k ≥ 1 holds its
    raw codes shifted by k with ``vocab.filler_id`` in the gaps (see the module docstring).
    """
    C, F = codes.shape
    positions = np.arange(F + C - 1)[:, None] - np.arange(C)[None, :]  # frame index of every cell
    inside = (positions >= 0) & (positions < F)
    ids = np.full((F + C - 1, C), vocab.filler_id, dtype=np.int64)
    channel = np.broadcast_to(np.arange(C)[None, :], positions.shape)
    ids[inside] = codes[channel[inside], positions[inside]]
    ids[:F, 0] += vocab.audio_offset
    ids[F:, 0] = vocab.special_ids["<|audio_end|>"]
    return ids, np.clip(positions, 0, F - 1)


def undelay_codes(ids: np.ndarray, vocab: AudioVocab) -> np.ndarray:
    """Inverse of :func:`delay_codes`: ids [F + C - 1, C] → codes [C, F] (what a generated block decodes to)."""
    ids = np.asarray(ids)
    T, C = ids.shape
    F = T - C + 1
    if F < 1:
        raise ValueError(f"a delayed block of {C} codebooks needs at least {C} positions, got {T}")
    codes = np.stack([ids[k:k + F, k] for k in range(C)]).astype(np.int64)
    codes[0] -= vocab.audio_offset
    return codes


def _audio_block(seg: _Audio, vocab: AudioVocab) -> tuple[np.ndarray, np.ndarray]:
    C, F = seg.codes.shape
    end = vocab.special_ids["<|audio_end|>"]
    has_target = seg.loss_from < F
    if C == 1:
        ids = np.concatenate([seg.codes[0] + vocab.audio_offset, [end]]).astype(np.int64)
        labels = ids.copy()
        labels[: seg.loss_from] = IGNORE_INDEX
        if not has_target:
            labels[-1] = IGNORE_INDEX
        return ids, labels
    ids, frame = delay_codes(seg.codes, vocab)
    labels = np.where(frame >= seg.loss_from, ids, IGNORE_INDEX)
    return ids, labels


def build_example(row: dict[str, Any], layout: str, vocab: AudioVocab) -> Example:
    """Lay out one Tokens row; raises MissingField when the row lacks what ``layout`` needs."""
    segments = _format_segments(row, layout, vocab) if vocab.prompt_format else _segments(row, layout, vocab)
    parts = [_audio_block(seg, vocab) if isinstance(seg, _Audio)
             else _tokens_block(seg, vocab.num_codebooks, vocab.channel_pad_id)
             for seg in segments]
    ids = np.concatenate([p[0] for p in parts]).astype(np.int32)
    labels = np.concatenate([p[1] for p in parts]).astype(np.int32)
    return Example(input_ids=ids, labels=labels, id=str(row.get("id")), layout=layout)


def truncate(example: Example, max_len: int) -> Example:
    """The first ``max_len`` positions of an example."""
    return Example(example.input_ids[:max_len], example.labels[:max_len], example.id, example.layout)


def has_target(example: Example) -> bool:
    return bool((example.labels != IGNORE_INDEX).any())

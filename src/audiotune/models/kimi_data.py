"""Kimi-Audio training sequences: Tokens rows → its two parallel streams, loss masks and Whisper log-mels.

Kimi-Audio reads two id streams of equal length at once: an *audio* stream (control tokens, audio codes
at ``kimia_token_offset + code``, and a "text blank" wherever text is spoken) and a *text* stream
(text ids, and a blank wherever audio plays). Audio codes between ``<|im_media_begin|>`` and
``<|im_media_end|>`` are *continuous* positions: the model adds the Whisper features of that audio to
their embeddings. A conversation is laid out turn by turn as Kimi-Audio's fine-tuning data code does
(its ``tokenize_message``; our own code), with ``u`` / ``a`` the user / assistant turn starts:

- ``tts`` rows (text → speech): user text ``[u, blank×n, msg_end]`` over text ``[blank, text…, blank]``;
  assistant audio ``[a, media_begin, codes…, media_end, speech_ctd, msg_end]`` over blanks. The audio
  head learns the codes and ``media_end``.
- ``understand`` rows (speech → text, e.g. ASR): user audio ``[u, media_begin, codes…, media_end,
  speech_ct, msg_end]`` over blanks; assistant text ``[a, blank×(n+1), msg_end]`` over
  ``[blank, text…, text_eos, blank]``. The text head learns the text and ``text_eos``.

Every audio segment is continuous, the target audio included (as upstream's fine-tuning does). Labels are
aligned with the inputs (``-100`` where no loss); the loss shifts them by one, as upstream's labels are.
The training batches of these examples are :class:`audiotune.train.kimi_batches.KimiBatches`.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from audiotune.models.families import ModelError
from audiotune.models.vocab import IGNORE_INDEX

log = logging.getLogger(__name__)

MARKERS = {  # Kimi-Audio's control tokens, by the names its tokenizer gives them
    "msg_end": "<|im_msg_end|>", "media_begin": "<|im_media_begin|>", "media_end": "<|im_media_end|>",
    "blank": "<|im_kimia_text_blank|>", "text_eos": "<|im_kimia_text_eos|>",
    "user": "<|im_kimia_user_msg_start|>", "assistant": "<|im_kimia_assistant_msg_start|>",
    "speech_ct": "<|im_kimia_speech_ct_id|>", "speech_ctd": "<|im_kimia_speech_ctd_id|>",
}
LAYOUTS = ("tts", "understand")
_COLUMNS = ["id", "task", "text_ids", "audio_codes", "whisper_mel", "whisper_frames", "repeat_count"]


class KimiDataError(ModelError):
    """Tokens that cannot be laid out for Kimi-Audio; the message names the file, row or setting."""


def marker_ids(tokenizer: Any, where: str) -> dict[str, int]:
    """The control token ids of a Kimi-Audio tokenizer; refuses one that lacks any."""
    vocab = tokenizer.get_vocab()
    missing = [token for token in MARKERS.values() if token not in vocab]
    if missing:
        raise KimiDataError(f"{where}: the tokenizer lacks Kimi-Audio's control tokens {missing[:4]}; tokenize with "
                            "the Kimi-Audio checkpoint's own tokenizer (--base-model)")
    return {name: int(vocab[token]) for name, token in MARKERS.items()}


@dataclass
class KimiExample:
    """One sequence of both streams, [T] each; ``mel`` is the Whisper log-mel of its one audio segment."""

    audio_ids: np.ndarray
    text_ids: np.ndarray
    continuous: np.ndarray
    audio_labels: np.ndarray
    text_labels: np.ndarray
    mel: np.ndarray | None

    @property
    def input_ids(self) -> np.ndarray:  # the sampler's length source
        return self.audio_ids

    def __len__(self) -> int:
        return len(self.audio_ids)


class _Streams:
    def __init__(self) -> None:
        self.audio: list[int] = []
        self.text: list[int] = []
        self.cont: list[bool] = []
        self.audio_loss: list[bool] = []
        self.text_loss: list[bool] = []

    def add(self, audio: list[int], text: list[int], cont: bool = False, audio_loss: bool = False,
            text_loss: bool = False) -> None:
        assert len(audio) == len(text)
        self.audio += audio
        self.text += text
        self.cont += [cont] * len(audio)
        self.audio_loss += [audio_loss] * len(audio)
        self.text_loss += [text_loss] * len(audio)

    def example(self, mel: np.ndarray | None) -> KimiExample:
        audio, text = np.asarray(self.audio, dtype=np.int64), np.asarray(self.text, dtype=np.int64)
        return KimiExample(audio, text, np.asarray(self.cont), np.where(self.audio_loss, audio, IGNORE_INDEX),
                           np.where(self.text_loss, text, IGNORE_INDEX), mel)


def build_kimi_example(row: dict[str, Any], layout: str, m: dict[str, int], token_offset: int,
                       n_mels: int) -> KimiExample | str:
    """Both streams of one Tokens row, or why the row cannot be used."""
    text = list(row.get("text_ids") or [])
    codes = row.get("audio_codes")
    if not text or not codes:
        return f"{layout} needs text_ids and audio_codes"
    if len(codes) != 1:
        return f"Kimi-Audio takes one codebook, the row has {len(codes)}"
    if row.get("whisper_mel") is None:
        return "no whisper_mel (tokenize with tokenize.whisper.enabled=true)"
    speech = [token_offset + int(c) for c in codes[0]]
    mel = np.frombuffer(row["whisper_mel"], dtype="<f4").reshape(-1, n_mels)
    blank = m["blank"]
    s = _Streams()
    if layout == "tts":
        s.add([m["user"]] + [blank] * len(text) + [m["msg_end"]], [blank] + text + [blank])
        s.add([m["assistant"], m["media_begin"]], [blank, blank])
        s.add(speech, [blank] * len(speech), cont=True, audio_loss=True)
        s.add([m["media_end"]], [blank], audio_loss=True)
        s.add([m["speech_ctd"], m["msg_end"]], [blank, blank])
    else:  # understand: speech in, text out
        s.add([m["user"], m["media_begin"]], [blank, blank])
        s.add(speech, [blank] * len(speech), cont=True)
        s.add([m["media_end"], m["speech_ct"], m["msg_end"], m["assistant"]], [blank] * 4)
        s.add([blank] * (len(text) + 1), text + [m["text_eos"]], text_loss=True)
        s.add([m["msg_end"]], [blank])
    return s.example(mel)


def whisper_settings(tokens_dir: Path) -> dict[str, Any]:
    """The Tokens' ``tokenizer/whisper.json`` (n_mels, chunk_s)."""
    file = tokens_dir / "tokenizer" / "whisper.json"
    if not file.is_file():
        raise KimiDataError(f"{tokens_dir} has no Whisper features ({file} is missing): Kimi-Audio needs them; "
                            "re-run tokenize with tokenize.whisper.enabled=true")
    return json.loads(file.read_text())


def load_kimi_examples(split_dir: Path, markers: dict[str, int], token_offset: int, layout: str,
                       max_seq_len: int, repeat: bool = True) -> tuple[list[KimiExample], dict[str, Any]]:
    """One example per usable row of a Tokens split; skipped and overlong rows are counted and logged."""
    import pyarrow.parquet as pq

    split_dir = Path(split_dir)
    n_mels = int(whisper_settings(split_dir.parent)["n_mels"])
    examples: list[KimiExample] = []
    stats: dict[str, Any] = {"rows": 0, "examples": 0, "skipped_missing": 0, "dropped_overlong": 0, "truncated": 0,
                             "tokens": 0}
    skipped: Counter[str] = Counter()
    for shard in sorted(split_dir.glob("part-*.parquet")):
        columns = [c for c in _COLUMNS if c in pq.read_schema(shard).names]
        for row in pq.read_table(shard, columns=columns).to_pylist():
            stats["rows"] += 1
            row_layout = row.get("task") if layout == "auto" else layout
            if row_layout not in LAYOUTS:
                stats["skipped_missing"] += 1
                skipped[f"layout {row_layout!r} (Kimi-Audio: {', '.join(LAYOUTS)})"] += 1
                continue
            example = build_kimi_example(row, row_layout, markers, token_offset, n_mels)
            if isinstance(example, str):
                stats["skipped_missing"] += 1
                skipped[example] += 1
                continue
            if len(example) > max_seq_len:
                stats["dropped_overlong"] += 1
                skipped[f"longer than max_seq_len={max_seq_len}"] += 1
                continue
            copies = max(1, int(row.get("repeat_count") or 1)) if repeat else 1
            examples.extend([example] * copies)
            stats["tokens"] += len(example) * copies
    stats["examples"] = len(examples)
    for reason, count in skipped.items():
        log.warning("%s: %d rows skipped for Kimi-Audio (%s)", split_dir, count, reason)
    return examples, stats


_MODEL_INPUTS = ("input_ids", "text_input_ids", "is_continuous_mask", "attention_mask", "audio_labels",
                 "text_labels", "whisper_mel", "whisper_frames")


def kimi_loss(model: torch.nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
    """Kimi-Audio's fine-tuning loss (audio head + text head, each a masked mean) with the counts the engine
    logs; ``loss_audio`` / ``loss_text`` are the two heads' parts."""
    out = model(**{k: batch[k] for k in _MODEL_INPUTS})
    metrics = {"tokens": batch["n_tokens"], "samples": batch["n_samples"], "target_tokens": batch["n_targets"],
               "loss_audio": out.per_head_loss[0], "loss_text": out.per_head_loss[1]}
    return out.loss, metrics

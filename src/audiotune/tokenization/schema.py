"""The Tokens artifact's row schema, shared by the tokenize stage and every training stage.

Audio codes are stored as codebooks × frames (``list<list<int32>>``) everywhere, so
single- and multi-codebook tokenizers share one path. The target mel is stored as
float32 bytes of shape [mel_frames, n_mels] (n_mels is in ``tokenizer/mel.json``).
Sequence layout (interleaving, delay pattern, packing) is the training collator's job.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

TOKENS_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("source_id", pa.string(), nullable=False),
        pa.field("task", pa.string(), nullable=False),
        pa.field("speaker", pa.string()),
        pa.field("speaker_index", pa.int32()),
        pa.field("text_ids", pa.list_(pa.int32())),
        pa.field("prompt_text_ids", pa.list_(pa.int32())),
        pa.field("instruction_ids", pa.list_(pa.int32())),
        pa.field("audio_codes", pa.list_(pa.list_(pa.int32()))),
        pa.field("prompt_codes", pa.list_(pa.list_(pa.int32()))),
        pa.field("mel", pa.binary()),
        pa.field("mel_frames", pa.int32()),
        pa.field("whisper_mel", pa.binary()),  # tokenize.whisper: Whisper log-mel (Kimi-Audio), float32 bytes
        pa.field("whisper_frames", pa.int32()),
        pa.field("speaker_embedding", pa.list_(pa.float32())),
        pa.field("num_text_tokens", pa.int32()),
        pa.field("num_audio_frames", pa.int32()),
        pa.field("duration_s", pa.float32()),
        pa.field("repeat_count", pa.int32()),
        pa.field("meta", pa.string()),
    ]
)
TOKENS_COLUMNS = TOKENS_SCHEMA.names


def mel_to_bytes(mel: np.ndarray) -> bytes:
    """[frames, n_mels] float32 → bytes."""
    return np.ascontiguousarray(mel, dtype="<f4").tobytes()


def mel_from_row(row: dict[str, Any], n_mels: int) -> np.ndarray | None:
    """The row's target mel as [mel_frames, n_mels] float32, or None."""
    if row.get("mel") is None:
        return None
    return np.frombuffer(row["mel"], dtype="<f4").reshape(-1, n_mels)


def codes_from_row(row: dict[str, Any], key: str = "audio_codes") -> np.ndarray | None:
    """The row's codes as an int32 array [codebooks, frames], or None."""
    value = row.get(key)
    if value is None:
        return None
    return np.asarray(value, dtype=np.int32).reshape(len(value), -1)

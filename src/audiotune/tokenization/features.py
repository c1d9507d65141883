"""Per-row audio work of the tokenize stage: codes, prompt codes, target mel, speaker embedding.

Runs in worker processes: :func:`init_worker` loads the saved tokenizer state once
per process, :func:`audio_features` turns one Dataset row into features or a
:class:`BadRecord` with the reason.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import soxr

from audiotune.data.audio import UndecodableAudio, decode_flac
from audiotune.data.sources.base import BadRecord
from audiotune.tokenization.audio_tokenizers.base import CodesOutOfRange, RowError
from audiotune.tokenization.schema import mel_to_bytes

log = logging.getLogger(__name__)

TOO_SHORT_FOR_TOKEN = "too_short_for_token"
MISALIGNED = "mel_token_misaligned"
CODES_OUT_OF_RANGE = "codes_out_of_range"
INVALID_CODES = "invalid_codes"
EMPTY_TOKENS = "empty_tokens"
BAD_AUDIO = "undecodable_audio"


@dataclass(frozen=True)
class FeatureSettings:
    """What a worker needs to rebuild the tokenizers."""

    tokenizer_dir: str
    speaker_model: str | None
    align_tolerance: int
    codes_field: str
    vocab_size: int | None
    whisper: dict | None = None  # WhisperMelSettings.to_dict() when tokenize.whisper is enabled


_STATE: dict[str, Any] = {}


def init_worker(settings: FeatureSettings) -> None:
    """Load the audio tokenizer, mel extractor and speaker model once per process."""
    import torch

    from audiotune.tokenization.audio_tokenizers import load_audio_tokenizer
    from audiotune.tokenization.mel import MelExtractor
    from audiotune.tokenization.speaker import OnnxSpeakerEmbedder

    torch.set_num_threads(1)
    tok_dir = Path(settings.tokenizer_dir)
    _STATE["settings"] = settings
    _STATE["audio"] = load_audio_tokenizer(tok_dir / "audio") if (tok_dir / "audio").exists() else None
    _STATE["mel"] = MelExtractor.from_dict(json.loads((tok_dir / "mel.json").read_text()))
    _STATE["speaker"] = OnnxSpeakerEmbedder(settings.speaker_model) if settings.speaker_model else None
    _STATE["whisper"] = None
    if settings.whisper:
        from audiotune.tokenization.whisper_features import WhisperMelSettings, feature_extractor

        whisper = WhisperMelSettings.from_dict(settings.whisper)
        _STATE["whisper"] = (whisper, feature_extractor(whisper))


def _bad(row: dict, field: str, reason: str, detail: str) -> BadRecord:
    meta = json.loads(row.get("meta") or "{}")
    return BadRecord(origin=meta.get("origin", row["id"]), field=field, reason=reason,
                     detail=f"{row['id']}: {detail}", id=row["id"])


def _codes(row: dict, wav: np.ndarray | None, sr: int, field: str) -> np.ndarray | None:
    tokenizer = _STATE["audio"]
    if tokenizer is None or wav is None:
        return None
    if tokenizer.name == "precomputed":
        return tokenizer.codes_for_row(row) if field == "audio" else tokenizer.prompt_codes_for_row(row)
    return tokenizer.encode(wav, sr)


def audio_features(row: dict[str, Any]) -> dict[str, Any] | BadRecord:
    """Features of one Dataset row (text-only rows pass through with no audio features)."""
    s: FeatureSettings = _STATE["settings"]
    out: dict[str, Any] = {"audio_codes": None, "prompt_codes": None, "mel": None, "mel_frames": None,
                           "speaker_embedding": None, "num_audio_frames": 0}
    if row.get("audio") is None:
        return out
    try:
        wav, sr = decode_flac(row["audio"])
    except UndecodableAudio as err:
        return _bad(row, "audio", err.reason, err.detail)
    tokenizer = _STATE["audio"]
    mel_x = _STATE["mel"]
    try:
        codes = _codes(row, wav, sr, "audio")
    except CodesOutOfRange as err:
        return _bad(row, "audio_codes", CODES_OUT_OF_RANGE, str(err))
    except RowError as err:  # malformed precomputed codes
        return _bad(row, "audio_codes", INVALID_CODES, str(err))
    if codes is None and tokenizer is not None and tokenizer.name == "precomputed":
        return _bad(row, "audio_codes", INVALID_CODES,
                    f"no precomputed codes in meta.{s.codes_field} for a row with audio")
    if codes is not None:
        codes = np.asarray(codes, dtype=np.int32)
        if codes.ndim == 1:
            codes = codes[None, :]
        if codes.shape[1] == 0:
            return _bad(row, "audio", TOO_SHORT_FOR_TOKEN,
                        f"{len(wav) / sr:.3f} s of audio is too short for one token frame")
        vocab = s.vocab_size or (tokenizer.codebook_size if tokenizer is not None else None)
        if tokenizer is not None and tokenizer.name == "precomputed":
            vocab = None  # codes_for_row checked them (codes at LLM ids lie above codebook_size)
        if vocab is not None and (codes.min() < 0 or codes.max() >= vocab):
            return _bad(row, "audio_codes", CODES_OUT_OF_RANGE,
                        f"codes span [{codes.min()}, {codes.max()}], outside the vocabulary [0, {vocab})")
        out["audio_codes"] = codes.tolist()
        out["num_audio_frames"] = int(codes.shape[1])
    mel_wav = wav if sr == mel_x.sample_rate else soxr.resample(wav, sr, mel_x.sample_rate, quality="HQ")
    mel = mel_x(mel_wav)
    if codes is not None and tokenizer is not None:
        expected = int(round(codes.shape[1] * mel_x.frames_per_second() / tokenizer.token_rate))
        if abs(mel.shape[0] - expected) > s.align_tolerance:
            return _bad(row, "mel", MISALIGNED,
                        f"{mel.shape[0]} mel frames do not line up with {codes.shape[1]} tokens "
                        f"(expected {expected} ± {s.align_tolerance} at {mel_x.frames_per_second():.2f} mel "
                        f"frames/s and {tokenizer.token_rate} tokens/s)")
        if mel.shape[0] >= expected:
            mel = mel[:expected]
        else:  # within tolerance: repeat the last frame
            mel = np.concatenate([mel, np.repeat(mel[-1:], expected - mel.shape[0], axis=0)])
    out["mel"] = mel_to_bytes(mel)
    out["mel_frames"] = int(mel.shape[0])
    if _STATE.get("whisper") is not None:
        from audiotune.tokenization.whisper_features import whisper_log_mel

        whisper_mel = whisper_log_mel(wav, sr, *_STATE["whisper"])
        out["whisper_mel"], out["whisper_frames"] = mel_to_bytes(whisper_mel), int(whisper_mel.shape[0])
    if row.get("prompt_audio") is not None and tokenizer is not None and tokenizer.name != "precomputed":
        try:
            pwav, psr = decode_flac(row["prompt_audio"])
        except UndecodableAudio as err:
            return _bad(row, "prompt_audio", err.reason, err.detail)
        prompt_codes = _codes(row, pwav, psr, "prompt")
        if prompt_codes is not None and np.asarray(prompt_codes).shape[-1] > 0:
            out["prompt_codes"] = np.asarray(prompt_codes, dtype=np.int32).reshape(len(prompt_codes), -1).tolist()
    elif tokenizer is not None and tokenizer.name == "precomputed":  # prompt codes come with the row's meta
        try:
            prompt_codes = _codes(row, wav, sr, "prompt")
        except CodesOutOfRange as err:
            return _bad(row, "prompt_codes", CODES_OUT_OF_RANGE, str(err))
        except RowError as err:
            return _bad(row, "prompt_codes", INVALID_CODES, str(err))
        if prompt_codes is not None:
            out["prompt_codes"] = np.asarray(prompt_codes, dtype=np.int32).tolist()
    if _STATE["speaker"] is not None:
        out["speaker_embedding"] = _STATE["speaker"](wav, sample_rate=sr).astype(np.float32).tolist()
    return out

"""Whisper log-mel features of a row's audio, computed once in tokenize for Kimi-Audio's continuous input.

Kimi-Audio adds the output of a Whisper encoder to the embeddings of the audio codes it is fed. Its
own code cuts the 16 kHz waveform into windows of ``chunk_s`` (30 s for Whisper large-v3), turns each
window, zero-padded to ``chunk_s``, into Whisper's normalised log-mel (128 bins, hop 160), runs the
encoder on it and keeps the first ``4 * tokens`` encoder frames, with ``tokens = (samples - 1) // 1280 + 1``
(12.5 Hz). This module does the part before the encoder, with transformers' ``WhisperFeatureExtractor``
built from its parameters (nothing is downloaded), and keeps only the frames the encoder's kept outputs
need: ``8 * tokens`` mel frames per window, and the one or two after them that still see the signal
(so that the padding rebuilt at training time is exact; ``frames // 8`` is the window's token count).
Windows are concatenated; every window but the last has ``chunk_frames`` frames. The Tokens store them
as float32 bytes (``whisper_mel``, with ``whisper_frames``).

The padding the encoder sees after a window's kept frames is rebuilt at training time
(:func:`pad_window`): Whisper's normalisation clamps each window at ``max - 8`` (in log10), i.e. at
``max - 2`` after its ``(x + 4) / 4`` scaling, and zero samples sit at that floor.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

SAMPLE_RATE = 16000
HOP = 160
N_FFT = 400
SAMPLES_PER_TOKEN = 1280  # 12.5 Hz: Kimi-Audio's (and its GLM-4 audio tokenizer's) rate
FRAMES_PER_TOKEN = SAMPLES_PER_TOKEN // HOP  # 8 mel frames → 4 encoder frames → one 4×d feature
FLOOR_BELOW_MAX = 2.0  # Whisper's clamp (max - 8 in log10) after its (x + 4) / 4 scaling


@dataclass(frozen=True)
class WhisperMelSettings:
    """Parameters of the Whisper front end (``tokenize.whisper``).

    Attributes:
        n_mels: Mel bins (128 for Whisper large-v3, which Kimi-Audio uses).
        chunk_s: Window length in seconds (30 for Whisper; the encoder's ``2 * max_source_positions`` frames).
    """

    n_mels: int = 128
    chunk_s: int = 30

    @property
    def chunk_samples(self) -> int:
        """Samples per window."""
        return self.chunk_s * SAMPLE_RATE

    @property
    def chunk_frames(self) -> int:
        """Mel frames of a full window (3000 for 30 s)."""
        return self.chunk_samples // HOP

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "WhisperMelSettings":
        return cls(n_mels=int(data["n_mels"]), chunk_s=int(data["chunk_s"]))


def feature_extractor(settings: WhisperMelSettings):
    """transformers' ``WhisperFeatureExtractor`` with these parameters (no download)."""
    from transformers import WhisperFeatureExtractor

    return WhisperFeatureExtractor(feature_size=settings.n_mels, sampling_rate=SAMPLE_RATE, hop_length=HOP,
                                   chunk_length=settings.chunk_s, n_fft=N_FFT)


def tokens_for(samples: int) -> int:
    """12.5 Hz positions of ``samples`` at 16 kHz, as Kimi-Audio counts them (at least one)."""
    return (max(samples, 1) - 1) // SAMPLES_PER_TOKEN + 1


def whisper_log_mel(wav: np.ndarray, sample_rate: int, settings: WhisperMelSettings,
                    extractor: Any = None) -> np.ndarray:
    """The kept Whisper log-mel frames of a mono waveform, [frames, n_mels] float32 (see the module docstring)."""
    import soxr

    wav = np.asarray(wav, dtype=np.float32).reshape(-1)
    if sample_rate != SAMPLE_RATE:
        wav = soxr.resample(wav, sample_rate, SAMPLE_RATE, quality="HQ").astype(np.float32)
    extractor = extractor or feature_extractor(settings)
    windows = [wav[i:i + settings.chunk_samples] for i in range(0, max(len(wav), 1), settings.chunk_samples)]
    out = []
    for window in windows:
        mel = extractor(window, sampling_rate=SAMPLE_RATE, return_tensors="np").input_features[0]  # [n_mels, F]
        touched = -(-(len(window) + N_FFT // 2) // HOP)  # frames whose STFT window reaches the signal
        keep = min(max(FRAMES_PER_TOKEN * tokens_for(len(window)), touched), mel.shape[1])
        out.append(mel[:, :keep].T)
    return np.ascontiguousarray(np.concatenate(out), dtype=np.float32)


def window_lengths(frames: int, settings: WhisperMelSettings) -> list[int]:
    """Kept frames of each window of a stored row of ``frames`` frames."""
    full, rest = divmod(frames, settings.chunk_frames)
    return [settings.chunk_frames] * full + ([rest] if rest else [])


def window_tokens(frames: int) -> int:
    """12.5 Hz positions of a window stored with ``frames`` kept frames."""
    return frames // FRAMES_PER_TOKEN


def pad_window(mel: np.ndarray | Any, chunk_frames: int):
    """A window's kept frames ([F, n_mels], numpy or torch) padded to ``chunk_frames`` with its floor value."""
    frames = mel.shape[0]
    if frames >= chunk_frames:
        return mel[:chunk_frames]
    floor = mel.max() - FLOOR_BELOW_MAX
    if isinstance(mel, np.ndarray):
        return np.concatenate([mel, np.full((chunk_frames - frames, mel.shape[1]), floor, dtype=mel.dtype)])
    import torch

    return torch.cat([mel, floor.expand(chunk_frames - frames, mel.shape[1]).to(mel.dtype)])

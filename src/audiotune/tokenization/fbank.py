"""Kaldi-compatible log mel filterbank features, as CAM++ speaker models (3D-Speaker, CosyVoice) expect.

CAM++ inference computes ``torchaudio.compliance.kaldi.fbank(wav, num_mel_bins=80, dither=0,
sample_frequency=16000)`` and subtracts the mean over time (CMN). torchaudio has no CPU build
here, so this module re-implements that function's default path with the same torch operations
in the same order:

1. frames of 25 ms (400 samples) every 10 ms (160), ``snip_edges``: only frames that fit whole,
   ``1 + (n - 400) // 160`` of them (none when ``n < 400``);
2. per frame: subtract the frame's mean (DC offset), pre-emphasis
   ``x[j] -= 0.97 · x[max(0, j - 1)]``, Povey window (``hann(400, periodic=False) ** 0.85``),
   zero-padding to 512 (the next power of two);
3. power spectrum ``|rfft|²``;
4. Kaldi's triangular mel banks: mel = ``1127 · ln(1 + f / 700)``, ``num_bins`` triangles evenly
   spaced in mel between 20 Hz and Nyquist, weights on FFT bins ``0 .. 255`` (the Nyquist bin
   gets weight 0);
5. ``log(max(energy, float32 eps))``;
6. (:func:`campplus_features` only) subtract the per-bin mean over frames.

Scale: 3D-Speaker and CosyVoice feed the float waveform in ``[-1, 1]`` (``scale=1``); some Kaldi
recipes feed int16-range samples (``scale=32768``). After CMN the two differ only in bins that hit
the epsilon floor, since scaling adds the constant ``2·ln(scale)`` to every other value.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch

SAMPLE_RATE = 16000
FRAME_LENGTH = 400  # 25 ms at 16 kHz
FRAME_SHIFT = 160  # 10 ms at 16 kHz
PADDED_LENGTH = 512  # next power of two of FRAME_LENGTH
PREEMPHASIS = 0.97
LOW_FREQ = 20.0
EPSILON = float(torch.finfo(torch.float32).eps)  # floor before the log, as Kaldi


def mel_scale(freq: np.ndarray | float) -> np.ndarray | float:
    """Kaldi's mel scale: ``1127 · ln(1 + f / 700)``."""
    return 1127.0 * np.log(1.0 + np.asarray(freq) / 700.0)


def inverse_mel_scale(mel: np.ndarray | float) -> np.ndarray | float:
    """Hz of a Kaldi mel value."""
    return 700.0 * (np.exp(np.asarray(mel) / 1127.0) - 1.0)


def num_frames(n_samples: int) -> int:
    """Frames :func:`kaldi_fbank` gives for ``n_samples`` at 16 kHz: ``1 + (n - 400) // 160``, or 0."""
    return 0 if n_samples < FRAME_LENGTH else 1 + (n_samples - FRAME_LENGTH) // FRAME_SHIFT


@lru_cache(maxsize=8)
def kaldi_mel_banks(num_bins: int = 80, sample_rate: float = SAMPLE_RATE, low_freq: float = LOW_FREQ,
                    high_freq: float = 0.0) -> torch.Tensor:
    """Kaldi's triangular mel filters ``[num_bins, PADDED_LENGTH // 2 + 1]`` (float32, Nyquist column 0).

    ``high_freq <= 0`` is an offset from Nyquist, as in Kaldi. Computed in float32 like torchaudio.
    """
    nyquist = 0.5 * sample_rate
    if high_freq <= 0.0:
        high_freq += nyquist
    if num_bins <= 3 or not (0.0 <= low_freq < nyquist and 0.0 < high_freq <= nyquist and low_freq < high_freq):
        raise ValueError(f"fbank: bad mel banks num_bins={num_bins}, low_freq={low_freq}, high_freq={high_freq}, "
                         f"nyquist={nyquist}")
    fft_bin_width = sample_rate / PADDED_LENGTH
    mel_low = 1127.0 * math.log(1.0 + low_freq / 700.0)
    mel_high = 1127.0 * math.log(1.0 + high_freq / 700.0)
    delta = (mel_high - mel_low) / (num_bins + 1)  # num_bins + 1: the end triangles spread to the sides
    b = torch.arange(num_bins).unsqueeze(1)
    left = mel_low + b * delta
    center = mel_low + (b + 1.0) * delta
    right = mel_low + (b + 2.0) * delta
    mel = 1127.0 * (1.0 + fft_bin_width * torch.arange(float(PADDED_LENGTH // 2)) / 700.0).log()
    mel = mel.unsqueeze(0)
    up = (mel - left) / (center - left)
    down = (right - mel) / (right - center)
    banks = torch.max(torch.zeros(1), torch.min(up, down))
    return torch.nn.functional.pad(banks, (0, 1), mode="constant", value=0.0).to(torch.float32)


@lru_cache(maxsize=1)
def povey_window() -> torch.Tensor:
    """Kaldi's Povey window over 400 samples: ``hann(periodic=False) ** 0.85``."""
    return torch.hann_window(FRAME_LENGTH, periodic=False, dtype=torch.float32).pow(0.85)


def kaldi_fbank(wav16k: np.ndarray, num_mel_bins: int = 80, scale: float = 1.0) -> np.ndarray:
    """Log mel filterbank ``[frames, num_mel_bins]`` float32 of 16 kHz mono audio, no mean normalisation.

    Matches ``torchaudio.compliance.kaldi.fbank(wav * scale, num_mel_bins=num_mel_bins, dither=0,
    sample_frequency=16000)`` (energy_floor has no effect: no energy column is output).

    Args:
        wav16k: Mono waveform at 16 kHz.
        num_mel_bins: Mel bins (CAM++: 80).
        scale: Factor applied to the waveform first (1 for ``[-1, 1]`` floats as CAM++, 32768 for int16 range).
    """
    wav = np.ascontiguousarray(wav16k, dtype=np.float32)
    if wav.ndim != 1:
        raise ValueError(f"fbank: expected a mono 1-D waveform, got shape {wav.shape}")
    m = num_frames(len(wav))
    if m == 0:
        return np.zeros((0, num_mel_bins), dtype=np.float32)
    with torch.inference_mode():
        x = torch.from_numpy(wav)
        if scale != 1.0:
            x = x * scale
        frames = x.as_strided((m, FRAME_LENGTH), (FRAME_SHIFT, 1))
        frames = frames - frames.mean(dim=1, keepdim=True)  # remove DC offset
        previous = torch.cat([frames[:, :1], frames[:, :-1]], dim=1)  # x[max(0, j - 1)]
        frames = (frames - PREEMPHASIS * previous) * povey_window()
        frames = torch.nn.functional.pad(frames, (0, PADDED_LENGTH - FRAME_LENGTH))
        power = torch.fft.rfft(frames).abs().pow(2.0)  # [m, 257]
        energies = torch.mm(power, kaldi_mel_banks(num_mel_bins).T)
        out = torch.clamp(energies, min=EPSILON).log()
    return out.numpy()


def campplus_features(wav16k: np.ndarray, num_mel_bins: int = 80, scale: float = 1.0) -> np.ndarray:
    """CAM++ input features: :func:`kaldi_fbank` minus its mean over time (CMN), ``[frames, num_mel_bins]``."""
    feats = kaldi_fbank(wav16k, num_mel_bins=num_mel_bins, scale=scale)
    if len(feats):
        feats = feats - feats.mean(axis=0, keepdims=True)
    return feats.astype(np.float32, copy=False)

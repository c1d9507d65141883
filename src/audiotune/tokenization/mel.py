"""Target mel spectrograms for the flow decoder, computed exactly as CosyVoice does.

CosyVoice (and Matcha-TTS, which it borrows from) computes the flow's target mel as::

    y    = reflect_pad(wav, (n_fft - hop) // 2 on both sides)
    spec = |torch.stft(y, n_fft, hop, win, hann(win), center=center, onesided=True)|
           (magnitude as sqrt(re² + im² + 1e-9))
    mel  = slaney_mel_filterbank(sr, n_fft, n_mels, fmin, fmax) @ spec
    out  = log(clamp(mel, min=1e-5))

:class:`MelExtractor` reproduces that for one utterance at a time and returns
``[frames, n_mels]`` float32. With ``center=False`` (both CosyVoice presets) the padding makes
the frame count ``n_samples // hop_length``, so a mel frame lines up with ``hop_length`` samples
(see :meth:`MelExtractor.num_frames`).

The extractor runs single-threaded per call; the tokenize stage sets the torch thread count and
parallelises across processes.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

MEL_FORMAT = "cosyvoice-log-mel"
LOG_FLOOR = 1e-5  # log(clamp(mel, min=LOG_FLOOR)), as CosyVoice's spectral_normalize_torch
MAG_EPS = 1e-9  # sqrt(re² + im² + MAG_EPS), as CosyVoice's mel_spectrogram
_FIELDS = ("sample_rate", "n_fft", "hop_length", "win_length", "n_mels", "fmin", "fmax", "center")


class MelExtractor:
    """CosyVoice's log-mel spectrogram (Matcha-style ``mel_spectrogram``) for one waveform.

    Args:
        sample_rate: Rate the waveform is at (Hz); callers resample before calling.
        n_fft: FFT size.
        hop_length: Hop between frames (samples).
        win_length: Hann window length (samples, at most ``n_fft``).
        n_mels: Number of mel bins.
        fmin: Lowest filter frequency (Hz).
        fmax: Highest filter frequency (Hz); ``None`` means ``sample_rate / 2``.
        center: ``torch.stft``'s ``center`` (CosyVoice uses ``False``).
    """

    def __init__(self, sample_rate: int, n_fft: int, hop_length: int, win_length: int, n_mels: int,
                 fmin: float = 0.0, fmax: float | None = None, center: bool = False) -> None:
        if not (0 < hop_length <= n_fft and 0 < win_length <= n_fft):
            raise ValueError(f"mel: need 0 < hop_length ({hop_length}) <= n_fft ({n_fft}) and "
                             f"0 < win_length ({win_length}) <= n_fft")
        if fmax is not None and not fmin < fmax <= sample_rate / 2:
            raise ValueError(f"mel: need fmin ({fmin}) < fmax ({fmax}) <= sample_rate / 2 ({sample_rate / 2})")
        import librosa

        self.sample_rate = int(sample_rate)
        self.n_fft = int(n_fft)
        self.hop_length = int(hop_length)
        self.win_length = int(win_length)
        self.n_mels = int(n_mels)
        self.fmin = float(fmin)
        self.fmax = None if fmax is None else float(fmax)
        self.center = bool(center)
        self.pad = (self.n_fft - self.hop_length) // 2  # int((n_fft - hop) / 2) in CosyVoice
        fb = librosa.filters.mel(sr=self.sample_rate, n_fft=self.n_fft, n_mels=self.n_mels, fmin=self.fmin,
                                 fmax=self.fmax, htk=False, norm="slaney")
        self.filterbank = torch.from_numpy(np.ascontiguousarray(fb, dtype=np.float32))  # [n_mels, n_fft//2+1]
        # FFT bins above the last non-zero filter weight add exact zeros: skip them (fmax=8000 at 22.05 kHz
        # leaves ~370 of 513 bins). The transposed slice is what the matmul reads.
        used = np.nonzero(np.any(fb != 0, axis=0))[0]
        self._bins = int(used[-1]) + 1 if len(used) else 1
        self._fb_t = self.filterbank[:, : self._bins].T.contiguous()  # [bins, n_mels]
        self.window = torch.hann_window(self.win_length)  # periodic, as torch.hann_window(win_size)

    @classmethod
    def from_config(cls, mel_cfg: Any) -> MelExtractor:
        """Build from a :class:`audiotune.config.MelConfig` (its preset with explicit fields applied)."""
        return cls(**mel_cfg.resolved())

    def to_dict(self) -> dict[str, Any]:
        """The settings as saved in the Tokens artifact (``tokenizer/mel.json``)."""
        out: dict[str, Any] = {"format": MEL_FORMAT}
        out.update({key: getattr(self, key) for key in _FIELDS})
        out.update(log_floor=LOG_FLOOR, filterbank="librosa-slaney", window="hann")
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MelExtractor:
        """Rebuild from :meth:`to_dict`'s output (or a bare ``MelConfig.resolved()`` dict)."""
        fmt = data.get("format", MEL_FORMAT)
        if fmt != MEL_FORMAT:
            raise ValueError(f"mel.json: format {fmt!r} is not {MEL_FORMAT!r}; this Tokens artifact was written "
                             "by an incompatible mel extractor")
        missing = [key for key in _FIELDS if key not in data and key != "fmax"]
        if missing:
            raise ValueError(f"mel.json: missing field(s) {missing}")
        return cls(**{key: data.get(key) for key in _FIELDS})

    def frames_per_second(self) -> float:
        """Mel frames per second of audio (``sample_rate / hop_length``)."""
        return self.sample_rate / self.hop_length

    def num_frames(self, n_samples: int) -> int:
        """Frames :meth:`__call__` returns for ``n_samples`` samples.

        With ``p = (n_fft - hop) // 2`` of reflect padding on each side, ``torch.stft`` gives
        ``1 + (n + 2p - n_fft) // hop`` frames for ``center=False`` (``n_fft // 2`` more padding on
        each side for ``center=True``); never fewer than 0. When ``n_fft - hop`` is even (both
        CosyVoice presets) and ``center=False`` this is exactly ``n_samples // hop_length``.
        """
        padded = n_samples + 2 * self.pad + (2 * (self.n_fft // 2) if self.center else 0)
        if padded < self.n_fft:
            return 0
        return 1 + (padded - self.n_fft) // self.hop_length

    def __call__(self, wav: np.ndarray) -> np.ndarray:
        """Log-mel ``[frames, n_mels]`` float32 of a mono waveform at :attr:`sample_rate`.

        Audio too short for one frame gives an empty ``[0, n_mels]`` array. Audio shorter than the
        reflect padding (which ``torch``'s reflect pad rejects) is padded by repeated reflection.
        """
        wav = np.asarray(wav, dtype=np.float32)
        if wav.ndim != 1:
            raise ValueError(f"mel: expected a mono 1-D waveform, got shape {wav.shape}")
        frames = self.num_frames(len(wav))
        if frames == 0:
            return np.zeros((0, self.n_mels), dtype=np.float32)
        # CosyVoice's reflect padding, then (center=True) torch.stft's own reflect padding of the result,
        # both done here so that audio shorter than a padding is reflected repeatedly instead of rejected.
        for pad in (self.pad, self.n_fft // 2 if self.center else 0):
            if pad:
                wav = np.pad(wav, (pad, pad), mode="reflect" if len(wav) > 1 else "edge")
        with torch.inference_mode():
            spec = torch.stft(torch.from_numpy(wav), self.n_fft, hop_length=self.hop_length,
                              win_length=self.win_length, window=self.window, center=False,
                              normalized=False, onesided=True, return_complex=True)
            spec = spec.T[:, : self._bins]  # [frames, bins]; stft's output is frame-major in memory
            mag = (spec.real.square() + spec.imag.square()).add_(MAG_EPS).sqrt_()
            out = torch.matmul(mag, self._fb_t).clamp_(min=LOG_FLOOR).log_()  # [frames, n_mels]
        return out.numpy()

    def batch(self, wavs: Iterable[np.ndarray]) -> list[np.ndarray]:
        """:meth:`__call__` on each waveform (lengths differ, so no padding into one tensor)."""
        return [self(w) for w in wavs]

    def __repr__(self) -> str:
        fields = ", ".join(f"{key}={getattr(self, key)!r}" for key in _FIELDS)
        return f"MelExtractor({fields})"


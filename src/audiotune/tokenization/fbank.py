"""Kaldi log mel filterbank features, as CAM++ speaker models (3D-Speaker, CosyVoice) expect.

CosyVoice's frontend (``cosyvoice/cli/frontend.py::_extract_spk_embedding``, and Step-Audio-EditX's
``extract_spk_embedding``) computes, on the 16 kHz waveform in ``[-1, 1]``::

    feat = torchaudio.compliance.kaldi.fbank(speech, num_mel_bins=80, dither=0, sample_frequency=16000)
    feat = feat - feat.mean(dim=0, keepdim=True)

and feeds ``feat[None]`` to ``campplus.onnx``. We compute the same Kaldi fbank with
`kaldi-native-fbank <https://github.com/csukuangfj/kaldi-native-fbank>`_ (a maintained, torch-free
C++ implementation of Kaldi's ``compute-fbank-feats``), with the options torchaudio's defaults
amount to: 25 ms frames (400 samples) every 10 ms (160) with ``snip_edges`` (only whole frames,
``1 + (n - 400) // 160``, none when ``n < 400``); DC offset removed; pre-emphasis 0.97; Povey window;
FFT padded to 512; power spectrum; ``num_mel_bins`` Kaldi triangular mel banks from 20 Hz to Nyquist;
``log(max(energy, float32 eps))``; no dither, no energy column. Its frames agree with torchaudio's
to a few 1e-4 in the log domain (float32 rounding in a different order).

Scale: 3D-Speaker and CosyVoice feed floats in ``[-1, 1]`` (``scale=1``); some Kaldi recipes feed
int16-range samples (``scale=32768``). After mean normalisation the two differ only in bins that hit
the epsilon floor, since scaling adds the constant ``2·ln(scale)`` to every other value.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

SAMPLE_RATE = 16000
FRAME_LENGTH = 400  # 25 ms at 16 kHz
FRAME_SHIFT = 160  # 10 ms at 16 kHz
EPSILON = float(np.finfo(np.float32).eps)  # floor before the log, as Kaldi


def mel_scale(freq: np.ndarray | float) -> np.ndarray | float:
    """Kaldi's mel scale: ``1127 · ln(1 + f / 700)``."""
    return 1127.0 * np.log(1.0 + np.asarray(freq) / 700.0)


def inverse_mel_scale(mel: np.ndarray | float) -> np.ndarray | float:
    """Hz of a Kaldi mel value."""
    return 700.0 * (np.exp(np.asarray(mel) / 1127.0) - 1.0)


def num_frames(n_samples: int) -> int:
    """Frames :func:`kaldi_fbank` gives for ``n_samples`` at 16 kHz: ``1 + (n - 400) // 160``, or 0."""
    return 0 if n_samples < FRAME_LENGTH else 1 + (n_samples - FRAME_LENGTH) // FRAME_SHIFT


def fbank_options(num_mel_bins: int = 80):
    """The ``kaldi_native_fbank.FbankOptions`` of CosyVoice's call (torchaudio's defaults, ``dither=0``)."""
    import kaldi_native_fbank as knf

    opts = knf.FbankOptions()
    frame = opts.frame_opts
    frame.samp_freq, frame.dither, frame.snip_edges = float(SAMPLE_RATE), 0.0, True
    frame.frame_length_ms, frame.frame_shift_ms = 25.0, 10.0
    frame.preemph_coeff, frame.remove_dc_offset, frame.window_type = 0.97, True, "povey"
    frame.round_to_power_of_two = True
    mel = opts.mel_opts
    mel.num_bins, mel.low_freq, mel.high_freq, mel.is_librosa, mel.htk_mode = num_mel_bins, 20.0, 0.0, False, False
    opts.use_energy, opts.use_log_fbank, opts.use_power, opts.htk_compat = False, True, True, False
    return opts


@lru_cache(maxsize=8)
def kaldi_mel_banks(num_bins: int = 80) -> torch.Tensor:
    """Kaldi's triangular mel filters ``[num_bins, 257]`` (float32; the Nyquist column is 0)."""
    import kaldi_native_fbank as knf

    opts = fbank_options(num_bins)
    return torch.from_numpy(np.asarray(knf.MelBanks(opts.mel_opts, opts.frame_opts, 1.0).get_matrix(), np.float32))


def kaldi_fbank(wav16k: np.ndarray, num_mel_bins: int = 80, scale: float = 1.0) -> np.ndarray:
    """Log mel filterbank ``[frames, num_mel_bins]`` float32 of 16 kHz mono audio, no mean normalisation.

    The features of ``torchaudio.compliance.kaldi.fbank(wav * scale, num_mel_bins=num_mel_bins,
    dither=0, sample_frequency=16000)``, computed by kaldi-native-fbank.

    Args:
        wav16k: Mono waveform at 16 kHz.
        num_mel_bins: Mel bins (CAM++: 80).
        scale: Factor applied to the waveform first (1 for ``[-1, 1]`` floats as CAM++, 32768 for int16 range).
    """
    import kaldi_native_fbank as knf

    wav = np.ascontiguousarray(wav16k, dtype=np.float32)
    if wav.ndim != 1:
        raise ValueError(f"fbank: expected a mono 1-D waveform, got shape {wav.shape}")
    if num_frames(len(wav)) == 0:
        return np.zeros((0, num_mel_bins), dtype=np.float32)
    if scale != 1.0:
        wav = wav * np.float32(scale)
    extractor = knf.OnlineFbank(fbank_options(num_mel_bins))
    extractor.accept_waveform(float(SAMPLE_RATE), wav)
    extractor.input_finished()
    return np.stack([np.asarray(extractor.get_frame(i), dtype=np.float32)
                     for i in range(extractor.num_frames_ready)])


def campplus_features(wav16k: np.ndarray, num_mel_bins: int = 80, scale: float = 1.0) -> np.ndarray:
    """CAM++ input features: :func:`kaldi_fbank` minus its mean over time, ``[frames, num_mel_bins]``."""
    feats = kaldi_fbank(wav16k, num_mel_bins=num_mel_bins, scale=scale)
    if len(feats):
        feats = feats - feats.mean(axis=0, keepdims=True)
    return feats.astype(np.float32, copy=False)

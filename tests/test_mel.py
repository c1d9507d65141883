"""Flow target mels (CosyVoice's mel_spectrogram) and the Kaldi fbank CAM++ reads."""

from __future__ import annotations

import json
import math

import librosa
import numpy as np
import pytest

from audiotune.config import MEL_PRESETS, MelConfig
from audiotune.tokenization import fbank
from audiotune.tokenization.mel import LOG_FLOOR, MelExtractor

CUSTOM = dict(sample_rate=16000, n_fft=512, hop_length=160, win_length=400, n_mels=40, fmin=50.0, fmax=7000.0,
              center=True)
SETUPS = {**MEL_PRESETS, "custom-centre": CUSTOM,
          "odd-padding": dict(CUSTOM, n_fft=512, hop_length=161, win_length=512, center=False)}


def _noise(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(n) / 16000
    return (0.2 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(n)).astype(np.float32)


def _reference_mel(wav: np.ndarray, p: dict) -> np.ndarray:
    """CosyVoice's recipe written with librosa, in float64."""
    pad = int((p["n_fft"] - p["hop_length"]) / 2)
    y = np.pad(wav.astype(np.float64), (pad, pad), mode="reflect")
    spec = librosa.stft(y, n_fft=p["n_fft"], hop_length=p["hop_length"], win_length=p["win_length"],
                        window="hann", center=p["center"], pad_mode="reflect")
    mag = np.sqrt(spec.real ** 2 + spec.imag ** 2 + 1e-9)
    fb = librosa.filters.mel(sr=p["sample_rate"], n_fft=p["n_fft"], n_mels=p["n_mels"], fmin=p["fmin"],
                             fmax=p["fmax"], htk=False, norm="slaney")
    return np.log(np.maximum(fb @ mag, LOG_FLOOR)).T


@pytest.mark.parametrize("preset", ["cosyvoice-300m", "cosyvoice2"])
@pytest.mark.parametrize("offset", [-1, 0, 1, 137])
def test_preset_frame_count_is_samples_over_hop(preset: str, offset: int) -> None:
    mel_x = MelExtractor.from_config(MelConfig(preset=preset))
    n = 40 * mel_x.hop_length + offset
    mel = mel_x(_noise(n))
    assert mel.shape == (n // mel_x.hop_length, 80) == (mel_x.num_frames(n), mel_x.n_mels)
    assert mel.dtype == np.float32 and np.isfinite(mel).all()
    assert mel_x.frames_per_second() == pytest.approx(mel_x.sample_rate / mel_x.hop_length)


@pytest.mark.parametrize("name", sorted(SETUPS))
def test_matches_librosa_reference(name: str) -> None:
    p = SETUPS[name]
    mel_x = MelExtractor(**p)
    wav = _noise(int(0.7 * p["sample_rate"]) + 3, seed=1)
    mel = mel_x(wav)
    ref = _reference_mel(wav, p)
    assert mel.shape == ref.shape == (mel_x.num_frames(len(wav)), p["n_mels"])
    np.testing.assert_allclose(mel, ref, atol=1e-4, rtol=0)


def test_silence_sits_on_the_log_floor() -> None:
    mel_x = MelExtractor.from_config(MelConfig())
    mel = mel_x(np.zeros(22050, dtype=np.float32))
    floor_mag = math.sqrt(1e-9)  # |X| of silence, from the epsilon under the square root
    expected = np.log(np.maximum(mel_x.filterbank.numpy().sum(1) * floor_mag, LOG_FLOOR))
    np.testing.assert_allclose(mel, np.broadcast_to(expected, mel.shape), atol=1e-5)
    assert mel.min() == pytest.approx(math.log(LOG_FLOOR), abs=1e-6)
    assert (mel >= math.log(LOG_FLOOR) - 1e-6).all()


def test_short_audio() -> None:
    mel_x = MelExtractor.from_config(MelConfig())  # hop 256, reflect padding 384
    assert mel_x(_noise(255)).shape == (0, 80)
    assert mel_x(np.zeros(0, dtype=np.float32)).shape == (0, 80)
    short = mel_x(_noise(300))  # shorter than the padding: reflected more than once
    assert short.shape == (1, 80) and np.isfinite(short).all()
    with pytest.raises(ValueError, match="mono"):
        mel_x(np.zeros((2, 1000), dtype=np.float32))


def test_dict_round_trip_and_config() -> None:
    cfg = MelConfig(preset="cosyvoice2", n_mels=100)
    mel_x = MelExtractor.from_config(cfg)
    assert MelExtractor(**cfg.resolved()).to_dict() == mel_x.to_dict()
    saved = json.loads(json.dumps(mel_x.to_dict()))
    again = MelExtractor.from_dict(saved)
    assert again.to_dict() == mel_x.to_dict() and again.n_mels == 100 and again.fmax == 8000.0
    wav = _noise(24000)
    np.testing.assert_array_equal(again(wav), mel_x(wav))
    assert [m.shape for m in mel_x.batch([wav, wav[:4800]])] == [(50, 100), (10, 100)]
    with pytest.raises(ValueError, match="format"):
        MelExtractor.from_dict({**saved, "format": "other"})
    with pytest.raises(ValueError, match="hop_length"):
        MelExtractor.from_dict({k: v for k, v in saved.items() if k != "hop_length"})


# --- Kaldi fbank (CAM++ input) ---------------------------------------------------------------------


def _kaldi_reference(wav: np.ndarray, num_bins: int = 80) -> np.ndarray:
    """Kaldi's compute-fbank-feats defaults written from its definitions in float64 numpy."""
    n = len(wav)
    m = 1 + (n - 400) // 160
    out = np.empty((m, num_bins))
    k = np.arange(400)
    window = (0.5 - 0.5 * np.cos(2 * np.pi * k / 399)) ** 0.85
    nyq = 8000.0
    mel_lo, mel_hi = 1127 * np.log(1 + 20 / 700), 1127 * np.log(1 + nyq / 700)
    delta = (mel_hi - mel_lo) / (num_bins + 1)
    fft_mel = 1127 * np.log(1 + np.arange(256) * 16000 / 512 / 700)
    banks = np.zeros((num_bins, 257))
    for b in range(num_bins):
        left, centre, right = (mel_lo + (b + i) * delta for i in range(3))
        banks[b, :256] = np.maximum(0, np.minimum((fft_mel - left) / (centre - left),
                                                  (right - fft_mel) / (right - centre)))
    for i in range(m):
        frame = wav[i * 160: i * 160 + 400].astype(np.float64)
        frame = frame - frame.mean()
        frame = frame - 0.97 * np.concatenate([frame[:1], frame[:-1]])
        power = np.abs(np.fft.rfft(frame * window, n=512)) ** 2
        out[i] = np.log(np.maximum(banks @ power, np.finfo(np.float32).eps))
    return out


@pytest.mark.parametrize("n", [399, 400, 559, 560, 16000, 16123])
def test_fbank_frame_count(n: int) -> None:
    feats = fbank.kaldi_fbank(_noise(n))
    assert feats.shape == (fbank.num_frames(n), 80) == ((0 if n < 400 else 1 + (n - 400) // 160), 80)
    assert feats.dtype == np.float32 and np.isfinite(feats).all()


def test_fbank_matches_kaldi_definitions() -> None:
    wav = _noise(8000, seed=3)
    np.testing.assert_allclose(fbank.kaldi_fbank(wav), _kaldi_reference(wav), atol=2e-3, rtol=0)
    scaled = wav * 32768
    np.testing.assert_allclose(fbank.kaldi_fbank(wav, scale=32768.0), _kaldi_reference(scaled), atol=2e-3, rtol=0)


def test_fbank_mel_banks() -> None:
    banks = fbank.kaldi_mel_banks(80).numpy()
    assert banks.shape == (80, 257) and (banks >= 0).all() and (banks[:, -1] == 0).all()
    assert (banks.sum(1) > 0).all() and banks.max() <= 1.0
    assert fbank.mel_scale(1000.0) == pytest.approx(1000.0, abs=0.1)
    assert fbank.inverse_mel_scale(fbank.mel_scale(3000.0)) == pytest.approx(3000.0)
    peaks = banks.argmax(1)
    assert (np.diff(peaks) >= 0).all()  # filters rise in frequency


@pytest.mark.parametrize("freq", [300.0, 1000.0, 4000.0])
def test_fbank_tone_peaks_in_its_bin(freq: float) -> None:
    t = np.arange(16000) / 16000
    feats = fbank.kaldi_fbank((0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32))
    mel_lo, mel_hi = fbank.mel_scale(20.0), fbank.mel_scale(8000.0)
    centres = fbank.inverse_mel_scale(mel_lo + (np.arange(80) + 1) * (mel_hi - mel_lo) / 81)
    assert abs(int(feats.mean(0).argmax()) - int(np.abs(centres - freq).argmin())) <= 1


def test_campplus_features_are_mean_normalised_and_scale_free() -> None:
    wav = _noise(16000, seed=4)
    feats = fbank.campplus_features(wav)
    assert feats.shape == (98, 80) and np.abs(feats.mean(0)).max() < 1e-4
    np.testing.assert_allclose(fbank.campplus_features(wav, scale=32768.0), feats, atol=1e-3)
    silence = fbank.kaldi_fbank(np.zeros(1600, dtype=np.float32))
    np.testing.assert_allclose(silence, math.log(fbank.EPSILON), rtol=1e-6)
    assert fbank.campplus_features(np.zeros(100, dtype=np.float32)).shape == (0, 80)


def test_centred_short_audio() -> None:
    mel_x = MelExtractor(**CUSTOM)  # center=True: torch.stft's padding would reject 10 samples
    mel = mel_x(_noise(10))
    assert mel.shape == (mel_x.num_frames(10), 40) == (3, 40) and np.isfinite(mel).all()

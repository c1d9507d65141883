"""CAM++ features through kaldi-native-fbank, against frames it produced (tests/fixtures/fbank/).

The stored frames were computed by kaldi-native-fbank 1.23.0 with :func:`fbank.fbank_options` from the
chirp below; a changed option or a library release that computes other numbers fails here. That
those frames are Kaldi's fbank is checked against Kaldi's definitions in tests/test_mel.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from audiotune.tokenization import fbank

STORED = Path(__file__).parent / "fixtures" / "fbank" / "knf-1.23.0-frames.npy"


def chirp() -> np.ndarray:
    """0.5 s at 16 kHz: a 150 Hz → 1.6 kHz chirp, a 3.1 kHz tone and a faint fast chirp (no RNG)."""
    t = np.arange(8123, dtype=np.float64) / 16000
    return (0.3 * np.sin(2 * np.pi * (150 * t + 1500 * t ** 2)) + 0.05 * np.sin(2 * np.pi * 3100 * t)
            + 0.01 * np.sin(2 * np.pi * 7000 * t * t)).astype(np.float32)


def test_fbank_gives_the_stored_kaldi_native_fbank_frames():
    frames = np.load(STORED)
    ours = fbank.kaldi_fbank(chirp())
    assert ours.shape == frames.shape == (fbank.num_frames(8123), 80) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, frames, rtol=0, atol=1e-5)


def test_campplus_features_are_cosyvoice_frontend_mean_normalised_frames():
    frames = np.load(STORED)
    np.testing.assert_allclose(fbank.campplus_features(chirp()), frames - frames.mean(0, keepdims=True),
                               rtol=0, atol=1e-5)
    # a prefix is framed the same way (snip_edges: whole frames only, no padding at the end)
    np.testing.assert_allclose(fbank.kaldi_fbank(chirp()[:4000]), frames[:fbank.num_frames(4000)], rtol=0, atol=1e-5)

"""The demo corpus generator: both backends write a valid, non-silent, multi-speaker corpus."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import soundfile as sf

from examples.make_corpus import make_corpus


def _check(manifest, speakers, utts):
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert len(rows) == speakers * utts
    assert len({r["speaker_id"] for r in rows}) == speakers
    assert len({r["id"] for r in rows}) == len(rows)
    assert any("edit_type" in r and "prompt_audio_path" in r for r in rows)
    for r in rows:
        wav, sr = sf.read(manifest.parent / r["target_audio_path"])
        assert sr == 22050 and 0.5 < len(wav) / sr < 12 and np.abs(wav).max() > 0.05
    return rows


def test_synth_backend_is_deterministic(tmp_path):
    a = make_corpus(tmp_path / "a", n_speakers=3, utts_per_speaker=4, backend="synth", seed=1)
    b = make_corpus(tmp_path / "b", n_speakers=3, utts_per_speaker=4, backend="synth", seed=1)
    rows = _check(a, 3, 4)
    assert a.read_text() == b.read_text()
    for r in rows:
        assert (a.parent / r["target_audio_path"]).read_bytes() == (b.parent / r["target_audio_path"]).read_bytes()


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")
def test_espeak_backend(tmp_path):
    rows = _check(make_corpus(tmp_path / "c", n_speakers=3, utts_per_speaker=3, backend="espeak"), 3, 3)
    assert any(any(ch.isdigit() for ch in r["target_text"]) for r in rows)  # the pinyin speaker

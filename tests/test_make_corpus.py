"""The demo corpus generator: both backends write a valid, non-silent, multi-speaker corpus."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import soundfile as sf

from examples.make_corpus import main, make_corpus


def _check(manifest, speakers, utts, sample_rate=22050):
    """Parse the manifest and check every row and WAV; return the rows."""
    rows = [json.loads(line) for line in manifest.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == speakers * utts
    assert len({r["speaker_id"] for r in rows}) == speakers
    assert len({r["id"] for r in rows}) == len(rows)
    assert any("edit_type" in r and "prompt_audio_path" in r for r in rows)
    by_path = {r["target_audio_path"]: r for r in rows}
    for r in rows:
        assert {"id", "target_audio_path", "target_text", "speaker_id"} <= r.keys()
        wav, sr = sf.read(manifest.parent / r["target_audio_path"])
        assert sr == sample_rate and wav.ndim == 1
        assert 0.8 < len(wav) / sr < 8 and np.abs(wav).max() > 0.05 and np.sqrt(np.mean(wav**2)) > 0.01
        if "edit_type" in r:  # the prompt is another utterance of the same speaker
            prompt = by_path[r["prompt_audio_path"]]
            assert prompt["speaker_id"] == r["speaker_id"] and prompt["id"] != r["id"]
            assert r["prompt_text"] == prompt["target_text"] and r["edit_type"] in ("emotion", "speed", "style")
    return rows


def test_synth_backend_is_deterministic(tmp_path):
    a = make_corpus(tmp_path / "a", n_speakers=3, utts_per_speaker=4, backend="synth", seed=1)
    b = make_corpus(tmp_path / "b", n_speakers=3, utts_per_speaker=4, backend="synth", seed=1)
    rows = _check(a, 3, 4)
    assert a.read_text() == b.read_text()
    for r in rows:
        assert (a.parent / r["target_audio_path"]).read_bytes() == (b.parent / r["target_audio_path"]).read_bytes()
    assert any(any(ch.isdigit() for ch in r["target_text"]) for r in rows)  # the pinyin speaker
    c = make_corpus(tmp_path / "c", n_speakers=3, utts_per_speaker=4, backend="synth", seed=2)
    assert c.read_text() != a.read_text()


def test_synth_audio_follows_the_text(tmp_path):
    rows = _check(make_corpus(tmp_path, n_speakers=2, utts_per_speaker=6, backend="synth", mandarin=False), 2, 6)
    assert not any(any(ch.isdigit() for ch in r["target_text"]) for r in rows)
    words = np.array([len(r["target_text"].split()) for r in rows])
    secs = np.array([sf.info(tmp_path / r["target_audio_path"]).duration for r in rows])
    assert np.corrcoef(words, secs)[0, 1] > 0.7  # longer sentences, longer audio
    assert 0.2 < (secs / words).mean() < 0.45


def test_cli_overwrites_an_existing_corpus(tmp_path):
    assert main(["--out", str(tmp_path), "--speakers", "2", "--utts", "5", "--backend", "synth"]) == 0
    assert main(["--out", str(tmp_path), "--speakers", "2", "--utts", "3", "--backend", "synth",
                 "--sample-rate", "16000", "--no-mandarin", "--edit-fraction", "1"]) == 0
    rows = _check(tmp_path / "manifest.jsonl", 2, 3, sample_rate=16000)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.wav")) == sorted(
        r["target_audio_path"] for r in rows)
    assert all("edit_type" in r for r in rows if not r["id"].endswith("_000"))


@pytest.mark.parametrize("kwargs", [{"backend": "festival"}, {"n_speakers": 0}, {"edit_fraction": 1.5}])
def test_bad_arguments_are_rejected(tmp_path, kwargs):
    with pytest.raises(ValueError):
        make_corpus(tmp_path, **kwargs)


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")
def test_espeak_backend(tmp_path):
    rows = _check(make_corpus(tmp_path / "c", n_speakers=3, utts_per_speaker=3, backend="espeak",
                              sample_rate=16000), 3, 3, sample_rate=16000)
    assert any(any(ch.isdigit() for ch in r["target_text"]) for r in rows)  # the pinyin speaker

"""Audio tokenizers: mel k-means (fit, determinism, frame counts, residual codebooks, state),
the S3 ONNX tokenizer with a tiny self-built model, and precomputed codes (meta and MOSS-TTSD shards)."""

from __future__ import annotations

import json
import logging
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from audiotune.config import AudioTokenizerConfig
from audiotune.tokenization.audio_tokenizers import (
    CodesOutOfRange,
    MelKMeansTokenizer,
    PrecomputedTokenizer,
    RowError,
    S3Tokenizer,
    TokenizerError,
    build_audio_tokenizer,
    iter_moss_shards,
    load_audio_tokenizer,
)
from audiotune.tokenization.audio_tokenizers.mel_kmeans import quantization_error
from audiotune.tokenization.audio_tokenizers.precomputed import MOSS_AUDIO_OFFSET, MOSS_PAD

SR = 16000


def _utterance(rng: np.random.Generator, seconds: float, sr: int = SR) -> np.ndarray:
    """A gliding tone with harmonics and noise: varied enough for k-means to have work to do."""
    t = np.arange(int(seconds * sr)) / sr
    f0 = rng.uniform(90, 300) * (1 + 0.3 * np.sin(2 * np.pi * rng.uniform(0.3, 2) * t))
    phase = 2 * np.pi * np.cumsum(f0) / sr
    wav = sum(0.2 / k * np.sin(k * phase) for k in (1, 2, 3)) + 0.02 * rng.normal(size=len(t))
    return (wav * (0.5 + 0.5 * np.abs(np.sin(2 * np.pi * t)))).astype(np.float32)


@pytest.fixture(scope="module")
def wavs() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [_utterance(rng, rng.uniform(1.0, 3.0)) for _ in range(12)]


def _fitted(wavs, seed=0, **kw) -> MelKMeansTokenizer:
    kw = {"codebook_size": 32, "fit_max_frames": 2000, "fit_iters": 10, **kw}
    tok = MelKMeansTokenizer(**kw)
    tok.fit(wavs, SR, seed)
    return tok


# -- mel k-means ----------------------------------------------------------------------------------


def test_mel_kmeans_is_deterministic_for_a_seed(wavs):
    a, b = _fitted(wavs, seed=3), _fitted(wavs, seed=3)
    for ca, cb in zip(a.codebooks, b.codebooks, strict=True):
        assert np.array_equal(ca.numpy(), cb.numpy())
    for wav in wavs[:4]:
        codes = a.encode(wav, SR)
        assert codes.dtype == np.int32
        assert np.array_equal(codes, b.encode(wav, SR))
    other = _fitted(wavs, seed=4)
    assert not np.array_equal(a.codebooks[0].numpy(), other.codebooks[0].numpy())


@pytest.mark.parametrize("rate", [25, 50])
@pytest.mark.parametrize("seconds,sr", [(1.0, 16000), (1.234, 16000), (2.71, 24000), (0.05, 22050), (0.01, 16000)])
def test_mel_kmeans_frames_are_floor_duration_times_rate(wavs, rate, seconds, sr):
    tok = _fitted(wavs, token_rate=rate)
    wav = _utterance(np.random.default_rng(1), seconds, sr)
    codes = tok.encode(wav, sr)
    expected = int(np.floor(len(wav) / sr * rate + 1e-9))
    assert codes.shape == (1, expected) == (1, tok.num_frames(len(wav), sr))
    assert codes.min(initial=0) >= 0 and codes.max(initial=0) < tok.codebook_size


def test_residual_codebooks_shape_and_error(wavs):
    one = _fitted(wavs, num_codebooks=1)
    three = _fitted(wavs, num_codebooks=3)
    assert np.array_equal(one.codebooks[0].numpy(), three.codebooks[0].numpy())
    codes = three.encode(wavs[0], SR)
    assert codes.shape == (3, three.num_frames(len(wavs[0]), SR))
    err1 = np.mean([quantization_error(one, w, SR) for w in wavs])
    err3 = np.mean([quantization_error(three, w, SR) for w in wavs])
    assert err3 < 0.8 * err1


def test_mel_kmeans_save_load_round_trip(wavs, tmp_path):
    tok = _fitted(wavs, num_codebooks=2)
    tok.save(tmp_path / "tok")
    state = json.loads((tmp_path / "tok" / "audio_tokenizer.json").read_text())
    assert state["type"] == "mel-kmeans" and state["params"]["codebook_sizes"] == [32, 32]
    assert not list((tmp_path / "tok").glob("*.pkl")) and not list((tmp_path / "tok").glob("*.pt"))
    loaded = load_audio_tokenizer(tmp_path / "tok")
    assert isinstance(loaded, MelKMeansTokenizer)
    for wav in wavs[:3]:
        assert np.array_equal(loaded.encode(wav, SR), tok.encode(wav, SR))


def test_mel_kmeans_reduces_k_to_distinct_frames(caplog):
    wav = _utterance(np.random.default_rng(2), 0.5)  # 12 frames at 25 Hz
    tok = MelKMeansTokenizer(codebook_size=64)
    with caplog.at_level(logging.WARNING):
        tok.fit([wav], SR, seed=0)
    assert tok.codebook_size == 12 and tok.params()["codebook_sizes"] == [12]
    assert "reduced" in caplog.text
    assert len(np.unique(tok.encode(wav, SR))) == 12


def test_mel_kmeans_refuses_to_encode_unfitted_and_bad_rate():
    with pytest.raises(TokenizerError, match="not fitted"):
        MelKMeansTokenizer().encode(np.zeros(SR, dtype=np.float32), SR)
    with pytest.raises(TokenizerError, match="token_rate"):
        MelKMeansTokenizer(token_rate=200)


def test_build_from_config(tmp_path):
    tok = build_audio_tokenizer(AudioTokenizerConfig(token_rate=50, codebook_size=16, num_codebooks=2))
    assert isinstance(tok, MelKMeansTokenizer) and (tok.token_rate, tok.num_codebooks) == (50, 2)
    with pytest.raises(TokenizerError, match="onnx_path"):
        build_audio_tokenizer(AudioTokenizerConfig(type="s3tokenizer"))
    with pytest.raises(TokenizerError, match="none"):
        build_audio_tokenizer(AudioTokenizerConfig(type="none"))


# -- S3 tokenizer (ONNX) --------------------------------------------------------------------------


def _tiny_s3_onnx(path: Path, step: int) -> Path:
    """feats [1,128,T] + feats_length [1] → codes [1, ceil(len/step)] int64: every step-th frame's mean, scaled."""
    import onnx
    from onnx import TensorProto, helper

    const = lambda name, values, dtype=TensorProto.INT64: helper.make_node(  # noqa: E731
        "Constant", [], [name], value=helper.make_tensor(name, dtype, [len(values)], values)
    )
    nodes = [
        const("starts", [0]), const("axes", [2]), const("steps", [step]),
        const("scale", [1000.0], TensorProto.FLOAT), const("vocab", [4096]),
        helper.make_node("Cast", ["feats_length"], ["ends"], to=TensorProto.INT64),
        helper.make_node("Slice", ["feats", "starts", "ends", "axes", "steps"], ["picked"]),
        helper.make_node("ReduceMean", ["picked"], ["mean"], axes=[1], keepdims=0),
        helper.make_node("Mul", ["mean", "scale"], ["scaled"]),
        helper.make_node("Cast", ["scaled"], ["ints"], to=TensorProto.INT64),
        helper.make_node("Mod", ["ints", "vocab"], ["codes"], fmod=0),
    ]
    graph = helper.make_graph(
        nodes, "tiny_s3",
        [helper.make_tensor_value_info("feats", TensorProto.FLOAT, [1, 128, "T"]),
         helper.make_tensor_value_info("feats_length", TensorProto.INT32, [1])],
        [helper.make_tensor_value_info("codes", TensorProto.INT64, [1, "Tc"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def s3_v2(tmp_path_factory) -> S3Tokenizer:
    return S3Tokenizer(_tiny_s3_onnx(tmp_path_factory.mktemp("s3") / "tiny.onnx", step=4), "v2")


def _whisper_log_mel_by_the_formula(wav: np.ndarray, n_mels: int) -> np.ndarray:
    """Whisper's documented log-mel re-derived in float64 numpy: reflect-padded frames of 400 samples every 160, a
    periodic Hann window, the power spectrum, slaney mel filters (transformers' filter bank, not librosa's), log10
    clamped at 1e-10, the last frame dropped, floored 8 decades below the maximum, then (x + 4) / 4."""
    from transformers.audio_utils import mel_filter_bank

    n_fft, hop = 400, 160
    padded = np.pad(wav.astype(np.float64), n_fft // 2, mode="reflect")
    starts = np.arange(0, len(padded) - n_fft + 1, hop)
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)
    power = np.abs(np.fft.rfft(padded[starts[:, None] + np.arange(n_fft)] * window, axis=1)) ** 2
    filters = mel_filter_bank(num_frequency_bins=n_fft // 2 + 1, num_mel_filters=n_mels, min_frequency=0.0,
                              max_frequency=8000.0, sampling_rate=SR, norm="slaney", mel_scale="slaney")
    log_spec = np.log10(np.maximum(filters.T @ power.T, 1e-10))[:, :-1]
    return (np.maximum(log_spec, log_spec.max() - 8.0) + 4.0) / 4.0


@pytest.mark.parametrize("n_mels", [80, 128])
@pytest.mark.parametrize("seconds", [1.0, 1.234])
def test_s3_log_mel_equals_whisper_feature_extraction(n_mels, seconds):
    """Golden values from two independent references: transformers' WhisperFeatureExtractor (unpadded), and the
    formula in float64 numpy. A symmetric instead of periodic Hann window is already 0.04 off, HTK mels 1.9."""
    from transformers import WhisperFeatureExtractor

    from audiotune.tokenization.audio_tokenizers.s3tokenizer import log_mel_spectrogram

    wav = _utterance(np.random.default_rng(3), seconds)
    mel = log_mel_spectrogram(wav, n_mels)
    assert mel.shape == (n_mels, len(wav) // 160) and mel.dtype == np.float32
    assert mel.max() - mel.min() <= 2.0 + 1e-6  # clipped to 8 decades, then divided by 4
    extractor = WhisperFeatureExtractor(feature_size=n_mels, sampling_rate=SR)
    ref = extractor(wav, sampling_rate=SR, padding="longest", truncation=False,
                    return_tensors="np")["input_features"][0]
    np.testing.assert_allclose(mel, ref, rtol=1e-5, atol=1e-5 * float(np.abs(ref).max()))
    # float32 STFT against float64: ~2e-5 apart where the power is small
    formula = _whisper_log_mel_by_the_formula(wav, n_mels)
    np.testing.assert_allclose(mel, formula, rtol=0, atol=1e-4)


def test_s3_encode_rate_and_chunking(s3_v2):
    wav = _utterance(np.random.default_rng(4), 2.0)
    codes = s3_v2.encode(wav, SR)
    assert codes.shape == (1, 50) and codes.dtype == np.int32
    long = np.tile(wav, 35)  # 70 s: chunks of 30 + 30 + 10 s
    codes = s3_v2.encode(long, SR)
    assert codes.shape == (1, 70 * 25) == (1, s3_v2.num_frames(len(long), SR))
    # chunk 2 starts on a tile boundary (30 s = 15 tiles), so it repeats chunk 1's first codes
    assert np.array_equal(codes[0, 750:800], codes[0, :50])
    import soxr

    wav24 = soxr.resample(long[: 31 * SR], SR, 24000)
    assert s3_v2.encode(wav24, 24000).shape[1] == s3_v2.num_frames(len(wav24), 24000)


def test_s3_v1_is_50_hz(tmp_path):
    tok = S3Tokenizer(_tiny_s3_onnx(tmp_path / "v1.onnx", step=2), "v1")
    assert tok.encode(_utterance(np.random.default_rng(5), 1.0), SR).shape == (1, 50)


def test_s3_save_copies_model_and_round_trips(s3_v2, tmp_path):
    s3_v2.save(tmp_path / "tok")
    assert (tmp_path / "tok" / "speech_tokenizer_v2.onnx").is_file()
    loaded = load_audio_tokenizer(tmp_path / "tok")
    wav = _utterance(np.random.default_rng(6), 1.5)
    assert isinstance(loaded, S3Tokenizer) and np.array_equal(loaded.encode(wav, SR), s3_v2.encode(wav, SR))


def test_s3_raises_when_model_returns_nothing(s3_v2, monkeypatch):
    monkeypatch.setattr(s3_v2, "_encode_chunk", lambda wav16: np.zeros(0, dtype=np.int64))
    with pytest.raises(TokenizerError, match="no codes"):
        s3_v2.encode(np.ones(SR, dtype=np.float32) * 0.1, SR)


def test_s3_rejects_unreadable_model(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx model")
    with pytest.raises(TokenizerError, match="cannot load"):
        S3Tokenizer(bad)


# -- precomputed codes ----------------------------------------------------------------------------


def test_precomputed_codes_from_meta():
    one = PrecomputedTokenizer(vocab_size=100)
    codes = one.codes_for_row({"id": "a", "meta": json.dumps({"codes": [1, 2, 3]})})
    assert codes.shape == (1, 3) and codes.dtype == np.int32
    assert one.codes_for_row({"id": "b", "meta": "{}"}) is None
    two = PrecomputedTokenizer(num_codebooks=2)
    assert two.codes_for_row({"id": "c", "meta": {"codes": [[1, 2], [3, 40]]}}).tolist() == [[1, 2], [3, 40]]
    assert two.codebook_size == 41  # no vocab_size: 1 + the largest code seen
    with pytest.raises(CodesOutOfRange) as err:
        one.codes_for_row({"id": "d", "meta": {"codes": [5, 100, -1]}})
    assert (err.value.low, err.value.high) == (-1, 100) and "row d" in str(err.value)
    with pytest.raises(RowError, match="codebooks"):
        two.codes_for_row({"id": "e", "meta": {"codes": [1, 2]}})
    with pytest.raises(RowError):
        two.codes_for_row({"id": "f", "meta": {"codes": [[1, 2], [3]]}})
    with pytest.raises(TokenizerError, match="codes_for_row"):
        one.encode(np.zeros(10, dtype=np.float32), SR)


def _moss_record(rng: np.random.Generator, frames: int) -> tuple[dict, np.ndarray]:
    """One record as MOSS-TTSD's data_preprocess.py builds it: text rows, then audio rows, then the end marker."""
    codes = rng.integers(0, 1024, size=(frames, 8))
    text = np.full((6, 8), MOSS_PAD)
    text[:, 0] = rng.integers(0, 150000, size=6)
    audio = codes.copy()
    audio[:, 0] += MOSS_AUDIO_OFFSET
    end = np.full((1, 8), MOSS_PAD)
    end[0, 0] = 151653
    input_ids = np.concatenate([text, audio, end])
    labels = np.concatenate([np.full(text.shape, -100), audio, np.full(end.shape, -100)])
    labels[-1, 0] = end[0, 0]
    return {"input_ids": input_ids.tolist(), "labels": labels.tolist()}, codes.T


def _write_moss(directory: Path, name: str, records: list[dict], audio_lengths: list[int]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    pointers, tokens = [], []
    with open(directory / f"{name}.pkl", "wb") as f:
        for rec in records:
            pointers.append(f.tell())
            pickle.dump(rec, f)
            tokens.append(len(rec["input_ids"]) if isinstance(rec["input_ids"], (list, np.ndarray)) else 0)
    np.save(directory / f"{name}_metas.npy", np.stack([pointers, tokens, audio_lengths]))
    return directory


def test_moss_shards_import(tmp_path):
    rng = np.random.default_rng(7)
    made = [_moss_record(rng, n) for n in (5, 9, 3)]
    records = [r for r, _ in made]
    records[2]["input_ids"] = np.asarray(records[2]["input_ids"])  # arrays inside records load too
    _write_moss(tmp_path / "moss", "part0", records, [5, 9, 3])
    _write_moss(tmp_path / "moss", "part1", [made[0][0]], [4])  # metas disagree: that record is flagged
    out = list(iter_moss_shards(tmp_path / "moss", trust_pickle=True))
    assert [r["source"] for r in out] == ["part0.pkl#0", "part0.pkl#1", "part0.pkl#2", "part1.pkl#0"]
    for rec, (_, codes) in zip(out[:3], made, strict=True):
        assert rec["codes"].dtype == np.int32 and np.array_equal(rec["codes"], codes)
        assert len(rec["text_ids"]) == 7
    assert isinstance(out[3]["error"], RowError) and "codes" not in out[3]
    tok = PrecomputedTokenizer(num_codebooks=8, vocab_size=1024, moss_path=tmp_path / "moss", trust_pickle=True)
    assert sum("codes" in r for r in tok.moss_records()) == 3
    narrow = PrecomputedTokenizer(num_codebooks=8, vocab_size=512, moss_path=tmp_path / "moss", trust_pickle=True)
    assert any(isinstance(r.get("error"), CodesOutOfRange) for r in narrow.moss_records())


def test_moss_refused_without_trust(tmp_path):
    rec, _ = _moss_record(np.random.default_rng(8), 2)
    _write_moss(tmp_path, "d", [rec], [2])
    with pytest.raises(TokenizerError, match="trust_pickle: true"):
        list(iter_moss_shards(tmp_path / "d.pkl", trust_pickle=False))


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_malicious_pickle_refused_even_when_trusted(tmp_path):
    marker = tmp_path / "pwned"
    _write_moss(tmp_path, "evil", [{"input_ids": _Evil(marker)}], [1])
    with pytest.raises(pickle.UnpicklingError, match=r"(posix|os)\.system"):
        list(iter_moss_shards(tmp_path / "evil_metas.npy", trust_pickle=True))
    assert not marker.exists()


def test_precomputed_save_load(tmp_path):
    tok = PrecomputedTokenizer(codes_field="xy", num_codebooks=2, token_rate=12.5, vocab_size=1024)
    tok.save(tmp_path / "tok")
    loaded = load_audio_tokenizer(tmp_path / "tok")
    assert isinstance(loaded, PrecomputedTokenizer)
    assert (loaded.codes_field, loaded.num_codebooks, loaded.token_rate, loaded.codebook_size) == ("xy", 2, 12.5, 1024)

"""Speaker features: the ONNX embedder (with a tiny model built here), the speaker table, mean embeddings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import soxr
from onnx import TensorProto, helper, numpy_helper

from audiotune.config import SpeakerConfig
from audiotune.tokenization.fbank import campplus_features
from audiotune.tokenization.speaker import (
    OnnxSpeakerEmbedder,
    build_speaker_embedder,
    mean_embeddings,
    speaker_table,
)

DIM = 16


def _weight() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((80, DIM)).astype(np.float32)


def _tiny_model(path: Path, out_shape: list) -> Path:
    """feats [1, T, 80] → max over time → MatMul [80, 16] → [1, 16].

    (A mean over time would be all zeros: the features are mean-normalised over time.)
    """
    feats = helper.make_tensor_value_info("feats", TensorProto.FLOAT, [1, "T", 80])
    emb = helper.make_tensor_value_info("embedding", TensorProto.FLOAT, out_shape)
    graph = helper.make_graph(
        [helper.make_node("ReduceMax", ["feats"], ["pooled"], axes=[1], keepdims=0),
         helper.make_node("MatMul", ["pooled", "w"], ["embedding"])],
        "tiny_speaker", [feats], [emb], initializer=[numpy_helper.from_array(_weight(), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _voice(seconds: float, sr: int, f0: float = 180.0, seed: int = 0) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    rng = np.random.default_rng(seed)
    x = sum(np.sin(2 * np.pi * f0 * h * t) / h for h in range(1, 6)) * 0.1 + 0.01 * rng.standard_normal(len(t))
    return x.astype(np.float32)


@pytest.mark.parametrize("out_shape", [[1, DIM], ["B", "D"]], ids=["static", "dynamic"])
def test_onnx_embedder_runs_the_model_on_campplus_features(tmp_path: Path, out_shape: list) -> None:
    embedder = OnnxSpeakerEmbedder(_tiny_model(tmp_path / "spk.onnx", out_shape))
    assert embedder.dim == DIM and embedder.input_name == "feats"
    wav = _voice(1.5, 16000)
    emb = embedder(wav)
    assert emb.shape == (DIM,) and emb.dtype == np.float32
    np.testing.assert_allclose(emb, campplus_features(wav).max(0) @ _weight(), rtol=1e-5, atol=1e-4)


def test_onnx_embedder_resamples_and_pads(tmp_path: Path) -> None:
    embedder = OnnxSpeakerEmbedder(_tiny_model(tmp_path / "spk.onnx", [1, DIM]))
    wav22 = _voice(1.0, 22050, seed=1)
    resampled = soxr.resample(wav22, 22050, 16000, quality="HQ")
    np.testing.assert_allclose(embedder(wav22, sample_rate=22050), embedder(resampled), atol=1e-5)
    assert embedder.features(wav22, 22050).shape == (1, 98, 80)
    assert np.isfinite(embedder(np.zeros(100, dtype=np.float32))).all()  # shorter than one frame


def test_build_speaker_embedder(tmp_path: Path) -> None:
    model = _tiny_model(tmp_path / "spk.onnx", [1, DIM])
    assert build_speaker_embedder(SpeakerConfig(type="none"), None) is None
    assert build_speaker_embedder(SpeakerConfig(type="speaker-id"), str(model)) is None
    assert build_speaker_embedder(SpeakerConfig(type="onnx", onnx_path=str(model)), None).dim == DIM
    remote = SpeakerConfig(type="onnx", onnx_path="s3://bucket/spk.onnx")
    assert build_speaker_embedder(remote, str(model)).dim == DIM
    with pytest.raises(ValueError, match="onnx_path is not set"):
        build_speaker_embedder(SpeakerConfig(type="onnx"), None)
    with pytest.raises(ValueError, match="local copy"):
        build_speaker_embedder(remote, None)
    with pytest.raises(FileNotFoundError, match="missing.onnx"):
        build_speaker_embedder(SpeakerConfig(type="onnx", onnx_path=str(tmp_path / "missing.onnx")), None)


def test_speaker_table_is_sorted_with_unk_first() -> None:
    table = speaker_table(["bob", None, "alice", "", "bob", "<unk>", "carol"])
    assert table == {"<unk>": 0, "alice": 1, "bob": 2, "carol": 3}
    assert speaker_table(["carol", "alice", "bob"]) == table
    assert speaker_table([]) == {"<unk>": 0}


def test_mean_embeddings_are_raw_means() -> None:
    pairs = [("a", np.array([1.0, 0.0])), ("b", np.array([0.0, 4.0])), ("a", np.array([3.0, 2.0])),
             (None, np.array([1.0, 1.0]))]
    means = mean_embeddings(pairs)
    assert list(means) == ["<unk>", "a", "b"]
    np.testing.assert_array_equal(means["a"], [2.0, 1.0])
    np.testing.assert_array_equal(means["b"], [0.0, 4.0])
    assert means["a"].dtype == np.float32
    assert mean_embeddings([]) == {}
    with pytest.raises(ValueError, match="3 values"):
        mean_embeddings([("a", np.zeros(2)), ("a", np.zeros(3))])

"""The tokenize stage end to end on small generated corpora."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from audiotune import storage
from audiotune.artifacts import ArtifactError
from audiotune.cli import main as cli_main
from audiotune.config import load_config
from audiotune.stages.convert import convert
from audiotune.stages.tokenize import tokenize
from audiotune.tokenization.schema import codes_from_row, mel_from_row
from tests.helpers import write_audio, write_jsonl

BASE = ["tracking.enabled=false", "run.num_workers=2", "convert.val_fraction=0.25",
        "tokenize.audio_tokenizer.codebook_size=16", "tokenize.audio_tokenizer.fit_max_frames=2000",
        "tokenize.vocab_size=300"]


def _cfg(*overrides: str):
    return load_config(None, [*BASE, *overrides])


def _rows(art: Path, split: str) -> list[dict]:
    out = []
    for p in sorted((art / split).glob("part-*.parquet")):
        out.extend(pq.read_table(p).to_pylist())
    return out


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """12 utterances of 0.5-2 s at 22.05 kHz, 3 speakers, some with prompts."""
    root = tmp_path_factory.mktemp("corpus")
    rows = []
    for i in range(12):
        rel = f"w/u{i}.wav"
        write_audio(root / rel, seconds=0.5 + 0.13 * i, sr=22050, seed=i, freq=120 + 15 * i)
        row = {"id": f"u{i:02d}", "audio": rel, "text": f"utterance number {i} says hello", "speaker": f"s{i % 3}"}
        if i % 4 == 3:
            row.update(prompt_audio_path="w/u0.wav", prompt_text="utterance number 0 says hello")
        rows.append(row)
    write_jsonl(root / "m.jsonl", rows)
    out = root / "ds"
    convert(_cfg(), source=str(root / "m.jsonl"), output=str(out))
    return out


def test_tokens_artifact(dataset, tmp_path):
    out = tmp_path / "tok"
    result = tokenize(_cfg(), dataset=str(dataset), output=str(out))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kind"] == "audiotune.tokens" and manifest["schema_version"] == 1
    assert manifest["audio_tokenizer"]["type"] == "mel-kmeans"
    rows = _rows(out, "train") + _rows(out, "val")
    assert len(rows) == 12 and result.report["rows"]["quarantined"] == 0
    text_tok = AutoTokenizer.from_pretrained(str(out / "tokenizer"))
    mel_cfg = json.loads((out / "tokenizer" / "mel.json").read_text())
    fps = mel_cfg["sample_rate"] / mel_cfg["hop_length"]
    for row in rows:
        assert text_tok.decode(row["text_ids"]).strip() == f"utterance number {int(row['id'][1:])} says hello"
        codes = codes_from_row(row)
        assert codes.shape[0] == 1 and codes.max() < 16
        assert abs(codes.shape[1] - int(row["duration_s"] * 25)) <= 1
        mel = mel_from_row(row, mel_cfg["n_mels"])
        assert mel.shape == (row["mel_frames"], 80) and np.isfinite(mel).all()
        assert row["mel_frames"] == round(codes.shape[1] * fps / 25)
        assert row["speaker_index"] > 0
        if int(row["id"][1:]) % 4 == 3:
            assert codes_from_row(row, "prompt_codes").shape[0] == 1 and row["prompt_text_ids"]
    report = json.loads((out / "report.json").read_text())
    assert 24 <= report["audio_tokens_per_second"] <= 25.5
    assert 0 < report["codebook_usage"][0]["used_fraction"] <= 1 and report["codebook_usage"][0]["perplexity"] > 1
    assert set(report["sequence_length_percentiles"]) == {"p50", "p90", "p95", "p99", "p100"}
    assert (out / "length_histogram.png").stat().st_size > 1000
    assert result.report["throughput"]["audio_s_per_s"] > 0


def test_deterministic(dataset, tmp_path):
    a = tokenize(_cfg(), dataset=str(dataset), output=str(tmp_path / "a"))
    b = tokenize(_cfg("run.num_workers=1"), dataset=str(dataset), output=str(tmp_path / "b"))
    for split in ("train", "val"):
        assert _rows(tmp_path / "a", split) == _rows(tmp_path / "b", split)
    assert a.manifest["splits"] == b.manifest["splits"]


def test_multi_codebook_and_cosyvoice2_preset(dataset, tmp_path):
    out = tmp_path / "mc"
    tokenize(_cfg("tokenize.audio_tokenizer.num_codebooks=3", "tokenize.mel.preset=cosyvoice2"),
             dataset=str(dataset), output=str(out))
    for row in _rows(out, "train"):
        codes = codes_from_row(row)
        assert codes.shape[0] == 3
        assert row["mel_frames"] == 2 * codes.shape[1]  # 24 kHz / 480 hop = 50 fps, 25 tokens/s


def test_text_only_windows_with_char_tokenizer(tmp_path):
    src = tmp_path / "docs.jsonl.gz"
    with gzip.open(src, "wt", encoding="utf-8") as f:
        f.write(json.dumps({"text": "你好世界。" * 20}) + "\n")
        f.write(json.dumps({"text": "短"}) + "\n")
    convert(_cfg("convert.val_fraction=0"), source=str(src), output=str(tmp_path / "ds"))
    tokenize(_cfg("tokenize.text_tokenizer=char", "tokenize.context_length=32", "tokenize.stride=8"),
             dataset=str(tmp_path / "ds"), output=str(tmp_path / "tok"))
    rows = _rows(tmp_path / "tok", "train")
    long_doc = [r for r in rows if r["source_id"].endswith("-1")]
    assert len(long_doc) == 5  # 101 tokens with eos, windows of 31 (room for the text layout's eos) advancing by 23
    assert all(r["num_text_tokens"] == 31 for r in long_doc)
    assert long_doc[0]["text_ids"][23:] == long_doc[1]["text_ids"][:8]
    assert all(r["audio_codes"] is None and r["mel"] is None for r in rows)


def test_base_model_tokenizer_from_s3_and_output_to_s3(dataset, tmp_path, s3_env):
    from audiotune.tokenization.text import train_bpe

    base = tmp_path / "base-model"
    train_bpe(["a base model vocabulary with utterance number says hello"] * 20, 280).save_pretrained(str(base))
    storage.upload_dir(base, f"{s3_env}/models/base")
    storage.upload_dir(dataset, f"{s3_env}/ds")
    out = f"{s3_env}/tokens"
    tokenize(_cfg(), dataset=f"{s3_env}/ds", output=out, base_model=f"{s3_env}/models/base")
    manifest = json.loads(storage.read_text(f"{out}/manifest.json"))
    assert manifest["text_tokenizer"]["kind"] == "base" and manifest["splits"]["train"]["rows"] > 0
    local = storage.download(out, tmp_path / "down")
    assert len(AutoTokenizer.from_pretrained(str(local / "tokenizer"))) == len(
        AutoTokenizer.from_pretrained(str(base)))


def _bad_dataset(tmp_path: Path, extra: list[dict]) -> Path:
    root = tmp_path / "src"
    rows = []
    for i in range(8):
        write_audio(root / f"u{i}.wav", seconds=1.0, sr=22050, seed=i)
        rows.append({"id": f"u{i}", "audio": f"u{i}.wav", "text": f"row {i}", "codes": [[i % 5] * 25]})
    write_audio(root / "tiny.wav", seconds=0.02, sr=22050)
    write_jsonl(root / "m.jsonl", rows + extra)
    convert(_cfg("convert.val_fraction=0", "convert.min_duration_s=0"), source=str(root / "m.jsonl"),
            output=str(tmp_path / "ds"))
    return tmp_path / "ds"


def _quarantined(tok: Path) -> dict[str, str]:
    lines = (tok / "quarantine.jsonl").read_text().splitlines()
    return {q["id"]: q["reason"] for q in map(json.loads, lines)}


def test_precomputed_codes_out_of_range_or_missing_are_quarantined(tmp_path):
    ds = _bad_dataset(tmp_path, [
        {"id": "oov", "audio": "u0.wav", "text": "codes out of range", "codes": [[1, 2, 99] * 8]},
        {"id": "nocodes", "audio": "u1.wav", "text": "no codes at all"},
    ])
    res = tokenize(_cfg("tokenize.audio_tokenizer.type=precomputed", "tokenize.audio_tokenizer.vocab_size=10",
                        "tokenize.max_bad_fraction=0.5"), dataset=str(ds), output=str(tmp_path / "tok"))
    assert _quarantined(tmp_path / "tok") == {"oov": "codes_out_of_range", "nocodes": "invalid_codes"}
    assert res.report["rows"]["train"] == 8
    row = _rows(tmp_path / "tok", "train")[3]
    assert row["audio_codes"] == [[3] * 25] and row["mel_frames"] == round(25 * 22050 / 256 / 25)


def test_audio_too_short_for_a_token_is_quarantined(tmp_path):
    ds = _bad_dataset(tmp_path, [{"id": "tiny", "audio": "tiny.wav", "text": "too short for a token"}])
    tokenize(_cfg("tokenize.max_bad_fraction=0.5"), dataset=str(ds), output=str(tmp_path / "tok"))
    assert _quarantined(tmp_path / "tok") == {"tiny": "too_short_for_token"}


def test_too_many_bad_rows_fail(tmp_path):
    ds = _bad_dataset(tmp_path, [{"id": "tiny", "audio": "tiny.wav", "text": "too short for a token"}])
    with pytest.raises(Exception, match="max_bad_fraction"):
        tokenize(_cfg("tokenize.max_bad_fraction=0.05"), dataset=str(ds), output=str(tmp_path / "tok"))
    assert not (tmp_path / "tok").exists()


def test_wrong_artifact_kind_is_refused(dataset, tmp_path, capsys):
    tokenize(_cfg(), dataset=str(dataset), output=str(tmp_path / "tok"))
    with pytest.raises(ArtifactError, match="audiotune.tokens"):
        tokenize(_cfg(), dataset=str(tmp_path / "tok"), output=str(tmp_path / "tok2"))
    code = cli_main(["tokenize", "--dataset", str(tmp_path / "nothing"), "--output", str(tmp_path / "x"),
                     "--set", "tracking.enabled=false"])
    assert code == 1 and "manifest.json is missing" in capsys.readouterr().err


def test_moss_ttsd_import_without_a_dataset(tmp_path, capsys):
    from audiotune.tokenization.text import train_bpe
    from tests.test_audio_tokenizers import _moss_record, _write_moss

    rng = np.random.default_rng(3)
    made = [_moss_record(rng, n) for n in (12, 20, 7, 15)]
    _write_moss(tmp_path / "moss", "shard0", [r for r, _ in made], [12, 20, 7, 15])
    base = tmp_path / "base"
    train_bpe(["the base model tokenizer"] * 10, 270).save_pretrained(str(base))
    moss = ["tokenize.audio_tokenizer.type=precomputed", f"tokenize.audio_tokenizer.moss_path={tmp_path / 'moss'}",
            "tokenize.audio_tokenizer.num_codebooks=8", "tokenize.audio_tokenizer.vocab_size=1024",
            "convert.val_fraction=0"]
    # pickle is refused until the user says they trust the files: one clear line, exit 1
    code = cli_main(["tokenize", "--base-model", str(base), "--output", str(tmp_path / "refused"),
                     *[a for o in [*moss, "tracking.enabled=false"] for a in ("--set", o)]])
    assert code == 1 and "trust_pickle: true" in capsys.readouterr().err
    res = tokenize(_cfg(*moss, "tokenize.audio_tokenizer.trust_pickle=true"), dataset=None,
                   output=str(tmp_path / "tok"), base_model=str(base))
    rows = _rows(tmp_path / "tok", "train")
    assert [r["id"] for r in rows] == [f"shard0.pkl#{i}" for i in range(4)]
    for row, (_, codes) in zip(rows, made, strict=True):
        assert np.array_equal(codes_from_row(row), codes) and len(row["text_ids"]) == 7
    assert res.manifest["audio_tokenizer"]["num_codebooks"] == 8


def test_onnx_speaker_embeddings_and_per_speaker_means(dataset, tmp_path):
    from safetensors.numpy import load_file

    from tests.test_speaker import _tiny_model

    model = _tiny_model(tmp_path / "campplus.onnx", [1, 16])
    out = tmp_path / "tok"
    tokenize(_cfg("tokenize.speaker.type=onnx", f"tokenize.speaker.onnx_path={model}"), dataset=str(dataset),
             output=str(out))
    rows = _rows(out, "train") + _rows(out, "val")
    assert all(len(r["speaker_embedding"]) == 16 for r in rows)
    means = load_file(str(out / "tokenizer" / "speaker_embeddings.safetensors"))
    assert set(means) == {"s0", "s1", "s2"}
    s0 = np.mean([r["speaker_embedding"] for r in rows if r["speaker"] == "s0"], axis=0)
    assert np.allclose(means["s0"], s0, atol=1e-5)

"""The convert stage end to end: formats, every bad-input reason, split stability, CLI exit codes."""

from __future__ import annotations

import gzip
import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from audiotune.cli import main as cli_main
from audiotune.config import load_config
from audiotune.stages.convert import ConvertError, convert
from tests.helpers import good_corpus, write_audio, write_jsonl


def _cfg(*overrides: str):
    return load_config(None, ["tracking.enabled=false", "run.num_workers=2", *overrides])


def _rows(dataset: Path, split: str) -> list[dict]:
    rows = []
    for p in sorted((dataset / split).glob("part-*.parquet")):
        rows.extend(pq.read_table(p).to_pylist())
    return rows


def _quarantine(dataset_or_file: Path) -> list[dict]:
    path = dataset_or_file / "quarantine.jsonl" if dataset_or_file.is_dir() else dataset_or_file
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _bad_corpus(root: Path) -> Path:
    """10 good rows and one or more rows for every quarantine reason."""
    sr = 22050
    rows: list = []
    for i in range(10):
        rel = f"wavs/g{i}.wav"
        write_audio(root / rel, seconds=1.0, sr=sr, seed=i)
        rows.append({"id": f"g{i}", "audio": rel, "text": f"good row {i}", "speaker": "a"})
    rows.append({"id": "missing", "audio": "wavs/nope.wav", "text": "t"})
    good_flac = write_audio(root / "tmp.flac", seconds=2.0, sr=sr).read_bytes()
    (root / "wavs/truncated.flac").write_bytes(good_flac[:60])
    rows.append({"id": "truncated", "audio": "wavs/truncated.flac", "text": "t"})
    (root / "wavs/garbage.wav").write_bytes(b"RIFF....this is not audio at all" * 10)
    rows.append({"id": "garbage", "audio": "wavs/garbage.wav", "text": "t"})
    sf.write(root / "wavs/empty.wav", np.zeros(0, dtype=np.float32), sr)
    rows.append({"id": "empty", "audio": "wavs/empty.wav", "text": "t"})
    sf.write(root / "wavs/silent.wav", np.zeros(sr, dtype=np.float32), sr)
    rows.append({"id": "silent", "audio": "wavs/silent.wav", "text": "t"})
    write_audio(root / "wavs/short.wav", seconds=0.1, sr=sr)
    rows.append({"id": "short", "audio": "wavs/short.wav", "text": "t"})
    write_audio(root / "wavs/long.wav", seconds=6.0, sr=sr)
    rows.append({"id": "long", "audio": "wavs/long.wav", "text": "t"})
    rows.append({"id": "notext", "audio": "wavs/g1.wav", "text": ""})
    rows.append({"id": "spaces", "audio": "wavs/g1.wav", "text": "  \t "})
    rows.append('{"id": "broken", "audio": ')
    rows.append(b'{"id": "latin1", "audio": "wavs/g2.wav", "text": "caf\xe9"}')
    rows.append({"id": "g0", "audio": "wavs/g3.wav", "text": "duplicate id"})
    rows.append({"id": "escape", "audio": "../../etc/passwd", "text": "t"})
    rows.append({"id": "absolute", "audio": "/etc/passwd", "text": "t"})
    rows.append({"id": "noaudio", "text": "no audio field"})
    return write_jsonl(root / "manifest.jsonl", rows)


EXPECTED_REASONS = {
    "missing_audio": 1,
    "undecodable_audio": 2,
    "empty_audio": 1,
    "silent_audio": 1,
    "too_short": 1,
    "too_long": 1,
    "empty_text": 2,
    "invalid_json": 1,
    "invalid_utf8": 1,
    "duplicate_id": 1,
    "path_escape": 2,
    "missing_field": 1,
}


def test_every_bad_reason_is_quarantined_with_exact_counts(tmp_path):
    manifest = _bad_corpus(tmp_path / "src")
    out = tmp_path / "ds"
    result = convert(_cfg("convert.max_bad_fraction=1.0", "convert.max_duration_s=5", "convert.val_fraction=0"),
                     source=str(manifest), output=str(out))
    kept = _rows(out, "train")
    assert sorted(r["id"] for r in kept) == [f"g{i}" for i in range(10)]
    quarantine = _quarantine(out)
    assert Counter(q["reason"] for q in quarantine) == EXPECTED_REASONS
    assert result.report["rows"] == {"input": 10 + sum(EXPECTED_REASONS.values()), "train": 10, "val": 0,
                                     "quarantined": sum(EXPECTED_REASONS.values())}
    assert result.report["quarantine_reasons"] == EXPECTED_REASONS
    for q in quarantine:  # every reason names the file and line, and the field
        assert q["origin"].startswith("manifest.jsonl:") and q["field"] and q["detail"]
    by_id = {q["id"]: q for q in quarantine if q.get("id")}
    assert by_id["missing"]["field"] in ("audio", "audio_path") and "nope.wav" in by_id["missing"]["detail"]
    assert by_id["escape"]["reason"] == "path_escape"


def test_too_many_bad_rows_fails_after_writing_quarantine(tmp_path):
    manifest = _bad_corpus(tmp_path / "src")
    out = tmp_path / "ds"
    with pytest.raises(ConvertError) as err:
        convert(_cfg("convert.max_duration_s=5"), source=str(manifest), output=str(out))
    assert "max_bad_fraction" in str(err.value) and "missing_audio: 1" in str(err.value)
    assert not out.exists()  # nothing half-published
    rejected = _quarantine(tmp_path / "ds.quarantine.jsonl")
    assert len(rejected) == sum(EXPECTED_REASONS.values())
    assert json.loads((tmp_path / "ds.report.json").read_text())["rows"]["quarantined"] == len(rejected)


def test_dataset_artifact_layout_and_audio(tmp_path):
    root = tmp_path / "src"
    write_audio(root / "a/stereo.wav", seconds=2.0, sr=44100, channels=2)
    write_audio(root / "a/clip.mp3", seconds=1.5, sr=44100, channels=2)
    write_audio(root / "a/prompt.flac", seconds=1.0, sr=16000)
    manifest = write_jsonl(root / "m.jsonl", [
        {"target_audio_path": "a/stereo.wav", "target_text": "hello", "speaker_id": "s1",
         "prompt_audio_path": "a/prompt.flac", "prompt_text": "hi", "edit_type": "emotion"},
        {"audio": "a/clip.mp3", "text": "an mp3 clip", "speaker": "s2"},
    ])
    out = tmp_path / "ds"
    result = convert(_cfg("convert.val_fraction=0"), source=str(manifest), output=str(out))
    manifest_json = json.loads((out / "manifest.json").read_text())
    assert manifest_json["kind"] == "audiotune.dataset" and manifest_json["schema_version"] == 1
    assert manifest_json["sample_rate"] == 22050 and manifest_json["splits"]["train"]["rows"] == 2
    for name in ("quarantine.jsonl", "report.json", "duration_histogram.png"):
        assert (out / name).exists()
    rows = {r["speaker"]: r for r in _rows(out, "train")}
    for spk, seconds in (("s1", 2.0), ("s2", 1.5)):
        wav, sr = sf.read(io.BytesIO(rows[spk]["audio"]))
        assert sr == 22050 and wav.ndim == 1
        assert abs(len(wav) - seconds * 22050) < 0.05 * 22050  # mp3 adds a few ms of padding
        assert abs(rows[spk]["duration_s"] - len(wav) / 22050) < 1e-3
    edit = rows["s1"]
    assert edit["task"] == "edit" and json.loads(edit["meta"])["edit_type"] == "emotion"
    prompt, sr = sf.read(io.BytesIO(edit["prompt_audio"]))
    assert sr == 22050 and abs(len(prompt) - 22050) < 50
    assert result.report["throughput"]["audio_s_per_s"] > 0


def test_kaldi_acestep_and_text_formats(tmp_path):
    kaldi = tmp_path / "kaldi"
    write_audio(kaldi / "w/u1.wav", seconds=1.0, sr=16000)
    write_audio(kaldi / "w/u2.flac", seconds=1.2, sr=24000)
    (kaldi / "wav.scp").write_text("u1 w/u1.wav\nu2 w/u2.flac\n")
    (kaldi / "text").write_text("u1 ni hao\nu2 zai jian\n")
    (kaldi / "utt2spk").write_text("u1 spkA\nu2 spkB\n")
    ace = tmp_path / "ace"
    write_audio(ace / "song1.wav", seconds=3.0, sr=44100, channels=2)
    (ace / "song1_prompt.txt").write_text("pop, female vocal ,  upbeat")
    (ace / "song1_lyrics.txt").write_text("[verse]\nla la la")
    text = tmp_path / "text.jsonl.gz"
    with gzip.open(text, "wt") as f:
        for i in range(5):
            f.write(json.dumps({"text": f"document {i} " * 20}) + "\n")

    ds = convert(_cfg("convert.val_fraction=0"), source=str(kaldi), output=str(tmp_path / "k"))
    assert ds.manifest["format"] == "kaldi"
    assert {r["speaker"] for r in _rows(tmp_path / "k", "train")} == {"spkA", "spkB"}

    ds = convert(_cfg("convert.val_fraction=0", "convert.repeat_count=3"), source=str(ace),
                 output=str(tmp_path / "a"))
    (song,) = _rows(tmp_path / "a", "train")
    assert ds.manifest["format"] == "acestep" and song["task"] == "music"
    assert song["tags"] == ["pop", "female vocal", "upbeat"] and "la la la" in song["lyrics"]
    assert json.loads(song["meta"])["repeat_count"] == 3

    ds = convert(_cfg("convert.val_fraction=0"), source=str(text), output=str(tmp_path / "t"))
    rows = _rows(tmp_path / "t", "train")
    assert ds.manifest["format"] == "text" and len(rows) == 5
    assert all(r["audio"] is None and r["task"] == "text" for r in rows)


def test_split_is_stable_when_rows_are_added(tmp_path):
    small = good_corpus(tmp_path / "small", 30)
    big = good_corpus(tmp_path / "big", 45)  # same first 30 rows, then 15 more
    convert(_cfg("convert.val_fraction=0.3"), source=str(small), output=str(tmp_path / "d1"))
    convert(_cfg("convert.val_fraction=0.3"), source=str(big), output=str(tmp_path / "d2"))
    split1 = {r["id"]: s for s in ("train", "val") for r in _rows(tmp_path / "d1", s)}
    split2 = {r["id"]: s for s in ("train", "val") for r in _rows(tmp_path / "d2", s)}
    assert len(split1) == 30 and len(split2) == 45
    assert all(split2[i] == s for i, s in split1.items())
    assert 0 < sum(s == "val" for s in split2.values()) < 45


def test_rerun_is_deterministic_and_shards_are_bounded(tmp_path):
    src = good_corpus(tmp_path / "src", 12)
    a = convert(_cfg("convert.shard_max_rows=5", "convert.val_fraction=0"), source=str(src),
                output=str(tmp_path / "a"))
    b = convert(_cfg("convert.shard_max_rows=5", "convert.val_fraction=0", "run.num_workers=1"),
                source=str(src), output=str(tmp_path / "b"))
    assert [s["rows"] for s in a.manifest["splits"]["train"]["shards"]] == [5, 5, 2]
    assert a.manifest["fingerprint"] == b.manifest["fingerprint"]
    assert [r["id"] for r in _rows(tmp_path / "a", "train")] == [f"utt{i:05d}" for i in range(12)]


def test_explicit_val_source(tmp_path):
    train = good_corpus(tmp_path / "train", 6)
    val = good_corpus(tmp_path / "val", 3, start=100)
    convert(_cfg(f"convert.val_source={val}"), source=str(train), output=str(tmp_path / "d"))
    assert len(_rows(tmp_path / "d", "train")) == 6
    assert [r["id"] for r in _rows(tmp_path / "d", "val")] == ["utt00100", "utt00101", "utt00102"]


def test_trim_silence(tmp_path):
    sr = 22050
    x = np.concatenate([np.zeros(sr), np.sin(np.arange(sr) / sr * 2 * np.pi * 200) * 0.5, np.zeros(sr)])
    (tmp_path / "src").mkdir()
    sf.write(tmp_path / "src/pad.wav", x.astype(np.float32), sr)
    m = write_jsonl(tmp_path / "src/m.jsonl", [{"audio": "pad.wav", "text": "padded"}])
    convert(_cfg("convert.trim_silence=true", "convert.val_fraction=0"), source=str(m), output=str(tmp_path / "d"))
    (row,) = _rows(tmp_path / "d", "train")
    assert 0.9 < row["duration_s"] < 1.2


def test_cli_exit_codes(tmp_path, capsys):
    src = good_corpus(tmp_path / "src", 4)
    out = tmp_path / "ds"
    base = ["convert", "--source", str(src), "--output", str(out), "--set", "tracking.enabled=false"]
    assert cli_main(base) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["rows"]["input"] == 4
    assert cli_main(base) == 1  # output exists
    assert "exists" in capsys.readouterr().err
    assert cli_main(base + ["--set", "convert.overwrite=true"]) == 0
    assert cli_main(base + ["--set", "convert.sample_rate=fast"]) == 2
    assert "convert.sample_rate" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        cli_main(base + ["--format", "mp4"])
    assert exit_.value.code == 2
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert cli_main(["convert", "--source", str(empty), "--format", "jsonl", "--output", str(tmp_path / "e"),
                     "--set", "tracking.enabled=false"]) == 1
    assert "no rows" in capsys.readouterr().err
    assert cli_main(["convert", "--source", str(tmp_path / "nowhere"), "--output", str(tmp_path / "e"),
                     "--set", "tracking.enabled=false"]) == 1
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "readme.txt").write_text("hi")
    assert cli_main(["convert", "--source", str(unknown), "--output", str(tmp_path / "e"),
                     "--set", "tracking.enabled=false"]) == 1
    assert "error" in capsys.readouterr().err

"""Source readers on their own: detection, ids, and the bad rows each one reports."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from audiotune.data.sources import detect_format, get_reader, resolve_source
from audiotune.data.sources.base import BadRecord, SourceError, SourceOptions, SourceRecord
from tests.helpers import write_audio, write_jsonl


def _read(fmt: str, path: Path, **opts):
    items = list(get_reader(fmt).read(path, SourceOptions(**opts)))
    return ([i for i in items if isinstance(i, SourceRecord)], [i for i in items if isinstance(i, BadRecord)])


def test_kaldi_reports_each_inconsistency(tmp_path):
    write_audio(tmp_path / "a.wav")
    (tmp_path / "wav.scp").write_text("u1 a.wav\nu2 sox b.wav -t wav - |\nu3 a.wav\nu4 ../../etc/passwd\nu1 a.wav\n")
    (tmp_path / "text").write_text("u1 hello\nu2 piped\nu4 escape\nu5 no audio\nu3 \n")
    good, bad = _read("kaldi", tmp_path)
    assert [r.id for r in good] == ["u1"] and good[0].speaker is None
    reasons = sorted((b.reason, b.id) for b in bad)
    assert reasons == [("duplicate_id", "u1"), ("empty_text", "u3"), ("missing_field", "u5"),
                       ("path_escape", "u4"), ("unsupported_entry", "u2")]


def test_acestep_missing_prompt_and_subfolders(tmp_path):
    write_audio(tmp_path / "a" / "song.flac")
    (tmp_path / "a" / "song_prompt.txt").write_text("rock, guitar")
    write_audio(tmp_path / "b" / "orphan.wav")
    good, bad = _read("acestep", tmp_path, repeat_count=2)
    assert [(r.id, r.tags, r.repeat) for r in good] == [("a/song", ["rock", "guitar"], 2)]
    assert [(b.reason, b.field, b.id) for b in bad] == [("missing_field", "prompt", "b/orphan")]


def test_jsonl_ids_tasks_and_symlink_escape(tmp_path):
    outside = tmp_path / "outside.wav"
    write_audio(outside)
    root = tmp_path / "root"
    write_audio(root / "spk" / "x.wav")
    os.symlink(outside, root / "link.wav")
    manifest = write_jsonl(root / "m.jsonl", [
        {"audio": "spk/x.wav", "text": "plain"},
        {"target_audio_path": "spk/x.wav", "target_text": "t", "prompt_audio_path": "spk/x.wav", "id": "c"},
        {"audio": "link.wav", "text": "through a symlink"},
        [1, 2, 3],
    ])
    good, bad = _read("jsonl", manifest)
    assert [(r.id, r.task) for r in good] == [("spk/x", "tts"), ("c", "clone")]
    assert sorted(b.reason for b in bad) == ["invalid_json", "path_escape"]


def test_text_directory_with_custom_field(tmp_path):
    write_jsonl(tmp_path / "docs" / "a.jsonl", [{"body": "first"}, {"body": ""}, {"other": 1}])
    good, bad = _read("text", tmp_path / "docs", text_field="body")
    assert [r.id for r in good] == ["a-1"]
    assert sorted(b.reason for b in bad) == ["empty_text", "missing_field"]


def test_detection_and_resolution(tmp_path):
    write_audio(tmp_path / "k" / "a.wav")
    (tmp_path / "k" / "wav.scp").write_text("u a.wav\n")
    (tmp_path / "k" / "text").write_text("u hi\n")
    assert detect_format(tmp_path / "k") == "kaldi"
    write_jsonl(tmp_path / "j" / "m.jsonl", [{"audio": "a.wav", "text": "x"}])
    assert resolve_source(tmp_path / "j", None) == ("jsonl", tmp_path / "j" / "m.jsonl")
    write_jsonl(tmp_path / "t.jsonl", [{"text": "just text"}])
    assert detect_format(tmp_path / "t.jsonl") == "text"
    with pytest.raises(SourceError, match="known formats"):
        get_reader("csv")
    (tmp_path / "e").mkdir()
    with pytest.raises(SourceError, match="cannot tell the layout"):
        detect_format(tmp_path / "e")

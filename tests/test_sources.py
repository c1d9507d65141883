"""Source readers: records, bad rows with their reasons, path escapes, detection and the registry."""

from __future__ import annotations

import gzip
import json
import os
from collections import Counter
from pathlib import Path

import pytest

from audiotune.data import reasons
from audiotune.data.sources import detect_format, get_reader, resolve_source
from audiotune.data.sources.base import BadRecord, SourceError, SourceOptions, SourceRecord
from tests.helpers import write_jsonl


def read_all(fmt: str, path: Path, **options) -> tuple[list[SourceRecord], list[BadRecord]]:
    items = list(get_reader(fmt).read(path, SourceOptions(**options)))
    assert all(isinstance(i, (SourceRecord, BadRecord)) for i in items)
    return [i for i in items if isinstance(i, SourceRecord)], [i for i in items if isinstance(i, BadRecord)]


def reason_counts(bad: list[BadRecord]) -> Counter:
    return Counter(b.reason for b in bad)


def touch(path: Path, data: bytes = b"") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


# --- JSONL manifest -------------------------------------------------------------------------------


def editx_manifest(root: Path) -> Path:
    return write_jsonl(root / "manifest.jsonl", [
        {"target_audio_path": "spk1/utt001.wav", "target_text": " Hello there. ", "speaker_id": "spk1"},
        "",
        {"target_audio_path": "spk1/utt002.wav", "target_text": "Clone me.", "prompt_audio_path": "spk1/p.wav",
         "prompt_text": "Prompt words.", "speaker_id": "spk1"},
        {"id": "e1", "target_audio_path": "spk2/utt003.flac", "target_text": "Edited.",
         "prompt_audio_path": "spk2/src.flac", "prompt_text": "Original.", "edit_type": "emotion",
         "speaker_id": "spk2", "emotion": "happy"},
    ])


def test_editx_manifest_tasks_ids_and_meta(tmp_path):
    records, bad = read_all("jsonl", editx_manifest(tmp_path))
    assert bad == []
    by_id = {r.id: r for r in records}
    assert list(by_id) == ["spk1/utt001", "spk1/utt002", "e1"]
    tts, clone, edit = by_id["spk1/utt001"], by_id["spk1/utt002"], by_id["e1"]
    assert (tts.task, clone.task, edit.task) == ("tts", "clone", "edit")
    assert tts.text == "Hello there." and tts.speaker == "spk1" and tts.prompt_audio_path is None
    assert tts.audio_path == os.path.join(os.path.realpath(tmp_path), "spk1", "utt001.wav")
    assert tts.origin == "manifest.jsonl:1" and edit.origin == "manifest.jsonl:4"  # the blank line counts
    assert clone.prompt_text == "Prompt words."
    assert clone.prompt_audio_path == os.path.join(os.path.realpath(tmp_path), "spk1", "p.wav")
    assert edit.meta == {"edit_type": "emotion", "emotion": "happy"}


def test_plain_manifest_and_absolute_path_inside_root(tmp_path):
    inside = os.path.join(os.path.realpath(tmp_path), "wavs", "b.wav")
    path = write_jsonl(tmp_path / "m.jsonl", [
        {"audio": "./wavs/a.wav", "text": "first", "speaker": 7, "lang": "en"},
        {"audio": inside, "text": "second"},
    ])
    records, bad = read_all("jsonl", path)
    assert bad == []
    assert [r.id for r in records] == ["wavs/a", "wavs/b"]
    assert [r.task for r in records] == ["tts", "tts"]
    assert records[0].speaker == "7" and records[0].meta == {"lang": "en"}
    assert records[1].audio_path == inside and records[1].speaker is None


def test_manifest_bad_rows_each_reason(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [
        {"audio": "ok.wav", "text": "fine"},  # 1
        '{"audio": "x.wav", "text": ',  # 2 invalid JSON
        "[1, 2]",  # 3 not an object
        b'{"audio": "y.wav", "text": "caf\xe9"}',  # 4 Latin-1, not UTF-8
        {"text": "no audio"},  # 5
        {"audio": "z.wav"},  # 6 no text
        {"audio": "z.wav", "text": ""},  # 7
        {"target_audio_path": "z.wav", "target_text": " \t "},  # 8
        {"audio": "../../etc/passwd", "text": "t"},  # 9
        {"audio": "/etc/passwd", "text": "t"},  # 10
        {"audio": "ok2.wav", "text": "t", "prompt_audio_path": "../outside.wav"},  # 11
        {"audio": "does/not/exist.wav", "text": "still a record"},  # 12: existence is the stage's job
    ])
    records, bad = read_all("jsonl", path)
    assert [r.id for r in records] == ["ok", "does/not/exist"]
    assert reason_counts(bad) == {
        reasons.INVALID_JSON: 2, reasons.INVALID_UTF8: 1, reasons.MISSING_FIELD: 2,
        reasons.EMPTY_TEXT: 2, reasons.PATH_ESCAPE: 3,
    }
    by_line = {int(b.origin.rsplit(":", 1)[1]): b for b in bad}
    assert all(b.origin.startswith("bad.jsonl:") and b.detail for b in bad)
    assert by_line[2].field == "line" and by_line[4].field == "line"
    assert by_line[5].field == "audio" and by_line[6].field == "text"
    assert by_line[8].field == "target_text"
    assert {by_line[n].field for n in (9, 10)} == {"audio"} and by_line[11].field == "prompt_audio_path"
    assert "passwd" in by_line[9].detail and "passwd" in by_line[10].detail


def test_manifest_ids_are_deterministic_and_distinct(tmp_path):
    rows = [{"audio": f"s{i % 3}/u{i}.wav", "text": f"t{i}"} for i in range(30)]
    path = write_jsonl(tmp_path / "m.jsonl", rows)
    first, _ = read_all("jsonl", path)
    second, _ = read_all("jsonl", path)
    assert [r.id for r in first] == [r.id for r in second]
    assert len({r.id for r in first}) == 30


def test_empty_manifest_yields_nothing(tmp_path):
    path = touch(tmp_path / "empty.jsonl")
    assert read_all("jsonl", path) == ([], [])
    touch(tmp_path / "blank.jsonl", b"\n  \n")
    assert read_all("jsonl", tmp_path / "blank.jsonl") == ([], [])


# --- ACE-Step ------------------------------------------------------------------------------------------


def acestep_folder(root: Path) -> Path:
    touch(root / "a.mp3")
    touch(root / "a_prompt.txt", b" rock,  guitar , ,male vocal\n")
    touch(root / "a_lyrics.txt", b"[verse]\nla la\n")
    touch(root / "b.wav")
    touch(root / "b_prompt.txt", b"ambient")
    touch(root / "album" / "c.flac")
    touch(root / "album" / "c_prompt.txt", b"jazz")
    touch(root / "d.wav")  # no prompt
    touch(root / "e.wav")
    touch(root / "e_prompt.txt", b" , ")  # no tags
    touch(root / "notes.txt", b"ignored")
    return root


def test_acestep_records(tmp_path):
    records, bad = read_all("acestep", acestep_folder(tmp_path), repeat_count=3)
    by_id = {r.id: r for r in records}
    assert sorted(by_id) == ["a", "album/c", "b"]
    a = by_id["a"]
    assert a.task == "music" and a.tags == ["rock", "guitar", "male vocal"]
    assert a.lyrics == "[verse]\nla la" and a.text == a.lyrics
    assert by_id["b"].lyrics is None and by_id["b"].text is None
    assert all(r.repeat == 3 for r in records)
    assert by_id["album/c"].audio_path == os.path.join(os.path.realpath(tmp_path), "album", "c.flac")
    assert reason_counts(bad) == {reasons.MISSING_FIELD: 1, reasons.EMPTY_TEXT: 1}
    missing = next(b for b in bad if b.reason == reasons.MISSING_FIELD)
    assert missing.field == "prompt" and "d_prompt.txt" in missing.detail


def test_acestep_symlink_out_of_folder_is_an_escape(tmp_path):
    outside = touch(tmp_path / "outside" / "x.wav")
    root = tmp_path / "music"
    touch(root / "x_prompt.txt", b"pop")
    (root / "x.wav").symlink_to(outside)
    records, bad = read_all("acestep", root)
    assert records == [] and [(b.reason, b.field) for b in bad] == [(reasons.PATH_ESCAPE, "audio")]


# --- Kaldi ---------------------------------------------------------------------------------------------


def kaldi_folder(root: Path, utt2spk: bool = True) -> Path:
    touch(root / "wav.scp", (
        "u1 wavs/u1.wav\n"
        "u2\twavs/u2.wav\n"
        "u3 sox wavs/u3.flac -t wav - |\n"
        "u4 wavs/u4.wav\n"
        "u5 wavs/u5.wav\n"
        "u6 ../../etc/passwd\n"
        "u7 /etc/passwd\n"
        "\n"
    ).encode())
    touch(root / "text", "u1 hello world\nu2 ça va\nu3 piped\nu5\nu6 t\nu7 t\nu9 orphan transcript\n".encode())
    if utt2spk:
        touch(root / "utt2spk", b"u1 spkA\nu2 spkB\n")
    return root


def test_kaldi_records_and_bad_rows(tmp_path):
    records, bad = read_all("kaldi", kaldi_folder(tmp_path))
    assert [(r.id, r.text, r.speaker) for r in records] == [("u1", "hello world", "spkA"), ("u2", "ça va", "spkB")]
    assert records[0].audio_path == os.path.join(os.path.realpath(tmp_path), "wavs", "u1.wav")
    assert records[1].origin == "wav.scp:2"
    assert reason_counts(bad) == {
        reasons.UNSUPPORTED: 1, reasons.MISSING_FIELD: 2, reasons.EMPTY_TEXT: 1, reasons.PATH_ESCAPE: 2,
    }
    by_id = {b.id: b for b in bad}
    assert (by_id["u4"].origin, by_id["u4"].field) == ("wav.scp:4", "text")
    assert (by_id["u9"].origin, by_id["u9"].field) == ("text:7", "wav.scp")
    assert by_id["u3"].origin == "wav.scp:3" and by_id["u5"].reason == reasons.EMPTY_TEXT
    assert by_id["u6"].field == "wav.scp" and by_id["u7"].reason == reasons.PATH_ESCAPE


def test_kaldi_without_utt2spk_has_no_speakers(tmp_path):
    records, _ = read_all("kaldi", kaldi_folder(tmp_path, utt2spk=False))
    assert [r.speaker for r in records] == [None, None]


def test_kaldi_invalid_utf8_line_does_not_stop_the_file(tmp_path):
    touch(tmp_path / "wav.scp", b"u1 a.wav\nu2 b.wav\n")
    touch(tmp_path / "text", b"u1 caf\xe9\nu2 fine\n")
    records, bad = read_all("kaldi", tmp_path)
    assert [r.id for r in records] == ["u2"]
    assert reason_counts(bad) == {reasons.INVALID_UTF8: 1, reasons.MISSING_FIELD: 1}


# --- Text JSONL ----------------------------------------------------------------------------------------


def test_text_jsonl_records_and_bad_rows(tmp_path):
    path = write_jsonl(tmp_path / "docs.jsonl", [
        {"id": "d1", "text": "A document.", "source": "web"},
        {"text": "No id here."},
        "{oops",
        b'{"text": "\xff\xfe"}',
        {"body": "wrong field"},
        {"text": "   "},
    ])
    records, bad = read_all("text", path)
    assert [(r.id, r.task, r.audio_path) for r in records] == [("d1", "text", None), ("docs-2", "text", None)]
    assert records[0].meta == {"source": "web"}
    assert reason_counts(bad) == {
        reasons.INVALID_JSON: 1, reasons.INVALID_UTF8: 1, reasons.MISSING_FIELD: 1, reasons.EMPTY_TEXT: 1,
    }
    assert next(b for b in bad if b.reason == reasons.MISSING_FIELD).field == "text"


def test_text_field_option_and_gzip(tmp_path):
    path = tmp_path / "corpus.jsonl.gz"
    with gzip.open(path, "wb") as f:
        for i in range(3):
            f.write(json.dumps({"content": f"doc {i}"}).encode() + b"\n")
        f.write(b'{"content": "caf\xe9"}\n')
    records, bad = read_all("text", path, text_field="content")
    assert [r.id for r in records] == ["corpus-1", "corpus-2", "corpus-3"]
    assert [r.text for r in records] == ["doc 0", "doc 1", "doc 2"]
    assert reason_counts(bad) == {reasons.INVALID_UTF8: 1}


def test_text_folder_reads_every_file_sorted(tmp_path):
    write_jsonl(tmp_path / "b.jsonl", [{"text": "b1"}])
    write_jsonl(tmp_path / "a.jsonl", [{"text": "a1"}, {"text": "a2"}])
    with gzip.open(tmp_path / "c.jsonl.gz", "wb") as f:
        f.write(b'{"text": "c1"}\n')
    touch(tmp_path / "readme.txt", b"not read")
    records, bad = read_all("text", tmp_path)
    assert bad == []
    assert [r.id for r in records] == ["a-1", "a-2", "b-1", "c-1"]
    again, _ = read_all("text", tmp_path)
    assert [r.id for r in again] == [r.id for r in records]


def test_corrupt_gzip_is_a_source_error(tmp_path):
    good = gzip.compress(b"".join(b'{"text": "doc %d"}\n' % i for i in range(2000)))
    path = touch(tmp_path / "cut.jsonl.gz", good[: len(good) // 2])
    with pytest.raises(SourceError, match="cut.jsonl.gz"):
        read_all("text", path)


# --- Registry and detection ----------------------------------------------------------------------------


def test_get_reader_unknown_name_lists_known_formats():
    with pytest.raises(SourceError) as info:
        get_reader("csv")
    for name in ("jsonl", "text", "kaldi", "acestep"):
        assert name in str(info.value)


def test_detect_each_layout(tmp_path):
    assert detect_format(editx_manifest(tmp_path / "editx")) == "jsonl"
    plain = write_jsonl(tmp_path / "plain" / "m.jsonl", ["", {"audio": "a.wav", "text": "t"}])
    assert detect_format(plain) == "jsonl"
    assert detect_format(write_jsonl(tmp_path / "t" / "docs.jsonl", [{"text": "t"}])) == "text"
    gz = touch(tmp_path / "g" / "docs.jsonl.gz", gzip.compress(b'{"text": "t"}\n'))
    assert detect_format(gz) == "text"
    assert detect_format(kaldi_folder(tmp_path / "kaldi")) == "kaldi"
    assert detect_format(acestep_folder(tmp_path / "ace")) == "acestep"


def test_folder_with_one_manifest_resolves_to_the_manifest(tmp_path):
    manifest = editx_manifest(tmp_path)
    assert detect_format(tmp_path) == "jsonl"
    assert resolve_source(tmp_path, None) == ("jsonl", manifest)
    assert resolve_source(manifest, None) == ("jsonl", manifest)
    assert resolve_source(tmp_path, "jsonl") == ("jsonl", manifest)


def test_unknown_layout_and_missing_source(tmp_path):
    touch(tmp_path / "notes.txt", b"hello")
    touch(tmp_path / "song.wav")  # audio without a prompt file is not an ACE-Step folder
    with pytest.raises(SourceError, match="wav.scp"):
        detect_format(tmp_path)
    with pytest.raises(SourceError, match="does not exist"):
        resolve_source(tmp_path / "missing", None)
    with pytest.raises(SourceError, match="csv"):
        resolve_source(tmp_path, "csv")


def test_kaldi_repeated_utterance_line_is_reported(tmp_path):
    touch(tmp_path / "wav.scp", b"u1 a.wav\nu1 b.wav\n")
    touch(tmp_path / "text", b"u1 hi\n")
    records, bad = read_all("kaldi", tmp_path)
    assert [(r.id, Path(r.audio_path).name) for r in records] == [("u1", "a.wav")]
    assert [(b.reason, b.origin) for b in bad] == [(reasons.DUPLICATE_ID, "wav.scp:2")]


def test_manifest_symlink_out_of_root_is_an_escape(tmp_path):
    outside = touch(tmp_path / "outside.wav")
    root = tmp_path / "root"
    root.mkdir()
    (root / "link.wav").symlink_to(outside)
    manifest = write_jsonl(root / "m.jsonl", [{"audio": "link.wav", "text": "through a symlink"}])
    records, bad = read_all("jsonl", manifest)
    assert records == [] and [(b.reason, b.field) for b in bad] == [(reasons.PATH_ESCAPE, "audio")]

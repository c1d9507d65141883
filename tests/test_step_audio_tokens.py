"""Step-Audio-EditX's dual-codebook vocabulary: codes at LLM ids, interleaved 2:3 in one stream.

Unit tests of the stream (interleave, ``<audio_N>`` strings, the flow's pairs), the config and
its preset, a tokenize run over a tiny precomputed Step-style dataset (kept rows, quarantined
rows, the manifest), the chat frames, and two llm steps on such Tokens with a tiny Qwen2 base
whose vocabulary covers the offsets.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from audiotune.config import AudiotuneConfig, load_config
from audiotune.models.vocab import (
    CodeStream,
    CodeStreamError,
    audio_token_settings,
    step_pairs_from_interleaved,
    vocab_for_tokens,
)
from audiotune.tokenization.audio_tokenizers.base import CodesOutOfRange, RowError
from audiotune.tokenization.audio_tokenizers.precomputed import PrecomputedTokenizer, parse_audio_tokens
from tests.helpers import write_audio, write_jsonl

OFFSETS, SIZES, INTERLEAVE = [65536, 66560], [1024, 4096], [2, 3]
STEP = CodeStream(OFFSETS, SIZES, INTERLEAVE)
PRESET = ["tokenize.audio_tokenizer.preset=step-audio-editx"]


# -- the stream ----------------------------------------------------------------------------------------------
def test_interleave_round_trip_and_upstream_truncation():
    vq02, vq06 = [5, 6, 7, 8, 9], [100, 101, 102, 103, 104, 105, 106]  # 2 full groups; 1 + 1 codes left over
    ids = STEP.interleave_codes([vq02, vq06])
    assert ids.tolist() == [65541, 65542, 66660, 66661, 66662, 65543, 65544, 66663, 66664, 66665]
    back = STEP.deinterleave(ids)
    assert back[0].tolist() == vq02[:4] and back[1].tolist() == vq06[:6]
    rng = np.random.default_rng(0)
    codes = [rng.integers(0, 1024, 40), rng.integers(0, 4096, 60)]
    assert [b.tolist() for b in STEP.deinterleave(STEP.interleave_codes(codes))] == [c.tolist() for c in codes]


def test_step_pairs_follow_upstream_reshape():
    # Upstream: relative ids [a, b, x, y, z] -> [[a, x+1], [b, y+1], [1024, z+1]] with x = 1024 + raw vq06.
    ids = [65536 + 3, 65536 + 4, 66560 + 0, 66560 + 7, 66560 + 4095]
    assert step_pairs_from_interleaved(ids, OFFSETS, SIZES, INTERLEAVE).tolist() == [
        [3, 1025], [4, 1032], [1024, 5120]]
    # A partial group is completed with code 0 of each missing position's codebook, as upstream pads.
    head = [65536 + 9, 65536 + 8, 66560 + 2, 66560 + 5]
    for keep, tail in [(4, [[9, 1027], [8, 1030], [1024, 1025]]), (3, [[9, 1027], [8, 1025], [1024, 1025]]),
                       (2, [[9, 1025], [8, 1025], [1024, 1025]]), (1, [[9, 1025], [0, 1025], [1024, 1025]])]:
        out = step_pairs_from_interleaved(ids + head[:keep], OFFSETS, SIZES, INTERLEAVE)
        assert out.shape == (6, 2) and out[3:].tolist() == tail, keep
    # Relative ids (what a generated stream minus 65536 is) need only relative offsets.
    rel = step_pairs_from_interleaved(np.asarray(ids) - 65536, [0, 1024], SIZES, INTERLEAVE)
    assert rel.tolist() == step_pairs_from_interleaved(ids, OFFSETS, SIZES, INTERLEAVE).tolist()


def test_step_pairs_of_relative_ids_match_hand_worked_upstream_reshape():
    """Upstream ``_reshape`` takes ids minus 65536 (vq02 in [0, 1024), vq06 in [1024, 5120)): groups
    ``a b x y z`` -> ``(a, x+1) (b, y+1) (1024, z+1)``; a partial group gets ``(0, 0, 0, 1024, 1024, 1024)[-missing:]``.
    The flow (models/flow/native/adapter.py) pairs through this one function with the Tokens' numbers."""
    rel = [0, 1024]

    def pairs(ids):
        return step_pairs_from_interleaved(ids, rel, SIZES, INTERLEAVE).tolist()

    assert pairs([1, 2, 1030, 1031, 1032, 3, 4, 1040, 1041, 1042]) == [
        [1, 1031], [2, 1032], [1024, 1033], [3, 1041], [4, 1042], [1024, 1043]]
    assert pairs([7, 8, 1030]) == [[7, 1031], [8, 1025], [1024, 1025]]
    assert pairs([7]) == [[7, 1025], [0, 1025], [1024, 1025]]
    assert pairs([1023, 0, 5119, 1024, 2047]) == [[1023, 5120], [0, 1025], [1024, 2048]]


@pytest.mark.parametrize("ids, out_of_range, message", [
    ([65536, 65537, 66560, 66561], False, "4 ids is not a positive multiple of 5"),
    ([65536, 66560, 66560, 66561, 66562], True, "id 66560 at position 1 is outside codebook 0's ids"),
    ([65536, 65537, 66560, 66561, 70656], True, "id 70656 at position 4 is outside codebook 1's ids"),
])
def test_stream_checks_length_and_codebook_of_every_position(ids, out_of_range, message):
    with pytest.raises(CodeStreamError, match=message) as err:
        STEP.check(ids)
    assert err.value.out_of_range is out_of_range


def test_audio_token_strings():
    assert parse_audio_tokens("<audio_0><audio_1023> <audio_1024>\n<audio_5119>", "w") == [0, 1023, 1024, 5119]
    with pytest.raises(RowError, match="unexpected text 'hello' at character 9"):
        parse_audio_tokens("<audio_1>hello", "w")
    with pytest.raises(RowError, match="no <audio_N> tokens"):
        parse_audio_tokens("  ", "w")


def _tokenizer(**kw) -> PrecomputedTokenizer:
    return PrecomputedTokenizer(codebook_offsets=OFFSETS, codebook_sizes=SIZES, interleave=INTERLEAVE, **kw)


def _row(value, rid="r1") -> dict:
    return {"id": rid, "meta": json.dumps({"codes": value})}


def test_precomputed_stream_forms_and_row_errors():
    tok = _tokenizer()
    assert tok.num_codebooks == 1 and tok.codebook_size == 5120
    text = "".join(f"<audio_{n}>" for n in [1, 2, 1024 + 3, 1024 + 4, 1024 + 5])
    ids = [65537, 65538, 66563, 66564, 66565]
    assert tok.codes_for_row(_row(text)).tolist() == [ids]
    assert tok.codes_for_row(_row(ids)).tolist() == [ids]
    assert tok.codes_for_row(_row([[1, 2, 9], [3, 4, 5, 6]])).tolist() == [ids]  # leftovers dropped
    with pytest.raises(CodesOutOfRange, match=r"row r1 meta.codes: codebook 1 code 4096 at index 0"):
        tok.codes_for_row(_row([[1, 2], [4096, 4, 5]]))
    with pytest.raises(CodesOutOfRange, match=r"row r1 meta.codes: id 66563 at position 0 is outside codebook 0"):
        tok.codes_for_row(_row(ids[2:] + ids[:2]))
    with pytest.raises(RowError, match=r"row r1 meta.codes: 4 ids is not a positive multiple of 5") as err:
        tok.codes_for_row(_row(text.rsplit("<", 1)[0]))
    assert not isinstance(err.value, CodesOutOfRange)
    with pytest.raises(RowError, match=r"3 code lists, expected 2"):
        tok.codes_for_row(_row([[1, 2], [3, 4, 5], [6]]))
    assert tok.manifest_fields()["code_stream"]["id_ranges"] == [[65536, 66560], [66560, 70656]]
    assert PrecomputedTokenizer.from_config(load_config(None, PRESET).tokenize.audio_tokenizer).stream == STEP


# -- the config --------------------------------------------------------------------------------------------
def test_preset_fills_the_fields_and_round_trips():
    cfg = load_config(None, PRESET)
    a = cfg.tokenize.audio_tokenizer
    assert (a.type, a.codebook_offsets, a.codebook_sizes, a.interleave) == ("precomputed", OFFSETS, SIZES, INTERLEAVE)
    assert a.token_rate == pytest.approx(125 / 3)
    assert AudiotuneConfig.model_validate(json.loads(cfg.model_dump_json())) == cfg
    own = load_config(None, [*PRESET, "tokenize.audio_tokenizer.token_rate=40"])  # set fields win
    assert own.tokenize.audio_tokenizer.token_rate == 40
    for field in ("codebook_offsets", "codebook_sizes", "interleave", "preset"):
        assert type(a).model_fields[field].description


@pytest.mark.parametrize("overrides, message", [
    (["tokenize.audio_tokenizer.codebook_offsets=[0, 10]"], "applies to type 'precomputed'"),
    (["tokenize.audio_tokenizer.type=precomputed", "tokenize.audio_tokenizer.codebook_offsets=[0, 10]"],
     "codebook_offsets and codebook_sizes go together"),
    (["tokenize.audio_tokenizer.type=precomputed", "tokenize.audio_tokenizer.codebook_offsets=[0, 10]",
      "tokenize.audio_tokenizer.codebook_sizes=[10, 5]"], "interleave must be set"),
    (["tokenize.audio_tokenizer.type=precomputed", "tokenize.audio_tokenizer.codebook_offsets=[0, 10]",
      "tokenize.audio_tokenizer.codebook_sizes=[20, 5]", "tokenize.audio_tokenizer.interleave=[1, 1]"],
     r"\[0, 20\) and \[10, 15\) overlap"),
    (["tokenize.audio_tokenizer.type=precomputed", "tokenize.audio_tokenizer.codebook_offsets=[0]",
      "tokenize.audio_tokenizer.codebook_sizes=[20, 5]"], "same length"),
    ([*PRESET, "tokenize.audio_tokenizer.num_codebooks=2"], "num_codebooks at 1"),
])
def test_bad_stream_settings_name_the_field(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, overrides)


def test_tokens_of_llm_ids_fix_the_llm_offset():
    audio = {"code_stream": STEP.to_dict()}
    assert audio_token_settings(audio, "append", None) == ("offset", 65536)
    assert audio_token_settings(None, "append", None) == ("append", None)
    with pytest.raises(ValueError, match="llm.audio_token_offset=100, but the Tokens hold LM ids from 65536"):
        audio_token_settings(audio, "offset", 100)


# -- tokenize over a tiny Step-style dataset ---------------------------------------------------------------
def _stream(groups: int, seed: int) -> list[int]:
    rng = np.random.default_rng(seed)
    return STEP.interleave_codes([rng.integers(0, 1024, 2 * groups), rng.integers(0, 4096, 3 * groups)]).tolist()


def _as_text(ids: list[int]) -> str:
    return "".join(f"<audio_{i - 65536}>" for i in ids)


@pytest.fixture(scope="module")
def step_tokens(tmp_path_factory) -> tuple[Path, dict]:
    """Tokens of 6 good rows (tts, clone, edit; three input forms) and 4 bad ones."""
    from audiotune.stages.convert import convert
    from audiotune.stages.tokenize import tokenize

    root = tmp_path_factory.mktemp("step")
    rows, streams = [], {}
    for i in range(6):  # 1.2 s of audio = 10 groups = 50 ids at 125/3 ids per second
        write_audio(root / f"u{i}.wav", seconds=1.2, sr=22050, seed=i)
        ids = _stream(10, i)
        streams[f"u{i}"] = ids
        form = [_as_text(ids), ids, STEP.deinterleave(ids)][i % 3]
        row = {"id": f"u{i}", "audio": f"u{i}.wav", "text": f"step row {i} says hello", "codes": None}
        row["codes"] = [c.tolist() for c in form] if i % 3 == 2 else form
        if i % 3:  # clone (and edit) rows carry the prompt's stream
            row.update(prompt_audio_path="u0.wav", prompt_text="step row 0 says hello",
                       prompt_codes=_as_text(_stream(4, 100 + i)))
        if i % 3 == 2:
            row.update(edit_type="emotion", instruction="Make the following audio more happy. The text "
                       "corresponding to the audio is: step row 0 says hello\n")
        rows.append(row)
    bad = {"oor": [[1, 2] * 10, [4096] + [5] * 29],  # a vq06 code outside 4096
           "short": _as_text(_stream(10, 50)[:49]),  # not a whole number of groups
           "swapped": (lambda s: s[2:5] + s[:2] + s[5:])(_stream(10, 51)),  # vq06 ids where vq02 belong
           "junk": "<audio_3><audio_4>not audio"}
    for rid, codes in bad.items():
        write_audio(root / f"{rid}.wav", seconds=1.2, sr=22050, seed=7)
        rows.append({"id": rid, "audio": f"{rid}.wav", "text": f"bad row {rid}", "codes": codes})
    write_jsonl(root / "m.jsonl", rows)
    base = ["tracking.enabled=false", "run.num_workers=1", "tokenize.vocab_size=300", "convert.val_fraction=0",
            "tokenize.align_tolerance=8", "tokenize.max_bad_fraction=0.5", *PRESET]
    convert(load_config(None, base), source=str(root / "m.jsonl"), output=str(root / "ds"))
    tokenize(load_config(None, base), dataset=str(root / "ds"), output=str(root / "tok"))
    return root / "tok", streams


def _token_rows(tok: Path) -> dict[str, dict]:
    rows = [r for p in sorted((tok / "train").glob("part-*.parquet")) for r in pq.read_table(p).to_pylist()]
    return {r["id"]: r for r in rows}


def test_tokenize_stores_one_row_of_llm_ids_and_the_layout_in_the_manifest(step_tokens):
    tok, streams = step_tokens
    manifest = json.loads((tok / "manifest.json").read_text())
    audio = manifest["audio_tokenizer"]
    assert audio["num_codebooks"] == 1 and audio["codebook_size"] == 5120
    assert audio["token_rate"] == pytest.approx(125 / 3)
    assert audio["code_stream"] == {"codebook_offsets": OFFSETS, "codebook_sizes": SIZES, "interleave": INTERLEAVE,
                                    "id_ranges": [[65536, 66560], [66560, 70656]],
                                    "frame_rate": pytest.approx(25.0)}
    rows = _token_rows(tok)
    assert sorted(rows) == [f"u{i}" for i in range(6)]
    for rid, ids in streams.items():
        assert rows[rid]["audio_codes"] == [ids], rid  # every input form gives the same stream
        assert rows[rid]["num_audio_frames"] == 50 and rows[rid]["mel_frames"] == 103
    assert [rows[f"u{i}"]["task"] for i in range(3)] == ["tts", "clone", "edit"]
    assert rows["u1"]["prompt_codes"] == [_stream(4, 101)] and rows["u0"]["prompt_codes"] is None


def test_bad_streams_are_quarantined_naming_row_and_field(step_tokens):
    tok, _ = step_tokens
    found = {q["id"]: q for q in map(json.loads, (tok / "quarantine.jsonl").read_text().splitlines())}
    assert {k: q["reason"] for k, q in found.items()} == {
        "oor": "codes_out_of_range", "short": "invalid_codes", "swapped": "codes_out_of_range",
        "junk": "invalid_codes"}
    assert all(q["field"] == "audio_codes" and f"row {k} meta.codes" in q["detail"] for k, q in found.items())
    assert "codebook 1 code 4096" in found["oor"]["detail"]
    assert "49 ids is not a positive multiple of 5" in found["short"]["detail"]
    assert "at position 0 is outside codebook 0's ids [65536, 66560)" in found["swapped"]["detail"]
    assert "unexpected text 'not audio'" in found["junk"]["detail"]


# -- the LLM reads the stream as it is ---------------------------------------------------------------------
def _vocab(tok: Path, prompt_format: str | None = None):
    from transformers import AutoTokenizer

    manifest = json.loads((tok / "manifest.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(str(tok / "tokenizer"))
    return tokenizer, vocab_for_tokens(tokenizer, manifest["audio_tokenizer"], "append", None, prompt_format)


def test_layouts_use_the_llm_ids_as_they_are(step_tokens):
    from audiotune.train.layouts import build_example

    tok, streams = step_tokens
    _, vocab = _vocab(tok)
    assert (vocab.audio_offset, vocab.codebook_size, vocab.lm_vocab_size) == (65536, 5120, 70656)
    row = _token_rows(tok)["u0"]
    ex = build_example(row, "tts", vocab)
    audio = ex.input_ids[(ex.input_ids >= 65536) & (ex.input_ids < 70656)]
    assert audio.tolist() == streams["u0"]


def test_step_audio_editx_frames(step_tokens):
    from audiotune.models.vocab import IGNORE_INDEX
    from audiotune.train.layouts import MissingField, build_example

    tok, streams = step_tokens
    tokenizer, vocab = _vocab(tok, "step-audio-editx")
    rows = _token_rows(tok)

    def text(s: str) -> list[int]:
        return tokenizer(s, add_special_tokens=False)["input_ids"]

    answer = [3, 4, *text("assistant\n")]
    for rid, layout in [("u0", "tts"), ("u1", "clone"), ("u2", "edit")]:
        ex = build_example(rows[rid], layout, vocab)
        ids, labels = ex.input_ids.tolist(), ex.labels.tolist()
        target = [*streams[rid], vocab.eos_id]
        assert ids[:2] == [1, 4] and ids[-len(target):] == target
        assert ids[-len(target) - len(answer):-len(target)] == answer
        assert labels == [IGNORE_INDEX] * (len(ids) - len(target)) + target  # loss on the answer only
        if layout != "tts":  # the prompt's stream sits in the frame as LM ids
            prompt = rows[rid]["prompt_codes"][0]
            assert any(ids[i:i + len(prompt)] == prompt for i in range(len(ids)))
    edit = build_example(rows["u2"], "edit", vocab).input_ids.tolist()
    human = [*text("human\n"), *rows["u2"]["instruction_ids"], *text("\n"), *rows["u2"]["prompt_codes"][0]]
    assert any(edit[i:i + len(human)] == human for i in range(len(edit)))
    with pytest.raises(MissingField, match="understand frame"):
        build_example(rows["u0"], "understand", vocab)


def test_train_llm_two_steps_on_step_tokens_with_a_base_covering_the_offsets(step_tokens, tmp_path, capsys):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from audiotune.cli import main as cli_main

    tok, _ = step_tokens
    base = tmp_path / "base"
    torch.manual_seed(0)
    config = AutoConfig.for_model("qwen2", vocab_size=70720, hidden_size=16, intermediate_size=32,
                                  num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                  tie_word_embeddings=False)
    AutoModelForCausalLM.from_config(config).save_pretrained(str(base))
    AutoTokenizer.from_pretrained(str(tok / "tokenizer")).save_pretrained(str(base))
    sets = ["tracking.enabled=false", "llm.mode=full", "llm.train.max_steps=2", "llm.train.log_every=1",
            "llm.train.eval_every=1000", "llm.train.save_every=1000", "llm.train.warmup_ratio=0",
            "llm.train.schedule=constant", "llm.train.batch_tokens=512", "llm.layout=tts",
            "llm.prompt_format=step-audio-editx"]
    args = ["train", "llm", "--tokens", str(tok), "--base-model", str(base)]
    out = tmp_path / "llm"
    assert cli_main([*args, "--output", str(out), *(a for s in sets for a in ("--set", s))]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["steps"] == 2 and np.isfinite(manifest["metrics"]["final_loss"])
    assert manifest["embedding_rows"] == manifest["base_vocab_size"] == 70720  # no audio rows appended
    assert manifest["config"]["audio_tokens"] == "offset" and manifest["config"]["audio_token_offset"] == 65536
    vocab = manifest["vocab"]
    assert vocab["audio_offset"] == 65536 and vocab["codebook_size"] == 5120
    assert vocab["code_stream"]["interleave"] == INTERLEAVE and vocab["prompt_format"]["name"] == "step-audio-editx"
    # an explicit other offset contradicts the Tokens: refused before training, naming both
    bad = ["--set", "llm.audio_tokens=offset", "--set", "llm.audio_token_offset=100"]
    capsys.readouterr()
    assert cli_main([*args, "--output", str(tmp_path / "bad"), *bad, "--set", sets[0]]) != 0
    assert "llm.audio_token_offset=100, but the Tokens hold LM ids from 65536" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()

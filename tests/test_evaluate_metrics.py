"""Evaluation metrics on generated audio with known answers, the bootstrap summary, the eval set and the gate.

Speech comes from espeak-ng (a Debian package `make setup` installs); without it these tests fail, saying so.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess

import numpy as np
import pytest
import soundfile as sf

from audiotune.config import EvaluateConfig, GateRule
from audiotune.evaluation import EvaluationError
from audiotune.evaluation.asr import error_rate, normalize
from audiotune.evaluation.evalset import EvalItem, EvalSet, from_jsonl
from audiotune.evaluation.gate import decide
from audiotune.evaluation.metrics import Sample, build_metrics
from audiotune.evaluation.report import bootstrap_mean, card_table, summarize

pytestmark = pytest.mark.usefixtures("one_thread")

SENTENCES = [
    "the quick brown fox jumps over the lazy dog", "she sells sea shells by the sea shore",
    "open the door and close the window", "my favourite colour is green",
    "please call stella and ask her to bring these things", "the weather is cold today",
    "we will meet again next tuesday morning", "turn left at the big red house", "i would like a cup of coffee",
    "the train leaves at seven o clock", "reading books makes me happy", "he plays the piano every evening",
]


def espeak(text: str, voice: str = "en-us", pitch: int = 50) -> tuple[np.ndarray, int]:
    """Speech for ``text`` by espeak-ng (fails the test, saying why, when espeak-ng is missing)."""
    if shutil.which("espeak-ng") is None:
        pytest.fail("espeak-ng is not installed: `make setup` installs it (apt-get install espeak-ng); the "
                    "evaluation tests need real speech")
    out = subprocess.run(["espeak-ng", "-v", voice, "-p", str(pitch), "--stdout", text], capture_output=True,
                         check=True, timeout=30).stdout
    wav, sr = sf.read(io.BytesIO(out), dtype="float32")
    return wav, sr


@pytest.fixture(scope="module")
def metrics():
    built, skipped = build_metrics(EvaluateConfig(), None)
    assert not skipped, skipped  # every default metric runs offline here
    return {m.name: m for m in built}


def test_dnsmos_ranks_a_clean_copy_above_a_noisy_one(metrics):
    wav, sr = espeak(SENTENCES[0])
    noisy = np.clip(wav + 0.05 * np.random.default_rng(0).standard_normal(len(wav)).astype(np.float32), -1, 1)
    clean = metrics["dnsmos"].score(Sample(text="", wav=wav, rate=sr))
    dirty = metrics["dnsmos"].score(Sample(text="", wav=noisy, rate=sr))
    assert clean["dnsmos_ovrl"] > dirty["dnsmos_ovrl"] + 0.5 and clean["dnsmos_bak"] > dirty["dnsmos_bak"]
    assert metrics["dnsmos"].score(Sample(text="", wav=np.zeros(10, np.float32), rate=sr)) == {}  # empty: no score


def test_the_same_speaker_is_more_similar_than_another_speaker(metrics):
    a1, sr = espeak(SENTENCES[1])
    a2, _ = espeak(SENTENCES[2])
    b2, _ = espeak(SENTENCES[2], voice="en+f4", pitch=80)
    same = metrics["sim"].score(Sample(text="", wav=a1, rate=sr, reference=(a2, sr)))["sim"]
    other = metrics["sim"].score(Sample(text="", wav=a1, rate=sr, reference=(b2, sr)))["sim"]
    assert same > other + 0.1
    assert metrics["sim"].score(Sample(text="", wav=a1, rate=sr, reference=(a1, sr)))["sim"] == pytest.approx(1.0)
    # no reference: the voice prompt is the reference
    assert metrics["sim"].score(Sample(text="", wav=a1, rate=sr, prompt=(a2, sr)))["sim"] == pytest.approx(same)


def test_wer_against_the_true_transcripts_is_clearly_lower_than_against_others(metrics):
    # pocketsphinx is weak on synthetic voices: rank over a set, not one sentence
    transcripts = []
    for text in SENTENCES:
        wav, sr = espeak(text)
        transcripts.append(metrics["wer"].score(Sample(text=text, wav=wav, rate=sr))["transcript"])
    table = np.array([[error_rate(ref, hyp, "en") for ref in SENTENCES] for hyp in transcripts])
    true, others = np.diag(table).mean(), table[~np.eye(len(SENTENCES), dtype=bool)].mean()
    assert true < others - 0.05, (true, others)


def test_error_rate_normalises_text_and_counts_an_empty_transcript_as_all_wrong():
    assert normalize("Hello,  World!", "en") == "hello world" and normalize("你好，世界", "zh") == "你好世界"
    assert error_rate("Hello world.", "hello WORLD", "en") == 0.0
    assert error_rate("hello world", "", "en") == 1.0
    assert error_rate("你好世界", "你好世", "zh") == pytest.approx(0.25)


def test_mcd_and_f0_of_a_signal_against_itself_are_zero(metrics):
    wav, sr = espeak(SENTENCES[3])
    same = Sample(text="", wav=wav, rate=sr, reference=(wav, sr))
    assert metrics["mcd"].score(same)["mcd"] == pytest.approx(0.0, abs=1e-6)
    pitch = metrics["f0"].score(same)
    assert pitch["f0_rmse"] == pytest.approx(0.0, abs=1e-6) and pitch["voicing_error"] == 0.0
    other, _ = espeak(SENTENCES[3], voice="en+f4", pitch=80)
    moved = Sample(text="", wav=other, rate=sr, reference=(wav, sr))
    assert metrics["mcd"].score(moved)["mcd"] > 1.0 and metrics["f0"].score(moved)["f0_rmse"] > 20
    assert metrics["mcd"].score(Sample(text="", wav=wav, rate=sr)) == {}  # no reference: no MCD


def test_duration_flags_empty_truncated_and_max_length_outputs(metrics):
    wav, sr = espeak(SENTENCES[4])
    d = metrics["duration"]
    full = d.score(Sample(text=SENTENCES[4], wav=wav, rate=sr, reference=(wav, sr)))
    assert full["duration_ratio"] == pytest.approx(1.0) and full["empty"] == full["truncated"] == 0.0
    cut = d.score(Sample(text=SENTENCES[4], wav=wav[: len(wav) // 4], rate=sr, reference=(wav, sr)))
    assert cut["truncated"] == 1.0 and cut["duration_ratio"] == pytest.approx(0.25, abs=0.01)
    silent = d.score(Sample(text=SENTENCES[4], wav=np.zeros(sr, np.float32), rate=sr))
    assert silent["empty"] == 1.0 and silent["truncated"] == 0.0
    assert d.score(Sample(text="x", wav=wav, rate=sr, hit_max_length=True))["max_length"] == 1.0


def test_a_metric_without_its_weights_is_skipped_with_its_reason(tmp_path):
    cfg = EvaluateConfig(metrics=["dnsmos", "sim", "wer", "duration"], dnsmos_model=str(tmp_path / "none"),
                         speaker_model=str(tmp_path / "campplus.onnx"), language="zh")
    built, skipped = build_metrics(cfg, cfg.speaker_model)
    assert [m.name for m in built] == ["duration"]
    assert "DNSMOS weights missing" in skipped["dnsmos"] and "campplus.onnx" in skipped["sim"]
    assert "no offline ASR model for language 'zh'" in skipped["wer"]


def test_the_summary_is_a_mean_with_a_95_percent_bootstrap_interval():
    values = np.random.default_rng(0).normal(3.0, 1.0, 200)
    mean, low, high = bootstrap_mean(values, 1000, 0)
    assert low < mean < high and high - low == pytest.approx(2 * 1.96 / np.sqrt(200), rel=0.2)
    assert bootstrap_mean(np.full(5, 2.0), 100, 0) == (2.0, 2.0, 2.0)
    rows = [{"id": "a", "wer": 0.5, "failed": 0.0, "empty": 0.0}, {"id": "b", "failed": 1.0},
            {"id": "c", "wer": 0.25, "failed": 0.0, "empty": 1.0}]
    summary = summarize(rows, 100, 0)
    assert summary["wer"]["mean"] == pytest.approx(0.375) and summary["wer"]["n"] == 2  # a failure has no WER
    assert summary["failed_rate"]["mean"] == pytest.approx(1 / 3) and summary["empty_rate"]["n"] == 2
    card = card_table(summary, {"wer": "pocketsphinx"}, {"sim": "no encoder"}, "f" * 64, 3)
    assert "| WER ↓ | 0.375 |" in card and "sim: skipped (no encoder)" in card


def test_the_eval_set_is_fingerprinted_and_bad_rows_are_named(tmp_path):
    wav, sr = espeak(SENTENCES[5])
    sf.write(tmp_path / "ref.wav", wav, sr)
    rows = [{"id": "b", "text": SENTENCES[5], "reference_wav": "ref.wav", "speaker": "s"}, {"id": "a", "text": "hi"}]
    (tmp_path / "set.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    first = from_jsonl(str(tmp_path / "set.jsonl"), 10)
    assert [i.id for i in first.items] == ["a", "b"] and first.items[1].reference_audio
    assert from_jsonl(str(tmp_path / "set.jsonl"), 10).fingerprint == first.fingerprint
    changed = EvalSet([EvalItem("a", "hi!"), first.items[1]], source="x")
    assert changed.fingerprint != first.fingerprint
    (tmp_path / "bad.jsonl").write_text(json.dumps({"id": "x", "text": "a", "prompt_wav": "p.wav"}) + "\n")
    with pytest.raises(EvaluationError, match=r"bad.jsonl line 1: 'prompt_wav' needs its transcript"):
        from_jsonl(str(tmp_path / "bad.jsonl"), 10)
    (tmp_path / "missing.jsonl").write_text(json.dumps({"text": "a", "reference_wav": "nope.wav"}) + "\n")
    with pytest.raises(EvaluationError, match=r"missing.jsonl line 1: reference_wav 'nope.wav' cannot be read"):
        from_jsonl(str(tmp_path / "missing.jsonl"), 10)


RULE = GateRule(metrics=["wer", "sim", "dnsmos_ovrl"], max_worse={"wer": 0.02}, require_better="any")
CHAMPION = {"wer": 0.30, "sim": 0.60, "dnsmos_ovrl": 2.5}


def test_the_gate_promotes_a_challenger_better_on_one_metric_and_within_bounds():
    d = decide({"wer": 0.31, "sim": 0.65, "dnsmos_ovrl": 2.5}, CHAMPION, RULE)
    assert d.promote and "better on sim 0.65 vs 0.6" in d.reason and "wer 0.31 vs 0.3" in d.reason


def test_the_gate_refuses_a_challenger_worse_beyond_a_bound():
    d = decide({"wer": 0.40, "sim": 0.70, "dnsmos_ovrl": 3.0}, CHAMPION, RULE)
    assert not d.promote and d.reason == "worse: wer 0.4 vs 0.3 (worse by 0.1, allowed 0.02)"
    same = decide(dict(CHAMPION), CHAMPION, RULE)
    assert not same.promote and same.reason.startswith("not better on any of wer, sim, dnsmos_ovrl")


def test_the_gate_refuses_to_decide_on_a_missing_metric():
    d = decide({"wer": 0.1, "dnsmos_ovrl": 3.0}, CHAMPION, RULE)
    assert not d.promote and d.reason.startswith("cannot decide: no value of sim (challenger)")
    assert decide({"wer": 0.9}, None, RULE).promote  # no champion yet

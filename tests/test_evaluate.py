"""The evaluate stage end to end on a tiny export: the Eval artifact, failure rows, overlap, the registry and the
gate (champion re-evaluated on the challenger's eval set)."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from types import SimpleNamespace

import pyarrow.parquet as pq
import pytest

from audiotune.config import load_config
from audiotune.evaluation import EvaluationError
from audiotune.stages.evaluate import evaluate
from audiotune.stages.export import export
from audiotune.stages.train_flow import train_flow
from audiotune.stages.train_llm import train_llm

pytestmark = pytest.mark.usefixtures("one_thread")

TRAIN = ["tracking.enabled=false", "run.num_workers=1", "llm.layout=tts", "llm.train.lr=1e-2",
         "llm.train.log_every=5", "flow.preset=tiny", "flow.num_samples=0", "flow.max_frames_in_batch=3000",
         "flow.train.log_every=5", "flow.train.lr=1e-3", "llm.train.max_steps=6", "flow.train.max_steps=4"]
FAST = ["export.synthesis.max_audio_s=1.5", "evaluate.bootstrap=200", "evaluate.max_utterances=2"]


@pytest.fixture(scope="module")
def exported(llm_tokens, llm_base, tmp_path_factory) -> SimpleNamespace:
    """A tiny LoRA LLM + flow exported (not registered)."""
    root = tmp_path_factory.mktemp("eval-inputs")
    cfg = load_config(None, TRAIN)
    train_llm(cfg, tokens=str(llm_tokens), output=str(root / "llm"), base_model=str(llm_base))
    train_flow(cfg, tokens=str(llm_tokens), output=str(root / "flow"))
    export(load_config(None, ["tracking.enabled=false", "export.num_samples=0"]), str(root / "export"),
           llm=str(root / "llm"), flow=str(root / "flow"))
    dataset = json.loads((llm_tokens / "manifest.json").read_text())["dataset"]
    return SimpleNamespace(root=root, export=root / "export", llm=root / "llm", flow=root / "flow",
                           dataset=Path(dataset))


def test_the_stage_writes_an_eval_artifact_of_the_exports_validation_rows(exported, tmp_path):
    cfg = load_config(None, ["tracking.enabled=false", *FAST])
    result = evaluate(cfg, str(exported.export), str(tmp_path / "eval"))
    out = tmp_path / "eval"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kind"] == "audiotune.eval" and manifest["utterances"] == 2 and manifest["skipped"] == {}
    assert manifest["eval_set_uri"] == str(exported.dataset) and len(manifest["eval_set_fingerprint"]) == 64
    rows = pq.read_table(out / "utterances.parquet").to_pylist()
    assert len(rows) == 2 and all((out / r["wav"]).is_file() for r in rows if not r["failed"])
    for name in ("wer", "sim", "dnsmos_ovrl", "mcd", "f0_rmse", "duration_ratio", "bad_rate", "failed_rate"):
        s = result.summary[name]  # f0_rmse of noise has no frame voiced in both: n == 0, NaN, said so in the card
        assert s["n"] == 0 or s["low"] <= s["mean"] <= s["high"], name
    assert "| WER ↓ |" in manifest["card"] and "pocketsphinx" in manifest["card"]
    assert (out / "plots" / "histograms.png").is_file() and (out / "transcripts.jsonl").is_file()
    card = (out / "model_card.md").read_text()  # the export's card with the eval table
    assert card.count("## Evaluation (2 utterances") == 1 and "## Use it" in card
    assert set(manifest["audio_s_per_cpu_s"]) >= {"synthesis", "dnsmos", "sim", "wer", "mcd", "f0"}
    print(json.dumps(manifest["audio_s_per_cpu_s"]), json.dumps(result.means()))


def test_a_failed_utterance_is_a_counted_row_and_overlap_is_reported(exported, tmp_path, caplog, capsys):
    train = pq.read_table(next((exported.dataset / "train").glob("part-*.parquet")),
                          columns=["id", "text", "speaker"]).to_pylist()[0]
    (tmp_path / "not-audio.wav").write_bytes(b"not audio at all")
    rows = [{"id": "ok", "text": "hello there"},
            {"id": "broken", "text": "a prompt that is not audio", "prompt_wav": "not-audio.wav", "prompt_text": "x"},
            {"id": "seen", "text": train["text"], "speaker": train["speaker"]}]
    (tmp_path / "set.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(None, ["tracking.enabled=false", *FAST, "evaluate.max_utterances=5",
                             "evaluate.metrics=[duration]"])
    result = evaluate(cfg, str(exported.export), str(tmp_path / "eval"), eval_set=str(tmp_path / "set.jsonl"))
    assert result.manifest["utterances"] == 3 and result.manifest["failures"] == 1
    table = {r["id"]: r for r in pq.read_table(tmp_path / "eval" / "utterances.parquet").to_pylist()}
    assert table["broken"]["failed"] == 1.0 and "cannot read the prompt audio" in table["broken"]["error"]
    assert result.summary["failed_rate"]["mean"] == pytest.approx(1 / 3)
    assert result.manifest["overlap_with_training"] == 1 and "1 of its 3 utterances are training rows" in caplog.text
    from audiotune.cli import main as cli_main

    capsys.readouterr()
    code = cli_main(["evaluate", "--model", str(exported.export), "--eval-set", str(tmp_path / "set.jsonl"),
                     "--output", str(tmp_path / "refused"), "--set", "tracking.enabled=false", "--set",
                     "evaluate.forbid_overlap=true"])
    stderr = capsys.readouterr().err
    assert code == 1 and "evaluate.forbid_overlap is on" in stderr, stderr[-2000:]
    with pytest.raises(EvaluationError, match="no eval set given and the export records no Dataset"):
        _without_dataset(exported, tmp_path, cfg)


def _without_dataset(exported, tmp_path, cfg):
    """An export whose manifest records no Tokens: no default eval set."""
    import shutil

    copy = tmp_path / "export-copy"
    shutil.copytree(exported.export, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["tokens"] = None
    (copy / "manifest.json").write_text(json.dumps(manifest))
    evaluate(cfg, str(copy), str(tmp_path / "none"))


def test_evaluation_is_recorded_on_the_version_and_gates_promotion(exported, mlflow_server, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from audiotune.export import registry
    from audiotune.stages.evaluate import champion_evaluator

    monkeypatch.delenv("RANK", raising=False)
    name = f"voice-{uuid.uuid4().hex[:6]}"
    common = [f"tracking.uri={mlflow_server}", f"tracking.experiment=exp-{name}",
              f"export.registered_model_name={name}", *FAST, "evaluate.metrics=[duration, mcd]",
              "evaluate.gate.metrics=[bad_rate, mcd]", "evaluate.gate.require_better=none",
              "evaluate.gate.max_worse={mcd: 1000}"]
    cfg = load_config(None, common)
    # `audiotune export` by hand registered version 1; evaluate adds its metrics to that version
    first = export(load_config(None, [*common, "export.num_samples=0"]), str(tmp_path / "first"),
                   llm=str(exported.llm), flow=str(exported.flow))
    assert first.registered_version == "1"
    result = evaluate(cfg, str(tmp_path / "first"), str(tmp_path / "eval1"))
    client = MlflowClient(mlflow_server)
    version = client.get_model_version(name, "1")
    assert result.registered_version == "1" and version.tags["eval_set_fingerprint"] == \
        result.manifest["eval_set_fingerprint"]
    assert float(version.tags["metric.mcd"]) == pytest.approx(result.summary["mcd"]["mean"])
    assert "| MCD (dB) ↓ |" in version.description
    client.set_registered_model_alias(name, "champion", "1")
    # the pipeline's way: an unregistered export, registered by evaluate, on another eval set (one utterance)
    second = evaluate(load_config(None, [*common, "evaluate.max_utterances=1"]), str(exported.export),
                      str(tmp_path / "eval2"))
    assert second.registered_version == "2"
    fingerprint = second.manifest["eval_set_fingerprint"]
    assert registry.eval_means(cfg.tracking, name, "1", fingerprint) is None
    outcome = registry.promote_gated(cfg.tracking, name, cfg.evaluate.gate, evaluator=champion_evaluator(
        load_config(None, [*common, "evaluate.max_utterances=1"])))
    # the champion was evaluated on the challenger's set; the decision is one line naming the metrics
    assert registry.eval_means(cfg.tracking, name, "1", fingerprint) is not None
    assert "\n" not in outcome.message and "bad_rate" in outcome.message
    assert outcome.promoted == ("is the new champion" in outcome.message)
    plots = {a.path for a in client.list_artifacts(client.get_model_version(name, "2").run_id, "eval/plots")}
    assert "eval/plots/champion_vs_challenger.png" in plots and "eval/plots/histograms.png" in plots
    # a gate on a metric nobody measured refuses to decide
    client.set_registered_model_alias(name, "champion", "1")
    refused = registry.promote_gated(cfg.tracking, name, cfg.evaluate.gate.model_copy(update={"metrics": ["wer"]}),
                                     version="2")
    assert not refused.promoted and "cannot decide: no value of wer" in refused.message

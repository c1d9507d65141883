"""The pipeline's bookkeeping without Kubeflow: the MLflow parent run, nesting of (cached) stage runs,
the exit handler, and the source fingerprint behind the convert task's cache key."""

import json
import os
import time

import pytest
from mlflow import MlflowClient

from audiotune import tracking
from audiotune.config import AudiotuneConfig
from audiotune.orchestration import runs, steps
from audiotune.orchestration.source_fingerprint import source_fingerprint
from tests.helpers import good_corpus


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default local MLflow store is ./mlruns
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


def _client() -> MlflowClient:
    return MlflowClient(tracking.resolve_uri(AudiotuneConfig().tracking))


def _runs(experiment: str = "audiotune"):
    client = _client()
    exp = client.get_experiment_by_name(experiment)
    return {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}


def test_prepare_opens_the_parent_run_and_hands_out_cache_stable_configs(workdir):
    manifest = good_corpus(workdir / "corpus", 3)
    p = steps.prepare({"llm": {"train": {"max_steps": 3}}}, {"source_uri": str(manifest), "mode": "llm"}, "kfp-1")
    parent = _runs()["audiotune"]
    assert p.parent_run_id == parent.info.run_id
    assert parent.data.tags[runs.PIPELINE_RUN_TAG] == "kfp-1" and parent.info.status == "RUNNING"
    assert parent.data.params["pipeline.source_uri"] == str(manifest)
    full = json.loads(p.config)
    assert full["tracking"]["parent_run_id"] == p.parent_run_id and full["llm"]["train"]["max_steps"] == 3
    convert = json.loads(p.convert_config)
    assert set(convert) <= {"run", "tracking", "convert"} and "parent_run_id" not in convert.get("tracking", {})
    assert p.mode == "llm" and p.run_joint is False and p.source_fingerprint.startswith("sha256:")
    # a second pipeline run with the same data and settings gives the same cache inputs
    again = steps.prepare({"llm": {"train": {"max_steps": 3}}}, {"source_uri": str(manifest), "mode": "llm"}, "kfp-2")
    assert (again.convert_config, again.source_fingerprint) == (p.convert_config, p.source_fingerprint)
    assert again.parent_run_id != p.parent_run_id


def test_prepare_refuses_a_bad_config_naming_the_field(workdir):
    from audiotune.config import ConfigError

    with pytest.raises(ConfigError, match=r"llm\.train\.lr"):
        steps.prepare({"llm": {"train": {"lr": -1}}}, {"source_uri": "x"}, "kfp-1")
    with pytest.raises(steps.StepError, match="source_uri"):
        steps.prepare({}, {}, "kfp-1")
    # what the training tasks would otherwise find out only after convert and tokenize (and their retries)
    with pytest.raises(ConfigError, match=r"cluster\.num_nodes=2 needs pipeline\.output_uri"):
        steps.prepare({"cluster": {"num_nodes": 2}}, {"source_uri": "x"}, "kfp-1")
    with pytest.raises(ConfigError, match=r"zero_stage=auto .*cluster\.gpu_type"):
        steps.prepare({"cluster": {"num_nodes": 2}}, {"source_uri": "x", "zero_stage": "auto",
                                                      "output_uri": "s3://bucket/out"}, "kfp-1")
    assert not (workdir / "mlruns").exists()  # refused before the MLflow parent run is opened


def test_link_nests_fresh_runs_and_records_cached_ones(workdir):
    cfg = AudiotuneConfig().tracking
    first = runs.start(AudiotuneConfig(), "kfp-1", {})
    with tracking.stage_run(cfg, "convert") as tracker:  # a cached task's run: created without a parent
        tracker.log_metrics({"rows_train": 28})
        convert_run = tracker.run_id
    assert runs.link(cfg, first, "convert", convert_run) == convert_run
    assert _client().get_run(convert_run).data.tags[tracking.PARENT_TAG] == first
    # a later pipeline run served convert from the Kubeflow cache: the same run id comes back
    second = runs.start(AudiotuneConfig(), "kfp-2", {})
    stub = runs.link(cfg, second, "convert", convert_run)
    assert stub != convert_run
    stub_run = _client().get_run(stub)
    assert stub_run.info.run_name == "convert (cached)" and stub_run.data.tags[tracking.PARENT_TAG] == second
    assert stub_run.data.tags[runs.CACHED_FROM_TAG] == convert_run and stub_run.data.metrics["rows_train"] == 28
    assert _client().get_run(convert_run).data.tags[tracking.PARENT_TAG] == first  # not moved


def test_claim_finds_the_uniquely_named_stage_run(workdir):
    cfg = AudiotuneConfig().tracking
    cfg.run_name = runs.unique_run_name("tokenize")
    with tracking.stage_run(cfg, "tokenize") as tracker:
        expected = tracker.run_id
    assert runs.claim(cfg, cfg.run_name, "tokenize") == expected
    assert _client().get_run(expected).info.run_name == "tokenize"


@pytest.mark.parametrize("state, status", [("SUCCEEDED", "FINISHED"), ("FAILED", "FAILED")])
def test_the_exit_handler_ends_the_parent_run(workdir, state, status):
    parent = runs.start(AudiotuneConfig(), "kfp-9", {})
    steps.finish({}, {"mlflow_experiment": "audiotune"}, "kfp-9",
                 {"state": state, "error": {"message": "Task train-llm failed." if state == "FAILED" else None}})
    run = _client().get_run(parent)
    assert run.info.status == status and run.data.tags["audiotune.pipeline_state"] == state
    if state == "FAILED":
        assert run.data.tags["audiotune.error"] == "Task train-llm failed."


def test_the_exit_handler_copes_with_a_config_that_never_validated(workdir):
    # the pipeline failed in prepare_run on this config: there is no parent run to end, and no error
    steps.finish({"llm": {"train": {"lr": -1}}}, {"mlflow_experiment": "audiotune"}, "kfp-x",
                 {"state": "FAILED", "error": {"message": "bad config"}})


def test_fingerprint_follows_the_data(tmp_path):
    manifest = good_corpus(tmp_path / "corpus", 3)
    a = source_fingerprint(str(manifest))
    assert source_fingerprint(str(manifest)) == a
    assert source_fingerprint(str(tmp_path / "corpus")) == a  # a manifest stands for its folder
    wav = next((tmp_path / "corpus" / "wavs").iterdir())
    stamp = wav.stat().st_mtime_ns + 10**9
    os.utime(wav, ns=(stamp, stamp))
    assert source_fingerprint(str(manifest)) != a
    with pytest.raises(FileNotFoundError):
        source_fingerprint(str(tmp_path / "missing"))


def test_fingerprint_on_s3(s3_env, tmp_path):
    from audiotune import storage

    storage.upload_dir(good_corpus(tmp_path / "corpus", 2).parent, f"{s3_env}/corpus")
    uri = f"{s3_env}/corpus/manifest.jsonl"
    a = source_fingerprint(uri)
    assert a == source_fingerprint(uri) == source_fingerprint(f"{s3_env}/corpus")
    time.sleep(0.01)
    storage.write_bytes(f"{s3_env}/corpus/wavs/utt00000.wav", b"changed")
    assert source_fingerprint(uri) != a

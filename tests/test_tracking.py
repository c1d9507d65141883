"""tracking: parent and nested stage runs against a real MLflow server on 127.0.0.1."""

from __future__ import annotations

import time
import uuid

import pytest
from mlflow import MlflowClient
from pydantic import BaseModel

from audiotune import tracking


class TrackingConfig(BaseModel):
    """Stand-in with the fields of ``audiotune.config.TrackingConfig``."""

    enabled: bool = True
    uri: str | None = None
    experiment: str = "audiotune"
    parent_run_id: str | None = None
    run_name: str | None = None
    request_timeout_s: float = 20.0
    request_retries: int = 1
    retry_every_s: float = 60.0
    spool_dir: str | None = None


@pytest.fixture(autouse=True)
def _rank0(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def _cfg(server: str, **kw) -> TrackingConfig:
    return TrackingConfig(uri=server, experiment=f"exp-{uuid.uuid4().hex[:8]}", **kw)


def test_parent_and_nested_stage_run(mlflow_server, tmp_path):
    cfg = _cfg(mlflow_server)
    parent = tracking.start_parent_run(cfg, "pipeline", tags={"mode": "llm"})
    assert parent
    (tmp_path / "report.json").write_text('{"rows": 3}')
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "x.txt").write_text("x")
    stage_cfg = cfg.model_copy(update={"parent_run_id": parent})
    params = {"convert": {"sample_rate": 16000, "long": "v" * 7000, "tags": [1, 2]},
              **{f"p{i}": i for i in range(150)}}
    with tracking.stage_run(stage_cfg, "convert") as tracker:
        tracker.log_params(params)
        tracker.log_metrics({"rows": 3, "loss": {"train": 0.5}}, step=2)
        tracker.log_artifact(tmp_path / "report.json")
        tracker.log_artifacts(tmp_path / "dir", artifact_path="more")
        tracker.log_dict({"a": 1}, "config.json")
        tracker.set_tags({"dataset_fingerprint": "abc"})
        run_id = tracker.run_id

    client = MlflowClient(mlflow_server)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "convert"
    assert run.info.experiment_id == client.get_run(parent).info.experiment_id
    assert run.data.tags["mlflow.parentRunId"] == parent
    assert run.data.tags["audiotune.stage"] == "convert"
    assert run.data.tags["dataset_fingerprint"] == "abc"
    assert run.data.params["convert.sample_rate"] == "16000"
    assert run.data.params["convert.tags"] == "[1, 2]"
    assert len(run.data.params["convert.long"]) == tracking.MAX_PARAM_VALUE_LENGTH
    assert run.data.params["p149"] == "149"
    assert run.data.metrics == {"rows": 3.0, "loss.train": 0.5}
    assert client.get_metric_history(run_id, "rows")[0].step == 2
    paths = {a.path for a in client.list_artifacts(run_id)} | {a.path for a in client.list_artifacts(run_id, "more")}
    assert {"report.json", "config.json", "more/x.txt"} <= paths
    assert client.get_run(parent).data.tags["mode"] == "llm"
    children = client.search_runs([run.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'")
    assert [c.info.run_id for c in children] == [run_id]
    tracking.end_run(cfg, parent)
    assert client.get_run(parent).info.status == "FINISHED"


def test_failed_stage_is_marked_failed(mlflow_server):
    cfg = _cfg(mlflow_server, run_name="custom")
    with pytest.raises(ValueError, match="bad row"):
        with tracking.stage_run(cfg, "tokenize") as tracker:
            run_id = tracker.run_id
            raise ValueError("bad row")
    run = MlflowClient(mlflow_server).get_run(run_id)
    assert run.info.status == "FAILED" and run.info.run_name == "custom"
    assert "mlflow.parentRunId" not in run.data.tags


def test_unknown_parent_run_is_a_clear_error(mlflow_server):
    cfg = _cfg(mlflow_server, parent_run_id="0" * 32)
    with pytest.raises(tracking.TrackingError, match="parent run"):
        with tracking.stage_run(cfg, "convert"):
            pass


def test_metric_must_be_numeric(mlflow_server):
    with pytest.raises(TypeError, match="'name'"):
        with tracking.stage_run(_cfg(mlflow_server), "convert") as tracker:
            tracker.log_metrics({"name": "abc"})


def _assert_inert(cfg: TrackingConfig, tmp_path) -> None:
    assert tracking.start_parent_run(cfg, "pipeline") is None
    with tracking.stage_run(cfg, "convert") as tracker:
        assert tracker.run_id is None and not tracker.active
        tracker.log_params({"a": {"b": 1}})
        tracker.log_metrics({"m": 1.0}, step=1)
        tracker.log_artifact(tmp_path / "missing.json")
        tracker.log_artifacts(tmp_path)
        tracker.log_dict({}, "x.json")
        tracker.set_tags({"t": 1})
    tracking.end_run(cfg, None)


def test_disabled_is_a_noop(tmp_path):
    # an unreachable URI proves nothing is contacted
    _assert_inert(TrackingConfig(enabled=False, uri="http://127.0.0.1:1"), tmp_path)


def test_nonzero_rank_is_a_noop(monkeypatch, tmp_path):
    monkeypatch.setenv("RANK", "1")
    _assert_inert(TrackingConfig(uri="http://127.0.0.1:1"), tmp_path)


def test_unreachable_server_fails_fast_and_clearly():
    cfg = TrackingConfig(uri="http://127.0.0.1:1")
    start = time.monotonic()
    with pytest.raises(tracking.TrackingError, match=r"http://127\.0\.0\.1:1.*unreachable"):
        tracking.start_parent_run(cfg, "pipeline")
    with pytest.raises(tracking.TrackingError, match="unreachable"):
        with tracking.stage_run(cfg, "convert"):
            raise AssertionError("the block must not run")
    assert time.monotonic() - start < 10


def test_uri_resolution_and_local_default(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert tracking.resolve_uri(TrackingConfig(uri="http://x:5000")) == "http://x:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:5000")
    assert tracking.resolve_uri(TrackingConfig()) == "http://env:5000"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    cfg = TrackingConfig(experiment="local")
    assert tracking.resolve_uri(cfg) == f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    (tmp_path / "a.txt").write_text("a")
    with tracking.stage_run(cfg, "convert") as tracker:
        tracker.log_artifact(tmp_path / "a.txt")
    client = MlflowClient(tracking.resolve_uri(cfg))
    exp = client.get_experiment_by_name("local")
    assert exp.artifact_location == (tmp_path / "mlruns" / "artifacts").as_uri()
    assert list((tmp_path / "mlruns" / "artifacts").rglob("a.txt"))
    assert client.get_run(tracker.run_id).info.status == "FINISHED"

"""The convert stage against real servers on 127.0.0.1: S3 (moto server) and MLflow."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import boto3
import pyarrow.parquet as pq
import soundfile as sf
from mlflow import MlflowClient

from audiotune import storage, tracking
from audiotune.config import load_config
from audiotune.stages.convert import convert
from tests.helpers import good_corpus


def test_s3_source_to_s3_dataset(tmp_path, s3_env):
    src = good_corpus(tmp_path / "src", 8, sr=44100)
    storage.upload_dir(tmp_path / "src", f"{s3_env}/corpus")
    out = f"{s3_env}/datasets/demo"
    cfg = load_config(None, ["tracking.enabled=false", "convert.val_fraction=0.25"])
    result = convert(cfg, source=f"{s3_env}/corpus/{src.name}", output=out)
    files = storage.list_files(out)
    assert "manifest.json" in files and "quarantine.jsonl" in files and "report.json" in files
    manifest = json.loads(storage.read_text(f"{out}/manifest.json"))
    assert manifest["kind"] == "audiotune.dataset" and manifest == result.manifest
    local = storage.download(out, tmp_path / "down")
    rows = []
    for split in ("train", "val"):
        for shard in manifest["splits"][split]["shards"]:
            rows.extend(pq.read_table(local / split / shard["file"]).to_pylist())
    assert len(rows) == 8
    wav, sr = sf.read(io.BytesIO(rows[0]["audio"]))
    assert sr == 22050 and wav.ndim == 1
    # the object store holds exactly what the manifest lists
    bucket = s3_env[len("s3://"):]
    keys = {o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=bucket, Prefix="datasets/demo/")["Contents"]}
    listed = {f"datasets/demo/{s}/{sh['file']}" for s in ("train", "val") for sh in manifest["splits"][s]["shards"]}
    assert listed <= keys


def test_cli_with_s3_and_mlflow(tmp_path, s3_env, mlflow_server, monkeypatch):
    """The command line, as a subprocess, against both servers: nested run with params, metrics, report."""
    src = good_corpus(tmp_path / "src", 6)
    cfg = load_config(None, [f"tracking.uri={mlflow_server}", "tracking.experiment=convert-it"])
    parent = tracking.start_parent_run(cfg.tracking, "pipeline-run")
    out = f"{s3_env}/ds"
    proc = subprocess.run(
        [sys.executable, "-m", "audiotune.cli", "convert", "--source", str(src), "--output", out,
         "--set", f"tracking.uri={mlflow_server}", "--set", "tracking.experiment=convert-it",
         "--set", f"tracking.parent_run_id={parent}", "--set", "convert.sample_rate=16000"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert storage.exists(f"{out}/manifest.json")
    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("convert-it")
    children = client.search_runs([exp.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent}'")
    assert len(children) == 1
    run = children[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["convert.sample_rate"] == "16000"
    assert run.data.metrics["rows_input"] == 6 and run.data.metrics["rows_quarantined"] == 0
    assert run.data.metrics["audio_s_per_s"] > 0
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"report.json", "duration_histogram.png", "quarantine.jsonl"} <= names

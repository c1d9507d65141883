"""The llm stage against real servers: S3 (moto) for inputs, output and checkpoints; MLflow for tracking."""

from __future__ import annotations

import json
import uuid

import torch
from mlflow import MlflowClient
from safetensors.torch import load_file

from audiotune import storage, tracking
from audiotune.config import load_config
from audiotune.stages.train_llm import train_llm

FAST = ["run.num_workers=1", "llm.train.log_every=1", "llm.train.eval_every=2", "llm.train.batch_tokens=2048",
        "llm.train.schedule=cosine", "llm.train.warmup_steps=1", "llm.mode=lora", "llm.layout=tts",
        "llm.lora.dropout=0", "llm.train.lr=5e-3"]


def test_s3_inputs_output_and_checkpoints_resume_exactly(llm_tokens, llm_base, s3_env, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    storage.upload_dir(llm_tokens, f"{s3_env}/tokens")
    storage.upload_dir(llm_base, f"{s3_env}/base")
    cfg = load_config(None, [*FAST, "tracking.enabled=false", "llm.train.max_steps=6", "llm.train.save_every=2",
                             "llm.train.keep_last=1"])
    whole = train_llm(cfg, tokens=f"{s3_env}/tokens", output=f"{s3_env}/llm", base_model=f"{s3_env}/base")
    assert whole.metrics["steps"] == 6
    done = storage.list_files(f"{s3_env}/llm.checkpoints")
    manifests = sorted(f for f in done if f.endswith("manifest.json"))
    # keep_last=1 plus the best by validation loss; every kept checkpoint is complete and small (LoRA only)
    best = whole.metrics["best_step"]
    assert manifests == sorted({"checkpoint-6/manifest.json", f"checkpoint-{best}/manifest.json"}), (best, manifests)
    assert {f.split("/")[0] for f in done} == {m.split("/")[0] for m in manifests}  # pruned ones fully gone
    assert not any(f.endswith((".pkl", ".bin")) for f in done)  # no pickle in checkpoints

    # resume from a mid-run checkpoint on S3 into a new output: the result equals the uninterrupted run
    mid = min(int(m.split("/")[0].split("-")[1]) for m in manifests)
    if mid == 6:  # the best was the last: write a mid checkpoint by running to step 4
        cfg4 = load_config(None, [*FAST, "tracking.enabled=false", "llm.train.max_steps=6",
                                  "llm.train.save_every=4", "llm.train.keep_last=5"])
        train_llm(cfg4, tokens=f"{s3_env}/tokens", output=f"{s3_env}/llm4", base_model=f"{s3_env}/base")
        source, mid = f"{s3_env}/llm4.checkpoints/checkpoint-4", 4
    else:
        source = f"{s3_env}/llm.checkpoints/checkpoint-{mid}"
    resumed_cfg = load_config(None, [*FAST, "tracking.enabled=false", "llm.train.max_steps=6",
                                     "llm.train.save_every=100", f"llm.train.resume={source}"])
    resumed = train_llm(resumed_cfg, tokens=f"{s3_env}/tokens", output=f"{s3_env}/resumed",
                        base_model=f"{s3_env}/base")
    assert resumed.metrics["steps"] == 6
    a = load_file(str(storage.local_copy(f"{s3_env}/llm") / "adapter_model.safetensors"))
    b = load_file(str(storage.local_copy(f"{s3_env}/resumed") / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # the published artifact loads with plain PEFT calls after download
    from peft import PeftModel

    from audiotune.models.lm import load_trained

    model, manifest = load_trained(storage.local_copy(f"{s3_env}/llm"), llm_base)
    assert isinstance(model, PeftModel) and manifest["base_model"] == f"{s3_env}/base"


def test_nested_mlflow_run_has_params_metrics_and_the_loss_curve(llm_tokens, llm_base, mlflow_server, tmp_path,
                                                                 monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    experiment = f"llm-{uuid.uuid4().hex[:8]}"
    cfg = load_config(None, [*FAST, f"tracking.uri={mlflow_server}", f"tracking.experiment={experiment}",
                             "llm.train.max_steps=4", "llm.train.save_every=100"])
    parent = tracking.start_parent_run(cfg.tracking, "pipeline")
    cfg = load_config(None, [*FAST, f"tracking.uri={mlflow_server}", f"tracking.experiment={experiment}",
                             f"tracking.parent_run_id={parent}", "llm.train.max_steps=4",
                             "llm.train.save_every=100"])
    train_llm(cfg, tokens=str(llm_tokens), output=str(tmp_path / "llm"), base_model=str(llm_base))
    client = MlflowClient(mlflow_server)
    runs = client.search_runs([client.get_run(parent).info.experiment_id],
                              f"tags.`mlflow.parentRunId` = '{parent}'")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED" and run.data.tags["audiotune.stage"] == "llm"
    assert run.data.params["llm.lora.r"] == "16" and run.data.params["llm.mode"] == "lora"
    assert int(run.data.params["model.trainable_parameters"]) < int(run.data.params["model.total_parameters"])
    for key in ("loss", "val_loss", "lr", "grad_norm", "tokens_per_s", "samples_per_s", "peak_memory_mb",
                "final_loss"):
        assert key in run.data.metrics, key
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in history] == [1, 2, 3, 4]
    lrs = [m.value for m in client.get_metric_history(run.info.run_id, "lr")]
    assert lrs[0] > lrs[-1]  # the cosine schedule decays
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"loss_curve.png", "metrics.json"} <= names
    assert json.loads((tmp_path / "llm" / "metrics.json").read_text())["steps"] == 4

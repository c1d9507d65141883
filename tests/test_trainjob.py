"""Multi-node training through a Kubeflow Trainer v2 TrainJob: the manifest against the vendored TrainJob CRD (Trainer
v2.3.0) and Kubernetes' own schemas, the torchrun command under the Trainer's PET_* variables, secrets by reference,
and create / follow / fail / re-attach / delete against a Kubernetes API on 127.0.0.1 that validates what it gets."""

from __future__ import annotations

import copy
import json
import logging
import re
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from audiotune.cluster import JobError, JobFailedError, JobSpec, launcher
from audiotune.cluster.jobs import JobConflictError
from audiotune.cluster.kube import TRAINJOB, rbac_rules
from audiotune.cluster.pytorchjob_manifest import job_name
from audiotune.cluster.trainjob import (
    MLFLOW_KEYS,
    S3_KEYS,
    build_trainjob,
    run_trainjob,
    trainjob_command,
    trainjob_status,
)
from audiotune.config import ClusterSettings, validate
from tests import cluster_helpers
from tests.cluster_helpers import FAST, GPU_TOLERATIONS, K8S_VERSION, RUN_ID, rbac_use
from tests.fake_kube import TRAINJOB_FAIL_MESSAGE, FakeKube

CRD = Path(__file__).parent / "fixtures" / "k8s" / "trainer.kubeflow.org_trainjobs.yaml"
ARGV = ["train", "llm", "--tokens", "s3://bucket/tokens", "--output", "s3://bucket/llm"]
KEYS = {"audiotune-s3": S3_KEYS, "audiotune-mlflow": MLFLOW_KEYS}


def _spec(**kw) -> JobSpec:
    return cluster_helpers.job_spec(ARGV, **kw)


FULL = dict(
    cpu="32", memory="480Gi", shm_size="64Gi", node_selector={"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
    tolerations=GPU_TOLERATIONS,
    env={"NCCL_DEBUG": "WARN", "MLFLOW_RUN_ID": "0123abcd"}, secrets=["audiotune-s3", "audiotune-mlflow"],
    secret_env={"HF_TOKEN": "hf:token"}, service_account="audiotune", model_cache_pvc="audiotune-model-cache",
    image_pull_secrets=["regcred"], labels={"team": "speech"}, annotations={"owner": "speech@example.com"},
    timeout_s=3600,
)


@pytest.fixture(scope="module")
def crd_schema():
    return cluster_helpers.crd_schema(CRD, "trainer.kubeflow.org", "TrainJob", "v1alpha1")


def _pod_patch(manifest):
    [patch] = manifest["spec"]["runtimePatches"]
    [node] = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    assert node["name"] == "node"
    return node["template"]["spec"]["template"]


# --- the manifest -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["minimal", "full", "cpu-only"])
def test_manifest_validates_against_the_crd_and_core_schemas(crd_schema, case):
    spec = {"minimal": _spec(), "full": _spec(**FULL), "cpu-only": _spec(gpus_per_node=0, shm_size=None)}[case]
    manifest = build_trainjob(spec, secret_keys=KEYS)
    jsonschema.validate(manifest, crd_schema)
    name = manifest["metadata"]["name"]
    assert re.match(r"^[a-z]([-a-z0-9]*[a-z0-9])?$", name) and len(name) <= 45  # the CRD's CEL rule on the name
    kubernetes_validate.validate({"apiVersion": "v1", "kind": "ConfigMap", "metadata": manifest["metadata"]},
                                 K8S_VERSION, strict=True)
    template = _pod_patch(manifest)
    pod = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": name, "namespace": "ml"},
           "template": {"metadata": template["metadata"], "spec": {**template["spec"], "containers": [
               {"name": "node", "image": spec.image, "command": manifest["spec"]["trainer"]["command"],
                "env": manifest["spec"]["trainer"].get("env", []),
                "resources": manifest["spec"]["trainer"]["resourcesPerNode"],
                **{k: v for c in template["spec"].get("containers", []) for k, v in c.items() if k != "name"}}]}}}
    kubernetes_validate.validate(pod, K8S_VERSION, strict=True)  # the patched pod as the JobSet will make it


def test_schema_check_catches_mistakes(crd_schema):
    manifest = build_trainjob(_spec(**FULL), secret_keys=KEYS)
    bad = copy.deepcopy(manifest)
    bad["spec"]["podTemplateOverrides"] = [{"targetJobs": [{"name": "node"}]}]  # removed in Trainer 2.2
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, crd_schema)
    bad = copy.deepcopy(manifest)
    bad["spec"]["trainer"]["numNodes"] = "three"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, crd_schema)


def test_manifest_has_what_the_trainer_and_torchrun_need():
    spec = _spec(**FULL)
    m = build_trainjob(spec, secret_keys=KEYS)
    assert (m["apiVersion"], m["kind"]) == ("trainer.kubeflow.org/v1alpha1", "TrainJob")
    assert m["spec"]["runtimeRef"] == {"apiGroup": "trainer.kubeflow.org", "kind": "ClusterTrainingRuntime",
                                       "name": "torch-distributed"}
    trainer = m["spec"]["trainer"]
    assert (trainer["numNodes"], trainer["numProcPerNode"], trainer["image"]) == (3, 8, spec.image)
    assert trainer["resourcesPerNode"] == {"requests": {"cpu": "32", "memory": "480Gi", "nvidia.com/gpu": "8"},
                                           "limits": {"memory": "480Gi", "nvidia.com/gpu": "8"}}
    assert {"name": "MLFLOW_RUN_ID", "value": "0123abcd"} in trainer["env"]
    assert {"name": "HF_HOME", "value": "/cache/huggingface"} in trainer["env"]
    [patch] = m["spec"]["runtimePatches"]
    assert patch["manager"] == "audiotune.io/launcher"
    pod = _pod_patch(m)["spec"]
    assert pod["nodeSelector"] == FULL["node_selector"] and pod["tolerations"] == FULL["tolerations"]
    assert pod["serviceAccountName"] == "audiotune" and pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert {"name": "model-cache", "persistentVolumeClaim": {"claimName": "audiotune-model-cache"}} in pod["volumes"]
    assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "64Gi"}} in pod["volumes"]
    assert pod["containers"] == [{"name": "node", "volumeMounts": [{"mountPath": "/dev/shm", "name": "dshm"},
                                                                    {"mountPath": "/cache", "name": "model-cache"}]}]
    assert m["spec"]["activeDeadlineSeconds"] == 3600
    assert m["metadata"]["annotations"]["audiotune.io/run-id"] == RUN_ID


def test_secrets_by_reference_only():
    m = build_trainjob(_spec(**FULL), secret_keys=KEYS)
    env = {e["name"]: e for e in m["spec"]["trainer"]["env"]}
    for key in (*S3_KEYS, *MLFLOW_KEYS):
        assert "value" not in env[key] and env[key]["valueFrom"]["secretKeyRef"]["key"] == key
        assert env[key]["valueFrom"]["secretKeyRef"]["optional"] is True
    assert env["HF_TOKEN"] == {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}}
    with pytest.raises(JobError, match=r"Secret 'hf-all'.*cluster.secret_env"):
        build_trainjob(_spec(secrets=["hf-all"]), secret_keys=KEYS)
    with pytest.raises(JobError, match="HF_TOKEN is set both"):
        build_trainjob(_spec(env={"HF_TOKEN": "x"}, secret_env={"HF_TOKEN": "hf:token"}))


def test_torchrun_takes_its_rendezvous_from_the_trainers_pet_variables(monkeypatch):
    """The Trainer's torch plugin sets PET_NNODES, PET_NPROC_PER_NODE, PET_NODE_RANK, PET_MASTER_ADDR and
    PET_MASTER_PORT in the node container; torchrun reads its defaults from them, so the command has no flags."""
    from torch.distributed.run import get_args_parser

    cmd = trainjob_command(_spec())
    assert cmd[:3] == ["python", "-m", "torch.distributed.run"]
    for k, v in {"PET_NNODES": "3", "PET_NPROC_PER_NODE": "8", "PET_NODE_RANK": "2",
                 "PET_MASTER_ADDR": "job-node-0-0.job", "PET_MASTER_PORT": "29400"}.items():
        monkeypatch.setenv(k, v)
    args = get_args_parser().parse_args(cmd[3:])
    assert (args.nnodes, args.nproc_per_node, args.node_rank) == ("3", "8", 2)
    assert (args.master_addr, args.master_port, args.module) == ("job-node-0-0.job", 29400, True)
    assert [args.training_script, *args.training_script_args] == ["audiotune.cli", *ARGV]


def test_status_conditions_and_launcher_choice():
    assert trainjob_status({}).state == "Pending"
    job = {"metadata": {"name": "j"}, "status": {"conditions": [
        {"type": "Created", "status": "True", "reason": "JobSetCreated", "message": "",
         "lastTransitionTime": "2026-01-01T00:00:00Z"},
        {"type": "Complete", "status": "True", "reason": "JobSetCompleted", "message": "done",
         "lastTransitionTime": "2026-01-01T00:00:00Z"}]}}
    status = trainjob_status(job)
    assert (status.state, status.terminal) == ("Complete", True)
    with pytest.raises(JobError, match="TrainJob j: unexpected status"):
        trainjob_status({"metadata": {"name": "j"}, "status": {"conditions": "Complete"}})
    settings = ClusterSettings(num_nodes=2, s3_secret="audiotune-s3", mlflow_secret="audiotune-mlflow")
    assert settings.launcher == "trainjob"
    assert launcher(settings).build(_spec(secrets=["audiotune-s3", "audiotune-mlflow"]))["kind"] == "TrainJob"
    old = launcher(settings.model_copy(update={"launcher": "pytorchjob"}))
    assert old.build(_spec())["kind"] == "PyTorchJob"


# --- against a Kubernetes API -----------------------------------------------------------------------------------

@pytest.fixture
def kube(crd_schema):
    with FakeKube() as fake:
        fake.schemas["trainjobs"] = crd_schema
        fake.next_script = ["Created", "Running", "Complete"]
        yield fake


def _run(kube, spec, **kw):
    lines: list[str] = []
    result = run_trainjob(spec, secret_keys=KEYS, api_client=kube.api_client(), log_sink=lines.append,
                          **{**FAST, **kw})
    return result, lines


def test_create_follow_complete_delete_with_progress(kube, tmp_path, caplog):
    kube.trainer_status = {"progressPercentage": 40, "estimatedRemainingSeconds": 600,
                           "lastUpdatedTime": "2026-01-01T00:00:00Z", "metrics": [{"name": "loss", "value": "2.1"}]}
    spec = _spec(**FULL)
    with caplog.at_level(logging.INFO, logger="audiotune.cluster.jobs"):
        result, lines = _run(kube, spec, manifest_path=tmp_path / "job.yaml")
    name = job_name(RUN_ID, "train-llm")
    assert result.state == "Complete" and result.created and result.deleted and not result.replaced
    assert kube.calls("POST") == ["/apis/trainer.kubeflow.org/v1alpha1/namespaces/ml/trainjobs"]
    assert kube.calls("DELETE") == [f"/apis/trainer.kubeflow.org/v1alpha1/namespaces/ml/trainjobs/{name}"]
    assert lines == kube.log_lines and kube.calls("GET", "/log") == [
        f"/api/v1/namespaces/ml/pods/{name}-node-0-0-x7k2p/log"]
    assert yaml.safe_load((tmp_path / "job.yaml").read_text()) == result.manifest
    assert "progress: 40%, about 10 min left, loss=2.1" in caplog.text


def test_failed_job_is_kept_with_its_reason_or_deleted_when_configured(kube):
    kube.next_script = ["Created", "Running", "Failed"]
    with pytest.raises(JobFailedError) as info:
        _run(kube, _spec())
    name = job_name(RUN_ID, "train-llm")
    assert info.value.reason == "FailedJobs" and info.value.kept and kube.calls("DELETE") == []
    assert TRAINJOB_FAIL_MESSAGE.format(name=name) in str(info.value)
    assert f"kubectl -n ml describe trainjob {name}" in str(info.value)
    kube.jobs.clear()
    with pytest.raises(JobFailedError) as info:
        _run(kube, _spec(delete_on_failure=True))
    assert not info.value.kept and len(kube.calls("DELETE")) == 1


def test_retry_reattaches_to_its_running_job_and_replaces_a_failed_one(kube):
    spec = _spec()
    kube.add_job(build_trainjob(spec), ["Running", "Running", "Complete"])
    result, lines = _run(kube, spec)
    assert not result.created and kube.calls("POST") == [] and lines == kube.log_lines
    kube.jobs.clear()
    kube.requests.clear()
    kube.add_job(build_trainjob(spec), ["Failed"])
    result, _ = _run(kube, spec, follow_logs=False)
    assert result.created and result.replaced
    assert [m for m, path, _ in kube.requests if "trainjobs" in path and m != "GET"] == ["DELETE", "POST", "DELETE"]


def test_kept_on_success_when_configured_and_another_runs_job_untouched(kube):
    result, _ = _run(kube, _spec(delete_on_success=False), follow_logs=False)
    assert not result.deleted and kube.calls("DELETE") == []
    kube.jobs.clear()
    other = build_trainjob(_spec(run_id="another-run"))
    other["metadata"]["name"] = job_name(RUN_ID, "train-llm")
    kube.add_job(other, ["Running"])
    with pytest.raises(JobConflictError, match="another-run"):
        _run(kube, _spec())


def test_api_server_rejection_and_missing_crd_are_clear(kube, crd_schema):
    kube.schemas["trainjobs"] = dict(crd_schema, required=["nothing-we-send"])
    with pytest.raises(JobError, match=r"cannot create TrainJob ml/.*HTTP 422.*rejected the manifest"):
        _run(kube, _spec())
    kube.create_error = (404, 'the server could not find the requested resource')
    with pytest.raises(JobError, match="Trainer v2"):
        _run(kube, _spec())


def test_calls_need_exactly_the_charts_role(kube):
    spec = _spec()
    kube.add_job(build_trainjob(spec), ["Failed"])
    _run(kube, spec)
    granted = {(r, v) for rule in rbac_rules(TRAINJOB) for r in rule["resources"] for v in rule["verbs"]}
    assert rbac_use(kube.requests, "trainjobs") == granted


def test_a_multinode_task_launches_a_trainjob_with_the_plugins_mlflow_run(kube, tmp_path, monkeypatch):
    """The launch path of a training task with num_nodes > 1 and the default launcher: the TrainJob it creates is
    what it writes to its job_manifest artifact; the MLflow ids the KFP plugin injected reach the nodes; secrets
    appear by name only."""
    import functools

    from audiotune.cluster import trainjob
    from audiotune.orchestration import training

    cluster_helpers.use_kubeconfig(tmp_path, kube.url, monkeypatch)
    monkeypatch.setenv("MLFLOW_RUN_ID", "5f0e1d2c3b4a")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", "7")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.ml:5000")
    monkeypatch.setattr(trainjob, "run_trainjob", functools.partial(trainjob.run_trainjob, **FAST))
    kube.next_script = ["Created", "Complete"]
    cfg = validate({"llm": {"init": "scratch", "preset": "qwen2-0.5b", "mode": "full"},
                    "cluster": {"num_nodes": 2, "gpus_per_node": 8, "namespace": "ml", "gpu_type": "NVIDIA-L4",
                                "s3_secret": "audiotune-s3", "mlflow_secret": "audiotune-mlflow"},
                    "pipeline": {"output_uri": "s3://bucket/out"}})
    manifest = tmp_path / "outputs" / "job_manifest"
    training.launch("llm", cfg, {"--tokens": "s3://bucket/tokens"}, "s3://bucket/out/llm", RUN_ID,
                    "s3://bucket/out/run", manifest_path=manifest)
    written = yaml.safe_load(manifest.read_text())
    [created] = kube.jobs.values()
    assert written["kind"] == "TrainJob" and written["spec"] == created["spec"]
    env = {e["name"]: e for e in written["spec"]["trainer"]["env"]}
    assert env["MLFLOW_RUN_ID"]["value"] == "5f0e1d2c3b4a" and env["MLFLOW_EXPERIMENT_ID"]["value"] == "7"
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "audiotune-s3"
    assert env["MLFLOW_TRACKING_URI"]["valueFrom"]["secretKeyRef"]["name"] == "audiotune-mlflow"
    assert "s3cr3t-value" not in json.dumps(written)
    command = written["spec"]["trainer"]["command"]
    assert command[:2] == ["sh", "-c"] and "exec python -m torch.distributed.run -m audiotune.cli train llm" \
        in command[2] and "--nnodes" not in command[2]
    # without an MLflow Secret the plugin's tracking URI is passed on as it is
    cfg = cfg.model_copy(update={"cluster": cfg.cluster.model_copy(update={"mlflow_secret": None})})
    training.launch("llm", cfg, {"--tokens": "s3://bucket/tokens"}, "s3://bucket/out/llm", "another-run",
                    "s3://bucket/out/run", manifest_path=manifest)
    env = {e["name"]: e for e in yaml.safe_load(manifest.read_text())["spec"]["trainer"]["env"]}
    assert env["MLFLOW_TRACKING_URI"] == {"name": "MLFLOW_TRACKING_URI", "value": "http://mlflow.ml:5000"}


# --- the KFP MLflow plugin --------------------------------------------------------------------------------------

def test_a_stage_logs_into_the_plugins_run_and_opens_no_second_tree(mlflow_server, monkeypatch):
    """KFP 2.17's MLflow plugin opened a parent run and a nested run per task and put the task's run id in the
    pod as MLFLOW_RUN_ID: prepare_run opens no parent of ours, the stage's metrics land in the task's run, no other
    run appears, the plugin's runs are left for the plugin to end, and finish_run ends nothing."""
    import uuid

    from mlflow import MlflowClient

    from audiotune import tracking
    from audiotune.orchestration import runs

    client = MlflowClient(mlflow_server)
    experiment = client.create_experiment(f"kfp-{uuid.uuid4().hex[:8]}")
    parent = client.create_run(experiment, run_name="pipeline-run").info.run_id
    task_runs = {task: client.create_run(experiment, run_name=task, tags={tracking.PARENT_TAG: parent}).info.run_id
                 for task in ("prepare-run", "train-llm")}
    cfg = validate({"tracking": {"uri": mlflow_server, "experiment": "audiotune-own"}})
    monkeypatch.setenv("MLFLOW_RUN_ID", task_runs["prepare-run"])
    assert runs.start(cfg, "kfp-run-1", {"mode": "llm"}) == parent
    assert client.get_run(task_runs["prepare-run"]).data.params["pipeline.mode"] == "llm"

    monkeypatch.setenv("MLFLOW_RUN_ID", task_runs["train-llm"])
    cfg.tracking.parent_run_id = parent
    with tracking.stage_run(cfg.tracking, "llm") as tracker:
        tracker.log_metrics({"train/loss": 2.5}, step=1)
        tracker.log_metrics({"train/loss": 1.5}, step=2)
        tracker.log_params({"llm.mode": "lora"})
    run = client.get_run(task_runs["train-llm"])
    assert [m.value for m in client.get_metric_history(run.info.run_id, "train/loss")] == [2.5, 1.5]
    assert run.data.params["llm.mode"] == "lora" and run.data.tags[tracking.STAGE_TAG] == "llm"
    assert run.info.status == "RUNNING"  # the plugin ends its runs
    assert runs.claim(cfg.tracking, "llm-unused-name", "llm") == task_runs["train-llm"]
    found = client.search_runs([experiment])
    assert sorted(r.info.run_id for r in found) == sorted([parent, *task_runs.values()])
    assert client.get_experiment_by_name("audiotune-own") is None or not client.search_runs(
        [client.get_experiment_by_name("audiotune-own").experiment_id])
    assert runs.finish(cfg.tracking, "kfp-run-1", "SUCCEEDED") is None
    assert client.get_run(parent).info.status == "RUNNING"


def test_without_the_plugin_a_stage_opens_its_own_nested_run(mlflow_server, monkeypatch):
    import uuid

    from mlflow import MlflowClient

    from audiotune import tracking

    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    client = MlflowClient(mlflow_server)
    cfg = validate({"tracking": {"uri": mlflow_server, "experiment": f"own-{uuid.uuid4().hex[:8]}"}})
    parent = tracking.start_parent_run(cfg.tracking, "run")
    cfg.tracking.parent_run_id = parent
    with tracking.stage_run(cfg.tracking, "llm") as tracker:
        tracker.log_metrics({"train/loss": 2.0}, step=1)
    [stage] = [r for r in client.search_runs([client.get_run(parent).info.experiment_id])
               if r.info.run_id != parent]
    assert stage.data.tags[tracking.PARENT_TAG] == parent and stage.info.status == "FINISHED"


# --- the KFP workspace ------------------------------------------------------------------------------------------

def test_workspace_from_config_reaches_the_compiled_pipeline_and_the_tasks(tmp_path, monkeypatch):
    import sys

    from kfp import compiler

    from audiotune.orchestration import steps

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from pipelines.finetune import build

    cfg = validate({"cluster": {"workspace_size": "200Gi", "workspace_storage_class": "nfs-rwx"}})
    compiler.Compiler().compile(build(cfg), str(tmp_path / "p.yaml"))
    spec, platform = yaml.safe_load_all((tmp_path / "p.yaml").read_text())
    assert platform["platforms"]["kubernetes"]["pipelineConfig"]["workspace"] == {
        "size": "200Gi", "kubernetes": {"pvcSpecPatch": {"storageClassName": "nfs-rwx"}}}
    uses = {name for name, comp in spec["components"].items()
            if "workspace_path" in (comp.get("inputDefinitions") or {}).get("parameters", {})}
    assert {"comp-tokenize-data", "comp-train-llm", "comp-train-flow", "comp-train-joint",
            "comp-export-model"} <= uses
    dags = json.dumps({k: v.get("dag") for k, v in spec["components"].items() if "dag" in v})
    assert dags.count('"{{$.workspace_path}}"') >= 5  # every task that uses it gets the placeholder
    # one node, no output_uri: checkpoints and the durable copy live in the workspace; several nodes: not there
    assert steps.durable_output(cfg, "run-1", "llm", "/ws") == "/ws/runs/audiotune/run-1/llm"
    multi = validate({"cluster": {"num_nodes": 2}, "pipeline": {"output_uri": "s3://b/o"}})
    assert steps.durable_output(multi, "run-1", "llm", "/ws") == "s3://b/o/audiotune/run-1/llm"
    monkeypatch.delenv("HF_HOME", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    steps.setup(str(tmp_path / "no-secrets"), workspace="/ws")
    import os
    assert os.environ["HF_HOME"] == "/ws/cache/huggingface" and os.environ["XDG_CACHE_HOME"] == "/ws/cache"

"""Multi-node training through a PyTorchJob: the manifest against the CRD's and Kubernetes' own schemas, and the
create / watch / fail / re-attach / replace / timeout / cancel logic against a Kubernetes API on 127.0.0.1."""

from __future__ import annotations

import copy
import os
import re
import signal
import threading
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from audiotune.cluster.pytorchjob import (
    JobCancelledError,
    JobConflictError,
    JobFailedError,
    JobSpec,
    JobTimeoutError,
    PyTorchJobError,
    build_manifest,
    job_name,
    job_status,
    run_pytorchjob,
)
from audiotune.config import ClusterSettings
from tests import cluster_helpers
from tests.cluster_helpers import FAST, GPU_TOLERATIONS, K8S_VERSION, RUN_ID, rbac_use
from tests.fake_kube import FAIL_MESSAGE, FakeKube

CRD = Path(__file__).parent / "k8s" / "kubeflow.org_pytorchjobs.yaml"
DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
ARGV = ["train", "llm", "--tokens", "s3://bucket/tokens", "--output", "s3://bucket/llm", "--config",
        "/tmp/config.yaml"]


def _spec(**kw) -> JobSpec:
    return cluster_helpers.job_spec(ARGV, **kw)


FULL = dict(
    cpu="32", memory="480Gi", shm_size="64Gi", gpu_resource="nvidia.com/gpu",
    node_selector={"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}, tolerations=GPU_TOLERATIONS,
    env={"NCCL_DEBUG": "WARN"}, secrets=["audiotune-s3", "audiotune-mlflow"],
    secret_env={"HF_TOKEN": "hf:token"}, service_account="audiotune", model_cache_pvc="audiotune-model-cache",
    image_pull_policy="IfNotPresent", image_pull_secrets=["regcred"], labels={"team": "speech"},
    annotations={"owner": "speech@example.com"}, restart_policy="Never", backoff_limit=0,
    ttl_seconds_after_finished=86400, timeout_s=3600,
)


# --- the manifest -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def crd_schema():
    return cluster_helpers.crd_schema(CRD, "kubeflow.org", "PyTorchJob", "v1")


@pytest.mark.parametrize("case", ["minimal", "full", "cpu-only", "two-nodes"])
def test_manifest_validates_against_crd_and_core_schemas(crd_schema, case):
    spec = {"minimal": _spec(), "full": _spec(**FULL), "cpu-only": _spec(gpus_per_node=0, shm_size=None),
            "two-nodes": _spec(num_nodes=2, gpus_per_node=1)}[case]
    manifest = build_manifest(spec)
    jsonschema.validate(manifest, crd_schema)
    assert DNS_1035.match(manifest["metadata"]["name"]) and len(manifest["metadata"]["name"]) <= 45
    for replica in manifest["spec"]["pytorchReplicaSpecs"].values():
        pod_template = {"apiVersion": "v1", "kind": "PodTemplate",
                        "metadata": {"name": manifest["metadata"]["name"], "namespace": "ml"},
                        "template": replica["template"]}
        kubernetes_validate.validate(pod_template, K8S_VERSION, strict=True)
    # the metadata is core ObjectMeta too
    kubernetes_validate.validate({"apiVersion": "v1", "kind": "ConfigMap", "metadata": manifest["metadata"]},
                                 K8S_VERSION, strict=True)


def test_schema_check_catches_mistakes(crd_schema):
    manifest = build_manifest(_spec(**FULL))
    bad = copy.deepcopy(manifest)
    bad["spec"]["pytorchReplicaSpecs"]["Master"]["replicas"] = "one"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, crd_schema)
    bad = copy.deepcopy(manifest)
    bad["spec"]["runPolicy"]["cleanupPolicy"] = "All"  # a typo: the field is cleanPodPolicy
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, crd_schema)
    template = copy.deepcopy(manifest["spec"]["pytorchReplicaSpecs"]["Master"]["template"])
    template["spec"]["containers"][0]["resource"] = {}  # a typo: resources
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "x"},
                                      "template": template}, K8S_VERSION, strict=True)


def test_manifest_has_what_the_operator_and_torchrun_need():
    spec = _spec(**FULL)
    m = build_manifest(spec)
    replicas = m["spec"]["pytorchReplicaSpecs"]
    assert (m["apiVersion"], m["kind"]) == ("kubeflow.org/v1", "PyTorchJob")
    assert replicas["Master"]["replicas"] == 1 and replicas["Worker"]["replicas"] == 2
    master, worker = (replicas[r]["template"] for r in ("Master", "Worker"))
    assert master == worker and master is not worker  # same content, no shared objects (no YAML anchors)
    assert "&id" not in yaml.safe_dump(m)
    c = master["spec"]["containers"][0]
    assert c["name"] == "pytorch" and c["image"] == spec.image
    assert {"name": "pytorchjob-port", "containerPort": 23456, "protocol": "TCP"} in c["ports"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 8 == c["resources"]["requests"]["nvidia.com/gpu"]
    assert c["resources"]["limits"]["memory"] == "480Gi" and c["resources"]["requests"]["cpu"] == "32"
    assert {"name": "dshm", "mountPath": "/dev/shm"} in c["volumeMounts"]
    assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "64Gi"}} in master["spec"]["volumes"]
    assert {"name": "model-cache", "persistentVolumeClaim": {"claimName": "audiotune-model-cache"}} \
        in master["spec"]["volumes"]
    assert c["envFrom"] == [{"secretRef": {"name": "audiotune-s3"}}, {"secretRef": {"name": "audiotune-mlflow"}}]
    assert {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}} in c["env"]
    assert {"name": "HF_HOME", "value": "/cache/huggingface"} in c["env"]
    assert master["spec"]["nodeSelector"] == FULL["node_selector"]
    assert master["spec"]["tolerations"] == FULL["tolerations"]
    assert master["spec"]["serviceAccountName"] == "audiotune"
    assert master["spec"]["securityContext"]["runAsNonRoot"] is True
    assert master["metadata"]["labels"]["team"] == "speech" and m["metadata"]["labels"]["team"] == "speech"
    assert m["metadata"]["annotations"]["audiotune.io/run-id"] == RUN_ID
    assert m["spec"]["runPolicy"] == {"cleanPodPolicy": "None", "backoffLimit": 0, "activeDeadlineSeconds": 3600,
                                      "ttlSecondsAfterFinished": 86400}
    assert replicas["Worker"]["restartPolicy"] == "Never" and m["spec"]["nprocPerNode"] == "8"


def test_torchrun_command_parses_with_the_operators_variables():
    """The kubelet expands $(RANK), $(MASTER_ADDR), $(MASTER_PORT) (set by the operator); torchrun accepts it."""
    from torch.distributed.run import get_args_parser

    c = build_manifest(_spec())["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]
    env = {"RANK": "2", "MASTER_ADDR": "job-master-0", "MASTER_PORT": "23456"}
    cmd = [re.sub(r"\$\((\w+)\)", lambda mt: env[mt.group(1)], part) for part in c["command"]]
    assert cmd[:3] == ["python", "-m", "torch.distributed.run"]
    args = get_args_parser().parse_args(cmd[3:])
    assert (args.nnodes, args.nproc_per_node, args.node_rank) == ("3", "8", 2)
    assert (args.master_addr, args.master_port, args.module) == ("job-master-0", 23456, True)
    assert [args.training_script, *args.training_script_args] == ["audiotune.cli", *ARGV]


def test_job_name_is_stable_short_and_unique():
    name = job_name(RUN_ID, "train-llm")
    assert name == job_name(RUN_ID, "train-llm") and name.startswith("train-llm-3f1d9c2e-")
    long_task = "train-" + "x" * 200
    names = {job_name(RUN_ID, long_task), job_name(RUN_ID, long_task + "y"), job_name("other-run", long_task),
             job_name(RUN_ID, "train-llm"), job_name(RUN_ID, "Train LLM #2"), job_name("7" * 80, "0")}
    assert len(names) == 6
    for n in names:
        assert DNS_1035.match(n) and len(n) <= 45, n


def test_spec_rejects_bad_values_naming_them():
    with pytest.raises(ValueError, match=r"memory='64GB'"):
        _spec(memory="64GB")
    with pytest.raises(ValueError, match="restart_policy"):
        _spec(restart_policy="Always")
    with pytest.raises(ValueError, match="secret_env"):
        _spec(secret_env={"X": "no-key"})


def test_cluster_settings_map_onto_the_spec_and_describe_every_field():
    def walk(model, prefix=""):
        for name, f in model.model_fields.items():
            yield prefix + name, f
            ann = getattr(f.annotation, "__args__", None) or (f.annotation,)
            for arg in ann:
                if isinstance(arg, type) and hasattr(arg, "model_fields"):
                    yield from walk(arg, f"{prefix}{name}.")

    assert [p for p, f in walk(ClusterSettings) if not f.description] == []
    settings = ClusterSettings.model_validate({
        "num_nodes": 4, "gpus_per_node": 8, "s3_secret": "audiotune-s3", "mlflow_secret": "audiotune-mlflow",
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "node_selector": {"pool": "h100"}, "timeout_hours": 2, "delete_on_failure": True,
        "gpu_type": "NVIDIA-H100-80GB-HBM3"})
    spec = JobSpec.from_settings(settings, run_id=RUN_ID, task="train-llm", image="img:1", argv=ARGV)
    assert (spec.num_nodes, spec.gpus_per_node, spec.timeout_s) == (4, 8, 7200.0)
    assert spec.secrets == ["audiotune-s3", "audiotune-mlflow"] and spec.delete_on_failure
    assert spec.node_selector == {"pool": "h100", "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert spec.tolerations == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    with pytest.raises(Exception, match="memory"):
        ClusterSettings.model_validate({"memory": "lots"})


# --- against a Kubernetes API -----------------------------------------------------------------------------------

@pytest.fixture
def kube():
    with FakeKube() as fake:
        yield fake


def _run(kube, spec, **kw):
    lines: list[str] = []
    result = run_pytorchjob(spec, api_client=kube.api_client(), log_sink=lines.append, **{**FAST, **kw})
    return result, lines


def test_create_watch_succeed_delete(kube, tmp_path):
    spec = _spec()
    lines: list[str] = []
    result = run_pytorchjob(spec, api_client=kube.api_client(), manifest_path=tmp_path / "job.yaml",
                            log_sink=lines.append, **FAST)
    assert result.state == "Succeeded" and result.created and not result.replaced and result.deleted
    name = job_name(RUN_ID, "train-llm")
    assert kube.calls("POST") == ["/apis/kubeflow.org/v1/namespaces/ml/pytorchjobs"]
    assert kube.calls("DELETE") == [f"/apis/kubeflow.org/v1/namespaces/ml/pytorchjobs/{name}"]
    assert lines == kube.log_lines and result.log_lines == 3
    assert yaml.safe_load((tmp_path / "job.yaml").read_text()) == result.manifest == build_manifest(spec)
    assert kube.calls("GET", "/log") == [f"/api/v1/namespaces/ml/pods/{name}-master-0/log"]


def test_a_briefly_unavailable_api_server_is_ridden_out(kube):
    kube.add_job(build_manifest(_spec()), ["Running", "Running", "Running", "Succeeded"])
    kube.unavailable_gets = 3  # 503 for the first reads: the lookup before create and the wait's reads
    result, _ = _run(kube, _spec(), follow_logs=False, poll_interval_s=0.001)
    assert result.state == "Succeeded" and not result.created and kube.unavailable_gets == 0


def test_failed_job_raises_its_reason_and_is_kept(kube):
    kube.next_script = ["Created", "Running", "Failed"]
    with pytest.raises(JobFailedError) as info:
        _run(kube, _spec())
    name = job_name(RUN_ID, "train-llm")
    assert info.value.reason == "PyTorchJobFailed" and info.value.kept
    assert FAIL_MESSAGE.format(ns="ml", name=name) in str(info.value) and "kubectl -n ml describe" in str(info.value)
    assert kube.calls("DELETE") == []


def test_failed_job_deleted_when_configured(kube):
    kube.next_script = ["Created", "Failed"]
    with pytest.raises(JobFailedError) as info:
        _run(kube, _spec(delete_on_failure=True))
    assert not info.value.kept and len(kube.calls("DELETE")) == 1


def test_retry_reattaches_to_its_running_job(kube):
    spec = _spec()
    kube.add_job(build_manifest(spec), ["Running", "Running", "Succeeded"])
    result, lines = _run(kube, spec)
    assert not result.created and not result.replaced and result.state == "Succeeded"
    assert kube.calls("POST") == [] and len(kube.calls("DELETE")) == 1 and lines == kube.log_lines


def test_retry_takes_a_job_that_already_succeeded(kube):
    spec = _spec()
    kube.add_job(build_manifest(spec), ["Succeeded"])
    result, _ = _run(kube, spec, follow_logs=False)
    assert result.state == "Succeeded" and not result.created and kube.calls("POST") == []


def test_retry_replaces_its_failed_job(kube):
    spec = _spec()
    kube.add_job(build_manifest(spec), ["Failed"])
    result, _ = _run(kube, spec)
    assert result.created and result.replaced and result.state == "Succeeded"
    methods = [m for m, path, _ in kube.requests if "pytorchjobs" in path and m != "GET"]
    assert methods == ["DELETE", "POST", "DELETE"]


def test_calls_need_exactly_the_charts_role(kube):
    """Replace a failed job, follow the new one with its log, delete it: every verb the Role grants is used, and
    nothing else is called."""
    from audiotune.cluster.kube import PYTORCHJOB, rbac_rules

    spec = _spec()
    kube.add_job(build_manifest(spec), ["Failed"])
    _run(kube, spec)
    granted = {(r, v) for rule in rbac_rules(PYTORCHJOB) for r in rule["resources"] for v in rule["verbs"]}
    assert rbac_use(kube.requests, "pytorchjobs") == granted


def test_job_of_another_run_is_not_touched(kube):
    other = build_manifest(_spec(run_id="another-run"))
    other["metadata"]["name"] = job_name(RUN_ID, "train-llm")
    kube.add_job(other, ["Running"])
    with pytest.raises(JobConflictError, match="another-run"):
        _run(kube, _spec())
    assert kube.calls("POST") == [] and kube.calls("DELETE") == []


def test_timeout_deletes_the_job(kube):
    kube.next_script = ["Created", "Running"]
    with pytest.raises(JobTimeoutError, match="did not finish within"):
        _run(kube, _spec(timeout_s=0.5))
    assert len(kube.calls("DELETE")) == 1


def test_forbidden_create_says_which_role_is_missing(kube):
    kube.create_error = (403, 'pytorchjobs.kubeflow.org is forbidden: User "system:serviceaccount:ml:default" '
                              'cannot create resource "pytorchjobs"')
    with pytest.raises(PyTorchJobError, match="rbac.extraSubjects") as info:
        _run(kube, _spec())
    assert "HTTP 403" in str(info.value) and "system:serviceaccount:ml:default" in str(info.value)


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(), reason="signals: main thread")
def test_sigterm_deletes_the_job(kube):
    kube.next_script = ["Created", "Running"]
    before = signal.getsignal(signal.SIGTERM)

    def terminate():
        if kube.watch_seen.wait(10):
            os.kill(os.getpid(), signal.SIGTERM)

    killer = threading.Thread(target=terminate, daemon=True)
    killer.start()
    with pytest.raises(JobCancelledError):
        _run(kube, _spec(timeout_s=30))
    killer.join(5)
    assert len(kube.calls("DELETE")) == 1
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is put back


def test_job_status_reads_conditions():
    assert job_status({}).state == "Pending"
    job = {"status": {"conditions": [{"type": "Created", "status": "True"},
                                     {"type": "Running", "status": "False"},
                                     {"type": "Failed", "status": "True", "reason": "R", "message": "M"}]}}
    status = job_status(job)
    assert (status.state, status.reason, status.message, status.terminal) == ("Failed", "R", "M", True)


def test_the_job_command_forms_one_world_across_nodes(tmp_path):
    """The manifest's command, with the variables the operator declares filled in as the kubelet would, run as two
    'nodes' of one process each on this machine: torchrun's static rendezvous joins them into one world."""
    import json
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    spec = _spec(num_nodes=2, gpus_per_node=0)
    command = build_manifest(spec)["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0][
        "command"]
    module = command.index("audiotune.cli")
    command = [sys.executable, *command[1:module], "tests.dist_probe"]  # the probe instead of a training
    procs = []
    for node_rank in (0, 1):
        env = {**os.environ, "RANK": str(node_rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
        cmd = [re.sub(r"\$\((\w+)\)", lambda mt, env=env: env[mt.group(1)], part) for part in command]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-3000:]
        results += [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert sorted(r["rank"] for r in results) == [0, 1]
    assert all(r["world"] == 2 and r["local_rank"] == 0 and r["sum"] == 3.0 for r in results)


def test_api_client_and_namespace_from_a_kubeconfig(kube, tmp_path, monkeypatch):
    from audiotune.cluster import kube as kube_module

    config = {"apiVersion": "v1", "kind": "Config", "current-context": "test",
              "clusters": [{"name": "c", "cluster": {"server": kube.url}}],
              "users": [{"name": "u", "user": {"token": "t"}}],
              "contexts": [{"name": "test", "context": {"cluster": "c", "user": "u", "namespace": "team-a"}}]}
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump(config))
    monkeypatch.setenv("KUBECONFIG", str(path))
    monkeypatch.setattr(kube_module, "SA_NAMESPACE_FILE", tmp_path / "no-such-file")
    assert kube_module.current_namespace() == "team-a"
    jobs = kube_module.JobClient(kube_module.load_api_client(kubeconfig=str(path)), "team-a")
    assert jobs.get("nothing-here") is None
    with pytest.raises(RuntimeError, match="kubeconfig"):
        kube_module.load_api_client(kubeconfig=str(tmp_path / "missing"))


def test_a_multinode_training_task_writes_the_jobs_manifest_artifact(kube, tmp_path, monkeypatch):
    """The launch path of a training task with num_nodes > 1: the PyTorchJob it creates is what it writes to its
    job_manifest artifact, and a zero_stage: auto reaches the nodes resolved."""
    import functools

    from audiotune.cluster import pytorchjob
    from audiotune.config import validate
    from audiotune.orchestration import training

    cluster_helpers.use_kubeconfig(tmp_path, kube.url, monkeypatch)
    monkeypatch.setattr(pytorchjob, "run_pytorchjob", functools.partial(pytorchjob.run_pytorchjob, **FAST))
    kube.next_script = ["Created", "Succeeded"]
    cfg = validate({"llm": {"init": "scratch", "preset": "qwen2-0.5b", "mode": "full",
                            "train": {"deepspeed": {"zero_stage": "auto"}}},
                    "cluster": {"num_nodes": 2, "gpus_per_node": 8, "namespace": "ml", "gpu_type": "NVIDIA-L4",
                                "launcher": "pytorchjob"},
                    "pipeline": {"output_uri": "s3://bucket/out"}})
    manifest = tmp_path / "outputs" / "job_manifest"
    training.launch("llm", cfg, {"--tokens": "s3://bucket/tokens", "--base-model": ""}, "s3://bucket/out/llm",
                    RUN_ID, "s3://bucket/out/run", manifest_path=manifest)
    written = yaml.safe_load(manifest.read_text())
    [created] = kube.jobs.values()
    assert written["kind"] == "PyTorchJob" and written["metadata"]["name"] == created["metadata"]["name"]
    assert written["spec"] == created["spec"]  # exactly what the API server got
    container = written["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]
    node_config = yaml.safe_load(next(e["value"] for e in container["env"] if e["name"] == training.CONFIG_ENV))
    assert node_config["llm"]["train"]["deepspeed"]["zero_stage"] == 2  # 16 × 24 GiB: resolved before the job


def test_a_one_node_training_task_writes_a_note_instead(tmp_path, monkeypatch):
    import subprocess

    from audiotune.config import validate
    from audiotune.orchestration import training

    monkeypatch.setattr(subprocess, "run", lambda cmd, check: subprocess.CompletedProcess(cmd, 0))
    cfg = validate({"cluster": {"gpus_per_node": 0}, "llm": {"train": {"deepspeed": {"zero_stage": "auto"}}}})
    note = tmp_path / "job_manifest"
    training.launch("llm", cfg, {"--tokens": "/data/tokens"}, str(tmp_path / "out"), RUN_ID, None,
                    manifest_path=note)
    text = note.read_text()
    assert text.startswith("# no TrainJob / PyTorchJob")
    data = yaml.safe_load(text)
    assert data["launcher"] == "torchrun" and data["nproc_per_node"] == 1 and data["zero_stage"] == 0
    assert "torch.distributed.run" in data["command"] and "audiotune.cli" in data["command"]

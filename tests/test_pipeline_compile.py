"""Compile tier: the pipeline compiles, the checked-in YAML is current, and the compiled spec carries the
GPU requests, retries, caching flags, /dev/shm volume, secrets and tolerations a cluster needs.

The compiled file is two YAML documents: the pipeline spec and the Kubernetes platform spec.
"""

from pathlib import Path

import pytest
import yaml

from audiotune import sdk
from audiotune.config import AudiotuneConfig, load_config
from audiotune.orchestration import params

ROOT = Path(__file__).resolve().parents[1]
COMPILED = ROOT / "pipelines" / "compiled" / "finetune.yaml"
COMPILED_FROM = ROOT / "pipelines" / "compiled" / "finetune.config.yaml"
TRAINING = ("train-llm", "train-flow", "train-joint",
            "encode-acestep", "train-acestep")  # GPU pods: the ACE-Step encode runs the VAE and text encoder


def _compile(tmp_path: Path, cfg=None) -> tuple[dict, dict, str]:
    path = sdk.compile(tmp_path / "finetune.yaml", cfg)
    text = Path(path).read_text()
    docs = list(yaml.safe_load_all(text))
    assert len(docs) == 2, "expected the pipeline spec and the platform spec"
    return docs[0], docs[1], text


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """The pipeline as pipelines/compiled/finetune.yaml should be: compiled from its config."""
    return _compile(tmp_path_factory.mktemp("compile"), load_config(COMPILED_FROM))


@pytest.fixture(scope="module")
def checked_in():
    """pipelines/compiled/finetune.yaml as it is in the repository: what users upload."""
    spec, platform = yaml.safe_load_all(COMPILED.read_text())
    return spec, platform


def _tasks(spec: dict):
    """(component holding the task, task name, task spec) for every task of every DAG."""
    for name, comp in spec["components"].items():
        for task_name, task in comp.get("dag", {}).get("tasks", {}).items():
            yield name, task_name, task
    for task_name, task in spec["root"]["dag"]["tasks"].items():
        yield "root", task_name, task


def _base(name: str) -> str:
    """``train-llm-2`` → ``train-llm``: the same component used in several branches."""
    head, _, tail = name.rpartition("-")
    return head if tail.isdigit() else name


def test_checked_in_yaml_is_current(compiled):
    # compared as YAML: the compiler's header comment shows the config default in protobuf map order
    _, _, text = compiled
    assert COMPILED.exists(), f"missing {COMPILED}"
    assert list(yaml.safe_load_all(COMPILED.read_text())) == list(yaml.safe_load_all(text)), (
        "pipelines/compiled/finetune.yaml is out of date; regenerate it with `audiotune compile --config "
        "pipelines/compiled/finetune.config.yaml --output pipelines/compiled/finetune.yaml`")


def test_training_tasks_request_gpus_from_the_gpus_parameter(checked_in):
    spec, _ = checked_in
    executors = spec["deploymentSpec"]["executors"]
    training = {n: e for n, e in executors.items() if _base(n[len("exec-"):]) in TRAINING}
    assert {_base(n[len("exec-"):]) for n in training} == set(TRAINING)
    for name, executor in training.items():
        accelerator = executor["container"]["resources"]["accelerator"]
        assert accelerator["resourceType"] == "nvidia.com/gpu", name
        assert accelerator["resourceCount"] == "{{$.inputs.parameters['pipelinechannel--gpus']}}", name
    for name, executor in executors.items():
        if name not in training:
            assert "accelerator" not in executor["container"].get("resources", {}), name


def test_images_cpu_for_data_cuda_for_training(checked_in):
    from audiotune.images import CPU_IMAGE, CUDA_IMAGE

    spec, _ = checked_in
    for name, executor in spec["deploymentSpec"]["executors"].items():
        expected = CUDA_IMAGE if _base(name[len("exec-"):]) in TRAINING else CPU_IMAGE
        assert executor["container"]["image"] == expected, name


def test_training_tasks_retry_with_backoff_and_nothing_else_does(checked_in):
    spec, _ = checked_in
    seen = set()
    for _, name, task in _tasks(spec):
        if _base(name) in TRAINING:
            seen.add(_base(name))
            assert task["retryPolicy"] == {"maxRetryCount": 2, "backoffDuration": "60s", "backoffFactor": 2.0,
                                           "backoffMaxDuration": "3600s"}, name
        else:
            assert "retryPolicy" not in task, name
    assert seen == set(TRAINING)


def test_caching_on_for_data_stages_off_for_the_rest(checked_in):
    spec, _ = checked_in
    caching = {_base(name): task.get("cachingOptions", {}).get("enableCache", False)
               for _, name, task in _tasks(spec) if "componentRef" in task and "cachingOptions" in task}
    assert caching["convert-data"] is True and caching["tokenize-data"] is True
    for name in (*TRAINING, "prepare-run", "link-runs", "export-model", "finish-run"):
        assert caching[name] is False, name


def test_convert_cache_key_follows_the_source_data(checked_in):
    spec, _ = checked_in
    [convert] = [t for _, n, t in _tasks(spec) if n == "convert-data"]
    fingerprint = convert["inputs"]["parameters"]["source_fingerprint"]["taskOutputParameter"]
    assert fingerprint == {"producerTask": "prepare-run", "outputParameterKey": "source_fingerprint"}
    # its config is the convert sections only: changing e.g. the llm settings keeps the cache
    assert convert["inputs"]["parameters"]["config"]["taskOutputParameter"]["outputParameterKey"] == "convert_config"


def test_training_pods_get_shm_tolerations_and_resources(checked_in):
    spec, platform = checked_in
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    training = [n for n in k8s if _base(n[len("exec-"):]) in TRAINING]
    assert {_base(n[len("exec-"):]) for n in training} == set(TRAINING)
    for name in training:
        [mount] = k8s[name]["emptyDirMounts"]
        assert mount == {"volumeName": "dshm", "mountPath": "/dev/shm", "medium": "Memory", "sizeLimit": "16Gi"}
        assert k8s[name]["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
        resources = spec["deploymentSpec"]["executors"][name]["container"]["resources"]
        assert resources["cpuRequest"] == 8.0 and resources["memoryLimit"] == resources["memoryRequest"]
    for name in k8s:  # data and bookkeeping tasks are small CPU pods
        if name not in training:
            assert "emptyDirMounts" not in k8s[name] and "tolerations" not in k8s[name], name


def test_credentials_come_from_secrets_on_every_task_never_from_parameters(checked_in):
    spec, platform = checked_in
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert set(k8s) == set(spec["deploymentSpec"]["executors"])
    for name, executor in k8s.items():
        secrets = {(s["secretName"], e["envVar"]) for s in executor["secretAsEnv"] for e in s["keyToEnv"]}
        assert {("audiotune-s3", "AWS_ACCESS_KEY_ID"), ("audiotune-s3", "AWS_SECRET_ACCESS_KEY"),
                ("audiotune-mlflow", "MLFLOW_TRACKING_URI")} <= secrets, name
        assert all(s["optional"] for s in executor["secretAsEnv"])  # a key the Secret lacks is skipped
    parameters = " ".join(spec["root"]["inputDefinitions"]["parameters"]).lower()
    assert not any(word in parameters for word in ("secret", "password", "token", "key"))


def test_modes_and_joint_are_conditions_on_the_resolved_config(checked_in):
    spec, _ = checked_in
    conditions = [t["triggerPolicy"]["condition"] for _, _, t in _tasks(spec)
                  if "condition" in t.get("triggerPolicy", {})]
    assert any("prepare-run-mode'] == 'llm'" in c for c in conditions)
    assert any("prepare-run-mode'] == 'flow'" in c for c in conditions)
    assert any("prepare-run-run_joint'] == true" in c for c in conditions)
    exits = [t for _, n, t in _tasks(spec) if n == "finish-run"]
    assert exits[0]["triggerPolicy"]["strategy"] == "ALL_UPSTREAM_TASKS_COMPLETED"
    # four mutually exclusive branches (llm, flow, both with joint, both without), each ends in an export and its
    # evaluation (which registers the model)
    branches = [{_base(n) for n in comp.get("dag", {}).get("tasks", {})}
                for c, comp in spec["components"].items() if c.startswith("comp-condition-")]
    assert sorted(sorted(b) for b in branches if "export-model" in b) == [
        ["evaluate-model", "export-model"], ["evaluate-model", "export-model", "train-flow"],
        ["evaluate-model", "export-model", "train-joint"], ["evaluate-model", "export-model", "train-llm"]]


def test_parameters_default_to_the_config_and_are_described(checked_in):
    spec, _ = checked_in
    inputs = spec["root"]["inputDefinitions"]["parameters"]
    typed, mapping = params.split(load_config(COMPILED_FROM))
    assert typed == params.defaults()  # the file sets only cluster settings: the schema's defaults
    expected = {**typed, "config": mapping}
    assert set(inputs) == set(expected)
    for name, value in expected.items():
        assert inputs[name].get("defaultValue") == value, name
        assert inputs[name].get("description"), f"pipeline parameter {name} has no description"


def test_every_component_input_is_described(checked_in):
    spec, _ = checked_in
    for name, comp in spec["components"].items():
        if "executorLabel" not in comp:
            continue
        for kind in ("parameters", "artifacts"):
            for inp, definition in comp.get("inputDefinitions", {}).get(kind, {}).items():
                if inp == "status":  # PipelineTaskFinalStatus, filled in by Kubeflow
                    continue
                assert definition.get("description"), f"{name}: input {inp} has no description"


def test_a_config_bakes_its_values_into_the_defaults(tmp_path):
    cfg = load_config(ROOT / "examples" / "demo.yaml", ["pipeline.retries=4"])
    spec, _, _ = _compile(tmp_path, cfg)
    inputs = spec["root"]["inputDefinitions"]["parameters"]
    assert inputs["mlflow_experiment"]["defaultValue"] == "audiotune-demo"
    assert inputs["config"]["defaultValue"]["llm"]["init"] == "scratch"
    assert all(t["retryPolicy"]["maxRetryCount"] == 4 for _, n, t in _tasks(spec) if _base(n) in TRAINING)


def test_cluster_settings_reach_the_pods(tmp_path):
    cfg = load_config(COMPILED_FROM, [
        "cluster.gpu_type=NVIDIA-H100-80GB-HBM3", "cluster.cpu='16'", "cluster.memory=200Gi", "cluster.shm_size=32Gi",
        "cluster.node_selector={pool: gpu}", "cluster.model_cache_pvc=model-cache", "cluster.labels={team: speech}",
        "cluster.extra_secrets=[hf-token]", "cluster.image_pull_secrets=[regcred]", "pipeline.retries=4",
    ])
    spec, platform, _ = _compile(tmp_path, cfg)
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    llm = k8s["exec-train-llm"]
    assert llm["nodeSelector"]["labels"] == {"pool": "gpu", "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert llm["emptyDirMounts"][0]["sizeLimit"] == "32Gi"
    assert llm["pvcMount"][0]["mountPath"] == "/cache" and llm["pvcMount"][0]["constant"] == "model-cache"
    assert llm["podMetadata"]["labels"] == {"team": "speech"}
    assert llm["secretAsVolume"][0]["secretName"] == "hf-token"
    assert llm["imagePullSecret"][0]["secretName"] == "regcred"
    env = {e["name"]: e["value"] for e in spec["deploymentSpec"]["executors"]["exec-train-llm"]["container"]["env"]}
    assert env == {"XDG_CACHE_HOME": "/cache", "HF_HOME": "/cache/huggingface"}
    resources = spec["deploymentSpec"]["executors"]["exec-train-llm"]["container"]["resources"]
    assert resources["cpuRequest"] == 16.0 and resources["memoryLimit"] == 214.7483648
    assert "pvcMount" in k8s["exec-tokenize-data"] and "pvcMount" not in k8s["exec-convert-data"]
    assert all(t["retryPolicy"]["maxRetryCount"] == 4 for _, n, t in _tasks(spec) if _base(n) in TRAINING)


def test_multinode_training_tasks_only_drive_a_pytorchjob(tmp_path):
    spec, platform, _ = _compile(tmp_path, load_config(COMPILED_FROM, ["cluster.num_nodes=4",
                                                                       "pipeline.output_uri=s3://bucket/out"]))
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    executor = spec["deploymentSpec"]["executors"]["exec-train-llm"]["container"]
    assert "accelerator" not in executor.get("resources", {})  # the PyTorchJob's pods get the GPUs
    assert "emptyDirMounts" not in k8s["exec-train-llm"] and "tolerations" not in k8s["exec-train-llm"]
    assert k8s["exec-train-llm"]["secretAsEnv"]  # it still needs the credentials


def test_training_tasks_output_what_they_launched(checked_in):
    spec, _ = checked_in
    for name in ("comp-train-llm", "comp-train-flow", "comp-train-joint"):
        artifacts = spec["components"][name]["outputDefinitions"]["artifacts"]
        assert artifacts["job_manifest"]["artifactType"]["schemaTitle"] == "system.Artifact", name


def test_zero_stage_parameter_accepts_auto(checked_in):
    spec, _ = checked_in
    zero = spec["root"]["inputDefinitions"]["parameters"]["zero_stage"]
    assert zero["parameterType"] == "STRING" and zero["defaultValue"] == "0" and "auto" in zero["description"]


def test_default_config_compiles_like_the_module_pipeline(tmp_path):
    a = _compile(tmp_path, AudiotuneConfig())[2]
    (tmp_path / "finetune.yaml").unlink()
    b = _compile(tmp_path, None)[2]
    assert a == b

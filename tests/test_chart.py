"""The Helm chart: values against values.schema.json, every template rendered by Helm itself (helm-python-sdk, the
Helm v4 Go SDK, installed by `make setup`) for the default and a fully-specified values file, every object
against Kubernetes' schemas, and the RBAC grants exactly what the TrainJob (or PyTorchJob) client calls."""

from __future__ import annotations

import json
from pathlib import Path

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml

from audiotune import __version__, sdk
from audiotune.cluster.kube import KINDS, rbac_rules
from audiotune.config import ConfigError
from audiotune.config import validate as validate_config

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "audiotune"
VALUES = {"default": CHART / "values.yaml", "full": ROOT / "tests" / "chart" / "values-full.yaml"}
K8S_VERSION = "1.30"
NAMESPACE = "ml"


@pytest.fixture(scope="module")
def schema():
    data = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(data)
    return data


def values(name: str) -> dict:
    return yaml.safe_load(VALUES[name].read_text()) or {}


def render(vals: dict, release: str = "audiotune") -> dict[str, list[dict]]:
    """Template path → the objects it renders (plus NOTES.txt as text under its path)."""
    with helm.Chart.load(str(CHART)) as chart:
        chart.validate_schema(vals)
        manifests = chart.render(vals, name=release, namespace=NAMESPACE)
    out: dict[str, list] = {}
    for path, text in manifests.items():
        if path.endswith("NOTES.txt"):
            out[path] = [text]
            continue
        out[path] = [doc for doc in yaml.safe_load_all(text) if doc]
    return out


def objects(rendered: dict[str, list]) -> list[dict]:
    return [doc for path, docs in rendered.items() if not path.endswith("NOTES.txt") for doc in docs]


def test_chart_version_is_the_package_version():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["version"] == chart["appVersion"] == __version__
    for name in ("values.yaml", "values.schema.json", "README.md", "templates/NOTES.txt", "templates/_helpers.tpl"):
        assert (CHART / name).is_file(), name


@pytest.mark.parametrize("name", sorted(VALUES))
def test_values_validate_against_the_schema(schema, name):
    jsonschema.Draft7Validator(schema).validate(values(name))


def test_schema_rejects_mistakes(schema):
    invalid = yaml.safe_load((ROOT / "tests" / "chart" / "values-invalid.yaml").read_text())
    merged = {**values("default"), **{k: {**values("default").get(k, {}), **v} if isinstance(v, dict) else v
                                      for k, v in invalid.items()}}
    merged["mlflow"] = {**values("default")["mlflow"], "backend": {**values("default")["mlflow"]["backend"],
                                                                    **invalid["mlflow"]["backend"]}}
    errors = {".".join(str(p) for p in e.absolute_path) or e.message
              for e in jsonschema.Draft7Validator(schema).iter_errors(merged)}
    assert {"mlflow.backend.type", "modelCache.size", "retrain.schedule", "retrain.kfpHost"} <= errors, errors
    assert any("unknownSection" in e for e in errors), errors
    # postgresql without the Secret holding its URI
    bad = values("default")
    bad["mlflow"]["backend"]["type"] = "postgresql"
    assert list(jsonschema.Draft7Validator(schema).iter_errors(bad))
    from helm_python.errors import HelmValuesError

    with pytest.raises(HelmValuesError, match="retrain/schedule"):
        render(merged)  # Helm refuses them too, through the same schema


def test_helm_lint_has_no_errors():
    result = helm.lint(str(CHART))
    assert result["errors"] == [] and all(m["severity"] <= 1 for m in result["messages"]), result


@pytest.mark.parametrize("name", sorted(VALUES))
def test_templates_render_to_valid_kubernetes_objects(name):
    rendered = render(values(name))
    objs = objects(rendered)
    kinds = sorted(o["kind"] for o in objs)
    expected = ["Deployment", "PersistentVolumeClaim", "Role", "RoleBinding", "Secret", "Secret", "Service",
                "ServiceAccount"]
    expected += ["PersistentVolumeClaim"] if values(name)["mlflow"]["backend"]["type"] == "sqlite" else []
    expected += ["ConfigMap", "CronJob"] if values(name)["retrain"]["enabled"] else []
    assert kinds == sorted(expected)
    names = [(o["kind"], o["metadata"]["name"]) for o in objs]
    assert len(names) == len(set(names)), names
    for obj in objs:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    notes = next(docs[0] for path, docs in rendered.items() if path.endswith("NOTES.txt"))
    assert "s3_secret:" in notes and "mlflow_secret:" in notes


def _one(objs: list[dict], kind: str) -> dict:
    found = [o for o in objs if o["kind"] == kind]
    assert len(found) == 1, f"{kind}: {len(found)}"
    return found[0]


@pytest.mark.parametrize("name", sorted(VALUES))
def test_rbac_grants_exactly_what_the_training_client_calls(name):
    objs = objects(render(values(name)))
    role = _one(objs, "Role")
    assert role["rules"] == rbac_rules(KINDS[values(name)["rbac"].get("launcher", "trainjob")])
    binding = _one(objs, "RoleBinding")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": role["metadata"]["name"]}
    sa = _one(objs, "ServiceAccount")["metadata"]["name"]
    assert {"kind": "ServiceAccount", "name": sa, "namespace": NAMESPACE} in binding["subjects"]
    assert len(binding["subjects"]) == 1 + len(values(name)["rbac"]["extraSubjects"])
    assert not [o for o in objs if o["kind"] in ("ClusterRole", "ClusterRoleBinding")]


def test_retraining_cronjob_submits_the_configured_pipeline():
    vals = values("full")
    objs = objects(render(vals, release="speech"))
    cron = _one(objs, "CronJob")
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    command = pod["containers"][0]["command"]
    assert command[:7] == ["audiotune", "submit", "--config", "/etc/audiotune/config.yaml", "--host",
                           vals["retrain"]["kfpHost"], "--wait"]
    assert "--promote" in command and cron["spec"]["schedule"] == vals["retrain"]["schedule"]
    assert pod["containers"][0]["image"] == "registry.example.com/ml/audiotune-cpu:0.1.0-rc1"
    config_map = _one(objs, "ConfigMap")
    assert config_map["metadata"]["name"] == next(v["configMap"]["name"] for v in pod["volumes"] if "configMap" in v)
    config = yaml.safe_load(config_map["data"]["config.yaml"])
    assert config == vals["retrain"]["config"]
    # what `audiotune submit` checks before it submits anything: the schema (several nodes need an s3:// output_uri)
    # and, with --promote, a registered model name
    sdk.check(validate_config(config, "retrain.config"), promote="--promote" in command)
    rules = cron["spec"]["jobTemplate"]["spec"]["podFailurePolicy"]["rules"]
    assert rules == [{"action": "FailJob", "onExitCodes": {"containerName": "submit", "operator": "In",
                                                            "values": [2, 64]}}]  # "champion stays", bad config
    env_from = [e["secretRef"]["name"] for e in pod["containers"][0]["envFrom"]]
    secrets = {o["metadata"]["name"] for o in objs if o["kind"] == "Secret"}
    assert set(env_from) <= secrets


@pytest.mark.parametrize("remove, message", [
    ("export", "registered_model_name"),  # promote: true without a model to promote
    ("pipeline", "output_uri"),  # num_nodes 2 without one place for every node
])
def test_retraining_config_that_would_fail_at_run_time_does_not_render(remove, message):
    from helm_python.errors import HelmError

    vals = values("full")
    del vals["retrain"]["config"][remove]
    with pytest.raises(ConfigError, match=message):
        sdk.check(validate_config(vals["retrain"]["config"], "retrain.config"), promote=True)
    with pytest.raises(HelmError, match=message):
        render(vals)
    if remove == "export":  # without promote the same config is fine
        vals["retrain"]["promote"] = False
        assert _one(objects(render(vals)), "CronJob")


def test_mlflow_server_backends_and_credentials():
    default = objects(render(values("default")))
    dep = _one(default, "Deployment")
    c = dep["spec"]["template"]["spec"]["containers"][0]
    assert "--backend-store-uri=sqlite:////mlflow/mlflow.db" in c["args"] and dep["spec"]["replicas"] == 1
    assert "--artifacts-destination=s3://mlflow/artifacts" in c["args"]
    svc = _one(default, "Service")
    allowed = next(e["value"] for e in c["env"] if e["name"] == "MLFLOW_SERVER_ALLOWED_HOSTS").split(",")
    assert f"{svc['metadata']['name']}.{NAMESPACE}.svc.cluster.local:*" in allowed
    mlflow_secret = next(o for o in default if o["kind"] == "Secret" and "MLFLOW_TRACKING_URI" in o["stringData"])
    assert mlflow_secret["stringData"]["MLFLOW_TRACKING_URI"] == \
        f"http://{svc['metadata']['name']}.{NAMESPACE}.svc.cluster.local:5000"
    full = objects(render(values("full"), release="speech"))
    dep = _one(full, "Deployment")
    c = dep["spec"]["template"]["spec"]["containers"][0]
    assert "--backend-store-uri=$(MLFLOW_BACKEND_STORE_URI)" in c["args"] and dep["spec"]["replicas"] == 2
    uri = next(e for e in c["env"] if e["name"] == "MLFLOW_BACKEND_STORE_URI")
    assert uri["valueFrom"]["secretKeyRef"] == {"name": "mlflow-db", "key": "connection-uri"}
    s3 = next(o for o in full if o["kind"] == "Secret" and "AWS_ACCESS_KEY_ID" in o["stringData"])
    assert s3["stringData"]["AWS_ENDPOINT_URL"] == "http://minio-service.kubeflow:9000"
    # existing Secrets are referenced, not created
    vals = values("default")
    vals["s3"]["existingSecret"] = "my-s3"
    vals["mlflow"]["client"]["existingSecret"] = "my-mlflow"
    objs = objects(render(vals))
    assert not [o for o in objs if o["kind"] == "Secret"]
    assert _one(objs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["envFrom"] == [
        {"secretRef": {"name": "my-s3"}}]

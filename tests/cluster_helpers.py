"""What the PyTorchJob and TrainJob tests share: a job spec, the CRD schema as the API server applies it, the
kubeconfig of a fake API server, and the RBAC verbs the recorded calls needed."""

from __future__ import annotations

from pathlib import Path

import yaml

from audiotune.cluster import JobSpec

K8S_VERSION = "1.30"
RUN_ID = "3f1d9c2e-6a7b-4c8d-9e0f-112233445566"
IMAGE = "ghcr.io/audiotune/audiotune-cuda:0.1.0"
GPU_TOLERATIONS = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
                   {"key": "spot", "operator": "Equal", "value": "true", "effect": "NoExecute",
                    "tolerationSeconds": 300}]
FAST = dict(poll_interval_s=0.01, watch_timeout_s=1, log_drain_s=5)  # follow_job's waits, short


def job_spec(argv: list[str], **kw) -> JobSpec:
    """Three nodes of 8 GPUs in namespace ``ml`` running ``audiotune <argv>``; ``kw`` replaces any field."""
    values = dict(run_id=RUN_ID, task="train-llm", image=IMAGE, argv=argv, num_nodes=3, gpus_per_node=8,
                  namespace="ml")
    values.update(kw)
    return JobSpec(**values)


def strict(schema):
    """The CRD schema as the API server applies it with strict field validation: unknown fields are errors."""
    if isinstance(schema, dict):
        schema = {k: strict(v) for k, v in schema.items()}
        if "properties" in schema and "additionalProperties" not in schema \
                and not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema["additionalProperties"] = False
    elif isinstance(schema, list):
        schema = [strict(v) for v in schema]
    return schema


def crd_schema(path: Path, group: str, kind: str, version: str) -> dict:
    """The strict OpenAPI schema of ``version`` of the CRD at ``path``, which must define ``group`` / ``kind``."""
    crd = yaml.safe_load(Path(path).read_text())
    assert (crd["spec"]["group"], crd["spec"]["names"]["kind"]) == (group, kind)
    found = next(v for v in crd["spec"]["versions"] if v["name"] == version)
    return strict(found["schema"]["openAPIV3Schema"])


def use_kubeconfig(tmp_path: Path, url: str, monkeypatch) -> Path:
    """A kubeconfig for the API server at ``url`` (no credentials, default namespace), set as ``$KUBECONFIG``."""
    config = {"apiVersion": "v1", "kind": "Config", "current-context": "t",
              "clusters": [{"name": "c", "cluster": {"server": url}}], "users": [{"name": "u", "user": {}}],
              "contexts": [{"name": "t", "context": {"cluster": "c", "user": "u"}}]}
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump(config))
    monkeypatch.setenv("KUBECONFIG", str(path))
    return path


def rbac_use(requests, plural: str) -> set[tuple[str, str]]:
    """(resource, verb) of each recorded API call, as the API server's authorizer sees it; ``plural`` is the job's
    resource (``pytorchjobs``, ``trainjobs``)."""
    used = set()
    for method, path, query in requests:
        parts = path.strip("/").split("/")
        if plural in parts:
            watching = query.get("watch", [""])[0].lower() == "true"
            verb = {"POST": "create", "DELETE": "delete"}.get(method) or (
                "get" if parts[-1] != plural else "watch" if watching else "list")
            used.add((plural, verb))
        else:
            used.add({"log": ("pods/log", "get"), "pods": ("pods", "list")}.get(parts[-1], (path, method)))
    return used

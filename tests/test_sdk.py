"""SDK and CLI submission against a small Kubeflow Pipelines v2beta1 server on 127.0.0.1.

The server answers what ``kfp.Client`` calls (healthz, experiments, pipeline upload and versions,
create run, get run) and the UI's pod-log endpoint, and records every request, so the tests check
what the client sends: the compiled spec, the parameters, the experiment, the credentials (a token
or the pod's ServiceAccount token); and the CLI's exit codes for succeeded, failed and not-promoted
runs and for bad usage, and the CI example's handling of them.
"""

from __future__ import annotations

import email.parser
import json
import os
import re
import socket
import subprocess
import tempfile
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from audiotune import cli, sdk
from audiotune.config import ConfigError, load_config
from audiotune.orchestration import params

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture(autouse=True)
def no_ambient_credentials(monkeypatch, tmp_path):
    """No host, token or ServiceAccount token from the machine running the tests."""
    for name in ("KF_PIPELINES_ENDPOINT", "KF_PIPELINES_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("KF_PIPELINES_SA_TOKEN_PATH", str(tmp_path / "no-sa-token"))


class FakeKFP:
    """A scripted Kubeflow Pipelines API: each run goes through ``states``; ``failed_task`` fails a task."""

    def __init__(self, states=("RUNNING", "SUCCEEDED"), token: str | None = None, failed_task: str | None = None):
        self.states = list(states)
        self.token = token
        self.failed_task = failed_task
        self.requests: list[dict] = []
        self.experiments: dict[str, dict] = {}
        self.pipelines: dict[str, dict] = {}
        self.versions: dict[str, dict] = {}  # id → {"pipeline_id", "display_name", "spec": the uploaded YAML}
        self.runs: dict[str, dict] = {}
        self.polls: dict[str, int] = {}
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _send(self, code: int, body) -> None:
                data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json" if not isinstance(body, str) else "text/plain")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _handle(self, method: str) -> None:
                url = urllib.parse.urlparse(self.path)
                query = dict(urllib.parse.parse_qsl(url.query))
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                kind = self.headers.get("Content-Type", "")
                body = None
                if raw and kind.startswith("application/json"):
                    body = json.loads(raw)
                elif raw and kind.startswith("multipart/form-data"):  # an uploaded pipeline package
                    message = email.parser.BytesParser().parsebytes(
                        f"Content-Type: {kind}\r\n\r\n".encode() + raw)
                    body = {part.get_param("name", header="content-disposition"): part.get_payload(decode=True)
                            .decode() for part in message.get_payload()}
                fake.requests.append({"method": method, "path": url.path, "query": query, "body": body,
                                      "auth": self.headers.get("Authorization")})
                if fake.token and self.headers.get("Authorization") != f"Bearer {fake.token}":
                    return self._send(401, {"error": "Unauthorized", "code": 16, "message": "missing token"})
                code, reply = fake.route(method, url.path, query, body)
                self._send(code, reply)

            def do_GET(self):  # noqa: N802
                self._handle("GET")

            def do_POST(self):  # noqa: N802
                self._handle("POST")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def route(self, method: str, path: str, query: dict, body: dict | None):
        if path == "/apis/v2beta1/healthz":
            return 200, {"multi_user": False, "pipeline_store": "database"}
        if path == "/apis/v2beta1/experiments" and method == "GET":
            wanted = json.loads(query.get("filter", "{}")).get("predicates", [{}])[0].get("string_value") or \
                json.loads(query.get("filter", "{}")).get("predicates", [{}])[0].get("stringValue")
            found = [e for e in self.experiments.values() if e["display_name"] == wanted]
            return 200, ({"experiments": found, "total_size": len(found)} if found else {})
        if path == "/apis/v2beta1/experiments" and method == "POST":
            exp = {"experiment_id": f"exp-{len(self.experiments) + 1}", "display_name": body["display_name"],
                   "namespace": body.get("namespace") or ""}
            self.experiments[exp["experiment_id"]] = exp
            return 200, exp
        if path == "/apis/v2beta1/pipelines" and method == "GET":
            wanted = self._filter_name(query)
            found = [p for p in self.pipelines.values() if p["display_name"] == wanted]
            return 200, ({"pipelines": found, "total_size": len(found)} if found else {})
        if path == "/apis/v2beta1/pipelines/upload" and method == "POST":
            pipeline = {"pipeline_id": f"pipe-{len(self.pipelines) + 1}", "display_name": query["name"]}
            self.pipelines[pipeline["pipeline_id"]] = pipeline
            self._add_version(pipeline["pipeline_id"], query["name"], body["uploadfile"])
            return 200, pipeline
        if path == "/apis/v2beta1/pipelines/upload_version" and method == "POST":
            return 200, self._add_version(query["pipelineid"], query["name"], body["uploadfile"])
        if path.startswith("/apis/v2beta1/pipelines/") and path.endswith("/versions") and method == "GET":
            pipeline_id, wanted = path.split("/")[4], self._filter_name(query)
            found = [{k: v for k, v in ver.items() if k != "spec"} for ver in self.versions.values()
                     if ver["pipeline_id"] == pipeline_id and wanted in (None, ver["display_name"])]
            return 200, ({"pipeline_versions": found, "total_size": len(found)} if found else {})
        if path == "/apis/v2beta1/runs" and method == "POST":
            run_id = f"run-{len(self.runs) + 1}"
            run = {**body, "run_id": run_id, "state": "PENDING"}
            self.runs[run_id] = run
            return 200, run
        if path.startswith("/apis/v2beta1/runs/") and method == "GET":
            run_id = path.rsplit("/", 1)[-1]
            if run_id not in self.runs:
                return 404, {"code": 5, "message": f"run {run_id} not found"}
            poll = self.polls[run_id] = self.polls.get(run_id, -1) + 1
            state = self.states[min(poll, len(self.states) - 1)]
            return 200, {**self.runs[run_id], "state": state, "run_details": self._details(run_id, state)}
        if path == "/k8s/pod/logs":
            lines = [f"log line {i}" for i in range(50)] + ["Traceback: boom in " + query.get("podname", "")]
            return 200, "\n".join(lines) + "\n"
        return 404, {"code": 5, "message": f"no route {method} {path}"}

    @staticmethod
    def _filter_name(query: dict) -> str | None:
        predicates = json.loads(query.get("filter") or "{}").get("predicates") or [{}]
        return predicates[0].get("string_value") or predicates[0].get("stringValue")

    def _add_version(self, pipeline_id: str, name: str, spec: str) -> dict:
        version = {"pipeline_id": pipeline_id, "pipeline_version_id": f"ver-{len(self.versions) + 1}",
                   "display_name": name, "spec": spec}
        self.versions[version["pipeline_version_id"]] = version
        return {k: v for k, v in version.items() if k != "spec"}

    def _details(self, run_id: str, state: str) -> dict:
        tasks = [{"display_name": "exit-handler-1", "state": state},
                 {"display_name": "prepare run", "state": "SUCCEEDED",
                  "child_tasks": [{"pod_name": f"{run_id}-prepare-pod"}]}]
        if self.failed_task and state == "FAILED":
            tasks.append({"display_name": self.failed_task, "state": "FAILED",
                          "error": {"code": 2, "message": "container exited with code 1"},
                          "child_tasks": [{"pod_name": f"{run_id}-driver"}, {"pod_name": f"{run_id}-train-pod"}]})
        return {"task_details": tasks}

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def demo_cfg():
    return load_config(EXAMPLES / "demo.yaml", ["convert.source=s3://corpora/demo/manifest.jsonl",
                                                 "llm.train.lr=0.003", "pipeline.root=s3://kfp-artifacts/root"])


def _created_run(fake: FakeKFP) -> dict:
    [req] = [r for r in fake.requests if r["method"] == "POST" and r["path"] == "/apis/v2beta1/runs"]
    return req["body"]


def test_submit_uploads_the_compiled_pipeline_and_runs_it_with_the_parameters(demo_cfg):
    with FakeKFP() as fake:
        run = sdk.submit(demo_cfg, host=fake.url, experiment="tts-retrain", run_name="nightly")
    assert run.run_id == "run-1" and run.url == f"{fake.url}/#/runs/details/run-1" and run.state is None
    body = _created_run(fake)
    assert body["display_name"] == "nightly"
    assert fake.experiments[body["experiment_id"]]["display_name"] == "tts-retrain"
    version = fake.versions["ver-2"]
    assert body["pipeline_version_reference"] == {"pipeline_id": version["pipeline_id"],
                                                  "pipeline_version_id": version["pipeline_version_id"]}
    assert fake.pipelines[version["pipeline_id"]]["display_name"] == "audiotune-finetune"
    spec, platform = yaml.safe_load_all(version["spec"])  # the compiled pipeline, both documents
    assert spec["pipelineInfo"]["name"] == "audiotune-finetune" and "kubernetes" in platform["platforms"]
    assert version["spec"] == Path(sdk.compile(Path(tempfile.mkdtemp()) / "p.yaml", demo_cfg)).read_text()
    sent = body["runtime_config"]["parameters"]
    assert sent["source_uri"] == "s3://corpora/demo/manifest.jsonl" and sent["llm_lr"] == 0.003
    assert sent["mode"] == "both" and sent["mlflow_experiment"] == "audiotune-demo"
    assert body["runtime_config"]["pipeline_root"] == "s3://kfp-artifacts/root"
    # the mapping plus the typed parameters give back exactly the config that was submitted
    typed = {k: v for k, v in sent.items() if k != "config"}
    assert params.resolve(sent["config"], typed)[0] == demo_cfg


def test_the_same_pipeline_is_uploaded_once_and_a_changed_one_as_a_new_version(demo_cfg):
    with FakeKFP() as fake:
        sdk.submit(demo_cfg, host=fake.url)
        sdk.submit(demo_cfg, host=fake.url)
        # creating the pipeline made a first version named after it; runs use the content-named one
        assert [v["display_name"].startswith("audiotune-finetune-") for v in fake.versions.values()] == [False, True]
        assert len(fake.runs) == 2 and {r["pipeline_version_reference"]["pipeline_version_id"]
                                        for r in fake.runs.values()} == {"ver-2"}
        other = demo_cfg.model_copy(update={"pipeline": demo_cfg.pipeline.model_copy(update={"retries": 5})})
        sdk.submit(other, host=fake.url)
    assert len(fake.pipelines) == 1 and len(fake.versions) == 3


def test_submit_inline_sends_the_spec_with_the_run(demo_cfg):
    with FakeKFP() as fake:
        sdk.submit(demo_cfg, host=fake.url, upload=False)
    body = _created_run(fake)
    assert fake.versions == {}
    assert body["pipeline_spec"]["pipeline_spec"]["pipelineInfo"]["name"] == "audiotune-finetune"
    assert "kubernetes" in body["pipeline_spec"]["platform_spec"]["platforms"]
    assert body["runtime_config"]["parameters"]["source_uri"] == "s3://corpora/demo/manifest.jsonl"


def test_submit_default_experiment_is_the_mlflow_experiment(demo_cfg):
    with FakeKFP() as fake:
        sdk.submit(demo_cfg, host=fake.url)
    assert fake.experiments[_created_run(fake)["experiment_id"]]["display_name"] == "audiotune-demo"


def test_invalid_config_is_refused_before_anything_is_sent(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("llm:\n  lora:\n    r: 0\n")
    with FakeKFP() as fake:
        with pytest.raises(ConfigError, match=r"llm\.lora\.r"):
            sdk.submit(str(bad), host=fake.url)
        code = cli.main(["submit", "--config", str(bad), "--host", fake.url])
    assert code == 64 and fake.requests == []  # submit's 2 means "not promoted"
    assert cli.main(["config", "--config", str(bad)]) == 2  # every other command: 2


def test_submit_usage_and_config_errors_exit_64_before_anything_is_sent(capsys, monkeypatch):
    demo = ["--config", str(EXAMPLES / "demo.yaml"), "--set", "convert.source=s3://c/m.jsonl"]
    with FakeKFP() as fake:
        monkeypatch.setenv("KF_PIPELINES_ENDPOINT", "")  # what CI gets from a missing secret
        assert cli.main(["submit", *demo, "--wait"]) == 64
        assert "no Kubeflow host" in capsys.readouterr().err
        monkeypatch.setenv("KF_PIPELINES_ENDPOINT", fake.url)
        assert cli.main(["submit", *demo, "--promote"]) == 64  # --promote without --wait
        # a run that would succeed and then not be promotable: refused before it is submitted
        assert cli.main(["submit", *demo, "--wait", "--promote"]) == 64
        assert "export.registered_model_name" in capsys.readouterr().err
        assert cli.main(["submit", *demo, "--wait", "--promote", "--set", "export.registered_model_name=tts",
                         "--set", "tracking.enabled=false"]) == 64
        assert cli.main(["submit", *demo, "--set", "cluster.num_nodes=2"]) == 64  # needs pipeline.output_uri
        assert "pipeline.output_uri" in capsys.readouterr().err
        for argv in (["submit", *demo, "--wiat"], ["submit"]):  # argparse's usage errors too
            with pytest.raises(SystemExit) as info:
                cli.main(argv)
            assert info.value.code == 64, argv
        assert cli.main(["submit", *demo, "--set", "llm.lora.r=0"]) == 64
        assert fake.requests == []
        with pytest.raises(SystemExit) as info:
            cli.main(["convert", "--wiat"])
        assert info.value.code == 2


def test_wait_returns_the_final_state_and_reports_progress(demo_cfg):
    lines = []
    with FakeKFP(states=("PENDING", "RUNNING", "RUNNING", "SUCCEEDED")) as fake:
        run = sdk.submit(demo_cfg, host=fake.url)
        state = sdk.wait(run.run_id, timeout=30, host=fake.url, poll_s=0.01, progress=lines.append)
    assert state == "SUCCEEDED"
    assert lines[0] == "prepare run: succeeded" and "run run-1: running" in lines
    assert lines[-1] == "run run-1: succeeded"


def test_wait_times_out(demo_cfg):
    with FakeKFP(states=("RUNNING",)) as fake:
        run = sdk.submit(demo_cfg, host=fake.url)
        with pytest.raises(TimeoutError, match="still RUNNING"):
            sdk.wait(run.run_id, timeout=0.05, host=fake.url, poll_s=0.01)


def _submit_cli(fake: FakeKFP, *extra: str) -> int:
    return cli.main(["submit", "--config", str(EXAMPLES / "demo.yaml"), "--set", "convert.source=s3://c/m.jsonl",
                     "--set", "export.registered_model_name=tts", "--host", fake.url, "--poll", "0.01", *extra])


def test_cli_wait_exit_0_when_the_run_succeeds(capsys):
    with FakeKFP(states=("RUNNING", "SUCCEEDED")) as fake:
        assert _submit_cli(fake, "--wait") == 0
    out = capsys.readouterr().out
    assert json.loads(out.splitlines()[0]) == {"run_id": "run-1", "url": f"{fake.url}/#/runs/details/run-1"}
    assert "run run-1 succeeded" in out


def test_cli_wait_exit_1_with_the_failed_task_and_its_last_log_lines(capsys):
    with FakeKFP(states=("RUNNING", "FAILED"), failed_task="train llm") as fake:
        assert _submit_cli(fake, "--wait") == 1
    err = capsys.readouterr().err
    assert "run run-1 failed" in err
    assert "failed task: train llm: container exited with code 1" in err
    assert "Traceback: boom in run-1-train-pod" in err  # the last lines of the task's own pod
    assert "log line 49" in err and "log line 10" not in err
    assert "Traceback (most recent call last)" not in err


def test_cli_promote_exit_codes(capsys, monkeypatch):
    verdicts = iter([True, False])

    def fake_promote(config, run_id, metric=None):
        promoted = next(verdicts)
        return sdk.Promotion(promoted, "tts", "7", "promoted" if promoted else
                             f"did not beat the champion on {metric or 'the eval gate'}")

    monkeypatch.setattr(sdk, "promote", fake_promote)
    with FakeKFP(states=("SUCCEEDED",)) as fake:
        assert _submit_cli(fake, "--wait", "--promote") == 0
        assert _submit_cli(fake, "--wait", "--promote") == 2
    assert "did not beat the champion on the eval gate" in capsys.readouterr().out  # the gate is the default
    with FakeKFP(states=("FAILED",), failed_task="export") as fake:  # a failed run never promotes
        assert _submit_cli(fake, "--wait", "--promote") == 1


def test_unreachable_host_is_one_line(capsys):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens here once closed
    code = cli.main(["submit", "--config", str(EXAMPLES / "demo.yaml"), "--host", f"http://127.0.0.1:{port}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "is unreachable" in err[0] and f"127.0.0.1:{port}" in err[0]


def test_auth_failure_is_one_line(capsys, demo_cfg):
    with FakeKFP(token="s3cret") as fake:
        code = _submit_cli(fake, "--token", "wrong")
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 1 and len(err) == 1 and "refused the credentials (HTTP 401)" in err[0]
        run = sdk.submit(demo_cfg, host=fake.url, token="s3cret")  # the right token gets through
    assert run.run_id == "run-1"
    assert all(r["auth"] == "Bearer s3cret" for r in fake.requests if r["path"] == "/apis/v2beta1/runs")


def test_compile_command_writes_the_pipeline(tmp_path, capsys):
    out = tmp_path / "p.yaml"
    assert cli.main(["compile", "--output", str(out)]) == 0
    assert json.loads(capsys.readouterr().out) == {"output": str(out)}
    assert out.read_text().count("\n---\n") == 1


def test_promote_moves_the_champion_only_to_a_better_model(tmp_path, monkeypatch):
    """What ``submit --promote`` does after a successful run: find the version the run registered (the export
    task tagged the run's MLflow parent run with it) and let the registry compare it with the champion."""
    from audiotune.config import AudiotuneConfig
    from audiotune.export import registry
    from audiotune.orchestration import runs

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = AudiotuneConfig.model_validate({"export": {"registered_model_name": "tts"}})
    (tmp_path / "model").mkdir()
    for kfp_run, val_loss in (("kfp-1", 2.0), ("kfp-2", 1.5), ("kfp-3", 1.8)):
        parent = runs.start(cfg, kfp_run, {})
        version = registry.register(cfg.tracking, "tts", str(tmp_path / "model"), parent, {}, {"val_loss": val_loss})
        runs.set_tags(cfg.tracking, parent, {"audiotune.registered_version": version})
    verdicts = [sdk.promote(cfg, kfp_run, "val_loss") for kfp_run in ("kfp-1", "kfp-2", "kfp-3")]
    assert [(v.promoted, v.version) for v in verdicts] == [(True, "1"), (True, "2"), (False, "3")]
    assert "did not beat" in verdicts[2].message
    assert sdk.promote(cfg, "kfp-unknown", "val_loss").promoted is False  # a run that registered nothing


def test_the_pods_service_account_token_is_sent_when_no_token_is_given(tmp_path, monkeypatch, demo_cfg, capsys):
    """kfp.Client skips the projected ServiceAccount token once a host is given; the chart's CronJob relies on it."""
    token = tmp_path / "sa-token"
    token.write_text("sa-1\n")
    monkeypatch.setenv("KF_PIPELINES_SA_TOKEN_PATH", str(token))
    with FakeKFP(token="sa-1") as fake:
        conn = sdk.Connection(fake.url)
        assert sdk.submit(demo_cfg, host=conn).run_id == "run-1"
        token.write_text("sa-2")  # the kubelet rotates the token: the next request reads it again
        fake.token = "sa-2"
        assert sdk.submit(demo_cfg, host=conn).run_id == "run-2"
    assert {r["auth"] for r in fake.requests} == {"Bearer sa-1", "Bearer sa-2"}
    assert fake.requests[0]["path"] == "/apis/v2beta1/healthz" and fake.requests[0]["auth"] == "Bearer sa-1"
    # the CLI without --token: probe, API calls and the failed task's log all authenticated
    with FakeKFP(states=("FAILED",), failed_task="train llm", token="sa-2") as fake:
        assert _submit_cli(fake, "--wait") == 1
    assert "Traceback: boom in run-1-train-pod" in capsys.readouterr().err
    assert all(r["auth"] == "Bearer sa-2" for r in fake.requests)
    assert any(r["path"] == "/k8s/pod/logs" for r in fake.requests)
    # an explicit token wins over the ServiceAccount's
    with FakeKFP(token="explicit") as fake:
        sdk.submit(demo_cfg, host=fake.url, token="explicit")
    assert {r["auth"] for r in fake.requests} == {"Bearer explicit"}


def test_wait_takes_the_host_from_the_environment_like_submit(demo_cfg, monkeypatch):
    with FakeKFP(states=("RUNNING", "SUCCEEDED")) as fake:
        monkeypatch.setenv("KF_PIPELINES_ENDPOINT", fake.url)
        run = sdk.submit(demo_cfg)
        assert sdk.wait(run.run_id, timeout=30, poll_s=0.01) == "SUCCEEDED"
    monkeypatch.delenv("KF_PIPELINES_ENDPOINT")
    with pytest.raises(ConfigError, match="KF_PIPELINES_ENDPOINT"):
        sdk.wait("run-1", timeout=1)


# --- the CI example ---------------------------------------------------------------------------------------------

def _workflow_step(name: str) -> str:
    workflow = yaml.safe_load((EXAMPLES / "ci" / "retrain.yml").read_text())
    [step] = [s for s in workflow["jobs"]["retrain"]["steps"] if s.get("name") == name]
    return re.sub(r"\$\{\{[^}]*\}\}", "ci", step["run"])  # what GitHub substitutes before bash runs it


def _run_step(script: str, tmp_path: Path, env: dict[str, str], audiotune_exit: int = 0) -> subprocess.CompletedProcess:
    """The step's script under bash (as GitHub runs it: -e), with a stand-in `audiotune` that exits as told."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / "audiotune"
    fake.write_text(f"#!/bin/sh\necho \"audiotune $*\" >> {tmp_path / 'calls'}\nexit {audiotune_exit}\n")
    fake.chmod(0o755)
    base = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "GITHUB_SHA": "0123456789abcdef"}
    return subprocess.run(["bash", "-e", "-c", script], env={**base, **env}, capture_output=True, text=True)


@pytest.mark.parametrize("code, expected", [(0, 0), (1, 1), (2, 0), (64, 64)])
def test_the_ci_workflow_only_forgives_a_kept_champion(tmp_path, code, expected):
    result = _run_step(_workflow_step("Train, wait, promote"), tmp_path, {}, audiotune_exit=code)
    assert result.returncode == expected, result.stdout + result.stderr
    assert ("::notice::" in result.stdout) == (code == 2)
    [call] = (tmp_path / "calls").read_text().splitlines()
    assert call.startswith("audiotune submit --config examples/ci/retrain.yaml --wait --promote")


def test_the_ci_workflow_fails_without_the_kfp_host_secret(tmp_path):
    check = _workflow_step("Check the secrets")
    result = _run_step(check, tmp_path, {"KF_PIPELINES_ENDPOINT": "", "MLFLOW_TRACKING_URI": "http://mlflow"})
    assert result.returncode != 0 and "KFP_HOST" in result.stdout
    assert _run_step(check, tmp_path, {"KF_PIPELINES_ENDPOINT": "http://kfp",
                                       "MLFLOW_TRACKING_URI": "http://mlflow"}).returncode == 0
    # and submit itself refuses an empty host with a code the workflow does not forgive
    assert cli.main(["submit", "--config", str(EXAMPLES / "ci" / "retrain.yaml"), "--wait", "--promote"]) == 64


def test_the_ci_config_can_be_promoted():
    cfg = sdk.check(EXAMPLES / "ci" / "retrain.yaml", promote=True)
    assert cfg.export.registered_model_name and cfg.tracking.enabled

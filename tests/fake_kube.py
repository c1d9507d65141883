"""A small Kubernetes API server on 127.0.0.1 for the TrainJob and PyTorchJob tests.

It answers exactly the calls :mod:`audiotune.cluster.kube` makes through the official client: create / get /
delete / watch of ``trainer.kubeflow.org/v1alpha1`` ``trainjobs`` and ``kubeflow.org/v1`` ``pytorchjobs``, list
pods by label selector, and the follow stream of a pod's log. Jobs move through a scripted list of states, one step
per read of the job (a GET or a watch request), so a test decides exactly what the client sees and nothing depends
on wall-clock timing. Given a CRD's schema for a resource (``schemas``), a create is validated against it as an API
server with strict field validation would, and refused with 422 when it does not fit.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

JOBS = {"pytorchjobs": "/apis/kubeflow.org/v1/namespaces/",
        "trainjobs": "/apis/trainer.kubeflow.org/v1alpha1/namespaces/"}
FAIL_MESSAGE = "PyTorchJob {ns}/{name} is failed because 1 Master replica(s) failed."
TRAINJOB_FAIL_MESSAGE = "jobset {name} failed: job {name}-node-0 has failed (BackoffLimitExceeded)"
NODE0 = {"pytorchjobs": ("training.kubeflow.org/job-name", "training.kubeflow.org/replica-type", "master"),
         "trainjobs": ("jobset.sigs.k8s.io/jobset-name", "jobset.sigs.k8s.io/replicatedjob-name", "node")}


class FakeKube:
    """The fake API server. ``requests`` records ``(method, path, query)`` of every call."""

    def __init__(self):
        self.jobs: dict[tuple[str, str], dict[str, Any]] = {}
        self.kinds: dict[tuple[str, str], str] = {}  # (namespace, name) -> plural
        self.schemas: dict[str, dict[str, Any]] = {}  # plural -> openAPIV3Schema checked on create
        self.trainer_status: dict[str, Any] | None = None  # status.trainerStatus of a TrainJob while Running
        self.scripts: dict[tuple[str, str], list[str]] = {}
        self.steps: dict[tuple[str, str], int] = {}
        self.lingering: dict[tuple[str, str], int] = {}
        self.requests: list[tuple[str, str, dict[str, list[str]]]] = []
        self.log_lines = ["step 1 loss 2.5", "step 2 loss 2.1", "done"]
        self.create_error: tuple[int, str] | None = None
        self.unavailable_gets = 0  # the next N reads of a job answer 503
        self.next_script = ["Created", "Running", "Succeeded"]
        self.rv = 0
        self.lock = threading.Lock()
        self.watch_seen = threading.Event()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)

    def __enter__(self) -> "FakeKube":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def api_client(self):
        from kubernetes import client

        configuration = client.Configuration()
        configuration.host = self.url
        return client.ApiClient(configuration)

    # --- state ----------------------------------------------------------------------------------------------

    def add_job(self, manifest: dict[str, Any], script: list[str]) -> None:
        """Put a job in place (as an earlier attempt left it) that moves through ``script``."""
        key = (manifest["metadata"]["namespace"], manifest["metadata"]["name"])
        with self.lock:
            self.kinds[key] = "trainjobs" if manifest.get("kind") == "TrainJob" else "pytorchjobs"
            self._store(key, json.loads(json.dumps(manifest)), script)

    def calls(self, method: str, kind: str = "jobs") -> list[str]:
        return [path for m, path, _ in self.requests if m == method and kind in path]

    def _store(self, key, obj, script) -> None:
        self.rv += 1
        meta = obj.setdefault("metadata", {})
        meta.update(uid=f"uid-{self.rv}", resourceVersion=str(self.rv), creationTimestamp="2026-01-01T00:00:00Z")
        self.jobs[key], self.scripts[key], self.steps[key] = obj, list(script), 0
        self._apply(key)

    def _apply(self, key) -> None:
        job, script, step = self.jobs[key], self.scripts[key], self.steps[key]
        trainjob = self.kinds.get(key) == "trainjobs"
        conditions = []
        for i, state in enumerate(script[: step + 1]):
            if trainjob and state == "Running":  # a TrainJob has no Running condition: its pods run
                continue
            cond = {"type": state, "status": "True" if i == step or state == "Created" else "False",
                    "reason": f"PyTorchJob{state}", "message": f"PyTorchJob {key[1]} is {state.lower()}.",
                    "lastTransitionTime": "2026-01-01T00:00:00Z"}
            if trainjob:
                cond.update(reason={"Failed": "FailedJobs", "Complete": "JobSetCompleted"}.get(state, state),
                            message=f"TrainJob {key[1]} is {state.lower()}")
                cond["observedGeneration"] = 1
            if state == "Failed":
                cond["message"] = (TRAINJOB_FAIL_MESSAGE if trainjob else FAIL_MESSAGE).format(ns=key[0], name=key[1])
            conditions.append(cond)
        job["status"] = {"conditions": conditions}
        if trainjob and script[step] == "Running" and self.trainer_status:
            job["status"]["trainerStatus"] = dict(self.trainer_status)

    def _advance(self, key) -> bool:
        """One step along the job's script; True when it changed."""
        if key not in self.jobs or self.steps[key] >= len(self.scripts[key]) - 1:
            return False
        self.steps[key] += 1
        self.rv += 1
        self.jobs[key]["metadata"]["resourceVersion"] = str(self.rv)
        self._apply(key)
        return True

    def state(self, key) -> str:
        return self.scripts[key][self.steps[key]]

    # --- HTTP -----------------------------------------------------------------------------------------------

    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _send(self, code: int, body: Any) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _status(self, code: int, reason: str, message: str) -> None:
                self._send(code, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": code,
                                  "reason": reason, "message": message})

            def _stream(self, chunks: list[bytes], delay: float = 0.0) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Transfer-Encoding", "chunked")
                self.send_header("Connection", "close")
                self.end_headers()
                if delay:
                    time.sleep(delay)
                for chunk in chunks:
                    self.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
                self.wfile.write(b"0\r\n\r\n")
                self.close_connection = True

            def _body(self) -> Any:
                length = int(self.headers.get("Content-Length") or 0)
                return json.loads(self.rfile.read(length) or b"{}") if length else {}

            def _route(self, method: str) -> None:
                url = urlparse(self.path)
                query = parse_qs(url.query)
                body = self._body() if method in ("POST", "DELETE") else None
                with fake.lock:
                    fake.requests.append((method, url.path, query))
                parts = url.path.strip("/").split("/")
                for plural, prefix in JOBS.items():
                    if url.path.startswith(prefix) and len(parts) >= 6 and parts[5] == plural:
                        return self._jobs(plural, method, parts[4], parts[6] if len(parts) > 6 else None, query,
                                          body)
                if url.path.startswith("/api/v1/namespaces/") and len(parts) >= 5 and parts[4] == "pods":
                    return self._pods(parts[3], parts[5] if len(parts) > 5 else None,
                                      parts[6] if len(parts) > 6 else None, query)
                self._status(404, "NotFound", "the server could not find the requested resource")

            def do_GET(self):
                self._route("GET")

            def do_POST(self):
                self._route("POST")

            def do_DELETE(self):
                self._route("DELETE")

            def _jobs(self, plural, method, ns, name, query, body):
                if method == "POST":
                    if fake.create_error:
                        code, message = fake.create_error
                        return self._status(code, "Forbidden" if code == 403 else "Invalid", message)
                    if plural in fake.schemas:
                        import jsonschema

                        try:
                            jsonschema.validate(body, fake.schemas[plural])
                        except jsonschema.ValidationError as err:
                            path = ".".join(str(p) for p in err.absolute_path)
                            return self._status(422, "Invalid", f"{plural} is invalid: {path}: {err.message}")
                    key = (ns, body["metadata"]["name"])
                    with fake.lock:
                        if key in fake.jobs:
                            return self._status(409, "AlreadyExists", f'{plural} "{key[1]}" already exists')
                        fake.kinds[key] = plural
                        fake._store(key, body, fake.next_script)
                        job = json.loads(json.dumps(fake.jobs[key]))
                    return self._send(201, job)
                if name is None and query.get("watch", [""])[0].lower() == "true":
                    selector = query.get("fieldSelector", [""])[0]
                    key = (ns, selector.split("=", 1)[1])
                    since = int(query.get("resourceVersion", ["0"])[0] or 0)
                    fake.watch_seen.set()
                    with fake.lock:
                        fake._advance(key)
                        job = fake.jobs.get(key)
                        changed = job is not None and int(job["metadata"]["resourceVersion"]) > since
                        event = json.dumps({"type": "MODIFIED", "object": job}).encode() + b"\n" if changed else b""
                    return self._stream([event] if event else [], delay=0 if event else 0.05)
                key = (ns, name)
                with fake.lock:
                    if method == "GET" and fake.unavailable_gets > 0 and key in fake.jobs:
                        fake.unavailable_gets -= 1
                        return self._status(503, "ServiceUnavailable", "the server is currently unable to handle "
                                            "the request")
                    if method == "DELETE":
                        if key not in fake.jobs:
                            return self._status(404, "NotFound", f'{plural} "{name}" not found')
                        assert body.get("propagationPolicy") == "Foreground", body
                        fake.jobs[key]["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:01Z"
                        fake.lingering[key] = 1  # a foreground delete: visible once more, then gone
                        return self._send(200, {"kind": "Status", "status": "Success"})
                    if key in fake.lingering:
                        if fake.lingering[key] == 0:
                            del fake.lingering[key], fake.jobs[key]
                        else:
                            fake.lingering[key] -= 1
                    if key not in fake.jobs:
                        return self._status(404, "NotFound", f'{plural} "{name}" not found')
                    if "deletionTimestamp" not in fake.jobs[key]["metadata"]:
                        fake._advance(key)
                    job = json.loads(json.dumps(fake.jobs[key]))
                return self._send(200, job)

            def _pod(self, ns: str, job: str, phase: str, plural: str) -> dict[str, Any]:
                job_label, role_label, role = NODE0[plural]
                labels = {job_label: job, role_label: role}
                name, container = f"{job}-master-0", "pytorch"
                if plural == "trainjobs":
                    labels["batch.kubernetes.io/job-completion-index"] = "0"
                    name, container = f"{job}-node-0-0-x7k2p", "node"
                return {"metadata": {"name": name, "namespace": ns, "uid": f"pod-{job}",
                                     "creationTimestamp": "2026-01-01T00:00:00Z", "labels": labels},
                        "status": {"phase": phase, "containerStatuses": [
                            {"name": container, "restartCount": 0, "ready": phase == "Running",
                             "image": "img", "imageID": "img@sha256:0"}]}}

            def _pods(self, ns, pod, sub, query):
                if pod is None:
                    labels = dict(item.split("=", 1) for item in query.get("labelSelector", [""])[0].split(",")
                                  if "=" in item)
                    plural = "trainjobs" if "jobset.sigs.k8s.io/jobset-name" in labels else "pytorchjobs"
                    job_label, role_label, role = NODE0[plural]
                    job = labels.get(job_label)
                    assert labels.get(role_label) == role, labels
                    if plural == "trainjobs":
                        assert labels.get("batch.kubernetes.io/job-completion-index") == "0", labels
                    with fake.lock:
                        state = fake.state((ns, job)) if (ns, job) in fake.jobs else None
                    items = []
                    if state in ("Running", "Restarting", "Succeeded", "Failed", "Complete"):
                        phase = {"Succeeded": "Succeeded", "Complete": "Succeeded", "Failed": "Failed"}.get(
                            state, "Running")
                        items.append(self._pod(ns, job, phase, plural))
                    return self._send(200, {"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": items})
                if sub == "log":
                    follow = query.get("follow", [""])[0].lower() == "true"
                    container = "node" if "-node-0-" in pod else "pytorch"
                    assert follow and query.get("container") == [container], query
                    return self._stream([(line + "\n").encode() for line in fake.log_lines])
                self._status(404, "NotFound", f'pods "{pod}" not found')

        return Handler

"""The Kubernetes API calls behind a training job (a Trainer v2 TrainJob or a Training Operator PyTorchJob):
create, read, watch and delete the job, find the pod of its first node and follow that pod's log.

Every call goes through the official ``kubernetes`` client, so the verbs it needs are exactly the ones the
audiotune chart's Role grants (:func:`rbac_rules`): the job kind's create / get / watch / delete, ``pods`` list and
``pods/log`` get. The API client is injectable (tests point it at a local server); by default it comes from the
pod's service account (in-cluster) or from a kubeconfig.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException

log = logging.getLogger(__name__)

SA_NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


@dataclass(frozen=True)
class JobKind:
    """A custom resource that runs a multi-node training, and how to find the log of its first node.

    Attributes:
        group: API group (``trainer.kubeflow.org``).
        version: API version (``v1alpha1``).
        plural: Resource name in URLs and RBAC rules (``trainjobs``).
        kind: The ``kind`` of its manifests (``TrainJob``).
        container: Name of the training container in its pods.
        node0_labels: Label selector, as ``{label: value}`` with ``{job}`` for the job's name, of node 0's pod.
        install_hint: What a 404 on create probably means.
    """

    group: str
    version: str
    plural: str
    kind: str
    container: str
    node0_labels: tuple[tuple[str, str], ...]
    install_hint: str

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}"

    def node0_selector(self, job: str) -> str:
        return ",".join(f"{k}={v.format(job=job)}" for k, v in self.node0_labels)


PYTORCHJOB = JobKind(
    "kubeflow.org", "v1", "pytorchjobs", "PyTorchJob", "pytorch",
    (("training.kubeflow.org/job-name", "{job}"), ("training.kubeflow.org/replica-type", "master")),
    "is the Kubeflow Training Operator (kubeflow.org/v1 PyTorchJob CRD) installed")
# Trainer v2 runs a TrainJob as a JobSet: replicated job "node", container "node", node i has completion index i
TRAINJOB = JobKind(
    "trainer.kubeflow.org", "v1alpha1", "trainjobs", "TrainJob", "node",
    (("jobset.sigs.k8s.io/jobset-name", "{job}"), ("jobset.sigs.k8s.io/replicatedjob-name", "node"),
     ("batch.kubernetes.io/job-completion-index", "0")),
    "is Kubeflow Trainer v2 (trainer.kubeflow.org/v1alpha1 TrainJob CRD, >= 2.2) installed")
KINDS = {"trainjob": TRAINJOB, "pytorchjob": PYTORCHJOB}


def rbac_rules(kind: JobKind) -> list[dict[str, Any]]:
    """Every call below for ``kind``, as RBAC rules: what the audiotune chart's Role grants, and nothing more."""
    return [
        {"apiGroups": [kind.group], "resources": [kind.plural], "verbs": ["create", "get", "watch", "delete"]},
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]},
        {"apiGroups": [""], "resources": ["pods/log"], "verbs": ["get"]},
    ]


RBAC_RULES = rbac_rules(TRAINJOB)  # the chart's default (cluster.launcher: trainjob)


def load_api_client(kubeconfig: str | None = None, context: str | None = None) -> client.ApiClient:
    """An API client: the pod's service account inside a cluster, else the kubeconfig (``KUBECONFIG``, ~/.kube)."""
    configuration = client.Configuration()
    try:
        if kubeconfig is None and context is None:
            config.load_incluster_config(client_configuration=configuration)
            return client.ApiClient(configuration)
    except config.ConfigException:
        pass
    try:
        config.load_kube_config(config_file=kubeconfig or os.environ.get("KUBECONFIG") or None, context=context,
                                client_configuration=configuration)
    except (config.ConfigException, OSError) as err:
        raise RuntimeError(f"no Kubernetes API to talk to: not inside a cluster and no usable kubeconfig ({err})") \
            from None
    return client.ApiClient(configuration)


def current_namespace(default: str = "default", kubeconfig: str | None = None) -> str:
    """The namespace of this pod (service account mount), else the kubeconfig context's, else ``default``."""
    try:
        text = SA_NAMESPACE_FILE.read_text().strip()
        if text:
            return text
    except OSError:
        pass
    try:
        _, active = config.list_kube_config_contexts(
            config_file=kubeconfig or os.environ.get("KUBECONFIG") or None)
        namespace = (active or {}).get("context", {}).get("namespace")
        if namespace:
            return namespace
    except (config.ConfigException, OSError):
        pass
    return default


def api_message(err: ApiException) -> str:
    """The ``message`` of the API server's Status body, else the HTTP reason."""
    import json

    try:
        body = json.loads(err.body or "{}")
    except (TypeError, ValueError):
        body = {}
    return str(body.get("message") or err.reason or "").strip()


class JobClient:
    """Calls on jobs of one kind and their pods in one namespace.

    Args:
        api_client: A configured ``kubernetes.client.ApiClient``.
        namespace: Namespace of the job and its pods.
        kind: The job's resource (default: a PyTorchJob).
        status: Reads a job object's state (``JobStatus``) from its conditions; used by the follower.
    """

    def __init__(self, api_client: client.ApiClient, namespace: str, kind: JobKind = PYTORCHJOB,
                 status: Callable[[dict[str, Any]], Any] | None = None):
        self.namespace, self.kind, self.status = namespace, kind, status
        self.custom = client.CustomObjectsApi(api_client)
        self.core = client.CoreV1Api(api_client)

    def _res(self) -> tuple[str, str, str, str]:
        return self.kind.group, self.kind.version, self.namespace, self.kind.plural

    # --- the job ---------------------------------------------------------------------------------------------

    def create(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """POST the job; raises ApiException (409 when a job of that name exists)."""
        return self.custom.create_namespaced_custom_object(*self._res(), manifest)

    def get(self, name: str) -> dict[str, Any] | None:
        """The job, or None when there is none of that name."""
        try:
            return self.custom.get_namespaced_custom_object(*self._res(), name)
        except ApiException as err:
            if err.status == 404:
                return None
            raise

    def delete(self, name: str) -> bool:
        """Delete the job with foreground propagation (its pods go first); False when it was already gone."""
        body = client.V1DeleteOptions(propagation_policy="Foreground")
        try:
            self.custom.delete_namespaced_custom_object(*self._res(), name, body=body)
        except ApiException as err:
            if err.status == 404:
                return False
            raise
        return True

    def wait_gone(self, name: str, timeout_s: float, poll_s: float) -> None:
        """Block until no job of that name exists (a foreground delete finishes after the pods are gone)."""
        deadline = time.monotonic() + timeout_s
        while self.get(name) is not None:
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{self.kind.kind} {self.namespace}/{name} still exists {timeout_s:.0f}s after "
                                   "delete")
            time.sleep(poll_s)

    def watch(self, name: str, resource_version: str | None, timeout_s: int) -> Iterator[dict[str, Any]]:
        """Versions of the job after ``resource_version`` for up to ``timeout_s`` seconds (one watch request)."""
        w = watch.Watch()
        kwargs: dict[str, Any] = {"field_selector": f"metadata.name={name}", "timeout_seconds": int(timeout_s),
                                  "_request_timeout": int(timeout_s) + 10}
        if resource_version:
            kwargs["resource_version"] = resource_version
        try:
            for event in w.stream(self.custom.list_namespaced_custom_object, *self._res(),
                                  **kwargs):
                if event.get("type") in ("ADDED", "MODIFIED") and isinstance(event.get("object"), dict):
                    yield event["object"]
        finally:
            w.stop()

    # --- the master pod and its log --------------------------------------------------------------------------

    def master_pod(self, job: str) -> client.V1Pod | None:
        """The pod of the job's first node (PyTorchJob: the master), the newest if there are several."""
        pods = self.core.list_namespaced_pod(self.namespace, label_selector=self.kind.node0_selector(job)).items
        if not pods:
            return None
        return max(pods, key=lambda p: (p.metadata.creation_timestamp is not None, p.metadata.creation_timestamp
                                        or 0, p.metadata.name))

    def open_log(self, pod: str, since_seconds: int | None = None):
        """A streaming (follow) response for the training container's log; read it with :func:`log_lines`."""
        kwargs: dict[str, Any] = {"container": self.kind.container, "follow": True, "_preload_content": False}
        if since_seconds:
            kwargs["since_seconds"] = since_seconds
        return self.core.read_namespaced_pod_log(pod, self.namespace, **kwargs)


def log_lines(resp) -> Iterator[str]:
    """Lines of a streaming log response as they arrive."""
    return watch.watch.iter_resp_lines(resp)


def _container_key(pod: client.V1Pod, container: str) -> tuple[str, int, str]:
    restarts = 0
    for status in (pod.status.container_statuses or []) if pod.status else []:
        if status.name == container:
            restarts = status.restart_count or 0
    return (pod.metadata.uid or pod.metadata.name, restarts, pod.status.phase if pod.status else "")


class LogFollower(threading.Thread):
    """Follows the log of the job's first node (node 0, the master) in the background, each line to ``sink``.

    It waits for the pod to leave Pending, follows the training container, and starts again on a restarted
    container (a new pod, or a higher restart count). :meth:`finish` lets it stream what is left and exit;
    :meth:`abort` stops it at once. Failures to read a log are logged as warnings: a missing log line must not
    fail a training that is otherwise fine, the job's status decides that.
    """

    def __init__(self, jobs: JobClient, job: str, sink: Callable[[str], None], poll_s: float):
        super().__init__(name=f"log-{job}", daemon=True)
        self.jobs, self.job, self.sink, self.poll_s = jobs, job, sink, poll_s
        self._finish = threading.Event()
        self._abort = threading.Event()
        self._resp = None
        self.lines = 0

    def finish(self) -> None:
        """No new containers to wait for: stream the current (or a not yet streamed, finished) one, then exit."""
        self._finish.set()

    def abort(self) -> None:
        """Stop now, closing a log stream that is open."""
        self._abort.set()
        self._finish.set()
        resp = self._resp
        if resp is not None:
            try:
                resp.close()
            except OSError:
                pass

    def run(self) -> None:
        streamed: set[tuple[str, int]] = set()
        last_line_at: float | None = None
        while not self._abort.is_set():
            finishing = self._finish.is_set()  # decide on a pod list made after finish() was called
            try:
                pod = self.jobs.master_pod(self.job)
            except ApiException as err:
                log.warning("cannot list the master pod of %s: %s %s", self.job, err.status, api_message(err))
                pod = None
            if pod is None or (pod.status and pod.status.phase == "Pending"):
                if finishing:
                    return
                self._abort.wait(self.poll_s)
                continue
            uid, restarts, phase = _container_key(pod, self.jobs.kind.container)
            again = (uid, restarts) in streamed
            if again and (finishing or phase in ("Succeeded", "Failed")):
                if finishing:
                    return
                self._abort.wait(self.poll_s)
                continue
            since = int(time.time() - last_line_at) + 1 if again and last_line_at else None
            streamed.add((uid, restarts))
            try:
                self._resp = self.jobs.open_log(pod.metadata.name, since_seconds=since)
                for line in log_lines(self._resp):
                    self.lines += 1
                    last_line_at = time.time()
                    self.sink(line)
                    if self._abort.is_set():
                        return
            except ApiException as err:
                log.warning("cannot read the log of %s: %s %s", pod.metadata.name, err.status, api_message(err))
                self._abort.wait(self.poll_s)
            except Exception as err:  # noqa: BLE001 - a broken log stream (closed socket, protocol error) ends it
                if not self._abort.is_set():
                    log.warning("log stream of %s ended: %s", pod.metadata.name, err)
            finally:
                resp, self._resp = self._resp, None
                if resp is not None:
                    resp.release_conn()
            if not self._finish.is_set():
                self._abort.wait(self.poll_s)  # a restarting container: do not spin on an ended stream

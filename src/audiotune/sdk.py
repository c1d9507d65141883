"""The Python SDK: run the pipeline on this machine, compile it for the Kubeflow UI, submit it, wait for it.

The one library module that imports ``kfp`` (lazily, with ``audiotune.pipelines``)::

    from audiotune import sdk

    sdk.run_local("examples/demo.yaml")                       # kfp.local, subprocess runner
    sdk.compile("finetune.yaml")                              # upload in the Kubeflow UI
    run = sdk.submit("my.yaml", host="https://kfp.example.com", experiment="tts")
    state = sdk.wait(run.run_id, timeout=6 * 3600, host="https://kfp.example.com")

A config is a path to YAML, a mapping or an :class:`~audiotune.config.AudiotuneConfig`; an invalid
one raises :class:`~audiotune.config.ConfigError` naming the field before anything is submitted.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import re
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from audiotune.config import AudiotuneConfig, ConfigError, load_config, validate
from audiotune.errors import AudiotuneError
from audiotune.orchestration import params, remote
from audiotune.orchestration.local_run import LocalRun
from audiotune.orchestration.remote import SubmitError
from audiotune.orchestration.runs import Promotion
from audiotune.tracking import flatten

log = logging.getLogger(__name__)

__all__ = ["ConfigError", "LocalRun", "PipelineFailed", "SubmitError", "SubmittedRun", "arguments", "check",
           "compile", "failure_report", "promote", "run_local", "submit", "upload_pipeline", "wait"]

HOST_ENV = "KF_PIPELINES_ENDPOINT"  # the variable kfp.Client reads too
DEFAULT_LOCAL_ROOT = "kfp-local"
PIPELINE_NAME = "audiotune-finetune"
DESCRIPTION = "Fine-tune an audio-token LLM and/or its flow decoder (audiotune)."
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class PipelineFailed(AudiotuneError, RuntimeError):
    """A pipeline run ended in failure; the message names the failed task."""


def load(config: str | Path | dict[str, Any] | AudiotuneConfig) -> AudiotuneConfig:
    """A validated config from a YAML path, a mapping or a config object."""
    if isinstance(config, AudiotuneConfig):
        return config
    if isinstance(config, dict):
        return validate(config, "config mapping")
    return load_config(config)


def arguments(config: str | Path | dict[str, Any] | AudiotuneConfig) -> dict[str, Any]:
    """The pipeline arguments for a config: its typed parameters and the ``config`` mapping for the rest."""
    cfg = load(config)
    typed, mapping = params.split(cfg)
    again, _ = params.resolve(mapping, typed)
    if again != cfg:  # a value the parameters cannot carry (e.g. an explicit null); say which
        diff = sorted(k for k, v in flatten(cfg.model_dump(mode="json")).items()
                      if flatten(again.model_dump(mode="json")).get(k) != v)
        raise ConfigError(f"config fields cannot be passed to the pipeline as given: {', '.join(diff)}")
    return {**typed, "config": mapping}


def check(config: str | Path | dict[str, Any] | AudiotuneConfig, promote: bool = False) -> AudiotuneConfig:
    """Everything about a config that would otherwise fail only once the run is on the cluster (or after it).

    Args:
        config: The run's config.
        promote: The run's model is to be promoted afterwards (:func:`promote`).

    Returns:
        The validated config.

    Raises:
        ConfigError: Naming the field: an invalid config, one the pipeline parameters cannot carry, a
            ``zero_stage: auto`` that could not be sized, or (``promote``) no ``export.registered_model_name`` or
            tracking turned off.
    """
    from audiotune.train import sizing

    cfg = load(config)
    arguments(cfg)
    sizing.check(cfg)
    if promote and not cfg.export.registered_model_name:
        raise ConfigError("export.registered_model_name is unset: promoting needs the export registered in the "
                          "MLflow model registry under a name")
    if promote and not cfg.tracking.enabled:
        raise ConfigError("tracking.enabled is false: promoting compares registered versions in MLflow")
    return cfg


def pipeline(config: str | Path | dict[str, Any] | AudiotuneConfig | None = None) -> Any:
    """The pipeline function for a config (None: the schema defaults, as in ``compiled/finetune.yaml``)."""
    from audiotune.pipelines.finetune import build

    return build(load(config) if config is not None else None)


def compile(path: str | Path = "audiotune-finetune.yaml",  # noqa: A001 - the SDK verb
            config: str | Path | dict[str, Any] | AudiotuneConfig | None = None) -> str:
    """Compile the pipeline to YAML for upload in the Kubeflow UI.

    Args:
        path: Output file (``.yaml``).
        config: Config whose values become the parameters' defaults and whose cluster settings the
            pods get; None uses the schema defaults.

    Returns:
        The path written.
    """
    from kfp import compiler

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(pipeline(config), str(path))
    return str(path)


# ------------------------------------------------------------------------------------------- local


def run_local(config: str | Path | dict[str, Any] | AudiotuneConfig, root: str | Path | None = None) -> LocalRun:
    """Run the whole pipeline on this machine with ``kfp.local`` (subprocess runner, this environment).

    The same pipeline definition as on a cluster; components run as subprocesses of this Python,
    MLflow logs to ``tracking.uri`` (else ``$MLFLOW_TRACKING_URI``, else ``./mlruns``).

    Args:
        config: The run's config.
        root: Local pipeline root for the task outputs (default ``pipeline.root``, else ./kfp-local).

    Returns:
        Where the export, its samples and the MLflow runs are.

    Raises:
        ConfigError: The config is invalid (nothing ran).
        PipelineFailed: A task failed; its log was streamed above.
    """
    from kfp import local

    cfg = load(config)
    args = arguments(cfg)
    root = Path(root or cfg.pipeline.root or DEFAULT_LOCAL_ROOT).resolve()
    root.mkdir(parents=True, exist_ok=True)
    before = set(root.iterdir())
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root), raise_on_error=True,
               enable_caching=cfg.pipeline.enable_caching)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*non-Python base image.*")  # our image has Python
        warnings.filterwarnings("ignore", message=".*have no effect in the current local runner.*")  # GPUs, names
        try:
            pipeline(cfg)(**args)
        except RuntimeError as err:
            message = _ANSI.sub("", str(err))
            failed = re.search(r"Inner task failed: '([^']+)'", message)
            raise PipelineFailed(f"task {failed.group(1)!r} failed (its log is above)" if failed
                                 else message) from None
    new = sorted((p for p in root.iterdir() if p not in before and p.is_dir() and not p.name.startswith(".")),
                 key=lambda p: p.stat().st_mtime)
    return LocalRun.read(new[-1] if new else root, cfg.tracking)


# ------------------------------------------------------------------------------------------ remote


@dataclass
class SubmittedRun:
    """A run on a Kubeflow host."""

    run_id: str
    url: str
    state: str | None = None


@dataclass
class Connection:
    """How to reach a Kubeflow Pipelines host.

    Credentials: ``token`` (a bearer token) and/or ``cookies``; without a token, the projected ServiceAccount
    token at :func:`~audiotune.orchestration.remote.sa_token_path` when there is one (``kfp.Client`` itself skips
    it once a host is given).
    """

    host: str
    namespace: str | None = None
    token: str | None = None
    cookies: str | None = None
    _client: Any = None

    def bearer(self) -> str | None:
        """The bearer token sent: ``token``, else the ServiceAccount token (read each time: the kubelet rotates it)."""
        return remote.bearer(self.token)

    def client(self) -> Any:
        """A ``kfp.Client``, after a probe that turns an unreachable host or refused credentials into one line."""
        if self._client is None:
            remote.probe(self.host, self.bearer(), self.cookies)
            import kfp
            from kfp.client import ServiceAccountTokenVolumeCredentials

            path = None if self.token else remote.sa_token_path()
            credentials = ServiceAccountTokenVolumeCredentials(path) if path else None
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore", FutureWarning)
                try:
                    self._client = kfp.Client(host=self.host, namespace=self.namespace or "kubeflow",
                                              existing_token=self.token, cookies=self.cookies,
                                              credentials=credentials)
                except Exception as err:  # the client's own connection and API errors → one line
                    raise remote.api_error(self.host, err) from None
        return self._client

    def call(self, what: Callable[[Any], Any]) -> Any:
        """Call the client, turning its API and connection errors into one-line :class:`SubmitError`."""
        client = self.client()
        out = io.StringIO()
        try:
            with contextlib.redirect_stdout(out):
                return what(client)
        except SubmitError:
            raise
        except Exception as err:
            import kfp_server_api
            import urllib3

            if isinstance(err, (kfp_server_api.ApiException, urllib3.exceptions.HTTPError, OSError)):
                raise remote.api_error(self.host, err) from None
            raise
        finally:
            for line in out.getvalue().splitlines():
                log.debug("kfp: %s", line)

    def run_url(self, run_id: str) -> str:
        """The run's page in the Kubeflow UI."""
        return f"{self.host.rstrip('/')}/#/runs/details/{run_id}"


def _connection(host: str | Connection | None, namespace: str | None, token: str | None,
                cookies: str | None) -> Connection:
    """A connection to ``host``; None: ``$KF_PIPELINES_ENDPOINT``, as the CLI and ``kfp.Client`` read it."""
    if isinstance(host, Connection):
        return host
    host = host or os.environ.get(HOST_ENV)
    if not host:
        raise ConfigError(f"no Kubeflow Pipelines host: pass host= (the CLI's --host) or set ${HOST_ENV}")
    return Connection(host, namespace, token, cookies)


def upload_pipeline(package: str | Path, host: str | Connection, name: str = "audiotune-finetune", *,
           namespace: str | None = None, token: str | None = None, cookies: str | None = None) -> tuple[str, str]:
    """Upload a compiled pipeline as a version of pipeline ``name`` (created when missing).

    The version is named after the content (``<name>-<sha256[:12]>``), so submitting the same
    compiled pipeline again reuses it and the UI lists one version per distinct pipeline.

    Returns:
        ``(pipeline_id, pipeline_version_id)``.
    """
    conn = _connection(host, namespace, token, cookies)
    package = str(package)
    version = f"{name}-{hashlib.sha256(Path(package).read_bytes()).hexdigest()[:12]}"
    pipeline_id = conn.call(lambda c: c.get_pipeline_id(name))
    if pipeline_id is None:
        # creates the pipeline with a first version named after it; runs always use a content-named one
        pipeline_id = conn.call(lambda c: c.upload_pipeline(package, pipeline_name=name, description=DESCRIPTION,
                                                            namespace=namespace)).pipeline_id
    same = json.dumps({"predicates": [{"operation": "EQUALS", "key": "display_name", "stringValue": version}]})
    found = conn.call(lambda c: c.list_pipeline_versions(pipeline_id, filter=same)).pipeline_versions or []
    if found:
        return pipeline_id, found[0].pipeline_version_id
    made = conn.call(lambda c: c.upload_pipeline_version(package, version, pipeline_id=pipeline_id))
    return pipeline_id, made.pipeline_version_id


def submit(config: str | Path | dict[str, Any] | AudiotuneConfig, host: str | Connection | None = None,
           experiment: str | None = None, wait: bool = False, *, run_name: str | None = None,
           namespace: str | None = None, token: str | None = None, cookies: str | None = None,
           upload: bool = True, timeout: float = 24 * 3600,
           progress: Callable[[str], None] | None = None) -> SubmittedRun:
    """Compile the pipeline for ``config`` and start a run of it on a Kubeflow Pipelines host.

    Args:
        config: The run's config; validated (:func:`check`) before anything is sent.
        host: Kubeflow Pipelines URL (e.g. ``https://kubeflow.example.com/pipeline``); None:
            ``$KF_PIPELINES_ENDPOINT``.
        experiment: Kubeflow experiment (created when missing); default: ``tracking.experiment``.
        wait: Follow the run to its end (then ``state`` is set).
        run_name: Display name of the run; default ``<run.name> <timestamp>``.
        namespace: Kubernetes namespace (multi-user Kubeflow).
        token: Bearer token for the API; None: the projected ServiceAccount token, if this pod has one
            (``$KF_PIPELINES_SA_TOKEN_PATH``, else ``/var/run/secrets/kubeflow/pipelines/token``).
        cookies: Session cookies for the API (e.g. ``authservice_session=...``).
        upload: Upload the compiled pipeline as a pipeline version (listed in the UI, the run refers
            to it); False sends the spec inline with the run.
        timeout: With ``wait``: seconds before giving up.
        progress: With ``wait``: called with a line on each change of state.

    Returns:
        The run id and its page in the Kubeflow UI (and the final state with ``wait``).

    Raises:
        ConfigError: The config is invalid, or there is no host (nothing was submitted).
        SubmitError: The host is unreachable or refused the request.
    """
    cfg = check(config)
    args = arguments(cfg)
    conn = _connection(host, namespace, token, cookies)
    name = run_name or f"{cfg.run.name} {time.strftime('%Y-%m-%d %H-%M-%S')}"
    service_account = getattr(getattr(cfg, "cluster", None), "service_account", None)
    with tempfile.TemporaryDirectory(prefix="audiotune-submit-") as tmp:
        package = compile(Path(tmp) / "pipeline.yaml", cfg)
        experiment_id = conn.call(lambda c: c.create_experiment(experiment or cfg.tracking.experiment,
                                                                namespace=namespace)).experiment_id
        if upload:  # the run refers to an uploaded version, else carries the spec inline
            pipeline_id, version_id = upload_pipeline(package, conn, PIPELINE_NAME, namespace=namespace)
            spec = {"pipeline_id": pipeline_id, "version_id": version_id}
        else:
            spec = {"pipeline_package_path": package}
        result = conn.call(lambda c: c.run_pipeline(experiment_id, name, params=args, pipeline_root=cfg.pipeline.root,
                                                    service_account=service_account, **spec))
    run = SubmittedRun(run_id=result.run_id, url=conn.run_url(result.run_id))
    log.info("submitted run %s: %s", run.run_id, run.url)
    if wait:
        run.state = _follow(conn, run.run_id, timeout, 10.0, progress)
    return run


def get_run(run_id: str, host: str | Connection | None = None, namespace: str | None = None, token: str | None = None,
            cookies: str | None = None) -> Any:
    """The run object (``V2beta1Run``) of ``run_id``."""
    conn = _connection(host, namespace, token, cookies)
    return conn.call(lambda c: c.get_run(run_id))


def wait(run_id: str, timeout: float = 24 * 3600, host: str | Connection | None = None, *,
         namespace: str | None = None, token: str | None = None, cookies: str | None = None,
         poll_s: float = 10.0, progress: Callable[[str], None] | None = None) -> str:
    """Follow a run until it ends.

    Args:
        run_id: The run.
        timeout: Seconds before giving up.
        host: Kubeflow Pipelines URL (or a connection); None: ``$KF_PIPELINES_ENDPOINT``.
        namespace: Kubernetes namespace (multi-user Kubeflow).
        token: Bearer token for the API (None: the ServiceAccount token, as in :func:`submit`).
        cookies: Session cookies for the API.
        poll_s: Seconds between polls.
        progress: Called with a line whenever the run's or a task's state changes.

    Returns:
        The final state: SUCCEEDED, FAILED, CANCELED or SKIPPED.

    Raises:
        TimeoutError: The run did not end within ``timeout``.
        SubmitError: The host is unreachable or refused the request.
        ConfigError: No host given and ``$KF_PIPELINES_ENDPOINT`` unset.
    """
    return _follow(_connection(host, namespace, token, cookies), run_id, timeout, poll_s, progress)


def _follow(conn: Connection, run_id: str, timeout: float, poll_s: float,
            progress: Callable[[str], None] | None) -> str:
    return remote.follow(lambda: conn.call(lambda c: c.get_run(run_id)), run_id, timeout, poll_s, progress,
                         conn.run_url(run_id))


def failure_report(run_id: str, host: str | Connection | None = None, lines: int = 30, **auth: Any) -> list[str]:
    """Lines naming each failed task of a run, its error and the last lines of its log."""
    conn = _connection(host, auth.get("namespace"), auth.get("token"), auth.get("cookies"))
    run = conn.call(lambda c: c.get_run(run_id))
    return remote.failure_lines(run, run_id, lambda pod: remote.pod_logs(
        conn.host, pod, conn.namespace, conn.bearer(), conn.cookies, lines, run_id), conn.namespace)


def promote(config: str | Path | dict[str, Any] | AudiotuneConfig, run_id: str,
            metric: str | None = None) -> Promotion:
    """Move the registered model's champion alias to the version that Kubeflow run ``run_id`` registered, only
    if it passes the eval gate (``evaluate.gate``), or with ``metric`` if it beats the champion on it (lower is
    better); see :func:`audiotune.orchestration.runs.promote`."""
    from audiotune.orchestration import runs

    return runs.promote(load(config), run_id, metric)

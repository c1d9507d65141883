"""Real servers on 127.0.0.1 for integration tests: an S3 server (moto) and an MLflow tracking server.

Both are started once per test session on free ports, as subprocesses in their own process groups,
and stopped (the whole group) at the end.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import LLM_TOKENIZE, save_tiny_base

BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_http(url: str, proc: subprocess.Popen, log_path: Path, timeout: float) -> None:
    """Poll ``url`` until it answers; fail with the server's log if it dies or times out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer within {timeout:.0f}s:\n{log_path.read_text()[-4000:]}")


def _stop(proc: subprocess.Popen) -> None:
    """Terminate the server's whole process group, killing it if it lingers."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    except ProcessLookupError:
        pass


def _start(cmd: list[str], health: str, log_path: Path, timeout: float, env: dict | None = None) -> subprocess.Popen:
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env=env, cwd=log_path.parent)
    try:
        _wait_http(health, proc, log_path, timeout)
    except BaseException:
        _stop(proc)
        raise
    return proc


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Torch on one intra-op thread for the test (``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> Iterator[str]:
    """A moto S3 server on 127.0.0.1; yields its endpoint URL."""
    port = _free_port()
    workdir = tmp_path_factory.mktemp("moto")
    url = f"http://127.0.0.1:{port}"
    proc = _start([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                  f"{url}/moto-api/", workdir / "server.log", timeout=30)
    yield url
    _stop(proc)


@pytest.fixture
def s3_env(s3_server, monkeypatch) -> Iterator[str]:
    """AWS environment pointing at the S3 server, and a fresh bucket; yields ``s3://<bucket>``."""
    import boto3

    for name in ("AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE",
                 "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    yield f"s3://{bucket}"


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory) -> Iterator[str]:
    """An MLflow tracking server (SQLite store, proxied local artifacts) on 127.0.0.1; yields its URL."""
    port = _free_port()
    workdir = tmp_path_factory.mktemp("mlflow")
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    cmd = [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
           "--backend-store-uri", f"sqlite:///{workdir / 'mlflow.db'}",
           "--artifacts-destination", str(workdir / "artifacts"), "--workers", "1"]
    proc = _start(cmd, f"{url}/health", workdir / "server.log", timeout=90, env=env)
    yield url
    _stop(proc)


# ------------------------------------------------------------------------------------ shared training fixtures
@pytest.fixture(scope="session")
def llm_tokens(tmp_path_factory) -> Path:
    """16 generated utterances (4 speakers, some clone/edit rows) tokenized with a 32-code mel-kmeans."""
    from audiotune.config import load_config
    from audiotune.stages.convert import convert
    from audiotune.stages.tokenize import tokenize
    from examples.make_corpus import make_corpus

    root = tmp_path_factory.mktemp("llm-tokens")
    manifest = make_corpus(root / "corpus", n_speakers=4, utts_per_speaker=4, backend="synth", seed=3)
    cfg = load_config(None, LLM_TOKENIZE)
    convert(cfg, source=str(manifest), output=str(root / "ds"))
    tokenize(cfg, dataset=str(root / "ds"), output=str(root / "tok"))
    return root / "tok"


@pytest.fixture(scope="session")
def llm_base(tmp_path_factory, llm_tokens) -> Path:
    """A tiny random Qwen2 base (untied head) for the Tokens of ``llm_tokens``."""
    return save_tiny_base(llm_tokens, tmp_path_factory.mktemp("base") / "qwen2-tiny")


# ------------------------------------------------------------------------------------------------ test tiers
# Markers (registered in setup.cfg): ``unit`` — the library in this process, seconds each; ``integration`` — child
# interpreters (torchrun, the CLI, kfp.local), real MLflow / S3 servers, whole stages end to end; ``slow`` — opt-in
# heavy work (a C++ op build), marked on the test itself. Tiers are given here by module, by the server fixtures a
# test uses and by name (INTEGRATION_TESTS), so that test files stay as they are; a test marked ``unit`` or
# ``integration`` itself keeps its marker. ``make test-fast`` runs ``-m "unit and not slow"``; ``make test`` (CI)
# runs the unit and integration tiers; ``make test-slow`` the slow tier.
INTEGRATION_MODULES = {
    "test_acestep", "test_base_loading", "test_components", "test_convert", "test_convert_integration",
    "test_engine_distributed", "test_engine_launch", "test_evaluate", "test_evaluate_metrics", "test_export",
    "test_fanout", "test_flow_release", "test_images", "test_kimi", "test_moss", "test_pipeline_local",
    "test_pytorchjob", "test_reliability", "test_reliability_more", "test_reliability_training", "test_sdk",
    "test_step_audio_e2e", "test_storage", "test_tokenize", "test_tracking", "test_train_flow",
    "test_train_flow_distributed", "test_train_joint", "test_train_llm", "test_train_llm_distributed",
    "test_train_llm_integration", "test_trainjob",
}
# tests of otherwise-unit modules that run a whole stage or compile the whole pipeline (seconds to tens of seconds
# each on 2 cores): the integration tier, so that ``make test-fast`` stays under 90 s
INTEGRATION_TESTS = {
    "test_upstream_parity": {"test_release_fine_tune_with_the_encoder_frozen_exports_the_upstream_layout"},
    "test_pipeline_compile": {  # those that compile; the ones reading the checked-in YAML stay unit
        "test_checked_in_yaml_is_current", "test_a_config_bakes_its_values_into_the_defaults",
        "test_cluster_settings_reach_the_pods", "test_multinode_training_tasks_only_drive_a_pytorchjob",
        "test_default_config_compiles_like_the_module_pipeline"},
}
SERVER_FIXTURES = {"s3_server", "s3_env", "mlflow_server"}
# the default per-test timeout is 120 s (setup.cfg); modules whose tests run several child interpreters or whole
# pipelines get more (on the 2-core CI machine), unless a test sets its own @pytest.mark.timeout
MODULE_TIMEOUTS = {
    "test_pipeline_local": 900, "test_train_llm_distributed": 600, "test_train_flow_distributed": 600,
    "test_engine_distributed": 600, "test_reliability_training": 600, "test_reliability": 300,
    "test_reliability_more": 300, "test_export": 300, "test_evaluate": 300, "test_convert_integration": 300,
    "test_acestep": 300, "test_train_llm": 300, "test_train_flow": 300, "test_train_joint": 300,
    "test_engine_launch": 300, "test_components": 300, "test_fanout": 300, "test_step_audio_e2e": 300,
    "test_train_llm_integration": 300, "test_sdk": 300, "test_pytorchjob": 300, "test_trainjob": 300,
    "test_kimi": 300, "test_moss": 300, "test_flow_release": 300, "test_base_loading": 300,
}


def _integration_tests(item) -> set[str]:
    """The names INTEGRATION_TESTS gives for ``item``'s module; a stale name (a renamed test) is an error."""
    names = INTEGRATION_TESTS.get(item.module.__name__.rsplit(".", 1)[-1], set())
    stale = sorted(n for n in names if not hasattr(item.module, n))
    if stale:
        raise pytest.UsageError(f"tests/conftest.py INTEGRATION_TESTS names no test of {item.module.__name__}: "
                                f"{', '.join(stale)}")
    return names


def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1] if item.module else ""
        if not (item.get_closest_marker("unit") or item.get_closest_marker("integration")):
            heavy = (module in INTEGRATION_MODULES or SERVER_FIXTURES & set(item.fixturenames)
                     or (item.module is not None and item.originalname in _integration_tests(item)))
            item.add_marker(pytest.mark.integration if heavy else pytest.mark.unit)
        if module in MODULE_TIMEOUTS and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(MODULE_TIMEOUTS[module]))

"""Reliability of the training stages (issue 14): each test injects one fault or hostile input, then checks the
exit code, the one-line message, and that nothing was lost or written where it must not be."""

from __future__ import annotations

import gc
import json
import logging
import os
import re
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

TRAIN_FAST = ["run.num_workers=1", "llm.train.log_every=1", "llm.train.eval_every=1000", "llm.train.save_every=1000",
              "llm.train.batch_tokens=2048", "llm.train.warmup_ratio=0", "llm.train.schedule=constant",
              "llm.init=scratch", "llm.preset=tiny-llama", "llm.mode=full", "llm.layout=tts"]


def _train_llm_cli(tokens: Path, out: Path, *sets: str) -> list[str]:
    return [sys.executable, "-m", "audiotune.cli", "train", "llm", "--tokens", str(tokens), "--output", str(out),
            *[a for s in [*TRAIN_FAST, *sets] for a in ("--set", s)]]


def _cli(argv: list[str], capsys, caplog) -> tuple[int, str]:
    """Run the command line in this process; its exit code, and stderr with the log records."""
    from audiotune.cli import main as cli_main

    with caplog.at_level(logging.INFO):
        code = cli_main(argv)
    return code, capsys.readouterr().err + caplog.text


def _no_traceback(stderr: str) -> None:
    assert "Traceback" not in stderr, stderr[-4000:]


def _one_line_error(stderr: str) -> str:
    """The error line the CLI printed, after checking that no traceback reached stderr."""
    _no_traceback(stderr)
    lines = [line for line in stderr.splitlines() if line.startswith("audiotune")]
    assert len(lines) == 1, stderr[-4000:]
    return lines[0]


# ------------------------------------------------------------------------------ MLflow outage mid-training
class OutageProxy:
    """A TCP proxy in front of a real MLflow server that goes down after ``down_after`` log-batch requests: it
    cuts the open connections and closes every new one at once; with ``back_after`` it forwards again once it
    has turned that many connections away (the client's retry, then its probes)."""

    def __init__(self, target: str, down_after: int, back_after: int | None = None) -> None:
        host, port = target.removeprefix("http://").split(":")
        self.target = (host, int(port))
        self.down_after, self.back_after = down_after, back_after
        self.batches = self.refused = 0
        self.went_down: float | None = None
        self.came_back: float | None = None
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._server = socket.socket()
        self._server.bind(("127.0.0.1", 0))
        self._server.listen(16)
        self.url = f"http://127.0.0.1:{self._server.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def is_down(self) -> bool:
        return self.went_down is not None and self.came_back is None

    def _accept(self) -> None:
        while True:
            client, _ = self._server.accept()
            if self.is_down:
                self.refused += 1
                client.close()
                if self.back_after is not None and self.refused >= self.back_after:
                    self.came_back = time.monotonic()
                continue
            upstream = socket.create_connection(self.target)
            with self._lock:
                self._conns += [client, upstream]
            threading.Thread(target=self._pipe, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, False), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, counts: bool) -> None:
        try:
            while data := src.recv(65536):
                if counts and b"/runs/log-batch" in data and self.went_down is None:
                    self.batches += 1
                    if self.batches > self.down_after:
                        self.down()
                        return
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def down(self) -> None:
        with self._lock:
            self.went_down = time.monotonic()
            for sock in self._conns:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            self._conns.clear()


def _outage_run(tokens: Path, tmp_path: Path, proxy: OutageProxy, steps: int, capsys, caplog,
                experiment: str = "outage") -> tuple[int, str, Path]:
    spool = tmp_path / "unsent"
    cmd = _train_llm_cli(tokens, tmp_path / "llm", f"llm.train.max_steps={steps}", f"tracking.uri={proxy.url}",
                         f"tracking.experiment={experiment}", f"tracking.spool_dir={spool}",
                         "tracking.retry_every_s=0.2", "tracking.request_timeout_s=5")
    return (*_cli(cmd[3:], capsys, caplog), spool)


def _spooled_steps(spool: Path) -> set[int]:
    steps = set()
    for file in spool.glob("*.jsonl"):
        for line in file.read_text().splitlines():
            steps |= {m[3] for m in json.loads(line).get("metrics", []) if m[0] == "loss"}
    return steps


def test_mlflow_down_for_good_mid_training_finishes_and_keeps_the_metrics_in_a_file(llm_tokens, mlflow_server,
                                                                                    tmp_path, capsys, caplog):
    proxy = OutageProxy(mlflow_server, down_after=4)  # params (1-2 batches), then the first steps' metrics
    code, stderr, spool = _outage_run(llm_tokens, tmp_path, proxy, 12, capsys, caplog)
    assert code == 0, stderr[-4000:]
    _no_traceback(stderr)
    assert proxy.went_down is not None
    assert time.monotonic() - proxy.went_down < 120  # no stall of minutes in retries
    # nothing lost: the model is published, every step after the outage is in the spool file, the report names it
    manifest = json.loads((tmp_path / "llm" / "manifest.json").read_text())
    assert manifest["steps"] == 12
    history = json.loads((tmp_path / "llm" / "history.json").read_text())
    assert [h["step"] for h in history if "loss" in h] == list(range(1, 13))
    kept = _spooled_steps(spool)
    assert kept and max(kept) == 12 and kept == set(range(min(kept), 13)), kept
    report = [line for line in stderr.splitlines() if "did not answer by the end of the stage" in line]
    assert len(report) == 1 and str(spool) in report[0], stderr[-4000:]


def test_mlflow_back_after_an_outage_receives_every_step(llm_tokens, mlflow_server, tmp_path, capsys, caplog):
    from mlflow import MlflowClient

    proxy = OutageProxy(mlflow_server, down_after=4, back_after=2)
    experiment = f"outage-{uuid.uuid4().hex[:8]}"
    code, stderr, spool = _outage_run(llm_tokens, tmp_path, proxy, 12, capsys, caplog, experiment=experiment)
    assert code == 0, stderr[-4000:]
    _no_traceback(stderr)
    assert proxy.came_back is not None and "answers again" in stderr, stderr[-4000:]
    assert not list(spool.glob("*.jsonl"))  # all sent: nothing left behind
    client = MlflowClient(mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    (run,) = runs
    assert run.info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss")) == list(range(1, 13))



# ------------------------------------------------------------------------------ two runs, one output
def _wait_for_text(path: Path, proc: subprocess.Popen, text: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while text not in (path.read_text() if path.exists() else ""):
        assert proc.poll() is None, path.read_text()[-4000:]
        assert time.monotonic() < deadline, f"{text!r} never appeared"
        time.sleep(0.1)


def test_second_run_on_the_same_output_fails_at_once_and_a_dead_runs_lease_is_taken_over(llm_tokens, tmp_path,
                                                                                         capsys, caplog):
    import signal

    out = tmp_path / "llm"
    first_log = tmp_path / "first.log"
    with open(first_log, "w") as err:
        first = subprocess.Popen(_train_llm_cli(llm_tokens, out, "tracking.enabled=false", "llm.train.max_steps=500"),
                                 stdout=subprocess.DEVNULL, stderr=err)
    try:
        _wait_for_text(first_log, first, "step 1/500")
        lease = json.loads(Path(f"{out}.lock").read_text())
        assert lease["pid"] == first.pid and lease["stage"] == "llm"
        # a second process (this one) with the same output
        code, stderr = _cli(_train_llm_cli(llm_tokens, out, "tracking.enabled=false", "llm.train.max_steps=2")[3:],
                            capsys, caplog)
        assert first.poll() is None  # the first run is untouched
        assert code == 2, stderr[-4000:]
        line = _one_line_error(stderr)
        assert f"output {out} is in use by another run" in line and f"pid {first.pid}" in line, line
        assert "training" not in stderr and "step 1/" not in stderr  # it failed before any work
    finally:
        os.kill(first.pid, signal.SIGKILL)
        first.wait(timeout=60)
    # the lease of the killed run is stale: the next run takes it over, trains, publishes and gives it back
    code, stderr = _cli(_train_llm_cli(llm_tokens, out, "tracking.enabled=false", "llm.train.max_steps=2")[3:],
                        capsys, caplog)
    assert code == 0, stderr[-4000:]
    assert "taking over the lease" in stderr and f"pid {first.pid}" in stderr
    assert json.loads((out / "manifest.json").read_text())["steps"] == 2
    assert not Path(f"{out}.lock").exists()


class _MainProcess:
    is_main_process, num_processes = True, 1


def test_s3_output_lease_is_a_conditional_put_and_a_dead_processes_lease_is_taken_over(s3_env):
    import socket

    import boto3

    from audiotune import storage
    from audiotune.train import output_lock

    out = f"{s3_env}/runs/llm"
    bucket, key = storage.split_s3(output_lock.lease_uri(out))
    lease = output_lock.acquire(_MainProcess(), [out], "llm")
    with pytest.raises(output_lock.OutputInUse, match=rf"output {out} is in use by another run .*pid {os.getpid()}"):
        output_lock.acquire(_MainProcess(), [out], "llm")
    lease.release()
    assert "Contents" not in boto3.client("s3").list_objects_v2(Bucket=bucket)
    # a lease left by a process of this host that is gone
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    boto3.client("s3").put_object(Bucket=bucket, Key=key, Body=json.dumps(
        {"stage": "llm", "host": socket.gethostname(), "pid": dead.pid, "renewed": time.time()}).encode())
    with output_lock.acquire(_MainProcess(), [out], "flow"):
        held = json.loads(boto3.client("s3").get_object(Bucket=bucket, Key=key)["Body"].read())
        assert held["pid"] == os.getpid() and held["stage"] == "flow"
    # a live holder elsewhere, renewed recently, is respected
    boto3.client("s3").put_object(Bucket=bucket, Key=key, Body=json.dumps(
        {"stage": "llm", "host": "another-host", "pid": 1, "renewed": time.time()}).encode())
    with pytest.raises(output_lock.OutputInUse, match="another-host"):
        output_lock.acquire(_MainProcess(), [out], "llm")


# ------------------------------------------------------------------------------ DeepSpeed resume unpickles
def _planted_checkpoint(where: Path, marker: Path) -> Path:
    """A complete-looking DeepSpeed checkpoint whose model states are a pickle that writes ``marker`` when
    loaded."""
    import pickle

    class _Payload:
        def __reduce__(self):
            return (Path.write_text, (marker, "ran"))

    ckpt = where / "checkpoint-4"
    (ckpt / "deepspeed" / "state").mkdir(parents=True)
    (ckpt / "deepspeed" / "state" / "mp_rank_00_model_states.pt").write_bytes(pickle.dumps(_Payload()))
    (ckpt / "manifest.json").write_text(json.dumps({"kind": "audiotune.checkpoint", "schema_version": 1,
                                                   "trainer_state": {"step": 4}}))
    return ckpt


@pytest.mark.parametrize("stage", ["llm", "flow", "joint"])
def test_deepspeed_resume_from_elsewhere_is_refused_before_anything_is_read(tmp_path, stage):
    from types import SimpleNamespace

    from audiotune.config import TrainSettings
    from audiotune.errors import EXIT_USAGE
    from audiotune.train.checkpoints import UntrustedCheckpoint, checkpoints_uri
    from audiotune.train.engine import Engine, EngineState

    marker = tmp_path / "pwned"
    planted = _planted_checkpoint(tmp_path / "shared-bucket", marker)
    own = checkpoints_uri(str(tmp_path / "out" / stage))
    engine = SimpleNamespace(  # the engine's own fields that maybe_resume reads; DeepSpeed on
        acc=SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=object())), ckpt_root=own,
        settings=TrainSettings(resume=str(planted)), state=EngineState(identity={"config": {f"{stage}.mode": "full"}}))
    with pytest.raises(UntrustedCheckpoint) as err:
        Engine.maybe_resume(engine)
    message = str(err.value)
    assert "\n" not in message and err.value.exit_code == EXIT_USAGE
    assert str(planted) in message and own in message and f"{stage}.train.trust_checkpoint=true" in message
    assert not marker.exists()


def test_deepspeed_resume_is_allowed_from_the_runs_own_checkpoints_or_with_trust(tmp_path):
    from audiotune.train.checkpoints import UntrustedCheckpoint, require_trusted

    own = str(tmp_path / "out" / "llm.checkpoints")
    require_trusted(f"{own}/checkpoint-4", own, trust=False)
    require_trusted(str(tmp_path / "elsewhere" / "checkpoint-4"), own, trust=True)
    # a path that climbs out, or a link inside the own folder that points elsewhere, is elsewhere
    (tmp_path / "elsewhere").mkdir()
    Path(own).mkdir(parents=True)
    (Path(own) / "checkpoint-9").symlink_to(tmp_path / "elsewhere")
    for outside in (f"{own}/../../elsewhere/checkpoint-4", f"{own}/checkpoint-9", f"{own}-evil/checkpoint-4"):
        with pytest.raises(UntrustedCheckpoint, match="trust_checkpoint"):
            require_trusted(outside, own, trust=False, section="llm")
    require_trusted("s3://b/runs/llm.checkpoints/checkpoint-4", "s3://b/runs/llm.checkpoints", trust=False)
    with pytest.raises(UntrustedCheckpoint):
        require_trusted("s3://b/runs/llm.checkpoints-x/checkpoint-4", "s3://b/runs/llm.checkpoints", trust=False)


# ------------------------------------------------------------------------------ rows dropped by a training stage
def test_llm_dropping_more_than_max_drop_fraction_fails_with_one_line(llm_tokens, tmp_path, capsys, caplog):
    out = tmp_path / "llm"
    code, stderr = _cli(_train_llm_cli(llm_tokens, out, "tracking.enabled=false", "llm.max_seq_len=80",
                                       "llm.train.max_steps=2")[3:], capsys, caplog)
    assert code == 1, stderr[-4000:]
    line = _one_line_error(stderr)
    found = re.search(r"(\d+) of (\d+) rows dropped \(longer than llm\.max_seq_len=80\), [\d.]+% > "
                      r"llm\.train\.max_drop_fraction=0\.01", line)
    assert found and 0 < int(found.group(1)) <= int(found.group(2)), line
    assert f"{llm_tokens} train" in line
    assert not out.exists() and not Path(f"{out}.checkpoints").exists()  # nothing trained, nothing published
    gc.collect()  # in this process the lease goes with the failed stage's frame (a CLI process: at its exit)
    assert not Path(f"{out}.lock").exists()  # the lease was given back


def test_flow_dropping_more_than_max_drop_fraction_fails_and_names_the_setting(llm_tokens, tmp_path):
    from audiotune.config import load_config
    from audiotune.stages.train_flow import train_flow
    from audiotune.train.engine import TooManyDropped

    cfg = load_config(None, ["tracking.enabled=false", "run.num_workers=1", "flow.preset=tiny", "flow.num_samples=0",
                             "flow.max_frames_in_batch=16", "flow.train.max_steps=1"])
    with pytest.raises(TooManyDropped, match=r"rows dropped \(longer than flow\.max_frames_in_batch=16 mel frames\)"
                                             r".*flow\.train\.max_drop_fraction=0\.01"):
        train_flow(cfg, tokens=str(llm_tokens), output=str(tmp_path / "flow"))
    assert not (tmp_path / "flow").exists()


def test_text_windows_fit_the_text_layout_at_max_seq_len_equal_to_context_length(tmp_path):
    import gzip

    from audiotune.config import load_config
    from audiotune.stages.convert import convert
    from audiotune.stages.tokenize import tokenize
    from audiotune.stages.train_llm import train_llm

    src = tmp_path / "docs.jsonl.gz"
    with gzip.open(src, "wt", encoding="utf-8") as f:
        for k in range(6):
            f.write(json.dumps({"text": f"document {k} says " + "lorem ipsum dolor sit amet " * (3 + 4 * k)}) + "\n")
    cfg = load_config(None, ["tracking.enabled=false", "run.num_workers=1", "convert.val_fraction=0",
                             "tokenize.text_tokenizer=char", "tokenize.context_length=32", "tokenize.stride=8",
                             "llm.init=scratch", "llm.preset=tiny-llama", "llm.mode=full", "llm.layout=text",
                             "llm.max_seq_len=32", "llm.train.max_steps=1", "llm.train.batch_tokens=2048"])
    convert(cfg, source=str(src), output=str(tmp_path / "ds"))
    tokenize(cfg, dataset=str(tmp_path / "ds"), output=str(tmp_path / "tok"))
    metrics = train_llm(cfg, tokens=str(tmp_path / "tok"), output=str(tmp_path / "llm")).metrics
    assert metrics["train_sequences"] > 6  # long documents were cut into several windows
    assert metrics["dropped_overlong"] == 0 and metrics["truncated"] == 0, metrics


# ------------------------------------------------------------------------------ a base tokenizer too large
def _tokenize_cli(dataset: Path, base: Path, out: Path, *sets: str) -> list[str]:
    return [sys.executable, "-m", "audiotune.cli", "tokenize", "--dataset", str(dataset), "--base-model", str(base),
            "--output", str(out), *[a for s in ["tracking.enabled=false", "run.num_workers=1", *sets]
                                    for a in ("--set", s)]]


@pytest.mark.parametrize("limit, named", [
    ("tokenize.max_base_tokenizer_mb=0.01",
     r"tokenizer\.json is [\d.]+ MiB, more than tokenize\.max_base_tokenizer_mb=0\.01"),
    ("tokenize.max_base_vocab=100",
     r"its tokenizer has \d+ vocabulary entries, more than tokenize\.max_base_vocab=100"),
])
def test_a_base_tokenizer_over_the_limits_is_refused_before_it_is_built(llm_tokens, tmp_path, capsys, caplog, limit,
                                                                        named):
    from audiotune.tokenization.text import train_bpe

    base = tmp_path / "base"
    train_bpe([f"a base vocabulary with many words number {k} and more {k * 7}" for k in range(200)],
              400).save_pretrained(str(base))
    assert (base / "tokenizer.json").stat().st_size > 0.01 * 2**20
    out = tmp_path / "tok"
    code, stderr = _cli(_tokenize_cli(llm_tokens.parent / "ds", base, out, limit)[3:], capsys, caplog)
    assert code == 1, stderr[-4000:]
    line = _one_line_error(stderr)
    assert re.search(named, line) and f"base model {base}" in line, line
    assert not out.exists()


# ------------------------------------------------------------------------------ artifacts against their manifest
def _copy_artifact(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _edit_manifest(artifact: Path, edit) -> None:
    manifest = json.loads((artifact / "manifest.json").read_text())
    edit(manifest)
    (artifact / "manifest.json").write_text(json.dumps(manifest))


def _first_shard(artifact: Path, split: str) -> Path:
    return sorted((artifact / split).glob("part-*.parquet"))[0]


def _shard_faults():
    import shutil

    def deleted(a: Path):
        _first_shard(a, "val").unlink()
        return r"shard val/part-00000\.parquet listed in its manifest is missing"

    def extra_copy(a: Path):
        shutil.copy(_first_shard(a, "train"), a / "train" / "part-00099.parquet")
        return r"shard train/part-00099\.parquet is not listed in its manifest"

    def split_rows_edited(a: Path):
        _edit_manifest(a, lambda m: m["splits"]["train"].update(rows=m["splits"]["train"]["rows"] + 5))
        return r"manifest splits\.train\.rows is \d+, but its train shards hold \d+ rows"

    def shard_rows_edited(a: Path):
        _edit_manifest(a, lambda m: m["shard_files"][0].update(rows=m["shard_files"][0]["rows"] + 1))
        return r"shard train/part-00000\.parquet holds \d+ rows, its manifest says \d+"

    def content_changed(a: Path):
        shard = _first_shard(a, "train")
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0xFF  # same size, same footer
        shard.write_bytes(bytes(data))
        return r"shard train/part-00000\.parquet does not match the sha256 in its manifest"

    return [deleted, extra_copy, split_rows_edited, shard_rows_edited, content_changed]


@pytest.mark.parametrize("fault", _shard_faults(), ids=lambda f: f.__name__)
def test_a_dataset_that_differs_from_its_manifest_is_refused_naming_the_shard(llm_tokens, tmp_path, capsys, fault):
    from audiotune.cli import main as cli_main

    dataset = _copy_artifact(llm_tokens.parent / "ds", tmp_path / "ds")
    assert json.loads((dataset / "manifest.json").read_text())["shard_files"]
    named = fault(dataset)
    out = tmp_path / "tok"
    code = cli_main(["tokenize", "--dataset", str(dataset), "--output", str(out), "--set", "tracking.enabled=false",
                     "--set", "run.num_workers=1"])
    assert code == 1
    line = _one_line_error(capsys.readouterr().err)
    assert re.search(named, line) and str(dataset) in line, line
    assert not out.exists()


@pytest.mark.parametrize("fault", _shard_faults()[:2], ids=lambda f: f.__name__)
def test_tokens_that_differ_from_their_manifest_are_refused_by_the_training_stages(llm_tokens, tmp_path, capsys,
                                                                                 fault):
    from audiotune.cli import main as cli_main

    tokens = _copy_artifact(llm_tokens, tmp_path / "tok")
    named = fault(tokens)
    for stage in ("llm", "flow"):
        out = tmp_path / stage
        sets = ["tracking.enabled=false", "llm.init=scratch", "llm.preset=tiny-llama", "llm.mode=full",
                "flow.preset=tiny", "llm.train.max_steps=1", "flow.train.max_steps=1"]
        code = cli_main(["train", stage, "--tokens", str(tokens), "--output", str(out),
                         *[a for s in sets for a in ("--set", s)]])
        assert code == 1, stage
        line = _one_line_error(capsys.readouterr().err)
        assert re.search(named, line) and str(tokens) in line, line
        assert not out.exists()


def test_the_llm_stage_bounds_its_base_tokenizer_too(llm_tokens, llm_base, tmp_path, capsys, caplog):
    out = tmp_path / "llm"
    argv = ["train", "llm", "--tokens", str(llm_tokens), "--base-model", str(llm_base), "--output", str(out),
            *[a for s in ("tracking.enabled=false", "tokenize.max_base_vocab=50", "llm.train.max_steps=1")
              for a in ("--set", s)]]
    code, stderr = _cli(argv, capsys, caplog)
    assert code == 1, stderr[-4000:]
    line = _one_line_error(stderr)
    assert re.search(r"vocabulary entries, more than tokenize\.max_base_vocab=50", line) and str(llm_base) in line
    assert not out.exists()

"""Reliability and security faults (issue 14): each test injects one fault or hostile input, then checks the
exit code, the one-line message, and that nothing was lost or written where it must not be."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from audiotune import storage
from audiotune.cli import main as cli_main
from audiotune.errors import UnsafePathError

NO_TRACKING = ["--set", "tracking.enabled=false"]


def _one_line_error(stderr: str) -> str:
    """The error line the CLI printed, after checking that no traceback reached stderr."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("audiotune")]
    assert len(lines) == 1, stderr
    return lines[0]


def _files_under(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


# ------------------------------------------------------------------------------ 1. path traversal through S3 keys
def _put(bucket_uri: str, key: str, body: bytes = b"x") -> None:
    import boto3

    bucket, _ = storage.split_s3(bucket_uri)
    boto3.client("s3").put_object(Bucket=bucket, Key=key, Body=body)
    keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=bucket)["Contents"]]
    assert key in keys, f"the S3 server stored {keys}, not the crafted key {key!r}"


def _crafted_keys(prefix: str, name: str) -> list[str]:
    """Keys below ``prefix`` whose relative path climbs out of any destination: '..' up to / then /tmp, or absolute."""
    return [f"{prefix}/{'../' * 40}tmp/{name}", f"{prefix}//tmp/{name}", f"{prefix}/sub/../../{name}"]


@pytest.mark.parametrize("which", [0, 1, 2], ids=["dotdot-to-root", "absolute", "dotdot-one-up"])
def test_s3_key_outside_the_cache_is_refused(s3_env, tmp_path, which):
    name = f"audiotune-escape-{uuid.uuid4().hex}"
    key = _crafted_keys("ds", name)[which]
    _put(s3_env, "ds/manifest.json", b"{}")
    _put(s3_env, "ds/train/part-00000.parquet", b"p")
    _put(s3_env, key)
    cache = tmp_path / "deep" / "er" / "cache"
    with pytest.raises(UnsafePathError) as err:
        storage.local_copy(f"{s3_env}/ds", cache_dir=cache)
    message = str(err.value)
    assert "\n" not in message and repr(key[len("ds/"):]) in message and f"{s3_env}/ds" in message
    # nothing outside the cache, nothing left in it but the lock
    assert not Path("/tmp", name).exists() and not (tmp_path / name).exists()
    assert _files_under(tmp_path) <= {f"deep/er/cache/{p}" for p in _files_under(cache)}
    assert all(p.endswith(".lock") for p in _files_under(cache))
    with pytest.raises(UnsafePathError):
        storage.download(f"{s3_env}/ds", tmp_path / "plain")
    assert not (tmp_path / "plain").exists() and not Path("/tmp", name).exists()


def test_s3_key_outside_the_destination_fails_the_stage_with_one_line(s3_env, tmp_path, capsys):
    name = f"audiotune-escape-{uuid.uuid4().hex}"
    _put(s3_env, "corpus/data.jsonl", b'{"id": "a", "audio": "a.wav", "text": "t"}\n')
    _put(s3_env, _crafted_keys("corpus", name)[0])
    out = tmp_path / "ds"
    code = cli_main(["convert", "--source", f"{s3_env}/corpus/data.jsonl", "--output", str(out), *NO_TRACKING])
    line = _one_line_error(capsys.readouterr().err)
    assert code == 1
    assert "refusing the object" in line and f"tmp/{name}" in line
    assert not Path("/tmp", name).exists() and not out.exists()
    assert not list(tmp_path.glob(".ds.tmp-*"))  # no staging folder left behind


def test_publish_over_a_prefix_with_odd_keys_removes_them(s3_env, tmp_path):
    from audiotune import publish

    _put(s3_env, "art/manifest.json", b'{"kind": "audiotune.test"}')
    _put(s3_env, "art/../../planted")
    with publish.publish_dir(f"{s3_env}/art", overwrite=True) as staging:
        (staging / "manifest.json").write_text('{"kind": "audiotune.test"}')
    assert storage.list_files(f"{s3_env}/art") == ["manifest.json"]


# ------------------------------------------------------------------- 2. outputs that overlap inputs, overwrite
def _snapshot(root: Path) -> dict[str, bytes | None]:
    """Every file's content and every folder (None) below ``root``."""
    return {p.relative_to(root).as_posix(): p.read_bytes() if p.is_file() else None for p in root.rglob("*")}


def _convert(source, output, *sets: str) -> list[str]:
    return ["convert", "--source", str(source), "--output", str(output), *NO_TRACKING, "--set",
            "run.num_workers=1", *[a for s in sets for a in ("--set", s)]]


@pytest.mark.parametrize("where", ["source-folder", "manifest-folder", "inside-source", "parent-of-source",
                                   "audio-folder"])
def test_convert_output_overlapping_its_source_is_refused_before_any_work(tmp_path, capsys, where):
    from tests.helpers import good_corpus

    manifest = good_corpus(tmp_path / "corpus", 2)
    before = _snapshot(tmp_path)
    source, output = {
        "source-folder": (tmp_path / "corpus", tmp_path / "corpus"),
        "manifest-folder": (manifest, tmp_path / "corpus"),
        "inside-source": (tmp_path / "corpus", tmp_path / "corpus" / "wavs" / "ds"),
        "parent-of-source": (tmp_path / "corpus", tmp_path),
        "audio-folder": (manifest, tmp_path / "corpus" / "wavs"),  # beside the manifest: not an artifact
    }[where]
    code = cli_main(_convert(source, output, "convert.overwrite=true"))
    line = _one_line_error(capsys.readouterr().err)
    assert code == 2
    assert (f"output {output} holds files but no manifest.json" if where == "audio-folder" else
            f"output {output} is, contains or lies inside the input") in line
    assert _snapshot(tmp_path) == before  # the corpus is intact, and nothing was staged or written beside it


def test_convert_output_overlapping_an_s3_source_is_refused(s3_env, capsys):
    _put(s3_env, "corpus/data.jsonl", b'{"id": "a", "audio": "a.wav", "text": "t"}\n')
    _put(s3_env, "corpus/a.wav", b"RIFF")
    code = cli_main(_convert(f"{s3_env}/corpus/data.jsonl", f"{s3_env}/corpus/", "convert.overwrite=true"))
    assert code == 2 and "lies inside the input" in _one_line_error(capsys.readouterr().err)
    assert storage.list_files(f"{s3_env}/corpus") == ["a.wav", "data.jsonl"]


def test_tokenize_output_equal_to_its_dataset_is_refused(tmp_path, capsys):
    dataset = tmp_path / "ds"
    (dataset / "train").mkdir(parents=True)
    (dataset / "manifest.json").write_text('{"kind": "audiotune.dataset", "schema_version": 1}')
    (dataset / "train" / "part-00000.parquet").write_bytes(b"rows")
    before = _snapshot(tmp_path)
    for output in (dataset, dataset / "tokens"):
        code = cli_main(["tokenize", "--dataset", str(dataset), "--output", str(output), *NO_TRACKING,
                         "--set", "tokenize.overwrite=true"])
        assert code == 2 and "lies inside the input" in _one_line_error(capsys.readouterr().err)
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize("content", ["user-files", "other-kind", "a-file"])
def test_overwrite_never_replaces_what_is_not_an_artifact_of_the_kind(tmp_path, capsys, content):
    from tests.helpers import good_corpus

    manifest = good_corpus(tmp_path / "corpus", 2)
    output = tmp_path / "out"
    if content == "a-file":
        output.write_text("my notes")
    else:
        output.mkdir()
        (output / "notes.txt").write_text("precious")
        if content == "other-kind":
            (output / "manifest.json").write_text('{"kind": "audiotune.tokens", "schema_version": 1}')
    before = _snapshot(tmp_path)
    code = cli_main(_convert(manifest, output, "convert.overwrite=true"))
    line = _one_line_error(capsys.readouterr().err)
    assert code == 2 and f"output {output} holds" in line and "overwrite only replaces" in line
    assert _snapshot(tmp_path) == before


def test_overwrite_replaces_an_empty_folder_and_an_artifact_of_the_kind(tmp_path):
    from tests.helpers import good_corpus

    manifest = good_corpus(tmp_path / "corpus", 2)
    output = tmp_path / "out"
    output.mkdir()
    assert cli_main(_convert(manifest, output)) == 1  # exists, no overwrite: refused as before
    assert cli_main(_convert(manifest, output, "convert.overwrite=true")) == 0
    assert cli_main(_convert(manifest, output, "convert.overwrite=true")) == 0
    assert (output / "manifest.json").is_file()


def test_s3_prefix_without_manifest_is_never_published_into(s3_env, tmp_path, capsys):
    from tests.helpers import good_corpus

    manifest = good_corpus(tmp_path / "corpus", 2)
    _put(s3_env, "mine/keep.bin", b"precious")
    for sets in ((), ("convert.overwrite=true",)):
        code = cli_main(_convert(manifest, f"{s3_env}/mine", *sets))
        assert code == 2 and "objects but no manifest.json" in _one_line_error(capsys.readouterr().err)
    assert storage.read_bytes(f"{s3_env}/mine/keep.bin") == b"precious"


# ------------------------------------------------------------------ 3. one exception root, one line per error
def _walk_cases(w: Path) -> list[tuple[list[str], int, str]]:
    """(argv, exit code, a piece of the message): every command with a bad input."""
    gone = str(w / "nowhere")
    return [
        (["convert", "--source", gone, "--output", str(w / "o"), *NO_TRACKING], 1, "does not exist"),
        (["convert", "--source", gone, "--output", str(w / "o"), "--config", str(w / "bad.yaml")], 2, "not UTF-8"),
        (["convert", "--source", str(w / "corpus"), "--output", str(w / "afile" / "ds"), *NO_TRACKING], 1,
         "afile"),
        (["tokenize", "--dataset", str(w / "listds"), "--output", str(w / "o"), *NO_TRACKING], 1, "manifest"),
        (["tokenize", "--dataset", gone, "--output", str(w / "o"), *NO_TRACKING], 1, "not a complete artifact"),
        (["train", "llm", "--tokens", gone, "--output", str(w / "o"), *NO_TRACKING, "--set", "llm.init=scratch"], 1,
         "nowhere"),
        (["train", "flow", "--tokens", gone, "--output", str(w / "o"), *NO_TRACKING], 1, "not a complete artifact"),
        (["train", "joint", "--tokens", gone, "--llm", gone, "--flow", gone, "--output", str(w / "o"),
          *NO_TRACKING], 1, "joint"),
        (["export", "--llm", gone, "--output", str(w / "o"), *NO_TRACKING], 1, "not a complete artifact"),
        (["synthesize", "--model", str(w / "listds"), "--text", "hi", "--out", str(w / "x.wav")], 1, "manifest"),
        (["promote", "--model-name", "m", "--set", "tracking.uri=http://127.0.0.1:1"], 1, "unreachable"),
        (["run", "--local", str(w / "bad.yaml")], 2, "not UTF-8"),
        (["compile", "--config", str(w / "bad.yaml"), "--output", str(w / "p.yaml")], 2, "not UTF-8"),
        (["submit", "--config", str(w / "bad.yaml")], 64, "not UTF-8"),
        (["config", "--config", str(w / "bad.yaml")], 2, "not UTF-8"),
    ]


def test_every_command_with_a_bad_input_prints_one_line_and_no_traceback(tmp_path, capsys, monkeypatch):
    from tests.helpers import good_corpus

    monkeypatch.chdir(tmp_path)  # whatever a command writes by default stays here
    (tmp_path / "bad.yaml").write_bytes(b"convert:\n  source: \xff\xfe bad\n")
    (tmp_path / "listds").mkdir()
    (tmp_path / "listds" / "manifest.json").write_text("[1, 2]")  # JSON, but not an object
    (tmp_path / "afile").write_text("a file where a folder is expected")
    good_corpus(tmp_path / "corpus", 1)
    for argv, code, piece in _walk_cases(tmp_path):
        got = cli_main(argv)
        err = capsys.readouterr().err
        assert "Traceback" not in err, (argv, err)
        line = [x for x in err.splitlines() if x.startswith("audiotune")][-1]
        assert (got, piece in line) == (code, True), (argv, err[-2000:])
    assert not (tmp_path / "o").exists() and not (tmp_path / "afile" / "ds").exists()


def test_verbose_keeps_the_traceback(tmp_path, capsys, caplog):
    (tmp_path / "listds").mkdir()
    (tmp_path / "listds" / "manifest.json").write_text("[1, 2]")
    assert cli_main(["-v", "tokenize", "--dataset", str(tmp_path / "listds"), "--output", str(tmp_path / "o"),
                     *NO_TRACKING]) == 1
    assert "not a JSON object" in _one_line_error(capsys.readouterr().err)
    assert "Traceback" in caplog.text


def test_project_errors_share_one_root():
    from audiotune.artifacts import ArtifactError
    from audiotune.cluster.pytorchjob import PyTorchJobError
    from audiotune.config import ConfigError
    from audiotune.data.audio import AudioError
    from audiotune.errors import EXIT_USAGE, AudiotuneError
    from audiotune.stages.convert import ConvertError
    from audiotune.train.checkpoints import CheckpointMismatch

    for cls in (ArtifactError, AudioError, ConvertError, CheckpointMismatch, PyTorchJobError, ConfigError):
        assert issubclass(cls, AudiotuneError), cls
    assert ConfigError.exit_code == EXIT_USAGE and issubclass(ConfigError, ValueError)


# ------------------------------------------------------------------------- stale staging of an interrupted run
def test_stale_staging_of_an_interrupted_publish_is_removed_by_the_next_run(tmp_path):
    from filelock import FileLock

    from tests.helpers import good_corpus

    manifest = good_corpus(tmp_path / "corpus", 2)
    stale = tmp_path / ".ds.tmp-0123abcd"  # what a killed convert left: its process and lock are gone
    (stale / "train").mkdir(parents=True)
    (stale / "train" / "part-00000.parquet").write_bytes(b"half")
    live = tmp_path / ".ds.tmp-4567ef00"  # a publish still running (its lock held)
    live.mkdir()
    with FileLock(f"{live}.lock"):
        assert cli_main(_convert(manifest, tmp_path / "ds")) == 0
        assert not stale.exists() and not Path(f"{stale}.lock").exists()
        assert live.is_dir()
    assert (tmp_path / "ds" / "manifest.json").is_file()
    assert {p.name for p in tmp_path.iterdir() if p.name.startswith(".ds") and p.is_dir()} == {live.name}


# ------------------------------------------------------------------------------ file names that are not UTF-8
def test_a_file_name_that_is_not_utf8_is_quarantined_not_fatal(tmp_path, capsys):
    import json
    import os

    from tests.helpers import write_audio

    ace = tmp_path / "ace"
    ace.mkdir()
    for name in (b"good", b"caf\xe9", b"ok"):  # caf\xe9: Latin-1, not UTF-8
        write_audio(tmp_path / "t.wav", seconds=1.0, seed=len(name))
        os.rename(bytes(tmp_path / "t.wav"), bytes(ace) + b"/" + name + b".wav")
        Path(os.fsdecode(bytes(ace) + b"/" + name + b"_prompt.txt")).write_text("pop, rock")
    out = tmp_path / "ds"
    assert cli_main(_convert(ace, out, "convert.val_fraction=0", "convert.max_bad_fraction=0.5")) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["rows"] == \
        {"input": 3, "train": 2, "val": 0, "quarantined": 1}
    (bad,) = [json.loads(line) for line in (out / "quarantine.jsonl").read_text(encoding="utf-8").splitlines()]
    assert bad["reason"] == "invalid_utf8" and bad["field"] == "audio_path" and "caf\\xe9.wav" in bad["detail"]


# ------------------------------------------------------------------------- durations from the header, not decoded
def test_a_too_long_file_is_refused_from_its_header_without_decoding(tmp_path, capsys, monkeypatch):
    import json

    import soundfile as sf

    from tests.helpers import write_audio, write_jsonl

    write_audio(tmp_path / "c" / "long.wav", seconds=120.0, sr=8000)
    write_audio(tmp_path / "c" / "ok.wav", seconds=1.0, sr=8000)
    manifest = write_jsonl(tmp_path / "c" / "m.jsonl", [{"id": "long", "audio": "long.wav", "text": "t"},
                                                        {"id": "ok", "audio": "ok.wav", "text": "t"}])
    decoded: list[str] = []
    real_read = sf.SoundFile.read
    monkeypatch.setattr(sf.SoundFile, "read", lambda self, *a, **k: (decoded.append(self.name), real_read(
        self, *a, **k))[1])
    code = cli_main(_convert(manifest, tmp_path / "ds", "convert.max_duration_s=5", "convert.val_fraction=0",
                             "convert.max_bad_fraction=0.5", "run.num_workers=1"))  # one process: reads are seen
    assert code == 0 and json.loads(capsys.readouterr().out.splitlines()[-1])["rows"]["quarantined"] == 1
    (bad,) = [json.loads(line) for line in (tmp_path / "ds" / "quarantine.jsonl").read_text().splitlines()]
    assert bad["reason"] == "too_long" and "120.00 s (from the header)" in bad["detail"]
    assert [Path(n).name for n in decoded] == ["ok.wav"]  # the long file was never decoded


# ---------------------------------------------------------------------------------------- credentials in URIs
SECRET = "hunter2-s3cr3t"


@pytest.mark.parametrize("how", ["argument", "config", "override", "environment"])
def test_credentials_inside_a_uri_are_refused_and_never_shown(tmp_path, capsys, monkeypatch, how):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cred.yaml").write_text(f"tracking:\n  uri: http://bob:{SECRET}@mlflow:5000\n")
    argv = {
        "argument": ["convert", "--source", f"s3://AKIA:{SECRET}@bucket/corpus", "--output", "ds", *NO_TRACKING],
        "config": ["compile", "--config", "cred.yaml", "--output", "pipeline.yaml"],
        "override": ["convert", "--source", "c", "--output", "ds", "--set", f"tracking.uri=http://bob:{SECRET}@m"],
        "environment": ["convert", "--source", "c", "--output", "ds"],
    }[how]
    if how == "environment":
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"https://bob:{SECRET}@mlflow.example")
    code = cli_main(argv)
    captured = capsys.readouterr()
    assert code == 2 and "Traceback" not in captured.err
    assert SECRET not in captured.err + captured.out and "://***@" in captured.err
    assert "MLFLOW_TRACKING_PASSWORD" in captured.err  # the advice: where credentials go instead
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cred.yaml"]  # nothing compiled, converted or logged


def test_storage_refuses_an_s3_uri_with_credentials_and_logs_are_redacted(caplog):
    import logging

    from audiotune import credentials

    with pytest.raises(credentials.CredentialsInURIError) as err:
        storage.split_s3(f"s3://AKIA:{SECRET}@bucket/key")
    assert SECRET not in str(err.value) and "s3://***@bucket/key" in str(err.value)
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "server %s down", (f"http://u:{SECRET}@h:1",), None)
    assert credentials.RedactingFilter().filter(record) and record.getMessage() == "server http://***@h:1 down"
    assert credentials.redact(f"a http://u:p@ss{SECRET}@host/x b") == "a http://***@host/x b"
    assert not credentials.has_userinfo("s3://bucket/some@key") and not credentials.has_userinfo("git@github.com:x")
    credentials.refuse({"--text": "write to http://me@example.org"})  # a text to speak is no URI: not refused


# ------------------------------------------------------------------------ signals stop convert's worker pool
def _children(pid: int) -> set[int]:
    try:
        return {int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()}
    except OSError:
        return set()


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads child processes from /proc (Linux)")
@pytest.mark.parametrize("signum", [15, 2], ids=["SIGTERM", "SIGINT"])
def test_a_signal_stops_convert_and_its_workers_and_publishes_nothing(tmp_path, signum):
    import os
    import subprocess
    import sys
    import time

    from tests.helpers import write_audio, write_jsonl

    write_audio(tmp_path / "c" / "long.wav", seconds=120.0, sr=16000)  # ~0.4 s of work per row
    manifest = write_jsonl(tmp_path / "c" / "m.jsonl",
                           [{"id": f"r{i}", "audio": "long.wav", "text": "t"} for i in range(24)])
    argv = [sys.executable, "-m", "audiotune.cli", *_convert(manifest, tmp_path / "ds", "run.num_workers=2",
                                                              "convert.max_duration_s=1000")]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    workers: set[int] = set()
    deadline = time.monotonic() + 60
    while len(workers) < 2 and proc.poll() is None and time.monotonic() < deadline:
        workers = _children(proc.pid)
        time.sleep(0.02)
    assert len(workers) == 2, "the pool did not start"
    time.sleep(0.5)  # mid-work
    os.kill(proc.pid, signum)
    out, err = proc.communicate(timeout=60)
    lines = [x for x in err.splitlines() if x.startswith("audiotune")]
    assert "Traceback" not in err and len(lines) == 1, err[-3000:]
    assert proc.returncode == 128 + signum and "stopped by SIG" in lines[0] and "nothing was published" in lines[0]
    deadline = time.monotonic() + 10
    while any(_alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(w) for w in workers), "a pool worker outlived the stage"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]  # no Dataset, no staging folder, no lock


def test_a_download_interrupted_earlier_is_cleaned_from_the_cache(s3_env, tmp_path):
    _put(s3_env, "ds/manifest.json", b"{}")
    cache = tmp_path / "cache"
    first = storage.local_copy(f"{s3_env}/ds", cache_dir=cache)
    stale = cache / f".{first.name}.tmp-0123abcd"  # what a download killed half-way left
    (stale / "train").mkdir(parents=True)
    assert storage.local_copy(f"{s3_env}/ds", cache_dir=cache) == first  # a cache hit cleans up too
    assert not stale.exists()


# ----------------------------------------------------------------------------------------- a full disk in convert
def test_a_full_disk_while_writing_a_shard_is_one_line_and_publishes_nothing(tmp_path, capsys, monkeypatch):
    import errno

    import pyarrow.parquet as pq

    from tests.helpers import good_corpus

    manifest = good_corpus(tmp_path / "corpus", 2)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pq, "write_table", full)
    code = cli_main(_convert(manifest, tmp_path / "ds"))
    line = _one_line_error(capsys.readouterr().err)
    assert code == 1 and "part-00000.parquet: cannot write the shard: No space left on device" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus"]  # no Dataset, no staging folder

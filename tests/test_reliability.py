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

    _put(s3_env, "art/../../planted")
    with publish.publish_dir(f"{s3_env}/art", overwrite=True) as staging:
        (staging / "manifest.json").write_text('{"kind": "audiotune.test"}')
    assert storage.list_files(f"{s3_env}/art") == ["manifest.json"]

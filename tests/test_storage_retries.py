"""S3 retries are botocore's: transient failures retried by its policy, a permanent error raised at once."""

from __future__ import annotations

import pytest
from boto3.exceptions import S3UploadFailedError

from audiotune import storage


def test_client_uses_botocores_retry_policy(s3_env):
    retries = storage.client().meta.config.retries
    assert retries["mode"] == "adaptive" and retries["total_max_attempts"] == storage._S3_RETRIES["total_max_attempts"]


def test_a_permanent_upload_error_is_not_retried(s3_env, tmp_path):
    (tmp_path / "a.bin").write_bytes(b"x" * 10)
    s3 = storage.client()
    sent = []
    s3.meta.events.register("before-send.s3.PutObject", lambda **kw: sent.append(1))
    try:
        with pytest.raises(S3UploadFailedError, match="NoSuchBucket"):
            storage.upload_files(tmp_path, "s3://no-such-bucket-here/prefix", ["a.bin"])
    finally:
        s3.meta.events.unregister("before-send.s3.PutObject")
    assert len(sent) == 1

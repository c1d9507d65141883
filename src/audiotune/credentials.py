"""Credentials never travel inside URIs: find them, refuse them with advice, redact them where text is shown.

A URI such as ``http://user:password@mlflow:5000`` or ``s3://KEY:SECRET@bucket/data`` would put its secret
into every place the URI is shown: the resolved config each stage logs, the compiled pipeline YAML, the
PyTorchJob manifest, error messages. The config, the command line and :mod:`audiotune.storage` refuse
such URIs (:func:`refuse`); the command line also passes everything it prints and logs through
:func:`redact`, for URIs that come from elsewhere (``MLFLOW_TRACKING_URI``).

This module imports nothing from the project but :mod:`audiotune.errors`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from typing import Any

from audiotune.errors import UsageError

# scheme://userinfo@ : userinfo runs to the last '@' before the authority ends ('/', '?', '#', whitespace, quotes)
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/\s?#'\"]*)@")

ADVICE = ("put credentials in the environment instead: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY for S3, "
          "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) for MLflow; on the "
          "cluster they come from the Secrets cluster.s3_secret / cluster.mlflow_secret")

URI_ENVIRONMENT = ("MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")


class CredentialsInURIError(UsageError):
    """A URI carries a user name or password (``scheme://user:password@host``)."""


def has_userinfo(text: str) -> bool:
    """Whether ``text`` holds a URI with a user-info part (``scheme://user[:password]@host``) anywhere."""
    return bool(_USERINFO.search(text))


def is_uri_with_userinfo(text: str) -> bool:
    """Whether ``text`` is a URI (it starts with ``scheme://``) with a user-info part."""
    return bool(_USERINFO.match(text.strip()))


def redact(text: str) -> str:
    """``text`` with the user-info part of every URI in it replaced by ``***``."""
    return _USERINFO.sub(r"\g<scheme>***@", text)


def _strings(value: Any, path: str) -> Iterator[tuple[str, str]]:
    if isinstance(value, str):
        yield path, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _strings(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from _strings(item, f"{path}[{i}]")


def refuse(values: Any, where: str = "") -> None:
    """Raise when any string in ``values`` (a mapping of field paths or arguments, nested) is a URI with userinfo.

    Only strings that are URIs count (they start with ``scheme://``): a text to speak that mentions
    ``http://me@example.com`` is no credential.

    Raises:
        CredentialsInURIError: naming the field and the URI with its userinfo redacted, and what to do instead.
    """
    for path, text in _strings(values, where):
        if is_uri_with_userinfo(text):
            raise CredentialsInURIError(f"{path}: {redact(text)} carries credentials inside the URI, which would be "
                                        f"shown in logs, compiled pipelines and messages; {ADVICE}")


class RedactingFilter(logging.Filter):
    """A logging filter that redacts URI credentials from each record's final message."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if has_userinfo(message):
            record.msg, record.args = redact(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        return True

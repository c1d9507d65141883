"""The project's container images, as components reference them (``base_image``) and ``make images`` tags them.

- :data:`CPU_IMAGE` (``images/cpu/Dockerfile``): the data stages (convert, tokenize), export, the MLflow server of
  the Helm chart and the retraining CronJob.
- :data:`CUDA_IMAGE` (``images/cuda/Dockerfile``): the training stages (one multi-GPU pod or a PyTorchJob).

Both are tagged with the package version. The registry is ``ghcr.io/audiotune`` unless ``AUDIOTUNE_IMAGE_REGISTRY``
is set when the pipeline is compiled (the value is read once, at import), matching ``make images
IMAGE_REGISTRY=...``.
"""

from __future__ import annotations

import os
from typing import Literal

from audiotune import __version__

DEFAULT_REGISTRY = "ghcr.io/audiotune"
REGISTRY_ENV = "AUDIOTUNE_IMAGE_REGISTRY"
NAMES = {"cpu": "audiotune-cpu", "cuda": "audiotune-cuda"}


def registry() -> str:
    """The image registry (and namespace): ``$AUDIOTUNE_IMAGE_REGISTRY`` or ``ghcr.io/audiotune``."""
    return (os.environ.get(REGISTRY_ENV) or DEFAULT_REGISTRY).rstrip("/")


def image(kind: Literal["cpu", "cuda"], registry_: str | None = None, tag: str | None = None) -> str:
    """The full reference of an image, e.g. ``ghcr.io/audiotune/audiotune-cuda:0.1.0``."""
    if kind not in NAMES:
        raise ValueError(f"image kind {kind!r}: expected one of {', '.join(NAMES)}")
    return f"{(registry_ or registry()).rstrip('/')}/{NAMES[kind]}:{tag or __version__}"


CPU_IMAGE = image("cpu")
CUDA_IMAGE = image("cuda")

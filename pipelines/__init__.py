"""The Kubeflow pipelines, installed as ``audiotune.pipelines``; ``compiled/`` holds their YAML for the UI."""

from audiotune.pipelines.finetune import build, finetune

__all__ = ["build", "finetune"]

"""One typed configuration for every stage, the CLI, the SDK and the pipeline.

The whole pipeline is described by :class:`AudiotuneConfig`; a stage reads its own
section. Configs load from YAML, take ``--set a.b=value`` overrides by dotted
path, and fail with a :class:`ConfigError` that names the field path and the bad
value. Defaults live here and nowhere else.
"""


from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, model_validator

from audiotune.config.acestep import AceStepStageConfig
from audiotune.config.base import ConfigError, RunConfig, TrackingConfig, _Section
from audiotune.config.cluster import ClusterSettings, PipelineConfig, TolerationSettings
from audiotune.config.data import (
    MEL_PRESETS,
    AudioTokenizerConfig,
    ConvertConfig,
    MelConfig,
    SpeakerConfig,
    TokenizeConfig,
)
from audiotune.config.evaluate import EvaluateConfig, GateRule
from audiotune.config.export import ExportConfig, SynthesisSettings
from audiotune.config.training import (
    FLOW_LORA_TARGETS,
    VOCODER_SUFFIXES,
    DeepSpeedSettings,
    EmaSettings,
    FlowLoraSettings,
    FlowSampleSettings,
    FlowStageConfig,
    JointStageConfig,
    JointTrainSettings,
    LLMStageConfig,
    LoraSettings,
    TrainSettings,
)

__all__ = [
    "AceStepStageConfig",
    "FLOW_LORA_TARGETS", "MEL_PRESETS", "VOCODER_SUFFIXES", "AudioTokenizerConfig", "AudiotuneConfig",
    "ClusterSettings", "ConfigError", "ConvertConfig", "DeepSpeedSettings", "EmaSettings", "ExportConfig",
    "EvaluateConfig", "GateRule",
    "FlowLoraSettings", "FlowSampleSettings", "FlowStageConfig", "JointStageConfig", "JointTrainSettings",
    "LLMStageConfig", "LoraSettings", "MelConfig", "PipelineConfig", "RunConfig", "SpeakerConfig",
    "SynthesisSettings", "TokenizeConfig", "TolerationSettings", "TrackingConfig", "TrainSettings",
    "apply_overrides", "dump_config", "load_config", "parse_override", "validate",
]


class AudiotuneConfig(_Section):
    """The whole pipeline. Each stage reads its own section."""

    run: RunConfig = Field(default_factory=RunConfig, description="Settings shared by all stages.")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="MLflow tracking.")
    convert: ConvertConfig = Field(default_factory=ConvertConfig, description="The convert stage.")
    tokenize: TokenizeConfig = Field(default_factory=TokenizeConfig, description="The tokenize stage.")
    llm: LLMStageConfig = Field(default_factory=LLMStageConfig, description="The llm stage.")
    flow: FlowStageConfig = Field(default_factory=FlowStageConfig, description="The flow stage.")
    joint: JointStageConfig = Field(default_factory=JointStageConfig, description="The joint stage.")
    acestep: AceStepStageConfig = Field(default_factory=AceStepStageConfig, description="ACE-Step 1.5 LoRA "
                                        "(encode acestep, train acestep).")
    export: ExportConfig = Field(default_factory=ExportConfig, description="The export stage.")
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig, description="The evaluate stage.")
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig, description="The Kubeflow pipeline.")
    cluster: ClusterSettings = Field(
        default_factory=ClusterSettings, description="Where the pipeline's training stages run on Kubernetes "
        "(compiled into the pipeline: GPUs, resources, node selector, tolerations, /dev/shm, secrets)."
    )

    @model_validator(mode="after")
    def _joint_ema(self) -> "AudiotuneConfig":
        if self.joint.enabled and self.flow.ema.enabled and self.joint.train.deepspeed.zero_stage == 3:
            raise ValueError("joint.train.deepspeed.zero_stage=3 with flow.ema.enabled=true: the flow's EMA needs "
                             "whole weights on every process; use joint.train.deepspeed.zero_stage 0, 1 or 2, or "
                             "set flow.ema.enabled=false")
        return self

    @model_validator(mode="after")
    def _no_credentials_in_uris(self) -> "AudiotuneConfig":
        from audiotune import credentials

        try:
            credentials.refuse(self.model_dump(mode="json"))
        except credentials.CredentialsInURIError as err:
            raise ValueError(str(err)) from None
        return self

    @model_validator(mode="after")
    def _multinode_output(self) -> "AudiotuneConfig":
        if self.cluster.num_nodes > 1 and not (self.pipeline.output_uri or "").startswith("s3://"):
            raise ValueError(f"cluster.num_nodes={self.cluster.num_nodes} needs pipeline.output_uri set to an s3:// "
                             f"location (got {self.pipeline.output_uri!r}): every node of a multi-node job reads the "
                             "inputs and writes the output there")
        return self


def _format_errors(err: ValidationError, origin: str) -> str:
    lines = [f"invalid configuration ({origin}):"]
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "<root>"
        value = e.get("input")
        shown = repr(value) if not isinstance(value, dict) else "{...}"
        if len(shown) > 80:
            shown = shown[:77] + "..."
        lines.append(f"  {path} = {shown}: {e['msg']}")
    return "\n".join(lines)


def validate(data: dict[str, Any], origin: str = "config") -> AudiotuneConfig:
    """Build a config from a plain mapping; raise ConfigError naming each bad field."""
    try:
        return AudiotuneConfig.model_validate(data or {})
    except ValidationError as err:
        raise ConfigError(_format_errors(err, origin)) from None


def parse_override(item: str) -> tuple[list[str], Any]:
    """Split ``a.b.c=value`` into a path and a YAML-parsed value."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected a.b.c=value")
    key, raw = item.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise ConfigError(f"--set {item!r}: empty field path")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {item!r}: value is not valid YAML ({err})") from None
    return path, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``--set`` overrides to a raw mapping (before validation)."""
    for item in overrides:
        path, value = parse_override(item)
        node = data
        for i, part in enumerate(path[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: {'.'.join(path[: i + 1])} is not a section")
            node = child
        node[path[-1]] = value
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> AudiotuneConfig:
    """Load a YAML config (or the defaults when ``path`` is None) and apply overrides."""
    data: dict[str, Any] = {}
    origin = "defaults"
    if path is not None:
        origin = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as err:
            raise ConfigError(f"cannot read config {path}: {err.strerror}") from None
        except UnicodeDecodeError as err:
            raise ConfigError(f"cannot read config {path}: not UTF-8 text (byte {err.start}: {err.reason})") from None
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    if overrides:
        data = apply_overrides(data, list(overrides))
        origin += " with --set overrides"
    return validate(data, origin)


def dump_config(cfg: AudiotuneConfig) -> str:
    """The config as YAML, every field resolved."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)

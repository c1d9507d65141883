"""The flow model's own configuration (``config.json`` of a Flow artifact) and its size presets.

A :class:`FlowConfig` fixes the architecture (what the weights' shapes depend on) and carries
the flow-matching settings used in training and sampling. The data-dependent part — mel
bins, code vocabulary, speaker conditioning, mel frames per code — comes from the Tokens
artifact; the presets :func:`tiny_config` and :func:`base_config` fill in the rest.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from audiotune.errors import ModelLoadError

SPEAKER_TYPES = ("none", "id", "embedding")


class FlowConfigError(ModelLoadError, ValueError):
    """A flow ``config.json`` that cannot be used (unknown fields, bad values)."""


@dataclass
class EncoderConfig:
    """The code encoder: embedding → pre-norm Transformer (rotary positions) → projection to mel bins.

    Attributes:
        dim: Model width.
        layers: Transformer blocks.
        heads: Attention heads (``dim`` must divide by it).
        ff_dim: Hidden size of the feed-forward layers.
        dropout: Dropout in attention and feed-forward layers.
    """

    dim: int = 512
    layers: int = 6
    heads: int = 8
    ff_dim: int = 2048
    dropout: float = 0.1


@dataclass
class EstimatorConfig:
    """The vector-field estimator: a 1-D U-Net with Transformer blocks (CosyVoice's ConditionalDecoder).

    Attributes:
        channels: Channels of each U-Net level; every level but the last halves the time axis.
        n_blocks: Transformer blocks after each ResNet block.
        num_mid_blocks: ResNet + Transformer stages at the bottom of the U.
        heads: Attention heads.
        head_dim: Width of one head.
        ff_mult: Feed-forward hidden size as a multiple of the level's channels.
        dropout: Dropout in the Transformer blocks.
    """

    channels: tuple[int, ...] = (256, 256)
    n_blocks: int = 4
    num_mid_blocks: int = 12
    heads: int = 8
    head_dim: int = 64
    ff_mult: int = 4
    dropout: float = 0.0


@dataclass
class SpeakerSpec:
    """How the flow is conditioned on the speaker.

    Attributes:
        type: ``none``; ``id`` (a learned table with ``num_speakers`` rows, index 0 is ``<unk>``);
            ``embedding`` (an external vector of ``embedding_dim`` values, L2-normalised and projected).
        num_speakers: Rows of the table (``id``).
        embedding_dim: Length of the external vector (``embedding``).
    """

    type: str = "none"
    num_speakers: int = 0
    embedding_dim: int = 0


@dataclass
class FlowConfig:
    """Everything needed to rebuild a flow model; saved as ``config.json``.

    Attributes:
        n_mels: Mel bins of the target (and of the prompt).
        codebook_size: Codes per codebook.
        num_codebooks: Codebooks the encoder reads (their embeddings are summed).
        mel_frames_per_token: Mel frames per code frame (mel fps / token rate); sets the output
            length at inference.
        speaker: Speaker conditioning.
        encoder: Code encoder.
        estimator: Vector-field estimator.
        regulator_layers: Conv layers after the length regulator's interpolation.
        sigma_min: OT-CFM minimum noise level.
        cfg_dropout: Training probability of dropping all conditions (classifier-free guidance).
        prompt_prob: Training probability of giving a prefix of the target as the prompt.
        prompt_max_fraction: Longest prompt prefix, as a fraction of the target's frames.
        n_timesteps: Default Euler steps when sampling.
        cfg_rate: Default classifier-free guidance strength when sampling.
        preset: Name of the preset the architecture came from.
        mel: The mel settings the targets were computed with (Tokens ``mel.json``), for reference.
    """

    n_mels: int = 80
    codebook_size: int = 4096
    num_codebooks: int = 1
    mel_frames_per_token: float = 22050 / 256 / 50
    speaker: SpeakerSpec = field(default_factory=SpeakerSpec)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    estimator: EstimatorConfig = field(default_factory=EstimatorConfig)
    regulator_layers: int = 4
    sigma_min: float = 1e-6
    cfg_dropout: float = 0.2
    prompt_prob: float = 0.5
    prompt_max_fraction: float = 0.3
    n_timesteps: int = 10
    cfg_rate: float = 0.7
    preset: str = "custom"
    mel: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        self.estimator.channels = tuple(int(c) for c in self.estimator.channels)
        problems = []
        if self.speaker.type not in SPEAKER_TYPES:
            problems.append(f"speaker.type {self.speaker.type!r} is not one of {SPEAKER_TYPES}")
        if self.speaker.type == "id" and self.speaker.num_speakers < 1:
            problems.append("speaker.type 'id' needs speaker.num_speakers >= 1")
        if self.speaker.type == "embedding" and self.speaker.embedding_dim < 1:
            problems.append("speaker.type 'embedding' needs speaker.embedding_dim >= 1")
        if self.encoder.dim % self.encoder.heads:
            problems.append(f"encoder.dim {self.encoder.dim} does not divide by encoder.heads {self.encoder.heads}")
        if not self.estimator.channels:
            problems.append("estimator.channels is empty")
        if min(self.n_mels, self.codebook_size, self.num_codebooks) < 1 or self.mel_frames_per_token <= 0:
            problems.append("n_mels, codebook_size, num_codebooks and mel_frames_per_token must be positive")
        if problems:
            raise FlowConfigError("flow config: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (``config.json``)."""
        out = dataclasses.asdict(self)
        out["estimator"]["channels"] = list(self.estimator.channels)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FlowConfig:
        """Rebuild from :meth:`to_dict`'s output; unknown keys are an error."""
        data = dict(data)
        nested = {"speaker": SpeakerSpec, "encoder": EncoderConfig, "estimator": EstimatorConfig}
        for key, sub in nested.items():
            if key in data:
                data[key] = _strict(sub, data[key], key)
        return _strict(cls, data, "flow config")


def _strict(cls, data: Any, where: str):
    if not isinstance(data, dict):
        raise FlowConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise FlowConfigError(f"{where}: unknown field(s) {unknown} (known: {sorted(known)})")
    try:
        return cls(**data)
    except TypeError as err:
        raise FlowConfigError(f"{where}: {err}") from None


def tiny_config(**data: Any) -> FlowConfig:
    """A few hundred thousand parameters: tests and the demo, fast on a CPU.

    Args:
        **data: Data-dependent fields (``n_mels``, ``codebook_size``, ``num_codebooks``,
            ``mel_frames_per_token``, ``speaker``, ``mel``) and any other :class:`FlowConfig` field.
    """
    return FlowConfig(**{
        "encoder": EncoderConfig(dim=64, layers=2, heads=2, ff_dim=128, dropout=0.0),
        "estimator": EstimatorConfig(channels=(64,), n_blocks=1, num_mid_blocks=1, heads=2, head_dim=32),
        "regulator_layers": 1, "preset": "tiny", **data,
    })


def base_config(**data: Any) -> FlowConfig:
    """About 100M parameters, shaped like CosyVoice-300M's flow (encoder 6 × 512, U-Net 256 channels
    with 4 Transformer blocks per stage and 12 mid stages, 80 mels).

    Args:
        **data: As :func:`tiny_config`.
    """
    return FlowConfig(**{"encoder": EncoderConfig(), "estimator": EstimatorConfig(), "preset": "base", **data})


PRESETS = {"tiny": tiny_config, "base": base_config}

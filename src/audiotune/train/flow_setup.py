"""What a flow training run checks and builds before it trains: the Tokens' mel and code settings, the
speaker conditioning, a base flow's fit to both, and the model to train.

The flow and joint stages both call these; each mismatch is one error naming both values.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from audiotune.config import FlowStageConfig
from audiotune.errors import TrainingError
from audiotune.train.flow_data import FlowExamples

log = logging.getLogger(__name__)

MEL_FORMAT = "cosyvoice-log-mel"
MEL_FIELDS = ("sample_rate", "n_fft", "hop_length", "win_length", "n_mels", "fmin", "fmax", "center")
PRESET_N_MELS = 80
SPEAKER_TYPES = {"speaker-id": "id", "onnx": "embedding", "none": "none"}
FROM_BASE = "from_base"  # flow.preset: the architecture of the base flow's config.json
AUDIOTUNE_ARCH = "audiotune"  # flow.arch of our own flow model (== models.flow.native.fit.AUDIOTUNE)
SPEAKER_FILES = ("speakers.json", "speaker_embeddings.safetensors", "mel.json")  # published beside a flow


class TrainFlowError(TrainingError):
    """The flow stage cannot start (bad inputs or settings)."""


@dataclass
class TokensInfo:
    """What the flow needs to know about a Tokens artifact."""

    mel: dict[str, Any]
    codebook_size: int
    num_codebooks: int  # in the Tokens
    codebooks_used: int  # read by the flow
    token_rate: float
    speaker_type: str  # the Tokens' own name: speaker-id | onnx | none
    num_speakers: int
    code_stream: dict[str, Any] | None = None  # interleaved LM ids (Step-Audio-EditX): offsets, sizes, frame_rate

    @property
    def mel_frames_per_token(self) -> float:
        return self.mel["sample_rate"] / self.mel["hop_length"] / self.token_rate

    def vocab(self, codebooks: str) -> dict[str, Any]:
        """The ``vocab`` entry of a Flow manifest."""
        return {"codebook_size": self.codebook_size, "num_codebooks": self.num_codebooks, "codebooks": codebooks,
                "codebooks_read": self.codebooks_used, "token_rate": self.token_rate,
                "mel_frames_per_token": self.mel_frames_per_token}


def tokens_info(manifest: dict[str, Any], tokens: str, codebooks: str) -> TokensInfo:
    """Check that a Tokens manifest describes mels and codes a flow can train on.

    Raises:
        TrainFlowError: No mel settings, a foreign mel format, or no audio tokenizer.
    """
    mel = manifest.get("mel")
    if not mel:
        raise TrainFlowError(f"{tokens}: the Tokens carry no mel settings; re-tokenize with this audiotune "
                             "(tokenize writes target mels for the flow)")
    if mel.get("format", MEL_FORMAT) != MEL_FORMAT:
        raise TrainFlowError(f"{tokens}: mel format {mel.get('format')!r}; the flow trains on {MEL_FORMAT!r}")
    audio = manifest.get("audio_tokenizer")
    if not audio or not audio.get("codebook_size"):
        raise TrainFlowError(f"{tokens}: the Tokens have no audio codes (tokenize.audio_tokenizer.type is none or "
                             "the data is text only); the flow maps codes to mels")
    if not audio.get("token_rate"):
        raise TrainFlowError(f"{tokens}: the audio tokenizer has no token_rate; cannot align codes with mel frames")
    num = int(audio.get("num_codebooks") or 1)
    return TokensInfo(mel={k: mel.get(k) for k in MEL_FIELDS}, codebook_size=int(audio["codebook_size"]),
                      num_codebooks=num, codebooks_used=1 if codebooks == "first" else num,
                      token_rate=float(audio["token_rate"]),
                      speaker_type=str(manifest.get("speaker_embedding") or "none"),
                      num_speakers=int(manifest.get("speakers") or 0), code_stream=audio.get("code_stream"))


def speaker_spec(info: TokensInfo, tokens_dir: Path, train_ex: FlowExamples):
    """The flow's speaker conditioning for the Tokens' speaker type (a speaker table, x-vectors, or none).

    Raises:
        TrainFlowError: An unknown speaker type, or x-vectors named but missing from the rows.
    """
    from audiotune.models.flow import SpeakerSpec

    kind = SPEAKER_TYPES.get(info.speaker_type)
    if kind is None:
        raise TrainFlowError(f"Tokens speaker type {info.speaker_type!r} is not one of {sorted(SPEAKER_TYPES)}")
    if kind == "id":
        table = tokens_dir / "tokenizer" / "speakers.json"
        count = len(json.loads(table.read_text())) if table.is_file() else info.num_speakers
        return SpeakerSpec("id", num_speakers=max(count, int(train_ex.speaker_index.max(initial=0)) + 1))
    if kind == "embedding":
        if train_ex.speaker_embedding is None:
            raise TrainFlowError("the Tokens' speaker type is onnx but the rows carry no speaker_embedding")
        return SpeakerSpec("embedding", embedding_dim=int(train_ex.speaker_embedding.shape[1]))
    return SpeakerSpec("none")


def check_release_fits(release, info: TokensInfo, speaker, base_flow: str) -> None:
    """A release flow (its yaml's settings) must agree with the Tokens; each mismatch names both values.

    Raises:
        TrainFlowError: Listing every setting that differs (mel, vocabulary, token rate, x-vector size).
    """
    from audiotune.models.flow.native.fit import release_mismatches

    problems = release_mismatches(release, info.mel, info.codebook_size, info.codebooks_used, info.token_rate,
                                  info.mel_frames_per_token, speaker.type, speaker.embedding_dim, info.code_stream)
    if problems:
        raise TrainFlowError(f"base flow {base_flow} ({release.arch}) does not fit the Tokens: " + "; ".join(problems))


def check_flow_fits(config, info: TokensInfo, speaker, base_flow: str) -> None:
    """A base flow must agree with the Tokens on everything its weights depend on.

    Raises:
        TrainFlowError: Listing every setting that differs (mel, vocabulary, token rate, speakers).
    """
    if getattr(config, "release", None) is not None:
        return check_release_fits(config.release, info, speaker, base_flow)
    problems = []
    base_mel = config.mel or {}
    for key in MEL_FIELDS:
        if key in base_mel and base_mel[key] != info.mel.get(key):
            problems.append(f"mel.{key}: base {base_mel[key]!r}, Tokens {info.mel.get(key)!r}")
    if config.n_mels != info.mel["n_mels"]:
        problems.append(f"n_mels: base {config.n_mels}, Tokens {info.mel['n_mels']}")
    if config.codebook_size != info.codebook_size:
        problems.append(f"codebook_size: base {config.codebook_size}, Tokens {info.codebook_size}")
    if config.num_codebooks != info.codebooks_used:
        problems.append(f"codebooks read: base {config.num_codebooks}, Tokens give {info.codebooks_used} "
                        "(see flow.codebooks)")
    if abs(config.mel_frames_per_token - info.mel_frames_per_token) > 1e-6:
        problems.append(f"mel frames per token: base {config.mel_frames_per_token:.4f}, Tokens "
                        f"{info.mel_frames_per_token:.4f} (another token rate)")
    if dataclasses.asdict(config.speaker) != dataclasses.asdict(speaker):
        problems.append(f"speaker conditioning: base {dataclasses.asdict(config.speaker)}, Tokens "
                        f"{dataclasses.asdict(speaker)}")
    if problems:
        raise TrainFlowError(f"base flow {base_flow} does not fit the Tokens: " + "; ".join(problems))


def check_preset_fits(preset_model, base_model, preset: str, base_flow: str) -> None:
    """A base flow must have the preset's architecture: the same settings (dropout aside) and the same tensors.

    Raises:
        TrainFlowError: Listing the architecture settings that differ and the missing, unexpected and
            mis-shaped tensors.
    """
    from audiotune.models.flow import PRESETS, state_dict_problems

    def arch(config) -> dict[str, Any]:
        out = {f"encoder.{k}": v for k, v in dataclasses.asdict(config.encoder).items() if k != "dropout"}
        out.update({f"estimator.{k}": v for k, v in dataclasses.asdict(config.estimator).items() if k != "dropout"})
        return {**out, "regulator_layers": config.regulator_layers}

    ours, theirs = arch(preset_model.config), arch(base_model.config)
    settings = [f"{k}: checkpoint {theirs[k]!r}, preset {ours[k]!r}" for k in ours if ours[k] != theirs[k]]
    problems = ([f"architecture: {'; '.join(settings)}"] if settings else []) + \
        state_dict_problems(preset_model, base_model.state_dict())
    if problems:
        name = base_model.config.preset
        fix = f"flow.preset={name} (the checkpoint's preset) or " if name in PRESETS and name != preset else ""
        raise TrainFlowError(f"base flow {base_flow} (preset {name!r}) does not match flow.preset={preset!r}: "
                             + "; ".join(problems) + f". Set {fix}flow.preset={FROM_BASE} to take the architecture "
                             "from the checkpoint's config.json")


def resolve_arch(F: FlowStageConfig, base_flow: str | None) -> str:
    """``flow.arch`` made concrete (:func:`audiotune.models.flow.native.fit.resolve_arch`).

    Raises:
        TrainFlowError: An arch that contradicts the base flow (naming both), or an upstream arch without a
            release folder to take its sizes from.
    """
    from audiotune.models.flow.native.fit import resolve_arch as resolve

    arch, problem = resolve(F.arch, base_flow)
    if problem:
        raise TrainFlowError(problem)
    return arch


def check_start(F: FlowStageConfig, info: TokensInfo, tokens: str, base_flow: str | None) -> None:
    """What the flow stage refuses before anything else: an arch that contradicts the base, ``from_base``
    without a base, a preset for other mels than the Tokens'.

    Raises:
        TrainFlowError: Naming the setting and the value to change.
    """
    resolve_arch(F, base_flow)
    if not base_flow and F.preset == FROM_BASE:
        raise TrainFlowError(f"flow.preset={FROM_BASE!r} takes the architecture from a base flow, but there is none "
                             "(set flow.base_flow or --base-flow, or a preset: tiny, base)")
    if not base_flow and info.mel["n_mels"] != PRESET_N_MELS:
        raise TrainFlowError(f"{tokens}: the Tokens' mels have {info.mel['n_mels']} bins; flow preset {F.preset!r} "
                             f"decodes {PRESET_N_MELS} (tokenize.mel.n_mels), or start from a base_flow built for them")


def _build_release(F: FlowStageConfig, info: TokensInfo, speaker, base_flow: str):
    """A release folder's flow, strictly loaded and checked against the Tokens."""
    from audiotune.models.flow.native.adapter import load_release_flow

    model = load_release_flow(base_flow, prompt_prob=F.prompt_prob, prompt_max_fraction=F.prompt_max_fraction,
                              n_timesteps=F.sample.n_timesteps, cfg_rate=F.sample.cfg_rate,
                              code_stream=info.code_stream)
    check_release_fits(model.config.release, info, speaker, base_flow)
    if F.preset != "base":
        log.info("flow.preset=%s is not used: the %s flow's sizes come from its yaml", F.preset, model.config.arch)
    model.config.mel = dict(info.mel)
    return model


def build_flow_model(F: FlowStageConfig, info: TokensInfo, speaker, base_flow: str | None):
    """The flow to train: a preset from random weights, a strictly loaded base flow (checked against the
    preset unless ``flow.preset`` is ``from_base``), or a release folder's flow (``flow.arch``).

    Raises:
        TrainFlowError: A base flow that does not fit the Tokens or the preset.
    """
    from audiotune.models.flow import PRESETS, FlowModel, load_flow

    if resolve_arch(F, base_flow) != AUDIOTUNE_ARCH:
        return _build_release(F, info, speaker, base_flow)

    overrides = dict(sigma_min=F.sigma_min, cfg_dropout=F.cfg_dropout, prompt_prob=F.prompt_prob,
                     prompt_max_fraction=F.prompt_max_fraction, n_timesteps=F.sample.n_timesteps,
                     cfg_rate=F.sample.cfg_rate)
    data = dict(codebook_size=info.codebook_size, num_codebooks=info.codebooks_used,
                mel_frames_per_token=info.mel_frames_per_token, speaker=speaker, mel=dict(info.mel), **overrides)
    if not base_flow:
        return FlowModel(PRESETS[F.preset](n_mels=PRESET_N_MELS, **data))
    model = load_flow(base_flow)
    check_flow_fits(model.config, info, speaker, base_flow)
    if F.preset == FROM_BASE:
        model.config = dataclasses.replace(model.config, mel=dict(info.mel), **overrides)
        return model
    preset = FlowModel(PRESETS[F.preset](n_mels=model.config.n_mels, **data))
    check_preset_fits(preset, model, F.preset, base_flow)
    preset.load_state_dict(model.state_dict(), strict=True)
    return preset


def drop_overlong(examples: FlowExamples, budget: int, split: str) -> tuple[FlowExamples, int]:
    """``examples`` without the utterances of more than ``budget`` mel frames, and how many were dropped."""
    keep = examples.mel_lengths <= budget
    dropped = int((~keep).sum())
    if dropped:
        log.warning("%s: %d utterances longer than flow.max_frames_in_batch=%d mel frames dropped (e.g. %s)",
                    split, dropped, budget, ", ".join(np.asarray(examples.ids)[~keep][:5]))
        examples = examples.subset(keep)
    return examples, dropped


def copy_speaker_files(source: Path, staging: Path) -> None:
    """Copy the speaker table, x-vectors and mel settings a flow artifact carries (those ``source`` has)."""
    for name in SPEAKER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, staging / name)

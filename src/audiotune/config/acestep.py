"""The ``acestep`` section: ACE-Step 1.5 LoRA through diffusers (encode and train stages)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from audiotune.config.base import _Section
from audiotune.config.training import DeepSpeedSettings, TrainSettings

ACESTEP_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


class AceStepLoraSettings(_Section):
    """LoRA on the diffusion transformer (the only component ``AceStepLoraLoaderMixin`` loads)."""

    r: int = Field(64, ge=1, description="LoRA rank (ACE-Step's own trainer defaults to 64).")
    alpha: float = Field(32.0, gt=0, description="LoRA alpha (scaling = alpha / r).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: list[str] = Field(
        default_factory=lambda: list(ACESTEP_LORA_TARGETS),
        description="Module name suffixes of the transformer that get adapters; diffusers' ACE-Step LoRA loader "
        "accepts the attention projections to_q, to_k, to_v, to_out.0.",
    )


class AceStepSampleSettings(_Section):
    """Audio samples rendered through ``AceStepPipeline`` with the current LoRA."""

    num_inference_steps: int = Field(8, ge=1, le=200, description="Denoising steps (turbo checkpoints: 8).")
    guidance_scale: float = Field(7.0, ge=0, description="APG guidance for base/SFT checkpoints; turbo ignores it.")
    shift: float = Field(3.0, gt=0, description="Timestep-schedule shift (1, 2 or 3).")
    duration_s: float = Field(10.0, gt=0, le=600, description="Length of each sample in seconds.")


class AceStepStageConfig(_Section):
    """ACE-Step 1.5 LoRA: ``encode acestep`` (latents + conditioning, once) and ``train acestep``."""

    base_model: str | None = Field(
        None, description="A diffusers AceStepPipeline folder (model_index.json, transformer/, condition_encoder/, "
        "vae/, text_encoder/, tokenizer/, scheduler/), local path or s3://; --base-model.")
    vocal_language: str = Field("en", description="Language code written into the lyric prompt.")
    max_text_length: int = Field(256, ge=8, description="Longest caption prompt in text-encoder tokens.")
    max_lyric_length: int = Field(2048, ge=8, description="Longest lyric prompt in text-encoder tokens.")
    max_seconds: float = Field(240.0, gt=0, description="Songs longer than this are cropped to their start when "
                               "encoded (ACE-Step trains on up to 240 s).")
    timestep_sampling: Literal["auto", "logit_normal", "turbo_schedule"] = Field(
        "auto", description="How the training timestep t is drawn: logit_normal (sigmoid of N(mu, sigma), base/SFT "
        "checkpoints), turbo_schedule (uniform over the 8-step shift-3 inference schedule of turbo checkpoints), "
        "or auto (turbo_schedule when the transformer's config says is_turbo).")
    timestep_mu: float = Field(-0.4, description="Mean of the logit-normal timestep distribution.")
    timestep_sigma: float = Field(1.0, gt=0, description="Standard deviation of the logit-normal distribution.")
    cfg_dropout: float = Field(0.15, ge=0, lt=1, description="Probability that an example's conditioning is "
                               "replaced by the condition encoder's null_condition_emb (what base checkpoints' "
                               "guidance needs); 0 turns it off.")
    lora: AceStepLoraSettings = Field(default_factory=AceStepLoraSettings, description="LoRA on the transformer.")
    fuse: bool = Field(False, description="Also save the whole pipeline with the LoRA fused into the transformer "
                       "under pipeline/ in the artifact.")
    sample_every: int = Field(500, ge=1, description="Render audio samples (logged to MLflow) every N steps.")
    num_samples: int = Field(1, ge=0, le=16, description="Prompts rendered each time (validation rows first); 0 "
                             "turns samples off.")
    sample: AceStepSampleSettings = Field(default_factory=AceStepSampleSettings, description="Sampling settings.")
    train: TrainSettings = Field(
        default_factory=lambda: TrainSettings(lr=1e-4, max_steps=1000, max_batch_size=1, save_every=200,
                                              weight_decay=0.01, deepspeed=DeepSpeedSettings(zero_stage=0)),
        description="The training loop (max_batch_size: songs per batch; ACE-Step trains one song at a time; "
        "deepspeed.zero_stage is explicit here, 0 by default: a LoRA on a 2B transformer fits one GPU).")
    overwrite: bool = Field(False, description="Replace existing artifacts at the output URIs.")

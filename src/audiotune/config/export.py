"""The export stage's section and the synthesis settings it shares with ``audiotune synthesize``."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from audiotune.config.base import _Section


class SynthesisSettings(_Section):
    """How audio is generated from text (export samples and ``audiotune synthesize``)."""

    temperature: float = Field(0.8, ge=0, description="Sampling temperature of the LLM's codes; 0 is greedy.")
    top_k: int = Field(50, ge=0, description="Sample among the k most likely codes; 0 means all.")
    max_audio_s: float = Field(20.0, gt=0, description="Longest audio generated for one text (seconds).")
    min_token_text_ratio: float = Field(
        1.0, ge=0, description="Fewest audio code frames per text token: <|audio_end|> is not sampled before "
        "(CosyVoice's min_token_text_ratio; guards against empty or clipped audio)."
    )
    max_token_text_ratio: float = Field(
        20.0, gt=0, description="Most audio code frames per text token (and at most max_audio_s): stops a run-on "
        "generation (CosyVoice's max_token_text_ratio)."
    )
    n_timesteps: int | None = Field(None, ge=1, description="Flow ODE steps; unset: the flow's own setting.")
    cfg_rate: float | None = Field(None, ge=0, description="Flow classifier-free guidance; unset: the flow's.")
    vocoder: str = Field(
        "griffin-lim", description="griffin-lim (built in, griffin-lim:N for N iterations), a CosyVoice / "
        "Step-Audio-EditX release folder (yaml with hift: + hift.pt; its HiFT), or a TorchScript "
        "(.pt/.jit/.ts) or ONNX (.onnx) mel→wav file (local or s3://)."
    )
    seed: int = Field(0, description="Seed of the sampling, so a sample can be generated again.")


class ExportConfig(_Section):
    """The export stage: merge, verify, package, upload, register."""

    base_model: str | None = Field(None, description="Base model of a LoRA LLM artifact; unset: the one recorded "
                                   "at training (its fingerprint is checked either way).")
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="Dtype of the merged model; auto is the base model's own (config torch_dtype)."
    )
    verify_tolerance: float | None = Field(
        None, gt=0, description="Largest allowed |logit difference| between base + adapter and the merged model, "
        "relative to the logits' RMS; unset: by dtype (fp32 1e-4, fp16 1e-2, bf16 4e-2)."
    )
    verify_reload: bool = Field(True, description="Reload the saved merged model with AutoModelForCausalLM and "
                                "check it gives the merged model's logits.")
    probe_samples: int = Field(4, ge=1, le=64, description="Validation sequences in the merge-check probe batch.")
    max_shard_size: str = Field("2GB", description="Largest safetensors shard of the merged model.")
    keep_adapter: bool = Field(True, description="Also package the adapter-only variant (llm-adapter/).")
    num_samples: int = Field(3, ge=0, le=32, description="Validation texts synthesized end to end into samples/.")
    sample_texts: list[str] = Field(default_factory=list, description="Texts to synthesize instead of "
                                    "validation texts.")
    synthesis: SynthesisSettings = Field(default_factory=SynthesisSettings, description="Sample generation.")
    registered_model_name: str | None = Field(
        None, description="Register the export in the MLflow model registry under this name (unset: no registry)."
    )
    log_weights_max_mb: float = Field(
        2048.0, ge=0, description="Log the whole package to MLflow when it is smaller than this (MiB); a larger "
        "one exported to S3 logs only card, manifest and samples, and its registered version points at the S3 URI."
    )
    champion_alias: str = Field("champion", description="Registry alias of the model in production.")
    overwrite: bool = Field(False, description="Replace an existing export at the output URI.")

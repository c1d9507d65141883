"""The training stages' sections: the shared loop (LoRA, DeepSpeed, schedule), llm, flow and joint."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from audiotune.config.base import _Section


class LoraSettings(_Section):
    """LoRA adapters through PEFT."""

    r: int = Field(16, ge=1, description="LoRA rank.")
    alpha: float = Field(32.0, gt=0, description="LoRA alpha (scaling = alpha / r, or alpha / sqrt(r) with rsLoRA).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="Module names (suffixes) to adapt, or 'all-linear' (every linear but the head)."
    )
    exclude_modules: list[str] = Field(
        default_factory=list, description="Regex patterns of modules to leave alone (e.g. a frozen audio encoder)."
    )
    use_rslora: bool = Field(False, description="Rank-stabilised LoRA scaling.")
    use_dora: bool = Field(False, description="Weight-decomposed LoRA (DoRA).")
    train_new_tokens: bool = Field(
        True, description="Train the embedding and output rows of tokens added to the base vocabulary."
    )
    audio_adaptor: bool = Field(
        False, description="Kimi-Audio: also put LoRA on its audio adaptor (vq_adaptor, Whisper features → hidden "
        "size); off, it stays frozen like the Whisper encoder, which is never adapted."
    )


class DeepSpeedSettings(_Section):
    """DeepSpeed ZeRO, generated from these settings or read from a user's JSON."""

    zero_stage: Literal["auto", 0, 1, 2, 3] = Field(
        0, description="ZeRO stage; 0 runs plain DDP (or one process). auto: the pipeline's launcher picks the stage "
        "and offloading from the model's size, the GPUs and their memory (audiotune.train.memory."
        "choose_zero_config) and logs why; `audiotune train` run by hand does the same."
    )
    offload_optimizer: bool = Field(False, description="Keep optimizer states in CPU memory (ZeRO 2/3).")
    offload_params: bool = Field(False, description="Keep parameters in CPU memory (ZeRO 3).")
    config_file: str | None = Field(
        None, description="A DeepSpeed JSON to use instead; keys that disagree with these settings are an error."
    )

    @model_validator(mode="after")
    def _offload(self) -> "DeepSpeedSettings":
        if self.zero_stage == "auto" and (self.offload_optimizer or self.offload_params or self.config_file):
            raise ValueError("zero_stage auto picks the stage and offloading itself: set zero_stage 0-3 to use "
                             "offload_optimizer, offload_params or config_file")
        if self.zero_stage == "auto":
            return self
        if self.offload_params and self.zero_stage != 3:
            raise ValueError("offload_params needs zero_stage 3")
        if self.offload_optimizer and self.zero_stage < 1:
            raise ValueError("offload_optimizer needs zero_stage 1, 2 or 3")
        return self


class TrainSettings(_Section):
    """The training loop shared by the llm, flow and joint stages."""

    lr: float = Field(2e-4, gt=0, description="Peak learning rate.")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay (not applied to biases and norms).")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    schedule: Literal["cosine", "linear", "constant"] = Field("cosine", description="Learning-rate schedule.")
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="Warm-up as a fraction of the total steps.")
    warmup_steps: int | None = Field(None, ge=0, description="Warm-up steps; overrides warmup_ratio when set.")
    max_grad_norm: float = Field(1.0, ge=0, description="Gradient clipping norm; 0 turns clipping off.")
    grad_accum: int = Field(1, ge=1, description="Batches per optimizer step.")
    epochs: float = Field(1.0, gt=0, description="Passes over the training data (when max_steps is unset).")
    max_steps: int | None = Field(None, ge=1, description="Optimizer steps; overrides epochs when set.")
    batch_tokens: int = Field(4096, ge=16, description="Token budget of one batch (padded tokens count).")
    max_batch_size: int = Field(64, ge=1, description="Upper bound on sequences per batch.")
    packing: Literal["auto", "on", "off"] = Field(
        "auto",
        description="Padding-free packing (position ids restart per sample, no attention across samples). auto: "
        "only with a variable-length attention kernel (flash_attention_2); with sdpa/eager a packed row costs "
        "quadratic attention over the whole row, so length-grouped padded batches are faster there.",
    )
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="Compute dtype; auto is bf16 on a GPU that supports it, else fp32."
    )
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward (non-reentrant).")
    eval_every: int = Field(100, ge=1, description="Validation loss every N optimizer steps.")
    save_every: int = Field(200, ge=1, description="Checkpoint every N optimizer steps (and at the end).")
    keep_last: int = Field(2, ge=1, description="Checkpoints kept besides the best.")
    log_every: int = Field(10, ge=1, description="Metrics every N optimizer steps.")
    resume: str = Field("auto", description="auto: newest complete checkpoint if any; never; or a checkpoint path.")
    max_drop_fraction: float = Field(
        0.01, ge=0, le=1, description="Most of a split's rows the stage may drop (llm: longer than max_seq_len with "
        "overlong=drop; flow: longer than max_frames_in_batch) before it fails instead of training on the rest. "
        "Distinct from convert/tokenize's max_bad_fraction, which counts quarantined rows."
    )
    trust_checkpoint: bool = Field(
        False, description="Allow a DeepSpeed resume from a checkpoint outside this run's own <output>.checkpoints "
        "(train.resume pointing elsewhere). DeepSpeed reads its checkpoint files with pickle "
        "(torch.load(weights_only=False)), which runs any code a writer of that location put there; without "
        "DeepSpeed checkpoints are read without unpickling code and this setting is not needed."
    )
    nproc_per_node: int = Field(1, ge=1, description="Processes (GPUs) per node for torchrun.")
    deepspeed: DeepSpeedSettings = Field(default_factory=DeepSpeedSettings, description="DeepSpeed ZeRO.")


class LLMStageConfig(_Section):
    """The llm stage: LoRA, full or from-scratch training of a causal LM on text/audio sequences."""

    base_model: str | None = Field(None, description="Hugging Face causal LM (local path or s3://); --base-model.")
    init: Literal["pretrained", "scratch"] = Field(
        "pretrained", description="Start from base_model, or from random weights of a size preset."
    )
    preset: str = Field("tiny-qwen2", description="Size preset for init: scratch (tiny-qwen2, tiny-llama, 85m).")
    mode: Literal["lora", "full"] = Field(
        "lora", description="Train LoRA adapters or every weight; unset with init 'scratch' means full."
    )
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = Field(
        "auto", description="Attention kernel; auto: flash_attention_2 with flash-attn on a GPU, else sdpa."
    )
    trust_remote_code: bool = Field(
        False, description="Run the Python code a base model ships with its weights (config.json auto_map, e.g. "
        "Step-Audio-EditX's Step1ForCausalLM). Off: such a base is refused. On: the sha256 of those .py files "
        "enter the base fingerprint and export refuses a base whose code changed; attention falls back to what "
        "the model's class supports (eager when it has no sdpa)."
    )
    audio_tokens: Literal["append", "offset"] = Field(
        "append", description="Audio codes as new tokens after the text vocabulary, or at an existing offset."
    )
    audio_token_offset: int | None = Field(None, ge=0, description="LM id of audio code 0 when audio_tokens=offset.")
    layout: Literal["auto", "tts", "clone", "edit", "understand", "music", "text"] = Field(
        "auto", description="Sequence layout; auto picks it from each row's task."
    )
    prompt_format: Literal["audiotune", "step-audio-editx"] = Field(
        "audiotune", description="How a layout is framed: audiotune's segment markers, or another system's own "
        "chat prompts (step-audio-editx: its tts / clone / edit turns, see audiotune.models.vocab.PROMPT_FORMATS)."
    )
    codebook_weights: list[float] | None = Field(
        None, description="Per-codebook loss weights (multi-codebook); default 8,2,1,1,... for 8 codebooks."
    )
    max_seq_len: int = Field(2048, ge=8, description="Longest sequence the model is trained on.")
    overlong: Literal["truncate", "drop"] = Field("drop", description="What happens to longer sequences.")
    lora: LoraSettings = Field(default_factory=LoraSettings, description="LoRA settings (mode=lora).")
    train: TrainSettings = Field(default_factory=TrainSettings, description="The training loop.")
    overwrite: bool = Field(False, description="Replace an existing LLM artifact at the output URI.")

    @model_validator(mode="before")
    @classmethod
    def _default_mode(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("mode") is None and data.get("init") == "scratch":
            data = {**data, "mode": "full"}  # the default for random weights; lora for a pretrained base
        return data

    @model_validator(mode="after")
    def _scratch_is_full(self) -> "LLMStageConfig":
        if self.init == "scratch" and self.mode == "lora":
            raise ValueError("init 'scratch' trains every weight: set mode 'full' (LoRA on random weights learns "
                             "next to nothing, and there would be no base to merge into)")
        if self.audio_tokens == "offset" and self.audio_token_offset is None:
            raise ValueError("audio_tokens 'offset' needs audio_token_offset (the LM id of audio code 0)")
        return self


FLOW_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out", "proj_in", "proj_out"]
VOCODER_SUFFIXES = (".pt", ".jit", ".ts", ".torchscript", ".onnx")


class FlowLoraSettings(_Section):
    """LoRA adapters (PEFT) on the flow estimator's linear layers; merged into the weights at the end."""

    enabled: bool = Field(False, description="Train LoRA adapters on the estimator instead of the weights; every "
                          "other weight is frozen.")
    r: int = Field(16, ge=1, description="LoRA rank.")
    alpha: float = Field(32.0, gt=0, description="LoRA alpha (scaling = alpha / r).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: list[str] = Field(
        default_factory=lambda: list(FLOW_LORA_TARGETS), min_length=1,
        description="Estimator module names (suffixes) to adapt: to_q, to_k, to_v, to_out (attention), proj_in, "
        "proj_out (feed-forward). Left at this default on a release flow: its own attention and feed-forward layers "
        "(U-Net: attn1.to_q/k/v, attn1.to_out.0, ff.net.0.proj, ff.net.2; DiT: attn.to_q/k/v, attn.proj, "
        "mlp.fc1, mlp.fc2).",
    )
    save_adapter: bool = Field(True, description="Also save the unmerged adapter under adapter/ in the artifact.")


class EmaSettings(_Section):
    """Exponential moving average of the trained weights."""

    enabled: bool = Field(False, description="Keep an EMA of the weights; validation, samples and the saved "
                          "model use it.")
    decay: float = Field(0.999, gt=0, lt=1, description="EMA decay per optimizer step.")


class FlowSampleSettings(_Section):
    """How mels are generated (training samples; recorded as the model's defaults)."""

    n_timesteps: int = Field(10, ge=1, le=1000, description="Euler steps of the ODE (cosine time schedule).")
    cfg_rate: float = Field(0.7, ge=0, description="Classifier-free guidance strength; 0 turns guidance off.")
    temperature: float = Field(1.0, gt=0, description="Scale of the initial noise.")


class FlowStageConfig(_Section):
    """The flow stage: conditional flow-matching training of the token→mel decoder."""

    base_flow: str | None = Field(
        None, description="Starting flow (Flow artifact, a folder with config.json + model.safetensors, or a "
        "CosyVoice / Step-Audio-EditX release folder with its yaml + flow.pt (+ hift.pt); local or s3://); "
        "--base-flow. Unset: random init of `preset`."
    )
    arch: Literal["auto", "audiotune", "cosyvoice-300m", "cosyvoice2", "step-audio-editx"] = Field(
        "auto", description="Flow architecture: audiotune (our own flow, sized by `preset`), or an upstream one "
        "loaded from a release folder as base_flow (cosyvoice-300m, cosyvoice2, step-audio-editx; sizes from its "
        "yaml, written back as flow.pt + yaml + hift.pt). auto: the base_flow's, or audiotune without one. A "
        "base_flow of another architecture is refused, naming both."
    )
    preset: Literal["tiny", "base", "from_base"] = Field(
        "base", description="Architecture of arch audiotune: tiny (tests, demo) or base (~100M parameters, "
        "CosyVoice-300M-sized); a base_flow must match it tensor for tensor (an error lists what differs). "
        "from_base takes the architecture from the base_flow's config.json (needs a base_flow). Not used for a "
        "release flow (its yaml sets the sizes)."
    )
    codebooks: Literal["first", "all"] = Field(
        "all", description="Codes the flow reads: codebook 0 only, or all codebooks (embeddings summed)."
    )
    freeze_encoder: bool = Field(False, description="Freeze the code encoder and length regulator; train the "
                                 "decoder (estimator) and speaker projection only. Release flows: input_embedding, "
                                 "encoder, encoder_proj (+ length_regulator in cosyvoice-300m) are frozen.")
    lora: FlowLoraSettings = Field(default_factory=FlowLoraSettings, description="LoRA on the estimator.")
    ema: EmaSettings = Field(default_factory=EmaSettings, description="EMA of the weights.")
    max_frames_in_batch: int = Field(
        8000, ge=16, description="Mel-frame budget of one batch (longest utterance × batch size); utterances "
        "longer than this are dropped and counted."
    )
    cfg_dropout: float = Field(0.2, ge=0, lt=1, description="Probability of dropping all conditions of an "
                               "utterance in training (classifier-free guidance). Release flows use their yaml's "
                               "training_cfg_rate and sigma_min instead.")
    prompt_prob: float = Field(0.5, ge=0, le=1, description="Probability of giving a prefix of the target mel as "
                               "the prompt condition (excluded from the loss).")
    prompt_max_fraction: float = Field(0.3, ge=0, lt=1, description="Longest prompt prefix as a fraction of the "
                                       "utterance.")
    sigma_min: float = Field(1e-6, ge=0, lt=1, description="OT-CFM minimum noise level.")
    sample: FlowSampleSettings = Field(default_factory=FlowSampleSettings, description="Sampling settings.")
    sample_every: int = Field(500, ge=1, description="Generate samples (mel PNG + WAV, logged to MLflow) every N "
                              "optimizer steps, and at the end.")
    num_samples: int = Field(2, ge=0, le=32, description="Utterances rendered each time (validation ones first); "
                             "0 turns samples off.")
    vocoder: str = Field(
        "griffin-lim", description="Vocoder for sample WAVs: griffin-lim (built in, griffin-lim:N for N iterations), "
        "a CosyVoice / Step-Audio-EditX release folder (yaml with hift: + hift.pt; its HiFT), or a TorchScript "
        "(.pt/.jit/.ts) or ONNX (.onnx) mel→wav file (local or s3://)."
    )
    train: TrainSettings = Field(
        default_factory=TrainSettings, description="The training loop (batch_tokens is not used: the batch size "
        "is max_frames_in_batch)."
    )
    overwrite: bool = Field(False, description="Replace an existing Flow artifact at the output URI.")

    @model_validator(mode="after")
    def _combinations(self) -> "FlowStageConfig":
        if self.ema.enabled and self.train.deepspeed.zero_stage == 3:
            raise ValueError("ema.enabled needs whole weights on every process: use train.deepspeed.zero_stage "
                             "0, 1 or 2 (a ~100M flow does not need ZeRO-3)")
        if self.lora.enabled and self.freeze_encoder:
            raise ValueError("lora.enabled already freezes every base weight; leave freeze_encoder false")
        spec = self.vocoder
        folder = "/" in spec or Path(spec).is_dir()  # a release folder (yaml hift: + hift.pt), local or s3://
        if not (spec == "griffin-lim" or spec.startswith("griffin-lim:") or spec.lower().endswith(VOCODER_SUFFIXES)
                or folder):
            raise ValueError(f"vocoder {spec!r}: expected griffin-lim[:N], a release folder (yaml with hift: + "
                             f"hift.pt) or a file ending in {', '.join(VOCODER_SUFFIXES)}")
        if spec.startswith("griffin-lim:") and not spec.split(":", 1)[1].isdigit():
            raise ValueError(f"vocoder {spec!r}: expected griffin-lim:<iterations>")
        return self


class JointTrainSettings(TrainSettings):
    """The joint stage's loop: as the others, but epochs 0 skips the stage (whatever max_steps says)."""

    epochs: float = Field(0.0, ge=0, description="Passes over the training data (when max_steps is unset); 0, the "
                          "default, skips the joint stage, even with max_steps set.")


class JointStageConfig(_Section):
    """The joint stage: the LLM (still under its LoRA) and the flow trained together in one optimizer step."""

    w_llm: float = Field(0.4, ge=0, description="Weight of the LLM loss in w_llm·L_llm + w_flow·L_flow.")
    w_flow: float = Field(0.6, ge=0, description="Weight of the flow loss.")
    lr_scale: float = Field(0.1, gt=0, le=10, description="Each model's learning rate is its own stage's "
                            "(llm.train.lr, flow.train.lr) times this, in separate parameter groups.")
    flow_condition: Literal["ground_truth", "llm_predicted"] = Field(
        "ground_truth", description="Codes the flow is conditioned on: the data's, or the LLM's teacher-forced "
        "predictions of them (the decoder learns to cope with the LLM's mistakes)."
    )
    base_model: str | None = Field(None, description="Base model of a LoRA LLM artifact; unset: the one recorded "
                                   "in the artifact (its fingerprint is checked either way).")
    train: JointTrainSettings = Field(
        default_factory=JointTrainSettings, description="The training loop (lr is not used: see lr_scale; "
        "batch_tokens bounds the LLM sequences, flow.max_frames_in_batch the mels)."
    )
    overwrite: bool = Field(False, description="Replace existing LLM and Flow artifacts at the outputs.")

    @model_validator(mode="after")
    def _weights(self) -> "JointStageConfig":
        if self.w_llm == 0 and self.w_flow == 0:
            raise ValueError("w_llm and w_flow are both 0: nothing would be trained")
        return self

    @property
    def enabled(self) -> bool:
        """Whether the pipeline runs the joint stage: epochs > 0 (0 is the off switch; max_steps only bounds it)."""
        return self.train.epochs > 0

"""One typed configuration for every stage, the CLI, the SDK and the pipeline.

The whole pipeline is described by :class:`AudiotuneConfig`; a stage reads its own
section. Configs load from YAML, take ``--set a.b=value`` overrides by dotted
path, and fail with a :class:`ConfigError` that names the field path and the bad
value. Defaults live here and nowhere else.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the field and value."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunConfig(_Section):
    """Settings shared by every stage of one run."""

    name: str = Field("audiotune", description="Name of the run, used for MLflow run names and output paths.")
    seed: int = Field(0, description="Seed for every random choice (splits, initialisation, sampling).")
    num_workers: int = Field(
        0, ge=0, description="Worker processes for CPU-bound work; 0 means one per available core."
    )


class TrackingConfig(_Section):
    """MLflow tracking."""

    enabled: bool = Field(True, description="Log to MLflow. False turns tracking off everywhere.")
    uri: str | None = Field(
        None,
        description="MLflow tracking URI. Unset: MLFLOW_TRACKING_URI, else a local store under ./mlruns.",
    )
    experiment: str = Field("audiotune", description="MLflow experiment that holds the runs.")
    parent_run_id: str | None = Field(
        None, description="Run id of the pipeline's parent run; stage runs are nested under it."
    )
    run_name: str | None = Field(None, description="Name of the stage run; defaults to the stage name.")


class ConvertConfig(_Section):
    """The convert stage: source corpus → validated Dataset artifact."""

    source: str | None = Field(None, description="Source URI (local path or s3://); the CLI's --source.")
    format: Literal["jsonl", "acestep", "kaldi", "text"] | None = Field(
        None, description="Source layout; unset means autodetect."
    )
    val_source: str | None = Field(
        None, description="Optional separate validation source (same format); replaces the hash split."
    )
    sample_rate: int = Field(22050, ge=8000, le=192000, description="Target sample rate of stored audio (Hz).")
    trim_silence: bool = Field(False, description="Trim leading and trailing silence.")
    trim_top_db: float = Field(40.0, gt=0, description="Frames this many dB below the loudest frame count as silence.")
    silence_threshold_db: float = Field(
        -60.0, le=0, description="Audio whose peak is below this level (dBFS) is quarantined as silent."
    )
    min_duration_s: float = Field(0.3, ge=0, description="Shorter audio is quarantined (seconds, after trimming).")
    max_duration_s: float = Field(30.0, gt=0, description="Longer audio is quarantined (seconds, after trimming).")
    val_fraction: float = Field(
        0.05, ge=0, lt=1, description="Fraction of rows in the validation split, chosen by a hash of the row id."
    )
    shard_max_rows: int = Field(2000, ge=1, description="Maximum rows per Parquet shard.")
    shard_max_mb: float = Field(256.0, gt=0, description="Approximate maximum size of a Parquet shard (MiB).")
    max_bad_fraction: float = Field(
        0.2, ge=0, le=1, description="Fail the stage when more than this fraction of rows is quarantined."
    )
    text_field: str = Field("text", description="Field holding the document in text JSONL sources.")
    repeat_count: int = Field(1, ge=1, description="ACE-Step: how often each row counts in training.")
    overwrite: bool = Field(False, description="Replace an existing Dataset at the output URI.")

    @model_validator(mode="after")
    def _bounds(self) -> "ConvertConfig":
        if self.min_duration_s >= self.max_duration_s:
            raise ValueError(
                f"min_duration_s ({self.min_duration_s}) must be below max_duration_s ({self.max_duration_s})"
            )
        return self


MEL_PRESETS: dict[str, dict[str, Any]] = {
    "cosyvoice-300m": dict(sample_rate=22050, n_fft=1024, hop_length=256, win_length=1024, n_mels=80,
                           fmin=0.0, fmax=8000.0, center=False),
    "cosyvoice2": dict(sample_rate=24000, n_fft=1920, hop_length=480, win_length=1920, n_mels=80,
                       fmin=0.0, fmax=None, center=False),
}


class MelConfig(_Section):
    """Target mel spectrograms for the flow decoder (log of the clamped magnitude, as CosyVoice)."""

    preset: Literal["cosyvoice-300m", "cosyvoice2", "custom"] = Field(
        "cosyvoice-300m", description="Named mel setup; fields set explicitly override the preset."
    )
    sample_rate: int | None = Field(None, description="Sample rate the mel is computed at (Hz).")
    n_fft: int | None = Field(None, description="FFT size.")
    hop_length: int | None = Field(None, description="Hop between frames (samples).")
    win_length: int | None = Field(None, description="Window length (samples, Hann window).")
    n_mels: int | None = Field(None, description="Number of mel bins.")
    fmin: float | None = Field(None, description="Lowest mel filter frequency (Hz).")
    fmax: float | None = Field(None, description="Highest mel filter frequency (Hz); null means sample_rate/2.")
    center: bool | None = Field(None, description="Centre frames (torch.stft center=); CosyVoice uses False.")

    def resolved(self) -> dict[str, Any]:
        """Preset values with explicit fields applied on top."""
        base = dict(MEL_PRESETS.get(self.preset, MEL_PRESETS["cosyvoice-300m"]))
        for key in base:
            value = getattr(self, key)
            if value is not None or (key == "fmax" and "fmax" in self.model_fields_set):
                base[key] = value
        return base


class AudioTokenizerConfig(_Section):
    """The pluggable audio tokenizer that turns audio into discrete codes (codebooks × frames)."""

    type: Literal["mel-kmeans", "s3tokenizer", "precomputed", "none"] = Field(
        "mel-kmeans", description="Which tokenizer: built-in mel k-means, CosyVoice S3 ONNX, or codes in the source."
    )
    token_rate: float = Field(25.0, gt=0, description="mel-kmeans: tokens per second of audio (e.g. 25 or 50).")
    codebook_size: int = Field(1024, ge=2, description="mel-kmeans: codes per codebook (k of k-means).")
    num_codebooks: int = Field(1, ge=1, le=32, description="mel-kmeans: codebooks (>1: residual k-means).")
    fit_max_frames: int = Field(100_000, ge=100, description="mel-kmeans: train frames sampled to fit k-means.")
    fit_iters: int = Field(30, ge=1, description="mel-kmeans: k-means iterations.")
    onnx_path: str | None = Field(None, description="s3tokenizer: path or s3:// URI of the speech tokenizer ONNX.")
    s3_version: Literal["v1", "v2"] = Field("v2", description="s3tokenizer: v1 is 50 Hz, v2 is 25 Hz.")
    codes_field: str = Field("codes", description="precomputed: key in the Dataset row's meta holding the codes.")
    moss_path: str | None = Field(
        None, description="precomputed: folder or file of MOSS-TTSD `.pkl` + `_metas.npy` shards."
    )
    trust_pickle: bool = Field(
        False, description="precomputed: allow reading pickle shards (restricted to plain containers and arrays)."
    )
    vocab_size: int | None = Field(
        None, description="precomputed: codes per codebook; codes outside [0, vocab_size) are quarantined."
    )


class SpeakerConfig(_Section):
    """Speaker conditioning for the flow decoder."""

    type: Literal["none", "speaker-id", "onnx"] = Field(
        "speaker-id", description="none, an index into a learned table, or a CAM++-style ONNX embedding."
    )
    onnx_path: str | None = Field(None, description="onnx: path or s3:// URI of the speaker model.")


class TokenizeConfig(_Section):
    """The tokenize stage: Dataset → Tokens (text ids, audio codes, mels, speaker features)."""

    base_model: str | None = Field(
        None, description="Base model URI whose tokenizer is used (local path or s3://); the CLI's --base-model."
    )
    text_tokenizer: Literal["auto", "base", "bpe", "char"] = Field(
        "auto", description="auto: the base model's tokenizer if given, else train BPE; char: character level."
    )
    vocab_size: int = Field(4000, ge=64, description="Vocabulary size of a BPE tokenizer trained here.")
    context_length: int = Field(1024, ge=8, description="Text LM windows: tokens per window.")
    stride: int = Field(128, ge=0, description="Text LM windows: tokens of overlap between windows.")
    audio_tokenizer: AudioTokenizerConfig = Field(
        default_factory=AudioTokenizerConfig, description="Discrete audio tokenizer."
    )
    mel: MelConfig = Field(default_factory=MelConfig, description="Target mel features for the flow.")
    speaker: SpeakerConfig = Field(default_factory=SpeakerConfig, description="Speaker embeddings.")
    align_tolerance: int = Field(
        3, ge=0, description="Mel frames a row may differ from tokens × ratio before it is quarantined."
    )
    shard_max_rows: int = Field(2000, ge=1, description="Maximum rows per Tokens shard.")
    max_bad_fraction: float = Field(0.2, ge=0, le=1, description="Fail when more rows than this are quarantined.")
    overwrite: bool = Field(False, description="Replace an existing Tokens artifact at the output URI.")

    @model_validator(mode="after")
    def _windows(self) -> "TokenizeConfig":
        if self.stride >= self.context_length:
            raise ValueError(f"stride ({self.stride}) must be below context_length ({self.context_length})")
        return self


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
    nproc_per_node: int = Field(1, ge=1, description="Processes (GPUs) per node for torchrun.")
    deepspeed: DeepSpeedSettings = Field(default_factory=DeepSpeedSettings, description="DeepSpeed ZeRO.")


_QUANTITY = r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$"


class TolerationSettings(_Section):
    """One Kubernetes toleration (core/v1 Toleration) for the training pods."""

    key: str | None = Field(None, description="Taint key the toleration applies to; unset with Exists matches all.")
    operator: Literal["Equal", "Exists"] = Field("Equal", description="Equal compares value; Exists ignores it.")
    value: str | None = Field(None, description="Taint value to match (operator Equal).")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        None, description="Taint effect to match; unset matches every effect."
    )
    toleration_seconds: int | None = Field(
        None, ge=0, description="NoExecute only: seconds the pod stays bound after the taint appears."
    )


class ClusterSettings(_Section):
    """Where training stages run on Kubernetes: one multi-GPU pod, or several nodes through a PyTorchJob."""

    num_nodes: int = Field(
        1, ge=1, description="Nodes of a training stage. 1: the stage's own pod runs torchrun; above 1: the stage "
        "submits a Kubeflow PyTorchJob (one Master, num_nodes-1 Workers) and follows it."
    )
    gpus_per_node: int = Field(
        1, ge=0, description="GPUs requested per node, and torchrun processes per node (0: one CPU process)."
    )
    gpu_resource: str = Field("nvidia.com/gpu", description="Extended resource name of a GPU on the cluster.")
    gpu_type: str | None = Field(
        None, description="GPU model to run on (e.g. NVIDIA-H100-80GB-HBM3); added to the node selector under "
        "gpu_type_label. Unset: any GPU."
    )
    gpu_type_label: str = Field(
        "nvidia.com/gpu.product", description="Node label that names the GPU model (GPU feature discovery's)."
    )
    cpu: str | None = Field("8", pattern=_QUANTITY, description="CPU request per node (Kubernetes quantity).")
    memory: str | None = Field(
        "64Gi", pattern=_QUANTITY, description="Memory request and limit per node (Kubernetes quantity)."
    )
    shm_size: str | None = Field(
        "16Gi", pattern=_QUANTITY,
        description="Size of the memory-backed /dev/shm (NCCL and data loaders need more than the default 64Mi); "
        "null: no /dev/shm volume.",
    )
    node_selector: dict[str, str] = Field(
        default_factory=dict, description="Node labels a training pod must match (e.g. a GPU node pool)."
    )
    tolerations: list[TolerationSettings] = Field(
        default_factory=list, description="Tolerations of the training pods (e.g. for tainted GPU nodes)."
    )
    namespace: str | None = Field(
        None, description="Namespace of the PyTorchJob; unset: the namespace of the pipeline's own pod."
    )
    service_account: str | None = Field(
        None, description="ServiceAccount of the training pods; unset: the namespace's default. The pipeline "
        "task that creates the PyTorchJob needs the chart's Role (pytorchjobs, pods, pods/log)."
    )
    s3_secret: str | None = Field(
        None, description="Secret whose keys become environment variables of every training pod (AWS_ACCESS_KEY_ID, "
        "AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, ...); the chart creates `<release>-s3`."
    )
    mlflow_secret: str | None = Field(
        None, description="Secret with the MLflow client settings (MLFLOW_TRACKING_URI, optional "
        "MLFLOW_TRACKING_USERNAME/PASSWORD/TOKEN) as environment variables; the chart creates `<release>-mlflow`."
    )
    extra_secrets: list[str] = Field(
        default_factory=list, description="More Secrets whose keys become environment variables (e.g. HF_TOKEN)."
    )
    model_cache_pvc: str | None = Field(
        None, description="PersistentVolumeClaim mounted at model_cache_path for downloaded base models "
        "(ReadWriteMany when num_nodes > 1); the chart creates `<release>-model-cache`."
    )
    model_cache_path: str = Field(
        "/cache", pattern=r"^/", description="Mount path of the model cache; XDG_CACHE_HOME and HF_HOME point there."
    )
    image_pull_secrets: list[str] = Field(
        default_factory=list, description="Secrets for pulling the training image from a private registry."
    )
    labels: dict[str, str] = Field(
        default_factory=dict, description="Extra labels on the PyTorchJob and its pods (e.g. a team or cost centre)."
    )
    restart_policy: Literal["OnFailure", "Never"] = Field(
        "OnFailure", description="Restart policy of the replicas; OnFailure restarts a crashed pod, up to "
        "backoff_limit times."
    )
    backoff_limit: int = Field(3, ge=0, description="Pod restarts before the PyTorchJob counts as failed.")
    delete_on_success: bool = Field(True, description="Delete the PyTorchJob (and its pods) when it succeeds.")
    delete_on_failure: bool = Field(
        False, description="Delete the PyTorchJob when it fails; false keeps it and its pods for debugging."
    )
    ttl_seconds_after_finished: int | None = Field(
        None, ge=0, description="Let the Training Operator delete a finished PyTorchJob after this many seconds "
        "(a backstop for jobs kept on failure)."
    )
    timeout_hours: float = Field(
        72.0, gt=0, description="Longest a multi-node training may run; the job is then deleted and the task fails."
    )


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
    audio_tokens: Literal["append", "offset"] = Field(
        "append", description="Audio codes as new tokens after the text vocabulary, or at an existing offset."
    )
    audio_token_offset: int | None = Field(None, ge=0, description="LM id of audio code 0 when audio_tokens=offset.")
    layout: Literal["auto", "tts", "clone", "edit", "understand", "music", "text"] = Field(
        "auto", description="Sequence layout; auto picks it from each row's task."
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
        description="Estimator module names to adapt: to_q, to_k, to_v, to_out (attention), proj_in, proj_out "
        "(feed-forward).",
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
        None, description="Starting flow (Flow artifact, or a folder with config.json + model.safetensors; local "
        "or s3://); --base-flow. Unset: random init of `preset`."
    )
    preset: Literal["tiny", "base", "from_base"] = Field(
        "base", description="Architecture: tiny (tests, demo) or base (~100M parameters, CosyVoice-300M-sized); "
        "a base_flow must match it tensor for tensor (an error lists what differs). from_base takes the "
        "architecture from the base_flow's config.json (needs a base_flow)."
    )
    codebooks: Literal["first", "all"] = Field(
        "all", description="Codes the flow reads: codebook 0 only, or all codebooks (embeddings summed)."
    )
    freeze_encoder: bool = Field(False, description="Freeze the code encoder and length regulator; train the "
                                 "decoder (estimator) and speaker projection only.")
    lora: FlowLoraSettings = Field(default_factory=FlowLoraSettings, description="LoRA on the estimator.")
    ema: EmaSettings = Field(default_factory=EmaSettings, description="EMA of the weights.")
    max_frames_in_batch: int = Field(
        8000, ge=16, description="Mel-frame budget of one batch (longest utterance × batch size); utterances "
        "longer than this are dropped and counted."
    )
    cfg_dropout: float = Field(0.2, ge=0, lt=1, description="Probability of dropping all conditions of an "
                               "utterance in training (classifier-free guidance).")
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
        "griffin-lim", description="Vocoder for sample WAVs: griffin-lim (built in, griffin-lim:N for N iterations) "
        "or a TorchScript (.pt/.jit/.ts) or ONNX (.onnx) mel→wav file (local or s3://)."
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
        if not (spec == "griffin-lim" or spec.startswith("griffin-lim:") or spec.lower().endswith(VOCODER_SUFFIXES)):
            raise ValueError(f"vocoder {spec!r}: expected griffin-lim[:N] or a file ending in "
                             f"{', '.join(VOCODER_SUFFIXES)}")
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
        "griffin-lim", description="griffin-lim (built in, griffin-lim:N for N iterations) or a TorchScript "
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


class PipelineConfig(_Section):
    """The Kubeflow pipeline around the stages (``audiotune run --local``, ``compile``, ``submit``)."""

    mode: Literal["llm", "flow", "both"] = Field(
        "llm", description="What to train: the LLM, the flow decoder, or both (then the joint stage when "
        "joint.train.epochs > 0)."
    )
    output_uri: str | None = Field(
        None, description="Durable location (s3:// or a shared path) of training outputs, their checkpoints and the "
        "export, under <output_uri>/<run.name>/<pipeline run id>/; a retried training task resumes from there. "
        "Unset: inside the pipeline's artifact store."
    )
    root: str | None = Field(
        None, description="Pipeline root where KFP keeps the artifacts handed between tasks (s3://... on a "
        "cluster; unset: the cluster's default). For `audiotune run --local` a local folder, default ./kfp-local."
    )
    enable_caching: bool = Field(
        True, description="Reuse the convert and tokenize outputs of an earlier run when the source data (by "
        "fingerprint) and their settings are unchanged. Training and export always run."
    )
    retries: int = Field(2, ge=0, le=10, description="Retries of a failed training task (it resumes from its "
                         "newest checkpoint).")
    retry_backoff_s: int = Field(60, ge=0, description="Seconds before the first retry; doubled for each next one.")


class AudiotuneConfig(_Section):
    """The whole pipeline. Each stage reads its own section."""

    run: RunConfig = Field(default_factory=RunConfig, description="Settings shared by all stages.")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="MLflow tracking.")
    convert: ConvertConfig = Field(default_factory=ConvertConfig, description="The convert stage.")
    tokenize: TokenizeConfig = Field(default_factory=TokenizeConfig, description="The tokenize stage.")
    llm: LLMStageConfig = Field(default_factory=LLMStageConfig, description="The llm stage.")
    flow: FlowStageConfig = Field(default_factory=FlowStageConfig, description="The flow stage.")
    joint: JointStageConfig = Field(default_factory=JointStageConfig, description="The joint stage.")
    export: ExportConfig = Field(default_factory=ExportConfig, description="The export stage.")
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
    def _multinode_output(self) -> "AudiotuneConfig":
        if self.cluster.num_nodes > 1 and not (self.pipeline.output_uri or "").startswith("s3://"):
            raise ValueError(f"cluster.num_nodes={self.cluster.num_nodes} needs pipeline.output_uri set to an s3:// "
                             f"location (got {self.pipeline.output_uri!r}): every node of a PyTorchJob reads the "
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

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

    zero_stage: Literal[0, 1, 2, 3] = Field(0, description="ZeRO stage; 0 runs plain DDP (or one process).")
    offload_optimizer: bool = Field(False, description="Keep optimizer states in CPU memory (ZeRO 2/3).")
    offload_params: bool = Field(False, description="Keep parameters in CPU memory (ZeRO 3).")
    config_file: str | None = Field(
        None, description="A DeepSpeed JSON to use instead; keys that disagree with these settings are an error."
    )

    @model_validator(mode="after")
    def _offload(self) -> "DeepSpeedSettings":
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
    packing: bool = Field(
        True, description="Padding-free packing (position ids restart per sample) where attention supports it."
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


class LLMStageConfig(_Section):
    """The llm stage: LoRA, full or from-scratch training of a causal LM on text/audio sequences."""

    base_model: str | None = Field(None, description="Hugging Face causal LM (local path or s3://); --base-model.")
    init: Literal["pretrained", "scratch"] = Field(
        "pretrained", description="Start from base_model, or from random weights of a size preset."
    )
    preset: str = Field("tiny-qwen2", description="Size preset for init: scratch (tiny-qwen2, tiny-llama, 85m).")
    mode: Literal["lora", "full"] = Field("lora", description="Train LoRA adapters or every weight.")
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = Field(
        "sdpa", description="Attention kernel; flash_attention_2 when installed."
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


class AudiotuneConfig(_Section):
    """The whole pipeline. Each stage reads its own section."""

    run: RunConfig = Field(default_factory=RunConfig, description="Settings shared by all stages.")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="MLflow tracking.")
    convert: ConvertConfig = Field(default_factory=ConvertConfig, description="The convert stage.")
    tokenize: TokenizeConfig = Field(default_factory=TokenizeConfig, description="The tokenize stage.")
    llm: LLMStageConfig = Field(default_factory=LLMStageConfig, description="The llm stage.")


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

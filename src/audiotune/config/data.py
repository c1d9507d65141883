"""The data stages' sections: convert and tokenize (audio tokenizer, mel, speaker)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from audiotune.config.base import _Section


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
    unit_max_bytes: int = Field(
        2 * 2**30, ge=1, description="Fan-out (pipeline): most bytes of source audio in one work unit."
    )
    unit_max_rows: int = Field(20000, ge=1, description="Fan-out (pipeline): most rows in one work unit.")
    max_units: int = Field(
        500, ge=1, description="Fan-out (pipeline): most work units; the unit bounds are raised evenly to fit."
    )
    max_local_disk_bytes: int = Field(
        2 * 2**30, ge=0, description="Fan-out: most bytes of streamed S3 audio a unit task holds on local disk at "
        "once (0: no cap); an object larger than this is an error."
    )
    plan_uri: str | None = Field(
        None, description="Fan-out: durable folder (s3:// or shared) of the plan; the plan found there is the "
        "previous one, whose intact units keep their ids (so the KFP cache holds). Unset: a new plan each run."
    )

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
                       fmin=0.0, fmax=8000.0, center=False),
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


AUDIO_TOKENIZER_PRESETS: dict[str, dict[str, Any]] = {
    # Step-Audio-EditX tokenizer.py: vq02 (1024 codes, 16.7 Hz) at LLM id 65536, vq06 (4096 codes, 25 Hz) at
    # 65536 + 1024, two vq02 then three vq06 ids per 0.12 s group: 125/3 ids per second.
    "step-audio-editx": dict(type="precomputed", codebook_offsets=[65536, 66560], codebook_sizes=[1024, 4096],
                             interleave=[2, 3], token_rate=125 / 3),
}


def check_code_stream_layout(offsets: Any, sizes: Any, interleave: Any) -> tuple[tuple[int, ...], ...]:
    """A layout of codebooks at fixed LM ids, interleaved in one stream, as ``(offsets, sizes, interleave)``
    tuples of ints, after checking it.

    The one check of such a layout: :class:`AudioTokenizerConfig` runs it on its fields and
    :class:`audiotune.data.code_stream.CodeStream` on every stream it describes (config sits below data).

    Args:
        offsets: LM id of code 0 of each codebook (``codebook_offsets``).
        sizes: Codes per codebook (``codebook_sizes``).
        interleave: Ids of each codebook per group of the stream (``interleave``).

    Raises:
        ValueError: The lists are empty or of different lengths, a value is out of range, or two codebooks'
            id ranges overlap; the message names the fields and values.
    """
    offsets, sizes, interleave = (tuple(int(x) for x in v) for v in (offsets, sizes, interleave))
    n = len(offsets)
    if n == 0 or len(sizes) != n or len(interleave) != n:
        raise ValueError(f"codebook_offsets {list(offsets)}, codebook_sizes {list(sizes)} and "
                         f"interleave {list(interleave)} must be non-empty lists of the same length")
    if min(offsets) < 0 or min(sizes) < 1 or min(interleave) < 1:
        raise ValueError(f"codebook_offsets must be >= 0, codebook_sizes and interleave >= 1 (got "
                         f"{list(offsets)}, {list(sizes)}, {list(interleave)})")
    ranges = sorted((o, o + s) for o, s in zip(offsets, sizes, strict=True))
    for (a0, a1), (b0, b1) in zip(ranges, ranges[1:], strict=False):
        if b0 < a1:
            raise ValueError(f"codebook id ranges [{a0}, {a1}) and [{b0}, {b1}) overlap "
                             "(codebook_offsets / codebook_sizes)")
    return offsets, sizes, interleave


class AudioTokenizerConfig(_Section):
    """The pluggable audio tokenizer that turns audio into discrete codes (codebooks × frames)."""

    type: Literal["mel-kmeans", "s3tokenizer", "precomputed", "none"] = Field(
        "mel-kmeans", description="Which tokenizer: built-in mel k-means, CosyVoice S3 ONNX, or codes in the source."
    )
    token_rate: float = Field(25.0, gt=0, description="mel-kmeans: tokens per second of audio (e.g. 25 or 50); "
                              "precomputed: stored ids per second (Step-Audio-EditX's stream: 125/3).")
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
    preset: Literal["step-audio-editx"] | None = Field(
        None, description="Named setup that fills the fields it names when they are not set (plain data, see "
        "AUDIO_TOKENIZER_PRESETS); step-audio-editx: precomputed vq02/vq06 codes at LLM ids 65536 / 66560, "
        "interleaved 2:3."
    )
    prompt_codes_field: str = Field(
        "prompt_codes", description="precomputed: key in the row's meta holding the prompt audio's codes (clone, "
        "edit), in the same forms as codes_field."
    )
    codebook_offsets: list[int] | None = Field(
        None, description="precomputed, codes at LLM ids: the LLM id of code 0 of each codebook. The Tokens then "
        "hold one row of LLM ids (the codebooks interleaved in one stream) that the LLM reads as they are."
    )
    codebook_sizes: list[int] | None = Field(
        None, description="precomputed, codes at LLM ids: codes per codebook (one entry per codebook_offsets)."
    )
    interleave: list[int] | None = Field(
        None, description="precomputed, codes at LLM ids: ids of each codebook per group of the stream, in "
        "codebook order (Step-Audio-EditX: [2, 3]); may be left out for one codebook."
    )

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("preset") in AUDIO_TOKENIZER_PRESETS:
            data = {**AUDIO_TOKENIZER_PRESETS[data["preset"]], **data}
        return data

    @model_validator(mode="after")
    def _code_stream(self) -> "AudioTokenizerConfig":
        given = [k for k in ("codebook_offsets", "codebook_sizes", "interleave") if getattr(self, k) is not None]
        if not given:
            return self
        if self.type != "precomputed":
            raise ValueError(f"{given[0]} applies to type 'precomputed' (codes taken from the data), not {self.type!r}")
        if self.codebook_offsets is None or self.codebook_sizes is None:
            raise ValueError("codebook_offsets and codebook_sizes go together (one entry per codebook)")
        n = len(self.codebook_offsets)
        if self.interleave is None and n > 1:
            raise ValueError(f"interleave must be set for {n} codebooks (ids of each codebook per group, e.g. [2, 3])")
        if self.vocab_size is not None or self.num_codebooks != 1 or self.moss_path:
            raise ValueError("with codebook_offsets the codes are one interleaved stream of LLM ids: leave vocab_size "
                             "unset, num_codebooks at 1 and moss_path unset (codebook_sizes bounds each codebook)")
        check_code_stream_layout(self.codebook_offsets, self.codebook_sizes, self.interleave or [1])
        return self


class SpeakerConfig(_Section):
    """Speaker conditioning for the flow decoder."""

    type: Literal["none", "speaker-id", "onnx"] = Field(
        "speaker-id", description="none, an index into a learned table, or a CAM++-style ONNX embedding."
    )
    onnx_path: str | None = Field(None, description="onnx: path or s3:// URI of the speaker model.")


class WhisperFeaturesConfig(_Section):
    """Whisper log-mel features of each row's audio, cached for models fed continuous Whisper features
    (Kimi-Audio; audiotune.tokenization.whisper_features)."""

    enabled: bool = Field(False, description="Compute and store the Whisper log-mel (columns whisper_mel, "
                          "whisper_frames) of every row with audio.")
    n_mels: int = Field(128, ge=1, description="Mel bins (128 for Whisper large-v3, Kimi-Audio's encoder).")
    chunk_s: int = Field(30, ge=1, description="Window length in seconds the encoder sees (30 for Whisper: "
                         "2 × max_source_positions frames at 100 frames/s).")


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
    whisper: WhisperFeaturesConfig = Field(
        default_factory=WhisperFeaturesConfig, description="Whisper log-mel features (Kimi-Audio's continuous input)."
    )
    speaker: SpeakerConfig = Field(default_factory=SpeakerConfig, description="Speaker embeddings.")
    align_tolerance: int = Field(
        3, ge=0, description="Mel frames a row may differ from tokens × ratio before it is quarantined."
    )
    shard_max_rows: int = Field(2000, ge=1, description="Maximum rows per Tokens shard.")
    max_bad_fraction: float = Field(0.2, ge=0, le=1, description="Fail when more rows than this are quarantined.")
    max_base_tokenizer_mb: float = Field(
        64.0, gt=0, description="Largest tokenizer file (tokenizer.json, vocab.json, merges.txt, tokenizer.model, "
        "...) a base model may bring, in MiB; a larger one is refused before it is read."
    )
    max_base_vocab: int = Field(
        1_000_000, ge=1, description="Most vocabulary entries (added tokens included) a base model's tokenizer may "
        "have; more are refused before the tokenizer is built."
    )
    overwrite: bool = Field(False, description="Replace an existing Tokens artifact at the output URI.")

    @model_validator(mode="after")
    def _windows(self) -> "TokenizeConfig":
        if self.stride >= self.context_length:
            raise ValueError(f"stride ({self.stride}) must be below context_length ({self.context_length})")
        return self

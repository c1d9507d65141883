"""The evaluate stage's section: the eval set, the metrics and their weights, and the champion gate's rule."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from audiotune.config.base import _Section

METRIC_NAMES = ("dnsmos", "sim", "wer", "mcd", "f0", "duration")


class GateRule(_Section):
    """When a challenger replaces the champion, both evaluated on the same eval set (same fingerprint).

    Each bound compares the challenger's mean with the champion's; a metric whose value is missing on either
    side (its weights were missing, it was skipped) makes the gate refuse to decide.
    """

    metrics: list[str] = Field(
        default_factory=lambda: ["wer", "sim", "dnsmos_ovrl"],
        description="Summary metrics the gate compares (names as in the Eval summary: wer, cer, sim, dnsmos_ovrl, "
        "dnsmos_sig, dnsmos_bak, dnsmos_p808, mcd, f0_rmse, voicing_error, failed_rate, bad_rate, truncated_rate, "
        "val_loss).",
    )
    max_worse: dict[str, float] = Field(
        default_factory=lambda: {"wer": 0.02},
        description="How much worse than the champion a metric may be (absolute, in the metric's unit); a metric "
        "of `metrics` not named here may not be worse at all.",
    )
    require_better: Literal["any", "none"] = Field(
        "any", description="any: at least one of `metrics` must be strictly better than the champion's; none: "
        "not worse is enough.",
    )


class EvaluateConfig(_Section):
    """The evaluate stage: synthesize a fixed eval set with an Export and score it as TTS papers do."""

    enabled: bool = Field(
        True, description="Run the evaluate task after the export in the pipeline (then it, not the export, registers "
        "the model, with the eval metrics). Exports that cannot speak from text (llm-only, flow-only) are not "
        "evaluated and register at export as before.",
    )
    eval_set: str | None = Field(
        None, description="Eval set: a Dataset artifact (its val rows) or a JSONL of {text, prompt_wav, "
        "prompt_text, reference_wav, speaker, id} (local or s3://); unset: the validation rows of the Dataset "
        "recorded in the export's manifest.",
    )
    max_utterances: int = Field(50, ge=1, description="Most utterances evaluated (the first by id).")
    metrics: list[Literal["dnsmos", "sim", "wer", "mcd", "f0", "duration"]] = Field(
        default_factory=lambda: list(METRIC_NAMES), description="Metric plug-ins to run: dnsmos (DNSMOS "
        "SIG/BAK/OVRL/P.808), sim (speaker similarity), wer (WER/CER by an ASR model), mcd (mel-cepstral "
        "distortion), f0 (F0 RMSE and voicing error), duration (duration ratio, empty/truncated/max-length rate).",
    )
    language: Literal["en", "zh"] = Field("en", description="Language of the eval texts: en scores WER, zh CER.")
    asr_model: str | None = Field(
        None, description="ASR model by path (local or s3://): a Whisper folder (transformers) or a Paraformer "
        "ONNX folder; unset: pocketsphinx's bundled English model (low accuracy) for en, none for zh.",
    )
    speaker_model: str | None = Field(
        None, description="CAM++-style speaker ONNX model (local or s3://); unset: the Tokens' own "
        "(tokenize.speaker.onnx_path) when recorded, else resemblyzer's bundled encoder (its SIM is not "
        "comparable to WavLM SIM).",
    )
    dnsmos_model: str | None = Field(
        None, description="Folder with DNSMOS sig_bak_ovr.onnx and model_v8.onnx; unset: those shipped in speechmos.",
    )
    bootstrap: int = Field(1000, ge=10, description="Bootstrap resamples of the 95% interval of each mean.")
    seed: int = Field(0, description="Seed of synthesis sampling and of the bootstrap.")
    truncated_ratio: float = Field(
        0.5, gt=0, description="An output shorter than this times its reference duration (or than 40 ms of audio per "
        "text character when there is no reference) counts as truncated.",
    )
    forbid_overlap: bool = Field(
        False, description="An eval set that shares rows (id or text+speaker) with the training rows is an error "
        "instead of a warning.",
    )
    log_wavs: bool = Field(True, description="Log the synthesized WAVs and their transcripts to MLflow.")
    num_threads: int = Field(1, ge=1, description="CPU threads of each metric model (onnxruntime / torch).")
    gate: GateRule = Field(default_factory=GateRule, description="The champion gate of promote / submit --promote.")
    overwrite: bool = Field(False, description="Replace an existing Eval at the output URI.")

"""Evaluating an Export as TTS papers do (seed-tts-eval's protocol): synthesize a fixed, fingerprinted eval set,
then score intelligibility (WER/CER by an ASR model), speaker similarity, quality (DNSMOS), the distance to the
reference recording (MCD, F0) and the "gibberish" rates (empty, truncated, max-length outputs).

- :mod:`~audiotune.evaluation.evalset`: the eval set (a Dataset's val rows or a JSONL), its fingerprint, overlap.
- :mod:`~audiotune.evaluation.metrics`: the metric plug-ins (each declares its rate and languages).
- :mod:`~audiotune.evaluation.asr`: ASR plug-ins for WER/CER (pocketsphinx, Whisper by path).
- :mod:`~audiotune.evaluation.speaker`: speaker encoders for SIM (CAM++ ONNX, resemblyzer's).
- :mod:`~audiotune.evaluation.report`: per-utterance table, bootstrap summary, plots, card table.
- :mod:`~audiotune.evaluation.gate`: the champion/challenger rule.
"""

from audiotune.errors import AudiotuneError, DataError


class EvaluationError(DataError):
    """An eval set or Eval artifact that cannot be used as it is (one line naming the file, row or field)."""


class MetricUnavailable(AudiotuneError):
    """A metric cannot run here (its weights or package are missing); the metric is skipped, with this reason."""


__all__ = ["EvaluationError", "MetricUnavailable"]

"""ASR plug-ins for WER/CER: pocketsphinx's bundled English model (offline default, low accuracy), or a Whisper
model given by path (transformers, local folder or s3://). Every plug-in takes 16 kHz mono float32."""

from __future__ import annotations

import logging
import re
import unicodedata
from pathlib import Path

import numpy as np

from audiotune.evaluation import MetricUnavailable

log = logging.getLogger(__name__)

RATE = 16000


class PocketSphinx:
    """CMU pocketsphinx with its bundled en-us model: offline, but weak (measured 0.89 WER on one espeak-ng
    sentence); use it to rank models on a set, not as an absolute intelligibility figure."""

    name = "pocketsphinx"
    note = "pocketsphinx en-us (offline default, low accuracy)"
    languages = ("en",)

    def __init__(self) -> None:
        try:
            from pocketsphinx import Decoder
        except ImportError:
            raise MetricUnavailable("pocketsphinx is not installed (pip install pocketsphinx)") from None
        self.decoder = Decoder(samprate=RATE, loglevel="FATAL")

    def __call__(self, wav: np.ndarray) -> str:
        pcm = (np.clip(wav, -1, 1) * 32767).astype("<i2").tobytes()
        self.decoder.start_utt()
        self.decoder.process_raw(pcm, full_utt=True)
        self.decoder.end_utt()
        hyp = self.decoder.hyp()
        return hyp.hypstr if hyp is not None else ""


class Whisper:
    """A Whisper model folder (Hugging Face layout) run with transformers on the CPU."""

    name = "whisper"
    languages = ("en", "zh")

    def __init__(self, path: str, language: str, num_threads: int = 1) -> None:
        import json

        from audiotune import storage

        try:
            local = Path(storage.local_copy(path))
        except OSError as err:
            raise MetricUnavailable(f"ASR model {path} is missing ({err})") from None
        config = local / "config.json"
        if not config.is_file():
            raise MetricUnavailable(f"ASR model {path}: no config.json (a Whisper folder is expected; Paraformer "
                                    "ONNX is not supported yet)")
        if json.loads(config.read_text()).get("model_type") != "whisper":
            raise MetricUnavailable(f"ASR model {path}: config.json model_type is not 'whisper'")
        import torch
        from transformers import WhisperForConditionalGeneration, WhisperProcessor

        torch.set_num_threads(num_threads)
        self.processor = WhisperProcessor.from_pretrained(str(local))
        self.model = WhisperForConditionalGeneration.from_pretrained(str(local)).eval()
        self.language = {"en": "english", "zh": "chinese"}[language]
        self.note = f"whisper ({local.name})"

    def __call__(self, wav: np.ndarray) -> str:
        import torch

        features = self.processor(wav, sampling_rate=RATE, return_tensors="pt").input_features
        with torch.no_grad():
            ids = self.model.generate(features, language=self.language, task="transcribe")
        return self.processor.batch_decode(ids, skip_special_tokens=True)[0].strip()


def build_asr(path: str | None, language: str, num_threads: int = 1):
    """Whisper at ``path`` when given; else pocketsphinx for English.

    Raises:
        MetricUnavailable: No ASR model for the language, or its weights are missing.
    """
    if path:
        return Whisper(path, language, num_threads)
    if language != "en":
        raise MetricUnavailable(f"no offline ASR model for language {language!r}: give evaluate.asr_model "
                                "(a Whisper folder)")
    return PocketSphinx()


def normalize(text: str, language: str) -> str:
    """Lower case, punctuation removed, digits kept; for zh, characters without spaces."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = "".join(" " if unicodedata.category(c).startswith("P") else c for c in text)
    text = re.sub(r"\s+", " ", text).strip()
    return text.replace(" ", "") if language == "zh" else text


def error_rate(reference: str, hypothesis: str, language: str) -> float:
    """WER (en) or CER (zh) of one utterance after :func:`normalize`; an empty hypothesis is 1.0."""
    import jiwer

    ref, hyp = normalize(reference, language), normalize(hypothesis, language)
    if not ref:
        return float("nan")
    if not hyp:
        return 1.0
    return float(jiwer.cer(ref, hyp) if language == "zh" else jiwer.wer(ref, hyp))

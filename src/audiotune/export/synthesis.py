"""Text → speech with an exported package: the LLM generates codes, the flow makes a mel, a vocoder a wave.

An Export directory holds ``llm/`` (a merged causal LM with its tokenizer and ``vocab.json``),
``flow/`` (the flow decoder, ``speakers.json`` / ``mel.json``) and ``audio_tokenizer/`` (to encode
a voice prompt); any of the two models may be missing in llm-only or flow-only exports, which
then cannot synthesize from text.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from audiotune.errors import AudiotuneError
from audiotune.export.generate import Sampling, generate_codes, prompt_ids
from audiotune.models.vocab import AudioVocab

log = logging.getLogger(__name__)


class SynthesisError(AudiotuneError):
    """The package cannot synthesize what was asked (missing model, unknown speaker, bad prompt)."""


@dataclass
class Speech:
    """One synthesized utterance."""

    wav: np.ndarray
    sample_rate: int
    codes: np.ndarray
    mel: np.ndarray

    @property
    def seconds(self) -> float:
        return len(self.wav) / self.sample_rate


class Synthesizer:
    """Loads an Export directory once and synthesizes texts.

    Args:
        package: Local Export directory (``llm/``, ``flow/``, ``audio_tokenizer/``).
        settings: :class:`audiotune.config.SynthesisSettings`.
        device: Torch device.
    """

    def __init__(self, package: str | Path, settings, device: str = "cpu"):
        from transformers import AutoTokenizer

        from audiotune.models.flow import load_flow
        from audiotune.models.lm import load_trained
        from audiotune.models.vocoder import load_vocoder

        self.package = Path(package)
        self.settings = settings
        self.device = torch.device(device)
        llm_dir, flow_dir = self.package / "llm", self.package / "flow"
        flow_file = flow_dir / ("flow.pt" if (flow_dir / "flow.pt").is_file() else "config.json")  # release or ours
        if not (llm_dir / "vocab.json").is_file() or not flow_file.is_file():
            missing = [n for n, d in (("llm", llm_dir), ("flow", flow_dir)) if not d.is_dir()]
            if missing:
                raise SynthesisError(f"{package} cannot synthesize from text: it has no {' or '.join(missing)} "
                                     f"(exported from a {'flow' if 'llm' in missing else 'llm'}-only run)")
            broken = [str(f) for f in (llm_dir / "vocab.json", flow_file) if not f.is_file()]
            raise SynthesisError(f"{package} is incomplete: {', '.join(broken)} missing; export it again")
        self.vocab = AudioVocab.from_dict(json.loads((llm_dir / "vocab.json").read_text()))
        self.tokenizer = AutoTokenizer.from_pretrained(str(llm_dir), trust_remote_code=False)
        self.llm, _ = load_trained(llm_dir, None, torch.float32)
        self.llm.to(self.device).eval()
        self.flow = load_flow(flow_dir).to(self.device).eval()
        flow_manifest = json.loads((flow_dir / "manifest.json").read_text()) if (flow_dir / "manifest.json").exists() \
            else {}
        self.mel_cfg = flow_manifest.get("mel") or json.loads((flow_dir / "mel.json").read_text())
        self.flow_codebooks = int(self.flow.config.num_codebooks)
        self.token_rate = float((flow_manifest.get("vocab") or {}).get("token_rate") or 25.0)
        self.vocoder = load_vocoder(settings.vocoder, self.mel_cfg)

    # ------------------------------------------------------------------------------------ speakers
    def _speaker(self, speaker: str | None) -> dict[str, Any]:
        kind = self.flow.config.speaker.type
        if kind == "none":
            return {}
        if kind == "id":
            table = json.loads((self.package / "flow" / "speakers.json").read_text())
            if speaker is None:
                speaker = next((name for name in table if name != "<unk>"), "<unk>")
            if speaker not in table:
                raise SynthesisError(f"unknown speaker {speaker!r}; this model knows: {', '.join(sorted(table))}")
            return {"speaker_index": int(table[speaker])}
        from safetensors.torch import load_file

        path = self.package / "flow" / "speaker_embeddings.safetensors"
        if not path.is_file():
            raise SynthesisError("the flow needs a speaker embedding and the package has no speaker_embeddings")
        means = load_file(str(path))
        if speaker is None:
            return {"speaker_embedding": torch.stack(list(means.values())).mean(0)}
        if speaker not in means:
            raise SynthesisError(f"unknown speaker {speaker!r}; this model knows: {', '.join(sorted(means))}")
        return {"speaker_embedding": means[speaker]}

    # ------------------------------------------------------------------------------------ prompts
    def _voice_prompt(self, wav_path: str | Path) -> tuple[np.ndarray, np.ndarray]:
        """Codes [C, F] and mel [n_mels, frames] of a voice prompt, aligned as in tokenize."""
        import soundfile as sf
        import soxr

        from audiotune.tokenization.audio_tokenizers import load_audio_tokenizer
        from audiotune.tokenization.mel import MelExtractor

        try:
            wav, sr = sf.read(str(wav_path), dtype="float32", always_2d=True)
        except (RuntimeError, OSError) as err:
            raise SynthesisError(f"cannot read the prompt audio {wav_path}: {err}") from None
        wav = wav.mean(axis=1)
        tokenizer_dir = self.package / "audio_tokenizer"
        if not tokenizer_dir.is_dir():
            raise SynthesisError(f"{self.package} has no audio_tokenizer/ to encode a voice prompt")
        codes = np.asarray(load_audio_tokenizer(tokenizer_dir).encode(wav, sr), dtype=np.int64)
        mel_x = MelExtractor(**{k: self.mel_cfg[k] for k in ("sample_rate", "n_fft", "hop_length", "win_length",
                                                             "n_mels", "fmin", "fmax", "center")})
        mel = mel_x(wav if sr == mel_x.sample_rate else soxr.resample(wav, sr, mel_x.sample_rate, quality="HQ"))
        frames = int(round(codes.shape[1] * self.flow.config.mel_frames_per_token))
        mel = mel[:frames] if len(mel) >= frames else np.concatenate([mel, np.repeat(mel[-1:], frames - len(mel), 0)])
        return codes, mel.T.astype(np.float32)

    # ------------------------------------------------------------------------------------ synthesis
    def synthesize(self, text: str, prompt_wav: str | Path | None = None, prompt_text: str | None = None,
                   speaker: str | None = None, seed: int | None = None) -> Speech:
        """Speech for ``text``, optionally in the voice of ``prompt_wav`` (whose transcript is ``prompt_text``)."""
        if not text.strip():
            raise SynthesisError("the text is empty")
        if prompt_wav is not None and not prompt_text:
            raise SynthesisError("a voice prompt needs its transcript (--prompt-text)")
        s = self.settings
        text_ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        prompt_codes = prompt_mel = None
        prompt_text_ids = None
        if prompt_wav is not None:
            prompt_codes, prompt_mel = self._voice_prompt(prompt_wav)
            prompt_text_ids = self.tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
        context, _ = prompt_ids(self.vocab, text_ids, prompt_text_ids, prompt_codes)
        longest = max(1, min(int(s.max_audio_s * self.token_rate), int(s.max_token_text_ratio * len(text_ids))))
        sampling = Sampling(temperature=s.temperature, top_k=s.top_k, seed=s.seed if seed is None else seed,
                            max_frames=longest, min_frames=min(longest, int(s.min_token_text_ratio * len(text_ids))))
        codes = generate_codes(self.llm, self.vocab, context, sampling, prompt_codes)
        if codes.shape[1] == 0:
            raise SynthesisError(f"the LLM generated no audio for {text!r}")
        flow_codes = torch.as_tensor(codes[: self.flow_codebooks], device=self.device)
        mel = self.flow.inference(
            flow_codes,
            prompt_codes=None if prompt_codes is None else torch.as_tensor(prompt_codes[: self.flow_codebooks]),
            prompt_mel=None if prompt_mel is None else torch.as_tensor(prompt_mel),
            n_timesteps=s.n_timesteps, cfg_rate=s.cfg_rate,
            generator=torch.Generator(device=self.device).manual_seed(sampling.seed), **self._speaker(speaker),
        )
        mel_np = mel.float().cpu().numpy()
        wav = np.asarray(self.vocoder(mel_np), dtype=np.float32).reshape(-1)
        return Speech(wav=wav, sample_rate=int(self.vocoder.sample_rate), codes=codes, mel=mel_np)


def write_wav(path: str | Path, speech: Speech) -> None:
    """Write 16-bit PCM WAV (peak-normalised to -1 dBFS when louder)."""
    import soundfile as sf

    wav = speech.wav
    peak = float(np.abs(wav).max()) if wav.size else 0.0
    if peak > 0.89:
        wav = wav * (0.89 / peak)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), wav, speech.sample_rate, subtype="PCM_16")

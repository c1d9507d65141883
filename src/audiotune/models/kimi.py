"""Kimi-Audio (``MoonshotKimiaForCausalLM``) through its own model code, with its Whisper encoder beside it.

A Kimi-Audio release folder holds the LM (``config.json`` with ``auto_map`` naming
``modeling_moonshot_kimia.py``, safetensors) and, in ``whisper-large-v3/``, the Whisper model whose
encoder turns audio into the continuous features the LM adds to its audio-code embeddings. The LM is a
Qwen2.5 decoder with two heads: ``lm_head`` on the last layer predicts the *text* stream, and
``mimo_output``, on its own ``mimo_layers`` branched from a middle layer, the *audio* stream. Its forward
takes the audio stream as ``input_ids``, the text stream as ``text_input_ids``, the Whisper features as
``whisper_input_feature`` (a list, one ``[1, L, 4·d_whisper]`` tensor per audio segment: four 50 Hz
encoder frames per 12.5 Hz position), ``is_continuous_mask`` (the positions between the media markers
that get them) and returns ``logits = (audio_logits, text_logits)``; its own ``vq_adaptor`` maps the
features to the hidden size. That code supports one sequence per call, so :class:`KimiAudioLM` calls it
once per sample of a batch (ZeRO-2/3 see ordinary modules: nothing is gathered by hand).

The loss is Kimi-Audio's fine-tuning loss: next-token cross entropy of each head over the positions its
loss mask keeps, each averaged over its own targets, summed. LoRA goes on every linear layer of the LM
but the heads, the audio adaptor (``vq_adaptor``, unless ``llm.lora.audio_adaptor``) and any Whisper
module; the Whisper encoder is frozen and never saved with an adapter. The adapter is saved for the LM
alone, so ``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, trust_remote_code=True),
adapter)`` loads it. Sequences are laid out by :mod:`audiotune.models.kimi_data`.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import ModelOutput

from audiotune.models.families import (
    ModelError,
    RemoteCode,
    RemoteCodeNotTrusted,
    _weight_names,
    read_config,
    register,
)
from audiotune.models.fingerprint import remote_code_files
from audiotune.models.vocab import IGNORE_INDEX, AudioVocab

log = logging.getLogger(__name__)

ARCHITECTURE = "MoonshotKimiaForCausalLM"
WHISPER_DIR = "whisper-large-v3"
NOT_ADAPTED = ("whisper", "mimo_output")  # the Whisper encoder and the audio head: never LoRA
ADAPTOR = "vq_adaptor"  # the audio adaptor: LoRA only with llm.lora.audio_adaptor


class KimiAudioError(ModelError):
    """A Kimi-Audio checkpoint or setting that cannot be used; the message names the file, key or value."""


@dataclass
class KimiOutput(ModelOutput):
    """Loss (audio + text), text logits, the audio head's logits, and the two parts of the loss."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    codebook_logits: tuple[torch.Tensor, ...] | None = None
    per_head_loss: tuple[torch.Tensor, ...] | None = None


def _masked_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of next-token cross entropies (labels aligned with the inputs) and the number of targets."""
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX,
                            reduction="sum")
    return total, (labels != IGNORE_INDEX).sum()


class KimiAudioLM(nn.Module):
    """Kimi-Audio's LM (its own code) and its frozen Whisper encoder, fed and trained as upstream does.

    Args:
        lm: The ``MoonshotKimiaForCausalLM`` loaded with its own code (or a PEFT model around it).
        whisper: transformers' ``WhisperEncoder`` of the release's ``whisper-large-v3/`` (None: no audio input).
        source: The folder it was loaded from (its code files and Whisper folder are copied on full saves).
        trust_remote_code: ``llm.trust_remote_code`` (needed again to read the Tokens' tokenizer).
    """

    def __init__(self, lm: nn.Module, whisper: nn.Module | None, source: Path, trust_remote_code: bool = True):
        super().__init__()
        self.lm, self.whisper, self.source, self.trust_remote_code = lm, whisper, Path(source), trust_remote_code
        if whisper is not None:
            whisper.requires_grad_(False)
            whisper.eval()
        self._warned = False

    @property
    def config(self):
        return self.lm.config

    @property
    def token_offset(self) -> int:
        offset = getattr(self.config, "kimia_token_offset", None)
        if not isinstance(offset, int):
            raise KimiAudioError(f"{self.source}/config.json: kimia_token_offset (the LM id of audio code 0) is "
                                 f"missing or not an integer ({offset!r})")
        return offset

    def get_input_embeddings(self) -> nn.Module:
        return self.lm.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module:
        return self.lm.get_output_embeddings()

    def resize_token_embeddings(self, *args, **kwargs):
        raise KimiAudioError(f"{self.source}: Kimi-Audio's vocabulary already holds every id its sequences use (text, "
                             "control tokens, audio codes at kimia_token_offset); tokenize with its own tokenizer "
                             "(--base-model) so that no row is added")

    def gradient_checkpointing_enable(self, **kwargs) -> None:
        if not getattr(self.lm, "supports_gradient_checkpointing", False):
            log.warning("%s: its code does not support gradient checkpointing; training without it", self.source)
            return
        self.lm.gradient_checkpointing_enable(**kwargs)

    # ------------------------------------------------------------------------------------------- features
    def whisper_features(self, mel: torch.Tensor) -> torch.Tensor:
        """[L, 4·d] features of one segment's stored log-mel [frames, n_mels] (see whisper_features)."""
        from audiotune.tokenization.whisper_features import FRAMES_PER_TOKEN, pad_window

        if self.whisper is None:
            raise KimiAudioError(f"{self.source} has no {WHISPER_DIR}/ Whisper model, so its audio segments get no "
                                 "continuous features; use the release folder as it was published")
        chunk = 2 * self.whisper.config.max_source_positions
        windows = list(torch.split(mel, chunk))
        padded = torch.stack([pad_window(w, chunk) for w in windows]).transpose(1, 2)  # [W, n_mels, chunk]
        dtype = next(self.whisper.parameters()).dtype
        with torch.no_grad():
            hidden = self.whisper(padded.to(dtype)).last_hidden_state  # [W, chunk / 2, d]
        kept = [hidden[i, :4 * (w.shape[0] // FRAMES_PER_TOKEN)] for i, w in enumerate(windows)]
        hidden = torch.cat(kept)
        return hidden.reshape(-1, 4 * hidden.shape[-1])

    def _fit(self, features: torch.Tensor, positions: int) -> torch.Tensor:
        if features.shape[0] != positions and not self._warned:
            self._warned = True
            log.warning("Kimi-Audio: a segment has %d audio codes but %d Whisper positions (12.5 Hz); the features "
                        "are cut or zero-padded to the codes (upstream requires equal counts)", positions,
                        features.shape[0])
        if features.shape[0] >= positions:
            return features[:positions]
        return torch.cat([features, features.new_zeros(positions - features.shape[0], features.shape[1])])

    # -------------------------------------------------------------------------------------------- forward
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                text_input_ids: torch.Tensor | None = None, is_continuous_mask: torch.Tensor | None = None,
                whisper_mel: torch.Tensor | None = None, whisper_frames: torch.Tensor | None = None,
                audio_labels: torch.Tensor | None = None, text_labels: torch.Tensor | None = None,
                **kwargs: Any) -> KimiOutput:
        """Both streams [B, T] (right-padded), the continuous mask, the log-mels [B, F, n_mels] and their frame
        counts; labels aligned with the inputs (``-100``: no loss). One call of the model's code per sample."""
        if kwargs.get("labels") is not None:
            raise KimiAudioError("Kimi-Audio learns from its two streams (audio_labels, text_labels), laid out by the "
                                 "llm stage; one-stream labels (e.g. the joint stage's) are not supported")
        B, T = input_ids.shape
        lengths = attention_mask.sum(1).tolist() if attention_mask is not None else [T] * B
        dtype = self.get_input_embeddings().weight.dtype
        audio_out, text_out = [], []
        sums = [input_ids.new_zeros((), dtype=torch.float32) for _ in range(2)]
        counts = [input_ids.new_zeros(()) for _ in range(2)]
        for b, n in enumerate(int(x) for x in lengths):
            call: dict[str, Any] = {"input_ids": input_ids[b:b + 1, :n],
                                    "attention_mask": torch.ones_like(input_ids[b:b + 1, :n]),
                                    "position_ids": torch.arange(n, device=input_ids.device)[None]}
            if text_input_ids is not None:
                call["text_input_ids"] = text_input_ids[b:b + 1, :n]
            if is_continuous_mask is not None and bool(is_continuous_mask[b, :n].any()):
                cont = is_continuous_mask[b:b + 1, :n]
                if whisper_mel is None or whisper_frames is None or int(whisper_frames[b]) == 0:
                    raise KimiAudioError("a sequence has continuous audio positions but no Whisper log-mel")
                features = self.whisper_features(whisper_mel[b, :int(whisper_frames[b])])
                call["whisper_input_feature"] = [self._fit(features, int(cont.sum())).to(dtype)[None]]
                call["is_continuous_mask"] = cont
            out = self.lm(**call, use_cache=False, return_dict=True)
            audio_logits, text_logits = out.logits  # the model's order: mimo_output (audio), lm_head (text)
            audio_out.append(F.pad(audio_logits, (0, 0, 0, T - n)))
            text_out.append(F.pad(text_logits, (0, 0, 0, T - n)))
            for h, (logits, labels) in enumerate(((audio_logits, audio_labels), (text_logits, text_labels))):
                if labels is not None:
                    total, count = _masked_sum(logits, labels[b:b + 1, :n])
                    sums[h], counts[h] = sums[h] + total, counts[h] + count
        loss, parts = None, None
        if audio_labels is not None or text_labels is not None:
            means = [s / c.clamp(min=1) for s, c in zip(sums, counts, strict=True)]
            loss, parts = means[0] + means[1], (means[0].detach(), means[1].detach())
        return KimiOutput(loss=loss, logits=torch.cat(text_out), codebook_logits=(torch.cat(audio_out),),
                          per_head_loss=parts)

    # --------------------------------------------------------------------------------------- the llm stage
    def load_examples(self, split_dir: Path, vocab: AudioVocab, layout: str, max_seq_len: int, overlong: str,
                      repeat: bool = True):
        """The llm stage's examples of a Tokens split, in Kimi-Audio's two streams (``overlong``: always drop)."""
        from transformers import AutoTokenizer

        from audiotune.models.kimi_data import load_kimi_examples, marker_ids, whisper_settings

        tokens_dir = Path(split_dir).parent
        self.check_tokens(tokens_dir)
        tokenizer = AutoTokenizer.from_pretrained(str(tokens_dir / "tokenizer"),
                                                  trust_remote_code=self.trust_remote_code)
        markers = marker_ids(tokenizer, str(tokens_dir / "tokenizer"))
        whisper_settings(tokens_dir)
        return load_kimi_examples(Path(split_dir), markers, self.token_offset, layout, max_seq_len, repeat)

    def check_tokens(self, tokens_dir: Path) -> None:
        """The Tokens' Whisper front end must be the one this encoder was trained on (mel bins, window)."""
        from audiotune.models.kimi_data import whisper_settings

        if self.whisper is None:
            return
        stored = whisper_settings(tokens_dir)
        mels, chunk = self.whisper.config.num_mel_bins, 2 * self.whisper.config.max_source_positions
        if int(stored["n_mels"]) != mels or int(stored["chunk_s"]) * 100 != chunk:
            raise KimiAudioError(
                f"{tokens_dir}: Whisper features of {stored['n_mels']} mel bins in {stored['chunk_s']} s windows, but "
                f"{self.source}/{WHISPER_DIR} takes {mels} bins in {chunk / 100:g} s windows "
                f"(set tokenize.whisper.n_mels={mels} and tokenize.whisper.chunk_s={chunk // 100})")

    @property
    def loss_fn(self):
        from audiotune.models.kimi_data import kimi_loss

        return kimi_loss

    # ------------------------------------------------------------------------------------- LoRA and saving
    def apply_lora(self, lora: Any, new_ids: list[int]) -> "KimiAudioLM":
        """LoRA on the LM's linear layers but the heads, Whisper and (unless asked) the audio adaptor."""
        from peft import get_peft_model

        from audiotune.models.lm import lora_config, upcast_trainable

        excluded = [*lora.exclude_modules, *NOT_ADAPTED, *([] if getattr(lora, "audio_adaptor", False) else [ADAPTOR])]
        config = lora_config(self.lm, lora.model_copy(update={"exclude_modules": excluded}), [])
        config.task_type = None  # a plain PeftModel: the model's code defines no generation hooks PEFT would need
        try:
            self.lm = get_peft_model(self.lm, config)
        except ValueError as err:
            raise KimiAudioError(f"LoRA cannot be applied to {self.source}: {err}") from None
        upcast_trainable(self)
        return self

    def attach_adapter(self, artifact: str | Path, trainable: bool = False) -> "KimiAudioLM":
        from peft import PeftModel

        self.lm = PeftModel.from_pretrained(self.lm, str(artifact), is_trainable=trainable)
        return self

    def merge_adapter(self) -> "KimiAudioLM":
        self.lm = self.lm.merge_and_unload()
        return self

    def save_pretrained(self, directory: str | Path, state_dict: dict[str, torch.Tensor] | None = None,
                        **kwargs: Any) -> None:
        """A LoRA LM: its adapter alone (PEFT layout); a full one: the release layout (:func:`save_kimi`)."""
        state = state_dict if state_dict is not None else self.state_dict()
        lm_state = {k[len("lm."):]: v for k, v in state.items() if k.startswith("lm.")}
        if hasattr(self.lm, "peft_config"):
            self.lm.save_pretrained(str(directory), state_dict=lm_state, **kwargs)
        else:
            save_kimi(self, directory, lm_state)


def save_kimi(model: KimiAudioLM, directory: str | Path, lm_state: dict[str, torch.Tensor] | None = None,
              max_shard_size: str = "5GB") -> None:
    """The release layout: the LM's config and weights, its code files, and the Whisper folder it came with."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.lm.save_pretrained(str(directory), state_dict=lm_state, max_shard_size=max_shard_size)
    for name in remote_code_files(model.source):
        shutil.copyfile(model.source / name, directory / name)
    if (model.source / WHISPER_DIR).is_dir() and not (directory / WHISPER_DIR).exists():
        shutil.copytree(model.source / WHISPER_DIR, directory / WHISPER_DIR)


def load_whisper_encoder(folder: Path, dtype: torch.dtype) -> nn.Module:
    """transformers' ``WhisperEncoder`` from a Whisper model folder (``encoder.*`` or ``model.encoder.*`` keys),
    strictly: every encoder weight must be there with its shape (decoder weights are not used)."""
    from safetensors import safe_open
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    files = sorted(folder.glob("*.safetensors"))
    if not (folder / "config.json").is_file() or not files:
        raise KimiAudioError(f"{folder}: a Whisper model folder needs config.json and *.safetensors weights")
    encoder = WhisperEncoder(WhisperConfig.from_pretrained(str(folder)))
    found: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                for prefix in ("model.encoder.", "encoder."):
                    if key.startswith(prefix):
                        found[key[len(prefix):]] = f.get_tensor(key)
    expected = encoder.state_dict()
    missing = sorted(set(expected) - set(found))
    shapes = sorted(k for k in set(expected) & set(found) if expected[k].shape != found[k].shape)
    if missing or shapes:
        raise KimiAudioError(f"{folder}: the Whisper encoder's weights do not load: missing {missing[:5]}, "
                             f"mis-shaped {shapes[:5]}")
    encoder.load_state_dict({k: found[k] for k in expected}, strict=True)
    return encoder.to(dtype).eval()


def load_kimi(path: Path, settings: Any, dtype: torch.dtype, attn: str) -> KimiAudioLM:
    """A Kimi-Audio folder as :class:`KimiAudioLM` (its code runs only with ``llm.trust_remote_code``)."""
    config = read_config(path)
    ref = (config.get("auto_map") or {}).get("AutoModelForCausalLM")
    trusted = bool(getattr(settings, "trust_remote_code", False))
    if not trusted:
        raise RemoteCodeNotTrusted(
            f"base model {path} is Kimi-Audio ({ARCHITECTURE}), whose model code ships with its weights "
            f"(auto_map: {ref}); audiotune runs it only with llm.trust_remote_code=true (read its .py files first)")
    if not ref:
        raise KimiAudioError(f"base model {path} is Kimi-Audio but its config.json names no code for "
                             "AutoModelForCausalLM (auto_map); use the release folder as it was published")
    lm = RemoteCode().load(path, settings, dtype, attn)
    if not hasattr(lm, "mimo_output"):
        raise KimiAudioError(f"base model {path}: {type(lm).__name__} has no audio head (mimo_output); not a "
                             "Kimi-Audio model")
    whisper_dir = path / WHISPER_DIR
    whisper = load_whisper_encoder(whisper_dir, dtype) if whisper_dir.is_dir() else None
    if whisper is None:
        log.warning("%s has no %s/: sequences with audio segments cannot be fed", path, WHISPER_DIR)
    adaptor_in = config.get("kimia_adaptor_input_dim")
    if whisper is not None and adaptor_in is not None and adaptor_in != 4 * whisper.config.d_model:
        raise KimiAudioError(f"{path}/config.json: kimia_adaptor_input_dim {adaptor_in} is not 4 × the Whisper "
                             f"encoder's d_model {whisper.config.d_model} ({whisper_dir}/config.json)")
    return KimiAudioLM(lm, whisper, path, trusted)


class KimiAudioFamily:
    """The base family of Kimi-Audio release folders (:mod:`audiotune.models.families`)."""

    name, priority = "kimi-audio", 100

    def detect(self, config: dict[str, Any], path: Path) -> bool:
        if ARCHITECTURE in (config.get("architectures") or []) or config.get("model_type") == "kimi_audio":
            return True
        return any("mimo_output" in key for key in _weight_names(path))

    def load(self, path: Path, settings: Any, dtype: torch.dtype, attn: str) -> KimiAudioLM:
        return load_kimi(Path(path), settings, dtype, attn)

    def save(self, model: nn.Module, directory: Path, max_shard_size: str = "5GB") -> None:
        if not isinstance(model, KimiAudioLM):
            raise KimiAudioError(f"{type(model).__name__} is not a Kimi-Audio model; cannot write it in its layout")
        save_kimi(model, directory, max_shard_size=max_shard_size)

    def fit_vocab(self, vocab: AudioVocab, path: Path, tokens: str) -> AudioVocab:
        """Audio ids at the checkpoint's ``kimia_token_offset`` (no rows are added)."""
        import dataclasses

        offset = read_config(Path(path)).get("kimia_token_offset")
        if not isinstance(offset, int):
            raise KimiAudioError(f"{path}/config.json: kimia_token_offset is missing or not an integer ({offset!r})")
        return dataclasses.replace(vocab, audio_offset=offset, extra={**vocab.extra, "audio_tokens": "offset"})


register(KimiAudioFamily())

"""MOSS-TTSD v0.7 checkpoints (``AsteroidTTSInstruct``) in the multi-codebook wrapper, and back out.

An AsteroidTTS release folder holds ``config.json`` (``model_type: qwen3`` plus ``channels``,
``speech_vocab_size``, ``speech_pad_token``, ``speech_token_range``) and ``model.safetensors``. Its
model is a Qwen3 decoder fed with the *sum* of ``channels`` embedding tables (channel 0: text and
speech ids of the LM vocabulary; channels 1..C-1: ``speech_vocab_size`` rows of raw codes, the last
one the pad) and read out by ``channels`` linear heads. That is :class:`MossTTSLM`, a
:class:`~audiotune.models.multicodebook.MultiCodebookLM` around transformers' own
``Qwen3ForCausalLM`` built from the same config (no remote code). Every tensor of the checkpoint has
one place, by this key map (``{k}`` = 1..C-1):

=============================================  ======================================================
AsteroidTTS key (``model.safetensors``)         :class:`MossTTSLM` key
=============================================  ======================================================
``model.embedding_list.0.weight``               ``backbone.model.embed_tokens.weight`` (channel 0)
``model.embedding_list.{k}.weight``             ``codebook_embeddings.{k-1}.weight``
``lm_heads.0.weight``                           ``backbone.lm_head.weight``
``lm_heads.{k}.weight``                         ``codebook_heads.{k-1}.weight``
``model.language_model.embed_tokens.weight``    ``language_model_embed_tokens`` (a buffer: upstream's
                                                forward never reads it, it is carried through as is)
``model.language_model.<rest>``                 ``backbone.model.<rest>`` (layers, norm)
=============================================  ======================================================

Loading is strict: a missing, unexpected or mis-shaped tensor is a :class:`MossCheckpointError`
listing them. Pad ids and row counts come from ``config.json``; :func:`moss_vocab` lays the
Tokens' vocabulary onto them (speech code c of channel 0 is ``speech_token_range[0] + c``, channels
1..C-1 hold raw codes, and ``speech_pad_token`` fills both the delay pattern's gaps and padding, as
upstream's ``shifting_inputs`` does: channel k is delayed by k steps). :func:`save_moss` writes the
same layout back: the same config fields, keys, shapes and dtypes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from audiotune.models.families import ModelError, register
from audiotune.models.multicodebook import MultiCodebookLM, default_codebook_weights
from audiotune.models.vocab import AudioVocab

log = logging.getLogger(__name__)

ARCHITECTURE = "AsteroidTTSInstruct"
FIELDS = ("channels", "speech_vocab_size", "speech_pad_token", "speech_token_range")
WEIGHTS_FILE = "model.safetensors"
_CARRIED = "language_model_embed_tokens"


class MossCheckpointError(ModelError):
    """An AsteroidTTS checkpoint (or Tokens for it) that cannot be used; the message names file, key and value."""


# ------------------------------------------------------------------------------------------------- config
@dataclass(frozen=True)
class MossSpec:
    """The AsteroidTTS fields of a ``config.json``, checked.

    Attributes:
        channels: C, codebooks per step (embedding tables and heads).
        vocab_size: Rows of channel 0 (text and speech ids).
        speech_vocab_size: Rows of channels 1..C-1.
        speech_pad_token: Pad (and delay filler) id of channels 1..C-1.
        speech_token_range: ``[start, end)`` of the speech ids of channel 0.
        pad_token_id: Pad id of channel 0.
    """

    channels: int
    vocab_size: int
    speech_vocab_size: int
    speech_pad_token: int
    speech_token_range: tuple[int, int]
    pad_token_id: int | None

    @property
    def codebook_size(self) -> int:
        """Codes per codebook (the width of ``speech_token_range``)."""
        return self.speech_token_range[1] - self.speech_token_range[0]

    @classmethod
    def from_config(cls, config: dict[str, Any], file: str | Path) -> "MossSpec":
        """Read and check the fields; raises :class:`MossCheckpointError` naming the bad one."""
        def integer(key: str, value: Any = None) -> int:
            value = config.get(key) if value is None else value
            if isinstance(value, bool) or not isinstance(value, int):
                raise MossCheckpointError(f"{file}: {key} must be an integer, got {value!r}")
            return value

        missing = [k for k in (*FIELDS, "vocab_size", "hidden_size") if k not in config]
        if missing:
            raise MossCheckpointError(f"{file}: an AsteroidTTS config needs {', '.join(missing)}")
        rng = config["speech_token_range"]
        if not isinstance(rng, list | tuple) or len(rng) != 2:
            raise MossCheckpointError(f"{file}: speech_token_range must be [start, end], got {rng!r}")
        spec = cls(channels=integer("channels"), vocab_size=integer("vocab_size"),
                   speech_vocab_size=integer("speech_vocab_size"), speech_pad_token=integer("speech_pad_token"),
                   speech_token_range=(integer("speech_token_range", rng[0]), integer("speech_token_range", rng[1])),
                   pad_token_id=config.get("pad_token_id"))
        if spec.channels < 1:
            raise MossCheckpointError(f"{file}: channels must be ≥ 1, got {spec.channels}")
        if not 0 <= spec.speech_pad_token < spec.speech_vocab_size:  # upstream's padding row must exist
            raise MossCheckpointError(f"{file}: speech_pad_token {spec.speech_pad_token} must be a row of "
                                      f"speech_vocab_size {spec.speech_vocab_size}")
        return spec

    def check_codes(self, file: str | Path) -> None:
        """What training on codes needs beyond what loading does: channel 0 holds every code of
        ``speech_token_range``, and channels 1..C-1 hold the same codes below their pad row."""
        start, end = self.speech_token_range
        if not 0 <= start < end <= self.vocab_size:
            raise MossCheckpointError(f"{file}: speech_token_range [{start}, {end}] must lie in [0, vocab_size "
                                      f"{self.vocab_size}) and be non-empty")
        if self.speech_pad_token < self.codebook_size:
            raise MossCheckpointError(
                f"{file}: speech_pad_token {self.speech_pad_token} is one of the codes 0..{self.codebook_size - 1} "
                f"that speech_token_range [{start}, {end}] gives channel 0; channels 1..C-1 need a pad row no code "
                "uses")


def read_config(path: str | Path) -> dict[str, Any]:
    """``config.json`` of a model folder as a dict."""
    file = Path(path) / "config.json"
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError) as err:
        raise MossCheckpointError(f"{file}: cannot read it ({err})") from None


def is_moss_config(config: dict[str, Any]) -> bool:
    """Whether a ``config.json`` describes an AsteroidTTS (MOSS-TTSD v0.7) model."""
    return ARCHITECTURE in (config.get("architectures") or []) or all(k in config for k in FIELDS)


# ------------------------------------------------------------------------------------------------- model
class MossTTSLM(MultiCodebookLM):
    """A MOSS-TTSD AsteroidTTS model as a multi-codebook LM (see the module docstring for the key map).

    Args:
        backbone: ``Qwen3ForCausalLM`` built from the AsteroidTTS config (channel 0 table and head).
        spec: The checkpoint's AsteroidTTS fields.
        config: The whole ``config.json``, written back unchanged but for the vocabulary size and dtype.
        weights: Loss weight of every channel (default MOSS-TTSD's fine-tuning weights 8,2,1,…).
    """

    extra_pretrained = True  # the channel tables and heads come with the checkpoint: LoRA leaves them frozen

    def __init__(self, backbone: nn.Module, spec: MossSpec, config: dict[str, Any],
                 weights: list[float] | None = None):
        super().__init__(backbone, spec.channels, spec.codebook_size,
                         weights or default_codebook_weights(spec.channels),
                         codebook_rows=spec.speech_vocab_size, padding_idx=spec.speech_pad_token)
        self.spec, self.native_config = spec, dict(config)
        hidden = backbone.config.hidden_size
        self.register_buffer(_CARRIED, torch.zeros(spec.vocab_size, hidden))

    def save_pretrained(self, directory: str | Path, state_dict: dict[str, torch.Tensor] | None = None,
                        **kwargs) -> None:
        """A LoRA backbone: the adapter (and the channel tables and heads only if they were trained: frozen, they
        are the base's); a plain one: the AsteroidTTS layout (:func:`save_moss`)."""
        if not hasattr(self.backbone, "peft_config"):
            save_moss(self, directory, state_dict)
        elif any(p.requires_grad for p in self.extra_parameters()):
            super().save_pretrained(directory, state_dict=state_dict, **kwargs)
        else:
            state = state_dict if state_dict is not None else self.state_dict()
            self.backbone.save_pretrained(str(directory), **kwargs, state_dict={
                k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")})

    def resize_token_embeddings(self, rows: int, mean_resizing: bool = True) -> nn.Module:
        """Grow channel 0 (table and head) to ``rows`` for new tokens; the carried table follows."""
        out = self.backbone.resize_token_embeddings(rows, mean_resizing=mean_resizing)
        resize_carried(self)
        return out


def key_map(channels: int) -> dict[str, str]:
    """AsteroidTTS key → :class:`MossTTSLM` key, for the keys that are not a plain prefix swap."""
    mapping = {"model.embedding_list.0.weight": "backbone.model.embed_tokens.weight",
               "lm_heads.0.weight": "backbone.lm_head.weight",
               "model.language_model.embed_tokens.weight": _CARRIED}
    for k in range(1, channels):
        mapping[f"model.embedding_list.{k}.weight"] = f"codebook_embeddings.{k - 1}.weight"
        mapping[f"lm_heads.{k}.weight"] = f"codebook_heads.{k - 1}.weight"
    return mapping


def to_ours(key: str, channels: int) -> str | None:
    """The :class:`MossTTSLM` key of an AsteroidTTS key (None for a key of no known place)."""
    mapped = key_map(channels).get(key)
    if mapped is not None:
        return mapped
    if key.startswith("model.language_model.") and not key.startswith("model.language_model.embed_tokens"):
        return "backbone.model." + key[len("model.language_model."):]
    return None


def to_native(key: str, channels: int) -> str:
    """The AsteroidTTS key of a :class:`MossTTSLM` key."""
    inverse = {ours: native for native, ours in key_map(channels).items()}
    if key in inverse:
        return inverse[key]
    if key.startswith("backbone.model."):
        return "model.language_model." + key[len("backbone.model."):]
    raise MossCheckpointError(f"{key} has no place in the AsteroidTTS layout")


def _strict_problems(found: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]]) -> list[str]:
    def listed(names: list[str]) -> str:
        return ", ".join(names[:5]) + (f" … ({len(names)} in all)" if len(names) > 5 else "")

    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    shapes = sorted(f"{k} {list(found[k])} (expected {list(expected[k])})" for k in set(found) & set(expected)
                    if tuple(found[k]) != tuple(expected[k]))
    return [f"{title} {listed(names)}" for title, names in
            (("missing", missing), ("unexpected", unexpected), ("mis-shaped", shapes)) if names]


def _no_init():
    """transformers' context that skips random weight init (the checkpoint overwrites every weight)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers
        from transformers.modeling_utils import no_init_weights
    return no_init_weights()


def _weight_files(path: Path) -> list[Path]:
    """``model.safetensors``, or the shards a ``model.safetensors.index.json`` names."""
    if (path / WEIGHTS_FILE).is_file():
        return [path / WEIGHTS_FILE]
    index = path / (WEIGHTS_FILE + ".index.json")
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, AttributeError) as err:
            raise MossCheckpointError(f"{index}: not a safetensors index ({err})") from None
        missing = [s for s in shards if not (path / s).is_file() or "/" in s or s.startswith(".")]
        if missing:
            raise MossCheckpointError(f"{index} names shards that are not in {path}: {', '.join(missing[:3])}")
        return [path / s for s in shards]
    raise MossCheckpointError(f"{path}: no {WEIGHTS_FILE} (nor its index of shards); an AsteroidTTS checkpoint "
                              "keeps its weights there")


def load_moss(path: str | Path, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa",
              weights: list[float] | None = None) -> MossTTSLM:
    """Load an AsteroidTTS folder into a :class:`MossTTSLM`, strictly.

    Args:
        path: Folder with ``config.json`` and ``model.safetensors`` (or its shards and their index).
        dtype: Weight dtype.
        attn_implementation: Attention kernel of the Qwen3 decoder (``eager``, ``sdpa``, ``flash_attention_2``).
        weights: Loss weight of every channel.

    Raises:
        MossCheckpointError: A bad config field, or tensors missing, unexpected or of another shape.
    """
    from safetensors import safe_open
    from transformers import Qwen3Config, Qwen3ForCausalLM

    path = Path(path)
    config = read_config(path)
    spec = MossSpec.from_config(config, path / "config.json")
    files = _weight_files(path)
    qwen = Qwen3Config.from_dict({k: v for k, v in config.items() if k not in ("architectures", "auto_map")})
    qwen.tie_word_embeddings, qwen.use_cache = False, False
    qwen._attn_implementation = attn_implementation
    with _no_init():
        backbone = Qwen3ForCausalLM(qwen)
        model = MossTTSLM(backbone, spec, config, weights)
    expected = {to_native(k, spec.channels): tuple(v.shape) for k, v in model.state_dict().items()}
    native: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            native.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118 (safe_open is not a mapping)
    problems = _strict_problems({k: tuple(v.shape) for k, v in native.items()}, expected)
    if problems:
        where = files[0] if len(files) == 1 else f"{path} ({len(files)} safetensors shards)"
        raise MossCheckpointError(f"{where} does not fit an AsteroidTTS model of its config.json: "
                                  + "; ".join(problems) + " (use the config.json that came with these weights)")
    ours = {to_ours(k, spec.channels): v for k, v in native.items()}
    model.load_state_dict(ours, strict=True)
    model.to(dtype)
    log.info("loaded AsteroidTTS %s: %d channels, %d + %d×%d rows, %d tensors", path, spec.channels,
             spec.vocab_size, spec.channels - 1, spec.speech_vocab_size, len(native))
    return model


def native_state(model: MossTTSLM, state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The AsteroidTTS state dict of ``model`` (contiguous CPU tensors), every key mapped."""
    state = state_dict if state_dict is not None else model.state_dict()
    out = {to_native(k, model.num_codebooks): v.detach().contiguous().cpu() for k, v in state.items()}
    rows = out["model.embedding_list.0.weight"].shape[0]
    carried = out["model.language_model.embed_tokens.weight"]
    if carried.shape[0] < rows:  # channel 0 grew for new tokens: the unused table keeps the config's row count
        extra = carried.float().mean(dim=0, keepdim=True).expand(rows - carried.shape[0], -1).to(carried.dtype)
        out["model.language_model.embed_tokens.weight"] = torch.cat([carried, extra]).contiguous()
    return out


def save_moss(model: MossTTSLM, directory: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Write ``model`` in the AsteroidTTS layout: ``config.json`` (the loaded one, with the vocabulary size
    and dtype of these weights) and ``model.safetensors`` (upstream's keys)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = native_state(model, state_dict)
    config = dict(model.native_config)
    rows = tensors["model.embedding_list.0.weight"].shape[0]
    if rows != config.get("vocab_size"):
        config["vocab_size"] = rows
    dtype = str(tensors["lm_heads.0.weight"].dtype).replace("torch.", "")
    for key in ("dtype", "torch_dtype"):
        if key in config:
            config[key] = dtype
    save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def resize_carried(model: MossTTSLM) -> None:
    """Keep the carried ``model.language_model.embed_tokens`` as long as channel 0 after its resizing."""
    rows = model.get_input_embeddings().weight.shape[0]
    carried = getattr(model, _CARRIED)
    if carried.shape[0] < rows:
        extra = carried.mean(dim=0, keepdim=True).expand(rows - carried.shape[0], -1)
        setattr(model, _CARRIED, torch.cat([carried, extra]))
    model.native_config["vocab_size"] = rows


# ------------------------------------------------------------------------------------------------- Tokens
def moss_vocab(vocab: AudioVocab, spec: MossSpec, base: str | Path = "the MOSS checkpoint",
               tokens: str | Path = "the Tokens") -> AudioVocab:
    """The Tokens' vocabulary laid onto an AsteroidTTS checkpoint's ids.

    Channel 0 speech ids start at ``speech_token_range[0]``; channels 1..C-1 use ``speech_pad_token``
    as delay filler and padding. The codebook count and size must be the checkpoint's.

    Raises:
        MossCheckpointError: Another number of codebooks or codes, or segment markers inside the speech ids.
    """
    spec.check_codes(Path(base) / "config.json")
    if vocab.num_codebooks != spec.channels:
        raise MossCheckpointError(f"{base} has {spec.channels} channels (config.json channels) but the Tokens "
                                  f"{tokens} hold {vocab.num_codebooks} codebooks per frame "
                                  "(tokenize.audio_tokenizer.num_codebooks); they must match")
    if vocab.codebook_size != spec.codebook_size:
        raise MossCheckpointError(f"{base} has {spec.codebook_size} codes per codebook (config.json "
                                  f"speech_token_range {list(spec.speech_token_range)}) but the Tokens {tokens} have "
                                  f"{vocab.codebook_size} (tokenize.audio_tokenizer.codebook_size)")
    start, end = spec.speech_token_range
    clash = sorted(name for name, i in vocab.special_ids.items() if start <= i < end)
    if clash:
        raise MossCheckpointError(f"{tokens}: the segment markers {clash[:3]} of the text tokenizer fall inside the "
                                  f"speech ids [{start}, {end}) of {base}; tokenize with the "
                                  "checkpoint's own tokenizer (--base-model)")
    extra = {**vocab.extra, "filler_id": spec.speech_pad_token, "channel_pad_id": spec.speech_pad_token,
             "codebook_rows": spec.speech_vocab_size, "audio_tokens": "offset"}  # speech ids are the base's rows
    return dataclasses.replace(vocab, audio_offset=start, extra=extra)


# ------------------------------------------------------------------------------------------------- family
class MossFamily:
    """The base family of MOSS-TTSD v0.7 checkpoints (:mod:`audiotune.models.families`)."""

    name, priority = "moss-asteroid-tts", 50

    def detect(self, config: dict[str, Any], path: Path) -> bool:
        return is_moss_config(config)

    def load(self, path: Path, settings: Any, dtype: torch.dtype, attn: str) -> MossTTSLM:
        weights = getattr(settings, "codebook_weights", None)
        channels = MossSpec.from_config(read_config(path), Path(path) / "config.json").channels
        if weights is not None and len(weights) != channels:
            raise MossCheckpointError(f"llm.codebook_weights has {len(weights)} entries; {path} has {channels} "
                                      "channels (config.json channels)")
        return load_moss(path, dtype, attn, weights)

    def save(self, model: nn.Module, directory: Path, max_shard_size: str = "5GB") -> None:
        if not isinstance(model, MossTTSLM):
            raise MossCheckpointError(f"{type(model).__name__} is not a MOSS-TTSD model; cannot write it as "
                                      "AsteroidTTS")
        save_moss(model, directory)  # one file, as the release (max_shard_size does not apply)

    def fit_vocab(self, vocab: AudioVocab, path: Path, tokens: str) -> AudioVocab:
        """The Tokens' vocabulary on this checkpoint's ids (:func:`moss_vocab`)."""
        return moss_vocab(vocab, MossSpec.from_config(read_config(path), Path(path) / "config.json"), path, tokens)


register(MossFamily())

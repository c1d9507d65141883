"""Causal LMs for the llm stage: a Hugging Face base or a size preset, audio rows, LoRA.

- :func:`build_lm` loads any ``AutoModelForCausalLM`` from a local directory (safetensors only),
  or builds one from a named :data:`PRESETS` config with random weights, makes room for the
  audio codes and segment markers (:mod:`audiotune.models.vocab`), and wraps it in a
  :class:`~audiotune.models.multicodebook.MultiCodebookLM` when frames have several codebooks.
- :func:`apply_lora` puts PEFT LoRA adapters on it; the rows of tokens the base never had (markers,
  appended audio codes) are trained through PEFT's ``trainable_token_indices`` in the input
  embedding and, when untied, the output head.
- The base it loads is fingerprinted (:mod:`audiotune.models.fingerprint`), so the export stage can
  refuse to merge an adapter into another base.
- :func:`load_trained` reloads an LLM model artifact (adapter on its base, or the full model).
"""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from audiotune.models.families import ModelError, check_base_dir, load_model, recorded_settings  # noqa: F401 (re-exported)
from audiotune.models.fingerprint import code_mismatch, fingerprint_checkpoint, remote_code_files
from audiotune.models.multicodebook import (
    CODEBOOKS_CONFIG,
    MultiCodebookLM,
    attach_adapter,
    default_codebook_weights,
)
from audiotune.models.vocab import AudioVocab

log = logging.getLogger(__name__)

EMBED_ROW_MULTIPLE = 64  # resized vocabularies are padded to this for tensor-core friendly shapes


_SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=4096)
PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    # Tiny models for tests and the demo.
    "tiny-qwen2": ("qwen2", dict(_SMALL)),
    "tiny-llama": ("llama", dict(_SMALL)),
    # "SimpleTransformer-like": d_model 768, 12 layers, 12 heads. Its plain FFN of 3072 becomes a SwiGLU FFN of
    # 2048 (= 2/3 x 3072, the LLaMA rule), the same ~85M parameters in the blocks.
    "85m": ("llama", dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                          num_key_value_heads=12, max_position_embeddings=4096)),
    # Qwen2-0.5B's shape (benchmarks, GPU checks).
    "qwen2-0.5b": ("qwen2", dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                 num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768)),
}


def preset_config(name: str, vocab_size: int, attn_implementation: str):
    """A transformers config for preset ``name`` with ``vocab_size`` rows."""
    from transformers import AutoConfig

    if name not in PRESETS:
        raise ModelError(f"llm.preset: unknown preset {name!r} (expected one of {', '.join(PRESETS)})")
    model_type, dims = PRESETS[name]
    return AutoConfig.for_model(model_type, vocab_size=vocab_size, tie_word_embeddings=False,
                                attn_implementation=attn_implementation, use_cache=False, **dims)


def resolve_attention(name: str) -> str:
    """``auto`` → flash_attention_2 when the package is installed and a GPU is present, else sdpa."""
    has_flash = importlib.util.find_spec("flash_attn") is not None
    if name == "auto":
        return "flash_attention_2" if has_flash and torch.cuda.is_available() else "sdpa"
    if name == "flash_attention_2" and not (has_flash and torch.cuda.is_available()):
        raise ModelError("llm.attn_implementation=flash_attention_2 needs the flash-attn package and a CUDA GPU; "
                         "use auto or sdpa")
    return name


def _padded(n: int) -> int:
    return -(-n // EMBED_ROW_MULTIPLE) * EMBED_ROW_MULTIPLE


def load_base(path: str | Path, dtype: torch.dtype, attn_implementation: str, settings: Any = None):
    """Load a base causal LM from a local directory with its family (:mod:`audiotune.models.families`), strictly:
    weights that do not load are an error listing them. ``settings`` is the ``llm`` section
    (``trust_remote_code``); None means the defaults."""
    return load_model(Path(path), settings, dtype, attn_implementation)


def build_lm(settings, vocab: AudioVocab, base_path: str | Path | None, dtype: torch.dtype,
             base_text_size: int | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """The model the llm stage trains.

    Args:
        settings: The ``llm`` config section (``init``, ``preset``, ``attn_implementation``, ``audio_tokens``,
            ``codebook_weights``, ``train.gradient_checkpointing``).
        vocab: The vocabulary layout (text + markers + audio codes).
        base_path: Local directory of the base model (``init: pretrained``).
        dtype: Weight dtype to load or build with.
        base_text_size: Tokens the base tokenizer had before the segment markers were added.

    Returns:
        The model and facts about it: ``base_vocab_size`` (embedding rows of the base),
        ``embedding_rows`` (after resizing), ``new_token_ids`` (ids the base never trained),
        ``attn_implementation``, ``fingerprint`` (of the base checkpoint, pretrained only).
    """
    attn = resolve_attention(settings.attn_implementation)
    info: dict[str, Any] = {"attn_implementation": attn}
    if settings.init == "scratch":
        from transformers import AutoModelForCausalLM

        rows = _padded(vocab.lm_vocab_size)
        config = preset_config(settings.preset, rows, attn)
        config.pad_token_id, config.eos_token_id, config.bos_token_id = vocab.pad_id, vocab.eos_id, None
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        info.update(base_vocab_size=0, embedding_rows=rows, new_token_ids=[])
    else:
        if base_path is None:
            raise ModelError("llm.init=pretrained needs a base model")
        model = load_base(base_path, dtype, attn, settings)
        info["attn_implementation"] = getattr(model.config, "_attn_implementation", None) or attn  # remote code
        base_rows = embedding_rows(model)
        info.update(base_vocab_size=base_rows, fingerprint=fingerprint_checkpoint(base_path))
        audio_tokens = vocab.extra.get("audio_tokens", settings.audio_tokens)  # a base family may fix it
        if audio_tokens == "offset" and vocab.audio_offset + vocab.codebook_size > base_rows:
            raise ModelError(
                f"llm.audio_token_offset={vocab.audio_offset}: audio ids up to "
                f"{vocab.audio_offset + vocab.codebook_size - 1} do not fit the base model's {base_rows} embedding "
                f"rows; check the offset and the audio tokenizer's codebook_size ({vocab.codebook_size})")
        rows = base_rows
        if vocab.lm_vocab_size > base_rows:
            rows = _padded(vocab.lm_vocab_size)
            resize_embeddings(model, rows, rows_trained=settings.mode != "lora" or settings.lora.train_new_tokens)
            log.info("embedding rows %d -> %d for %d segment markers and audio codes", base_rows, rows,
                     rows - base_rows)
        info["embedding_rows"] = rows
        info["new_token_ids"] = new_token_ids(vocab, base_text_size if base_text_size is not None else base_rows,
                                              audio_tokens, rows if rows > base_rows else None)
    model.config.use_cache = False
    if vocab.num_codebooks > 1 and not isinstance(model, MultiCodebookLM):  # a family may build the wrapper
        weights = settings.codebook_weights or default_codebook_weights(vocab.num_codebooks)
        if len(weights) != vocab.num_codebooks:
            raise ModelError(f"llm.codebook_weights has {len(weights)} entries; the Tokens have "
                             f"{vocab.num_codebooks} codebooks")
        model = MultiCodebookLM(model, vocab.num_codebooks, vocab.codebook_size, weights)
        model.to(dtype)
    if settings.train.gradient_checkpointing:
        backbone = model.backbone if isinstance(model, MultiCodebookLM) else model
        backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, info


def embedding_rows(model: nn.Module) -> int:
    """Rows of the input embedding (its full size under ZeRO-3, where the local tensor is an empty partition)."""
    weight = model.get_input_embeddings().weight
    return int(getattr(weight, "ds_shape", weight.shape)[0])


def new_rows_trained(manifest: dict[str, Any]) -> bool:
    """Whether an LLM artifact's rows added to the base vocabulary were trained (and saved) or left untrained."""
    lora = (manifest.get("config") or {}).get("lora") or {}
    return manifest.get("mode") != "lora" or bool(lora.get("train_new_tokens", True))


def resize_embeddings(model: nn.Module, rows: int, rows_trained: bool, mean_resizing: bool = True) -> None:
    """Grow the input embedding and the output head to ``rows``.

    Rows that training updates (``rows_trained``) start from transformers' mean resizing and are saved
    with the artifact. Rows a LoRA run leaves untrained (``llm.lora.train_new_tokens: false``) are set to
    the mean of the base's rows instead: not random, so an export or reload rebuilds exactly the rows
    the adapter was trained with, from the base alone.
    """
    old = embedding_rows(model)
    if old == rows:
        return
    model.resize_token_embeddings(rows, mean_resizing=mean_resizing and rows_trained)
    if rows_trained:
        return
    import contextlib

    from transformers.integrations import is_deepspeed_zero3_enabled

    weights = [model.get_input_embeddings().weight]
    head = getattr(model.get_output_embeddings(), "weight", None)
    if head is not None and head is not weights[0]:
        weights.append(head)
    gathered = contextlib.nullcontext()
    if is_deepspeed_zero3_enabled():  # the weights are partitioned across ranks: edit them whole, from rank 0
        import deepspeed

        gathered = deepspeed.zero.GatheredParameters(weights, modifier_rank=0)
    with gathered, torch.no_grad():
        for weight in weights:
            weight[old:] = weight[:old].mean(dim=0, keepdim=True)


def new_token_ids(vocab: AudioVocab, base_text_size: int, audio_tokens: str, rows: int | None = None) -> list[int]:
    """LM ids the base model never trained: the segment markers, appended audio codes, and the rows added
    only to round the embedding up (no token uses them, but their logits enter every softmax: trained and
    saved with the adapter, they come back exactly at export instead of as a new random init)."""
    top = max(vocab.lm_vocab_size, rows or 0)
    ids = set(range(base_text_size, top)) | {i for i in vocab.special_ids.values() if i >= base_text_size}
    if audio_tokens == "offset":
        ids -= set(range(vocab.audio_offset, vocab.audio_offset + vocab.codebook_size))
    return sorted(ids)


def linear_module_names(model: nn.Module) -> list[str]:
    """Distinct last name components of the linear layers LoRA can target (output heads excluded)."""
    heads = {id(m) for m in _heads(model)}
    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
             if isinstance(module, nn.Linear) and id(module) not in heads}
    return sorted(names)


def _heads(model: nn.Module) -> list[nn.Module]:
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [out] if out is not None else []


def _module_name(model: nn.Module, module: nn.Module) -> str:
    for name, candidate in model.named_modules():
        if candidate is module:
            return name.rsplit(".", 1)[-1]
    raise ModelError(f"module {type(module).__name__} not found in the model")


def lora_config(model: nn.Module, lora, new_ids: list[int]):
    """A PEFT LoraConfig for ``model``; target modules that match nothing are refused, naming what exists."""
    from peft import LoraConfig

    available = linear_module_names(model)
    exclude = None
    if lora.exclude_modules:
        exclude = ".*(?:" + "|".join(f"(?:{p})" for p in lora.exclude_modules) + ").*"
    targets = lora.target_modules
    if targets != "all-linear":
        missing = [t for t in targets if t not in available and not any(
            name.endswith(f".{t}") or name == t for name, m in model.named_modules() if isinstance(m, nn.Linear))]
        if missing:
            raise ModelError(f"llm.lora.target_modules {missing} match no linear layer of the model; "
                             f"its linear layers are: {', '.join(available)}")
    token_indices = None
    if lora.train_new_tokens and new_ids:
        embed = model.get_input_embeddings()
        token_indices = {_module_name(model, embed): list(new_ids)}
        head = model.get_output_embeddings()
        tied = head is not None and head.weight is embed.weight
        if head is not None and not tied:
            token_indices[_module_name(model, head)] = list(new_ids)
    return LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
        target_modules=targets, exclude_modules=exclude, use_rslora=lora.use_rslora, use_dora=lora.use_dora,
        trainable_token_indices=token_indices, task_type="CAUSAL_LM",
    )


def apply_lora(model: nn.Module, lora, new_ids: list[int]) -> nn.Module:
    """Put LoRA adapters (and trainable rows for new tokens) on ``model``; every other base weight is frozen.

    A :class:`MultiCodebookLM` gets its adapters on the backbone; its extra codebook tables and heads are
    new and stay fully trainable. Every trainable parameter is fp32 (optimizer states and updates too), even
    when the frozen base is bf16.
    """
    from peft import get_peft_model

    if hasattr(model, "apply_lora"):  # a family's model that places its own adapters (Kimi-Audio)
        return model.apply_lora(lora, new_ids)
    if isinstance(model, MultiCodebookLM):
        model.backbone = apply_lora(model.backbone, lora, new_ids)
        for p in model.extra_parameters():  # new tables train fully; a family's pretrained ones stay frozen
            p.requires_grad_(not model.extra_pretrained)
        upcast_trainable(model)
        return model
    config = lora_config(model, lora, new_ids)
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as err:  # e.g. exclude_modules that remove every target
        raise ModelError(f"LoRA cannot be applied: {err}") from None
    upcast_trainable(peft_model)
    return peft_model


def upcast_trainable(model: nn.Module) -> None:
    """Make every trainable floating-point parameter fp32, in place (frozen ones keep their dtype)."""
    for p in model.parameters():
        if p.requires_grad and p.is_floating_point() and p.dtype != torch.float32:
            p.data = p.data.float()


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------------------------ reloading
def load_trained(artifact: str | Path, base_path: str | Path | None, dtype: torch.dtype = torch.float32,
                 trainable: bool = False, attn_implementation: str = "sdpa") -> tuple[nn.Module, dict[str, Any]]:
    """Reload an LLM model artifact: the full model, or the base with the adapter (LoRA) on top.

    Args:
        artifact: Local directory of an ``audiotune.llm`` artifact.
        base_path: Local directory of the base model (LoRA artifacts only).
        dtype: Weight dtype.
        trainable: Keep the adapter trainable (the joint stage continues training it).
        attn_implementation: Attention kernel.

    Returns:
        The model and the artifact's manifest.

    The base (or the full model) is loaded by its family with the settings the artifact was trained with
    (``llm.trust_remote_code`` among them); a full model's own code files must be the ones hashed at training.
    """
    artifact = Path(artifact)
    manifest_file = artifact / "manifest.json"  # an exported llm/ folder has none: a full model
    manifest = json.loads(manifest_file.read_text()) if manifest_file.exists() else {"mode": "full"}
    settings = recorded_settings(manifest)
    multi = (artifact / CODEBOOKS_CONFIG).exists()
    if manifest.get("mode") == "lora":
        if base_path is None:
            raise ModelError(f"{artifact} holds a LoRA adapter; the base model it was trained on is needed")
        model = load_base(base_path, dtype, attn_implementation, settings)
        rows = int(manifest.get("embedding_rows") or model.get_input_embeddings().weight.shape[0])
        resize_embeddings(model, rows, new_rows_trained(manifest), mean_resizing=False)
        model = attach_adapter(model, artifact, trainable)  # on the backbone of a family-built wrapper
    else:
        check_code_unchanged(artifact, manifest.get("base_fingerprint") or {})
        model = load_base(artifact, dtype, attn_implementation, settings)
    model.config.use_cache = False
    if multi and not isinstance(model, MultiCodebookLM):
        model = MultiCodebookLM.from_saved(model, artifact)
        model.to(dtype)
    if trainable and manifest.get("mode") != "lora":
        for p in model.parameters():
            p.requires_grad_(True)
    if trainable and manifest.get("mode") == "lora":
        upcast_trainable(model)  # the adapter, and a multi-codebook model's tables and heads, train in fp32
    return model, manifest


def check_code_unchanged(directory: Path, fingerprint: dict[str, Any]) -> None:
    """Refuse a model folder whose own code files differ from those hashed in ``fingerprint`` at training."""
    problems = code_mismatch(fingerprint.get("remote_code") or {}, remote_code_files(directory)) \
        if fingerprint.get("remote_code") else []
    if problems:
        raise ModelError(f"{directory}: " + "; ".join(problems) + " — the model's own code is not the code it was "
                         "trained with; restore the files it was trained with")

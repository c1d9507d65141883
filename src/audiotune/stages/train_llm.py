"""The llm stage: a Tokens artifact (+ a base causal LM) → an LLM model artifact.

Recipe: read the Tokens → lay out the vocabulary → build the model (base or scratch
preset, audio rows appended) → LoRA or full → examples, token-budget batches,
packing → the engine (accelerate/DeepSpeed, checkpoints, exact resume) → save the
adapter or full model with the tokenizer, the base fingerprint and the metrics →
publish → track.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer

from audiotune import artifacts, publish, storage
from audiotune.config import AudiotuneConfig
from audiotune.errors import TrainingError
from audiotune.models.vocab import AudioVocab, audio_token_settings, vocab_for_tokens
from audiotune.tokenization.text import check_base_tokenizer
from audiotune.train import checkpoints
from audiotune.train.engine import Engine, check_dropped, decay_groups, seed_everything
from audiotune.train.kimi_batches import batches_class_for
from audiotune.train.llm_export import write_llm_files
from audiotune.train.objectives import llm_loss
from audiotune.train.recipe import Run, fit, history_values, mean, publish_on_main, start_run, tracked

log = logging.getLogger(__name__)


class TrainLLMError(TrainingError):
    """The llm stage cannot start (bad inputs or settings)."""


@dataclass
class TrainResult:
    """What the stage produced."""

    output: str
    metrics: dict[str, Any]
    manifest: dict[str, Any] | None


def _vocab(tokens_dir: Path, manifest: dict[str, Any], cfg) -> tuple[Any, AudioVocab, int]:
    tokenizer = AutoTokenizer.from_pretrained(str(tokens_dir / "tokenizer"),
                                              trust_remote_code=cfg.llm.trust_remote_code)
    base_text_size = len(tokenizer)
    vocab = vocab_for_tokens(tokenizer, manifest.get("audio_tokenizer"), cfg.llm.audio_tokens,
                             cfg.llm.audio_token_offset, cfg.llm.prompt_format)
    return tokenizer, vocab, base_text_size


def _check_tokenizer(tokens: str, manifest: dict[str, Any], tokenizer, base_path: str,
                     trust_remote_code: bool = False) -> None:
    """A pretrained base must see the ids of its own tokenizer."""
    kind = (manifest.get("text_tokenizer") or {}).get("kind")
    try:
        base_tok = AutoTokenizer.from_pretrained(base_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        if kind in ("bpe", "char"):
            raise TrainLLMError(f"{tokens} was tokenized with a {kind} tokenizer trained on the data, and the base "
                                f"model {base_path} has no tokenizer to check it against; re-run tokenize with "
                                f"--base-model {base_path}, or train from scratch (llm.init=scratch)") from None
        log.warning("base model %s has no tokenizer; cannot check it against the Tokens' tokenizer", base_path)
        return
    theirs, ours = base_tok.get_vocab(), tokenizer.get_vocab()
    differ = [t for t, i in theirs.items() if ours.get(t) != i]
    if differ:
        raise TrainLLMError(f"{tokens}: the Tokens' text tokenizer ({kind}) differs from the base model's "
                            f"({len(differ)} of {len(theirs)} tokens differ, e.g. {differ[:3]}); re-run tokenize "
                            f"with --base-model {base_path}")


def _fit_vocab(vocab: AudioVocab, base_path: Path, tokens: str) -> AudioVocab:
    """The vocabulary on the base's own ids, where its family fixes them (MOSS-TTSD: speech ids and pads from
    its config.json); unchanged otherwise."""
    from audiotune.models.families import family_for

    fit = getattr(family_for(base_path), "fit_vocab", None)
    return fit(vocab, base_path, tokens) if fit is not None else vocab


@dataclass
class _Inputs:
    tokens: str
    base_model: str | None
    manifest: dict[str, Any]
    tokens_dir: Path | None = None
    tokenizer: Any = None
    vocab: AudioVocab | None = None
    base_text_size: int = 0
    base_path: str | None = None


@dataclass
class _Model:
    model: Any
    info: dict[str, Any]
    base_fp: dict[str, Any]
    trainable: int
    total: int


@dataclass
class _Data:
    train: list
    val: list
    train_stats: dict[str, Any]
    val_stats: dict[str, Any]
    packing: bool
    train_batches: Any
    val_batches: Any


def train_llm(cfg: AudiotuneConfig, tokens: str, output: str, base_model: str | None = None) -> TrainResult:
    """Run the llm stage (every torchrun process calls this; rank 0 publishes).

    Args:
        cfg: The pipeline config; the ``llm`` section drives this stage.
        tokens: URI of a Tokens artifact.
        output: URI for the LLM model artifact.
        base_model: Base model URI (overrides ``llm.base_model``).
    """
    cfg, inputs = _read_inputs(cfg, tokens, output, base_model or cfg.llm.base_model)
    run = start_run(cfg, cfg.llm.train, [output], "llm", f"{tokens} -> {output}")  # lease released by tracked
    inputs = _setup_inputs(cfg, inputs)
    seed_everything(cfg.run.seed)
    built = _setup_model(cfg, inputs, run)
    data = _setup_data(cfg, inputs, built, run)
    with tracked(cfg, run, "llm") as (tracker, work):
        _log_params(cfg, data, built, tracker)
        engine = Engine(
            train=cfg.llm.train, accelerator=run.accelerator, model=built.model,
            param_groups=decay_groups(list(built.model.named_parameters()), cfg.llm.train.lr,
                                      cfg.llm.train.weight_decay, "llm"),
            loss_fn=getattr(built.model, "loss_fn", llm_loss), train_data=data.train_batches,
            val_data=data.val_batches, output=output, tracker=tracker, work_dir=work, seed=cfg.run.seed,
            identity=_identity(cfg, inputs.manifest, built.base_fp))
        state, state_dict = fit(engine)
        metrics = _final_metrics(state, data.train_stats, data.val_stats)
        manifest = publish_on_main(run, tracker, metrics, lambda: _publish(
            cfg, output, inputs, built, data, run.accelerator.unwrap_model(engine.model), state, state_dict,
            metrics, tracker))
    return TrainResult(output=output, metrics=metrics, manifest=manifest)


def _read_inputs(cfg: AudiotuneConfig, tokens: str, output: str,
                 base_model: str | None) -> tuple[AudiotuneConfig, _Inputs]:
    """Refuse a bad start before any work; the config with the audio-id settings the Tokens fix (a copy)."""
    L = cfg.llm
    if L.init == "pretrained" and not base_model:
        raise TrainLLMError("llm.init is 'pretrained' but no base model was given (--base-model or llm.base_model); "
                            "use llm.init=scratch to train from a size preset")
    publish.require_missing_or_overwrite(output, L.overwrite, artifacts.LLM, [tokens, base_model])
    manifest = artifacts.read_manifest(tokens, artifacts.TOKENS, artifacts.TOKENS_VERSION)
    try:  # Tokens of LM ids (tokenize.audio_tokenizer.codebook_offsets) say where the audio ids live
        mode, offset = audio_token_settings(manifest.get("audio_tokenizer"), L.audio_tokens, L.audio_token_offset)
    except ValueError as err:
        raise TrainLLMError(f"{tokens}: {err}") from None
    if (mode, offset) != (L.audio_tokens, L.audio_token_offset):
        L = L.model_copy(update={"audio_tokens": mode, "audio_token_offset": offset})
        cfg = cfg.model_copy(update={"llm": L})
    return cfg, _Inputs(tokens=tokens, base_model=base_model, manifest=manifest)


def _setup_inputs(cfg: AudiotuneConfig, inputs: _Inputs) -> _Inputs:
    """Fetch the Tokens, lay out the vocabulary and check a pretrained base against the Tokens' tokenizer."""
    from audiotune.models.lm import check_base_dir

    L, tokens = cfg.llm, inputs.tokens
    tokens_dir = storage.local_copy(tokens)
    artifacts.verify_shards(tokens_dir, inputs.manifest, tokens)
    tokenizer, vocab, base_text_size = _vocab(tokens_dir, inputs.manifest, cfg)
    base_path = str(storage.local_copy(inputs.base_model)) if L.init == "pretrained" else None
    if base_path is not None:
        check_base_dir(Path(base_path))
        check_base_tokenizer(Path(base_path), inputs.base_model, cfg.tokenize.max_base_tokenizer_mb,
                             cfg.tokenize.max_base_vocab)
        _check_tokenizer(tokens, inputs.manifest, tokenizer, base_path, L.trust_remote_code)
        vocab = _fit_vocab(vocab, Path(base_path), tokens)
    return dataclasses.replace(inputs, tokens_dir=tokens_dir, tokenizer=tokenizer, vocab=vocab,
                               base_text_size=base_text_size, base_path=base_path)


def _setup_model(cfg: AudiotuneConfig, inputs: _Inputs, run: Run) -> _Model:
    """The base (or a scratch preset) with the audio rows appended, its fingerprint, LoRA or full training."""
    from audiotune.models.fingerprint import fingerprint_model
    from audiotune.models.lm import apply_lora, build_lm, count_parameters

    L = cfg.llm
    load_dtype = torch.bfloat16 if (run.dtype == "bf16" and L.mode == "lora") else torch.float32
    model, info = build_lm(L, inputs.vocab, inputs.base_path, load_dtype, inputs.base_text_size)
    base_fp = info.get("fingerprint") or fingerprint_model(model)
    if L.mode == "lora":
        model = apply_lora(model, L.lora, info["new_token_ids"])
    trainable, total = count_parameters(model)
    log.info("parameters: %d trainable of %d", trainable, total)
    return _Model(model=model, info=info, base_fp=base_fp, trainable=trainable, total=total)


def _setup_data(cfg: AudiotuneConfig, inputs: _Inputs, built: _Model, run: Run) -> _Data:
    """The examples of both splits in the layout, their drops checked, and their token-budget batches."""
    from audiotune.train.llm_data import load_examples, resolve_packing

    L, T, acc, vocab, tokens = cfg.llm, cfg.llm.train, run.accelerator, inputs.vocab, inputs.tokens
    own_examples = getattr(built.model, "load_examples", None)  # Kimi-Audio (fed more than ids) lays out its own
    packing = False if own_examples else resolve_packing(T.packing, built.info["attn_implementation"])
    load = own_examples or load_examples
    train_ex, train_stats = load(inputs.tokens_dir / "train", vocab, L.layout, L.max_seq_len, L.overlong)
    val_ex, val_stats = load(inputs.tokens_dir / "val", vocab, L.layout, L.max_seq_len, L.overlong, repeat=False)
    for split, stats in (("train", train_stats), ("val", val_stats)):
        check_dropped(f"{tokens} {split}", stats["rows"], stats["dropped_overlong"],
                      f"longer than llm.max_seq_len={L.max_seq_len}", "llm.train.max_drop_fraction",
                      T.max_drop_fraction, "raise llm.max_seq_len, set llm.overlong=truncate")
    if not train_ex:
        raise TrainLLMError(f"{tokens}: no training sequences for layout {L.layout!r} ({train_stats})")
    batches = batches_class_for(train_ex)  # Kimi-Audio's two-stream examples have batches of their own
    train_data = batches(train_ex, vocab, T, cfg.run.seed, acc.process_index, acc.num_processes, packing)
    val_data = batches(val_ex, vocab, T, cfg.run.seed, acc.process_index, acc.num_processes, packing,
                       shuffle=False) if val_ex else None
    return _Data(train=train_ex, val=val_ex, train_stats=train_stats, val_stats=val_stats, packing=packing,
                 train_batches=train_data, val_batches=val_data)


def _log_params(cfg: AudiotuneConfig, data: _Data, built: _Model, tracker) -> None:
    tracker.log_params({"llm": cfg.llm.model_dump(mode="json"), "run": cfg.run.model_dump(mode="json")})
    tracker.log_params({"data.train_sequences": len(data.train), "data.val_sequences": len(data.val),
                        "data.packing": data.packing, "model.trainable_parameters": built.trainable,
                        "model.total_parameters": built.total,
                        "data.dropped_overlong": data.train_stats.get("dropped_overlong", 0),
                        "data.truncated": data.train_stats.get("truncated", 0)})


def _publish(cfg: AudiotuneConfig, output: str, inputs: _Inputs, built: _Model, data: _Data, model, state,
             state_dict: dict, metrics: dict[str, Any], tracker) -> dict[str, Any]:
    """The LLM artifact: the adapter or full model, tokenizer, vocabulary, fingerprint, run files, manifest."""
    L, info = cfg.llm, built.info
    with publish.publish_dir(output, overwrite=L.overwrite, kind=artifacts.LLM,
                             inputs=[inputs.tokens, inputs.base_model]) as staging:
        write_llm_files(staging, model, state_dict, L.mode, inputs.tokenizer, inputs.vocab, built.base_fp, metrics,
                        state.history, tracker)
        return artifacts.write_manifest(
            staging, artifacts.LLM, artifacts.LLM_VERSION,
            tokens=inputs.tokens, base_model=inputs.base_model, init=L.init,
            preset=L.preset if L.init == "scratch" else None, mode=L.mode, base_fingerprint=built.base_fp,
            vocab=inputs.vocab.to_dict(), packing=data.packing, embedding_rows=info["embedding_rows"],
            base_vocab_size=info["base_vocab_size"], new_token_ids=len(info["new_token_ids"]),
            attn_implementation=info["attn_implementation"], trainable_parameters=built.trainable,
            total_parameters=built.total, checkpoints=checkpoints.checkpoints_uri(output), steps=state.step,
            dataset_fingerprint=inputs.manifest.get("dataset_fingerprint"), metrics=metrics,
            config=L.model_dump(mode="json"),
        )


def _identity(cfg: AudiotuneConfig, manifest: dict[str, Any], base_fp: dict[str, Any]) -> dict[str, Any]:
    """What a checkpoint's run must share with this one to be resumed: the llm settings (the base by its
    fingerprint rather than its URI), the seed, the Tokens (their dataset and how it was tokenized)."""
    tokens = {k: manifest.get(k) for k in ("text_tokenizer", "audio_tokenizer", "splits", "config")}
    return checkpoints.run_identity(
        "llm", cfg.llm.model_dump(mode="json"), free=("base_model",), seed=cfg.run.seed,
        dataset_fingerprint=manifest.get("dataset_fingerprint"), base_checksum=base_fp.get("checksum"),
        tokens=hashlib.blake2b(json.dumps(tokens, sort_keys=True).encode(), digest_size=16).hexdigest(),
    )


def _final_metrics(state, train_stats: dict, val_stats: dict) -> dict[str, Any]:
    losses = [h["loss"] for h in state.history if "loss" in h]
    vals = [h["val_loss"] for h in state.history if "val_loss" in h]
    return {
        "steps": state.step,
        "tokens_per_s": mean(history_values(state.history, "tokens_per_s")),
        "samples_per_s": mean(history_values(state.history, "samples_per_s")),
        "peak_memory_mb": max((h["peak_memory_mb"] for h in state.history if "peak_memory_mb" in h), default=None),
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        "val_loss": vals[-1] if vals else None,
        "best_val_loss": state.best_val_loss,
        "best_step": state.best_step,
        "train_sequences": train_stats.get("rows"),
        "dropped_overlong": train_stats.get("dropped_overlong", 0),
        "truncated": train_stats.get("truncated", 0),
        "val_sequences": val_stats.get("rows"),
        "val_dropped_overlong": val_stats.get("dropped_overlong", 0),
        "val_truncated": val_stats.get("truncated", 0),
    }


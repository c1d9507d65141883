"""The trained LLM as it is published: everything of an LLM model artifact but its manifest.

The llm and joint stages both call it (the flow's counterpart: :mod:`audiotune.train.flow_export`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from audiotune.models.vocab import AudioVocab
from audiotune.train.recipe import write_run_files


def write_llm_files(staging: Path, model, state_dict: dict, mode: str, tokenizer, vocab: AudioVocab,
                    base_fp: dict[str, Any], metrics: dict[str, Any], history: list[dict], tracker) -> None:
    """Everything of an LLM model artifact but its manifest: the adapter (LoRA) or full model in Hugging Face
    layout, the tokenizer with the segment markers, the vocabulary layout, the base fingerprint, metrics,
    history and loss curve (the last two also logged to the stage's MLflow run)."""
    save_kwargs = {"save_embedding_layers": False} if mode == "lora" else {}
    model.save_pretrained(str(staging), state_dict=state_dict, **save_kwargs)
    tokenizer.save_pretrained(str(staging))
    (staging / "vocab.json").write_text(json.dumps(vocab.to_dict(), indent=2) + "\n")
    (staging / "base_fingerprint.json").write_text(json.dumps(base_fp, indent=2) + "\n")
    write_run_files(staging, metrics, history, tracker)

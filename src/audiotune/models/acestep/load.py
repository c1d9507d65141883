"""Load the parts of a diffusers ``AceStepPipeline`` folder a stage needs (nothing else is read)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from audiotune.models.acestep import AceStepError

log = logging.getLogger(__name__)

PIPELINE_CLASS = "AceStepPipeline"
REQUIRED = ("transformer", "condition_encoder", "vae", "text_encoder", "tokenizer", "scheduler")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_folder(base_model: str | Path) -> Path:
    """A local ``AceStepPipeline`` folder: ``model_index.json`` naming the pipeline and every component.

    Raises:
        AceStepError: No folder, no ``model_index.json``, another pipeline class (e.g. an ACE-Step v1
            checkpoint, which diffusers does not load), or a missing component folder.
    """
    root = Path(base_model)
    index = root / "model_index.json"
    if not index.is_file():
        raise AceStepError(f"{root}: not a diffusers pipeline folder (model_index.json is missing); ACE-Step 1.5 "
                           "in diffusers' layout is expected (ACE-Step v1 checkpoints have no maintained loader)")
    try:
        meta = json.loads(index.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise AceStepError(f"{index}: unreadable ({err})") from None
    if meta.get("_class_name") != PIPELINE_CLASS:
        raise AceStepError(f"{index}: _class_name is {meta.get('_class_name')!r}, expected {PIPELINE_CLASS!r}")
    missing = [name for name in REQUIRED if not (root / name).is_dir()]
    if missing:
        raise AceStepError(f"{root}: component folder(s) {missing} missing")
    return root


def load_pipeline(base_model: str | Path, dtype: str = "fp32", transformer=None):
    """The whole ``AceStepPipeline`` (optionally around a transformer being trained)."""
    from diffusers import AceStepPipeline

    root = check_folder(base_model)
    extra = {"transformer": transformer} if transformer is not None else {}
    pipe = AceStepPipeline.from_pretrained(str(root), dtype=DTYPES[dtype], **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_transformer(base_model: str | Path, dtype: str = "fp32"):
    """The diffusion transformer alone (what the LoRA trains)."""
    from diffusers import AceStepTransformer1DModel

    root = check_folder(base_model)
    return AceStepTransformer1DModel.from_pretrained(str(root), subfolder="transformer", dtype=DTYPES[dtype])

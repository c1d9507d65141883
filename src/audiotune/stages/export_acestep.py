"""The ACE-Step export stage: an ACE-Step LoRA artifact → an export verified against ``AceStepPipeline``.

Recipe: read the LoRA artifact → load the base pipeline and ``load_lora_weights`` the LoRA (every tensor must
be taken) → copy ``lora/`` (diffusers' format) and, with ``acestep.fuse``, save the pipeline with the LoRA
fused under ``pipeline/`` → manifest → publish.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from typing import Any

from audiotune import artifacts, publish, storage

log = logging.getLogger(__name__)

KIND = "audiotune.acestep-export"
VERSION = 1


@dataclass
class ExportResult:
    """What the stage produced."""

    output: str
    manifest: dict[str, Any]


def export_acestep(cfg, model: str, output: str, base_model: str | None = None) -> ExportResult:
    """Verify and package an ACE-Step LoRA.

    Args:
        cfg: The pipeline config (the ``acestep`` section).
        model: URI of an ACE-Step LoRA artifact (``train acestep``).
        output: URI of the export.
        base_model: The ``AceStepPipeline`` folder; default the one the LoRA was trained on.
    """
    from audiotune.models.acestep.load import load_pipeline
    from audiotune.models.acestep.lora import KIND as LORA_KIND
    from audiotune.models.acestep.lora import VERSION as LORA_VERSION
    from audiotune.models.acestep.lora import WEIGHT_NAME, fuse_and_save, load_into

    a = cfg.acestep
    manifest = artifacts.read_manifest(model, LORA_KIND, LORA_VERSION)
    base_model = base_model or a.base_model or manifest.get("base_model")
    publish.require_missing_or_overwrite(output, a.overwrite, KIND, [model, base_model])
    model_dir, base_dir = storage.local_copy(model), storage.local_copy(base_model)
    with publish.publish_dir(output, overwrite=a.overwrite, kind=KIND, inputs=[model, base_model]) as staging:
        shutil.copytree(model_dir / "lora", staging / "lora")
        pipe = load_pipeline(base_dir)
        if a.fuse:
            fuse_and_save(pipe, staging / "lora", staging / "pipeline")
        else:
            load_into(pipe, staging / "lora")  # the check: diffusers takes every tensor
        result = artifacts.write_manifest(
            staging, KIND, VERSION, model=model, base_model=base_model, lora=f"lora/{WEIGHT_NAME}",
            fused="pipeline" if a.fuse else None, steps=manifest.get("steps"), metrics=manifest.get("metrics"))
    log.info("exported ACE-Step LoRA %s -> %s%s", model, output, " (fused pipeline too)" if a.fuse else "")
    return ExportResult(output=output, manifest=result)

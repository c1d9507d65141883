"""The trained flow as it is published: the trained (or EMA) weights, LoRA merged, in its own layout.

Our flow: ``config.json`` + ``model.safetensors``. A release flow (CosyVoice / Step-Audio-EditX):
``flow.pt`` + its yaml + ``hift.pt`` in the upstream layout, plus ``model.safetensors`` (see
:func:`audiotune.models.flow.native.release.save_release`). The flow and joint stages both call it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from audiotune.config import FlowStageConfig


def lora_targets(model, F: FlowStageConfig) -> list[str]:
    """``flow.lora.target_modules``; at its default, a release flow's own attention and feed-forward layers."""
    from audiotune.config.training import FLOW_LORA_TARGETS
    from audiotune.models.flow.native.fit import lora_targets as targets

    return targets(model, F.lora.target_modules, FLOW_LORA_TARGETS)


def release_summary(config) -> dict[str, Any] | None:
    """What a release flow's yaml said (for manifests); None for our own flow."""
    release = getattr(config, "release", None)
    return release.summary() if release is not None else None


def export_flow_model(config, state_dict: dict, F: FlowStageConfig, ema, staging: Path):
    """The plain flow to save: the trained weights (EMA when enabled), LoRA merged; written to ``staging``
    (a release flow: ``flow.pt`` + its yaml + ``hift.pt`` in the upstream layout, and ``model.safetensors``)."""
    from audiotune.models.flow import (
        FlowModel,
        apply_lora,
        load_state_dict_strict,
        lora_estimator,
        merge_lora,
        save_flow,
    )

    release = getattr(config, "release", None)
    if release is not None:
        from audiotune.models.flow.native.adapter import build_release_flow

        export = build_release_flow(config)
    else:
        export = FlowModel(config)
    if F.lora.enabled:
        export = apply_lora(export, F.lora.r, F.lora.alpha, F.lora.dropout, lora_targets(export, F))
    load_state_dict_strict(export, {k: v.detach().float().cpu() for k, v in state_dict.items()}, "trained flow")
    if ema is not None:
        ema.copy_to(export)
    if F.lora.enabled and F.lora.save_adapter:
        lora_estimator(export).save_pretrained(str(staging / "adapter"))
    export = merge_lora(export).eval()
    if release is not None:
        import json

        from audiotune.models.flow.native.adapter import SETTINGS_FILE
        from audiotune.models.flow.native.release import save_release

        save_release(export.native, release, staging)
        (staging / SETTINGS_FILE).write_text(json.dumps(config.settings(), indent=2) + "\n")
    else:
        save_flow(export, staging)
    return export

"""The conditional flow-matching token→mel decoder (CosyVoice family).

Public API::

    FlowConfig, tiny_config, base_config, PRESETS       # architecture + flow-matching settings
    FlowModel, tiny, base, training_draws               # the model, its builders, its per-example draws
    save_flow, load_flow, FlowLoadError                 # config.json + model.safetensors, strict loading
    freeze_encoder, apply_lora, merge_lora, EMA         # fine-tuning options
"""

from audiotune.models.flow.adapt import (
    DEFAULT_LORA_TARGETS,
    EMA,
    FlowModelError,
    apply_lora,
    freeze_encoder,
    has_lora,
    merge_lora,
)
from audiotune.models.flow.config import (
    PRESETS,
    EncoderConfig,
    EstimatorConfig,
    FlowConfig,
    FlowConfigError,
    SpeakerSpec,
    base_config,
    tiny_config,
)
from audiotune.models.flow.io import (
    FlowLoadError,
    load_flow,
    load_state_dict_strict,
    read_flow_config,
    save_flow,
    state_dict_problems,
)
from audiotune.models.flow.model import FlowModel, base, cosine_schedule, count_parameters, tiny, training_draws

__all__ = [
    "DEFAULT_LORA_TARGETS", "EMA", "PRESETS", "EncoderConfig", "EstimatorConfig", "FlowConfig", "FlowConfigError",
    "FlowLoadError", "FlowModel", "FlowModelError", "SpeakerSpec", "apply_lora", "base", "base_config",
    "cosine_schedule", "count_parameters", "freeze_encoder", "has_lora", "load_flow", "load_state_dict_strict",
    "merge_lora", "read_flow_config", "save_flow", "state_dict_problems", "tiny", "tiny_config",
    "training_draws",
]

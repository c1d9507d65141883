"""The conditional flow-matching token→mel decoder (CosyVoice family).

Public API::

    FlowConfig, tiny_config, base_config, PRESETS       # architecture + flow-matching settings
    FlowModel, tiny, base, training_draws               # the model, its builders, its per-example draws
    save_flow, load_flow, FlowLoadError                 # config.json + model.safetensors (or a release folder)
    freeze_encoder, apply_lora, merge_lora              # fine-tuning options (the EMA: audiotune.train.ema)

Release flows (CosyVoice-300M, CosyVoice2, Step-Audio-EditX: yaml + ``flow.pt``) are built natively in
:mod:`audiotune.models.flow.native`; ``load_flow`` returns them as a ``ReleaseFlow`` with the same API.
"""

from audiotune.models.flow.adapt import (
    DEFAULT_LORA_TARGETS,
    FlowModelError,
    apply_lora,
    default_lora_targets,
    freeze_encoder,
    has_lora,
    lora_estimator,
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
    "DEFAULT_LORA_TARGETS", "PRESETS", "EncoderConfig", "EstimatorConfig", "FlowConfig", "FlowConfigError",
    "FlowLoadError", "FlowModel", "FlowModelError", "SpeakerSpec", "apply_lora", "base", "base_config",
    "cosine_schedule", "count_parameters", "default_lora_targets", "freeze_encoder", "has_lora", "load_flow",
    "load_state_dict_strict", "lora_estimator", "merge_lora", "read_flow_config", "save_flow", "state_dict_problems",
    "tiny", "tiny_config", "training_draws",
]

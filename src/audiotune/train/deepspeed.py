"""DeepSpeed ZeRO configuration: generated from the stage settings, or a user's JSON checked against them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from audiotune.config import TrainSettings


class DeepSpeedConfigError(ValueError):
    """A user's DeepSpeed JSON disagrees with the stage settings."""


def generate(train: TrainSettings, dtype: str) -> dict[str, Any]:
    """A ZeRO config for ``train.deepspeed`` (batch sizes come from the engine: token-budget batches)."""
    ds = train.deepspeed
    zero: dict[str, Any] = {
        "stage": ds.zero_stage,
        "overlap_comm": False,
        "contiguous_gradients": True,
        "reduce_bucket_size": 5e7,
    }
    if ds.zero_stage == 3:
        zero.update({"stage3_gather_16bit_weights_on_model_save": True, "stage3_param_persistence_threshold": 1e4})
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": False}
    return {
        "zero_optimization": zero,
        "gradient_accumulation_steps": train.grad_accum,
        "gradient_clipping": train.max_grad_norm,
        "train_micro_batch_size_per_gpu": 1,
        "bf16": {"enabled": dtype == "bf16"},
        "fp16": {"enabled": dtype == "fp16"},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "wall_clock_breakdown": False,
    }


def _get(cfg: dict[str, Any], dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def check_user_config(user: dict[str, Any], train: TrainSettings, dtype: str, origin: str) -> dict[str, Any]:
    """Refuse a user JSON whose keys contradict the stage settings; name every disagreeing key."""
    expected = generate(train, dtype)
    keys = ["zero_optimization.stage", "gradient_accumulation_steps", "gradient_clipping", "bf16.enabled",
            "fp16.enabled"]
    problems = []
    for key in keys:
        found = _get(user, key)
        if found is None or (isinstance(found, str) and found == "auto"):
            continue
        if found != _get(expected, key):
            problems.append(f"{key}={found!r} (stage settings say {_get(expected, key)!r})")
    if train.deepspeed.offload_optimizer != (_get(user, "zero_optimization.offload_optimizer.device") == "cpu") \
            and _get(user, "zero_optimization.offload_optimizer") is not None:
        problems.append("zero_optimization.offload_optimizer disagrees with deepspeed.offload_optimizer")
    if problems:
        raise DeepSpeedConfigError(f"{origin} disagrees with the stage settings: " + "; ".join(problems))
    merged = dict(user)
    for key in ("gradient_accumulation_steps", "gradient_clipping", "train_micro_batch_size_per_gpu"):
        if merged.get(key) in (None, "auto"):
            merged[key] = expected[key]
    return merged


def resolve(train: TrainSettings, dtype: str) -> dict[str, Any] | None:
    """The DeepSpeed config to use, or None for plain DDP / one process."""
    ds = train.deepspeed
    if ds.config_file:
        path = Path(ds.config_file)
        try:
            user = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise DeepSpeedConfigError(f"cannot read DeepSpeed config {path}: {err}") from None
        return check_user_config(user, train, dtype, str(path))
    if ds.zero_stage == 0:
        return None
    return generate(train, dtype)


def deepspeed_plugin(train: TrainSettings, dtype: str):
    """An accelerate DeepSpeedPlugin for these settings, or None."""
    config = resolve(train, dtype)
    if config is None:
        return None
    from accelerate import DeepSpeedPlugin

    return DeepSpeedPlugin(hf_ds_config=config)

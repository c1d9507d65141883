"""DeepSpeed ZeRO configuration: generated from the stage settings, or a user's JSON checked against them."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from audiotune.config import TrainSettings
from audiotune.errors import TrainingError

log = logging.getLogger(__name__)
GATHER_ON_SAVE = "stage3_gather_16bit_weights_on_model_save"


class DeepSpeedConfigError(TrainingError, ValueError):
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


def _offloaded(user: dict[str, Any], block: str) -> tuple[bool, str]:
    """Whether the user's ``zero_optimization.<block>`` offloads (a device other than none), and what it says."""
    node = _get(user, f"zero_optimization.{block}")
    if node is None:
        return False, "absent"
    device = node.get("device") if isinstance(node, dict) else node
    return device not in (None, "none"), f"device={device!r}"


def check_user_config(user: dict[str, Any], train: TrainSettings, dtype: str, origin: str) -> dict[str, Any]:
    """Refuse a user JSON whose keys contradict the stage settings, naming every disagreeing key.

    Keys the JSON leaves out (or sets to ``auto``) are filled from the settings: batch sizes, clipping, the
    bf16/fp16 blocks (from ``train.dtype``: accelerate would otherwise leave bf16 off and train in fp32), and
    under ZeRO-3 ``zero_optimization.stage3_gather_16bit_weights_on_model_save`` (the stage saves the full
    weights at the end; DeepSpeed refuses to without it).
    """
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
    for block, setting in (("offload_optimizer", train.deepspeed.offload_optimizer),
                           ("offload_param", train.deepspeed.offload_params)):
        offloads, found = _offloaded(user, block)
        if offloads != setting:
            name = "offload_params" if block == "offload_param" else block
            problems.append(f"zero_optimization.{block} ({found}) disagrees with deepspeed.{name}="
                            f"{str(setting).lower()}")
    stage = _get(user, "zero_optimization.stage")
    stage = stage if isinstance(stage, int) else train.deepspeed.zero_stage
    gather = _get(user, f"zero_optimization.{GATHER_ON_SAVE}")
    if gather is None:  # DeepSpeed's older name
        gather = _get(user, "zero_optimization.stage3_gather_fp16_weights_on_model_save")
    if stage == 3 and gather is not None and gather != "auto" and gather is not True:
        problems.append(f"zero_optimization.{GATHER_ON_SAVE}={gather!r}: ZeRO-3 must gather the 16-bit weights "
                        "on save for the stage to write the trained model (set it to true)")
    if problems:
        raise DeepSpeedConfigError(f"{origin} disagrees with the stage settings: " + "; ".join(problems))
    merged = dict(user)
    for key in ("gradient_accumulation_steps", "gradient_clipping", "train_micro_batch_size_per_gpu"):
        if merged.get(key) in (None, "auto"):
            merged[key] = expected[key]
    for block in ("bf16", "fp16"):
        if _get(user, f"{block}.enabled") in (None, "auto"):
            enabled = expected[block]["enabled"]
            merged[block] = {**(user.get(block) or {}), "enabled": enabled}
            log.info("%s: %s.enabled is unset; %s from train.dtype=%s", origin, block, str(enabled).lower(), dtype)
    if stage == 3 and gather in (None, "auto"):
        merged["zero_optimization"] = {**user.get("zero_optimization", {}), GATHER_ON_SAVE: True}
        log.info("%s: zero_optimization.%s is unset; true (the stage saves the gathered weights)", origin,
                 GATHER_ON_SAVE)
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

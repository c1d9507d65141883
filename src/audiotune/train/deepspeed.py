"""DeepSpeed ZeRO configuration: generated from the stage settings, or a user's JSON checked against them.

The optimizer is declared in the config (``"optimizer": {"type": "AdamW", ...}``), so DeepSpeed builds its own:
FusedAdam on GPUs, DeepSpeedCPUAdam when ``offload_optimizer`` moves the optimizer states to CPU memory (the CUDA
image compiles both ops at build time: ``DS_BUILD_FUSED_ADAM=1 DS_BUILD_CPU_ADAM=1``). On a machine without a GPU
and without offload (CI's 2-process ZeRO runs) the block asks DeepSpeed for its ``torch_adam`` variant: the CPU
FusedAdam op is not in the pip wheel and its JIT build took 554 s on the 2-core CI machine (under load; measured
here), longer than the runs it would serve. The engine hands accelerate a ``DummyOptim`` carrying the parameter
groups (each group keeps its own ``lr`` and ``weight_decay``). DeepSpeed's guards stay on: neither
``zero_allow_untested_optimizer`` nor ``zero_force_ds_cpu_optimizer`` is overridden.
"""

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
        "optimizer": optimizer_block(train, gpu=_has_gpu()),
        "wall_clock_breakdown": False,
    }


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def optimizer_block(train: TrainSettings, gpu: bool = True) -> dict[str, Any]:
    """DeepSpeed's AdamW with the stage's settings: DeepSpeed picks FusedAdam, or with offload DeepSpeedCPUAdam.

    ``lr`` and ``weight_decay`` are the defaults; the parameter groups the engine passes override them per group
    (no decay on biases and norms, the joint stage's per-model rates).

    Args:
        train: The stage's training settings.
        gpu: Whether the processes train on GPUs; without one and without offload DeepSpeed is asked for its
            ``torch_adam`` variant (see the module docstring).
    """
    params: dict[str, Any] = {"lr": train.lr, "betas": list(train.betas), "eps": 1e-8,
                              "weight_decay": train.weight_decay}
    if not gpu and not train.deepspeed.offload_optimizer:
        params["torch_adam"] = True
    return {"type": "AdamW", "params": params}


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
    optimizer (DeepSpeed's AdamW, :func:`optimizer_block`; a JSON that declares its own keeps it), the
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
    for key in ("gradient_accumulation_steps", "gradient_clipping", "train_micro_batch_size_per_gpu", "optimizer"):
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

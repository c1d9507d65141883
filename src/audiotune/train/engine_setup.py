"""What the training engine is built from: the accelerator, the optimizer and its parameter groups, the schedule.

The stages call these before they make an :class:`~audiotune.train.engine.Engine` (which re-exports them).
"""

from __future__ import annotations

import os
import resource
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, set_seed
from transformers import get_scheduler

from audiotune.config import TrainSettings
from audiotune.train.deepspeed import deepspeed_plugin


def resolve_dtype(dtype: str) -> str:
    """``auto`` → bf16 on a GPU that supports it, else fp32."""
    if dtype != "auto":
        return dtype
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def make_accelerator(train: TrainSettings, dtype: str) -> Accelerator:
    """An Accelerator for these settings: gloo on CPU, NCCL on GPUs, DeepSpeed when a ZeRO stage is set."""
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if "LOCAL_RANK" not in os.environ:
        # One process running several stages (tests, notebooks): accelerate keeps a process-wide singleton
        # whose settings (mixed precision, DeepSpeed plugin) must not leak from one stage into the next.
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state()
        GradientState._reset_state()
    plugin = deepspeed_plugin(train, dtype)
    # bf16 autocast is applied by the engine around the loss: accelerate's own mixed precision also wraps forward
    # to cast every model output to fp32, i.e. an extra [tokens, vocab] fp32 copy of the logits per step, large with
    # a 152k vocabulary (not measured on a GPU here). fp16 keeps accelerate's handling for its loss scaling;
    # DeepSpeed has its own.
    mixed = "fp16" if dtype == "fp16" else "no"
    return Accelerator(
        gradient_accumulation_steps=train.grad_accum,
        mixed_precision=mixed,
        deepspeed_plugin=plugin,
        # without cpu=True accelerate treats torchrun processes on a CPU-only machine as unrelated single
        # processes (DistributedType.NO: no DDP wrapping, reduce() a no-op); cpu=True gives MULTI_CPU (DDP on gloo).
        # DeepSpeed keeps cpu=False: accelerate disables DeepSpeed under cpu=True.
        cpu=plugin is None and not torch.cuda.is_available(),
        # the backend only matters with several processes; set for one, accelerate expects a process group
        kwargs_handlers=[InitProcessGroupKwargs(backend=backend)] if "LOCAL_RANK" in os.environ else [],
        step_scheduler_with_optimizer=False,
    )


def build_optimizer(param_groups: list[dict[str, Any]], train: TrainSettings) -> torch.optim.Optimizer:
    """AdamW; each group may carry its own ``lr`` and ``weight_decay``."""
    return torch.optim.AdamW(param_groups, lr=train.lr, betas=tuple(train.betas), weight_decay=train.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, train: TrainSettings, total_steps: int):
    """``train.schedule`` over ``total_steps``, after a linear warm-up from 0 over ``train.warmup_steps``
    (or ``warmup_ratio`` × ``total_steps``); ``constant`` holds the peak learning rate after the warm-up."""
    warmup = train.warmup_steps if train.warmup_steps is not None else int(train.warmup_ratio * total_steps)
    # transformers' "constant" takes no warm-up (it ignores num_warmup_steps)
    name = "constant_with_warmup" if train.schedule == "constant" and warmup > 0 else train.schedule
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


def decay_groups(named_params: list[tuple[str, torch.nn.Parameter]], lr: float, weight_decay: float,
                 name: str = "params") -> list[dict[str, Any]]:
    """Split trainable parameters into decayed and not decayed (biases, norms, 1-D) groups."""
    decay, no_decay = [], []
    for pname, p in named_params:
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "norm" in pname.lower() or pname.endswith(".bias") else decay).append(p)
    groups = [{"params": decay, "lr": lr, "weight_decay": weight_decay, "name": f"{name}.decay"},
              {"params": no_decay, "lr": lr, "weight_decay": 0.0, "name": f"{name}.no_decay"}]
    return [g for g in groups if g["params"]]


def peak_memory_mb() -> float:
    """Peak accelerator memory, or the process's peak RSS on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (model init and data order depend on it)."""
    set_seed(seed)

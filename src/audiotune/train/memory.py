"""GPU memory of model states under DeepSpeed ZeRO, and the configuration the pipeline picks for a run whose
``zero_stage`` is ``auto`` (:mod:`audiotune.train.sizing` calls :func:`choose_zero_config` at launch).

Model states per parameter, mixed precision with Adam (the ZeRO paper's accounting): 2 bytes of bf16 weights,
2 bytes of bf16 gradients and 12 bytes of optimizer state (fp32 master weights, momentum and variance). ZeRO-2
partitions gradients and optimizer states over the N data-parallel GPUs, ZeRO-3 the weights too; offloading moves
optimizer states (and with ZeRO-3 the weights) to CPU memory. ZeRO-3 also gathers one layer's full bf16 weights
and gradients at a time (``4 × largest layer`` bytes). Frozen weights (LoRA's base model) cost their 2 bytes,
partitioned only under ZeRO-3.

DeepSpeed's own estimators (``estimate_zero2_model_states_mem_needs``, ``estimate_zero3_...``) count 2 + 18
bytes: they add a 4-byte fp32 gradient partition for the optimizer step. :func:`choose_zero_config` takes the
larger of the two estimates and leaves ``headroom`` of the GPU for activations, buffers and fragmentation.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

log = logging.getLogger(__name__)

GiB = 2**30
WEIGHT, GRAD, OPTIM = 2, 2, 12  # bytes per parameter: bf16 weights, bf16 gradients, fp32 master + Adam m, v


@dataclass(frozen=True)
class ZeroOption:
    """One DeepSpeed configuration (``llm.train.deepspeed``): ZeRO stage and what is offloaded to CPU."""

    stage: int
    offload_optimizer: bool = False
    offload_params: bool = False

    @property
    def name(self) -> str:
        if self.stage == 0:
            return "DDP (no ZeRO)"
        off = ("optimizer+params" if self.offload_params else "optimizer") if self.offload_optimizer else ""
        return f"ZeRO-{self.stage}" + (f" + offload {off}" if off else "")

    def settings(self) -> dict[str, Any]:
        """The ``DeepSpeedSettings`` fields for this option."""
        return {"zero_stage": self.stage, "offload_optimizer": self.offload_optimizer,
                "offload_params": self.offload_params}


DDP = ZeroOption(0)
ZERO2 = ZeroOption(2)
ZERO3 = ZeroOption(3)
ZERO2_OFFLOAD = ZeroOption(2, offload_optimizer=True)
ZERO3_OFFLOAD_OPTIMIZER = ZeroOption(3, offload_optimizer=True)
ZERO3_OFFLOAD = ZeroOption(3, offload_optimizer=True, offload_params=True)
# In order of preference: least communication and CPU traffic first
PREFERENCE = (DDP, ZERO2, ZERO3, ZERO2_OFFLOAD, ZERO3_OFFLOAD_OPTIMIZER, ZERO3_OFFLOAD)


@dataclass
class StateMemory:
    """Bytes of model states per GPU and per GPU's share of CPU memory."""

    gpu: float
    cpu: float


def model_state_memory(n_params: int, trainable_params: int, gpus: int, option: ZeroOption,
                       largest_layer_params: int = 0) -> StateMemory:
    """Model-state bytes per GPU (and offloaded bytes per GPU in CPU memory) by the 2 + 2 + 12 accounting.

    Args:
        n_params: All parameters of the model (frozen and trainable).
        trainable_params: Parameters with gradients (all for a full fine-tune, the adapters for LoRA).
        gpus: Data-parallel GPUs (all nodes).
        option: ZeRO stage and offloading.
        largest_layer_params: Parameters of the largest module, gathered whole under ZeRO-3.
    """
    if not 0 <= trainable_params <= n_params or gpus < 1:
        raise ValueError(f"need 0 <= trainable_params ({trainable_params}) <= n_params ({n_params}) and gpus >= 1")
    t, frozen, n, layer = trainable_params, n_params - trainable_params, gpus, largest_layer_params
    if option.stage == 0:
        return StateMemory(gpu=WEIGHT * frozen + (WEIGHT + GRAD + OPTIM) * t, cpu=0.0)
    if option.stage in (1, 2):
        if option.offload_optimizer:  # ZeRO-Offload: gradient partitions go to the CPU with the optimizer
            return StateMemory(gpu=WEIGHT * (frozen + t), cpu=(GRAD + OPTIM) * t / n)
        grads = GRAD * t / n if option.stage == 2 else GRAD * t
        return StateMemory(gpu=WEIGHT * (frozen + t) + grads + OPTIM * t / n, cpu=0.0)
    gathered = (WEIGHT + GRAD) * layer
    if option.offload_params:
        return StateMemory(gpu=gathered, cpu=(WEIGHT * (frozen + t) + (GRAD + OPTIM) * t) / n)
    if option.offload_optimizer:
        return StateMemory(gpu=gathered + WEIGHT * (frozen + t) / n, cpu=(GRAD + OPTIM) * t / n)
    return StateMemory(gpu=gathered + (WEIGHT * (frozen + t) + (GRAD + OPTIM) * t) / n, cpu=0.0)


def deepspeed_state_memory(n_params: int, trainable_params: int, gpus: int, option: ZeroOption,
                           largest_layer_params: int = 0) -> StateMemory:
    """DeepSpeed's own estimate (its ``*_model_states_mem_needs`` functions) for the trainable parameters, plus
    the frozen weights (2 bytes, partitioned under ZeRO-3). DDP is DeepSpeed's ZeRO-2 estimate on one GPU.

    CPU memory is DeepSpeed's per-node figure (with its 1.5 buffer factor) divided by the GPUs of a node: nodes of
    8 GPUs when ``gpus`` is a multiple of 8, else one node.
    """
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    t, frozen = trainable_params, n_params - trainable_params
    per_node = 8 if gpus % 8 == 0 else gpus  # nodes of 8 GPUs where the count allows, else one node
    nodes = gpus // per_node
    if option.stage == 0:
        cpu, gpu = estimate_zero2_model_states_mem_needs(t, 1, 1, cpu_offload=False)
        return StateMemory(gpu=gpu + WEIGHT * frozen, cpu=0.0)
    if option.stage in (1, 2):
        cpu, gpu = estimate_zero2_model_states_mem_needs(t, per_node, nodes, cpu_offload=option.offload_optimizer)
        return StateMemory(gpu=gpu + WEIGHT * frozen, cpu=cpu / per_node if option.offload_optimizer else 0.0)
    cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
        t, largest_layer_params, per_node, nodes, cpu_offload=option.offload_optimizer,
        cpu_offload_params=option.offload_params, zero_init=True)
    frozen_gpu = 0.0 if option.offload_params else WEIGHT * frozen / gpus
    frozen_cpu = WEIGHT * frozen / gpus if option.offload_params else 0.0
    offloaded = option.offload_optimizer or option.offload_params
    return StateMemory(gpu=gpu + frozen_gpu, cpu=cpu / per_node + frozen_cpu if offloaded else 0.0)


@dataclass
class ZeroChoice:
    """The configuration picked for a run and why."""

    option: ZeroOption
    gpu_gib: float
    deepspeed_gpu_gib: float
    cpu_gib: float
    fits: bool
    reason: str

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["option"] = {"name": self.option.name, **self.option.settings()}
        return out


def choose_zero_config(n_params: int, trainable_params: int, gpus: int, gpu_mem_gb: float, *,
                       largest_layer_params: int = 0, cpu_mem_gb_per_gpu: float | None = None,
                       headroom: float = 0.25, activation_gb: float = 0.0,
                       options: tuple[ZeroOption, ...] = PREFERENCE) -> ZeroChoice:
    """The first option in :data:`PREFERENCE` whose model states fit in ``(1 - headroom) × gpu_mem_gb``.

    Plain DDP (or one process) when everything fits replicated; then ZeRO-2 (partitioned gradients and optimizer
    states); then ZeRO-3 (partitioned weights too); then the offloading variants, which trade GPU memory for CPU
    memory and PCIe traffic. On several GPUs ZeRO-2 goes before DDP as soon as partitioning saves more than a
    tenth of the budget: it moves the same bytes as DDP's all-reduce (a reduce-scatter and an all-gather), so
    the memory comes free; DDP stays for LoRA, whose optimizer states are too small to matter. On one GPU
    ZeRO-2 and ZeRO-3 partition nothing and are skipped. The estimate is the larger of
    :func:`model_state_memory` and DeepSpeed's (:func:`deepspeed_state_memory`).

    Args:
        n_params: All parameters.
        trainable_params: Trainable parameters (LoRA: the adapters).
        gpus: GPUs in the run (nodes × GPUs per node).
        gpu_mem_gb: Memory of one GPU in GiB (80 for an H100 80GB).
        largest_layer_params: Parameters of the largest module (ZeRO-3 gathers it whole).
        cpu_mem_gb_per_gpu: Host memory available per GPU for offloading; None: not checked.
        headroom: Fraction of GPU memory kept for activations, communication buckets, CUDA context and
            fragmentation (25% holds a 3B model's activations at 2k tokens with gradient checkpointing).
        activation_gb: Activation memory to reserve on top of the headroom (see :func:`activation_bytes`).
        options: The options allowed (e.g. none of ZeRO-3 for a flow with EMA, which needs whole weights).

    Returns:
        The choice; ``fits`` is False (with the most memory-saving option) when nothing fits.
    """
    if gpus < 1 or gpu_mem_gb <= 0 or not 0 <= headroom < 1:
        raise ValueError(f"gpus={gpus}, gpu_mem_gb={gpu_mem_gb}, headroom={headroom}: expected gpus >= 1, "
                         f"gpu_mem_gb > 0, 0 <= headroom < 1")
    budget = gpu_mem_gb * (1 - headroom) - activation_gb
    order = [o for o in PREFERENCE if o in options]
    if not order:
        raise ValueError(f"options={options}: none of them is a known ZeRO option")
    if gpus == 1:
        order = [o for o in order if o not in (ZERO2, ZERO3)] or order
    elif ZERO2 in order and (GRAD + OPTIM) * trainable_params * (1 - 1 / gpus) / GiB > 0.1 * budget:
        order.remove(ZERO2)
        order.insert(0, ZERO2)
    last = None
    for option in order:
        ours = model_state_memory(n_params, trainable_params, gpus, option, largest_layer_params)
        ds = deepspeed_state_memory(n_params, trainable_params, gpus, option, largest_layer_params)
        gpu_gib, cpu_gib = max(ours.gpu, ds.gpu) / GiB, max(ours.cpu, ds.cpu) / GiB
        last = ZeroChoice(option, ours.gpu / GiB, ds.gpu / GiB, cpu_gib, False,
                          f"{gpu_gib:.1f} GiB of model states per GPU exceed the {budget:.1f} GiB budget "
                          f"({1 - headroom:.0%} of {gpu_mem_gb:g} GiB, less {activation_gb:g} GiB of activations)")
        if gpu_gib > budget:
            continue
        if cpu_mem_gb_per_gpu is not None and cpu_gib > cpu_mem_gb_per_gpu:
            last.reason = f"offloading needs {cpu_gib:.1f} GiB of CPU memory per GPU (> {cpu_mem_gb_per_gpu:g})"
            continue
        last.fits = True
        last.reason = (f"{gpu_gib:.1f} GiB of model states per GPU fit in the {budget:.1f} GiB budget "
                       f"({1 - headroom:.0%} of {gpu_mem_gb:g} GiB, less {activation_gb:g} GiB of activations)")
        return last
    log.warning("no ZeRO configuration fits %d parameters on %d x %g GiB: %s", n_params, gpus, gpu_mem_gb,
                last.reason)
    return last


def count_parameters(model) -> tuple[int, int, int]:
    """(all parameters, trainable parameters, parameters of the largest module) of a torch model.

    Tied weights count once; works on the meta device, so a model's size is known without allocating it.
    """
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    largest = max((sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()), default=0)
    return total, trainable, largest


def activation_bytes(seq_len: int, micro_batch: int, hidden: int, layers: int, ffn: int, kv_dim: int,
                     vocab: int, checkpointing: bool) -> dict[str, float]:
    """A rough activation estimate for a Llama/Qwen-style decoder with a flash/SDPA attention kernel (no s²
    attention matrix), bf16 activations, no dropout.

    Per layer and token the backward pass keeps about ``2 × (6h + 2·kv + 4·ffn)`` bytes (two norm inputs and
    outputs, q/k/v and the attention output, the SwiGLU's gate, up, activation and product). Gradient
    checkpointing keeps only each layer's input (``2h``) plus one layer recomputed. The loss adds the logits:
    bf16 logits, their fp32 copy for the cross-entropy and its gradient (``10 × vocab`` bytes per token).
    """
    tokens = seq_len * micro_batch
    per_layer = 2 * (6 * hidden + 2 * kv_dim + 4 * ffn) * tokens
    layers_bytes = (2 * hidden * tokens * layers + per_layer) if checkpointing else per_layer * layers
    logits = 10 * vocab * tokens
    return {"layers": float(layers_bytes), "logits": float(logits), "total": float(layers_bytes + logits)}

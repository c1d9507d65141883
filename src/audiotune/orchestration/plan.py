"""``audiotune plan CONFIG``: what a run will need per GPU, and whether it fits, before a GPU is requested.

For each training stage the run would start it sizes the model on the meta device (:func:`sizing.model_size`, the
code ``zero_stage: auto`` uses), takes the ZeRO settings (the explicit ones, or the choice ``auto`` makes at launch:
:func:`sizing.choose`) and splits the per-GPU model states into weights, gradients and optimizer states by the
2 + 2 + 12 bytes accounting of :mod:`audiotune.train.memory`, next to DeepSpeed's own estimate
(``estimate_zero{2,3}_model_states_mem_needs``). For the LLM it adds the activations of one micro-batch at the
token budget (``train.batch_tokens``), with and without gradient checkpointing (:func:`memory.activation_bytes`),
and estimates tokens/s and the wall time of the configured epochs from the dataset's token count.

A plan is *refused* (:class:`PlanRefused`, one line, exit 2) when the model states with the activations at the
configured checkpointing do not fit in :data:`USABLE` of one GPU, or when no ZeRO configuration fits at all.
``audiotune submit`` runs :func:`check` before it contacts the host; ``--force`` skips it.

The throughput is an estimate, not a measurement: FLOPs per token (forward 2N, backward 4N for a full fine-tune
and 2N for LoRA, whose frozen weights get no gradients, plus a forward again with checkpointing, and the attention
over ``max_seq_len``) at :data:`DEFAULT_MFU` of the GPU's dense bf16 peak (:data:`PEAK_TFLOPS`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from typing import Any

from audiotune import storage
from audiotune.config import AudiotuneConfig
from audiotune.errors import UsageError
from audiotune.train import sizing
from audiotune.train.memory import GRAD, OPTIM, WEIGHT, GiB, ZeroOption, activation_bytes, deepspeed_state_memory

log = logging.getLogger(__name__)

USABLE = 0.9  # of a GPU's memory: the rest is CUDA context, NCCL buffers and fragmentation
DEFAULT_MFU = 0.35  # model FLOPs utilisation assumed for the estimate
# Dense bf16 peak TFLOP/s by the GPU model's name (the first that appears in cluster.gpu_type, upper-cased)
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L40": 181.0, "A10G": 70.0, "A10": 125.0,
               "L4": 121.0, "T4": 65.0}


class PlanRefused(UsageError, RuntimeError):
    """The run cannot fit the requested GPUs; the message names the stage, the figures and what to change."""


@dataclass
class StagePlan:
    """The plan of one training stage (bytes are per GPU unless named ``cpu``)."""

    stage: str
    mode: str
    params: int
    trainable: int
    gpus: int
    gpu_gib: float
    option: str
    auto_option: str
    auto_reason: str
    states: dict[str, float]
    deepspeed_states_gib: float
    cpu_gib: float
    activations_gib: dict[str, float] | None
    checkpointing: bool
    need_gib: float
    fits: bool
    tokens_per_s: float | None = None
    dataset_tokens: int | None = None
    wall_hours: float | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def state_breakdown(n_params: int, trainable: int, gpus: int, option: ZeroOption,
                    largest: int = 0) -> dict[str, float]:
    """Per-GPU bytes of weights, gradients, optimizer states (and ZeRO-3's gathered layer) for ``option``: the
    parts of :func:`audiotune.train.memory.model_state_memory` (their sum is its ``gpu``)."""
    t, n, everything = trainable, gpus, n_params
    out = {"weights": float(WEIGHT * everything), "gradients": 0.0, "optimizer": 0.0, "gathered_layer": 0.0}
    if option.stage == 0:
        out.update(gradients=GRAD * t, optimizer=OPTIM * t)
    elif option.stage in (1, 2):
        if not option.offload_optimizer:
            out.update(gradients=GRAD * t / n if option.stage == 2 else GRAD * t, optimizer=OPTIM * t / n)
    else:
        out["gathered_layer"] = float((WEIGHT + GRAD) * largest)
        out["weights"] = 0.0 if option.offload_params else WEIGHT * everything / n
        if not option.offload_optimizer:
            out.update(gradients=GRAD * t / n, optimizer=OPTIM * t / n)
    return {k: float(v) for k, v in out.items()}


def _option(settings) -> ZeroOption:
    return ZeroOption(int(settings.zero_stage), settings.offload_optimizer, settings.offload_params)


def _llm_shape(cfg: AudiotuneConfig) -> dict[str, int]:
    conf = sizing.llm_config(cfg)
    heads = conf.num_attention_heads
    head_dim = getattr(conf, "head_dim", None) or conf.hidden_size // heads
    vocab = conf.vocab_size
    audio = cfg.tokenize.audio_tokenizer
    if cfg.llm.init != "scratch" and cfg.llm.audio_tokens == "append":
        vocab += audio.codebook_size * audio.num_codebooks
    return {"hidden": conf.hidden_size, "layers": conf.num_hidden_layers, "ffn": conf.intermediate_size,
            "kv_dim": (getattr(conf, "num_key_value_heads", None) or heads) * head_dim, "vocab": vocab}


def peak_tflops(gpu_type: str | None) -> float | None:
    """Dense bf16 TFLOP/s of the GPU named in ``cluster.gpu_type``; None when unknown."""
    name = (gpu_type or "").upper().replace("_", "-")
    parts = set(name.split("-"))
    for model, tflops in PEAK_TFLOPS.items():
        if model in parts:
            return tflops
    return None


def dataset_tokens(tokens_uri: str) -> int:
    """Tokens of a Tokens artifact (text tokens + audio frames, from its ``report.json``)."""
    report = json.loads(storage.read_text(storage.join(tokens_uri, "report.json")))
    return int(report.get("text_tokens") or 0) + int(report.get("audio_frames") or 0)


def _throughput(cfg: AudiotuneConfig, stage: str, size: sizing.ModelSize, shape: dict[str, int], gpus: int,
                checkpointing: bool, mfu: float) -> float | None:
    peak = peak_tflops(cfg.cluster.gpu_type)
    if peak is None:
        return None
    full = size.trainable > 0.5 * size.total
    per_token = (6 if full else 4) * size.total  # forward 2N, backward 4N (LoRA: no weight gradients, 2N)
    attention = 12 * shape["layers"] * shape["hidden"] * cfg.llm.max_seq_len * (1 if full else 2 / 3)
    per_token += attention
    if checkpointing:
        per_token += 2 * size.total + attention / 3  # the forward again
    return gpus * peak * 1e12 * mfu / per_token


def plan_stage(stage: str, cfg: AudiotuneConfig, gpu_gib: float, tokens: int | None = None,
               mfu: float = DEFAULT_MFU) -> StagePlan:
    """The plan of ``stage`` on the run's GPUs of ``gpu_gib`` GiB each (see the module's doc)."""
    cluster = cfg.cluster
    nproc = max(1, cluster.gpus_per_node)
    gpus = nproc * cluster.num_nodes
    section = getattr(cfg, stage)
    size = sizing.model_size(stage, cfg)
    settings = section.train.deepspeed
    choice = sizing.choose(stage, cfg, nproc, gpu_gib, size=size)  # what zero_stage: auto picks at launch
    option = choice.option if settings.zero_stage == "auto" else _option(settings)
    states = state_breakdown(size.total, size.trainable, gpus, option, size.largest)
    ds = deepspeed_state_memory(size.total, size.trainable, gpus, option, size.largest)
    from audiotune.train.memory import model_state_memory

    cpu = max(ds.cpu, model_state_memory(size.total, size.trainable, gpus, option, size.largest).cpu)
    checkpointing = section.train.gradient_checkpointing
    acts, shape, notes = None, None, []
    if stage in ("llm", "joint"):
        shape = _llm_shape(cfg)
        budget = section.train.batch_tokens
        acts = {f"{'with' if ckpt else 'without'}_checkpointing": activation_bytes(
            budget, 1, shape["hidden"], shape["layers"], shape["ffn"], shape["kv_dim"], shape["vocab"], ckpt)["total"]
            / GiB for ckpt in (True, False)}
    else:
        notes.append("flow activations are not estimated (the figure is model states only)")
    if stage == "joint":
        notes.append("joint: activations are the LLM's only")
    state_gib = max(sum(states.values()), ds.gpu) / GiB
    act_gib = acts[f"{'with' if checkpointing else 'without'}_checkpointing"] if acts else 0.0
    need = state_gib + act_gib
    mode = getattr(section, "mode", "full") if stage == "llm" else ("lora" if size.trainable < size.total else "full")
    plan = StagePlan(stage=stage, mode=mode, params=size.total, trainable=size.trainable, gpus=gpus,
                     gpu_gib=gpu_gib, option=option.name, auto_option=choice.option.name,
                     auto_reason=choice.reason,
                     states={k: v / GiB for k, v in states.items()}, deepspeed_states_gib=ds.gpu / GiB,
                     cpu_gib=cpu / GiB, activations_gib=acts, checkpointing=checkpointing, need_gib=need,
                     fits=need <= USABLE * gpu_gib and (settings.zero_stage != "auto" or choice.fits), notes=notes)
    if shape is not None:
        plan.tokens_per_s = _throughput(cfg, stage, size, shape, gpus, checkpointing, mfu)
        if plan.tokens_per_s is None:
            notes.append(f"no throughput estimate: GPU model of cluster.gpu_type={cluster.gpu_type!r} unknown")
        plan.dataset_tokens = tokens
        if tokens and plan.tokens_per_s:
            plan.wall_hours = tokens * section.train.epochs / plan.tokens_per_s / 3600
    return plan


def target_gpu_gib(cfg: AudiotuneConfig, gpu_gib: float | None = None) -> float:
    """Memory of one of the run's GPUs: ``gpu_gib``, else ``cluster.gpu_type``'s, else the GPU visible here.

    Raises:
        PlanRefused: None of them is known.
    """
    found = gpu_gib or sizing.gpu_memory_gib(cfg.cluster.gpu_type) or sizing.visible_gpu_gib()
    if not found:
        raise PlanRefused(f"cannot plan: the memory of a GPU is unknown (cluster.gpu_type={cfg.cluster.gpu_type!r}, "
                          "no GPU visible); set cluster.gpu_type (e.g. NVIDIA-H100-80GB-HBM3) or pass --gpu-gib")
    return float(found)


def plan(cfg: AudiotuneConfig, gpu_gib: float | None = None, tokens: int | None = None,
         mfu: float = DEFAULT_MFU) -> list[StagePlan]:
    """The plans of every training stage the run starts (``pipeline.mode``)."""
    if cfg.cluster.gpus_per_node == 0:
        raise PlanRefused("cannot plan: cluster.gpus_per_node is 0 (CPU training needs no GPU plan)")
    memory = target_gpu_gib(cfg, gpu_gib)
    try:
        return [plan_stage(stage, cfg, memory, tokens, mfu) for stage in sizing.stages_run(cfg)]
    except sizing.SizingError as err:
        raise PlanRefused(str(err)) from None


def check(plans: list[StagePlan]) -> None:
    """Refuse the first stage that does not fit, in one line.

    Raises:
        PlanRefused: With the stage, what it needs, what one GPU offers and what to change.
    """
    for p in plans:
        if not p.fits:
            ckpt = "" if p.checkpointing else "; try train.gradient_checkpointing: true"
            raise PlanRefused(
                f"{p.stage}: needs {p.need_gib:.1f} GiB per GPU ({p.option}, {p.gpus} GPU(s)) but one GPU has "
                f"{p.gpu_gib:g} GiB ({USABLE:.0%} usable){ckpt}, lower {p.stage}.train.batch_tokens, add GPUs or "
                "use LoRA (submit --force skips this check)")


def format_plan(plans: list[StagePlan]) -> str:
    """The plans as a short text table (what ``audiotune plan`` prints)."""
    lines = []
    for p in plans:
        lines.append(f"{p.stage} ({p.mode}): {p.params / 1e9:.2f} B parameters, {p.trainable / 1e6:.1f} M trainable; "
                     f"{p.gpus} GPU(s) x {p.gpu_gib:g} GiB; {p.option}"
                     + (f" (auto: {p.auto_reason})" if p.option == p.auto_option else
                        f" (configured; zero_stage: auto would pick {p.auto_option}: {p.auto_reason})"))
        s = p.states
        lines.append(f"  per GPU, GiB: weights {s['weights']:.2f}, gradients {s['gradients']:.2f}, optimizer "
                     f"{s['optimizer']:.2f}" + (f", gathered layer {s['gathered_layer']:.2f}" if s['gathered_layer']
                                                else "")
                     + f" = {sum(s.values()):.2f} (DeepSpeed's estimator: {p.deepspeed_states_gib:.2f})"
                     + (f"; CPU {p.cpu_gib:.2f}" if p.cpu_gib else ""))
        if p.activations_gib:
            a = p.activations_gib
            lines.append(f"  activations at the token budget, GiB: {a['with_checkpointing']:.2f} with gradient "
                         f"checkpointing, {a['without_checkpointing']:.2f} without (configured: "
                         f"{'on' if p.checkpointing else 'off'})")
        lines.append(f"  needs {p.need_gib:.1f} of {p.gpu_gib * USABLE:.1f} usable GiB: "
                     f"{'fits' if p.fits else 'DOES NOT FIT'}")
        if p.tokens_per_s:
            wall = f", {p.wall_hours:.2f} h for {p.dataset_tokens:,} tokens" if p.wall_hours is not None else ""
            lines.append(f"  about {p.tokens_per_s:,.0f} tokens/s at {DEFAULT_MFU:.0%} MFU{wall}")
        lines += [f"  note: {n}" for n in p.notes]
    return "\n".join(lines)


def preflight(cfg: AudiotuneConfig) -> str | None:
    """``submit``'s check: the refusal line of :func:`check` (prefixed ``plan:``), or None. A run that cannot be
    planned here (no GPU memory known, a base model not readable from this machine) is let through with a warning:
    the launcher sizes it again where it runs."""
    try:
        plans = plan(cfg)
    except PlanRefused as err:
        log.warning("plan skipped: %s", err)
        return None
    log.info("plan:\n%s", format_plan(plans))
    try:
        check(plans)
    except PlanRefused as err:
        return f"plan: {err}"
    return None

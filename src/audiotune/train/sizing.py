"""``train.deepspeed.zero_stage: auto``: the ZeRO settings of a training stage, picked where it is launched.

The launcher (:func:`audiotune.orchestration.training.launch`) calls :func:`with_zero` before it starts torchrun or a
multi-node job. For a stage whose ``zero_stage`` is ``auto`` it counts the model's parameters without allocating them
(the base model's ``config.json``, or the ``llm.preset`` / ``flow.preset``, built on the meta device; LoRA adapters
through PEFT), takes the GPUs of the run (``cluster.num_nodes`` × the processes per node) and the memory of one GPU
(the GPU this pod sees; for a multi-node job, whose GPUs are elsewhere, the size in ``cluster.gpu_type``), and lets
:func:`audiotune.train.memory.choose_zero_config` pick the stage and offloading. The choice and its reason are
logged, and the launch config (a copy) has the stage's ``train.deepspeed`` set to it, so the training processes
get plain numbers. An explicit ``zero_stage`` (0-3) is used as given.

The counts are estimates of model states: audio-token rows added to the vocabulary are left out, and a flow counts
as fully trainable. The first real run's ``peak_memory_mb`` is the figure to trust.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass

from audiotune import storage
from audiotune.config import AudiotuneConfig, ConfigError, DeepSpeedSettings
from audiotune.errors import UsageError
from audiotune.train.memory import PREFERENCE, GiB, ZeroChoice, choose_zero_config, count_parameters

log = logging.getLogger(__name__)

TRAIN_STAGES = ("llm", "flow", "joint")
# GPU models whose product label (nvidia.com/gpu.product) does not carry the memory size
KNOWN_GPU_GIB = {"T4": 16, "A10": 24, "A10G": 24, "L4": 24, "L40": 48, "L40S": 48, "H200": 141}
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*(?:GB|GiB|G)\b", re.IGNORECASE)
_QUANTITY = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")
_UNIT = {None: 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18,
         "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}


class SizingError(UsageError, RuntimeError):
    """The model of a stage with ``zero_stage: auto`` could not be sized; the message says which file or field."""


@dataclass
class ModelSize:
    """Parameters of a stage's model: all, with gradients, and of its largest module (ZeRO-3 gathers it whole)."""

    total: int
    trainable: int
    largest: int


def gpu_memory_gib(gpu_type: str | None) -> float | None:
    """GiB of one GPU from its product name, e.g. ``NVIDIA-H100-80GB-HBM3`` → 80, ``NVIDIA-L4`` → 24; else None."""
    if not gpu_type:
        return None
    found = _SIZE.search(gpu_type.replace("-", " ").replace("_", " "))
    if found:
        return float(found.group(1))
    for part in re.split(r"[-_ ]", gpu_type.upper()):
        if part in KNOWN_GPU_GIB:
            return float(KNOWN_GPU_GIB[part])
    return None


def quantity_gib(quantity: str | None) -> float | None:
    """A Kubernetes quantity (``400Gi``, ``64G``) in GiB; None when unset or not a quantity."""
    found = _QUANTITY.match(str(quantity or ""))
    return float(found.group(1)) * _UNIT[found.group(2)] / GiB if found else None


def stages_run(cfg: AudiotuneConfig) -> tuple[str, ...]:
    """The training stages a pipeline run with this config runs."""
    if cfg.pipeline.mode != "both":
        return (cfg.pipeline.mode,)
    return ("llm", "flow", "joint") if cfg.joint.enabled else ("llm", "flow")


def check(cfg: AudiotuneConfig) -> None:
    """Refuse, before anything runs, an ``auto`` stage that could not be sized at launch.

    Raises:
        ConfigError: A multi-node stage (``cluster.num_nodes > 1``) with ``zero_stage: auto`` whose GPU memory is
            not known from ``cluster.gpu_type``.
    """
    cluster = cfg.cluster
    if cluster.num_nodes == 1 or cluster.gpus_per_node == 0 or gpu_memory_gib(cluster.gpu_type) is not None:
        return
    for stage in stages_run(cfg):
        if getattr(cfg, stage).train.deepspeed.zero_stage == "auto":
            raise ConfigError(f"{stage}.train.deepspeed.zero_stage=auto with cluster.num_nodes="
                              f"{cluster.num_nodes}: the GPUs are in the job's pods, so their memory must "
                              f"come from cluster.gpu_type (e.g. NVIDIA-H100-80GB-HBM3; got {cluster.gpu_type!r}); "
                              "set cluster.gpu_type or an explicit zero_stage 0-3")


def llm_config(cfg: AudiotuneConfig):
    """The ``transformers`` config of the llm stage's model: the preset (from scratch) or the base model's
    ``config.json``; nothing is downloaded but that file.

    Raises:
        SizingError: No base model, or a config.json without ``model_type``.
    """
    from transformers import AutoConfig

    from audiotune.models import lm

    settings = cfg.llm
    if settings.init == "scratch":
        audio = cfg.tokenize.audio_tokenizer
        return lm.preset_config(settings.preset, cfg.tokenize.vocab_size + audio.codebook_size
                                * audio.num_codebooks, "sdpa")
    if not settings.base_model:
        raise SizingError("llm.base_model is unset (init pretrained): there is no model to size")
    source = storage.join(settings.base_model, "config.json")
    data = json.loads(storage.read_text(source))
    if "model_type" not in data:
        raise SizingError(f"{source}: no model_type")
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = data.pop("model_type")
    if model_type in CONFIG_MAPPING:
        return AutoConfig.for_model(model_type, **data)
    # A model whose code ships with its weights (Step1, Kimi-Audio): sized, without running that code, as the
    # decoder-only Llama of the same widths, which is what those models are apart from small extra heads.
    shape = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    missing = [key for key in shape if key not in data]
    if missing:
        raise SizingError(f"{source}: model_type {model_type!r} is not one transformers knows, and the config "
                          f"lacks {missing} to size it as a decoder-only model; set zero_stage explicitly")
    keep = shape + ("num_key_value_heads", "tie_word_embeddings", "head_dim")
    return AutoConfig.for_model("llama", **{key: data[key] for key in keep if key in data})


def _llm_size(cfg: AudiotuneConfig) -> ModelSize:
    import torch
    from transformers import AutoModelForCausalLM

    from audiotune.models import lm

    settings = cfg.llm
    config = llm_config(cfg)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
        if settings.mode == "lora":
            from peft import get_peft_model

            model = get_peft_model(model, lm.lora_config(model, settings.lora, []))
    return ModelSize(*count_parameters(model))


def _flow_size(cfg: AudiotuneConfig) -> ModelSize:
    import torch

    from audiotune.models.flow import PRESETS, FlowConfig, FlowModel
    from audiotune.models.flow.native.release import build_from_yaml, is_release_folder

    settings = cfg.flow
    if settings.base_flow and is_release_folder(settings.base_flow):  # sizes from the release yaml
        with torch.device("meta"):
            total, _, largest = count_parameters(build_from_yaml(settings.base_flow))
        return ModelSize(total, total, largest)
    if settings.base_flow:
        config = FlowConfig.from_dict(json.loads(storage.read_text(storage.join(settings.base_flow, "config.json"))))
    elif settings.preset in PRESETS:
        config = PRESETS[settings.preset]()
    else:
        raise SizingError(f"flow.preset={settings.preset!r} needs flow.base_flow to size the flow")
    with torch.device("meta"):
        total, _, largest = count_parameters(FlowModel(config))
    return ModelSize(total, total, largest)  # LoRA or a frozen encoder only lower the trainable count


def model_size(stage: str, cfg: AudiotuneConfig) -> ModelSize:
    """The parameters of ``stage``'s model (the joint stage trains the LLM and the flow together).

    Raises:
        SizingError: A config.json that cannot be read, or no model to size.
    """
    from audiotune.models.flow import FlowConfigError
    from audiotune.models.lm import ModelError

    try:
        if stage == "llm":
            return _llm_size(cfg)
        if stage == "flow":
            return _flow_size(cfg)
        llm, flow = _llm_size(cfg), _flow_size(cfg)
    except (OSError, ValueError, KeyError, ModelError, FlowConfigError) as err:
        raise SizingError(f"{stage}.train.deepspeed.zero_stage=auto: cannot size the model: {err}") from None
    return ModelSize(llm.total + flow.total, llm.trainable + flow.trainable, max(llm.largest, flow.largest))


def visible_gpu_gib() -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(0).total_memory / GiB


def with_zero(stage: str, cfg: AudiotuneConfig, nproc: int,
              gpu_gib: float | None = None) -> tuple[AudiotuneConfig, ZeroChoice | None]:
    """``cfg`` with ``zero_stage: auto`` of ``stage`` replaced by the ZeRO settings that fit (:func:`choose`), as a
    copy (``cfg`` is not changed), and the choice; ``cfg`` itself and None when the stage's ZeRO stage is explicit.

    Raises:
        SizingError: The model or the GPU memory cannot be found.
    """
    section = getattr(cfg, stage)
    if section.train.deepspeed.zero_stage != "auto":
        return cfg, None
    choice = choose(stage, cfg, nproc, gpu_gib)
    if not choice.fits:
        log.warning("%s: nothing fits; training with the most memory-saving option, %s", stage, choice.option.name)
    train = section.train.model_copy(update={"deepspeed": DeepSpeedSettings(**choice.option.settings())})
    return cfg.model_copy(update={stage: section.model_copy(update={"train": train})}), choice


def choose(stage: str, cfg: AudiotuneConfig, nproc: int, gpu_gib: float | None = None,
           size: ModelSize | None = None) -> ZeroChoice:
    """The ZeRO settings ``zero_stage: auto`` picks for ``stage`` (``cfg`` is not changed).

    Args:
        stage: llm, flow or joint.
        cfg: The run's config.
        nproc: Training processes per node (one per GPU).
        gpu_gib: Memory of one GPU; None: the GPU this process sees, else the size in ``cluster.gpu_type``.
        size: The model's size when already known (else :func:`model_size`).

    Returns:
        The choice, with its reason.

    Raises:
        SizingError: The model or the GPU memory cannot be found.
    """
    cluster = cfg.cluster
    gpus = nproc * cluster.num_nodes
    if gpu_gib is None and cluster.gpus_per_node > 0:
        gpu_gib = visible_gpu_gib() if cluster.num_nodes == 1 else gpu_memory_gib(cluster.gpu_type)
    if cluster.gpus_per_node == 0 or (gpu_gib is None and cluster.num_nodes == 1):
        log.info("%s.train.deepspeed.zero_stage=auto: no GPU, so no ZeRO", stage)
        return ZeroChoice(PREFERENCE[0], 0.0, 0.0, 0.0, True, "no GPU: one process per node, no ZeRO")
    if gpu_gib is None:
        raise SizingError(f"{stage}.train.deepspeed.zero_stage=auto: the memory of a GPU is unknown (no GPU "
                          f"visible, cluster.gpu_type={cluster.gpu_type!r}); set cluster.gpu_type or zero_stage 0-3")
    size = size or model_size(stage, cfg)
    options = PREFERENCE
    if stage in ("flow", "joint") and cfg.flow.ema.enabled:  # the EMA needs whole weights on every process
        options = tuple(o for o in PREFERENCE if o.stage != 3)
    cpu_gib = quantity_gib(cluster.memory)
    choice = choose_zero_config(size.total, size.trainable, gpus, gpu_gib, largest_layer_params=size.largest,
                                cpu_mem_gb_per_gpu=cpu_gib / nproc if cpu_gib else None, options=options)
    log.info("%s.train.deepspeed.zero_stage=auto: %s for %d parameters (%d trainable) on %d GPU(s) of %.0f GiB: %s",
             stage, choice.option.name, size.total, size.trainable, gpus, gpu_gib, choice.reason)
    return choice



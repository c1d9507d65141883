"""PEFT LoRA on the ACE-Step transformer, and its export in diffusers' LoRA format.

The adapter is added with diffusers' own ``PeftAdapterMixin.add_adapter`` and saved with
``AceStepPipeline.save_lora_weights`` (``pytorch_lora_weights.safetensors`` with the adapter's config as
metadata), so ``AceStepPipeline.load_lora_weights(folder)`` loads it as trained.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from audiotune.models.acestep import AceStepError

log = logging.getLogger(__name__)

WEIGHT_NAME = "pytorch_lora_weights.safetensors"
KIND = "audiotune.acestep-lora"  # the LoRA artifact of `train acestep` (read by `export acestep`)
VERSION = 1


def add_lora(transformer, r: int, alpha: float, dropout: float, target_modules: list[str]) -> int:
    """Freeze the transformer and add a LoRA adapter on ``target_modules``; returns the trainable count.

    Raises:
        AceStepError: A target that matches no module of the transformer.
    """
    from peft import LoraConfig

    names = [n for n, _ in transformer.named_modules()]
    unmatched = [t for t in target_modules if not any(n == t or n.endswith(f".{t}") for n in names)]
    if unmatched:
        raise AceStepError(f"acestep.lora.target_modules: {unmatched} match no module of the transformer "
                           "(diffusers' ACE-Step LoRA loader accepts to_q, to_k, to_v, to_out.0)")
    transformer.requires_grad_(False)
    transformer.add_adapter(LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, init_lora_weights="gaussian",
                                       target_modules=list(target_modules)))
    for p in transformer.parameters():  # adapters train in fp32 even on a bf16 base
        if p.requires_grad:
            p.data = p.data.float()
    return sum(p.numel() for p in transformer.parameters() if p.requires_grad)


def lora_state(transformer, state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The adapter's weights, keyed as diffusers' LoRA loader expects (without the ``transformer.`` prefix).

    ``state_dict``: the whole model's gathered weights (``accelerator.get_state_dict``; ZeRO-3 partitions them).
    """
    from peft.utils import get_peft_model_state_dict

    weights = get_peft_model_state_dict(transformer, state_dict=state_dict)
    return {k: v.detach().float().cpu().contiguous() for k, v in weights.items()}


def save_lora(transformer, directory: Path, state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write ``pytorch_lora_weights.safetensors`` (diffusers' format, with the LoRA config as metadata)."""
    from diffusers import AceStepPipeline

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    AceStepPipeline.save_lora_weights(
        str(directory), transformer_lora_layers=state if state is not None else lora_state(transformer),
        transformer_lora_adapter_metadata=transformer.peft_config["default"].to_dict(), weight_name=WEIGHT_NAME)
    return directory / WEIGHT_NAME


def load_into(pipe, directory: Path, adapter_name: str = "default") -> None:
    """``pipe.load_lora_weights`` on an exported folder, checking that every LoRA tensor was taken.

    Raises:
        AceStepError: No LoRA file, or tensors the transformer did not take.
    """
    path = Path(directory) / WEIGHT_NAME
    if not path.is_file():
        raise AceStepError(f"{path}: missing (not an exported ACE-Step LoRA)")
    pipe.load_lora_weights(str(directory), weight_name=WEIGHT_NAME, adapter_name=adapter_name)
    taken = sum(1 for n, _ in pipe.transformer.named_parameters() if ".lora_" in n)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        stored = len(list(f.keys()))
    if taken != stored:
        raise AceStepError(f"{path}: {stored} LoRA tensors stored, {taken} loaded into the transformer")


def fuse_and_save(pipe, directory: Path, target: Path) -> None:
    """Load the LoRA at ``directory`` into ``pipe``, fuse it into the transformer, drop the adapter, save."""
    load_into(pipe, directory)
    pipe.fuse_lora(components=["transformer"])
    pipe.unload_lora_weights()
    pipe.save_pretrained(str(target))

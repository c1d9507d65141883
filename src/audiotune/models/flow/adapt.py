"""What a fine-tune does to a flow model: freeze the encoder, LoRA on the estimator.

The EMA of the weights is :mod:`audiotune.train.ema`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from audiotune.errors import TrainingError
from audiotune.models.flow.model import FlowModel

DEFAULT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out", "proj_in", "proj_out")


class FlowModelError(TrainingError):
    """A flow model cannot be adapted as asked (e.g. LoRA target modules that do not exist)."""


def _encoder_parts(model: torch.nn.Module) -> list[torch.nn.Module]:
    if hasattr(model, "encoder_modules"):  # a release flow: input embedding, encoder, projection (, regulator)
        return list(model.encoder_modules())
    return [model.encoder]


def freeze_encoder(model: FlowModel) -> int:
    """Freeze the code encoder (embedding, Transformer, projection, length regulator); returns the count frozen.

    The estimator and the speaker conditioning stay trainable: "train the decoder only". For a
    release flow (:class:`audiotune.models.flow.native.adapter.ReleaseFlow`): ``input_embedding``,
    ``encoder``, ``encoder_proj`` and, in CosyVoice-300M, ``length_regulator``; ``spk_embed_affine_layer``
    and the decoder train.
    """
    frozen = 0
    for part in _encoder_parts(model):
        for p in part.parameters():
            p.requires_grad_(False)
            frozen += p.numel()
    return frozen


def _estimator_owner(model: torch.nn.Module) -> torch.nn.Module:
    """The module whose ``estimator`` attribute holds the estimator (the flow, or a release flow's CFM)."""
    return model.estimator_owner() if hasattr(model, "estimator_owner") else model


def default_lora_targets(model: torch.nn.Module) -> tuple[str, ...]:
    """The estimator's attention and feed-forward layers for this flow's architecture."""
    from audiotune.models.flow.native.adapter import LORA_TARGETS

    return LORA_TARGETS.get(getattr(model, "arch", ""), DEFAULT_LORA_TARGETS)


def apply_lora(model: FlowModel, r: int, alpha: float, dropout: float,
               target_modules: Sequence[str] = DEFAULT_LORA_TARGETS) -> FlowModel:
    """Put PEFT LoRA adapters on the estimator's layers; every other weight is frozen.

    ``model.estimator`` becomes a ``peft.PeftModel``; :func:`merge_lora` undoes that.

    Args:
        model: The flow model (changed in place and returned).
        r: LoRA rank.
        alpha: LoRA alpha.
        dropout: Dropout on the LoRA input.
        target_modules: Module name suffixes inside the estimator (``to_q``, ``to_k``, ``to_v``,
            ``to_out``: attention; ``proj_in``, ``proj_out``: feed-forward; a release flow's:
            :func:`default_lora_targets`).

    Raises:
        FlowModelError: No estimator module matches a target.
    """
    from peft import LoraConfig, get_peft_model

    owner = _estimator_owner(model)
    linear = [name for name, m in owner.estimator.named_modules() if isinstance(m, torch.nn.Linear)]
    unknown = sorted(t for t in target_modules if not any(n == t or n.endswith("." + t) for n in linear))
    if unknown or not target_modules:
        names = sorted({n.rsplit(".", 1)[-1] for n in linear} | {".".join(n.split(".")[-2:]) for n in linear})
        raise FlowModelError(f"flow.lora.target_modules: {unknown or '[]'} match no linear layer of the estimator; "
                             f"available: {names}")
    for p in model.parameters():
        p.requires_grad_(False)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules),
                        bias="none")
    owner.estimator = get_peft_model(owner.estimator, config)
    return model


def has_lora(model: FlowModel) -> bool:
    """Whether the estimator carries LoRA adapters."""
    from peft import PeftModel

    return isinstance(_estimator_owner(model).estimator, PeftModel)


def lora_estimator(model: FlowModel):
    """The estimator (a ``peft.PeftModel`` after :func:`apply_lora`)."""
    return _estimator_owner(model).estimator


def merge_lora(model: FlowModel) -> FlowModel:
    """Merge the estimator's LoRA adapters into its weights and return the plain model (in place)."""
    if has_lora(model):
        owner = _estimator_owner(model)
        owner.estimator = owner.estimator.merge_and_unload()
    return model



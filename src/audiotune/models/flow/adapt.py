"""What a fine-tune does to a flow model: freeze the encoder, LoRA on the estimator, EMA of the weights."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

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


class EMA:
    """Exponential moving average of a model's trainable parameters (float32 shadows).

    ``shadow = decay · shadow + (1 - decay) · param`` after each optimizer step. Frozen
    parameters are constant, so their average is themselves and they are not copied.

    Args:
        model: The (unwrapped) model whose parameters are averaged.
        decay: Weight of the past.
    """

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.shadow = {n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}
        self.num_updates = 0

    def _params(self, model: torch.nn.Module) -> list[torch.nn.Parameter]:
        params = dict(model.named_parameters())
        return [params[n] for n in self.shadow]

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        """One averaging step (vectorised over all tensors)."""
        params = [p.detach().float() for p in self._params(model)]
        torch._foreach_lerp_(list(self.shadow.values()), params, 1.0 - self.decay)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: torch.nn.Module) -> None:
        """Overwrite the model's parameters with the averages."""
        for p, s in zip(self._params(model), self.shadow.values(), strict=True):
            p.copy_(s.to(p.dtype))

    @contextlib.contextmanager
    def swapped(self, model: torch.nn.Module) -> Iterator[None]:
        """The averaged weights inside the block, the raw ones restored after."""
        backup = [p.detach().clone() for p in self._params(model)]
        self.copy_to(model)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, b in zip(self._params(model), backup, strict=True):
                    p.copy_(b)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors only (saved as safetensors in checkpoints)."""
        out = {f"shadow.{n}": s.detach().cpu().contiguous() for n, s in self.shadow.items()}
        out["num_updates"] = torch.tensor(self.num_updates, dtype=torch.int64)
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore from :meth:`state_dict`'s output (same parameter names required)."""
        names = {k[len("shadow."):] for k in state if k.startswith("shadow.")}
        if names != set(self.shadow):
            missing, extra = sorted(set(self.shadow) - names), sorted(names - set(self.shadow))
            raise ValueError(f"EMA state does not match the model: missing {missing[:5]}, unexpected {extra[:5]}")
        for n, s in self.shadow.items():
            s.copy_(state[f"shadow.{n}"].to(s.device))
        self.num_updates = int(state["num_updates"])

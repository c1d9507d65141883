"""Multi-codebook LMs (MOSS-TTSD style) as a wrapper around any Hugging Face causal LM.

Frames of C codebooks enter as one position: codebook 0 uses the backbone's own embedding
(its ids live in the LM vocabulary with the text), codebooks 1..C-1 have their own tables of
``codebook_size + 2`` rows (codes, the delay filler, padding); their embeddings are summed at
the input. The backbone's head predicts channel 0, one linear head per extra codebook predicts
the others from the same final hidden state. A family that ships its own pretrained tables and
heads (MOSS-TTSD's AsteroidTTS, :mod:`audiotune.models.moss`) sets their row count and padding
row, and marks them pretrained: LoRA then leaves them frozen like every other base weight. The
delay pattern itself is laid out by the collator (:mod:`audiotune.train.layouts`). The loss is
the weighted mean of the per-codebook next-token losses (MOSS-TTSD weights 8,2,1,1,1,1,1,1 for 8
codebooks).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import ModelOutput

from audiotune.models.vocab import IGNORE_INDEX

CODEBOOKS_CONFIG = "codebooks.json"
CODEBOOKS_WEIGHTS = "codebooks.safetensors"
_PREFIX = "backbone."


def default_codebook_weights(num_codebooks: int) -> list[float]:
    """MOSS-TTSD's loss weights: C for codebook 0, 2 for codebook 1, 1 for the rest (8,2,1,1,1,1,1,1 for C=8)."""
    if num_codebooks == 1:
        return [1.0]
    return ([float(num_codebooks), 2.0] + [1.0] * (num_codebooks - 2))[:num_codebooks]


@dataclass
class MultiCodebookOutput(ModelOutput):
    """Loss (weighted over codebooks), channel-0 logits, the other codebooks' logits, per-codebook losses."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    codebook_logits: tuple[torch.Tensor, ...] | None = None
    per_codebook_loss: tuple[torch.Tensor, ...] | None = None


def shifted_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of next-token cross entropies (labels aligned with inputs) and the number of targets."""
    logits = logits[:, :-1].float()
    labels = labels[:, 1:]
    total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX,
                            reduction="sum")
    return total, (labels != IGNORE_INDEX).sum()


class MultiCodebookLM(nn.Module):
    """A causal LM backbone with C - 1 extra codebook embeddings and heads.

    Args:
        backbone: Any Hugging Face causal LM (or a PEFT model around one).
        num_codebooks: C, codebooks per frame.
        codebook_size: Codes per codebook.
        weights: Loss weight of every codebook (length C).
        codebook_rows: Rows of every extra table and head (default ``codebook_size + 2``: codes, the delay
            filler, padding).
        padding_idx: Row of the extra tables that gets no gradient (default none).
    """

    extra_pretrained = False  # the extra tables and heads are new: LoRA trains them fully

    def __init__(self, backbone: nn.Module, num_codebooks: int, codebook_size: int, weights: list[float],
                 codebook_rows: int | None = None, padding_idx: int | None = None):
        super().__init__()
        if len(weights) != num_codebooks:
            raise ValueError(f"{len(weights)} codebook weights for {num_codebooks} codebooks")
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"codebook weights must be ≥ 0 and not all 0, got {weights}")
        self.backbone = backbone
        self.config = backbone.config
        self.num_codebooks, self.codebook_size, self.weights = num_codebooks, codebook_size, list(weights)
        self.codebook_rows = codebook_rows if codebook_rows is not None else codebook_size + 2
        self.padding_idx = padding_idx
        hidden, rows = backbone.config.hidden_size, self.codebook_rows
        self.codebook_embeddings = nn.ModuleList(nn.Embedding(rows, hidden, padding_idx=padding_idx)
                                                 for _ in range(num_codebooks - 1))
        self.codebook_heads = nn.ModuleList(nn.Linear(hidden, rows, bias=False) for _ in range(num_codebooks - 1))
        std = getattr(backbone.config, "initializer_range", 0.02)
        for module in [*self.codebook_embeddings, *self.codebook_heads]:
            nn.init.normal_(module.weight, std=std)

    def extra_parameters(self) -> list[nn.Parameter]:
        """Parameters of the extra codebook tables and heads."""
        return [*self.codebook_embeddings.parameters(), *self.codebook_heads.parameters()]

    def get_input_embeddings(self) -> nn.Module:
        return self.backbone.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module:
        return self.backbone.get_output_embeddings()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                **kwargs) -> MultiCodebookOutput:
        """``input_ids`` and ``labels`` are [B, T, C]; ``position_ids`` restart per sample in packed batches."""
        embeds = self.backbone.get_input_embeddings()(input_ids[..., 0])
        for k, table in enumerate(self.codebook_embeddings, start=1):
            embeds = embeds + table(input_ids[..., k]).to(embeds.dtype)
        hidden = self.backbone.get_decoder()(inputs_embeds=embeds, attention_mask=attention_mask,
                                             position_ids=position_ids, use_cache=False).last_hidden_state
        logits = [self.backbone.get_output_embeddings()(hidden)]
        logits += [head(hidden.to(head.weight.dtype)) for head in self.codebook_heads]
        loss, per_codebook = None, None
        if labels is not None:
            sums, counts = zip(*(shifted_loss_sum(lg, labels[..., k]) for k, lg in enumerate(logits)), strict=True)
            means = torch.stack([s / c.clamp(min=1) for s, c in zip(sums, counts, strict=True)])
            weights = torch.tensor(self.weights, device=means.device, dtype=means.dtype)
            weights = weights * (torch.stack(counts) > 0).to(means.dtype)  # a codebook with no targets counts 0
            loss = (weights * means).sum() / weights.sum().clamp(min=1e-8)
            per_codebook = tuple(means.detach())
        return MultiCodebookOutput(loss=loss, logits=logits[0], codebook_logits=tuple(logits[1:]),
                                   per_codebook_loss=per_codebook)

    # ----------------------------------------------------------------------------------------------- saving
    def save_pretrained(self, directory: str | Path, state_dict: dict[str, torch.Tensor] | None = None,
                        **kwargs) -> None:
        """The backbone as usual (adapter or full model) plus ``codebooks.safetensors`` and ``codebooks.json``."""
        from safetensors.torch import save_file

        directory = Path(directory)
        state = state_dict if state_dict is not None else self.state_dict()
        backbone_state = {k[len(_PREFIX):]: v for k, v in state.items() if k.startswith(_PREFIX)}
        self.backbone.save_pretrained(str(directory), state_dict=backbone_state, **kwargs)
        extra = {k: v.detach().contiguous().cpu() for k, v in state.items() if k.startswith("codebook_")}
        save_file(extra, str(directory / CODEBOOKS_WEIGHTS))
        meta = {"num_codebooks": self.num_codebooks, "codebook_size": self.codebook_size, "weights": self.weights}
        if self.codebook_rows != self.codebook_size + 2 or self.padding_idx is not None:
            meta.update(codebook_rows=self.codebook_rows, padding_idx=self.padding_idx)
        (directory / CODEBOOKS_CONFIG).write_text(json.dumps(meta, indent=2) + "\n")

    @classmethod
    def from_saved(cls, backbone: nn.Module, directory: str | Path) -> "MultiCodebookLM":
        """Rebuild the wrapper around a loaded ``backbone`` from a directory written by :meth:`save_pretrained`."""
        directory = Path(directory)
        meta = json.loads((directory / CODEBOOKS_CONFIG).read_text())
        model = cls(backbone, meta["num_codebooks"], meta["codebook_size"], meta["weights"],
                    meta.get("codebook_rows"), meta.get("padding_idx"))
        model.load_codebooks(directory)
        return model

    def load_codebooks(self, directory: str | Path) -> None:
        """Copy the tables and heads saved in ``directory`` (``codebooks.safetensors``) into this model, strictly."""
        from safetensors.torch import load_file

        file = Path(directory) / CODEBOOKS_WEIGHTS
        state = load_file(str(file))
        own = {k: v for k, v in self.state_dict().items() if k.startswith("codebook_")}
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        shapes = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
        if missing or unexpected or shapes:
            raise ValueError(f"{file}: missing {missing}, unexpected {unexpected}, mis-shaped {shapes}")
        with torch.no_grad():
            for key, value in state.items():
                own[key].copy_(value)


def attach_adapter(model: nn.Module, artifact: str | Path, trainable: bool = False) -> nn.Module:
    """Put the LoRA adapter saved in ``artifact`` on a loaded base, with the artifact's codebook tables if it has them.

    A plain causal LM becomes a PEFT model (wrapped in :class:`MultiCodebookLM` when the artifact holds tables);
    a base that its family already loads as a :class:`MultiCodebookLM` (MOSS-TTSD) gets the adapter on its
    backbone, and its own pretrained tables stay frozen unless the artifact brings trained ones.
    """
    from peft import PeftModel

    artifact = Path(artifact)
    if hasattr(model, "attach_adapter"):  # a family's model that places its own adapters (Kimi-Audio)
        return model.attach_adapter(artifact, trainable)
    saved_tables = (artifact / CODEBOOKS_CONFIG).exists()
    if not isinstance(model, MultiCodebookLM):
        model = PeftModel.from_pretrained(model, str(artifact), is_trainable=trainable)
        return MultiCodebookLM.from_saved(model, artifact) if saved_tables else model
    model.backbone = PeftModel.from_pretrained(model.backbone, str(artifact), is_trainable=trainable)
    if saved_tables:
        model.load_codebooks(artifact)
    for p in model.extra_parameters():
        p.requires_grad_(trainable and (saved_tables or not model.extra_pretrained))
    return model


def merge_adapter(model: nn.Module) -> nn.Module:
    """``merge_and_unload`` of a PEFT model, or of a :class:`MultiCodebookLM`'s PEFT backbone."""
    # a family's model that places its own adapters (Kimi-Audio); not a PeftModel, whose merge_adapter() merges in
    # place and returns None
    if hasattr(model, "merge_adapter") and not hasattr(model, "merge_and_unload"):
        return model.merge_adapter()
    if isinstance(model, MultiCodebookLM):
        model.backbone = model.backbone.merge_and_unload()
        return model
    return model.merge_and_unload()

"""Merging a LoRA adapter into its base model, and proving the merge changed nothing.

:func:`merge_llm` reloads the base the adapter was trained on (its fingerprint must match the one
recorded at training), puts the adapter on it with PEFT, runs a probe batch of validation
sequences through base + adapter, merges with ``merge_and_unload`` in the base model's dtype, runs
the same batch again and compares the logits within a tolerance suited to the dtype. It also
checks that no PEFT layer remains. :func:`save_merged` writes it with the base's family
(:mod:`audiotune.models.families`), in the base's own layout; :func:`check_reload` then reloads the saved
directory with that family, strictly, and compares once more. A base that runs its own code is
loaded with the ``llm.trust_remote_code`` the adapter was trained with, after :func:`check_base` has
found its code files unchanged (their sha256 are part of the fingerprint).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from audiotune.errors import AudiotuneError
from audiotune.models.families import family_for, load_model, recorded_settings, save_model
from audiotune.models.fingerprint import fingerprint_checkpoint, fingerprint_mismatch
from audiotune.models.lm import ModelError, load_base, new_rows_trained, resize_embeddings
from audiotune.models.multicodebook import MultiCodebookLM, attach_adapter, merge_adapter

log = logging.getLogger(__name__)

TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 4e-2}  # × RMS of the logits
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class ExportError(AudiotuneError):
    """The export cannot be made safely (wrong base, a merge that changes outputs, unusable inputs)."""


@dataclass
class Verification:
    """What the merge check measured."""

    dtype: str
    probe_sequences: int
    probe_tokens: int
    max_abs_diff: float
    logits_rms: float
    tolerance: float
    passed: bool
    peft_layers_left: list[str] = field(default_factory=list)
    reload_max_abs_diff: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def base_dtype(base_path: str | Path, setting: str) -> torch.dtype:
    """The dtype to merge in: the configured one, or the base checkpoint's own."""
    import json

    if setting != "auto":
        return DTYPES[setting]
    path = Path(base_path) / "config.json"
    if not path.is_file():  # e.g. a multi-codebook artifact: its backbone config lives below
        return torch.float32
    config = json.loads(path.read_text())
    name = str(config.get("dtype") or config.get("torch_dtype") or "float32").replace("torch.", "")
    return getattr(torch, name, torch.float32) if name in ("float32", "float16", "bfloat16") else torch.float32


def check_base(recorded: dict[str, Any] | None, base_path: str | Path, base_uri: str) -> None:
    """Refuse a base model whose fingerprint differs from the one the adapter was trained on."""
    if not recorded:
        raise ExportError(f"the LLM artifact records no base fingerprint; cannot check {base_uri}")
    problems = fingerprint_mismatch(recorded, fingerprint_checkpoint(base_path))
    if problems:
        raise ExportError(f"base model {base_uri} is not the one the adapter was trained on: "
                          + "; ".join(problems[:5]) + " (set export.base_model to the original base)")


def _forward(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    logits = [out.logits, *(getattr(out, "codebook_logits", None) or ())]
    mask = batch["attention_mask"].bool()
    return torch.cat([lg[mask].float().reshape(-1) for lg in logits])


def peft_layers(model: torch.nn.Module) -> list[str]:
    """Names of modules that still carry PEFT adapters (LoRA, trainable tokens)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    left = [name for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)]
    left += [name for name, _ in model.named_parameters() if "lora_" in name or "token_adapter" in name]
    return sorted(set(left))


@torch.no_grad()
def merge_llm(artifact: Path, manifest: dict[str, Any], base_path: Path, dtype: torch.dtype,
              probe: dict[str, torch.Tensor], tolerance: float | None = None) -> tuple[torch.nn.Module, Verification]:
    """The merged model and the proof that it computes what base + adapter computed.

    Raises:
        ExportError: The adapter does not fit the base (e.g. its target modules are missing), or the
            merged logits differ beyond the tolerance, or PEFT layers remain.
    """
    model = load_base(base_path, dtype, "eager" if dtype == torch.float32 else "sdpa", recorded_settings(manifest))
    rows = int(manifest.get("embedding_rows") or model.get_input_embeddings().weight.shape[0])
    resize_embeddings(model, rows, new_rows_trained(manifest), mean_resizing=False)  # untrained rows as trained
    try:  # a multi-codebook artifact's tables and heads come along (on the backbone of a family-built wrapper)
        model = attach_adapter(model, artifact).to(dtype)
    except (ValueError, KeyError, RuntimeError, OSError) as err:
        raise ExportError(f"the adapter in {artifact} (or its codebook tables and heads) does not fit the base "
                          f"model {base_path}: {err}") from None
    model.eval()
    reference = _forward(model, probe)
    model = merge_adapter(model)
    merged = _forward(model, probe)
    diff = float((merged - reference).abs().max())
    rms = float(reference.square().mean().sqrt())
    tol = (tolerance if tolerance is not None else TOLERANCE[dtype]) * max(rms, 1.0)
    left = peft_layers(model)
    verification = Verification(dtype=str(dtype).replace("torch.", ""),
                                probe_sequences=int(probe["input_ids"].shape[0]),
                                probe_tokens=int(probe["attention_mask"].sum()), max_abs_diff=diff, logits_rms=rms,
                                tolerance=tol, passed=diff <= tol and not left, peft_layers_left=left)
    log.info("merge check: max |Δlogit| %.3g (tolerance %.3g, logits RMS %.3g) over %d tokens; %d PEFT layers left",
             diff, tol, rms, verification.probe_tokens, len(left))
    if left:
        raise ExportError(f"PEFT layers remain after merge_and_unload: {left[:5]}")
    if diff > tol:
        raise ExportError(f"the merged model's logits differ from base + adapter by {diff:.4g} > {tol:.4g} "
                          f"({verification.dtype}); nothing was published")
    return model, verification


def save_merged(model: torch.nn.Module, base_path: Path, out: Path, max_shard_size: str = "5GB") -> None:
    """Write the merged ``model`` into ``out`` with the family of the base it was merged into (its layout)."""
    save_model(model, out, family_for(base_path), max_shard_size=max_shard_size)


def _runs_own_code(model: torch.nn.Module) -> bool:
    backbone = model.backbone if isinstance(model, MultiCodebookLM) else getattr(model, "lm", model)  # Kimi: .lm
    return type(backbone).__module__.startswith("transformers_modules")


@torch.no_grad()
def check_reload(saved: Path, model: torch.nn.Module, probe: dict[str, torch.Tensor], dtype: torch.dtype,
                 verification: Verification, settings: Any = None) -> None:
    """Reload the saved merged model with its family (strictly) and compare its logits with ``model``'s.

    ``settings`` (the ``llm`` section) decides whether the model's own code may run; None: it may when
    ``model`` already runs it (the files were copied beside the weights when it was saved).
    """
    from audiotune.config import LLMStageConfig

    if settings is None:
        settings = LLMStageConfig(trust_remote_code=_runs_own_code(model))
    expected = _forward(model, probe)
    reloaded = load_model(saved, settings, dtype, "eager" if dtype == torch.float32 else "sdpa")
    if isinstance(model, MultiCodebookLM) and not isinstance(reloaded, MultiCodebookLM):
        reloaded = MultiCodebookLM.from_saved(reloaded, saved).to(dtype)
    reloaded.eval()
    diff = float((_forward(reloaded, probe) - expected).abs().max())
    verification.reload_max_abs_diff = diff
    if diff > verification.tolerance:
        raise ExportError(f"the saved model in {saved} reloads with different logits (max |Δ| {diff:.4g})")


def load_full(artifact: Path, dtype: torch.dtype) -> torch.nn.Module:
    """A fully fine-tuned (or from-scratch) LLM artifact, as saved."""
    from audiotune.models.lm import load_trained

    try:
        model, _ = load_trained(artifact, None, dtype)
    except (OSError, ValueError) as err:
        raise ModelError(f"cannot load the LLM in {artifact}: {err}") from None
    return model.eval()

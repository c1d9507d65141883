"""Saving and strictly loading flow weights: ``config.json`` + ``model.safetensors``.

A starting checkpoint (``flow.base_flow``) is a Flow artifact (``manifest.json`` of kind
``audiotune.flow``) or a bare directory with the two files, local or ``s3://``. Loading is
strict: any missing, unexpected or mis-shaped tensor is an error that lists them all.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from audiotune.errors import ModelLoadError
from audiotune.models.flow.config import FlowConfig, FlowConfigError
from audiotune.models.flow.model import FlowModel

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FLOW_KIND = "audiotune.flow"  # == audiotune.artifacts.FLOW (models do not import the artifact layer)
_SHOWN = 20


class FlowLoadError(ModelLoadError):
    """A flow checkpoint that cannot be loaded (missing files, bad config, weights that do not fit)."""


def _listed(names: list[str]) -> str:
    shown = ", ".join(names[:_SHOWN])
    return shown + (f" ... ({len(names)} in all)" if len(names) > _SHOWN else "")


def state_dict_problems(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    """What keeps ``state`` from loading strictly into ``model``: missing keys, unexpected keys and
    shape mismatches (each a line listing the keys); empty when it fits exactly."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = sorted(f"{k} (checkpoint {tuple(state[k].shape)}, model {tuple(expected[k].shape)})"
                    for k in set(expected) & set(state) if tuple(state[k].shape) != tuple(expected[k].shape))
    problems = []
    if missing:
        problems.append(f"missing keys: {_listed(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_listed(unexpected)}")
    if shapes:
        problems.append(f"shape mismatches: {_listed(shapes)}")
    return problems


def load_state_dict_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load ``state`` into ``model`` only if every key and shape matches exactly.

    Raises:
        FlowLoadError: listing missing keys, unexpected keys and shape mismatches.
    """
    problems = state_dict_problems(model, state)
    if problems:
        raise FlowLoadError(f"{source}: the weights do not fit the model built from its config.json; "
                            + "; ".join(problems))
    model.load_state_dict(state, strict=True)


def save_flow(model: FlowModel, directory: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Write ``config.json`` and ``model.safetensors`` of a plain (LoRA-merged) flow model.

    Args:
        model: The model (its config and, unless ``state_dict`` is given, its weights).
        directory: Local directory (created if missing).
        state_dict: Weights to save instead of the model's own.

    Raises:
        ValueError: The model still has LoRA layers (merge them first).
    """
    from safetensors.torch import save_file

    state = model.state_dict() if state_dict is None else state_dict
    adapters = [k for k in state if "lora_" in k or ".base_layer." in k]
    if adapters:
        raise ValueError(f"save_flow: the model still has LoRA layers ({adapters[0]} ...); merge them first "
                         "(audiotune.models.flow.merge_lora)")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_FILE).write_text(json.dumps(model.config.to_dict(), indent=2) + "\n")
    save_file({k: v.detach().to("cpu").contiguous() for k, v in state.items()}, str(directory / WEIGHTS_FILE),
              metadata={"format": "pt", "kind": FLOW_KIND})


def read_flow_config(directory: str | Path) -> FlowConfig:
    """The :class:`FlowConfig` of a local flow directory."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise FlowLoadError(f"{directory}: no {CONFIG_FILE} (expected a Flow artifact, a directory with "
                            f"{CONFIG_FILE} + {WEIGHTS_FILE}, or a CosyVoice / Step-Audio-EditX release folder with "
                            "its yaml + flow.pt)")
    try:
        return FlowConfig.from_dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, FlowConfigError) as err:
        raise FlowLoadError(f"{path}: {err}") from None


def load_flow(uri: str | Path, device: str | torch.device = "cpu") -> FlowModel:
    """Load a flow model from a Flow artifact, a ``config.json`` + ``model.safetensors`` directory, or a
    CosyVoice / Step-Audio-EditX release folder (yaml + ``flow.pt``; then a
    :class:`audiotune.models.flow.native.adapter.ReleaseFlow`, see :mod:`audiotune.models.flow.native.release`).

    Args:
        uri: Local path or ``s3://`` URI.
        device: Where to put the weights.

    Raises:
        FlowLoadError: Missing files, a bad config, an artifact of another kind, or weights that do
            not fit the config (listing every offending key).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from audiotune import storage
    from audiotune.models.flow.native.release import is_release_folder

    local = storage.local_copy(str(uri))
    manifest = local / "manifest.json"
    if manifest.is_file():
        kind = json.loads(manifest.read_text()).get("kind")
        if kind != FLOW_KIND:
            raise FlowLoadError(f"{uri} is a {kind!r} artifact, not a flow model ({FLOW_KIND})")
    if is_release_folder(local):
        from audiotune.models.flow.native.adapter import load_release_flow

        return load_release_flow(str(local)).to(device)
    config = read_flow_config(local)
    weights = local / WEIGHTS_FILE
    if not weights.is_file():
        raise FlowLoadError(f"{uri}: no {WEIGHTS_FILE}")
    try:
        state = load_file(str(weights), device=str(device))
    except (SafetensorError, OSError) as err:
        raise FlowLoadError(f"{weights}: not a readable safetensors file ({err})") from None
    model = FlowModel(config).to(device)
    load_state_dict_strict(model, state, str(uri))
    log.info("loaded flow %s (preset %s, %d tensors)", uri, config.preset, len(state))
    return model

"""Base-model families: the one place that decides how a base checkpoint is loaded and written back.

The llm stage (:func:`audiotune.models.lm.build_lm`), the joint stage and export
(:mod:`audiotune.export.merge`, through :func:`audiotune.models.lm.load_trained`) all load a base, or
a model saved in a base's layout, with :func:`load_model`, and export writes a merged model with
:func:`save_model`. Every load is strict: weights the checkpoint lacks, weights the architecture does
not use and weights of the wrong shape are one :class:`ModelError` listing them.

API (stable)
------------
A family is any object with these members::

    name: str          # short name, shown in messages and logs ("hf-causal-lm", "remote-code", ...)
    priority: int      # families are asked highest first; the plain Hugging Face family is 0
    def detect(self, config: dict, path: Path) -> bool
        # whether the checkpoint in ``path`` (config.json already parsed into ``config``) is this family's
    def load(self, path: Path, settings, dtype: torch.dtype, attn: str) -> nn.Module
        # the model, strictly loaded (use strict_from_pretrained or check_loading_info); ``settings`` is the
        # ``llm`` config section (LLMStageConfig: trust_remote_code, codebook_weights, ...), ``attn`` the
        # resolved attention kernel (sdpa, eager, flash_attention_2); raise ModelError for what cannot load
    def save(self, model: nn.Module, directory: Path, max_shard_size: str = "5GB") -> None
        # write ``model`` to ``directory`` in the family's own layout, so that load() reads it back
    def fit_vocab(self, vocab: AudioVocab, path: Path, tokens: str) -> AudioVocab   # optional
        # the vocabulary on the base's own ids where the family fixes them (the llm stage asks, if present)

- :func:`register` adds a family (one with the same name is replaced); a module defining a family calls it
  at import. The modules in :data:`PLUGIN_MODULES` are imported on the first lookup, when they exist.
- :func:`family_for` is the family of a checkpoint folder; :func:`load_model` / :func:`save_model` use it.
- :func:`strict_from_pretrained` loads with ``output_loading_info=True`` and refuses what did not load;
  ``allowed_missing`` names the weights a family creates on purpose (a new head), each with the reason.
- :func:`recorded_settings` rebuilds the ``llm`` section an LLM artifact was trained with (export, joint).

Built in: ``hf-causal-lm`` (any causal LM transformers knows), ``remote-code`` (a base whose code ships
with its weights: ``auto_map`` in config.json, e.g. Step-Audio-EditX's ``Step1ForCausalLM``; loaded only
with ``llm.trust_remote_code``); ``moss-asteroid-tts`` (:mod:`audiotune.models.moss`) and ``kimi-audio``
(:mod:`audiotune.models.kimi`: its own code, two streams in, Whisper features, two heads out) are plugins.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from audiotune.errors import EXIT_USAGE, ModelLoadError
from audiotune.models.fingerprint import remote_code_files

log = logging.getLogger(__name__)

PLUGIN_MODULES = ("audiotune.models.moss", "audiotune.models.kimi")  # modules that register families of their own
_SHOWN = 5  # names listed per kind of problem


class ModelError(ModelLoadError):
    """A base model or LoRA setting that cannot be used; the message says what to change."""


class RemoteCodeNotTrusted(ModelError):
    """A base that needs its own Python code while ``llm.trust_remote_code`` is off (a setting to change)."""

    exit_code = EXIT_USAGE


class BaseFamily(Protocol):
    """What a family provides (see the module docstring)."""

    name: str
    priority: int

    def detect(self, config: dict[str, Any], path: Path) -> bool: ...

    def load(self, path: Path, settings: Any, dtype: torch.dtype, attn: str) -> nn.Module: ...

    def save(self, model: nn.Module, directory: Path, max_shard_size: str = "5GB") -> None: ...


# ------------------------------------------------------------------------------------------------ checks
def check_base_dir(path: Path) -> None:
    """Refuse what is not a local Hugging Face model folder with safetensors weights."""
    if not path.is_dir():
        raise ModelError(f"base model {path} does not exist or is not a directory")
    if not (path / "config.json").exists():
        raise ModelError(f"base model {path} has no config.json: not a Hugging Face model directory")
    if not any(path.glob("*.safetensors")):
        pickled = sorted(p.name for p in path.glob("*.bin"))
        hint = f" (found {', '.join(pickled)}: pickled weights are not loaded; convert them to safetensors)" \
            if pickled else ""
        raise ModelError(f"base model {path} has no *.safetensors weights{hint}")


def read_config(path: Path) -> dict[str, Any]:
    """config.json of a model folder, with a clear error when it is not JSON."""
    try:
        return json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as err:
        raise ModelError(f"base model {path}: cannot read config.json ({err})") from None


def _names(keys, shown: int = _SHOWN) -> str:
    keys = sorted(keys)
    more = f", … ({len(keys) - shown} more)" if len(keys) > shown else ""
    return ", ".join(keys[:shown]) + more


def check_loading_info(info: Mapping[str, Any], path: Path, architecture: str,
                       allowed_missing: Mapping[str, str] | None = None) -> None:
    """Refuse a load that left weights missing, unused or mis-shaped (transformers' ``output_loading_info``).

    Args:
        info: ``missing_keys``, ``unexpected_keys``, ``mismatched_keys`` (name, checkpoint shape, model shape).
        path: The checkpoint folder (for the message).
        architecture: The class the weights were loaded into (for the message).
        allowed_missing: Weights created on purpose, by name, each with why (logged, not refused).
    """
    allowed = dict(allowed_missing or {})
    missing = set(info.get("missing_keys") or ())
    created = sorted(missing & set(allowed))
    missing -= set(allowed)
    unexpected = set(info.get("unexpected_keys") or ())
    mismatched = {m[0]: m[1:] for m in info.get("mismatched_keys") or ()}
    for name in created:
        log.info("%s: %s is not in the checkpoint; created on purpose (%s)", path, name, allowed[name])
    if not (missing or unexpected or mismatched):
        return
    problems = []
    if missing:
        problems.append(f"{len(missing)} weights of {architecture} are not in the checkpoint ({_names(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} checkpoint weights are not used by {architecture} "
                        f"({_names(unexpected)})")
    if mismatched:
        shapes = [f"{k} {tuple(v[0])} vs {tuple(v[1])}" for k, v in sorted(mismatched.items())]
        problems.append(f"{len(mismatched)} weights have another shape in the checkpoint than in the model "
                        f"({_names(shapes)})")
    raise ModelError(f"base model {path} does not load as {architecture}: " + "; ".join(problems)
                     + ". These weights would start from random values. Check that config.json's architectures "
                     "and model_type describe the weights (a relabelled checkpoint is not a conversion); a "
                     "checkpoint in another layout needs its own base family (audiotune.models.families)")


def strict_from_pretrained(loader: Any, path: Path, allowed_missing: Mapping[str, str] | None = None,
                           **kwargs: Any) -> nn.Module:
    """``loader.from_pretrained(path, **kwargs)`` that refuses weights that did not load (see
    :func:`check_loading_info`). Mis-shaped weights are collected rather than raised by transformers."""
    try:
        model, info = loader.from_pretrained(str(path), output_loading_info=True, ignore_mismatched_sizes=True,
                                             use_safetensors=True, **kwargs)
    except (OSError, RuntimeError, ValueError, KeyError) as err:  # unreadable files, a config it cannot use
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelError(f"base model {path}: cannot load its weights ({first})") from None
    check_loading_info(info, path, type(model).__name__, allowed_missing)
    return model


def _trusted(settings: Any) -> bool:
    return bool(getattr(settings, "trust_remote_code", False))


def recorded_settings(manifest: Mapping[str, Any]) -> Any:
    """The ``llm`` section an LLM artifact was trained with (its manifest's ``config``), defaults where it is
    older than a field: what export and the joint stage load the base with."""
    from pydantic import ValidationError

    from audiotune.config import LLMStageConfig

    config = dict(manifest.get("config") or {})
    try:
        return LLMStageConfig.model_validate(config)
    except ValidationError:
        return LLMStageConfig(trust_remote_code=bool(config.get("trust_remote_code", False)))


# ---------------------------------------------------------------------------------------------- families
class HFCausalLM:
    """Any causal LM transformers itself knows (Qwen2/3, Llama, GPT-2, ...), loaded with AutoModelForCausalLM."""

    name, priority = "hf-causal-lm", 0

    def detect(self, config: dict[str, Any], path: Path) -> bool:
        return True  # the fallback: load() says why a checkpoint is not one

    def load(self, path: Path, settings: Any, dtype: torch.dtype, attn: str) -> nn.Module:
        from transformers import AutoModelForCausalLM
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        config = read_config(path)
        model_type = config.get("model_type")
        if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
            raise ModelError(f"base model {path} is a {model_type!r} model, not a causal LM "
                             f"(AutoModelForCausalLM cannot load it)")
        causal = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]
        causal = {causal} if isinstance(causal, str) else set(causal)
        architectures = config.get("architectures") or []
        if architectures and not causal & set(architectures):
            raise ModelError(f"base model {path} holds {', '.join(architectures)}, which has no causal-LM head "
                             f"(expected {', '.join(sorted(causal))}); its head would start from random weights")
        return strict_from_pretrained(AutoModelForCausalLM, path, dtype=dtype, attn_implementation=attn,
                                      trust_remote_code=False)

    def save(self, model: nn.Module, directory: Path, max_shard_size: str = "5GB") -> None:
        model.save_pretrained(str(directory), max_shard_size=max_shard_size)


class RemoteCode(HFCausalLM):
    """A causal LM whose Python code ships with its weights (config.json ``auto_map``), or whose model_type
    transformers does not know. Loaded only with ``llm.trust_remote_code``; attention falls back to what the
    class supports (``_supports_sdpa`` / ``_supports_flash_attn``, else eager)."""

    name, priority = "remote-code", 10

    def detect(self, config: dict[str, Any], path: Path) -> bool:
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

        return "auto_map" in config or config.get("model_type") not in CONFIG_MAPPING_NAMES

    def load(self, path: Path, settings: Any, dtype: torch.dtype, attn: str) -> nn.Module:
        from transformers import AutoModelForCausalLM

        config = read_config(path)
        ref = (config.get("auto_map") or {}).get("AutoModelForCausalLM")
        if not _trusted(settings):
            what = f"its own code (auto_map: {ref})" if ref else \
                f"code transformers does not have (model_type {config.get('model_type')!r})"
            raise RemoteCodeNotTrusted(f"base model {path} needs {what}; audiotune runs a model's own code only "
                                       "with llm.trust_remote_code=true (read the .py files first)")
        if not ref:
            raise ModelError(f"base model {path}: model_type {config.get('model_type')!r} is unknown to this "
                             "transformers and config.json names no code for AutoModelForCausalLM (auto_map)")
        files = remote_code_files(path)
        if "--" in ref or not files:
            raise ModelError(f"base model {path}: auto_map names {ref}, which is not a .py file in the base folder "
                             "(code from another repository is not loaded)")
        attn = _supported_attention(path, ref, attn)
        log.info("base model %s runs its own code (%s): %s", path, ref,
                 ", ".join(f"{k} sha256 {v[:12]}" for k, v in files.items()))
        return strict_from_pretrained(AutoModelForCausalLM, path, dtype=dtype, attn_implementation=attn,
                                      trust_remote_code=True)


def _supported_attention(path: Path, ref: str, attn: str) -> str:
    """``attn`` if the remote class supports it, else the best kernel it does (sdpa, then eager)."""
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    try:
        cls = get_class_from_dynamic_module(ref, str(path))
    except (OSError, ImportError, AttributeError, SyntaxError) as err:
        raise ModelError(f"base model {path}: its code ({ref}) does not import: {err}") from None
    supports = {"flash_attention_2": bool(getattr(cls, "_supports_flash_attn", False)),
                "sdpa": bool(getattr(cls, "_supports_sdpa", False)), "eager": True}
    chosen = next(a for a in (attn, "sdpa", "eager") if supports.get(a, False))
    if chosen != attn:
        log.info("%s does not support %s attention: using %s", cls.__name__, attn, chosen)
    return chosen


def _weight_names(path: Path) -> list[str]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            return list(json.loads(index.read_text()).get("weight_map", {}))
        except ValueError:
            return []
    from safetensors import safe_open

    names: list[str] = []
    for file in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt") as f:
                names.extend(f.keys())
        except (OSError, ValueError, RuntimeError):  # not readable: the load itself will say so
            continue
    return names


# ---------------------------------------------------------------------------------------------- registry
_FAMILIES: dict[str, BaseFamily] = {}
_plugins_loaded = False


def register(family: BaseFamily) -> None:
    """Add ``family`` to the registry (replacing one of the same name)."""
    _FAMILIES[family.name] = family


def families() -> list[BaseFamily]:
    """The registered families, in the order they are asked (highest priority first)."""
    global _plugins_loaded
    if not _plugins_loaded:
        _plugins_loaded = True
        for module in PLUGIN_MODULES:
            if importlib.util.find_spec(module) is not None:
                importlib.import_module(module)
    return sorted(_FAMILIES.values(), key=lambda f: -f.priority)


def family_for(path: str | Path) -> BaseFamily:
    """The family of the checkpoint folder ``path`` (which must hold config.json and safetensors)."""
    path = Path(path)
    check_base_dir(path)
    config = read_config(path)
    for family in families():
        if family.detect(config, path):
            return family
    raise ModelError(f"base model {path}: no base family recognises it")  # unreachable: hf-causal-lm takes all


def load_model(path: str | Path, settings: Any, dtype: torch.dtype, attn: str) -> nn.Module:
    """Load the checkpoint in ``path`` with its family, strictly; ``use_cache`` off for training."""
    path = Path(path)
    family = family_for(path)
    log.debug("base model %s: family %s", path, family.name)
    model = family.load(path, settings, dtype, attn)
    if hasattr(model, "config"):
        model.config.use_cache = False  # a KV cache during training would make packed samples attend to each other
    return model


def save_model(model: nn.Module, directory: str | Path, family: BaseFamily,
               max_shard_size: str = "5GB") -> None:
    """Write ``model`` with ``family`` (the one it was loaded with) into ``directory``."""
    family.save(model, Path(directory), max_shard_size=max_shard_size)


for _family in (HFCausalLM(), RemoteCode()):
    register(_family)

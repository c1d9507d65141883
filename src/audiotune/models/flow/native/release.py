"""CosyVoice / Step-Audio-EditX release folders: detect, load strictly, write back in the same layout.

A release folder holds the hyperpyyaml config (``cosyvoice.yaml``, ``cosyvoice2.yaml`` or
``cosyvoice3.yaml``), ``flow.pt`` (``torch.save(flow.state_dict())``) and usually ``hift.pt``
(the vocoder), ``campplus.onnx`` and a speech tokenizer. :func:`load_release` reads the yaml as
data (:mod:`audiotune.models.flow.native.hyperyaml`: nothing it names is imported), builds the flow
named in its ``flow:`` section with our native modules, and loads ``flow.pt`` with
``torch.load(weights_only=True)`` strictly: missing, unexpected or mis-shaped tensors are one error
listing them. :func:`save_release` writes the upstream layout back — ``flow.pt`` (a plain state dict
of contiguous tensors with the keys and dtypes that were loaded), the yaml unchanged, ``hift.pt``
(copied byte for byte when it was not changed) — plus our ``model.safetensors`` of the same tensors,
so upstream's own inference code loads what we write with a strict ``load_state_dict``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pickle
import shutil
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from audiotune.models.flow.io import FlowLoadError, state_dict_problems
from audiotune.models.flow.native.hyperyaml import Name, New, ReleaseYamlError

log = logging.getLogger(__name__)

YAML_NAMES = ("cosyvoice.yaml", "cosyvoice2.yaml", "cosyvoice3.yaml")
FLOW_FILE = "flow.pt"
HIFT_FILE = "hift.pt"
SAFETENSORS_FILE = "model.safetensors"
INFO_FILE = "release.json"  # what we read from the yaml (arch, mel, vocab, rates), for people and tools
ARCHS = {
    "cosyvoice.flow.flow.MaskedDiffWithXvec": "cosyvoice-300m",
    "cosyvoice.flow.flow.CausalMaskedDiffWithXvec": "cosyvoice2",
    "stepvocoder.cosyvoice2.flow.flow.CausalMaskedDiffWithXvec": "step-audio-editx",
}
NATIVE_ARCHS = ("cosyvoice-300m", "cosyvoice2", "step-audio-editx")
# the yaml's mel keys (matcha.utils.audio.mel_spectrogram's arguments) → our Tokens' mel.json names
MEL_KEYS = {"sampling_rate": "sample_rate", "n_fft": "n_fft", "hop_size": "hop_length", "win_size": "win_length",
            "num_mels": "n_mels", "fmin": "fmin", "fmax": "fmax", "center": "center"}


class ReleaseError(FlowLoadError):
    """A release folder that cannot be loaded or written (missing file, bad yaml, weights that do not fit)."""


@dataclass
class ReleaseInfo:
    """What a release folder says about its flow (from the yaml and the loaded weights).

    Attributes:
        arch: ``cosyvoice-300m``, ``cosyvoice2`` or ``step-audio-editx``.
        flow_class: The ``flow:`` section's class as written in the yaml.
        yaml_name: The yaml's file name (written back under the same name).
        yaml_text: The yaml, unchanged.
        mel: The target-mel settings in our Tokens' names (``sample_rate``, ``n_fft``, ``hop_length``,
            ``win_length``, ``n_mels``, ``fmin``, ``fmax``, ``center``); empty when the yaml gives none.
        n_mels: The flow's output channels.
        vocab_size: Rows of the speech-token embedding.
        spk_embed_dim: Length of the x-vector the flow is conditioned on.
        token_rate: Speech tokens per second.
        mel_frames_per_token: Mel frames per speech token (the flow's output length per token).
        token_mel_ratio: The yaml's ``token_mel_ratio`` (CosyVoice2), or the encoder's up-sampling
            stride (Step-Audio-EditX); None for CosyVoice-300M (it interpolates).
        dtypes: dtype of each ``flow.pt`` tensor as loaded (``save_release`` writes the same).
        has_hift: Whether the folder has ``hift.pt`` and the yaml a ``hift:`` section.
        source: Where it was loaded from (local folder).
    """

    arch: str
    flow_class: str
    yaml_name: str
    yaml_text: str
    mel: dict[str, Any]
    n_mels: int
    vocab_size: int
    spk_embed_dim: int
    token_rate: float | None
    mel_frames_per_token: float | None
    token_mel_ratio: int | None
    dtypes: dict[str, str] = field(default_factory=dict)
    has_hift: bool = False
    source: str = ""

    def summary(self) -> dict[str, Any]:
        """JSON-ready, without the yaml text and the per-tensor dtypes (manifests, ``release.json``)."""
        out = dataclasses.asdict(self)
        for key in ("yaml_text", "dtypes"):
            out.pop(key)
        return out

    def parsed(self) -> dict[str, Any]:
        """The yaml parsed again as data (sections ``flow``, ``hift`` and the mel settings)."""
        return _parse(self.yaml_text, self.yaml_name)


def _parse(text: str, source: str) -> dict[str, Any]:
    from audiotune.models.flow.native.hyperyaml import parse_release_yaml

    try:
        return parse_release_yaml(text, source)
    except ReleaseYamlError as err:
        raise ReleaseError(str(err)) from None


def find_yaml(directory: Path) -> Path | None:
    """The folder's release yaml (the first of :data:`YAML_NAMES` present), or None."""
    return next((directory / n for n in YAML_NAMES if (directory / n).is_file()), None)


def is_release_folder(uri: str | Path) -> bool:
    """Whether ``uri`` (local or ``s3://``) looks like a release folder: a release yaml or ``flow.pt``, and no
    ``config.json`` of our own flow layout."""
    from audiotune import storage

    if storage.is_s3(uri):
        names = (FLOW_FILE, *YAML_NAMES)
        return any(storage.exists(storage.join(str(uri), n)) for n in names) and \
            not storage.exists(storage.join(str(uri), "config.json"))
    path = Path(uri)
    return path.is_dir() and not (path / "config.json").is_file() and \
        ((path / FLOW_FILE).is_file() or find_yaml(path) is not None)


def _mel_settings(doc: dict[str, Any], source: str) -> dict[str, Any]:
    node = doc.get("mel_conf") or doc.get("feat_extractor")
    kwargs = node.kwargs if isinstance(node, (Name, New)) else node if isinstance(node, dict) else {}
    mel = {ours: kwargs[theirs] for theirs, ours in MEL_KEYS.items() if theirs in kwargs}
    if mel and "center" not in mel:
        mel["center"] = False  # matcha's mel_spectrogram default
    if mel and "win_length" not in mel and "n_fft" in mel:
        mel["win_length"] = mel["n_fft"]
    return mel


def _int(value: Any, key: str, source: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
        raise ReleaseError(f"{source}: flow.{key} is {value!r}, expected an integer")
    return int(value)


def release_info(doc: dict[str, Any], yaml_path: Path, yaml_text: str, model: torch.nn.Module | None = None
                 ) -> ReleaseInfo:
    """The :class:`ReleaseInfo` of a parsed yaml (and, when given, the flow built from it)."""
    source = str(yaml_path)
    flow = doc.get("flow")
    if not isinstance(flow, New):
        raise ReleaseError(f"{source}: no `flow: !new:...` section (this yaml holds no flow decoder)")
    arch = ARCHS.get(flow.cls)
    if arch is None:
        raise ReleaseError(f"{source}: flow class {flow.cls!r} is not supported (supported: {', '.join(ARCHS)})")
    mel = _mel_settings(doc, source)
    n_mels = _int(flow.get("output_size", 80), "output_size", source)
    if mel.get("n_mels", n_mels) != n_mels:
        raise ReleaseError(f"{source}: the mel settings have {mel['n_mels']} bins but flow.output_size is {n_mels}")
    ratio = flow.get("token_mel_ratio")
    if arch == "step-audio-editx":
        encoder = flow.get("encoder")
        ratio = encoder.get("up_stride", 2) if isinstance(encoder, New) else 2
    ratio = getattr(model, "token_mel_ratio", None) or ratio
    ratio = _int(ratio, "token_mel_ratio", source) if ratio is not None and arch != "cosyvoice-300m" else None
    frames_per_s = (mel["sample_rate"] / mel["hop_length"]) if {"sample_rate", "hop_length"} <= set(mel) else None
    rate = flow.get("input_frame_rate")
    if ratio is not None:
        per_token = float(ratio)
        rate = frames_per_s / ratio if frames_per_s else rate
    else:
        per_token = frames_per_s / rate if (frames_per_s and rate) else None
    return ReleaseInfo(
        arch=arch, flow_class=flow.cls, yaml_name=yaml_path.name, yaml_text=yaml_text, mel=mel, n_mels=n_mels,
        vocab_size=_int(flow.get("vocab_size", 4096), "vocab_size", source),
        spk_embed_dim=_int(flow.get("spk_embed_dim", 192), "spk_embed_dim", source),
        token_rate=float(rate) if rate else None, mel_frames_per_token=per_token, token_mel_ratio=ratio,
        has_hift=isinstance(doc.get("hift"), New) and (yaml_path.parent / HIFT_FILE).is_file(),
        source=str(yaml_path.parent))


def read_state(path: Path, what: str = "flow weights") -> dict[str, torch.Tensor]:
    """A ``torch.save``'d state dict, read with ``weights_only=True``; only tensors are accepted.

    Raises:
        ReleaseError: A file that is not a torch file or is cut short, objects ``weights_only`` refuses
            (pickled classes, code), or entries that are not tensors.
    """
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ReleaseError(f"{path}: refused, it holds objects other than tensors ({what} must be a plain state "
                           f"dict; torch.load(weights_only=True) said: {first})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ReleaseError(f"{path}: not a readable torch file, truncated or damaged ({first})") from None
    if not isinstance(state, dict):
        raise ReleaseError(f"{path}: holds a {type(state).__name__}, expected a state dict (name → tensor)")
    odd = sorted(str(k) for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor))
    if odd:
        raise ReleaseError(f"{path}: entries that are not tensors: {', '.join(odd[:10])}; expected a plain state "
                           "dict (torch.save(flow.state_dict()))")
    return state


def build_release_flow(doc: dict[str, Any], source: str) -> torch.nn.Module:
    """The native flow module of a parsed yaml's ``flow:`` section (random weights)."""
    from audiotune.models.flow.native.flows import build_flow

    try:
        return build_flow(doc["flow"])
    except ReleaseYamlError as err:
        raise ReleaseError(f"{source}: {err}") from None
    except FlowLoadError as err:
        raise ReleaseError(f"{source}: {err}") from None


def build_from_yaml(uri: str | Path) -> torch.nn.Module:
    """The flow a release folder's yaml describes (random weights; ``flow.pt`` is not read): for sizing.

    Raises:
        ReleaseError: No release yaml in the folder, or one that cannot be built.
    """
    from audiotune import storage

    for name in YAML_NAMES:
        path = storage.join(str(uri), name)
        if storage.exists(path):
            return build_release_flow(_parse(storage.read_text(path), path), path)
    raise ReleaseError(f"{uri}: no release yaml (expected one of {', '.join(YAML_NAMES)})")


def load_release(uri: str | Path) -> tuple[torch.nn.Module, ReleaseInfo]:
    """Load the flow of a release folder (local or ``s3://``) strictly.

    Args:
        uri: The folder with the release yaml and ``flow.pt``.

    Returns:
        The native flow module (float32, eval mode) and its :class:`ReleaseInfo`.

    Raises:
        ReleaseError: No yaml or no ``flow.pt`` (naming the missing file), a yaml that is not data or names an
            unsupported class, a refused or damaged ``flow.pt``, or weights that do not fit (listing every
            missing, unexpected and mis-shaped tensor).
    """
    from audiotune import storage

    local = storage.local_copy(str(uri))
    if not local.is_dir():
        raise ReleaseError(f"{uri}: not a folder (expected a release folder with {' or '.join(YAML_NAMES)} and "
                           f"{FLOW_FILE})")
    yaml_path = find_yaml(local)
    if yaml_path is None:
        raise ReleaseError(f"{uri}: no release yaml (expected one of {', '.join(YAML_NAMES)} next to {FLOW_FILE})")
    weights = local / FLOW_FILE
    if not weights.is_file():
        raise ReleaseError(f"{uri}: no {FLOW_FILE} (the flow weights) next to {yaml_path.name}")
    try:
        text = yaml_path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ReleaseError(f"{yaml_path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    doc = _parse(text, str(yaml_path))
    release_info(doc, yaml_path, text)  # the supported-class and mel checks, before building anything
    model = build_release_flow(doc, str(yaml_path))
    info = release_info(doc, yaml_path, text, model)
    state = read_state(weights)
    problems = state_dict_problems(model, state)
    if problems:
        raise ReleaseError(f"{weights}: the weights do not fit the {info.arch} flow built from {yaml_path.name}; "
                           + "; ".join(problems))
    model.load_state_dict(state, strict=True)
    info.dtypes = {k: str(v.dtype).removeprefix("torch.") for k, v in state.items()}
    log.info("loaded %s flow from %s (%d tensors%s)", info.arch, uri, len(state),
             ", hift.pt present" if info.has_hift else "")
    return model.float().eval(), info


def release_state(model: torch.nn.Module, info: ReleaseInfo,
                  state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The flow's tensors as ``flow.pt`` holds them: the loaded keys and dtypes, contiguous, on the CPU.

    Raises:
        ReleaseError: LoRA layers still in the model, or keys other than the ones loaded.
    """
    state = model.state_dict() if state is None else state
    adapters = [k for k in state if "lora_" in k or ".base_layer." in k]
    if adapters:
        raise ReleaseError(f"the flow still has LoRA layers ({adapters[0]} ...); merge them before writing "
                           f"{FLOW_FILE}")
    if info.dtypes and set(state) != set(info.dtypes):
        missing, extra = sorted(set(info.dtypes) - set(state)), sorted(set(state) - set(info.dtypes))
        raise ReleaseError(f"the flow's tensors differ from the release's: missing {missing[:5]}, "
                           f"unexpected {extra[:5]}")
    out = {}
    for key, value in state.items():
        dtype = getattr(torch, info.dtypes[key]) if key in info.dtypes else value.dtype
        out[key] = value.detach().to(device="cpu", dtype=dtype).contiguous().clone()
    return out


def save_release(model: torch.nn.Module, info: ReleaseInfo, directory: str | Path,
                 hift_state: dict[str, torch.Tensor] | None = None,
                 state: dict[str, torch.Tensor] | None = None) -> list[str]:
    """Write a release folder: ``flow.pt``, the yaml unchanged, ``hift.pt``, plus ``model.safetensors`` and
    ``release.json``.

    Args:
        model: The native flow (LoRA merged); its tensors are written unless ``state`` is given.
        info: From :func:`load_release` (yaml, dtypes, source folder).
        directory: Local folder (created if missing).
        hift_state: A changed vocoder's state dict to write as ``hift.pt``; without it the source folder's
            ``hift.pt`` is copied byte for byte (when there is one).
        state: Tensors to write instead of the model's own.

    Returns:
        The file names written.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = release_state(model, info, state)
    torch.save(tensors, str(directory / FLOW_FILE))
    (directory / info.yaml_name).write_text(info.yaml_text, encoding="utf-8")
    written = [FLOW_FILE, info.yaml_name]
    source_hift = Path(info.source) / HIFT_FILE if info.source else None
    if hift_state is not None:
        torch.save({k: v.detach().cpu().contiguous() for k, v in hift_state.items()}, str(directory / HIFT_FILE))
        written.append(HIFT_FILE)
    elif source_hift is not None and source_hift.is_file() and source_hift.resolve() != (directory / HIFT_FILE
                                                                                          ).resolve():
        shutil.copyfile(source_hift, directory / HIFT_FILE)
        written.append(HIFT_FILE)
    save_file(tensors, str(directory / SAFETENSORS_FILE),
              metadata={"format": "pt", "kind": "audiotune.flow", "arch": info.arch, "layout": FLOW_FILE})
    (directory / INFO_FILE).write_text(json.dumps(info.summary(), indent=2) + "\n")
    return [*written, SAFETENSORS_FILE, INFO_FILE]

"""Which flow architecture a run trains, and whether a release flow fits the Tokens it is trained on.

``flow.arch`` is ``audiotune`` (our own flow) or one of the upstream architectures a release folder
holds (``cosyvoice-300m``, ``cosyvoice2``, ``step-audio-editx``); ``auto`` takes the base flow's.
:func:`arch_problem` says what is wrong with a combination of arch and base flow;
:func:`release_mismatches` lists every setting in which a release flow's yaml and the Tokens differ,
each naming both values. The stages turn them into their own errors.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from audiotune.models.flow.native.release import ARCHS, ReleaseInfo, find_yaml, is_release_folder

AUTO, AUDIOTUNE = "auto", "audiotune"
MEL_FIELDS = ("sample_rate", "n_fft", "hop_length", "win_length", "n_mels", "fmin", "fmax", "center")


def release_arch(base_flow: str) -> tuple[str | None, str | None]:
    """``(arch, flow class)`` named by a release folder's yaml; ``(None, None)`` when it cannot be read (the
    loader reports why)."""
    from audiotune import storage
    from audiotune.models.flow.native.hyperyaml import ReleaseYamlError, load_release_yaml

    local = storage.local_copy(base_flow)
    yaml_path = find_yaml(local) if local.is_dir() else None
    if yaml_path is None:
        return None, None
    try:
        node = load_release_yaml(yaml_path, sections=("flow",)).get("flow")
    except ReleaseYamlError:
        return None, None
    cls = getattr(node, "cls", None)
    return ARCHS.get(cls or ""), cls


def resolve_arch(arch: str, base_flow: str | None) -> tuple[str, str | None]:
    """``(concrete arch, problem)``: the arch a run trains, or a one-line problem naming both sides.

    ``auto`` becomes the release folder's arch (``release`` when its yaml cannot be read: the loader
    then says why) or ``audiotune``.
    """
    if not base_flow or not is_release_folder(base_flow):
        if arch not in (AUTO, AUDIOTUNE):
            found = f"{base_flow} is an audiotune flow (config.json)" if base_flow else "there is no base_flow"
            return arch, (f"flow.arch={arch} takes its sizes and weights from a release folder (yaml + flow.pt) "
                          f"given as flow.base_flow / --base-flow, but {found}")
        return AUDIOTUNE, None
    found, cls = release_arch(base_flow)
    if arch == AUDIOTUNE:
        return arch, (f"flow.arch=audiotune but {base_flow} is a release folder ({found or 'yaml + flow.pt'}); "
                      "set flow.arch=auto")
    if arch != AUTO and found is not None and found != arch:
        return arch, f"flow.arch={arch} but {base_flow} holds a {found} flow ({cls}); set flow.arch={found} or auto"
    return found or "release", None


def release_mismatches(release: ReleaseInfo, mel: Mapping[str, Any], codebook_size: int, codebooks_read: int,
                       token_rate: float, mel_frames_per_token: float, speaker_type: str,
                       speaker_dim: int, code_stream: Mapping[str, Any] | None = None) -> list[str]:
    """Every setting in which a release flow and the Tokens differ, each naming both values.

    Args:
        release: The release folder's :class:`ReleaseInfo`.
        mel: The Tokens' mel settings (``mel.json`` names).
        codebook_size: Codes per codebook in the Tokens.
        codebooks_read: Codebooks the flow would read (``flow.codebooks``).
        token_rate: Tokens per second.
        mel_frames_per_token: The Tokens' mel frames per token.
        speaker_type: ``embedding`` (an x-vector per row), ``id`` or ``none``, as the Tokens give it.
        speaker_dim: Length of the Tokens' x-vectors.
        code_stream: The Tokens' interleaved LM-id layout (``audio_tokenizer.code_stream``: Step-Audio-EditX's
            vq02/vq06 stream), read as upstream ``_reshape``'s pairs by a Step-Audio-EditX flow.
    """
    problems = []
    for key in MEL_FIELDS:
        if key in release.mel and release.mel[key] != mel.get(key):
            problems.append(f"mel {key}: release {release.mel[key]!r}, Tokens {mel.get(key)!r}")
    if not release.mel:
        problems.append(f"mel settings: release none ({release.yaml_name} has no feat_extractor / mel_conf), "
                        f"Tokens {dict(mel)}")
    codebooks = 2 if release.arch == "step-audio-editx" else 1
    if codebooks == 2 and code_stream:
        return problems + _stream_mismatches(release, code_stream) + _speaker(release, speaker_type, speaker_dim)
    if codebooks_read != codebooks:
        problems.append(f"codebooks read: release {codebooks}, Tokens give {codebooks_read} (see flow.codebooks)")
    elif codebooks == 1 and release.vocab_size != codebook_size:
        problems.append(f"speech-token vocabulary: release {release.vocab_size}, Tokens {codebook_size}")
    if release.token_rate and abs(release.token_rate - token_rate) > 1e-6:
        problems.append(f"token rate: release {release.token_rate:g} Hz, Tokens {token_rate:g} Hz")
    elif release.mel_frames_per_token and abs(release.mel_frames_per_token - mel_frames_per_token) > 1e-6:
        problems.append(f"mel frames per token: release {release.mel_frames_per_token:.4f}, Tokens "
                        f"{mel_frames_per_token:.4f}")
    return problems + _speaker(release, speaker_type, speaker_dim)


def _speaker(release: ReleaseInfo, speaker_type: str, speaker_dim: int) -> list[str]:
    if speaker_type != "embedding":
        return [f"speaker embedding: release an x-vector of {release.spk_embed_dim} values, Tokens speaker "
                f"conditioning {speaker_type!r} (set tokenize.speaker_embedding.type onnx)"]
    if speaker_dim != release.spk_embed_dim:
        return [f"speaker embedding size: release {release.spk_embed_dim}, Tokens {speaker_dim}"]
    return []


def pair_table_size(code_stream: Mapping[str, Any]) -> int:
    """Rows of the shared table upstream ``_reshape``'s pairs index (each codebook but the last + its pad row)."""
    sizes = [int(s) for s in code_stream["codebook_sizes"]]
    return sum(s + 1 for s in sizes[:-1]) + sizes[-1]


def _stream_mismatches(release: ReleaseInfo, code_stream: Mapping[str, Any]) -> list[str]:
    """A Step-Audio-EditX flow against an interleaved id stream: two codebooks, the pair table, the pair rate."""
    problems = []
    sizes = list(code_stream.get("codebook_sizes") or [])
    if len(sizes) != 2:
        return [f"codebooks in the stream: release 2 (vq02, vq06), Tokens {len(sizes)} ({sizes})"]
    if pair_table_size(code_stream) != release.vocab_size:
        problems.append(f"speech-token vocabulary: release {release.vocab_size}, Tokens' pair table "
                        f"{pair_table_size(code_stream)} (codebook_sizes {sizes})")
    rate = code_stream.get("frame_rate")
    if rate and release.token_rate and abs(float(rate) - release.token_rate) > 1e-6:
        problems.append(f"token rate: release {release.token_rate:g} pairs/s, Tokens {float(rate):g} pairs/s")
    return problems


def lora_targets(model: Any, targets: Sequence[str], default: Sequence[str]) -> list[str]:
    """``targets``; when they are ``default`` and the model is a release flow, its own attention and
    feed-forward layers (:data:`audiotune.models.flow.native.adapter.LORA_TARGETS`)."""
    from audiotune.models.flow.adapt import default_lora_targets

    if getattr(model.config, "release", None) is not None and list(targets) == list(default):
        return list(default_lora_targets(model))
    return list(targets)

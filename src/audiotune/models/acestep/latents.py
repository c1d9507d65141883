"""The ACE-Step Latents artifact: each song's VAE latents and packed conditioning, computed once.

Layout (a Tokens-like artifact; ``manifest.json`` written last)::

    manifest.json                 kind audiotune.acestep-latents, latent_dim, latents_per_second, ...
    shared.safetensors            silence_latent [1, T, D], null_condition_emb [1, 1, H]
    <split>/index.json            [{id, key, shard, frames, cond_len, repeat_count, prompt, lyrics, duration_s}]
    <split>/part-00000.safetensors  "<key>.latents" [T, D], "<key>.cond" [L, H]

The conditioning is the output of the pipeline's ``AceStepConditionEncoder`` for the song's caption and
lyrics (formatted by ``AceStepPipeline.encode_prompt``) with the silence timbre reference, as the pipeline
computes it for text-to-music; the latents are the mean of the pipeline's ``AutoencoderOobleck`` posterior.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from audiotune.models.acestep import AceStepError

log = logging.getLogger(__name__)

KIND = "audiotune.acestep-latents"
VERSION = 1
SHARED = "shared.safetensors"
INSTRUMENTAL = "[Instrumental]"  # lyrics of a song without a _lyrics.txt
TIMBRE_SECONDS = 30  # the pipeline's silence reference for the timbre encoder


@dataclass
class SongEntry:
    """One cached song (a row of ``<split>/index.json``)."""

    id: str
    key: str
    shard: str
    frames: int
    cond_len: int
    repeat_count: int
    prompt: str
    lyrics: str
    duration_s: float


def prompt_of(tags: list[str] | None) -> str:
    """The caption ACE-Step is conditioned on: the folder's comma-separated tags."""
    return ", ".join(tags or [])


def stereo_at(wav: np.ndarray, sr: int, target_sr: int, channels: int, max_seconds: float) -> torch.Tensor:
    """Mono float audio → ``[1, channels, samples]`` at the VAE's rate, cropped to ``max_seconds``."""
    import soxr

    if sr != target_sr:
        wav = soxr.resample(wav, sr, target_sr, quality="HQ")
    wav = wav[: int(max_seconds * target_sr)]
    audio = torch.from_numpy(np.ascontiguousarray(wav, dtype=np.float32))
    return audio.unsqueeze(0).expand(channels, -1).unsqueeze(0).contiguous()


@torch.no_grad()
def encode_song(pipe, audio: torch.Tensor, prompt: str, lyrics: str, *, vocal_language: str,
                max_text_length: int, max_lyric_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One song → (latents ``[T, D]``, conditioning ``[L, H]``) with the pipeline's own modules.

    Args:
        pipe: An ``AceStepPipeline``.
        audio: ``[1, channels, samples]`` at ``pipe.sample_rate``.
        prompt: The caption (tags).
        lyrics: The lyrics (:data:`INSTRUMENTAL` for none).
        vocal_language: Language code of the lyric prompt.
        max_text_length: Caption token limit.
        max_lyric_length: Lyric token limit.
    """
    device, dtype = pipe._execution_device, pipe.transformer.dtype
    posterior = pipe.vae.encode(audio.to(device=device, dtype=pipe.vae.dtype)).latent_dist
    latents = posterior.mean[0].transpose(0, 1).to(dtype)  # [D, T] -> [T, D]
    duration = audio.shape[-1] / pipe.sample_rate
    text, text_mask, lyric, lyric_mask = pipe.encode_prompt(
        prompt=prompt, lyrics=lyrics, device=device, vocal_language=vocal_language, audio_duration=duration,
        max_text_length=max_text_length, max_lyric_length=max_lyric_length)
    frames = math.ceil(TIMBRE_SECONDS * pipe.latents_per_second)
    silence = pipe.condition_encoder.silence_latent[:, :frames, :].to(device=device, dtype=dtype)
    cond, mask = pipe.condition_encoder(
        text_hidden_states=text.to(dtype), text_attention_mask=text_mask, lyric_hidden_states=lyric.to(dtype),
        lyric_attention_mask=lyric_mask, refer_audio_acoustic_hidden_states_packed=silence,
        refer_audio_order_mask=torch.zeros(1, device=device, dtype=torch.long))
    return latents.cpu(), cond[0][mask[0]].cpu()


def silence_context(silence: torch.Tensor, frames: int) -> torch.Tensor:
    """The text-to-music context ``[frames, 2D]``: the silence latent tiled (as ``prepare_src_latents``) and a
    chunk mask of ones (``_build_chunk_mask``)."""
    reps = math.ceil(frames / silence.shape[1])
    src = silence[0].repeat(reps, 1)[:frames]
    return torch.cat([src, torch.ones_like(src)], dim=-1)


class SplitWriter:
    """Writes one split's songs into ``part-NNNNN.safetensors`` shards and ``index.json``."""

    def __init__(self, directory: Path, rows_per_shard: int = 64):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.rows_per_shard = rows_per_shard
        self.entries: list[SongEntry] = []
        self._tensors: dict[str, torch.Tensor] = {}
        self._shard = 0

    def add(self, row_id: str, latents: torch.Tensor, cond: torch.Tensor, *, repeat_count: int, prompt: str,
            lyrics: str, duration_s: float) -> None:
        key = str(len(self.entries))
        self._tensors[f"{key}.latents"] = latents.contiguous()
        self._tensors[f"{key}.cond"] = cond.contiguous()
        self.entries.append(SongEntry(row_id, key, f"part-{self._shard:05d}.safetensors", int(latents.shape[0]),
                                      int(cond.shape[0]), int(repeat_count), prompt, lyrics, float(duration_s)))
        if len(self._tensors) >= 2 * self.rows_per_shard:
            self._flush()

    def _flush(self) -> None:
        if self._tensors:
            save_file(self._tensors, str(self.directory / f"part-{self._shard:05d}.safetensors"))
            self._tensors = {}
            self._shard += 1

    def close(self) -> int:
        self._flush()
        (self.directory / "index.json").write_text(json.dumps([asdict(e) for e in self.entries], indent=1) + "\n")
        return len(self.entries)


class LatentSplit:
    """A split of a Latents artifact, read lazily (one open handle per shard)."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        index = self.directory / "index.json"
        try:
            self.entries = [SongEntry(**e) for e in json.loads(index.read_text())] if index.is_file() else []
        except (json.JSONDecodeError, TypeError) as err:
            raise AceStepError(f"{index}: not a Latents index ({err})") from None
        self._handles: dict[str, Any] = {}

    def __len__(self) -> int:
        return len(self.entries)

    def tensors(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(latents ``[T, D]``, conditioning ``[L, H]``) of entry ``i``."""
        e = self.entries[i]
        if e.shard not in self._handles:
            path = self.directory / e.shard
            if not path.is_file():
                raise AceStepError(f"{path}: shard named by index.json is missing (song {e.id})")
            self._handles[e.shard] = safe_open(str(path), framework="pt")
        handle = self._handles[e.shard]
        return handle.get_tensor(f"{e.key}.latents"), handle.get_tensor(f"{e.key}.cond")


def read_shared(root: Path) -> dict[str, torch.Tensor]:
    """``silence_latent`` and ``null_condition_emb`` of a Latents artifact."""
    path = Path(root) / SHARED
    if not path.is_file():
        raise AceStepError(f"{path}: missing; re-run encode acestep")
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}

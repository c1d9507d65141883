"""A release flow (CosyVoice-300M, CosyVoice2, Step-Audio-EditX) behind the API of our own flow model.

:class:`ReleaseFlow` wraps the native container (``.native``, upstream's keys below it) and answers
what the flow stage, the joint stage, the engine and synthesis ask of
:class:`audiotune.models.flow.FlowModel`: ``forward(codes, …, noise_seed)`` → the training loss,
``sample`` / ``inference`` → mels, ``config`` (:class:`ReleaseFlowConfig`), and the estimator for
LoRA. Checkpoints, EMA and ZeRO see an ordinary module.

Training loss: upstream's ``flow.forward`` + ``decoder.compute_loss``, computed by the container's own
``flows.NativeFlow.flow_matching_loss`` (the one implementation) fed each example's draws (the release's
own ``sigma_min``, ``training_cfg_rate`` and training-``t`` schedule; the estimator sees ``y = (1 − (1 − σ)t)z + t·x1``
and regresses ``u = x1 − (1 − σ)z``; the MSE runs over every valid frame **including the prompt
prefix**, as upstream — our own flow leaves the prompt out). Where it differs from upstream:

* the random draws — whether a row gets a prompt and how long (``flow.prompt_prob`` /
  ``flow.prompt_max_fraction``, by default upstream's ½ and 30 %), ``t``, the CFG dropout, CosyVoice2's
  streaming coin, the noise — come from each example's own generator seeded with its ``noise_seed``
  (as our flow's :func:`audiotune.models.flow.training_draws`), so they do not depend on the batch,
  the micro-batch or the rank, and a resumed run replays them;
* CosyVoice2 tosses the streaming (chunked attention) coin per example, not per batch: the batch is
  run as two groups, and the loss is the sum over both divided by both groups' valid frames, the same
  formula as upstream's over one batch;
* noise is drawn for each row's valid frames only (zero padding), and mels that do not match the
  encoder's output length are cut or zero-padded (frames past a row's mel are out of the loss).

CosyVoice-300M's length regulator interpolates the padded batch to the longest mel, as upstream does;
that path alone depends (slightly) on what else is in the batch. The CFG dropout applies in training
mode only (validation losses see every condition).

Codes: ``[B, 1, T]`` token ids (CosyVoice), ``[B, 2, T]`` pairs, or — with ``config.code_stream`` —
Step-Audio-EditX's interleaved vq02/vq06 LM ids as its LLM emits them, paired here as upstream
``_reshape`` does (:func:`audiotune.models.vocab.step_pairs_from_interleaved`).
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from audiotune.models.flow.config import SpeakerSpec
from audiotune.models.flow.native.release import ReleaseError, ReleaseInfo, load_release

# LoRA on the estimator's attention and feed-forward layers (module-name suffixes, PEFT's matching)
UNET_LORA_TARGETS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "ff.net.0.proj", "ff.net.2")
DIT_LORA_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.proj", "mlp.fc1", "mlp.fc2")
LORA_TARGETS = {"cosyvoice-300m": UNET_LORA_TARGETS, "cosyvoice2": UNET_LORA_TARGETS,
                "step-audio-editx": DIT_LORA_TARGETS}
_UNIFORMS = 5  # per example: prompt or not, prompt length, t, condition kept, streaming
SETTINGS_FILE = "release_flow.json"  # ReleaseFlowConfig.settings() of a trained release flow


@dataclass
class ReleaseFlowConfig:
    """What the stages read off a flow's ``config``, for a release flow.

    Attributes mirror :class:`audiotune.models.flow.FlowConfig` where the stages use them
    (``n_mels``, ``codebook_size``, ``num_codebooks``, ``mel_frames_per_token``, ``speaker``, ``mel``,
    ``preset``, ``n_timesteps``, ``cfg_rate``); ``release`` is the folder's :class:`ReleaseInfo`;
    ``code_stream`` (Step-Audio-EditX) the layout of the interleaved LM ids the Tokens hold, turned into
    upstream ``_reshape``'s pairs before the flow reads them. Saved beside the release files as
    :data:`SETTINGS_FILE`.
    """

    release: ReleaseInfo
    prompt_prob: float = 0.5
    prompt_max_fraction: float = 0.3
    n_timesteps: int = 10
    cfg_rate: float = 0.7
    mel: dict[str, Any] | None = None
    code_stream: dict[str, Any] | None = None
    speaker: SpeakerSpec = field(init=False)

    def __post_init__(self) -> None:
        self.speaker = SpeakerSpec("embedding", embedding_dim=self.release.spk_embed_dim)
        if self.mel is None:
            self.mel = dict(self.release.mel)

    @property
    def arch(self) -> str:
        return self.release.arch

    @property
    def preset(self) -> str:
        return self.release.arch

    @property
    def n_mels(self) -> int:
        return self.release.n_mels

    @property
    def codebook_size(self) -> int:
        return self.release.vocab_size

    @property
    def num_codebooks(self) -> int:
        """Code rows the flow reads: 1, or 2 for Step-Audio-EditX pairs given as such (not as a stream)."""
        return 2 if self.release.arch == "step-audio-editx" and not self.code_stream else 1

    @property
    def mel_frames_per_token(self) -> float:
        return float(self.release.mel_frames_per_token or 0.0)

    def settings(self) -> dict[str, Any]:
        """The fields besides ``release`` (what :data:`SETTINGS_FILE` holds)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in ("release", "speaker")}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (manifests, logs)."""
        return {"arch": self.arch, "release": self.release.summary(), **self.settings()}


class ReleaseFlow(nn.Module):
    """A native release flow with our flow model's training and sampling API (see the module docstring).

    Args:
        native: The container built from the release yaml (``flows.build_flow``).
        config: Its :class:`ReleaseFlowConfig`.
    """

    def __init__(self, native: nn.Module, config: ReleaseFlowConfig) -> None:
        super().__init__()
        self.native = native
        self.config = config

    # ------------------------------------------------------------------------------------------ parts
    @property
    def arch(self) -> str:
        return self.config.arch

    def encoder_modules(self) -> list[nn.Module]:
        """The token side ``freeze_encoder`` freezes (embedding, encoder, projection, length regulator)."""
        return self.native.encoder_modules()

    def estimator_owner(self) -> nn.Module:
        """The module whose ``estimator`` attribute LoRA replaces (the CFM decoder)."""
        return self.native.decoder

    def _tokens(self, codes: torch.Tensor, code_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, C, T]`` codes → upstream's ``[B, T]`` ids (``[B, T, 2]`` pairs for Step-Audio-EditX)."""
        stream = self.config.code_stream
        if stream:  # Step-Audio-EditX: the LLM's interleaved ids → upstream _reshape's pairs, row by row
            from audiotune.models.vocab import step_pairs_from_interleaved

            first = min(int(o) for o in stream["codebook_offsets"])

            def lm_ids(row: torch.Tensor) -> torch.Tensor:  # synthesis hands codes relative to the first offset
                return row + first if row.numel() and int(row.max()) < first else row

            pairs = [torch.from_numpy(step_pairs_from_interleaved(
                lm_ids(codes[b, 0, :n].cpu()).numpy(), stream["codebook_offsets"], stream["codebook_sizes"],
                stream["interleave"])) for b, n in enumerate(code_lengths.tolist())]
            lengths = torch.tensor([len(p) for p in pairs], device=codes.device)
            out = torch.zeros(len(pairs), int(lengths.max()), 2, dtype=torch.long)
            for b, p in enumerate(pairs):
                out[b, :len(p)] = p
            return out.to(codes.device), lengths
        if self.config.num_codebooks == 2:
            if codes.shape[1] != 2:
                raise ValueError(f"{self.arch} reads dual-codebook pairs: codes [B, 2, T], got {tuple(codes.shape)}")
            return codes.transpose(1, 2).long(), code_lengths
        return codes[:, 0].long(), code_lengths

    # --------------------------------------------------------------------------------------- training
    def forward(self, codes: torch.Tensor, code_lengths: torch.Tensor, mel: torch.Tensor, mel_lengths: torch.Tensor,
                speaker_index: torch.Tensor | None = None, speaker_embedding: torch.Tensor | None = None,
                generator: torch.Generator | None = None, noise_seed: torch.Tensor | None = None) -> torch.Tensor:
        """Upstream's training loss of a batch (a scalar); arguments as :meth:`FlowModel.forward`."""
        if speaker_embedding is None:
            raise ValueError(f"the {self.arch} flow is conditioned on an x-vector: pass speaker_embedding [B, D]")
        b = mel.shape[0]
        if noise_seed is None:
            noise_seed = torch.randint(0, 2**62, (b,), generator=generator,
                                       device=generator.device if generator is not None else "cpu")
        gens = [torch.Generator().manual_seed(int(s)) for s in noise_seed.tolist()]
        uniforms = torch.stack([torch.rand(_UNIFORMS, generator=g) for g in gens]).to(mel.device)
        streaming = (uniforms[:, 4] < 0.5) if self.arch == "cosyvoice2" else torch.zeros(b, dtype=torch.bool)
        token, token_len = self._tokens(codes, code_lengths)
        spks = self.native.speaker(speaker_embedding.to(self.native.spk_embed_affine_layer.weight.dtype))
        total = count = None
        for flag in (False, True):
            rows = torch.nonzero(streaming.cpu() == flag).flatten()
            if rows.numel() == 0:
                continue
            part, frames = self._group_loss(rows.to(mel.device), token, token_len, mel, mel_lengths, spks,
                                            uniforms, [gens[i] for i in rows.tolist()], flag)
            total, count = (part, frames) if total is None else (total + part, count + frames)
        return total / count

    def _group_loss(self, rows, token, token_len, mel, mel_lengths, spks, uniforms, gens, streaming: bool):
        """Σ squared error over valid frames and the count (frames × mel bins) of one group of rows: the
        container's own loss (``flows.NativeFlow.flow_matching_loss``) fed each row's draws."""
        flow, c = self.native, self.config
        feat_len, u = mel_lengths[rows], uniforms[rows]
        h, frame_mask = flow.encode_train(token[rows], token_len[rows], feat_len, streaming)
        x1, valid = flow.training_target(h, frame_mask, mel[rows].transpose(1, 2), feat_len)
        noise = torch.zeros(len(gens), h.shape[2], h.shape[1])
        for k, (gen, n) in enumerate(zip(gens, valid.sum(1).tolist(), strict=True)):
            noise[k, :, :n] = torch.randn(h.shape[2], n, generator=gen)
        keep = u[:, 3] if self.training else torch.ones_like(u[:, 3])  # no CFG dropout outside training
        loss = flow.flow_matching_loss(h, valid, x1, feat_len, spks[rows], u[:, :2], prompt_prob=c.prompt_prob,
                                       prompt_max_fraction=c.prompt_max_fraction, streaming=streaming,
                                       draws=(u[:, 2], noise, keep))
        count = valid.sum() * h.shape[2]
        return loss * count, count

    # --------------------------------------------------------------------------------------- sampling
    @contextlib.contextmanager
    def _guidance(self, cfg_rate: float | None):
        decoder = self.native.decoder
        saved = decoder.inference_cfg_rate
        decoder.inference_cfg_rate = saved if cfg_rate is None else float(cfg_rate)
        try:
            yield
        finally:
            decoder.inference_cfg_rate = saved

    def _one(self, token, prompt_token, prompt_feat, embedding, n_timesteps, temperature, generator) -> torch.Tensor:
        """Upstream ``inference`` for one utterance: the mel ``[80, T]`` of the target tokens (prompt frames cut)."""
        flow = self.native
        device = flow.spk_embed_affine_layer.weight.device
        length = lambda x: torch.tensor([x.shape[1]], device=device)  # noqa: E731
        mu, mask, spks, cond = flow.encode(token, length(token), prompt_token, length(prompt_token), prompt_feat,
                                           length(prompt_feat), embedding)
        noise = None
        if generator is not None and flow.decoder.noise_frames == 0:
            noise = torch.randn(mu.shape, generator=generator, device=generator.device).to(device)
        mel = flow.decoder.inference(mu, mask, n_timesteps=n_timesteps, temperature=temperature, spks=spks,
                                     cond=cond, noise=noise)
        return mel[0, :, prompt_feat.shape[1]:].float()

    def _embedding(self, speaker_embedding: torch.Tensor | None, device) -> torch.Tensor:
        if speaker_embedding is None:  # no x-vector: zeros (the speaker projection's bias only)
            return torch.zeros(1, self.config.release.spk_embed_dim, device=device)
        return torch.as_tensor(speaker_embedding, device=device).float().reshape(1, -1)

    @torch.no_grad()
    def sample(self, codes: torch.Tensor, code_lengths: torch.Tensor, *, mel_lengths: torch.Tensor | None = None,
               speaker_index: torch.Tensor | None = None, speaker_embedding: torch.Tensor | None = None,
               prompt_mel: torch.Tensor | None = None, prompt_lengths: torch.Tensor | None = None,
               n_timesteps: int | None = None, cfg_rate: float | None = None, temperature: float = 1.0,
               generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Mels for a batch of codes, one utterance at a time through upstream's inference path (no prompt).

        The output length is the release's (``mel_lengths`` is not used); the rest as :meth:`FlowModel.sample`.
        """
        device = codes.device
        token, token_len = self._tokens(codes, code_lengths)
        mels = []
        with self._guidance(cfg_rate):
            for b in range(codes.shape[0]):
                n = int(token_len[b])
                emb = None if speaker_embedding is None else speaker_embedding[b]
                mels.append(self._one(token[b:b + 1, :n], token[b:b + 1, :0], torch.zeros(1, 0, self.config.n_mels,
                                      device=device), self._embedding(emb, device),
                                      n_timesteps or self.config.n_timesteps, temperature, generator))
        lengths = torch.tensor([m.shape[1] for m in mels], device=device)
        out = torch.zeros(len(mels), self.config.n_mels, int(lengths.max()), device=device)
        for b, m in enumerate(mels):
            out[b, :, :m.shape[1]] = m
        return out, lengths

    @torch.no_grad()
    def inference(self, codes: torch.Tensor, *, prompt_codes: torch.Tensor | None = None,
                  prompt_mel: torch.Tensor | None = None, speaker_index: int | None = None,
                  speaker_embedding: torch.Tensor | None = None, n_timesteps: int | None = None,
                  cfg_rate: float | None = None, temperature: float = 1.0,
                  generator: torch.Generator | None = None) -> torch.Tensor:
        """The mel ``[80, T]`` of one utterance (codes ``[C, T]``), as :meth:`FlowModel.inference`."""
        device = self.native.spk_embed_affine_layer.weight.device

        def ids(x: torch.Tensor | None) -> torch.Tensor:
            if x is None:
                shape = (1, 0, 2) if self.arch == "step-audio-editx" else (1, 0)  # no prompt
                return torch.zeros(shape, dtype=torch.long, device=device)
            x = torch.as_tensor(x, device=device).long()
            x = x[None] if x.dim() == 1 else x  # [C, T]
            return self._tokens(x[None], torch.tensor([x.shape[-1]], device=device))[0]

        feat = (torch.zeros(1, 0, self.config.n_mels, device=device) if prompt_mel is None
                else torch.as_tensor(prompt_mel, device=device).float().T[None])
        with self._guidance(cfg_rate):
            return self._one(ids(codes), ids(prompt_codes), feat, self._embedding(speaker_embedding, device),
                             n_timesteps or self.config.n_timesteps, temperature, generator)


def build_release_flow(config: ReleaseFlowConfig) -> ReleaseFlow:
    """A fresh :class:`ReleaseFlow` (random weights) of the architecture in ``config.release``'s yaml."""
    from audiotune.models.flow.native.release import build_release_flow as build

    return ReleaseFlow(build(config.release.parsed(), config.release.yaml_name).float(), config)


def load_release_flow(uri: str, **settings: Any) -> ReleaseFlow:
    """:func:`load_release` wrapped as a :class:`ReleaseFlow`; ``settings`` are :class:`ReleaseFlowConfig` fields
    (default: the folder's :data:`SETTINGS_FILE` when it has one, as a trained flow does)."""
    import json
    from pathlib import Path

    from audiotune import storage

    native, info = load_release(uri)
    saved = Path(storage.local_copy(uri)) / SETTINGS_FILE
    if saved.is_file():
        settings = {**json.loads(saved.read_text()), **settings}
    if info.mel_frames_per_token is None:
        raise ReleaseError(f"{uri}: the yaml gives no mel settings ({info.yaml_name} has no feat_extractor / "
                           "mel_conf), so its mel frames per token are unknown")
    return ReleaseFlow(native, ReleaseFlowConfig(info, **settings))

"""The conditional flow-matching token→mel decoder (CosyVoice family).

``codes → CodeEncoder (embedding, Transformer, length regulator) → mu``; the estimator
(:class:`ConditionalUNet1D`) predicts the vector field that carries noise to the mel given
``mu``, the time step, a projected speaker vector and a prompt-mel prefix.

Training (:meth:`FlowModel.forward`) is OT-CFM (Lipman et al.; Matcha-TTS, CosyVoice):
``y = (1 - (1 - σ) t) z + t x1``, target ``u = x1 - (1 - σ) z``, masked MSE over valid frames
outside the prompt. With probability ``prompt_prob`` a random prefix of up to
``prompt_max_fraction`` of the target is given as the prompt; with probability ``cfg_dropout``
all conditions (mu, speaker, prompt) are zeroed for classifier-free guidance. Each example's
random draws (:func:`training_draws`) come from its own stream — a generator seeded with the
example's ``noise_seed`` — and cover only its own frames, so they do not depend on which batch,
micro-batch or process the example lands in, nor on the padding.

Sampling (:meth:`FlowModel.sample`) integrates the ODE with Euler steps on the cosine schedule
``t = 1 - cos(s·π/2)`` and guidance ``v = (1 + w)·v_cond - w·v_uncond``, both halves in one
batched estimator call per step.

Tensors are channels-first: mels ``[B, n_mels, T]``, codes ``[B, C, T_codes]``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from audiotune.models.flow.config import FlowConfig, base_config, tiny_config
from audiotune.models.flow.encoder import CodeEncoder, FlowCodesError, lengths_to_mask
from audiotune.models.flow.estimator import ConditionalUNet1D


class FlowSpeakerError(FlowCodesError):
    """A speaker index outside the flow's speaker table (the stages map unknown speakers to 0, ``<unk>``)."""


class SpeakerConditioning(nn.Module):
    """Speaker → ``[B, n_mels]``: a learned table (``id``), a projected external vector (``embedding``), or zeros."""

    def __init__(self, config: FlowConfig) -> None:
        super().__init__()
        spec, self.n_mels = config.speaker, config.n_mels
        self.type = spec.type
        if spec.type == "id":
            self.table = nn.Embedding(spec.num_speakers, config.n_mels)
        elif spec.type == "embedding":
            self.proj = nn.Linear(spec.embedding_dim, config.n_mels)

    def forward(self, batch_size: int, device: torch.device, dtype: torch.dtype,
                speaker_index: torch.Tensor | None = None,
                speaker_embedding: torch.Tensor | None = None) -> torch.Tensor:
        if self.type == "id":
            if speaker_index is None:
                raise ValueError("this flow is conditioned on a speaker id: pass speaker_index [B]")
            index = speaker_index.long()
            rows = self.table.num_embeddings
            bad = (index < 0) | (index >= rows)
            if bool(bad.any()):
                raise FlowSpeakerError(f"speaker_index {int(index[bad][0])} is outside this flow's speaker table "
                                       f"[0, {rows}) (unknown speakers are index 0, <unk>)")
            return self.table(index)
        if self.type == "embedding":
            if speaker_embedding is None:
                raise ValueError("this flow is conditioned on a speaker embedding: pass speaker_embedding [B, D]")
            return self.proj(F.normalize(speaker_embedding.to(self.proj.weight.dtype), dim=-1))
        return torch.zeros(batch_size, self.n_mels, device=device, dtype=dtype)


def cosine_schedule(n_timesteps: int, device: torch.device | None = None) -> torch.Tensor:
    """``n_timesteps + 1`` time points ``1 - cos(s·π/2)`` for ``s`` evenly spaced in [0, 1]."""
    s = torch.linspace(0, 1, n_timesteps + 1, device=device, dtype=torch.float32)
    return 1 - torch.cos(s * 0.5 * math.pi)


def training_draws(mel_lengths: torch.Tensor, n_mels: int, length: int, noise_seed: torch.Tensor | None = None,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The random draws of a training step, example by example.

    Example ``b`` takes, in this order, four uniforms (prompt or not, prompt length, time step,
    condition kept or dropped) and the noise of its own ``mel_lengths[b]`` frames, zero padded to
    ``length``. With ``noise_seed`` every example has its own CPU generator, so its draws are the
    same whatever else is in the batch; otherwise the examples draw in turn from ``generator``
    (default: torch's global CPU RNG).

    Args:
        mel_lengths: ``[B]`` valid mel frames.
        n_mels: Mel bins.
        length: Padded length of the batch.
        noise_seed: ``[B]`` int64 seeds, one per example.
        generator: The shared source when there are no per-example seeds (CPU or any device).

    Returns:
        Uniforms ``[B, 4]`` and noise ``[B, n_mels, length]`` (float32, on the generator's device).

    Raises:
        ValueError: Both ``noise_seed`` and ``generator``, or seeds that are not one per example.
    """
    lengths = [int(n) for n in mel_lengths.tolist()]
    if noise_seed is not None:
        if generator is not None:
            raise ValueError("pass noise_seed (one seed per example) or generator, not both")
        if tuple(noise_seed.shape) != (len(lengths),):
            raise ValueError(f"noise_seed: expected shape ({len(lengths)},) (one seed per example), "
                             f"got {tuple(noise_seed.shape)}")
        generators = [torch.Generator().manual_seed(int(s)) for s in noise_seed.tolist()]
    else:
        generators = [generator] * len(lengths)
    device = generator.device if generator is not None else torch.device("cpu")
    uniforms = torch.empty(len(lengths), 4, device=device)
    noise = torch.zeros(len(lengths), n_mels, length, device=device)
    for b, (n, gen) in enumerate(zip(lengths, generators, strict=True)):
        uniforms[b] = torch.rand(4, generator=gen, device=device)
        noise[b, :, :n] = torch.randn(n_mels, n, generator=gen, device=device)
    return uniforms, noise


class FlowModel(nn.Module):
    """Token→mel conditional flow matching; see the module docstring.

    Args:
        config: Architecture and flow-matching settings.
    """

    def __init__(self, config: FlowConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = CodeEncoder(config)
        self.speaker = SpeakerConditioning(config)
        self.estimator = ConditionalUNet1D(config)

    # ------------------------------------------------------------------ helpers
    def mel_lengths_for(self, code_lengths: torch.Tensor) -> torch.Tensor:
        """Mel frames for code lengths: ``round(codes × mel_frames_per_token)``, at least 1."""
        return torch.round(code_lengths.double() * self.config.mel_frames_per_token).long().clamp(min=1)

    def _conditions(self, codes, code_lengths, mel_lengths, length, speaker_index, speaker_embedding):
        mu = self.encoder(codes, code_lengths, mel_lengths, length)
        mask = lengths_to_mask(mel_lengths, length)[:, None, :].to(mu.dtype)
        spk = self.speaker(codes.shape[0], mu.device, mu.dtype, speaker_index, speaker_embedding)
        return mu, mask, spk

    # ----------------------------------------------------------------- training
    def forward(self, codes: torch.Tensor, code_lengths: torch.Tensor, mel: torch.Tensor, mel_lengths: torch.Tensor,
                speaker_index: torch.Tensor | None = None, speaker_embedding: torch.Tensor | None = None,
                generator: torch.Generator | None = None, noise_seed: torch.Tensor | None = None) -> torch.Tensor:
        """The OT-CFM loss of a batch (a scalar).

        Args:
            codes: ``[B, C, T_codes]`` integer codes (padding anything).
            code_lengths: ``[B]`` valid code frames.
            mel: Target ``[B, n_mels, T]`` log-mel (padding anything).
            mel_lengths: ``[B]`` valid mel frames.
            speaker_index: ``[B]`` speaker ids (speaker type ``id``).
            speaker_embedding: ``[B, D]`` external speaker vectors (speaker type ``embedding``).
            generator: Source of the random time steps, noise, prompts and dropout when there are no
                per-example seeds (a seeded one gives a deterministic loss); default: torch's global RNG.
            noise_seed: ``[B]`` int64 seed of each example's draws (see :func:`training_draws`): the
                same example gets the same draws in any batch, micro-batch or process.
        """
        c = self.config
        b, n_mels, length = mel.shape
        device = mel.device
        mu, mask, spk = self._conditions(codes, code_lengths, mel_lengths, length, speaker_index, speaker_embedding)
        x1 = mel.to(mu.dtype) * mask
        uniforms, z = training_draws(mel_lengths, n_mels, length, noise_seed, generator)
        uniforms, z = uniforms.to(device), z.to(device=device, dtype=x1.dtype)

        # prompt: for a random share of the batch, a prefix of randint(0, int(fraction · length)) frames
        use_prompt = uniforms[:, 0] < c.prompt_prob
        max_prompt = torch.floor(mel_lengths.float() * c.prompt_max_fraction)
        prompt_len = torch.floor(uniforms[:, 1] * (max_prompt + 1)) * use_prompt
        prompt = (torch.arange(length, device=device)[None, :] < prompt_len[:, None])[:, None, :]
        cond = x1 * prompt
        t = uniforms[:, 2].to(mu.dtype)
        tt = t[:, None, None]
        y = (1 - (1 - c.sigma_min) * tt) * z + tt * x1
        u = x1 - (1 - c.sigma_min) * z
        if self.training and c.cfg_dropout > 0:
            keep = (uniforms[:, 3] >= c.cfg_dropout).to(mu.dtype)
            mu, spk, cond = mu * keep[:, None, None], spk * keep[:, None], cond * keep[:, None, None]
        pred = self.estimator(y, mask, mu, t, spk, cond)
        weight = mask * ~prompt
        return ((pred.float() - u.float()).square() * weight).sum() / (weight.sum() * n_mels).clamp(min=1)

    # ----------------------------------------------------------------- sampling
    @torch.no_grad()
    def sample(self, codes: torch.Tensor, code_lengths: torch.Tensor, *, mel_lengths: torch.Tensor | None = None,
               speaker_index: torch.Tensor | None = None, speaker_embedding: torch.Tensor | None = None,
               prompt_mel: torch.Tensor | None = None, prompt_lengths: torch.Tensor | None = None,
               n_timesteps: int | None = None, cfg_rate: float | None = None, temperature: float = 1.0,
               generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Generate mels for a batch of codes (Euler ODE, cosine schedule, classifier-free guidance).

        When a prompt is given, ``codes`` must cover the prompt too (prompt codes first) and the
        returned mel includes the prompt's frames (``prompt_lengths[b]`` of them, regenerated);
        :meth:`inference` strips them for one utterance.

        Args:
            codes: ``[B, C, T_codes]``.
            code_lengths: ``[B]``.
            mel_lengths: ``[B]`` frames to generate; default ``round(codes × mel_frames_per_token)``.
            speaker_index: ``[B]`` (speaker type ``id``).
            speaker_embedding: ``[B, D]`` (speaker type ``embedding``).
            prompt_mel: ``[B, n_mels, P]`` prompt mels, aligned with the start of the output.
            prompt_lengths: ``[B]`` valid prompt frames (default: all ``P``).
            n_timesteps: Euler steps (default: the config's).
            cfg_rate: Guidance strength; 0 turns guidance off (default: the config's).
            temperature: Scale of the initial noise.
            generator: Source of the initial noise (CPU or the model's device).

        Returns:
            Mels ``[B, n_mels, T]`` (zero past each length) and their lengths ``[B]``.
        """
        c = self.config
        n_timesteps = c.n_timesteps if n_timesteps is None else n_timesteps
        cfg_rate = c.cfg_rate if cfg_rate is None else cfg_rate
        device = codes.device
        if mel_lengths is None:
            mel_lengths = self.mel_lengths_for(code_lengths)
        b, length = codes.shape[0], int(mel_lengths.max())
        mu, mask, spk = self._conditions(codes, code_lengths, mel_lengths, length, speaker_index, speaker_embedding)
        cond = torch.zeros_like(mu)
        if prompt_mel is not None and prompt_mel.shape[-1] > 0:
            p = min(prompt_mel.shape[-1], length)
            if prompt_lengths is None:
                prompt_lengths = torch.full((b,), prompt_mel.shape[-1], device=device)
            keep = lengths_to_mask(prompt_lengths.to(device), p)[:, None, :].to(mu.dtype)
            cond[:, :, :p] = prompt_mel[:, :, :p].to(device=device, dtype=mu.dtype) * keep
            cond = cond * mask
        noise_device = generator.device if generator is not None else device
        x = torch.randn(mu.shape, generator=generator, device=noise_device, dtype=torch.float32)
        x = (x.to(device=device, dtype=mu.dtype) * temperature) * mask
        if cfg_rate > 0:  # conditional and unconditional halves in one estimator call
            mu_in, spk_in = torch.cat([mu, torch.zeros_like(mu)]), torch.cat([spk, torch.zeros_like(spk)])
            cond_in, mask_in = torch.cat([cond, torch.zeros_like(cond)]), torch.cat([mask, mask])
        else:
            mu_in, spk_in, cond_in, mask_in = mu, spk, cond, mask
        t_span = cosine_schedule(n_timesteps, device)
        for k in range(n_timesteps):
            t, dt = t_span[k], t_span[k + 1] - t_span[k]
            x_in = torch.cat([x, x]) if cfg_rate > 0 else x
            v = self.estimator(x_in, mask_in, mu_in, t.expand(x_in.shape[0]).to(mu.dtype), spk_in, cond_in)
            if cfg_rate > 0:
                v_cond, v_uncond = v.chunk(2)
                v = (1.0 + cfg_rate) * v_cond - cfg_rate * v_uncond
            x = x + dt.to(x.dtype) * v
        return (x * mask).float(), mel_lengths

    @torch.no_grad()
    def inference(self, codes: torch.Tensor, *, prompt_codes: torch.Tensor | None = None,
                  prompt_mel: torch.Tensor | None = None, speaker_index: int | None = None,
                  speaker_embedding: torch.Tensor | None = None, n_timesteps: int | None = None,
                  cfg_rate: float | None = None, temperature: float = 1.0,
                  generator: torch.Generator | None = None) -> torch.Tensor:
        """The mel of one utterance: ``[n_mels, T]`` for codes ``[C, T_codes]`` (or ``[T_codes]``).

        As CosyVoice: the prompt's codes are put before the target's, the prompt mel
        (``[n_mels, P]``) conditions the first ``P`` frames, and only the target's frames are returned.
        """
        device = next(self.parameters()).device

        def as_2d(x: torch.Tensor) -> torch.Tensor:
            x = torch.as_tensor(x, device=device)
            return x[None] if x.dim() == 1 else x

        codes = as_2d(codes)
        target = self.mel_lengths_for(torch.tensor([codes.shape[-1]], device=device))
        if prompt_codes is not None:
            codes = torch.cat([as_2d(prompt_codes), codes], dim=-1)
        p_frames = 0
        if prompt_mel is not None:
            prompt_mel = torch.as_tensor(prompt_mel, device=device)[None]
            p_frames = prompt_mel.shape[-1]
        mel_lengths = target + p_frames
        spk_idx = torch.tensor([speaker_index], device=device) if speaker_index is not None else None
        spk_emb = torch.as_tensor(speaker_embedding, device=device)[None] if speaker_embedding is not None else None
        mel, _ = self.sample(codes[None], torch.tensor([codes.shape[-1]], device=device), mel_lengths=mel_lengths,
                             speaker_index=spk_idx, speaker_embedding=spk_emb, prompt_mel=prompt_mel,
                             n_timesteps=n_timesteps, cfg_rate=cfg_rate, temperature=temperature,
                             generator=generator)
        return mel[0, :, p_frames:]


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in model.parameters() if p.requires_grad), total


def tiny(**data) -> FlowModel:
    """A tiny flow (tests, the demo); ``data`` as :func:`audiotune.models.flow.config.tiny_config`."""
    return FlowModel(tiny_config(**data))


def base(**data) -> FlowModel:
    """The ~100M-parameter flow shaped like CosyVoice-300M's; ``data`` as :func:`base_config`."""
    return FlowModel(base_config(**data))

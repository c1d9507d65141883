"""ACE-Step 1.5's training objective, read from diffusers' ``AceStepPipeline`` sampler.

The pipeline integrates ``dx/dt = v`` from ``t = 1`` (noise) to ``t = 0`` with Euler steps
(``FlowMatchEulerDiscreteScheduler``, timesteps in ``[0, 1]``, ``timestep_r = t``), so the path is
``x_t = t·noise + (1 − t)·x0`` and the transformer predicts ``v = noise − x0``; the loss is the mean squared
error of that velocity over the song's frames. ``t`` is drawn logit-normal (base / SFT checkpoints) or from
the turbo checkpoints' 8-step shift-3 inference schedule; with probability ``cfg_dropout`` an example's
conditioning becomes the learned ``null_condition_emb`` (what the pipeline's guidance uses).
"""

from __future__ import annotations

import torch

TURBO_STEPS = 8
TURBO_SHIFT = 3.0


def turbo_schedule(steps: int = TURBO_STEPS, shift: float = TURBO_SHIFT) -> torch.Tensor:
    """The pipeline's shifted schedule (``_get_timestep_schedule``) without its terminal 0."""
    t = torch.linspace(1.0, 0.0, steps + 1)
    return (shift * t / (1 + (shift - 1) * t))[:-1]


def sample_timesteps(batch: int, mode: str, mu: float, sigma: float, device) -> torch.Tensor:
    """``batch`` training timesteps in ``(0, 1]`` (``logit_normal`` or ``turbo_schedule``)."""
    if mode == "turbo_schedule":
        table = turbo_schedule().to(device)
        return table[torch.randint(len(table), (batch,), device=device)]
    from diffusers.training_utils import compute_density_for_timestep_sampling

    return compute_density_for_timestep_sampling("logit_normal", batch, logit_mean=mu, logit_std=sigma,
                                                 device=device)


def flow_matching_loss(transformer, batch: dict[str, torch.Tensor], *, mode: str, mu: float, sigma: float,
                       cfg_dropout: float) -> tuple[torch.Tensor, dict[str, float]]:
    """The velocity loss of one batch (``latents``/``context``/``frame_mask`` ``[B, T, ·]``, ``cond`` ``[B, L, H]``,
    ``null_cond`` ``[1, 1, H]``)."""
    x0, mask = batch["latents"], batch["frame_mask"]
    b = x0.shape[0]
    noise = torch.randn_like(x0)
    t = sample_timesteps(b, mode, mu, sigma, x0.device).to(x0.dtype)
    xt = t.view(b, 1, 1) * noise + (1 - t.view(b, 1, 1)) * x0
    cond = batch["cond"]
    if cfg_dropout > 0:
        drop = torch.rand(b, device=x0.device) < cfg_dropout
        cond = torch.where(drop.view(b, 1, 1), batch["null_cond"].to(cond.dtype).expand_as(cond), cond)
    pred = transformer(hidden_states=xt, timestep=t, timestep_r=t, encoder_hidden_states=cond,
                       context_latents=batch["context"], return_dict=False)[0]
    err = (pred.float() - (noise - x0).float()).pow(2).mean(dim=-1)  # [B, T]
    frames = mask.sum()
    loss = (err * mask).sum() / frames.clamp(min=1)
    return loss, {"tokens": int(frames), "target_tokens": int(frames), "samples": b}

"""Conditional flow matching around the native estimators: Euler sampling with CFG, and the training loss.

Upstream: ``cosyvoice/flow/flow_matching.py`` (``ConditionalCFM`` on Matcha's ``BASECFM``,
``CausalConditionalCFM``) and ``stepvocoder/cosyvoice2/flow/flow_matching.py::CausalConditionalCFM``.
The only weights are the estimator's (``estimator.*``); nothing else is in ``flow.pt``.

* :meth:`ConditionalCFM.solve_euler` — classifier-free guidance as one estimator call on a batch of
  ``2B``: the conditioned rows, then the same ``x``/``mask``/``t`` with ``mu``, ``spks`` and ``cond`` zeroed;
  ``v = (1 + cfg)·v_cond − cfg·v_uncond``; ``t_span`` stepping exactly as upstream (``dt`` re-derived
  from ``t_span`` after each step). Upstream hard-codes batch 1; any batch works here.
* :meth:`ConditionalCFM.inference` — the initial noise: ``randn`` (CosyVoice-300M; optional generator), or
  a fixed noise sequence sliced to length (CosyVoice2's ``rand_noise``: ``torch.randn(1, 80, 15000)`` drawn
  right after ``set_all_random_seed(0)``; a plain attribute upstream, **not** a buffer, so ``flow.pt`` has
  no key for it. It is rebuilt here from a private generator seeded 0 — the same numbers, without
  reseeding the process's RNGs as upstream's constructor does). Step-Audio-EditX draws its
  ``rand_noise`` (``[1, 80, 30000]``, a non-persistent buffer) unseeded; seed 0 is used here for
  reproducibility. Then the cosine ``t_span`` and :meth:`solve_euler`. The 300M streaming
  ``flow_cache`` (prompt/overlap noise reuse) is not built.
* :meth:`ConditionalCFM.compute_loss` — upstream's training step: ``t ~ U(0, 1)`` (upstream at the kit's
  commit dropped the cosine warp of the training ``t`` in "fix fm train bug"; ``training_t_scheduler=
  "cosine"`` restores the release-era behaviour), ``z ~ N(0, 1)``, ``y = (1 − (1 − σ)t)z + t·x1``,
  target ``u = x1 − (1 − σ)z``, CFG dropout of ``mu``/``spks``/``cond`` per example with probability
  ``training_cfg_rate``, and the MSE over valid frames ``Σ mask·(pred − u)² / (Σ mask · 80)``
  (``reg_loss_type`` is unused upstream too). All draws take an optional ``torch.Generator``.
  Step-Audio-EditX publishes no training code: its CFM uses CosyVoice2's loss with CosyVoice's
  default ``cfm_params`` (σ = 1e-6, ``training_cfg_rate`` 0.2).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from audiotune.models.flow.io import FlowLoadError
from audiotune.models.flow.native.decoder import CausalConditionalDecoder, ConditionalDecoder
from audiotune.models.flow.native.dit import DiT

# cosyvoice/flow/flow.py's default decoder_conf cfm_params: the values for keys a yaml omits.
DEFAULT_CFM_PARAMS = {"sigma_min": 1e-6, "solver": "euler", "t_scheduler": "cosine", "training_cfg_rate": 0.2,
                      "inference_cfg_rate": 0.7, "reg_loss_type": "l1"}


def time_span(n_timesteps: int, t_scheduler: str = "cosine", device: torch.device | None = None,
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The ``n_timesteps + 1`` solver times: ``linspace(0, 1)``, warped by ``1 − cos(t·π/2)`` when cosine."""
    t = torch.linspace(0, 1, n_timesteps + 1, device=device, dtype=dtype)
    return 1 - torch.cos(t * 0.5 * torch.pi) if t_scheduler == "cosine" else t


class ConditionalCFM(nn.Module):
    """CosyVoice-300M's ``ConditionalCFM``: random initial noise, Euler + CFG, upstream's training loss.

    Args:
        estimator: The velocity network (``estimator.*`` keys).
        in_channels, n_spks, spk_emb_dim: Upstream's bookkeeping arguments (kept, unused by the math).
        sigma_min: σ of the conditional path.
        solver: Only ``"euler"`` exists upstream.
        t_scheduler: ``"cosine"`` warps the sampling times; anything else keeps them linear.
        training_cfg_rate: Probability of dropping the conditions of an example in :meth:`compute_loss`.
        inference_cfg_rate: Guidance strength in :meth:`solve_euler`.
        reg_loss_type: Recorded only (upstream's loss is MSE whatever it says).
        training_t_scheduler: ``"uniform"`` (upstream at the kit's commit) or ``"cosine"``.
    """

    noise_frames = 0  # > 0: inference slices a fixed noise sequence of this length instead of drawing
    noise_seed = 0
    float_output = True  # CosyVoice returns the solution in fp32; Step-Audio-EditX in the input dtype

    def __init__(self, estimator: nn.Module, in_channels: int = 240, n_spks: int = 1, spk_emb_dim: int = 64,
                 sigma_min: float = DEFAULT_CFM_PARAMS["sigma_min"], solver: str = "euler",
                 t_scheduler: str = "cosine", training_cfg_rate: float = 0.2, inference_cfg_rate: float = 0.7,
                 reg_loss_type: str = "l1", training_t_scheduler: str = "uniform") -> None:
        super().__init__()
        if solver != "euler":
            raise FlowLoadError(f"{type(self).__name__} cfm_params.solver {solver!r} is not supported (only 'euler')")
        self.estimator = estimator
        self.n_feats, self.n_spks, self.spk_emb_dim = in_channels, n_spks, spk_emb_dim
        self.sigma_min, self.solver, self.t_scheduler = float(sigma_min), solver, t_scheduler
        self.training_cfg_rate, self.inference_cfg_rate = float(training_cfg_rate), float(inference_cfg_rate)
        self.reg_loss_type, self.training_t_scheduler = reg_loss_type, training_t_scheduler
        self._fixed_noise: torch.Tensor | None = None

    @property
    def out_channels(self) -> int:
        """Mel bins of the velocity (80 in every release)."""
        return int(getattr(self.estimator, "out_channels", 80))

    def fixed_noise(self) -> torch.Tensor:
        """The ``[1, out_channels, noise_frames]`` noise sequence (CPU, fp32), built on first use."""
        if self._fixed_noise is None:
            gen = torch.Generator().manual_seed(self.noise_seed)
            self._fixed_noise = torch.randn([1, self.out_channels, self.noise_frames], generator=gen)
        return self._fixed_noise

    def solve_euler(self, x: torch.Tensor, t_span: torch.Tensor, mu: torch.Tensor, mask: torch.Tensor,
                    spks: torch.Tensor | None, cond: torch.Tensor | None, streaming: bool = False) -> torch.Tensor:
        """Integrate the guided velocity from ``x`` (noise at ``t_span[0]``) over ``t_span``.

        Args:
            x: Initial noise ``[B, 80, T]``.
            t_span: Times ``[n + 1]`` (e.g. :func:`time_span`).
            mu: Encoder conditioning ``[B, 80, T]``.
            mask: ``[B, 1, T]``.
            spks: Projected speaker vectors ``[B, 80]``.
            cond: Prompt mel ``[B, 80, T]``.
            streaming: Chunked attention in a causal U-Net (CosyVoice2); ignored otherwise.

        Returns:
            The mel ``[B, 80, T]`` at ``t_span[-1]`` (prompt frames included).
        """
        dtype = spks.dtype if spks is not None else mu.dtype
        b = x.shape[0]

        def guided(a: torch.Tensor | None) -> torch.Tensor | None:
            return None if a is None else torch.cat([a, torch.zeros_like(a)]).to(dtype)

        mask_in, mu_in = torch.cat([mask, mask]).to(dtype), guided(mu)
        spks_in, cond_in = guided(spks), guided(cond)
        t, dt = t_span[0].unsqueeze(0), t_span[1] - t_span[0]
        for step in range(1, len(t_span)):
            v = self.estimator(torch.cat([x, x]).to(dtype), mask_in, mu_in, t.expand(2 * b).to(dtype), spks_in,
                               cond_in, streaming=streaming)
            v, v_uncond = v[:b], v[b:]
            x = x + dt * ((1.0 + self.inference_cfg_rate) * v - self.inference_cfg_rate * v_uncond)
            t = t + dt
            if step < len(t_span) - 1:
                dt = t_span[step + 1] - t
        return x.float() if self.float_output else x

    @torch.no_grad()
    def inference(self, mu: torch.Tensor, mask: torch.Tensor, n_timesteps: int = 10, temperature: float = 1.0,
                  spks: torch.Tensor | None = None, cond: torch.Tensor | None = None, streaming: bool = False,
                  noise: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Sample a mel: initial noise (``noise`` if given), cosine ``t_span``, :meth:`solve_euler`.

        Args:
            mu, mask, spks, cond, streaming: As :meth:`solve_euler`.
            n_timesteps: Euler steps (upstream uses 10).
            temperature: Scale of the initial noise.
            noise: An explicit initial noise ``[B or 1, 80, T]`` (replaces the draw / fixed noise).
            generator: For the random draw of the non-causal model (on ``mu``'s device).
        """
        b, c, length = mu.shape
        if noise is None and self.noise_frames > 0:
            if length > self.noise_frames:
                raise ValueError(f"{type(self).__name__}: {length} mel frames exceed the fixed noise "
                                 f"({self.noise_frames} frames)")
            noise = self.fixed_noise()[:, :, :length]
        elif noise is None:
            noise = torch.randn([b, c, length], generator=generator, device=mu.device, dtype=mu.dtype)
        z = noise.to(mu.device, mu.dtype).expand(b, -1, -1) * temperature
        t_span = time_span(n_timesteps, self.t_scheduler, mu.device, mu.dtype)
        return self.solve_euler(z, t_span, mu, mask, spks, cond, streaming=streaming)

    def forward(self, mu: torch.Tensor, mask: torch.Tensor, n_timesteps: int = 10, temperature: float = 1.0,
                spks: torch.Tensor | None = None, cond: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        """:meth:`inference` (upstream's ``forward`` samples)."""
        return self.inference(mu, mask, n_timesteps, temperature, spks, cond, **kwargs)

    def compute_loss(self, x1: torch.Tensor, mask: torch.Tensor, mu: torch.Tensor, spks: torch.Tensor | None = None,
                     cond: torch.Tensor | None = None, streaming: bool = False,
                     generator: torch.Generator | None = None,
                     draws: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """Upstream's flow-matching loss for one batch.

        Args:
            x1: Target mel ``[B, 80, T]``.
            mask: ``[B, 1, T]`` valid frames.
            mu: Encoder conditioning ``[B, 80, T]``.
            spks: Projected speaker vectors ``[B, 80]``.
            cond: Prompt mel ``[B, 80, T]`` (zero outside the prompt).
            streaming: Chunked attention (CosyVoice2 trains half its batches so).
            generator: Draws ``t``, the noise and the CFG dropout (on ``x1``'s device); None: the global RNG.
            draws: Instead of drawing: ``(t_uniform [B], noise like x1, keep_uniform [B])`` — the uniform
                before the ``t`` schedule, the noise, and the uniform compared with ``training_cfg_rate``
                (a row keeps its conditions when it is larger). The release-flow adapter passes each
                example's own draws here.

        Returns:
            ``(loss, y)``: the scalar loss and the noisy input ``y`` the estimator saw.
        """
        b = mu.shape[0]
        dev = x1.device
        if draws is None:
            t = torch.rand([b, 1, 1], generator=generator, device=dev, dtype=mu.dtype)
        else:
            t = draws[0].to(device=dev, dtype=mu.dtype).view(b, 1, 1)
        if self.training_t_scheduler == "cosine":
            t = 1 - torch.cos(t * 0.5 * torch.pi)
        if draws is None:
            z = torch.randn(x1.shape, generator=generator, device=dev, dtype=x1.dtype)
        else:
            z = draws[1].to(device=dev, dtype=x1.dtype)
        y = (1 - (1 - self.sigma_min) * t) * z + t * x1
        u = x1 - (1 - self.sigma_min) * z
        if self.training_cfg_rate > 0:
            u_keep = torch.rand(b, generator=generator, device=dev) if draws is None else draws[2].to(dev)
            keep = u_keep > self.training_cfg_rate
            mu = mu * keep.view(-1, 1, 1)
            spks = None if spks is None else spks * keep.view(-1, 1)
            cond = None if cond is None else cond * keep.view(-1, 1, 1)
        pred = self.estimator(y, mask, mu, t.view(b), spks, cond, streaming=streaming)
        loss = F.mse_loss(pred * mask, u * mask, reduction="sum") / (torch.sum(mask) * u.shape[1])
        return loss, y


class CausalConditionalCFM(ConditionalCFM):
    """CosyVoice2's ``CausalConditionalCFM``: :class:`ConditionalCFM` with the fixed seed-0 noise (15000 frames)."""

    noise_frames = 50 * 300


class StepCausalConditionalCFM(ConditionalCFM):
    """Step-Audio-EditX's ``CausalConditionalCFM`` (DiT estimator): fixed noise of 30000 frames, cosine times.

    Upstream takes only ``estimator`` and ``inference_cfg_rate``; the training settings are CosyVoice's defaults.
    """

    noise_frames = 50 * 600
    float_output = False

    def __init__(self, estimator: nn.Module, inference_cfg_rate: float = 0.7) -> None:
        super().__init__(estimator, inference_cfg_rate=inference_cfg_rate)


_ESTIMATORS: dict[str, type[nn.Module]] = {
    "cosyvoice.flow.decoder.ConditionalDecoder": ConditionalDecoder,
    "cosyvoice.flow.decoder.CausalConditionalDecoder": CausalConditionalDecoder,
    "stepvocoder.cosyvoice2.flow.decoder_dit.DiT": DiT,
}
_CFMS: dict[str, type[ConditionalCFM]] = {
    "cosyvoice.flow.flow_matching.ConditionalCFM": ConditionalCFM,
    "cosyvoice.flow.flow_matching.CausalConditionalCFM": CausalConditionalCFM,
    "stepvocoder.cosyvoice2.flow.flow_matching.CausalConditionalCFM": StepCausalConditionalCFM,
}
# Which estimators each CFM was published with (a CosyVoice U-Net under Step's CFM would sample differently).
_PAIRS = {ConditionalCFM: (ConditionalDecoder, CausalConditionalDecoder),
          CausalConditionalCFM: (ConditionalDecoder, CausalConditionalDecoder),
          StepCausalConditionalCFM: (DiT,)}


def _construct(cls: type, node: Any, kwargs: dict[str, Any], *args: Any) -> Any:
    """``cls(*args, **kwargs)`` with unknown or missing arguments reported against the yaml class name."""
    params = inspect.signature(cls).parameters
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        raise FlowLoadError(f"{node.cls}: unexpected argument(s) {', '.join(unknown)} "
                            f"(known: {', '.join(p for p in params if p not in ('self', 'estimator'))})")
    try:
        return cls(*args, **kwargs)
    except (TypeError, ValueError, ZeroDivisionError) as e:
        raise FlowLoadError(f"{node.cls}: cannot build it from {kwargs}: {e}") from e


def _node(value: Any, what: str) -> Any:
    if not (hasattr(value, "cls") and hasattr(value, "kwargs")):
        raise FlowLoadError(f"flow decoder: {what} must be a !new: class, got {value!r}")
    return value


def build_estimator(node: Any) -> nn.Module:
    """The estimator named by a ``!new:`` node (``ConditionalDecoder``, ``CausalConditionalDecoder`` or ``DiT``)."""
    node = _node(node, "estimator")
    cls = _ESTIMATORS.get(node.cls)
    if cls is None:
        raise FlowLoadError(f"unsupported flow estimator class {node.cls} (supported: {', '.join(_ESTIMATORS)})")
    return _construct(cls, node, dict(node.kwargs))


def build_cfm(node: Any) -> ConditionalCFM:
    """The flow's ``decoder`` from the yaml's ``decoder: !new:…CFM`` node, with its estimator.

    Every size comes from the node's arguments; omitted arguments take upstream's constructor defaults
    (omitted ``cfm_params`` keys: CosyVoice's default ``decoder_conf``).

    Raises:
        FlowLoadError: An unsupported CFM or estimator class (named), an unknown argument, or a pairing
            of CFM and estimator that upstream does not have.
    """
    node = _node(node, "decoder")
    cls = _CFMS.get(node.cls)
    if cls is None:
        raise FlowLoadError(f"unsupported flow decoder class {node.cls} (supported: {', '.join(_CFMS)})")
    kwargs = dict(node.kwargs)
    if "estimator" not in kwargs:
        raise FlowLoadError(f"{node.cls}: no estimator given")
    estimator = build_estimator(kwargs.pop("estimator"))
    if not isinstance(estimator, _PAIRS[cls]):
        raise FlowLoadError(f"{node.cls} with estimator {type(estimator).__name__} is not an upstream combination")
    if cls is not StepCausalConditionalCFM:
        params = kwargs.pop("cfm_params", None) or {}
        if not isinstance(params, dict):
            raise FlowLoadError(f"{node.cls}: cfm_params must be a mapping, got {params!r}")
        kwargs.update({k: params.get(k, v) for k, v in DEFAULT_CFM_PARAMS.items()})
        extra = sorted(set(params) - set(DEFAULT_CFM_PARAMS))
        if extra:
            raise FlowLoadError(f"{node.cls}: unknown cfm_params {', '.join(extra)}")
    return _construct(cls, node, kwargs, estimator)


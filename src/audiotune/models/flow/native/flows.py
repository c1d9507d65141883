"""The top-level flow containers of CosyVoice-300M, CosyVoice2 and Step-Audio-EditX, built from a release yaml.

Each container holds upstream's submodules under upstream's names (``input_embedding``,
``spk_embed_affine_layer``, ``encoder``, ``encoder_proj``, ``decoder`` and, for CosyVoice-300M,
``length_regulator``), so the release ``flow.pt`` loads strictly. Two entry points:

* :meth:`encode` — upstream ``flow.inference`` up to the decoder call: prompt tokens then target
  tokens → embedding (padding zeroed) → encoder → ``encoder_proj`` (→ length regulator) →
  ``(mu [B,80,T], mask [B,1,T], spks [B,80], cond [B,80,T])``, prompt frames first, ``cond`` holding
  the prompt mel.
* :meth:`forward` — upstream ``flow.forward(batch)``: the training loss. Each row gets, with
  probability ½, a random prompt prefix of its own mel (up to 30 %) in ``cond``; CosyVoice2 also tosses
  a coin per batch for streaming (chunked) attention. These draws, and the decoder's (``t``, noise,
  CFG dropout), come from ``generator`` when given (a generator on the model's device; else torch's
  global RNG), so a seeded run is reproducible. Upstream has no training path for
  Step-Audio-EditX; its :meth:`forward` is CosyVoice2's without the streaming coin. The loss itself is
  :meth:`NativeFlow.flow_matching_loss` on :meth:`NativeFlow.encode_train`'s output — the one
  implementation, which the release-flow adapter (``adapter.ReleaseFlow``) calls with each example's
  own draws instead of a batch generator.

Where ours differs from upstream's training path (identical when mels are exactly aligned to the
tokens, as upstream's data pipeline makes them): mels longer than the encoder output are cut to it,
shorter ones are zero-padded, and frames past a row's mel length are masked out of the loss too.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from audiotune.models.flow.io import FlowLoadError
from audiotune.models.flow.native.conformer import (
    CONFORMER,
    UPSAMPLE_CONFORMER,
    UPSAMPLE_CONFORMER_V2,
    build_encoder,
    read_options,
    require,
    valid_mask,
)
from audiotune.models.flow.native.embedding import DualCodebookEmbedding
from audiotune.models.flow.native.hyperyaml import New
from audiotune.models.flow.native.regulator import UPSTREAM_HOP, UPSTREAM_SAMPLE_RATE, InterpolateRegulator, mel_frames

log = logging.getLogger(__name__)

COSYVOICE_300M = "cosyvoice.flow.flow.MaskedDiffWithXvec"
COSYVOICE2 = "cosyvoice.flow.flow.CausalMaskedDiffWithXvec"
STEP_AUDIO_EDITX = "stepvocoder.cosyvoice2.flow.flow.CausalMaskedDiffWithXvec"
REGULATOR = "cosyvoice.flow.length_regulator.InterpolateRegulator"
DUAL_CODEBOOK = "stepvocoder.cosyvoice2.embedding.dual_codebook.DualCodebookEmbedding"

def prompt_prefix_cond(feat: torch.Tensor, feat_len: torch.Tensor, u_prompt: torch.Tensor, u_length: torch.Tensor,
                       prob: float = 0.5, fraction: float = 0.3) -> torch.Tensor:
    """``[B, C, T]``: per row, when ``u_prompt >= 1 - prob``, its first ``⌊u_length · (⌊fraction·len⌋ + 1)⌋``
    mel frames, else zeros (upstream: with probability ½, ``randint(0, int(0.3 * len))`` frames).

    Args:
        feat: The target mel ``[B, C, T]``.
        feat_len: ``[B]`` mel frames of each row.
        u_prompt, u_length: ``[B]`` uniforms in [0, 1): prompt or not, and its length.
    """
    choices = torch.floor(feat_len.double() * fraction) + 1  # the bound in double, as Python's int(0.3 * len)
    frames = torch.floor(u_length.double().to(feat_len.device) * choices)
    frames = frames * (u_prompt.to(feat_len.device) >= 1 - prob)
    inside = torch.arange(feat.shape[-1], device=feat.device)[None, :] < frames.to(feat.device)[:, None]
    return feat * inside[:, None].to(feat.dtype)


def _fit_frames(feat: torch.Tensor, frames: int) -> torch.Tensor:
    """``[B, T, C]`` cut or zero-padded to ``frames`` frames."""
    return feat[:, :frames] if feat.shape[1] >= frames else F.pad(feat, (0, 0, 0, frames - feat.shape[1]))


class NativeFlow(nn.Module):
    """What the three containers share: token embedding, speaker projection, encoder, projection, decoder."""

    arch = ""
    token_mel_ratio: int | None = None

    def __init__(self, input_embedding: nn.Module, input_size: int, output_size: int, spk_embed_dim: int,
                 vocab_size: int, encoder: nn.Module, decoder: nn.Module) -> None:
        super().__init__()
        self.input_size = input_size
        self.output_size = output_size
        self.vocab_size = vocab_size
        self.spk_embed_dim = spk_embed_dim
        self.input_embedding = input_embedding
        self.spk_embed_affine_layer = nn.Linear(spk_embed_dim, output_size)
        self.encoder = encoder
        self.encoder_proj = nn.Linear(encoder.output_size(), output_size)
        self.decoder = decoder

    def encoder_modules(self) -> list[nn.Module]:
        """The token side that ``freeze_encoder`` freezes (not the speaker projection, not the decoder)."""
        return [self.input_embedding, self.encoder, self.encoder_proj]

    def speaker(self, embedding: torch.Tensor) -> torch.Tensor:
        """``spks [B, output_size]`` from the raw x-vector (L2-normalised first)."""
        return self.spk_embed_affine_layer(F.normalize(embedding, dim=1))

    def embed_tokens(self, token: torch.Tensor, token_len: torch.Tensor) -> torch.Tensor:
        """``[B, T(, 2)]`` ids → ``[B, T, input_size]``, padding positions zero (negative ids read as 0)."""
        x = self.input_embedding(token.clamp(min=0))
        return x * valid_mask(token_len, token.shape[1])[..., None].to(x.dtype)

    @staticmethod
    def _inference_outputs(h: torch.Tensor, prompt_feat: torch.Tensor, spks: torch.Tensor):
        """``h [B, T, 80]`` → ``(mu, mask, spks, cond)`` with the prompt mel in ``cond``'s first frames."""
        cond = torch.zeros_like(h)
        cond[:, : prompt_feat.shape[1]] = prompt_feat.to(h.dtype)
        mask = torch.ones(h.shape[0], 1, h.shape[1], dtype=h.dtype, device=h.device)
        return h.transpose(1, 2).contiguous(), mask, spks, cond.transpose(1, 2).contiguous()

    def encode_train(self, token: torch.Tensor, token_len: torch.Tensor, feat_len: torch.Tensor,
                     streaming: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Upstream ``forward``'s token side: ``(h [B, T, 80], valid frames bool [B, T])``."""
        h, masks = self.encoder(self.embed_tokens(token, token_len), token_len)
        return self.encoder_proj(h), masks[:, 0].bool()

    def training_target(self, h: torch.Tensor, frame_mask: torch.Tensor, feat: torch.Tensor,
                        feat_len: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The mel ``feat [B, T', 80]`` cut or padded to ``h``'s frames → ``(x1 [B, 80, T], valid bool [B, T])``."""
        frames = h.shape[1]
        x1 = _fit_frames(feat, frames).to(h.dtype).transpose(1, 2).contiguous()
        return x1, frame_mask & valid_mask(feat_len, frames)

    def flow_matching_loss(self, h: torch.Tensor, valid: torch.Tensor, x1: torch.Tensor, feat_len: torch.Tensor,
                           spks: torch.Tensor, prompt_draws: torch.Tensor, *, prompt_prob: float = 0.5,
                           prompt_max_fraction: float = 0.3, streaming: bool = False,
                           generator: torch.Generator | None = None,
                           draws: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Upstream's training loss (``forward`` → ``decoder.compute_loss``) given the encoder output: the one
        implementation behind :meth:`forward` and the release-flow adapter's per-example loss.

        Args:
            h: ``mu`` as ``[B, T, 80]``; ``valid``: ``[B, T]`` frames in the loss; ``x1``: target ``[B, 80, T]``.
            feat_len: ``[B]`` mel frames (the prompt prefix is drawn within them).
            spks: Projected speaker vectors ``[B, 80]``.
            prompt_draws: ``[B, 2]`` uniforms: prompt or not, prompt length (see :func:`prompt_prefix_cond`).
            generator, draws: The decoder's ``t``, noise and CFG dropout: drawn from ``generator``, or given
                (see ``ConditionalCFM.compute_loss``).

        Returns:
            The scalar loss: mean squared error over valid frames × mel bins, prompt prefix included.
        """
        cond = prompt_prefix_cond(x1, feat_len, prompt_draws[:, 0], prompt_draws[:, 1], prompt_prob,
                                  prompt_max_fraction)
        options = {} if draws is None else {"draws": draws}
        loss, _ = self.decoder.compute_loss(x1, valid[:, None].to(h.dtype), h.transpose(1, 2).contiguous(), spks,
                                            cond=cond, streaming=streaming, generator=generator, **options)
        return loss

    def forward(self, batch: dict, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Upstream ``flow.forward(batch)``: ``{"loss": …}`` (see the module docstring for the draws)."""
        device = self.spk_embed_affine_layer.weight.device
        token, token_len, feat, feat_len, embedding = (batch[key].to(device) for key in (
            "speech_token", "speech_token_len", "speech_feat", "speech_feat_len", "embedding"))
        streaming = self._streaming(generator)
        spks = self.speaker(embedding)
        h, frame_mask = self.encode_train(token, token_len, feat_len, streaming)
        x1, valid = self.training_target(h, frame_mask, feat, feat_len)
        rand_device = generator.device if generator is not None else feat.device
        prompt_draws = torch.stack([torch.rand(feat.shape[0], generator=generator, device=rand_device)
                                    for _ in range(2)], dim=1)
        return {"loss": self.flow_matching_loss(h, valid, x1, feat_len, spks, prompt_draws, streaming=streaming,
                                                generator=generator)}

    def _streaming(self, generator: torch.Generator | None) -> bool:
        """Whether this batch trains with chunked attention (CosyVoice2 only: a coin per batch)."""
        return False


class CosyVoiceFlow(NativeFlow):
    """CosyVoice-300M's ``MaskedDiffWithXvec``: Conformer encoder, then the interpolating length regulator.

    ``sample_rate``/``hop`` set the mel rate used to size the target at inference (upstream hard-codes
    22050 / 256 there).
    """

    arch = "cosyvoice-300m"

    def __init__(self, *, length_regulator: InterpolateRegulator, input_frame_rate: float,
                 sample_rate: int = UPSTREAM_SAMPLE_RATE, hop: int = UPSTREAM_HOP, **common) -> None:
        super().__init__(**common)
        self.length_regulator = length_regulator
        self.input_frame_rate = input_frame_rate
        self.sample_rate = sample_rate
        self.hop = hop

    def encoder_modules(self) -> list[nn.Module]:
        return super().encoder_modules() + [self.length_regulator]

    def encode(self, token, token_len, prompt_token, prompt_token_len, prompt_feat, prompt_feat_len, embedding):
        """Upstream ``MaskedDiffWithXvec.inference`` up to the decoder: ``(mu, mask, spks, cond)``."""
        spks = self.speaker(embedding)
        prompt_tokens, target_tokens = prompt_token.shape[1], token.shape[1]
        tokens, lengths = torch.cat([prompt_token, token], dim=1), prompt_token_len + token_len
        h, _ = self.encoder(self.embed_tokens(tokens, lengths), lengths)
        h = self.encoder_proj(h)
        prompt_frames = prompt_feat.shape[1]
        target_frames = mel_frames(target_tokens, self.input_frame_rate, self.sample_rate, self.hop)
        h, _ = self.length_regulator.inference(h[:, :prompt_tokens], h[:, prompt_tokens:], prompt_frames, target_frames,
                                               self.input_frame_rate, self.sample_rate, self.hop)
        return self._inference_outputs(h, prompt_feat, spks)

    def encode_train(self, token, token_len, feat_len, streaming=False):
        """Upstream ``MaskedDiffWithXvec.forward``'s token side: the regulator stretches to the longest mel."""
        h, _ = self.encoder(self.embed_tokens(token, token_len), token_len)
        h, _ = self.length_regulator(self.encoder_proj(h), feat_len)
        return h, valid_mask(feat_len, h.shape[1])


class CosyVoice2Flow(NativeFlow):
    """CosyVoice2's ``CausalMaskedDiffWithXvec``: the upsampling Conformer gives mel-rate ``mu`` directly."""

    arch = "cosyvoice2"

    def __init__(self, *, input_frame_rate: float, token_mel_ratio: int, pre_lookahead_len: int, **common) -> None:
        super().__init__(**common)
        self.input_frame_rate = input_frame_rate
        self.token_mel_ratio = token_mel_ratio
        self.pre_lookahead_len = pre_lookahead_len

    def encode(self, token, token_len, prompt_token, prompt_token_len, prompt_feat, prompt_feat_len, embedding):
        """Upstream ``inference(..., streaming=False, finalize=True)`` up to the decoder: ``(mu, mask, spks, cond)``."""
        spks = self.speaker(embedding)
        tokens, lengths = torch.cat([prompt_token, token], dim=1), prompt_token_len + token_len
        h, _ = self.encoder(self.embed_tokens(tokens, lengths), lengths)
        return self._inference_outputs(self.encoder_proj(h), prompt_feat, spks)

    def _streaming(self, generator: torch.Generator | None) -> bool:
        device = generator.device if generator is not None else None
        return bool(float(torch.rand((), generator=generator, device=device)) < 0.5)

    def encode_train(self, token, token_len, feat_len, streaming=False):
        """Upstream ``CausalMaskedDiffWithXvec.forward``'s token side, chunked attention when ``streaming``."""
        h, masks = self.encoder(self.embed_tokens(token, token_len), token_len, streaming=streaming)
        return self.encoder_proj(h), masks[:, 0].bool()


class StepAudioFlow(NativeFlow):
    """Step-Audio-EditX's ``CausalMaskedDiffWithXvec``: dual-codebook pairs ``[B, T, 2]`` → upsampling
    Conformer V2 (mel at ``up_stride`` × the pair rate) → DiT decoder. Pairs run at 25 Hz (50 Hz mels)."""

    arch = "step-audio-editx"
    input_frame_rate = 25

    def __init__(self, **common) -> None:
        super().__init__(**common)
        self.pre_lookahead_len = self.encoder.pre_lookahead_layer.pre_lookahead_len
        self.up_rate = self.token_mel_ratio = self.encoder.up_layer.stride

    def encode(self, token, token_len, prompt_token, prompt_token_len, prompt_feat, prompt_feat_len, embedding):
        """Upstream ``inference`` up to the decoder: ``(mu, mask, spks, cond)``."""
        spks = self.speaker(embedding)
        tokens, lengths = torch.cat([prompt_token, token], dim=1), prompt_token_len + token_len
        h, _ = self.encoder(self.embed_tokens(tokens, lengths), lengths)
        return self._inference_outputs(self.encoder_proj(h), prompt_feat, spks)



# ---- building from a release yaml node ---------------------------------------------------------------------------

_COMMON = dict(input_size=512, output_size=80, spk_embed_dim=192, output_type="mel")
_FLOW_DEFAULTS = {
    COSYVOICE_300M: dict(_COMMON, vocab_size=4096, input_frame_rate=50, only_mask_loss=True, encoder=None,
                         length_regulator=None, decoder=None, decoder_conf=None),
    COSYVOICE2: dict(_COMMON, vocab_size=4096, input_frame_rate=50, only_mask_loss=True, token_mel_ratio=2,
                     pre_lookahead_len=3, encoder=None, decoder=None, decoder_conf=None),
    STEP_AUDIO_EDITX: dict(_COMMON, vocab_size=5121, encoder=None, decoder=None, input_embedding=None),
}
_ENCODER_OF = {COSYVOICE_300M: CONFORMER, COSYVOICE2: UPSAMPLE_CONFORMER, STEP_AUDIO_EDITX: UPSAMPLE_CONFORMER_V2}


def _node(parent: New, options: dict, key: str, cls: str) -> New:
    value = options[key]
    if not isinstance(value, New):
        raise FlowLoadError(f"{parent.cls}: {key} must be a !new: node, got {value!r}")
    if value.cls != cls:
        raise FlowLoadError(f"{parent.cls}: {key} class {value.cls} is not supported (expected {cls})")
    return value


def _input_embedding(parent: New, o: dict) -> nn.Module:
    if o.get("input_embedding") is None:
        return nn.Embedding(o["vocab_size"], o["input_size"])
    node = _node(parent, o, "input_embedding", DUAL_CODEBOOK)
    emb = read_options(node, {}, required=("vocab_size", "input_size"))
    return DualCodebookEmbedding(emb["vocab_size"], emb["input_size"])


def build_flow(node: New, build_decoder: Callable[[New], nn.Module] | None = None) -> NativeFlow:
    """The flow container of a release yaml's ``flow:`` node, its decoder from ``build_decoder``
    (default: ``cfm.build_cfm``).

    Raises:
        FlowLoadError: an unsupported class or option (named), or sizes that do not fit together.
    """
    if node.cls not in _FLOW_DEFAULTS:
        raise FlowLoadError(f"flow class {node.cls} is not supported (supported: {', '.join(_FLOW_DEFAULTS)})")
    if build_decoder is None:
        from audiotune.models.flow.native.cfm import build_cfm as build_decoder
    o = read_options(node, _FLOW_DEFAULTS[node.cls])
    require(node, o, "output_type", ("mel",))
    encoder = build_encoder(_node(node, o, "encoder", _ENCODER_OF[node.cls]))
    embedding = _input_embedding(node, o)
    width = embedding.output_size if isinstance(embedding, DualCodebookEmbedding) else embedding.embedding_dim
    encoder_input = encoder.embed.out[0].in_features
    if width != encoder_input:
        raise FlowLoadError(f"{node.cls}: the token embedding gives {width} channels but the encoder's input_size "
                            f"is {encoder_input}")
    if not isinstance(o["decoder"], New):
        raise FlowLoadError(f"{node.cls}: decoder must be a !new: node, got {o['decoder']!r}")
    common = dict(input_embedding=embedding, input_size=o["input_size"], output_size=o["output_size"],
                  spk_embed_dim=o["spk_embed_dim"], vocab_size=o["vocab_size"], encoder=encoder,
                  decoder=build_decoder(o["decoder"]))
    if node.cls == COSYVOICE_300M:
        reg = read_options(_node(node, o, "length_regulator", REGULATOR), dict(out_channels=None, groups=1),
                           required=("channels", "sampling_ratios"))
        if reg["channels"] != o["output_size"]:
            raise FlowLoadError(f"{REGULATOR}: channels={reg['channels']} but the flow's output_size is "
                                f"{o['output_size']}")
        regulator = InterpolateRegulator(reg["channels"], reg["sampling_ratios"], reg["out_channels"], reg["groups"])
        return CosyVoiceFlow(length_regulator=regulator, input_frame_rate=o["input_frame_rate"], **common)
    if node.cls == COSYVOICE2:
        if o["token_mel_ratio"] != encoder.up_layer.stride:
            raise FlowLoadError(f"{node.cls}: token_mel_ratio={o['token_mel_ratio']} but the encoder upsamples by "
                                f"{encoder.up_layer.stride}")
        return CosyVoice2Flow(input_frame_rate=o["input_frame_rate"], token_mel_ratio=o["token_mel_ratio"],
                              pre_lookahead_len=o["pre_lookahead_len"], **common)
    return StepAudioFlow(**common)

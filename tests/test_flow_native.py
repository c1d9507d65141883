"""The native upstream flow encoders (models/flow/native): relative attention, Conformer and upsampling encoders,
the length regulator, the three flow containers' encode/forward, built from yaml nodes. Tiny sizes, random
weights; parity with upstream's numbers is tests/test_upstream_parity.py."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from audiotune.models.flow.io import FlowLoadError
from audiotune.models.flow.native.attention import RelativePositionAttention, relative_position_table, relative_shift
from audiotune.models.flow.native.conformer import CONFORMER, UPSAMPLE_CONFORMER, UPSAMPLE_CONFORMER_V2, build_encoder
from audiotune.models.flow.native.flows import (
    COSYVOICE2,
    COSYVOICE_300M,
    DUAL_CODEBOOK,
    REGULATOR,
    STEP_AUDIO_EDITX,
    build_flow,
)
from audiotune.models.flow.native.hyperyaml import New
from audiotune.models.flow.native.regulator import InterpolateRegulator, mel_frames

pytestmark = pytest.mark.usefixtures("one_thread")


class StubCFM(nn.Module):
    """Stands in for the decoder: an L2 loss between ``mu`` and the target, recording its arguments."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[dict] = []

    def compute_loss(self, x1, mask, mu, spks=None, cond=None, **options):
        self.calls.append(dict(x1=x1, mask=mask, mu=mu, spks=spks, cond=cond, **options))
        return (((mu - x1) ** 2) * mask).sum() / mask.sum() + 0 * spks.sum(), None


def conformer_node(cls: str = CONFORMER, **extra) -> New:
    kwargs = dict(input_size=16, output_size=16, attention_heads=2, linear_units=24, num_blocks=2, input_layer="linear",
                  pos_enc_layer_type="rel_pos_espnet", selfattention_layer_type="rel_selfattn", use_cnn_module=False,
                  macaron_style=False)
    kwargs.update(extra)
    return New(cls, kwargs)


def flow_300m_node(**encoder) -> New:
    return New(COSYVOICE_300M, dict(
        input_size=16, output_size=80, spk_embed_dim=12, vocab_size=32, input_frame_rate=25,
        encoder=conformer_node(**encoder), length_regulator=New(REGULATOR, dict(channels=80, sampling_ratios=[1, 1])),
        decoder=New("stub.CFM")))


def flow_v2_node() -> New:
    encoder = conformer_node(UPSAMPLE_CONFORMER, input_size=512, output_size=512, attention_heads=4, linear_units=8,
                             num_blocks=1, static_chunk_size=4)
    return New(COSYVOICE2, dict(input_size=512, output_size=80, spk_embed_dim=12, vocab_size=32, input_frame_rate=25,
                                token_mel_ratio=2, encoder=encoder, decoder=New("stub.CFM")))


def flow_step_node() -> New:
    encoder = New(UPSAMPLE_CONFORMER_V2, dict(input_size=12, output_size=12, pre_lookahead_len=3, num_blocks=1,
                                              num_up_blocks=1, up_stride=2, up_scale_factor=2, attention_heads=2,
                                              linear_units=16))
    return New(STEP_AUDIO_EDITX, dict(input_size=12, output_size=80, spk_embed_dim=12, vocab_size=41,
                                      input_embedding=New(DUAL_CODEBOOK, dict(vocab_size=41, input_size=12)),
                                      encoder=encoder, decoder=New("stub.CFM")))


def build(node: New):
    torch.manual_seed(0)
    return build_flow(node, build_decoder=lambda _: StubCFM()).eval()


# ---- relative positions ------------------------------------------------------------------------------------------

def test_relative_position_table_rows_are_the_distances() -> None:
    table = relative_position_table(5, 8)[0]
    assert table.shape == (9, 8)
    inv_freq = torch.exp(torch.arange(0, 8, 2, dtype=torch.float32) * -(math.log(10000.0) / 8))
    for row, distance in enumerate(range(4, -5, -1)):
        torch.testing.assert_close(table[row, 0::2], torch.sin(distance * inv_freq))
        torch.testing.assert_close(table[row, 1::2], torch.cos(distance * inv_freq))


def test_position_encoding_slices_stay_right_as_the_table_grows() -> None:
    from audiotune.models.flow.native.attention import RelativePositionEncoding

    enc = RelativePositionEncoding(6, 0.0)
    for length in (3, 10, 5, 40, 1):
        assert torch.equal(enc.position_encoding(length, torch.zeros(1, dtype=torch.float64)),
                           relative_position_table(length, 6).double())


def test_relative_shift_picks_the_column_of_distance_i_minus_j() -> None:
    length = 4
    scores = torch.randn(2, 3, length, 2 * length - 1)
    shifted = relative_shift(scores)
    for i in range(length):
        for j in range(length):
            assert torch.equal(shifted[:, :, i, j], scores[:, :, i, length - 1 - (i - j)])


def test_attention_ignores_padded_keys() -> None:
    torch.manual_seed(0)
    attn = RelativePositionAttention(2, 8, 0.0).eval()
    x = torch.randn(1, 6, 8)
    noisy = x.clone()
    noisy[:, 4:] = 100.0
    mask = (torch.arange(6) < 4)[None, None]
    pos = relative_position_table(6, 8)
    torch.testing.assert_close(attn(x, mask, pos)[:, :4], attn(noisy, mask, pos)[:, :4])


# ---- encoders ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("options", [
    dict(),
    dict(macaron_style=True, use_cnn_module=True, cnn_module_kernel=5),
    dict(macaron_style=True, use_cnn_module=True, cnn_module_kernel=4, causal=True, cnn_module_norm="layer_norm",
         activation_type="relu", normalize_before=False),
])
def test_conformer_ignores_what_padding_holds(options: dict) -> None:
    torch.manual_seed(0)
    encoder = build_encoder(conformer_node(**options)).eval()
    x = torch.randn(2, 9, 16)
    other = x.clone()
    other[1, 6:] = torch.randn(3, 16) * 10
    lengths = torch.tensor([9, 6])
    with torch.no_grad():
        out, masks = encoder(x, lengths)
        out_other, _ = encoder(other, lengths)
        alone, _ = encoder(x[1:, :6], torch.tensor([6]))
    assert out.shape == (2, 9, 16) and masks.shape == (2, 1, 9)
    assert masks[1, 0].tolist() == [True] * 6 + [False] * 3
    torch.testing.assert_close(out[:, :6], out_other[:, :6])
    if options.get("use_cnn_module"):
        # upstream zeroes padding before the first pointwise conv, whose bias then leaks into the depthwise
        # conv's edge: a padded row is not the unpadded row there, as upstream
        assert {"feed_forward_macaron.w_1.weight", "conv_module.depthwise_conv.weight", "norm_final.weight"} <= set(
            encoder.encoders[0].state_dict())
    else:
        torch.testing.assert_close(out[1, :6], alone[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("change, needle", [
    (dict(input_layer="conv2d"), "input_layer='conv2d'"),
    (dict(pos_enc_layer_type="rel_pos"), "pos_enc_layer_type='rel_pos'"),
    (dict(selfattention_layer_type="selfattn"), "selfattention_layer_type"),
    (dict(use_dynamic_chunk=True), "use_dynamic_chunk"),
    (dict(activation_type="mish"), "activation_type"),
    (dict(new_option=1), "new_option"),
])
def test_unsupported_encoder_options_are_named(change: dict, needle: str) -> None:
    with pytest.raises(FlowLoadError, match=needle):
        build_encoder(conformer_node(**change))


def test_upstream_defaults_apply_to_omitted_keys() -> None:
    node = New(CONFORMER, dict(input_size=8, output_size=8, attention_heads=2, input_layer="linear",
                               pos_enc_layer_type="rel_pos_espnet", num_blocks=1))
    encoder = build_encoder(node)  # upstream defaults: macaron, conv module (batch norm, kernel 15), 2048 units
    layer = encoder.encoders[0]
    assert layer.feed_forward.w_1.out_features == 2048
    assert layer.conv_module.depthwise_conv.kernel_size == (15,)
    assert isinstance(layer.conv_module.norm, nn.BatchNorm1d)
    with pytest.raises(FlowLoadError, match="input_layer='conv2d'"):
        build_encoder(New(CONFORMER, dict(input_size=8, pos_enc_layer_type="rel_pos_espnet")))


def test_cosyvoice2_encoder_needs_its_fixed_width() -> None:
    with pytest.raises(FlowLoadError, match="fixes 512 channels"):
        build_encoder(conformer_node(UPSAMPLE_CONFORMER))


def test_streaming_chunks_hide_tokens_past_the_chunk_and_lookahead() -> None:
    flow = build(flow_v2_node())
    encoder = flow.encoder
    x = torch.randn(1, 12, 512)
    later = x.clone()
    later[:, 4 + 3:] = torch.randn(1, 5, 512)  # past the first chunk (4 tokens) and its 3-token look-ahead
    lengths = torch.tensor([12])
    with torch.no_grad():
        a, masks = encoder(x, lengths, streaming=True)
        b, _ = encoder(later, lengths, streaming=True)
        full_a, _ = encoder(x, lengths)
        full_b, _ = encoder(later, lengths)
    assert a.shape == (1, 24, 512) and masks.shape == (1, 1, 24)
    torch.testing.assert_close(a[:, :8], b[:, :8])
    assert not torch.allclose(full_a[:, :8], full_b[:, :8])


# ---- regulator, pairs --------------------------------------------------------------------------------------------

def test_regulator_inference_sizes_prompt_and_target_separately() -> None:
    torch.manual_seed(0)
    reg = InterpolateRegulator(8, [1]).eval()
    assert mel_frames(12, 25) == 41  # int(12 / 25 * 22050 / 256), upstream's sizing
    for target_tokens in (12, 50):  # one piece, or head / middle / tail
        out, total = reg.inference(torch.randn(1, 5, 8), torch.randn(1, target_tokens, 8), 17,
                                   mel_frames(target_tokens, 25), 25)
        assert out.shape == (1, 17 + mel_frames(target_tokens, 25), 8) and total == out.shape[1]
    out, _ = reg.inference(torch.zeros(1, 0, 8), torch.randn(1, 6, 8), 0, 20, 25)
    assert out.shape == (1, 20, 8)


# ---- containers --------------------------------------------------------------------------------------------------

def _encode_inputs(pairs: bool, prompt_frames: int):
    shape = (lambda n: (1, n, 2)) if pairs else (lambda n: (1, n))
    g = torch.Generator().manual_seed(1)
    return dict(token=torch.randint(0, 32, shape(7), generator=g), token_len=torch.tensor([7]),
                prompt_token=torch.randint(0, 32, shape(4), generator=g), prompt_token_len=torch.tensor([4]),
                prompt_feat=torch.randn(1, prompt_frames, 80, generator=g),
                prompt_feat_len=torch.tensor([prompt_frames]),
                embedding=torch.randn(1, 12, generator=g))


@pytest.mark.parametrize("node_fn, pairs, prompt_frames, frames", [
    (flow_300m_node, False, 13, 13 + mel_frames(7, 25)),
    (flow_v2_node, False, 8, 22),
    (flow_step_node, True, 8, 22),
])
def test_encode_puts_the_prompt_first(node_fn, pairs: bool, prompt_frames: int, frames: int) -> None:
    flow = build(node_fn())
    inputs = _encode_inputs(pairs, prompt_frames)
    with torch.no_grad():
        mu, mask, spks, cond = flow.encode(**inputs)
    assert mu.shape == cond.shape == (1, 80, frames) and mask.shape == (1, 1, frames) and spks.shape == (1, 80)
    assert torch.equal(mask, torch.ones_like(mask))
    assert torch.equal(cond[:, :, :prompt_frames], inputs["prompt_feat"].transpose(1, 2))
    assert not cond[:, :, prompt_frames:].any()
    embedding = inputs["embedding"]
    torch.testing.assert_close(spks, flow.spk_embed_affine_layer(embedding / embedding.norm(dim=1, keepdim=True)))


def _batch(pairs: bool, ratio: int | None) -> dict:
    g = torch.Generator().manual_seed(2)
    token_len = torch.tensor([6, 4, 5, 6])
    feat_len = token_len * ratio if ratio else torch.tensor([20, 13, 17, 19])
    shape = (4, 6, 2) if pairs else (4, 6)
    return dict(speech_token=torch.randint(0, 32, shape, generator=g), speech_token_len=token_len,
                speech_feat=torch.randn(4, int(feat_len.max()), 80, generator=g), speech_feat_len=feat_len,
                embedding=torch.randn(4, 12, generator=g))


@pytest.mark.parametrize("node_fn, pairs, ratio", [(flow_300m_node, False, None), (flow_v2_node, False, 2),
                                                   (flow_step_node, True, 2)])
def test_training_forward(node_fn, pairs: bool, ratio: int | None) -> None:
    flow = build(node_fn()).train()
    batch = _batch(pairs, ratio)
    feat, feat_len = batch["speech_feat"], batch["speech_feat_len"]
    out = flow(batch, generator=torch.Generator().manual_seed(5))
    call = flow.decoder.calls[-1]
    assert call["mu"].shape == call["x1"].shape == call["cond"].shape == (4, 80, feat.shape[1])
    assert call["mask"][:, 0].sum(dim=1).tolist() == feat_len.tolist()
    for row, length in enumerate(feat_len.tolist()):  # zeros, or a prefix of at most 30 % of the row's own mel
        cond = call["cond"][row].transpose(0, 1)
        prefix = int(cond.abs().sum(dim=1).ne(0).sum())
        assert prefix <= int(0.3 * length)
        assert torch.equal(cond[:prefix], feat[row, :prefix]) and not cond[prefix:].any()
    if node_fn is flow_v2_node:
        assert call["streaming"] in (True, False)
    out["loss"].backward()
    assert flow.encoder.embed.out[0].weight.grad is not None
    losses, conds = [], []
    for _ in range(2):  # dropout from the global seed, prompt draws from the generator: a rerun is identical
        torch.manual_seed(123)
        losses.append(flow(batch, generator=torch.Generator().manual_seed(5))["loss"])
        conds.append(flow.decoder.calls[-1]["cond"])
    assert torch.equal(losses[0], losses[1]) and torch.equal(conds[0], conds[1])


def test_prompt_draws_cover_both_cases() -> None:
    flow = build(flow_300m_node())
    batch = _batch(False, None)
    prefixes = set()
    for seed in range(20):
        flow(batch, generator=torch.Generator().manual_seed(seed))
        prefixes.add(bool(flow.decoder.calls[-1]["cond"].any()))
    assert prefixes == {True, False}


@pytest.mark.parametrize("node_fn, arch, ratio", [
    (flow_300m_node, "cosyvoice-300m", None), (flow_v2_node, "cosyvoice2", 2), (flow_step_node, "step-audio-editx", 2)])
def test_container_attributes_and_encoder_modules(node_fn, arch: str, ratio) -> None:
    flow = build(node_fn())
    assert (flow.arch, flow.output_size, flow.spk_embed_dim, flow.token_mel_ratio) == (arch, 80, 12, ratio)
    frozen = {id(p) for m in flow.encoder_modules() for p in m.parameters()}
    named = {name.split(".")[0] for name, p in flow.named_parameters() if id(p) in frozen}
    expected = {"input_embedding", "encoder", "encoder_proj"} | ({"length_regulator"} if ratio is None else set())
    assert named == expected


@pytest.mark.parametrize("node, needle", [
    (New("cosyvoice.flow.flow.CausalMaskedDiffWithDiT", {}), "CausalMaskedDiffWithDiT is not supported"),
    (New(COSYVOICE_300M, dict(flow_300m_node().kwargs, output_type="linear")), "output_type='linear'"),
    (New(COSYVOICE_300M, dict(flow_300m_node().kwargs, encoder=conformer_node(UPSAMPLE_CONFORMER))),
     "encoder class .*UpsampleConformerEncoder is not supported"),
    (New(COSYVOICE_300M, dict(flow_300m_node().kwargs, input_size=8)), "gives 8 channels"),
    (New(COSYVOICE2, dict(flow_v2_node().kwargs, token_mel_ratio=3)), "token_mel_ratio=3"),
])
def test_flow_build_errors_name_the_problem(node: New, needle: str) -> None:
    with pytest.raises(FlowLoadError, match=needle):
        build_flow(node, build_decoder=lambda _: StubCFM())


# ---- the kit's release folders with the real decoder -------------------------------------------------------------

@pytest.mark.parametrize("name", ["cosyvoice-300m", "cosyvoice2", "step-audio-editx-flow"])
def test_release_flow_trains_with_its_encoder_frozen(name: str) -> None:
    from audiotune.models.flow.native.release import load_release

    folder = Path(__file__).parent / "fixtures" / "upstream" / name
    if not folder.is_dir():
        pytest.skip(f"{folder} is not there")
    flow, _ = load_release(folder)
    for module in flow.encoder_modules():
        module.requires_grad_(False)
    flow.train()
    ratio = flow.token_mel_ratio or 3
    g = torch.Generator().manual_seed(0)
    pairs = flow.arch == "step-audio-editx"
    token = torch.randint(0, 60, (2, 8, 2) if pairs else (2, 8), generator=g)
    batch = dict(speech_token=token, speech_token_len=torch.tensor([8, 6]),
                 speech_feat=torch.randn(2, 8 * ratio, 80, generator=g),
                 speech_feat_len=torch.tensor([8 * ratio, 6 * ratio]), embedding=torch.randn(2, 192, generator=g))
    losses = []
    for _ in range(2):
        torch.manual_seed(1)
        losses.append(flow(batch, generator=torch.Generator().manual_seed(3))["loss"])
    assert torch.isfinite(losses[0]) and torch.equal(losses[0], losses[1])
    losses[0].backward()
    assert flow.spk_embed_affine_layer.weight.grad is not None
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in flow.decoder.parameters())
    assert all(p.grad is None for m in flow.encoder_modules() for p in m.parameters())

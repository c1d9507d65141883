"""The native CFM decoders (CosyVoice U-Nets, Step-Audio-EditX DiT): building from yaml nodes, the training
loss, sampling and the streaming attention masks, on tiny random models. Parity with upstream's numbers is
in test_upstream_parity.py."""

from __future__ import annotations

import pytest
import torch

from audiotune.models.flow.io import FlowLoadError
from audiotune.models.flow.native.cfm import (
    CausalConditionalCFM,
    ConditionalCFM,
    StepCausalConditionalCFM,
    build_cfm,
    time_span,
)
from audiotune.models.flow.native.decoder import attention_bias
from audiotune.models.flow.native.hyperyaml import New

UNET = {"in_channels": 320, "out_channels": 80, "channels": [16], "dropout": 0.0, "attention_head_dim": 8,
        "n_blocks": 1, "num_mid_blocks": 1, "num_heads": 2, "act_fn": "gelu"}
CFM_PARAMS = {"sigma_min": 1e-06, "solver": "euler", "t_scheduler": "cosine", "training_cfg_rate": 0.2,
              "inference_cfg_rate": 0.7, "reg_loss_type": "l1"}
NODES = {
    "cosyvoice-300m": New("cosyvoice.flow.flow_matching.ConditionalCFM", {
        "in_channels": 240, "n_spks": 1, "spk_emb_dim": 80, "cfm_params": CFM_PARAMS,
        "estimator": New("cosyvoice.flow.decoder.ConditionalDecoder", dict(UNET, channels=[16, 16]))}),
    "cosyvoice2": New("cosyvoice.flow.flow_matching.CausalConditionalCFM", {
        "in_channels": 240, "n_spks": 1, "spk_emb_dim": 80, "cfm_params": CFM_PARAMS,
        "estimator": New("cosyvoice.flow.decoder.CausalConditionalDecoder",
                         dict(UNET, static_chunk_size=4, num_decoding_left_chunks=-1))}),
    "step-audio-editx": New("stepvocoder.cosyvoice2.flow.flow_matching.CausalConditionalCFM", {
        "inference_cfg_rate": 0.7,
        "estimator": New("stepvocoder.cosyvoice2.flow.decoder_dit.DiT", {
            "in_channels": 320, "out_channels": 80, "mlp_ratio": 2.0, "depth": 2, "num_heads": 2, "head_dim": 16,
            "hidden_size": 32})}),
}
CLASSES = {"cosyvoice-300m": ConditionalCFM, "cosyvoice2": CausalConditionalCFM,
           "step-audio-editx": StepCausalConditionalCFM}


def _model(arch: str, seed: int = 0) -> ConditionalCFM:
    """A tiny decoder whose every parameter is random (upstream zero-inits the DiT's adaLN and output)."""
    model = build_cfm(NODES[arch])
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model


def _batch(b: int = 3, t: int = 12, seed: int = 1) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    mask = torch.ones(b, 1, t)
    mask[-1, :, t - 3:] = 0
    return {"x1": torch.randn(b, 80, t, generator=gen) * mask, "mask": mask,
            "mu": torch.randn(b, 80, t, generator=gen), "spks": torch.randn(b, 80, generator=gen),
            "cond": torch.randn(b, 80, t, generator=gen) * mask}


@pytest.mark.parametrize("arch", NODES)
def test_build_cfm_dispatches_on_the_yaml_classes(arch: str) -> None:
    model = build_cfm(NODES[arch])
    assert type(model) is CLASSES[arch]
    assert all(k.startswith("estimator.") for k in model.state_dict())
    assert model.inference_cfg_rate == 0.7


def test_build_cfm_refuses_unknown_classes_and_arguments() -> None:
    node = NODES["cosyvoice-300m"]
    with pytest.raises(FlowLoadError, match="matcha.models.components.flow_matching.CFM"):
        build_cfm(New("matcha.models.components.flow_matching.CFM", node.kwargs))
    with pytest.raises(FlowLoadError, match="cosyvoice.flow.decoder.TransformerDecoder"):
        build_cfm(New(node.cls, dict(node.kwargs, estimator=New("cosyvoice.flow.decoder.TransformerDecoder", UNET))))
    with pytest.raises(FlowLoadError, match="n_layers"):
        build_cfm(New(node.cls, dict(node.kwargs, estimator=New(node.kwargs["estimator"].cls,
                                                                 dict(UNET, n_layers=3)))))
    with pytest.raises(FlowLoadError, match="snake"):  # upstream's default act_fn has no FeedForward branch
        build_cfm(New(node.cls, dict(node.kwargs, estimator=New(node.kwargs["estimator"].cls,
                                                                 {k: v for k, v in UNET.items() if k != "act_fn"}))))
    with pytest.raises(FlowLoadError, match="solver"):
        build_cfm(New(node.cls, dict(node.kwargs, cfm_params=dict(CFM_PARAMS, solver="midpoint"))))


@pytest.mark.parametrize("arch", NODES)
def test_compute_loss_is_deterministic_with_a_generator_and_reaches_every_weight(arch: str) -> None:
    model = _model(arch).train()
    batch = _batch()
    loss, y = model.compute_loss(**batch, generator=torch.Generator().manual_seed(7))
    again, y_again = model.compute_loss(**batch, generator=torch.Generator().manual_seed(7))
    other, _ = model.compute_loss(**batch, generator=torch.Generator().manual_seed(8))
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert torch.equal(loss, again) and torch.equal(y, y_again)
    assert not torch.equal(loss, other)
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not no_grad, no_grad


def test_compute_loss_follows_upstream_arithmetic() -> None:
    """t ~ U(0,1), z ~ N(0,1), y = (1-(1-σ)t)z + t·x1, u = x1-(1-σ)z, CFG dropout, MSE over valid frames."""
    model = _model("cosyvoice2")
    batch = _batch()
    loss, y = model.compute_loss(**batch, generator=torch.Generator().manual_seed(3))
    gen = torch.Generator().manual_seed(3)
    b, sigma = batch["x1"].shape[0], model.sigma_min
    t = torch.rand([b, 1, 1], generator=gen)
    z = torch.randn(batch["x1"].shape, generator=gen)
    keep = (torch.rand(b, generator=gen) > model.training_cfg_rate).float()
    expected_y = (1 - (1 - sigma) * t) * z + t * batch["x1"]
    u = batch["x1"] - (1 - sigma) * z
    pred = model.estimator(expected_y, batch["mask"], batch["mu"] * keep[:, None, None], t.view(b),
                           batch["spks"] * keep[:, None], batch["cond"] * keep[:, None, None])
    mask = batch["mask"]
    expected = ((pred - u) * mask).square().sum() / (mask.sum() * 80)
    torch.testing.assert_close(y, expected_y)
    torch.testing.assert_close(loss, expected)


def test_attention_bias_is_upstreams_chunk_mask() -> None:
    mask = torch.tensor([[[1.0, 1, 1, 1, 1, 0]], [[0.0, 0, 0, 0, 0, 0]]])
    full = attention_bias(mask, torch.float32)
    assert full.shape == (2, 1, 6)
    assert (full[0, 0, :5] == 0).all() and full[0, 0, 5] == -1e10
    assert (full[1] == 0).all()  # a row with nothing to see is opened, as upstream does
    chunked = attention_bias(mask, torch.float32, chunk_size=2)
    allowed = chunked[0] == 0
    expected = torch.tensor([[1, 1, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 0, 0],
                             [1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    assert torch.equal(allowed, expected)


def test_streaming_causal_unet_does_not_look_past_its_chunk() -> None:
    """CosyVoice2's estimator with static chunks (4 frames here): frames of chunk 0 ignore everything later."""
    model = _model("cosyvoice2").eval()
    batch = _batch(b=1, t=12)
    x = torch.randn(1, 80, 12)
    later = x.clone()
    later[:, :, 4:] += 1.0
    t = torch.tensor([0.3])
    args = (batch["mask"], batch["mu"], t, batch["spks"], batch["cond"])
    with torch.no_grad():
        a = model.estimator(x, *args, streaming=True)
        b = model.estimator(later, *args, streaming=True)
        full = model.estimator(later, *args)
    torch.testing.assert_close(a[:, :, :4], b[:, :, :4], rtol=0, atol=0)
    assert not torch.allclose(full[:, :, :4], a[:, :, :4])


@pytest.mark.parametrize("arch", NODES)
def test_solver_batches_match_single_examples(arch: str) -> None:
    """Upstream's CFG solver runs batch 1; a batch gives each example's own solution."""
    model = _model(arch).eval()
    batch = _batch(b=2, t=10)
    batch["mask"][:] = 1.0
    noise = torch.randn(2, 80, 10, generator=torch.Generator().manual_seed(5))
    t_span = time_span(4)
    with torch.no_grad():
        both = model.solve_euler(noise, t_span, batch["mu"], batch["mask"], batch["spks"], batch["cond"])
        one = model.solve_euler(noise[1:], t_span, batch["mu"][1:], batch["mask"][1:], batch["spks"][1:],
                                batch["cond"][1:])
    torch.testing.assert_close(both[1:], one, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["cosyvoice2", "step-audio-editx"])
def test_causal_inference_uses_the_fixed_noise(arch: str) -> None:
    model = _model(arch).eval()
    batch = _batch(b=1, t=10)
    kwargs = {"mu": batch["mu"], "mask": batch["mask"], "spks": batch["spks"], "cond": batch["cond"],
              "n_timesteps": 3}
    a, b = model.inference(**kwargs), model.inference(**kwargs)
    assert torch.equal(a, b)
    explicit = model.inference(**kwargs, noise=model.fixed_noise()[:, :, :10])
    assert torch.equal(a, explicit)
    if arch == "cosyvoice2":  # upstream: set_all_random_seed(0); torch.randn([1, 80, 50 * 300])
        torch.manual_seed(0)
        assert torch.equal(model.fixed_noise(), torch.randn([1, 80, 15000]))
    assert "rand_noise" not in str(list(model.state_dict()))


def test_random_inference_is_reproducible_with_a_generator() -> None:
    model = _model("cosyvoice-300m").eval()
    batch = _batch(b=1, t=10)
    kwargs = {"mu": batch["mu"], "mask": batch["mask"], "spks": batch["spks"], "cond": batch["cond"],
              "n_timesteps": 3}
    a = model.inference(**kwargs, generator=torch.Generator().manual_seed(1))
    b = model.inference(**kwargs, generator=torch.Generator().manual_seed(1))
    c = model.inference(**kwargs, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("arch", NODES)
def test_lora_targets_name_linear_layers(arch: str) -> None:
    estimator = build_cfm(NODES[arch]).estimator
    linears = [n for n, m in estimator.named_modules() if isinstance(m, torch.nn.Linear)]
    for target in estimator.LORA_TARGETS:
        assert any(n == target or n.endswith("." + target) for n in linears), target

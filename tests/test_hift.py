"""The native HiFT vocoder: weight norm as torch computes it, the hift.pt layout, the NSF source, the
release-folder vocoder and its checks. (Parity with upstream's numbers: tests/test_upstream_parity.py.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from audiotune.models.flow.io import FlowLoadError
from audiotune.models.flow.native.hift import build_hift, hift_state_dict, load_hift_state
from audiotune.models.flow.native.hyperyaml import parse_release_yaml
from audiotune.models.flow.native.source import SineGen
from audiotune.models.flow.native.weightnorm import WNConv1d, WNConvTranspose1d

MEL_22K = dict(sample_rate=22050, n_fft=1024, hop_length=256, win_length=1024, n_mels=80, fmin=0.0, fmax=8000.0,
               center=False)
MEL_24K = dict(MEL_22K, sample_rate=24000, n_fft=1920, hop_length=480, win_length=1920)


def release_yaml(rate: int = 22050, ups: str = "[8, 8]", kernels: str = "[16, 16]", source_kernels: str = "[7, 11]",
                 cls: str = "cosyvoice.hifigan.generator.HiFTGenerator", extra: str = "") -> str:
    """A tiny release yaml in the hyperpyyaml layout (hift: + feat_extractor:)."""
    stages = len(ups.strip("[]").split(","))
    hop = 256 if rate == 22050 else 480
    return f"""
sample_rate: {rate}
__set_seed: !apply:random.seed [1986]
hift: !new:{cls}
    in_channels: 80
    base_channels: 8
    nb_harmonics: 2
    sampling_rate: !ref <sample_rate>
    upsample_rates: {ups}
    upsample_kernel_sizes: {kernels}
    istft_params:
        n_fft: 16
        hop_len: 4
    resblock_kernel_sizes: [3, 5]
    resblock_dilation_sizes: [[1, 3], [1, 3]]
    source_resblock_kernel_sizes: {source_kernels}
    source_resblock_dilation_sizes: {[[1, 3]] * stages}
{extra}    f0_predictor: !new:cosyvoice.hifigan.f0_predictor.ConvRNNF0Predictor
        num_class: 1
        in_channels: 80
        cond_channels: 8
feat_extractor: !name:matcha.utils.audio.mel_spectrogram
    n_fft: {1024 if rate == 22050 else 1920}
    num_mels: 80
    sampling_rate: !ref <sample_rate>
    hop_size: {hop}
    win_size: {1024 if rate == 22050 else 1920}
    fmin: 0
    fmax: 8000
    center: False
"""


def tiny_hift(**kwargs):
    torch.manual_seed(0)
    return build_hift(parse_release_yaml(release_yaml(**kwargs))["hift"]).eval()


V2 = dict(rate=24000, ups="[8, 5, 3]", kernels="[16, 11, 7]", source_kernels="[7, 7, 11]")


# ------------------------------------------------------------------------------------------- weight norm
def test_weight_norm_convs_compute_what_torch_weight_norm_computes():
    from torch.nn.utils.parametrizations import weight_norm

    torch.manual_seed(0)
    for ours, theirs in ((WNConv1d(6, 4, 5, padding=4, dilation=2), torch.nn.Conv1d(6, 4, 5, padding=4, dilation=2)),
                         (WNConvTranspose1d(6, 4, 7, 3, padding=2), torch.nn.ConvTranspose1d(6, 4, 7, 3, padding=2))):
        theirs = weight_norm(theirs)
        with torch.no_grad():
            ours.weight_g.copy_(torch.rand_like(ours.weight_g) + 0.5)
            ours.weight_v.normal_()
            ours.bias.normal_()
        # torch's compat hook maps the legacy names onto its parametrization, as upstream loads hift.pt
        theirs.load_state_dict(ours.state_dict())
        x = torch.randn(2, 6, 11)
        assert list(ours.state_dict()) == ["bias", "weight_g", "weight_v"]
        assert torch.equal(ours(x), theirs(x))


# ------------------------------------------------------------------------------------------- hift.pt layout
@pytest.mark.parametrize("variant", [{}, V2], ids=["300m", "v2"])
def test_state_dict_is_the_release_layout_and_round_trips_bit_identically(variant):
    model = tiny_hift(**variant)
    state = hift_state_dict(model)
    stages = len(model.ups)
    assert list(state)[:2] == ["m_source.l_linear.weight", "m_source.l_linear.bias"]
    assert state["conv_pre.weight_g"].shape == (8, 1, 1) and state["ups.0.weight_g"].shape == (8, 1, 1)
    assert state["ups.0.weight_v"].shape == (8, 4, 16)  # transposed conv: [in, out, k], norm over dim 0
    assert f"resblocks.{2 * stages - 1}.activations2.1.alpha" in state
    assert f"source_downs.{stages - 1}.weight" in state and "f0_predictor.condnet.8.weight_v" in state
    assert list(state)[-2:] == ["f0_predictor.classifier.weight", "f0_predictor.classifier.bias"]
    again = build_hift(parse_release_yaml(release_yaml(**variant))["hift"])
    load_hift_state(again, {k: v.clone() for k, v in state.items()})
    assert all(torch.equal(a, b) for a, b in zip(hift_state_dict(again).values(), state.values(), strict=True))


def test_parametrized_and_plain_weight_layouts_load_too():
    model = tiny_hift()
    mel = torch.randn(1, 80, 6)
    source = torch.randn(1, 1, 6 * model.hop_length)
    expected = model.decode(mel, source)
    parametrized, plain = {}, {}
    for key, value in hift_state_dict(model).items():
        stem, _, leaf = key.rpartition(".")
        if leaf in ("weight_g", "weight_v"):
            parametrized[f"{stem}.parametrizations.weight.original{0 if leaf == 'weight_g' else 1}"] = value
        else:
            parametrized[key] = value
        if leaf == "weight_v":
            plain[f"{stem}.weight"] = dict(model.named_modules())[stem].weight.detach()
        elif leaf != "weight_g":
            plain[key] = value
    for state in (parametrized, plain):
        other = tiny_hift()
        torch.nn.init.zeros_(other.conv_pre.weight_v)
        load_hift_state(other, state)
        torch.testing.assert_close(other.decode(mel, source), expected, rtol=1e-5, atol=1e-6)


def test_strict_loading_lists_what_does_not_fit():
    model = tiny_hift()
    state = hift_state_dict(model)
    state.pop("conv_post.weight_g")
    state["ups.9.bias"] = torch.zeros(1)
    state["conv_pre.bias"] = torch.zeros(3)
    with pytest.raises(FlowLoadError) as err:
        load_hift_state(model, state, "release/hift.pt")
    message = str(err.value)
    assert "release/hift.pt" in message and "conv_post.weight_g" in message and "ups.9.bias" in message
    assert "conv_pre.bias (checkpoint (3,), model (8,))" in message
    with pytest.raises(FlowLoadError, match="state dict of tensors"):
        load_hift_state(model, {"conv_pre.bias": [1.0]})


@pytest.mark.parametrize("cls, extra, match", [
    ("stepvocoder.cosyvoice2.bigvgan.bigvgan.BigVGAN", "", "BigVGAN vocoder, which is not supported"),
    ("cosyvoice.hifigan.generator.CausalHiFTGenerator", "", "CausalHiFTGenerator is not supported"),
    ("cosyvoice.hifigan.generator.HiFTGenerator", "    use_tanh: true\n", "takes no use_tanh"),
])
def test_unsupported_yaml_is_refused_by_name(cls, extra, match):
    with pytest.raises(FlowLoadError, match=match):
        build_hift(parse_release_yaml(release_yaml(cls=cls, extra=extra))["hift"])
    with pytest.raises(FlowLoadError, match="3 entries for 2 upsample_rates"):
        build_hift(parse_release_yaml(release_yaml(source_kernels="[7, 7, 11]"))["hift"])


# ------------------------------------------------------------------------------------------- source, inference
@pytest.mark.parametrize("kind", ["cumsum", "interpolated"])
def test_sine_source_has_the_pitch_it_is_given(kind):
    rate, scale, f0 = 8000, 40, 200.0
    gen = SineGen(rate, harmonic_num=1, sine_amp=0.1, noise_std=0.0, voiced_threshold=10, kind=kind,
                  upsample_scale=scale)
    contour = torch.full((1, 40 * scale, 1), f0)
    contour[:, : 10 * scale] = 0.0  # unvoiced start: noise of std sine_amp / 3 only
    torch.manual_seed(0)
    sines, voiced = gen(contour)
    assert sines.shape == (1, 40 * scale, 2) and voiced[0, : 10 * scale].sum() == 0
    assert 0.02 < float(sines[0, : 10 * scale].std()) < 0.045
    spectrum = np.abs(np.fft.rfft(sines[0, 12 * scale:, :].numpy(), axis=0))
    freqs = np.fft.rfftfreq(28 * scale, 1 / rate)
    assert freqs[spectrum[:, 0].argmax()] == pytest.approx(f0, abs=rate / (28 * scale))
    assert freqs[spectrum[:, 1].argmax()] == pytest.approx(2 * f0, abs=rate / (28 * scale))


@pytest.mark.parametrize("variant", [{}, V2], ids=["300m", "v2"])
def test_inference_gives_hop_samples_per_frame_within_the_limit(variant):
    model = tiny_hift(**variant)
    assert model.sine_kind == ("cumsum" if not variant else "interpolated")
    mel = torch.randn(2, 80, 7)
    torch.manual_seed(3)
    wav = model.inference(mel)
    torch.manual_seed(3)
    assert torch.equal(model.inference(mel), wav)
    assert wav.shape == (2, 7 * model.hop_length) and wav.abs().max() <= 0.99
    with pytest.raises(ValueError, match="the source has 10 samples"):
        model.decode(mel, torch.zeros(2, 1, 10))


def test_fine_tuning_trains_g_and_v_and_keeps_the_layout():
    model = tiny_hift().train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = hift_state_dict(model)
    model(torch.randn(1, 80, 5)).pow(2).mean().backward()
    assert model.conv_pre.weight_g.grad is not None and model.conv_pre.weight_v.grad is not None
    assert model.m_source.l_linear.weight.grad is not None
    assert model.f0_predictor.condnet[0].weight_g.grad is None  # as upstream: F0 is learnt from an F0 loss only
    optimizer.step()
    after = hift_state_dict(model)
    assert list(after) == list(before) and not torch.equal(after["conv_pre.weight_g"], before["conv_pre.weight_g"])


# ------------------------------------------------------------------------------------------- the vocoder
def _release(tmp_path, name="cosyvoice.yaml", **variant):
    folder = tmp_path / "release"
    folder.mkdir()
    (folder / name).write_text(release_yaml(**variant))
    torch.save(hift_state_dict(tiny_hift(**variant)), folder / "hift.pt")
    return folder


def test_release_folder_vocoder(tmp_path):
    from audiotune.models.vocoder import HiftVocoder, VocoderError, load_vocoder

    folder = _release(tmp_path, "cosyvoice2.yaml", **V2)
    vocoder = load_vocoder(str(folder), MEL_24K)
    assert isinstance(vocoder, HiftVocoder) and (vocoder.sample_rate, vocoder.hop_length) == (24000, 480)
    assert isinstance(load_vocoder(str(folder / "hift.pt"), MEL_24K), HiftVocoder)
    mel = np.random.default_rng(0).standard_normal((80, 4)).astype(np.float32)
    torch.manual_seed(5)
    wav = vocoder(mel)
    drawn = torch.rand(1)
    torch.manual_seed(5)
    assert torch.equal(torch.rand(1), drawn)  # the caller's RNG stream is left alone
    assert wav.shape == (4 * 480,) and wav.dtype == np.float32 and np.array_equal(vocoder(mel), wav)
    assert vocoder(np.stack([mel] * 3)).shape == (3, 4 * 480)
    with pytest.raises(VocoderError, match="hift sampling_rate is 24000 but the mels have sample_rate=22050"):
        load_vocoder(str(folder), MEL_22K)
    with pytest.raises(VocoderError, match="yaml mel setting fmax is 8000 but the mels have fmax=12000"):
        load_vocoder(str(folder), dict(MEL_24K, fmax=None))
    (folder / "hift.pt").unlink()
    with pytest.raises(VocoderError, match="has cosyvoice2.yaml but no hift.pt"):
        load_vocoder(str(folder), MEL_24K)


def test_release_folder_refusals(tmp_path):
    from audiotune.models.vocoder import VocoderError, load_vocoder

    folder = _release(tmp_path)
    (folder / "cosyvoice.yaml").write_text(release_yaml(cls="stepvocoder.cosyvoice2.bigvgan.bigvgan.BigVGAN"))
    with pytest.raises(VocoderError, match="BigVGAN"):
        load_vocoder(str(folder), MEL_22K)
    with pytest.raises(VocoderError, match="BigVGAN"):
        load_vocoder(str(folder / "bigvgan_generator.pt"), MEL_22K)
    (folder / "cosyvoice.yaml").write_text("hift: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(VocoderError, match="not allowed"):
        load_vocoder(str(folder), MEL_22K)
    (folder / "cosyvoice.yaml").unlink()
    with pytest.raises(VocoderError, match="one yaml with a hift: section"):
        load_vocoder(str(folder), MEL_22K)
    (folder / "cosyvoice.yaml").write_text(release_yaml())
    (folder / "hift.pt").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(VocoderError, match="not a readable weights-only torch file"):
        load_vocoder(str(folder), MEL_22K)


def test_release_folder_vocoder_from_s3_fetches_only_the_yaml_and_hift_pt(s3_env, tmp_path, monkeypatch):
    from audiotune import storage
    from audiotune.models.vocoder import HiftVocoder, load_vocoder

    folder = _release(tmp_path)
    (folder / "flow.pt").write_bytes(b"not needed by the vocoder")
    storage.upload_dir(folder, f"{s3_env}/CosyVoice-300M")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    vocoder = load_vocoder(f"{s3_env}/CosyVoice-300M/", MEL_22K)
    assert isinstance(vocoder, HiftVocoder) and vocoder.sample_rate == 22050
    cached = (tmp_path / "cache").rglob("*")  # entries are named <name>-<digest of the URI>
    fetched = sorted(p.name.rsplit("-", 1)[0] for p in cached if p.is_file() and not p.name.startswith("."))
    assert fetched == ["cosyvoice.yaml", "hift.pt"]
    assert isinstance(load_vocoder(f"{s3_env}/CosyVoice-300M/hift.pt", MEL_22K), HiftVocoder)

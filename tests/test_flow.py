"""The flow model, its data and the vocoder, without the stage: sizes, padding, sampling, LoRA, EMA, loading."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from audiotune.models.flow import (
    EstimatorConfig,
    FlowLoadError,
    FlowModelError,
    SpeakerSpec,
    apply_lora,
    base,
    count_parameters,
    freeze_encoder,
    load_flow,
    merge_lora,
    save_flow,
    tiny,
    training_draws,
)
from audiotune.models.flow.model import FlowModel
from audiotune.train.ema import EMA
from audiotune.train.flow_data import FlowBatches, rows_to_examples
from audiotune.train.objectives import flow_loss

N_MELS = 80
RATIO = 4  # mel frames per code frame


# tiny models gain nothing from a second intra-op thread; on a busy 2-core box spinning threads stall
pytestmark = pytest.mark.usefixtures("one_thread")


def _rows(n: int, codebooks: int = 1, emb_dim: int | None = None, seed: int = 0, lengths=None) -> list[dict]:
    """Tokens-like rows: a smooth random log-mel per utterance and codes derived from it."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        codes_len = int(lengths[i]) if lengths is not None else int(rng.integers(8, 30))
        codes = rng.integers(0, 32, size=(codebooks, codes_len))
        base_mel = rng.normal(-5, 1, size=(32, N_MELS)).astype(np.float32)
        mel = np.repeat(base_mel[codes[0]], RATIO, axis=0) + 0.1 * rng.normal(size=(codes_len * RATIO, N_MELS))
        rows.append({"id": f"u{i}", "audio_codes": codes.tolist(), "mel": mel.astype("<f4").tobytes(),
                     "mel_frames": codes_len * RATIO, "speaker_index": 1 + i % 2, "repeat_count": 1,
                     "speaker_embedding": rng.normal(size=emb_dim).tolist() if emb_dim else None})
    return rows


def _tiny(speaker: SpeakerSpec | None = None, **kw) -> FlowModel:
    torch.manual_seed(0)
    return tiny(codebook_size=32, mel_frames_per_token=float(RATIO), speaker=speaker or SpeakerSpec("id", 3), **kw)


def test_base_preset_has_about_100m_parameters():
    with torch.device("meta"):
        model = base(codebook_size=4096, speaker=SpeakerSpec("embedding", embedding_dim=192))
    _, total = count_parameters(model)
    assert 95e6 < total < 110e6, total  # CosyVoice-300M's flow: ~100M
    assert sum(p.numel() for p in model.encoder.parameters()) > 15e6


def test_model_is_padding_invariant():
    """A sequence gives the same vector field alone and padded in a batch (2-level U-Net, odd lengths)."""
    model = _tiny(estimator=EstimatorConfig(channels=(32, 48), n_blocks=1, num_mid_blocks=1, heads=2,
                                            head_dim=16)).eval()
    ex, _ = rows_to_examples(_rows(3, lengths=[13, 7, 5]), N_MELS)
    batch = ex.collate([0, 1, 2])
    length = batch["mel"].shape[-1]
    mu = model.encoder(batch["codes"], batch["code_lengths"], batch["mel_lengths"], length)
    mask = (torch.arange(length)[None] < batch["mel_lengths"][:, None])[:, None].float()
    x, t = torch.randn(3, N_MELS, length) * mask, torch.full((3,), 0.4)
    spk = model.speaker(3, "cpu", torch.float32, batch["speaker_index"])
    v = model.estimator(x, mask, mu, t, spk, batch["mel"] * 0)
    one = ex.collate([2])
    n = int(one["mel_lengths"][0])
    mu1 = model.encoder(one["codes"], one["code_lengths"], one["mel_lengths"], n)
    v1 = model.estimator(x[2:, :, :n], mask[2:, :, :n], mu1, t[:1], spk[2:], one["mel"] * 0)
    assert torch.allclose(mu1, mu[2:, :, :n], atol=1e-5)
    assert torch.allclose(v1, v[2:, :, :n], atol=1e-4)
    assert torch.all(v[2:, :, n:] == 0)


@pytest.mark.parametrize("index", [3, -1])
def test_a_speaker_index_outside_the_table_is_an_error_naming_it(index):
    from audiotune.models.flow.model import FlowSpeakerError

    model = _tiny()  # 3 speakers
    with pytest.raises(FlowSpeakerError, match=rf"speaker_index {index} .*\[0, 3\)"):
        model.speaker(2, "cpu", torch.float32, torch.tensor([0, index]))
    assert model.speaker(1, "cpu", torch.float32, torch.tensor([2])).shape == (1, N_MELS)


@pytest.mark.parametrize("speaker", ["none", "id", "embedding"])
def test_sampling_shapes_with_and_without_prompt_and_cfg(speaker):
    spec = {"none": SpeakerSpec(), "id": SpeakerSpec("id", 3),
            "embedding": SpeakerSpec("embedding", embedding_dim=16)}[speaker]
    model = _tiny(spec).eval()
    ex, _ = rows_to_examples(_rows(3, emb_dim=16 if speaker == "embedding" else None), N_MELS)
    batch = ex.collate([0, 1, 2])
    kw = {"speaker_index": batch["speaker_index"], "speaker_embedding": batch.get("speaker_embedding")}
    lengths = batch["mel_lengths"]
    for cfg_rate in (0.0, 0.7):
        mel, out_len = model.sample(batch["codes"], batch["code_lengths"], cfg_rate=cfg_rate, n_timesteps=3,
                                    generator=torch.Generator().manual_seed(1), **kw)
        assert mel.shape == (3, N_MELS, int(lengths.max())) and torch.equal(out_len, lengths)
        assert torch.isfinite(mel).all() and mel[1, :, int(lengths[1]):].abs().sum() == 0
    prompt = batch["mel"][:, :, :10]
    a, _ = model.sample(batch["codes"], batch["code_lengths"], prompt_mel=prompt, n_timesteps=3,
                        generator=torch.Generator().manual_seed(1), **kw)
    b, _ = model.sample(batch["codes"], batch["code_lengths"], prompt_mel=prompt, n_timesteps=3,
                        generator=torch.Generator().manual_seed(1), **kw)
    assert a.shape == mel.shape and torch.equal(a, b)  # deterministic for a seeded generator
    one = {k: (v[0] if v is not None else None) for k, v in kw.items()}
    codes = batch["codes"][0, :, :int(batch["code_lengths"][0])]
    out = model.inference(codes[:, 5:], prompt_codes=codes[:, :5], prompt_mel=batch["mel"][0, :, :5 * RATIO],
                          speaker_index=None if one["speaker_index"] is None else int(one["speaker_index"]),
                          speaker_embedding=one["speaker_embedding"], n_timesteps=2)
    assert out.shape == (N_MELS, (codes.shape[1] - 5) * RATIO)


def test_flow_overfits_8_utterances():
    """Deterministic (eval-mode) loss on 8 utterances at least halves after a short training."""
    model = _tiny()
    ex, _ = rows_to_examples(_rows(8, seed=1), N_MELS)
    batch = ex.collate(range(8))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)

    def eval_loss() -> float:
        model.eval()
        with torch.no_grad():
            loss = float(flow_loss(model, batch)[0])
        model.train()
        return loss

    before = eval_loss()
    for _ in range(60):
        loss, metrics = flow_loss(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert metrics == {"tokens": int(ex.mel_lengths.sum()), "samples": 8}
    after = eval_loss()
    assert after < 0.5 * before, (before, after)


def test_an_examples_training_draws_do_not_depend_on_its_batch():
    """Seeded per example: the same uniforms and noise alone, in another order, or padded longer (zeros)."""
    lengths, seeds = torch.tensor([13, 7, 5]), torch.tensor([11, 22, 33])
    u, z = training_draws(lengths, N_MELS, 20, noise_seed=seeds)
    assert u.shape == (3, 4) and z.shape == (3, N_MELS, 20)
    alone_u, alone_z = training_draws(lengths[2:], N_MELS, 5, noise_seed=seeds[2:])
    assert torch.equal(u[2], alone_u[0]) and torch.equal(z[2, :, :5], alone_z[0]) and torch.all(z[2, :, 5:] == 0)
    flipped_u, flipped_z = training_draws(lengths.flip(0), N_MELS, 13, noise_seed=seeds.flip(0))
    assert torch.equal(flipped_u.flip(0), u) and torch.equal(flipped_z[2, :, :13], z[0, :, :13])
    assert not torch.equal(training_draws(lengths, N_MELS, 13, noise_seed=seeds + 1)[0], u)
    with pytest.raises(ValueError, match="one seed per example"):
        training_draws(lengths, N_MELS, 13, noise_seed=seeds[:2])


def test_training_loss_follows_each_examples_seed_not_the_batch_order_or_global_rng():
    model = _tiny().train()  # cfg dropout and prompts on
    ex, _ = rows_to_examples(_rows(3, lengths=[13, 7, 5]), N_MELS)
    seeds = torch.tensor([11, 22, 33])

    def loss(order: list[int]) -> float:
        torch.manual_seed(sum(k * 10**i for i, k in enumerate(order)))  # another global RNG state each call
        with torch.no_grad():
            return float(flow_loss(model, {**ex.collate(order), "noise_seed": seeds[order]})[0])

    reference = loss([0, 1, 2])
    assert loss([2, 0, 1]) == pytest.approx(reference, rel=1e-5)
    assert loss([1, 2, 0]) == pytest.approx(reference, rel=1e-5)


def test_flow_batches_give_each_item_one_seed_per_epoch_on_any_rank():
    ex, _ = rows_to_examples(_rows(9, seed=2), N_MELS)

    def seeds(world: int, epoch: int) -> dict[int, int]:
        found: dict[int, int] = {}
        for rank in range(world):
            data = FlowBatches(ex, 200, max_batch_size=3, seed=5, rank=rank, world_size=world)
            for indices in data.batches(epoch):
                found.update(zip(indices, data.collate(indices)["noise_seed"].tolist(), strict=True))
        return found

    one = seeds(1, 0)
    assert sorted(one) == list(range(9)) and len(set(one.values())) == 9
    assert seeds(2, 0) == one  # whichever rank (or repeated padding batch) an item lands in
    assert set(seeds(1, 1).values()).isdisjoint(one.values())  # a new epoch draws anew


def test_frame_budget_batches_stay_within_budget_and_drop_nothing():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 120, size=203)
    ex, _ = rows_to_examples(_rows(203, lengths=lengths), N_MELS)
    frames = ex.mel_lengths
    budget = 1000
    for world in (1, 3):
        seen: list[int] = []
        for rank in range(world):
            data = FlowBatches(ex, budget, max_batch_size=64, seed=0, rank=rank, world_size=world)
            for indices in data.batches(epoch=2):
                items = data.items[indices]
                assert frames[items].max() * len(items) <= budget
                seen.extend(items.tolist())
                batch = data.collate(indices)
                assert batch["mel"].shape[0] * batch["mel"].shape[2] <= budget
                assert batch["n_frames"] == int(frames[items].sum())
        assert set(seen) == set(range(203))
        assert len(seen) - 203 < world * 8  # only the padding of the last round repeats batches


def test_collate_keeps_codes_and_mels_aligned():
    rows = _rows(4, codebooks=3)
    for codebooks, c in (("all", 3), ("first", 1)):
        ex, stats = rows_to_examples(rows + [{**rows[0], "id": "nomel", "mel": None}], N_MELS, codebooks)
        assert stats["skipped"] == {"no_mel": 1} and len(ex) == 4
        batch = ex.collate([3, 1])
        assert batch["codes"].shape[:2] == (2, c)
        ref = np.asarray(rows[1]["audio_codes"])[:c]
        n = ref.shape[1]
        assert torch.equal(batch["codes"][1, :, :n], torch.from_numpy(ref)) and batch["code_lengths"][1] == n
        mel = np.frombuffer(rows[3]["mel"], "<f4").reshape(-1, N_MELS)
        assert torch.equal(batch["mel"][0, :, :len(mel)], torch.from_numpy(mel.T.copy()))


def test_freeze_encoder_and_lora_choose_what_trains():
    model = _tiny()
    freeze_encoder(model)
    assert all(not p.requires_grad for p in model.encoder.parameters())
    assert all(p.requires_grad for p in model.estimator.parameters())
    model = apply_lora(_tiny(), r=4, alpha=8, dropout=0.0, target_modules=["to_q", "to_v", "proj_out"])
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    with pytest.raises(FlowModelError, match="to_qkv"):
        apply_lora(_tiny(), r=4, alpha=8, dropout=0.0, target_modules=["to_qkv"])


def test_lora_merge_gives_a_plain_model_with_the_same_output():
    model = apply_lora(_tiny(), r=4, alpha=8, dropout=0.0, target_modules=["to_q", "to_out", "proj_in"])
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    model.eval()
    ex, _ = rows_to_examples(_rows(2), N_MELS)
    batch = ex.collate([0, 1])
    before = model.sample(batch["codes"], batch["code_lengths"], speaker_index=batch["speaker_index"],
                          n_timesteps=2, generator=torch.Generator().manual_seed(0))[0]
    merged = merge_lora(model)
    assert not any("lora_" in n for n in merged.state_dict())
    after = merged.sample(batch["codes"], batch["code_lengths"], speaker_index=batch["speaker_index"],
                          n_timesteps=2, generator=torch.Generator().manual_seed(0))[0]
    assert torch.allclose(before, after, atol=1e-4)


def test_ema_averages_and_swaps_back():
    model = _tiny()
    ema = EMA(model, decay=0.5)
    raw = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)
    name = next(iter(ema.shadow))
    assert torch.allclose(ema.shadow[name], raw[name] + 0.5, atol=1e-6)
    with ema.swapped(model):
        assert torch.allclose(dict(model.named_parameters())[name], raw[name] + 0.5, atol=1e-6)
    assert torch.allclose(dict(model.named_parameters())[name], raw[name] + 1.0)
    again = EMA(_tiny(), decay=0.5)
    again.load_state_dict(ema.state_dict())
    assert again.num_updates == 1 and torch.equal(again.shadow[name], ema.shadow[name])


def test_strict_loading_refuses_a_mismatched_checkpoint(tmp_path):
    from safetensors.torch import load_file, save_file

    model = _tiny()
    save_flow(model, tmp_path / "ok")
    again = load_flow(tmp_path / "ok")
    original = model.state_dict()
    assert all(torch.equal(original[k], v) for k, v in again.state_dict().items())
    state = load_file(str(tmp_path / "ok" / "model.safetensors"))
    del state["estimator.final_proj.bias"]
    state["encoder.extra.weight"] = torch.zeros(2)
    state["encoder.embed.weight"] = torch.zeros(7, 64)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((tmp_path / "ok" / "config.json").read_text())
    save_file(state, str(bad / "model.safetensors"))
    with pytest.raises(FlowLoadError) as err:
        load_flow(bad)
    message = str(err.value)
    for expected in ("missing keys: estimator.final_proj.bias", "unexpected keys: encoder.extra.weight",
                     "encoder.embed.weight (checkpoint (7, 64), model (32, 64))"):
        assert expected in message
    with pytest.raises(FlowLoadError, match="config.json"):
        load_flow(tmp_path)
    with pytest.raises(ValueError, match="merge"):
        save_flow(apply_lora(_tiny(), 2, 4, 0.0, ["to_q"]), tmp_path / "lora")


# --------------------------------------------------------------------------------------------- vocoder


def _tone_mel():
    from audiotune.config import MelConfig
    from audiotune.tokenization.mel import MelExtractor
    from tests.helpers import tone

    mx = MelExtractor.from_config(MelConfig())
    return mx, mx(tone(1.0, mx.sample_rate, freq=220.0))


def test_griffin_lim_inverts_the_mel_of_a_tone():
    from audiotune.models.vocoder import GriffinLimVocoder, load_vocoder

    mx, mel = _tone_mel()
    vocoder = load_vocoder("griffin-lim", mx.to_dict())
    assert isinstance(vocoder, GriffinLimVocoder) and vocoder.sample_rate == 22050
    wav = vocoder(mel.T)
    assert wav.shape == (mel.shape[0] * mx.hop_length,) and wav.dtype == np.float32
    again = mx(wav)
    convergence = np.linalg.norm(np.exp(mel) - np.exp(again)) / np.linalg.norm(np.exp(mel))
    assert convergence < 0.2, convergence
    batch = vocoder(np.stack([mel.T, mel.T]))
    assert batch.shape == (2, len(wav)) and np.allclose(batch[0], wav, atol=1e-3)


def test_checkpoint_vocoders_torchscript_and_onnx(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    from audiotune.models.vocoder import VocoderError, load_vocoder

    mx, mel = _tone_mel()
    hop = mx.hop_length

    class Upsample(torch.nn.Module):
        def forward(self, m: torch.Tensor) -> torch.Tensor:
            return m.mean(1, keepdim=True).repeat_interleave(256, dim=2)  # [B, 1, T * hop]

    torch.jit.save(torch.jit.script(Upsample()), str(tmp_path / "voc.pt"))
    wav = load_vocoder(str(tmp_path / "voc.pt"), mx.to_dict())(mel.T)
    assert wav.shape == (mel.shape[0] * hop,)

    shape = helper.make_tensor("shape", TensorProto.INT64, [3], [0, -1, 1])
    ones = helper.make_tensor("ones", TensorProto.FLOAT, [1, 1, hop], [1.0] * hop)
    flat = helper.make_tensor("flat", TensorProto.INT64, [2], [0, -1])
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["mel"], ["m"], axes=[1], keepdims=0),
         helper.make_node("Reshape", ["m", "shape"], ["m3"]),
         helper.make_node("Mul", ["m3", "ones"], ["up"]),
         helper.make_node("Reshape", ["up", "flat"], ["wav"])],
        "voc", [helper.make_tensor_value_info("mel", TensorProto.FLOAT, ["B", 80, "T"])],
        [helper.make_tensor_value_info("wav", TensorProto.FLOAT, ["B", "S"])], initializer=[shape, ones, flat])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(tmp_path / "voc.onnx"))
    wav = load_vocoder(str(tmp_path / "voc.onnx"), mx.to_dict())(np.stack([mel.T] * 2))
    assert wav.shape == (2, mel.shape[0] * hop)
    with pytest.raises(VocoderError, match="griffin-lim"):
        load_vocoder(str(tmp_path / "voc.bin"), mx.to_dict())
    with pytest.raises(FileNotFoundError):
        load_vocoder(str(tmp_path / "missing.onnx"), mx.to_dict())

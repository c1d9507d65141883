"""Kimi-Audio through its own code: a stand-in written here with the release's interface (two id streams,
continuous Whisper features between the media markers, an audio adaptor, a text head ``lm_head`` and an audio
head ``mimo_output`` on its own layers, ``auto_map``, a ``whisper-large-v3/`` folder) is tokenized with
Whisper features, trained through ``audiotune train llm`` with LoRA, and exported (adapter and merge)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from audiotune.cli import main
from audiotune.models.kimi_data import MARKERS

MODELING = '''"""A stand-in for Kimi-Audio's MoonshotKimiaForCausalLM with the same forward interface."""
import math

import torch
from torch import nn
from transformers import PreTrainedModel, Qwen2Config
from transformers.modeling_outputs import CausalLMOutputWithPast


class Block(nn.Module):
    def __init__(self, h, heads):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(h), nn.LayerNorm(h)
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(h, h), nn.Linear(h, h), nn.Linear(h, h)
        self.o_proj = nn.Linear(h, h, bias=False)
        self.up_proj, self.down_proj = nn.Linear(h, 2 * h), nn.Linear(2 * h, h)

    def forward(self, x):
        B, T, H = x.shape
        y = self.norm1(x)
        q, k, v = (p(y).view(B, T, self.heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        a = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o_proj(a.transpose(1, 2).reshape(B, T, H))
        return x + self.down_proj(nn.functional.gelu(self.up_proj(self.norm2(x))))


class KimiaModel(nn.Module):
    def __init__(self, c):
        super().__init__()
        h = c.hidden_size
        self.embed_tokens = nn.Embedding(c.vocab_size, h)
        self.layers = nn.ModuleList(Block(h, c.num_attention_heads) for _ in range(c.num_hidden_layers))
        self.mimo_layers = nn.ModuleList(Block(h, c.num_attention_heads) for _ in range(c.kimia_mimo_layers))
        self.norm, self.mimo_norm = nn.LayerNorm(h), nn.LayerNorm(h)
        self.vq_adaptor = nn.Sequential(nn.Linear(c.kimia_adaptor_input_dim, h), nn.GELU(), nn.Linear(h, h),
                                        nn.LayerNorm(h))
        self.media_begin, self.media_end = c.kimia_media_begin, c.kimia_media_end
        self.branch = c.kimia_mimo_transformer_from_layer_index

    def forward(self, input_ids, text_input_ids, whisper_input_feature, is_continuous_mask):
        emb = self.embed_tokens(input_ids)
        if whisper_input_feature is not None:
            assert input_ids.shape[0] == 1, "one sequence per call"
            expanded = emb.new_zeros(input_ids.shape[1], whisper_input_feature[0].shape[-1])
            starts = (input_ids[0] == self.media_begin).nonzero().flatten().tolist()
            ends = (input_ids[0] == self.media_end).nonzero().flatten().tolist()
            for i, (s, e) in enumerate(zip(starts, ends)):
                assert e - s - 1 == int(is_continuous_mask[0].sum())
                expanded[s + 1:e] = whisper_input_feature[i][0, :e - s - 1]
            mask = is_continuous_mask[:, :, None]
            mixed = (emb + self.vq_adaptor(expanded)[None] * mask) * math.sqrt(2.0)
            emb = torch.where(mask, mixed, emb)
        if text_input_ids is not None:
            emb = emb + self.embed_tokens(text_input_ids)
        x, mimo = emb, None
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i == self.branch:
                mimo = x.clone()
        for layer in self.mimo_layers:
            mimo = layer(mimo)
        return self.norm(x), self.mimo_norm(mimo)


class MoonshotKimiaForCausalLM(PreTrainedModel):
    config_class = Qwen2Config
    base_model_prefix = "model"
    _supports_sdpa = True

    def __init__(self, config):
        super().__init__(config)
        self.model = KimiaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.mimo_output = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids=None, text_input_ids=None, whisper_input_feature=None, is_continuous_mask=None,
                attention_mask=None, position_ids=None, use_cache=None, return_dict=None, **kwargs):
        hidden, mimo = self.model(input_ids, text_input_ids, whisper_input_feature, is_continuous_mask)
        return CausalLMOutputWithPast(logits=(self.mimo_output(mimo), self.lm_head(hidden)))
'''
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matrices: one thread is fastest on shared cores
AUTO_MAP = {"AutoModelForCausalLM": "modeling_moonshot_kimia.MoonshotKimiaForCausalLM"}
N_MELS, CHUNK_S, CODES = 16, 2, 32
FAST = ["tracking.enabled=false", "run.num_workers=1", "llm.train.eval_every=1000", "llm.train.save_every=1000",
        "llm.train.batch_tokens=512", "llm.layout=tts", "llm.train.warmup_ratio=0", "llm.attn_implementation=sdpa"]


def _tokenizer(folder: Path):
    """A byte-level tokenizer with Kimi-Audio's control tokens (no merges: every byte is a token)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|pad|>", eos_token="<|eos|>")
    fast.add_special_tokens({"additional_special_tokens": list(MARKERS.values())})
    fast.save_pretrained(str(folder))
    return fast


def _stand_in(folder: Path) -> Path:
    """The stand-in release folder: LM code + weights + tokenizer + a tiny Whisper in whisper-large-v3/."""
    from safetensors.torch import save_file
    from transformers import Qwen2Config, WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    from audiotune.models.vocab import SEGMENT_TOKENS

    folder.mkdir(parents=True)
    tok = _tokenizer(folder)
    offset = len(tok) + len(SEGMENT_TOKENS) + 8  # audio codes above the text ids and audiotune's markers
    (folder / "modeling_moonshot_kimia.py").write_text(MODELING)
    spec = importlib.util.spec_from_file_location("kimi_stand_in", folder / "modeling_moonshot_kimia.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    ids = tok.convert_tokens_to_ids([MARKERS["media_begin"], MARKERS["media_end"]])
    config = Qwen2Config(vocab_size=offset + CODES, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, initializer_range=0.2, tie_word_embeddings=False,
                         kimia_token_offset=offset, kimia_media_begin=ids[0], kimia_media_end=ids[1],
                         kimia_mimo_layers=1, kimia_mimo_transformer_from_layer_index=0, kimia_adaptor_input_dim=32,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    module.MoonshotKimiaForCausalLM(config).save_pretrained(str(folder))
    data = json.loads((folder / "config.json").read_text())
    data.update(architectures=["MoonshotKimiaForCausalLM"], auto_map=AUTO_MAP)
    (folder / "config.json").write_text(json.dumps(data, indent=2))
    whisper = WhisperConfig(num_mel_bins=N_MELS, d_model=8, encoder_layers=1, encoder_attention_heads=2,
                            decoder_layers=1, decoder_attention_heads=2, encoder_ffn_dim=16, decoder_ffn_dim=16,
                            max_source_positions=CHUNK_S * 50, max_target_positions=8, vocab_size=16,
                            pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)
    whisper.save_pretrained(str(folder / "whisper-large-v3"))  # the encoder's weights, in WhisperModel's key layout
    encoder = {f"encoder.{k}": v.contiguous() for k, v in WhisperEncoder(whisper).state_dict().items()}
    save_file(encoder, str(folder / "whisper-large-v3" / "model.safetensors"), metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="module")
def kimi(tmp_path_factory):
    """(Tokens with Whisper features, the stand-in base), tokenized with the base's own tokenizer."""
    from audiotune.config import load_config
    from audiotune.stages.convert import convert
    from audiotune.stages.tokenize import tokenize
    from examples.make_corpus import make_corpus

    root = tmp_path_factory.mktemp("kimi")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the module's setup runs before the function-scoped one_thread
    base = _stand_in(root / "Kimi-Audio-stand-in")
    manifest = make_corpus(root / "corpus", n_speakers=2, utts_per_speaker=4, backend="synth", seed=5,
                           edit_fraction=0.0)
    cfg = load_config(None, ["tracking.enabled=false", "convert.val_fraction=0.25", "tokenize.text_tokenizer=base",
                             f"tokenize.base_model={base}", f"tokenize.audio_tokenizer.codebook_size={CODES}",
                             "tokenize.audio_tokenizer.fit_max_frames=3000", "tokenize.whisper.enabled=true",
                             f"tokenize.whisper.n_mels={N_MELS}", f"tokenize.whisper.chunk_s={CHUNK_S}"])
    convert(cfg, source=str(manifest), output=str(root / "ds"))
    tokenize(cfg, dataset=str(root / "ds"), output=str(root / "tok"))
    torch.set_num_threads(threads)
    return root / "tok", base


def _train(tokens: Path, base: Path, out: Path, *sets: str) -> int:
    argv = ["train", "llm", "--tokens", str(tokens), "--base-model", str(base), "--output", str(out)]
    return main([*argv, *[a for s in (*FAST, *sets) for a in ("--set", s)]])


@pytest.mark.parametrize("samples", [5000, 8960, 32000, 37000, 64000])
def test_stored_whisper_windows_rebuild_exactly_what_the_encoder_would_see(samples):
    from audiotune.tokenization.whisper_features import (
        WhisperMelSettings,
        feature_extractor,
        pad_window,
        tokens_for,
        whisper_log_mel,
        window_lengths,
        window_tokens,
    )

    settings = WhisperMelSettings(n_mels=N_MELS, chunk_s=CHUNK_S)
    wav = (np.random.default_rng(samples).standard_normal(samples) * 0.1).astype(np.float32)
    mel = whisper_log_mel(wav, 16000, settings)
    lengths = window_lengths(mel.shape[0], settings)
    starts = np.cumsum([0, *lengths])
    extractor = feature_extractor(settings)
    for i, length in enumerate(lengths):  # each window, zero-padded to chunk_s, as Kimi-Audio's encoder takes it
        window = wav[i * settings.chunk_samples:(i + 1) * settings.chunk_samples]
        full = extractor(window, sampling_rate=16000, return_tensors="np").input_features[0].T
        rebuilt = pad_window(mel[starts[i]:starts[i + 1]], settings.chunk_frames)
        np.testing.assert_allclose(rebuilt, full, rtol=0, atol=1e-5)
        assert window_tokens(length) == tokens_for(len(window))


def test_whisper_features_are_cached_in_tokenize(kimi):
    import pyarrow.parquet as pq

    tokens, _ = kimi
    assert json.loads((tokens / "tokenizer" / "whisper.json").read_text()) == {"n_mels": N_MELS, "chunk_s": CHUNK_S}
    rows = pq.read_table(sorted((tokens / "train").glob("part-*.parquet"))[0]).to_pylist()
    row = rows[0]
    mel = np.frombuffer(row["whisper_mel"], dtype="<f4").reshape(row["whisper_frames"], N_MELS)
    seconds = row["duration_s"]
    assert abs(mel.shape[0] - seconds * 100) <= 8 + 2 * int(seconds // CHUNK_S + 1)  # 100 frames/s, kept per window


def _row(text: list[int], codes: list[int], frames: int) -> dict:
    mel = np.random.default_rng(0).standard_normal((frames, N_MELS)).astype("<f4")
    return {"id": "r", "text_ids": text, "audio_codes": [codes], "whisper_mel": mel.tobytes(),
            "whisper_frames": frames}


def test_both_streams_are_laid_out_as_upstream_and_the_loss_covers_both_heads(tmp_path):
    from transformers import AutoTokenizer

    from audiotune.config import LLMStageConfig
    from audiotune.models.kimi import load_kimi
    from audiotune.models.kimi_data import build_kimi_example, kimi_loss, marker_ids
    from audiotune.models.vocab import IGNORE_INDEX
    from audiotune.train.kimi_batches import KimiBatches, batches_class_for
    from audiotune.train.llm_data import ExampleBatches

    base = _stand_in(tmp_path / "kimi")
    model = load_kimi(base, LLMStageConfig(trust_remote_code=True), torch.float32, "sdpa")
    m = marker_ids(AutoTokenizer.from_pretrained(str(base)), "stand-in")
    offset = model.token_offset
    text, codes = [70, 71, 72], [3, 4, 5, 6, 7, 8]
    tts = build_kimi_example(_row(text, codes, 48), "tts", m, offset, N_MELS)
    asr = build_kimi_example(_row(text, codes, 48), "understand", m, offset, N_MELS)
    for e in (tts, asr):
        assert len(e.audio_ids) == len(e.text_ids) == len(e.continuous)
        inner = e.audio_ids[e.continuous]  # the continuous positions are exactly the codes, between the markers
        assert inner.tolist() == [offset + c for c in codes]
        start = int(np.flatnonzero(e.continuous)[0])
        assert e.audio_ids[start - 1] == m["media_begin"] and e.audio_ids[start + len(codes)] == m["media_end"]
    assert tts.audio_labels[tts.audio_labels != IGNORE_INDEX].tolist() == [offset + c for c in codes] + [m["media_end"]]
    assert (tts.text_labels == IGNORE_INDEX).all()
    assert asr.text_labels[asr.text_labels != IGNORE_INDEX].tolist() == text + [m["text_eos"]]
    assert (asr.audio_labels == IGNORE_INDEX).all()
    assert tts.text_ids[1:4].tolist() == text and set(tts.audio_ids[1:4].tolist()) == {m["blank"]}

    class Train:
        batch_tokens, max_batch_size = 4096, 8

    vocab = type("V", (), {"pad_id": 0})()
    assert batches_class_for([tts, asr]) is KimiBatches and batches_class_for([]) is ExampleBatches
    batch = KimiBatches([tts, asr], vocab, Train, 0, 0, 1, shuffle=False).collate([0, 1])
    loss, metrics = kimi_loss(model, batch)
    assert torch.isfinite(loss) and metrics["loss_audio"] > 0 and metrics["loss_text"] > 0
    assert torch.allclose(loss, metrics["loss_audio"] + metrics["loss_text"])
    loss.backward()
    assert model.lm.mimo_output.weight.grad.abs().sum() > 0 and model.lm.lm_head.weight.grad.abs().sum() > 0
    assert model.lm.model.vq_adaptor[0].weight.grad.abs().sum() > 0  # the Whisper features reach the model
    assert all(p.grad is None for p in model.whisper.parameters())  # the encoder is frozen


def test_kimi_audio_is_refused_without_trust_remote_code_in_one_line(kimi, tmp_path, capsys, monkeypatch):
    from audiotune.models.families import family_for

    monkeypatch.setattr("builtins.input", lambda *a: pytest.fail("interactive prompt"))
    tokens, base = kimi
    assert family_for(base).name == "kimi-audio"
    code = _train(tokens, base, tmp_path / "out", "llm.train.max_steps=1")
    err = capsys.readouterr().err
    assert code == 2, err
    line = [x for x in err.splitlines() if "llm.trust_remote_code=true" in x]
    assert len(line) == 1 and "Kimi-Audio (MoonshotKimiaForCausalLM)" in line[0], err
    assert not (tmp_path / "out").exists()


def test_kimi_audio_lora_trains_both_heads_and_exports(kimi, tmp_path, monkeypatch):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from audiotune.config import load_config
    from audiotune.stages.export import export

    monkeypatch.setattr("builtins.input", lambda *a: pytest.fail("interactive prompt"))
    tokens, base = kimi
    out = tmp_path / "llm"
    code = _train(tokens, base, out, "llm.trust_remote_code=true", "llm.train.max_steps=12", "llm.train.lr=1e-2",
                  "llm.lora.r=8", "llm.train.log_every=1")
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["final_loss"] < 0.9 * metrics["first_loss"], metrics
    print(f"kimi stand-in: {metrics['tokens_per_s']:.0f} tokens/s, loss {metrics['first_loss']:.3f} -> "
          f"{metrics['final_loss']:.3f}", file=sys.stderr)

    adapter = json.loads((out / "adapter_config.json").read_text())
    lm = AutoModelForCausalLM.from_pretrained(str(base), trust_remote_code=True)
    peft = PeftModel.from_pretrained(lm, str(out))  # the adapter loads on the model's own class
    adapted = {n.rsplit(".lora_A", 1)[0] for n, _ in peft.named_parameters() if ".lora_A" in n}
    assert adapted and not any(("vq_adaptor" in n or "mimo_output" in n or "lm_head" in n) for n in adapted), adapted
    assert any("mimo_layers" in n for n in adapted) and any(".layers." in n for n in adapted)
    assert adapter["task_type"] is None

    quick = ["tracking.enabled=false", "export.num_samples=0"]
    res = export(load_config(None, quick), str(tmp_path / "export"), llm=str(out))
    assert res.manifest["verification"]["passed"]
    merged = tmp_path / "export" / "llm"
    assert (merged / "modeling_moonshot_kimia.py").is_file() and (merged / "whisper-large-v3" / "config.json").is_file()

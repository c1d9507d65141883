"""The llm stage's models: presets, base loading errors, LoRA settings, multi-codebook wrapper, fingerprints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM

from audiotune.config import LLMStageConfig, LoraSettings
from audiotune.models.fingerprint import fingerprint_checkpoint, fingerprint_mismatch, fingerprint_model
from audiotune.models.lm import (
    PRESETS,
    ModelError,
    apply_lora,
    build_lm,
    linear_module_names,
    load_base,
    new_token_ids,
    preset_config,
)
from audiotune.models.multicodebook import MultiCodebookLM, default_codebook_weights
from audiotune.models.vocab import IGNORE_INDEX, SEGMENT_TOKENS, AudioVocab


def _tiny(arch: str = "qwen2", vocab: int = 64, tie: bool = False):
    torch.manual_seed(0)
    config = AutoConfig.for_model(arch, vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie)
    return AutoModelForCausalLM.from_config(config)


def _vocab(codebooks: int = 1, text: int = 40) -> AudioVocab:
    return AudioVocab(text_vocab_size=text, special_ids={t: 30 + k for k, t in enumerate(SEGMENT_TOKENS)},
                      codebook_size=16, num_codebooks=codebooks, audio_offset=text, pad_id=0, eos_id=1)


def test_presets_have_the_promised_shapes():
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(preset_config("85m", 32000, "sdpa"))
    blocks = sum(p.numel() for n, p in model.named_parameters() if ".layers." in n)
    assert 80e6 < blocks < 90e6, blocks  # ~85M in the transformer blocks, "SimpleTransformer-like"
    config = model.config
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (768, 12, 12)
    assert {"tiny-qwen2", "tiny-llama", "85m"} <= set(PRESETS)
    with pytest.raises(ModelError, match="unknown preset"):
        preset_config("huge", 10, "sdpa")


def test_base_loading_refuses_what_is_not_a_safetensors_causal_lm(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        load_base(tmp_path / "nowhere", torch.float32, "sdpa")
    bert = tmp_path / "bert"
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                         vocab_size=50)).save_pretrained(str(bert))
    with pytest.raises(ModelError, match="no causal-LM head"):
        load_base(bert, torch.float32, "sdpa")
    pickled = tmp_path / "pickled"
    _tiny().save_pretrained(str(pickled))
    for f in pickled.glob("*.safetensors"):
        f.rename(f.with_suffix(".bin"))
    with pytest.raises(ModelError, match="pickled weights are not loaded"):
        load_base(pickled, torch.float32, "sdpa")


def test_offset_audio_ids_must_fit_the_base(tmp_path):
    base = tmp_path / "base"
    _tiny(vocab=64).save_pretrained(str(base))
    settings = LLMStageConfig(audio_tokens="offset", audio_token_offset=60)
    vocab = AudioVocab(text_vocab_size=40, special_ids={t: 30 + k for k, t in enumerate(SEGMENT_TOKENS)},
                       codebook_size=16, num_codebooks=1, audio_offset=60, pad_id=0, eos_id=1)
    with pytest.raises(ModelError, match="do not fit the base model's 64 embedding rows"):
        build_lm(settings, vocab, base, torch.float32, base_text_size=30)


def test_new_token_ids_are_markers_and_appended_codes():
    vocab = _vocab()  # markers 30..39 added to a 30-token text tokenizer, audio 40..55
    assert new_token_ids(vocab, 30, "append") == list(range(30, 56))
    offset = AudioVocab(**{**vocab.to_dict(), "audio_offset": 10})  # audio inside the base vocabulary
    assert new_token_ids(offset, 30, "offset") == list(range(30, 40))


def test_lora_target_modules_that_match_nothing_name_what_exists():
    model = _tiny()
    with pytest.raises(ModelError, match=r"match no linear layer.*q_proj.*v_proj"):
        apply_lora(model, LoraSettings(target_modules=["attn_qkv"]), [])


def test_lora_exclude_rslora_dora_and_new_token_rows():
    model = apply_lora(_tiny(), LoraSettings(target_modules="all-linear", exclude_modules=[r"layers\.1\."],
                                             use_rslora=True, use_dora=True), [60, 61, 62])
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("layers.0.self_attn.q_proj.lora_A" in n for n in names)
    assert not any("layers.1." in n for n in names)
    assert any("lora_magnitude_vector" in n for n in names)  # DoRA
    assert model.peft_config["default"].use_rslora
    assert any("embed_tokens.token_adapter" in n for n in names) and any("lm_head.token_adapter" in n for n in names)
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    assert "lm_head" not in linear_module_names(_tiny())


def test_tied_embeddings_get_one_token_adapter():
    model = apply_lora(_tiny("llama", tie=True), LoraSettings(), [60, 61])
    trainable = [n for n, p in model.named_parameters() if p.requires_grad and "token_adapter" in n]
    assert len(trainable) == 1 and "embed_tokens" in trainable[0]


def test_multicodebook_loss_is_the_weighted_mean_of_codebook_losses():
    torch.manual_seed(0)
    C, V = 3, 16
    model = MultiCodebookLM(_tiny(vocab=64), C, V, [3.0, 2.0, 1.0])
    ids = torch.stack([torch.randint(0, 64, (2, 9)), torch.randint(0, V + 2, (2, 9)),
                       torch.randint(0, V + 2, (2, 9))], dim=-1)
    labels = ids.clone()
    labels[:, :3] = IGNORE_INDEX
    out = model(input_ids=ids, labels=labels)
    logits = [out.logits, *out.codebook_logits]
    per = [F.cross_entropy(lg[:, :-1].reshape(-1, lg.shape[-1]), labels[:, 1:, k].reshape(-1), ignore_index=-100)
           for k, lg in enumerate(logits)]
    expected = (3 * per[0] + 2 * per[1] + per[2]) / 6
    assert torch.allclose(out.loss, expected, atol=1e-6)
    assert torch.allclose(torch.stack(out.per_codebook_loss), torch.stack(per).detach(), atol=1e-6)
    labels[..., 2] = IGNORE_INDEX  # a codebook without targets drops out of the mean instead of giving NaN
    out = model(input_ids=ids, labels=labels)
    assert torch.allclose(out.loss, (3 * per[0] + 2 * per[1]) / 5, atol=1e-6)
    assert default_codebook_weights(8) == [8, 2, 1, 1, 1, 1, 1, 1]


@pytest.mark.parametrize("lora", [False, True])
def test_multicodebook_save_and_reload_give_the_same_outputs(tmp_path, lora):
    from audiotune.models.lm import load_trained

    base = tmp_path / "base"
    _tiny(vocab=64).save_pretrained(str(base))
    settings = LLMStageConfig(mode="lora" if lora else "full")
    vocab = _vocab(codebooks=3)
    model, info = build_lm(settings, vocab, base, torch.float32, base_text_size=30)
    if lora:
        model = apply_lora(model, settings.lora, info["new_token_ids"])
        torch.nn.init.normal_(model.backbone.base_model.model.model.layers[0].self_attn.q_proj.lora_B.default.weight)
    model.eval()
    out = tmp_path / "artifact"
    model.save_pretrained(str(out))
    (out / "manifest.json").write_text(json.dumps({"mode": settings.mode, "embedding_rows": info["embedding_rows"]}))
    reloaded, _ = load_trained(out, base)
    reloaded.eval()
    ids = torch.stack([torch.randint(0, 56, (1, 7)), torch.randint(0, 18, (1, 7)), torch.randint(0, 18, (1, 7))], -1)
    a, b = model(input_ids=ids), reloaded(input_ids=ids)
    assert torch.allclose(a.logits, b.logits, atol=1e-5)
    assert all(torch.allclose(x, y, atol=1e-5) for x, y in zip(a.codebook_logits, b.codebook_logits, strict=True))


def test_fingerprint_ignores_sharding_and_load_dtype_but_sees_a_changed_weight(tmp_path):
    model = _tiny()
    model.save_pretrained(str(tmp_path / "one"))
    model.save_pretrained(str(tmp_path / "sharded"), max_shard_size="20KB")
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    one, sharded = fingerprint_checkpoint(tmp_path / "one"), fingerprint_checkpoint(tmp_path / "sharded")
    assert fingerprint_mismatch(one, sharded) == []
    assert fingerprint_model(model)["checksum"] == one["checksum"]
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] += 1e-3
    model.save_pretrained(str(tmp_path / "changed"))
    problems = fingerprint_mismatch(one, fingerprint_checkpoint(tmp_path / "changed"))
    assert problems and problems[0].startswith("checksum")


def test_build_lm_appends_rows_for_markers_and_codes(tmp_path):
    base = tmp_path / "base"
    _tiny(vocab=30).save_pretrained(str(base))
    model, info = build_lm(LLMStageConfig(), _vocab(), base, torch.float32, base_text_size=30)
    assert info["base_vocab_size"] == 30 and info["embedding_rows"] == 64  # 56 needed, padded to 64
    assert model.get_input_embeddings().weight.shape[0] == 64
    assert info["new_token_ids"] == list(range(30, 64))  # markers, codes and the rows padding to 64
    assert Path(base, "config.json").exists() and info["fingerprint"]["tensors"] > 0


def test_lora_on_a_bf16_multicodebook_model_trains_every_new_weight_in_fp32(tmp_path):
    from audiotune.models.lm import load_trained

    base = tmp_path / "base"
    _tiny(vocab=64).save_pretrained(str(base))
    settings = LLMStageConfig(mode="lora")
    model, info = build_lm(settings, _vocab(codebooks=3), base, torch.bfloat16, base_text_size=30)
    model = apply_lora(model, settings.lora, info["new_token_ids"])
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert {n.split(".")[0] for n in trainable} == {"backbone", "codebook_embeddings", "codebook_heads"}
    assert {n: p.dtype for n, p in trainable.items() if p.dtype != torch.float32} == {}  # Adam states in fp32 too
    assert all(p.dtype == torch.bfloat16 for p in model.parameters() if not p.requires_grad)  # the frozen base
    ids = torch.stack([torch.randint(0, 56, (2, 7)), torch.randint(0, 18, (2, 7)), torch.randint(0, 18, (2, 7))], -1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    for module in [*model.codebook_embeddings, *model.codebook_heads]:
        assert module.weight.grad is not None and module.weight.grad.dtype == torch.float32
    # the joint stage reloads the artifact to train it further: the same holds there
    (tmp_path / "artifact").mkdir()
    model.save_pretrained(str(tmp_path / "artifact"))
    (tmp_path / "artifact" / "manifest.json").write_text(json.dumps({"mode": "lora",
                                                                     "embedding_rows": info["embedding_rows"]}))
    reloaded, _ = load_trained(tmp_path / "artifact", base, torch.bfloat16, trainable=True)
    again = {n: p.dtype for n, p in reloaded.named_parameters() if p.requires_grad}
    assert again and set(again.values()) == {torch.float32}
    assert {n.split(".")[0] for n in again} == {"backbone", "codebook_embeddings", "codebook_heads"}


def test_untrained_new_rows_are_rebuilt_exactly_from_the_base(tmp_path):
    """With train_new_tokens off, LoRA leaves the added rows alone: export and reload must rebuild the very rows
    training saw (the mean of the base's rows), not draw new random ones."""
    from audiotune.models.lm import new_rows_trained, resize_embeddings

    base = tmp_path / "base"
    _tiny(vocab=30).save_pretrained(str(base))
    settings = LLMStageConfig(mode="lora", lora=LoraSettings(train_new_tokens=False))
    trained, info = build_lm(settings, _vocab(), base, torch.float32, base_text_size=30)
    manifest = {"mode": "lora", "config": settings.model_dump(mode="json")}
    assert not new_rows_trained(manifest) and new_rows_trained({"mode": "full"})
    for _ in range(2):  # what export (merge) and load_trained do, twice: the same rows each time
        again = load_base(base, torch.float32, "eager")
        resize_embeddings(again, info["embedding_rows"], new_rows_trained(manifest), mean_resizing=False)
        for a, b in ((trained.get_input_embeddings(), again.get_input_embeddings()),
                     (trained.get_output_embeddings(), again.get_output_embeddings())):
            assert torch.equal(a.weight, b.weight)
    rows = trained.get_input_embeddings().weight
    assert torch.equal(rows[30:], rows[:30].mean(0, keepdim=True).expand(rows.shape[0] - 30, -1))

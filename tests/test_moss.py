"""MOSS-TTSD v0.7 (AsteroidTTS) checkpoints: strict loading by the key map, the vocabulary on its ids, the
delay pattern with its pad, channel 0 resizing, and the llm stage (LoRA and full) with export in its layout.

The tiny checkpoints here are written with upstream's key names directly (not with our writer), so the
loader is checked against the layout itself; the upstream numbers are checked in test_upstream_parity.py.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from audiotune.models.moss import MossCheckpointError, MossSpec, load_moss, moss_vocab, save_moss
from audiotune.models.vocab import AudioVocab


def write_asteroid(path: Path, channels: int = 3, text_rows: int = 40, codes: int = 16, seed: int = 0,
                   **config_changes) -> Path:
    """A random AsteroidTTS folder in the release layout: speech ids [text_rows, text_rows + codes) of channel 0,
    channels 1..C-1 with ``codes + 1`` rows (pad = ``codes``)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    vocab = text_rows + codes
    config = {
        "architectures": ["AsteroidTTSInstruct"], "model_type": "qwen3", "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
        "vocab_size": vocab, "max_position_embeddings": 512, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
        "tie_word_embeddings": False, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
        "initializer_range": 0.2, "channels": channels, "speech_vocab_size": codes + 1, "speech_pad_token": codes,
        "speech_token_range": [text_rows, vocab], **config_changes,
    }
    torch.manual_seed(seed)
    qwen = Qwen3ForCausalLM(Qwen3Config(**{k: v for k, v in config.items() if k != "architectures"}))
    tensors = {"model.language_model." + k[len("model."):]: v for k, v in qwen.state_dict().items()
               if k.startswith("model.")}
    speech_rows = config["speech_vocab_size"]
    for k in range(channels):
        rows = config["vocab_size"] if k == 0 else speech_rows
        tensors[f"model.embedding_list.{k}.weight"] = torch.randn(rows, 32) * 0.2
        tensors[f"lm_heads.{k}.weight"] = torch.randn(rows, 32) * 0.2
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"),
              metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return path


@pytest.fixture
def moss_dir(tmp_path) -> Path:
    return write_asteroid(tmp_path / "moss")


def _ids(spec: MossSpec, batch: int = 2, steps: int = 9, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    first = torch.randint(0, spec.vocab_size, (batch, steps, 1), generator=gen)
    rest = torch.randint(0, spec.speech_vocab_size, (batch, steps, spec.channels - 1), generator=gen)
    return torch.cat([first, rest], dim=-1)


def test_every_tensor_has_its_place_and_the_forward_sums_the_channel_tables(moss_dir):
    model = load_moss(moss_dir).eval()
    native = load_file(str(moss_dir / "model.safetensors"))
    assert torch.equal(model.backbone.model.embed_tokens.weight, native["model.embedding_list.0.weight"])
    assert torch.equal(model.language_model_embed_tokens, native["model.language_model.embed_tokens.weight"])
    assert not torch.equal(model.language_model_embed_tokens, model.backbone.model.embed_tokens.weight)
    assert torch.equal(model.codebook_heads[1].weight, native["lm_heads.2.weight"])
    ids = _ids(model.spec)
    summed = sum(torch.nn.functional.embedding(ids[..., k], native[f"model.embedding_list.{k}.weight"])
                 for k in range(3))
    with torch.no_grad():
        hidden = model.backbone.model(inputs_embeds=summed).last_hidden_state
        out = model(input_ids=ids)
    for k, logits in enumerate([out.logits, *out.codebook_logits]):
        torch.testing.assert_close(logits, hidden @ native[f"lm_heads.{k}.weight"].T)


def test_round_trip_keeps_keys_shapes_dtypes_and_bits_also_in_bf16(moss_dir, tmp_path):
    native = load_file(str(moss_dir / "model.safetensors"))
    save_moss(load_moss(moss_dir), tmp_path / "out")
    again = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert again.keys() == native.keys() and all(torch.equal(again[k], native[k]) for k in native)
    save_moss(load_moss(moss_dir, torch.bfloat16), tmp_path / "bf16")
    half = load_file(str(tmp_path / "bf16" / "model.safetensors"))
    assert all(half[k].dtype == torch.bfloat16 and torch.equal(half[k], native[k].bfloat16()) for k in native)


@pytest.mark.parametrize("change, expected", [
    (lambda t: t.pop("lm_heads.2.weight"), "missing lm_heads.2.weight"),
    (lambda t: t.__setitem__("lm_heads.3.weight", torch.zeros(17, 32)), "unexpected lm_heads.3.weight"),
    (lambda t: t.__setitem__("model.embedding_list.1.weight", torch.zeros(18, 32)),
     "mis-shaped model.embedding_list.1.weight [18, 32] (expected [17, 32])"),
    (lambda t: t.pop("model.language_model.embed_tokens.weight"), "missing model.language_model.embed_tokens"),
])
def test_a_missing_unexpected_or_misshaped_tensor_is_refused_by_name(moss_dir, change, expected):
    tensors = load_file(str(moss_dir / "model.safetensors"))
    change(tensors)
    save_file(tensors, str(moss_dir / "model.safetensors"))
    with pytest.raises(MossCheckpointError, match="model.safetensors does not fit") as err:
        load_moss(moss_dir)
    assert expected in str(err.value)


@pytest.mark.parametrize("field, value, message", [
    ("speech_pad_token", 17, "speech_pad_token 17 must be a row of speech_vocab_size 17"),
    ("speech_token_range", [40], "speech_token_range must be [start, end], got [40]"),
    ("channels", "8", "channels must be an integer"),
])
def test_bad_config_fields_are_named(moss_dir, field, value, message):
    config = json.loads((moss_dir / "config.json").read_text())
    config[field] = value
    (moss_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(MossCheckpointError) as err:
        load_moss(moss_dir)
    assert f"config.json: {message}" in str(err.value)


def test_a_relabelled_checkpoint_is_still_loaded_as_asteroid_tts(moss_dir):
    """Relabelling architectures to Qwen3ForCausalLM must not route it to a plain causal LM (random weights)."""
    from audiotune.models.families import family_for

    config = json.loads((moss_dir / "config.json").read_text())
    config["architectures"] = ["Qwen3ForCausalLM"]
    (moss_dir / "config.json").write_text(json.dumps(config))
    assert family_for(moss_dir).name == "moss-asteroid-tts"


def _vocab(codebooks: int = 3, codes: int = 16, markers_from: int = 30) -> AudioVocab:
    special = {name: markers_from + i for i, name in enumerate(["<|audio_start|>", "<|audio_end|>",
                                                               "<|task_tts|>"])}
    return AudioVocab(text_vocab_size=markers_from + 3, special_ids=special, codebook_size=codes,
                      num_codebooks=codebooks, audio_offset=markers_from + 3, pad_id=0, eos_id=2)


def test_vocab_on_the_checkpoint_ids_and_moss_delay_pattern(moss_dir):
    """Channel 0 speech ids from speech_token_range, speech_pad_token as filler and padding: upstream's
    shifting_inputs (channel k delayed by k, pad in the gaps) of the audio block."""
    from audiotune.train.layouts import build_example

    spec = MossSpec.from_config(json.loads((moss_dir / "config.json").read_text()), "config.json")
    vocab = moss_vocab(_vocab(), spec)
    assert (vocab.audio_offset, vocab.filler_id, vocab.channel_pad_id) == (40, 16, 16)
    assert AudioVocab.from_dict(json.loads(json.dumps(vocab.to_dict()))).channel_pad_id == 16  # in the manifest
    codes = np.arange(15).reshape(3, 5) % 16
    ex = build_example({"id": "a", "text_ids": [5, 6], "audio_codes": codes.tolist()}, "tts", vocab)
    ids = ex.input_ids
    start = 4  # <task_tts> 5 6 <audio_start>
    assert (ids[:start, 1:] == 16).all()
    frames = codes.copy()
    frames[0] += 40
    for k in range(3):
        block = ids[start:start + 5 + 2, k]
        np.testing.assert_array_equal(block[k:k + 5], frames[k])
        if k:
            assert (block[:k] == 16).all() and (block[k + 5:] == 16).all()


def test_tokens_with_another_channel_count_or_codebook_size_are_refused_naming_both(moss_dir):
    spec = MossSpec.from_config(json.loads((moss_dir / "config.json").read_text()), "config.json")
    with pytest.raises(MossCheckpointError, match=r"has 3 channels .* hold 8 codebooks per frame"):
        moss_vocab(_vocab(codebooks=8), spec, moss_dir, "tok/")
    with pytest.raises(MossCheckpointError, match=r"has 16 codes per codebook .* have 32"):
        moss_vocab(_vocab(codes=32), spec, moss_dir, "tok/")
    with pytest.raises(MossCheckpointError, match=r"segment markers .* fall inside the speech ids \[40, 56\)"):
        moss_vocab(_vocab(markers_from=45), spec, moss_dir, "tok/")
    for bad, message in (({"speech_token_range": (40, 70)}, r"speech_token_range \[40, 70\] must lie in \[0, vocab"),
                         ({"speech_pad_token": 3}, r"speech_pad_token 3 is one of the codes 0..15")):
        with pytest.raises(MossCheckpointError, match=message):  # loads (upstream accepts it) but cannot train
            moss_vocab(_vocab(), dataclasses.replace(spec, **bad), moss_dir, "tok/")


def test_new_channel0_rows_grow_the_carried_table_and_the_config(moss_dir, tmp_path):
    model = load_moss(moss_dir)
    model.resize_token_embeddings(64, mean_resizing=False)
    assert model.language_model_embed_tokens.shape[0] == 64
    save_moss(model, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == 64
    again = load_moss(tmp_path / "out")
    assert torch.equal(again.backbone.lm_head.weight, model.backbone.lm_head.weight)


# ---------------------------------------------------------------------------------------------- the llm stage
FAST = ["tracking.enabled=false", "run.num_workers=1", "llm.train.log_every=1", "llm.train.eval_every=1000",
        "llm.train.save_every=1000", "llm.train.batch_tokens=2048", "llm.layout=tts", "llm.train.max_steps=12",
        "llm.train.schedule=cosine", "llm.train.warmup_ratio=0.1", "llm.train.gradient_checkpointing=true"]
SEED_LORA = ["llm.mode=lora", "llm.lora.r=16", "llm.lora.alpha=32", "llm.lora.use_rslora=true", "llm.train.dtype=bf16",
             "llm.lora.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]",
             "llm.train.lr=5e-3"]


@pytest.fixture(scope="module")
def moss_tokens(llm_tokens, tmp_path_factory) -> Path:
    """The shared test corpus with 3 residual codebooks per frame."""
    from audiotune.config import load_config
    from audiotune.stages.tokenize import tokenize
    from tests.helpers import LLM_TOKENIZE

    out = tmp_path_factory.mktemp("moss-tok") / "tok"
    tokenize(load_config(None, [*LLM_TOKENIZE, "tokenize.audio_tokenizer.num_codebooks=3"]),
             dataset=str(llm_tokens.parent / "ds"), output=str(out))
    return out


def moss_base_for(tokens: Path, path: Path, channels: int = 3, markers_fit: bool = True) -> Path:
    """A tiny AsteroidTTS checkpoint whose text ids are the Tokens' tokenizer (markers included) and whose
    speech ids follow them, with the tokenizer beside it (as a release ships it). ``markers_fit=False``: the
    speech ids are the tokenizer's last ids and the checkpoint has no rows for audiotune's segment markers (as
    the release, whose tokenizer holds its speech tokens): training grows channel 0."""
    from transformers import AutoTokenizer

    from audiotune.artifacts import TOKENS, TOKENS_VERSION, read_manifest

    tok = AutoTokenizer.from_pretrained(str(tokens / "tokenizer"))
    codes = int(read_manifest(str(tokens), TOKENS, TOKENS_VERSION)["audio_tokenizer"]["codebook_size"])
    text_rows = len(tok) + 10 if markers_fit else len(tok) - codes
    write_asteroid(path, channels=channels, text_rows=text_rows, codes=codes, pad_token_id=tok.pad_token_id)
    tok.save_pretrained(str(path))
    return path


def _native(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_seed_recipe_trains_and_exports_in_the_asteroid_layout(moss_tokens, tmp_path, mode):
    from audiotune.config import load_config
    from audiotune.models.families import load_model
    from audiotune.stages.export import export
    from audiotune.stages.train_llm import train_llm

    base = moss_base_for(moss_tokens, tmp_path / "moss")
    sets = [*FAST, *SEED_LORA] if mode == "lora" else [*FAST, "llm.mode=full", "llm.train.lr=2e-3"]
    res = train_llm(load_config(None, sets), tokens=str(moss_tokens), output=str(tmp_path / "llm"),
                    base_model=str(base))
    assert res.metrics["final_loss"] < res.metrics["first_loss"], res.metrics
    manifest = json.loads((tmp_path / "llm" / "manifest.json").read_text())
    base_config = json.loads((base / "config.json").read_text())
    assert manifest["vocab"]["extra"]["channel_pad_id"] == base_config["speech_pad_token"]
    assert manifest["vocab"]["audio_offset"] == base_config["speech_token_range"][0]
    export(load_config(None, ["tracking.enabled=false", "export.num_samples=0"]), str(tmp_path / "out"),
           llm=str(tmp_path / "llm"))
    out = tmp_path / "out" / "llm"
    assert json.loads((out / "config.json").read_text()) == json.loads((base / "config.json").read_text())
    before, after = _native(base), _native(out)
    assert after.keys() == before.keys()
    assert all(after[k].shape == before[k].shape and after[k].dtype == before[k].dtype for k in before)
    changed = {k for k in before if not torch.equal(after[k], before[k])}
    assert any(".self_attn.q_proj." in k for k in changed) and any(".mlp.down_proj." in k for k in changed)
    if mode == "lora":  # the seed recipe: adapters on the decoder; of the tables and heads only the rows of the
        # segment markers the base never had (trainable token rows of channel 0) change
        assert not (tmp_path / "llm" / "codebooks.safetensors").exists()
        assert {k for k in changed if k.startswith(("lm_heads.", "model.embedding_list."))} <= \
            {"lm_heads.0.weight", "model.embedding_list.0.weight"}
        from transformers import AutoTokenizer

        text = len(AutoTokenizer.from_pretrained(str(base)))  # the markers come after the base's text ids
        assert manifest["new_token_ids"] == 10
        for key in ("lm_heads.0.weight", "model.embedding_list.0.weight"):
            rows = (after[key] != before[key]).any(dim=1).nonzero().flatten().tolist()
            assert set(rows) <= set(range(text, text + 10)), (key, rows)
    else:
        assert "lm_heads.1.weight" in changed
    assert torch.equal(after["model.language_model.embed_tokens.weight"],
                       before["model.language_model.embed_tokens.weight"])
    load_model(out, None, torch.float32, "eager")  # loads strictly as an AsteroidTTS checkpoint


def test_lora_with_new_marker_rows_grows_channel0_and_exports_the_grown_layout(moss_tokens, tmp_path):
    from transformers import AutoTokenizer

    from audiotune.config import load_config
    from audiotune.stages.export import export
    from audiotune.stages.train_llm import train_llm

    base = moss_base_for(moss_tokens, tmp_path / "moss", markers_fit=False)
    rows = len(AutoTokenizer.from_pretrained(str(base)))
    train_llm(load_config(None, [*FAST, *SEED_LORA, "llm.train.max_steps=3"]), tokens=str(moss_tokens),
              output=str(tmp_path / "llm"), base_model=str(base))
    export(load_config(None, ["tracking.enabled=false", "export.num_samples=0"]), str(tmp_path / "out"),
           llm=str(tmp_path / "llm"))
    config = json.loads((tmp_path / "out" / "llm" / "config.json").read_text())
    grown = config["vocab_size"]
    assert grown >= rows + 10 and grown % 64 == 0
    assert config == {**json.loads((base / "config.json").read_text()), "vocab_size": grown}
    before, after = _native(base), _native(tmp_path / "out" / "llm")
    for key in ("model.embedding_list.0.weight", "lm_heads.0.weight", "model.language_model.embed_tokens.weight"):
        assert after[key].shape[0] == grown and torch.equal(after[key][:rows], before[key]), key
    assert all(after[k].shape == before[k].shape for k in before if "embedding_list.0" not in k
               and "lm_heads.0" not in k and "embed_tokens" not in k)


def test_a_checkpoint_with_another_channel_count_is_refused_naming_both(moss_tokens, tmp_path):
    from audiotune.config import load_config
    from audiotune.stages.train_llm import train_llm

    base = moss_base_for(moss_tokens, tmp_path / "moss", channels=4)
    with pytest.raises(MossCheckpointError, match=r"has 4 channels .* hold 3 codebooks per frame"):
        train_llm(load_config(None, [*FAST, *SEED_LORA]), tokens=str(moss_tokens), output=str(tmp_path / "llm"),
                  base_model=str(base))


def test_a_sharded_checkpoint_loads_like_the_single_file(moss_dir, tmp_path):
    tensors = load_file(str(moss_dir / "model.safetensors"))
    keys = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    for name, names in shards.items():
        save_file({k: tensors[k] for k in names}, str(sharded / name))
    (sharded / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: name for name, names in shards.items() for k in names}}))
    (sharded / "config.json").write_text((moss_dir / "config.json").read_text())
    a, b = load_moss(moss_dir).state_dict(), load_moss(sharded).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_codebook_weights_of_another_length_are_refused_naming_the_setting(moss_dir):
    from audiotune.config import load_config
    from audiotune.models.families import load_model

    settings = load_config(None, ["llm.codebook_weights=[1,1]"]).llm
    with pytest.raises(MossCheckpointError, match=r"llm.codebook_weights has 2 entries; .* has 3 channels"):
        load_model(moss_dir, settings, torch.float32, "sdpa")
    assert load_model(moss_dir, load_config(None, ["llm.codebook_weights=[3,2,1]"]).llm, torch.float32,
                      "sdpa").weights == [3, 2, 1]


def test_codes_generated_with_the_checkpoint_pad_and_rows(moss_dir):
    """Sampling with a MOSS model: channels ≥ 1 draw codes only (not the pad row), the delay pattern is undone."""
    from audiotune.export.generate import Sampling, generate_codes, prompt_ids

    model = load_moss(moss_dir).eval()
    vocab = moss_vocab(_vocab(), model.spec)
    context, _ = prompt_ids(vocab, [5, 6, 7])
    codes = generate_codes(model, vocab, context, Sampling(temperature=1.0, max_frames=6, seed=1))
    assert codes.shape[0] == 3 and 1 <= codes.shape[1] <= 6
    assert ((codes >= 0) & (codes < model.spec.codebook_size)).all(), codes

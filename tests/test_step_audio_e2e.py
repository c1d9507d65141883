"""Step-Audio-EditX end to end in mode ``both``: llm stage → flow stage (release flow, encoder frozen) → joint
stage → export with a synthesized sample, through the CLI entry points in-process.

Tokens hold Step-Audio-EditX's dual-codebook ids as one interleaved stream of LLM ids (2 vq02 ids at
65536 + c, then 3 vq06 ids at 66560 + c, per group; manifest ``code_stream``), as tokenize's precomputed
import writes them; the LLM is a tiny Qwen2 whose vocabulary covers the offsets (65536 + 5120); the flow is
the parity kit's ``step-audio-editx-flow`` release folder (``AUDIOTUNE_UPSTREAM_FIXTURES``; skipped when the
kit lacks it), which pairs the stream as upstream ``_reshape`` does.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

KIT = Path(os.environ.get("AUDIOTUNE_UPSTREAM_FIXTURES", Path(__file__).parent / "fixtures" / "upstream"))
STREAM = {"codebook_offsets": [65536, 66560], "codebook_sizes": [1024, 4096], "interleave": [2, 3],
          "id_ranges": [[65536, 66560], [66560, 70656]], "frame_rate": 25.0}

pytestmark = pytest.mark.usefixtures("one_thread")


def _stream(rng: np.random.Generator, groups: int) -> list[int]:
    return np.concatenate([np.concatenate([65536 + rng.integers(0, 1024, 2), 66560 + rng.integers(0, 4096, 3)])
                           for _ in range(groups)]).tolist()


def _step_tokens(llm_tokens: Path, folder: Path, dest: Path) -> Path:
    """``llm_tokens`` (text ids, tokenizer, speakers) with Step streams for codes, the release's mels (random,
    2 mel frames per pair) and x-vectors: what tokenize writes for a precomputed Step-Audio-EditX import."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from safetensors.torch import save_file

    from audiotune.artifacts import shard_files
    from audiotune.models.flow.native.release import load_release

    _, info = load_release(folder)
    shutil.copytree(llm_tokens, dest)
    rng = np.random.default_rng(0)
    for shard in sorted(dest.glob("*/part-*.parquet")):
        rows = pq.read_table(shard).to_pylist()
        for row in rows:
            groups = int(rng.integers(2, 4))
            frames = groups * 3 * 2  # 3 pairs per group, the encoder up-samples by 2
            row.update(audio_codes=[_stream(rng, groups)], prompt_codes=None, mel_frames=frames,
                       num_audio_frames=groups * 5, task="tts",
                       mel=rng.standard_normal((frames, info.n_mels)).astype("<f4").tobytes(),
                       speaker_embedding=rng.standard_normal(info.spk_embed_dim).astype(np.float32).tolist())
        table = pa.Table.from_pylist(rows, schema=pq.read_schema(shard))
        pq.write_table(table, shard)
    save_file({"spk0": torch.randn(info.spk_embed_dim)}, str(dest / "tokenizer" / "speaker_embeddings.safetensors"))
    manifest = json.loads((dest / "manifest.json").read_text())
    manifest["mel"] = {"format": "cosyvoice-log-mel", **info.mel}
    manifest["speaker_embedding"] = "onnx"
    manifest["audio_tokenizer"] = {"type": "precomputed", "num_codebooks": 1, "codebook_size": 5120,
                                   "token_rate": 125 / 3, "code_stream": STREAM}
    manifest["shard_files"] = shard_files(dest)
    (dest / "manifest.json").write_text(json.dumps(manifest))
    return dest


def _base(tokens: Path, path: Path) -> Path:
    """A tiny Qwen2 (hidden 32, 1 layer) whose vocabulary covers the audio ids (65536 + 5120)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    config = AutoConfig.for_model("qwen2", vocab_size=65536 + 5120 + 64, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                  tie_word_embeddings=False)
    AutoModelForCausalLM.from_config(config).save_pretrained(str(path))
    AutoTokenizer.from_pretrained(str(tokens / "tokenizer")).save_pretrained(str(path))
    return path


def _cli(*args: str, sets: list[str]) -> int:
    from audiotune.cli import main as cli_main

    return cli_main([*args, *(a for s in sets for a in ("--set", s))])


def test_step_audio_editx_trains_end_to_end_in_mode_both(llm_tokens, tmp_path):
    folder = KIT / "step-audio-editx-flow"
    if not folder.is_dir():
        pytest.skip(f"step-audio-editx-flow is not in the parity kit {KIT}")
    tokens = _step_tokens(llm_tokens, folder, tmp_path / "tokens")
    base = _base(tokens, tmp_path / "base")
    common = ["tracking.enabled=false", "run.num_workers=1", "pipeline.mode=both", "llm.layout=tts",
              "llm.prompt_format=step-audio-editx", "llm.mode=full", "llm.train.max_steps=2",
              "llm.train.eval_every=1000", "llm.train.save_every=1000", "llm.train.batch_tokens=512",
              "flow.train.max_steps=2", "flow.train.eval_every=1000", "flow.train.save_every=1000",
              "flow.train.lr=1e-2", "flow.train.schedule=constant", "flow.max_frames_in_batch=400",
              "flow.num_samples=0", "flow.freeze_encoder=true"]
    assert _cli("train", "llm", "--tokens", str(tokens), "--base-model", str(base), "--output",
                str(tmp_path / "llm"), sets=common) == 0
    llm = json.loads((tmp_path / "llm" / "manifest.json").read_text())
    assert llm["vocab"]["audio_offset"] == 65536 and llm["embedding_rows"] == llm["base_vocab_size"]

    assert _cli("train", "flow", "--tokens", str(tokens), "--base-flow", str(folder), "--output",
                str(tmp_path / "flow"), sets=common) == 0
    theirs = torch.load(folder / "flow.pt", weights_only=True)
    flow = torch.load(tmp_path / "flow" / "flow.pt", weights_only=True)
    assert list(flow) == list(theirs)
    frozen = ("input_embedding.", "encoder.", "encoder_proj.")
    assert all(torch.equal(flow[k], theirs[k]) for k in theirs if k.startswith(frozen))
    assert any(not torch.equal(flow[k], theirs[k]) for k in theirs if k.startswith("decoder.estimator."))

    joint = [*common, "joint.train.epochs=1", "joint.train.max_steps=2", "joint.flow_condition=llm_predicted"]
    assert _cli("train", "joint", "--tokens", str(tokens), "--llm", str(tmp_path / "llm"), "--flow",
                str(tmp_path / "flow"), "--output", str(tmp_path / "joint"), sets=joint) == 0
    ours = torch.load(tmp_path / "joint" / "flow" / "flow.pt", weights_only=True)
    assert list(ours) == list(theirs) and all(ours[k].shape == theirs[k].shape for k in theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs if k.startswith(frozen))

    package = tmp_path / "export"
    assert _cli("export", "--llm", str(tmp_path / "joint" / "llm"), "--flow", str(tmp_path / "joint" / "flow"),
                "--tokens", str(tokens), "--output", str(package),
                sets=["tracking.enabled=false", "export.num_samples=1", "export.synthesis.max_audio_s=1",
                      f"export.synthesis.vocoder={folder}"]) == 0
    assert (package / "flow" / "flow.pt").read_bytes() == (tmp_path / "joint" / "flow" / "flow.pt").read_bytes()
    assert (package / "samples" / "sample-0.wav").is_file()


def test_generation_keeps_each_stream_position_in_its_codebook_and_uses_the_step_frame(llm_tokens):
    """An untrained LLM samples Step streams: every id lies in its position's codebook, the stream ends after
    whole groups, and the context is Step-Audio-EditX's tts frame (ended by the tokenizer's eos)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from audiotune.export.generate import Sampling, end_id, generate_codes, prompt_ids
    from audiotune.models.vocab import CodeStream, vocab_for_tokens

    tokenizer = AutoTokenizer.from_pretrained(str(llm_tokens / "tokenizer"))
    audio = {"type": "precomputed", "num_codebooks": 1, "codebook_size": 5120, "code_stream": STREAM}
    vocab = vocab_for_tokens(tokenizer, audio, "append", None, "step-audio-editx")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "qwen2", vocab_size=65536 + 5120 + 64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1)).eval()
    text = tokenizer("hello there", add_special_tokens=False)["input_ids"]
    context, known = prompt_ids(vocab, text, None, None)
    assert known == 0 and context[:2].tolist() == [1, 4] and end_id(vocab) == vocab.eos_id
    assert any(context[i:i + len(text)].tolist() == text for i in range(len(context)))  # the text is in the frame
    stream = CodeStream.from_dict(STREAM)
    for seed, max_frames in [(0, 12), (1, 7)]:
        codes = generate_codes(model, vocab, context, Sampling(temperature=1.0, top_k=0, max_frames=max_frames,
                                                               seed=seed))
        assert codes.shape[0] == 1 and codes.shape[1] > 0 and codes.shape[1] % 5 == 0, codes.shape
        stream.check(codes[0] + vocab.audio_offset)  # each position in its own codebook


def test_predicted_codes_of_a_stream_are_lm_ids_of_each_positions_codebook():
    """The joint stage's ``llm_predicted`` codes for Tokens of LM ids: at each target position the argmax among
    the ids of the target's codebook, as an LM id (the Tokens' own form), never an id of the other codebook."""
    from types import SimpleNamespace

    from audiotune.models.vocab import IGNORE_INDEX, AudioVocab
    from audiotune.train.joint import predicted_codes

    vocab = AudioVocab(text_vocab_size=10, special_ids={}, codebook_size=5120, num_codebooks=1, audio_offset=65536,
                       pad_id=0, eos_id=1)
    vocab.code_stream = STREAM
    stream = [65536 + 3, 65536 + 4, 66560 + 0, 66560 + 7, 66560 + 4095]
    labels = torch.tensor([[IGNORE_INDEX, *stream, 1]])
    logits = torch.zeros(1, 7, 70656)
    for pos, lm_id in enumerate([65536 + 9, 65536 + 8, 66560 + 5, 66560 + 6, 66560 + 7]):
        logits[0, pos, lm_id] = 5.0  # position pos predicts the target at pos + 1
        logits[0, pos, 66560 + 100 if lm_id < 66560 else 65536 + 100] = 9.0  # the other codebook scores higher
    codes = torch.tensor([[stream]])
    predicted, kept = predicted_codes(SimpleNamespace(logits=logits), labels, vocab, codes, torch.tensor([5]))
    assert kept == 0
    assert predicted.tolist() == [[[65545, 65544, 66565, 66566, 66567]]]

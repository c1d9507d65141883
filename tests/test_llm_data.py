"""LM training data: layouts and loss masks, overlong rows, token-budget batches, padded and packed collation."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from audiotune.models.vocab import IGNORE_INDEX, SEGMENT_TOKENS, AudioVocab
from audiotune.tokenization.schema import TOKENS_SCHEMA
from audiotune.train.llm_data import (
    TokenBudgetSampler,
    build_example,
    collate_packed,
    collate_padded,
    load_examples,
    supports_packing,
)

I = IGNORE_INDEX  # noqa: E741
# text ids < 10, markers 10..19, audio code c → 20 + c, pad 0, eos 1
AS, AE, PS, PE, INS, TTS, CLONE, EDIT, UND, MUSIC = range(10, 20)
EOS = 1


def _vocab(num_codebooks: int = 1) -> AudioVocab:
    return AudioVocab(text_vocab_size=20, special_ids={t: 10 + k for k, t in enumerate(SEGMENT_TOKENS)},
                      codebook_size=8, num_codebooks=num_codebooks, audio_offset=20, pad_id=0, eos_id=EOS)


ROW = {"id": "r", "task": "tts", "text_ids": [2, 3], "prompt_text_ids": [4], "instruction_ids": [5, 6],
       "audio_codes": [[1, 2, 3]], "prompt_codes": [[7, 0]], "repeat_count": 1}


def _masked(ids: list[int], first_target: int) -> list[int]:
    return [I] * first_target + ids[first_target:]


@pytest.mark.parametrize("layout, ids, first_target", [
    ("tts", [TTS, 2, 3, AS, 21, 22, 23, AE, EOS], 4),
    ("clone", [CLONE, PS, 4, PE, 2, 3, AS, 27, 20, 21, 22, 23, AE, EOS], 9),
    ("edit", [EDIT, INS, 5, 6, PS, 4, PE, 2, 3, AS, 27, 20, 21, 22, 23, AE, EOS], 12),
    ("understand", [UND, AS, 21, 22, 23, AE, 2, 3, EOS], 6),
    ("music", [MUSIC, INS, 5, 6, PS, 2, 3, PE, AS, 21, 22, 23, AE, EOS], 9),
    ("text", [2, 3, EOS], 0),
])
def test_layout_ids_and_loss_mask(layout, ids, first_target):
    ex = build_example(ROW, layout, _vocab())
    assert ex.input_ids.dtype == np.int32 and ex.input_ids.shape == (len(ids),)
    assert ex.input_ids.tolist() == ids
    assert ex.labels.tolist() == _masked(ids, first_target)


def test_text_window_ending_with_eos_gets_no_second_eos():
    ex = build_example({**ROW, "text_ids": [2, EOS]}, "text", _vocab())
    assert ex.input_ids.tolist() == ex.labels.tolist() == [2, EOS]


def test_multicodebook_delay_pattern():
    vocab = _vocab(num_codebooks=3)  # filler 8, channel pad 9
    row = {**ROW, "audio_codes": [[1, 2], [3, 4], [5, 6]], "prompt_codes": [[7], [0], [1]]}
    tts = build_example(row, "tts", vocab)
    assert tts.input_ids.shape == (4 + 4 + 1, 3)
    assert tts.input_ids.T.tolist() == [
        [TTS, 2, 3, AS, 21, 22, AE, AE, EOS],  # channel 0: undelayed, <audio_end> over the delay tail
        [9, 9, 9, 9, 8, 3, 4, 8, 9],           # codebook 1: shifted by one, fillers in the gaps
        [9, 9, 9, 9, 8, 8, 5, 6, 9],           # codebook 2: shifted by two
    ]
    assert tts.labels.T.tolist() == [
        [I, I, I, I, 21, 22, AE, AE, EOS],
        [I, I, I, I, 8, 3, 4, 8, I],
        [I, I, I, I, 8, 8, 5, 6, I],
    ]
    clone = build_example(row, "clone", vocab)  # prompt frame [7, 0, 1], then the two target frames
    audio = slice(7, 12)
    assert clone.input_ids[audio].T.tolist() == [[27, 21, 22, AE, AE], [8, 0, 3, 4, 8], [8, 8, 1, 5, 6]]
    assert clone.labels[audio].T.tolist() == [[I, 21, 22, AE, AE], [I, I, 3, 4, 8], [I, I, I, 5, 6]]
    assert (clone.labels[:7] == I).all() and clone.labels[-1].tolist() == [EOS, I, I]
    understand = build_example(row, "understand", vocab)
    assert understand.labels[:, 0].tolist() == [I] * 6 + [2, 3, EOS] and (understand.labels[:, 1:] == I).all()


@pytest.mark.parametrize("num_codebooks, frames", [(1, 5), (2, 1), (3, 7), (8, 40)])
def test_delay_then_undelay_returns_the_codes(num_codebooks, frames):
    from audiotune.train.layouts import delay_codes, undelay_codes

    vocab = AudioVocab(text_vocab_size=20, special_ids={t: 10 + k for k, t in enumerate(SEGMENT_TOKENS)},
                       codebook_size=16, num_codebooks=num_codebooks, audio_offset=20, pad_id=0, eos_id=EOS)
    codes = np.random.default_rng(frames).integers(0, 16, size=(num_codebooks, frames))
    ids, _ = delay_codes(codes, vocab)
    assert ids.shape == (frames + num_codebooks - 1, num_codebooks)
    assert np.array_equal(undelay_codes(ids, vocab), codes)


def _write(split: Path, rows: list[dict]) -> Path:
    split.mkdir(parents=True, exist_ok=True)
    full = [{"source_id": r["id"], **r} for r in rows]
    pq.write_table(pa.Table.from_pylist(full, schema=TOKENS_SCHEMA), split / "part-00000.parquet")
    return split


def test_load_examples_auto_layout_repeat_and_skips(tmp_path):
    rows = [
        {**ROW, "id": "tts", "repeat_count": 3},
        {**ROW, "id": "clone", "task": "clone"},
        {**ROW, "id": "clone-no-prompt", "task": "clone", "prompt_codes": None},
        {**ROW, "id": "tts-no-audio", "audio_codes": None},
        {**ROW, "id": "text", "task": "text", "audio_codes": None},
        {**ROW, "id": "odd", "task": "karaoke"},
    ]
    split = _write(tmp_path / "train", rows)
    examples, stats = load_examples(split, _vocab(), "auto", 64, "drop")
    assert [e.id for e in examples] == ["tts", "tts", "tts", "clone", "text"]
    assert [e.layout for e in examples] == ["tts", "tts", "tts", "clone", "text"]
    assert stats["rows"] == 6 and stats["skipped_missing"] == 3 and stats["examples"] == 5
    assert stats["tokens"] == 3 * 9 + 14 + 3
    val, _ = load_examples(split, _vocab(), "auto", 64, "drop", repeat=False)
    assert [e.id for e in val] == ["tts", "clone", "text"]
    forced, stats = load_examples(split, _vocab(), "understand", 64, "drop")
    assert {e.layout for e in forced} == {"understand"} and stats["skipped_missing"] == 2
    assert load_examples(tmp_path / "missing", _vocab(), "auto", 64, "drop")[0] == []


def test_bad_codes_name_the_shard_and_row(tmp_path):
    split = _write(tmp_path / "train", [{**ROW, "id": "bad", "audio_codes": [[1, 99]]}])
    with pytest.raises(ValueError, match=r"part-00000.parquet: row 'bad'.*outside \[0, 8\)"):
        load_examples(split, _vocab(), "auto", 64, "drop")


def test_overlong_rows_are_dropped_or_truncated_and_counted(tmp_path):
    rows = [
        {**ROW, "id": "short"},                                                     # 9 positions
        {**ROW, "id": "long", "audio_codes": [list(range(8)) * 2]},                 # 4 + 16 + 2 = 22
        {**ROW, "id": "understand", "task": "understand", "audio_codes": [[1] * 20]},  # targets past 12
    ]
    split = _write(tmp_path / "train", rows)
    kept, stats = load_examples(split, _vocab(), "auto", 12, "drop")
    assert [e.id for e in kept] == ["short"]
    assert stats["dropped_overlong"] == 2 and stats["truncated"] == 0
    kept, stats = load_examples(split, _vocab(), "auto", 12, "truncate")
    assert [e.id for e in kept] == ["short", "long"] and [len(e) for e in kept] == [9, 12]
    assert stats["truncated"] == 1 and stats["dropped_overlong"] == 1  # truncation left "understand" no target
    assert kept[1].input_ids.tolist() == [TTS, 2, 3, AS, *range(20, 28)]


# --- batching ---------------------------------------------------------------------------------------------------

LENGTHS = np.random.default_rng(0).integers(1, 300, size=500).tolist() + [700, 2000]


def _cost(batch: list[int], packing: bool) -> int:
    lens = [LENGTHS[i] for i in batch]
    return sum(lens) if packing else max(lens) * len(lens)


@pytest.mark.parametrize("packing", [False, True])
def test_sampler_respects_the_budget_and_covers_every_example_once(packing):
    sampler = TokenBudgetSampler(LENGTHS, batch_tokens=1024, max_batch_size=16, seed=3, packing=packing)
    for epoch in (0, 1):
        batches = sampler.batches(epoch)
        assert sorted(i for b in batches for i in b) == list(range(len(LENGTHS)))
        for b in batches:
            assert len(b) <= 16
            assert _cost(b, packing) <= 1024 or len(b) == 1
    assert [501] in sampler.batches(0)  # longer than the budget: a batch of its own
    assert sampler.batches(0) != sampler.batches(1)
    again = TokenBudgetSampler(LENGTHS, batch_tokens=1024, max_batch_size=16, seed=3, packing=packing)
    assert again.batches(1) == sampler.batches(1)
    sampler.set_epoch(1)
    assert list(sampler) == sampler.batches(1) and len(sampler) == len(sampler.batches(1))
    assert list(sampler.iter_from(1, 5)) == sampler.batches(1)[5:]


def test_sampler_groups_similar_lengths():
    sampler = TokenBudgetSampler(LENGTHS, batch_tokens=1024, max_batch_size=16, seed=0)
    padded = sum(_cost(b, False) for b in sampler.batches(0))
    assert padded < 1.25 * sum(LENGTHS)


def test_validation_sampler_is_fixed():
    sampler = TokenBudgetSampler(LENGTHS, batch_tokens=1024, max_batch_size=16, seed=0, shuffle=False)
    assert sampler.batches(0) == sampler.batches(7)
    assert sorted(i for b in sampler.batches(0) for i in b) == list(range(len(LENGTHS)))


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_distributed_ranks_share_the_epoch_and_run_equal_steps(world_size):
    kwargs = dict(batch_tokens=1024, max_batch_size=16, seed=5, world_size=world_size)
    global_batches = TokenBudgetSampler(LENGTHS, **kwargs).global_batches(2)
    per_rank = [TokenBudgetSampler(LENGTHS, rank=r, **kwargs).batches(2) for r in range(world_size)]
    assert len({len(b) for b in per_rank}) == 1
    dealt = [tuple(b) for rank in per_rank for b in rank]
    assert sorted({i for b in dealt for i in b}) == list(range(len(LENGTHS)))
    extra = Counter(dealt) - Counter(tuple(b) for b in global_batches)
    assert sum(extra.values()) == len(dealt) - len(global_batches) < world_size  # only the padding repeats
    assert all(b in global_batches[-world_size:] for b in map(list, extra))


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_repeats_mark_exactly_the_padding_so_validation_sees_each_example_once(world_size):
    kwargs = dict(batch_tokens=1024, max_batch_size=16, seed=5, world_size=world_size, shuffle=False)
    samplers = [TokenBudgetSampler(LENGTHS, rank=r, **kwargs) for r in range(world_size)]
    kept, dealt, marked = [], 0, 0
    for sampler in samplers:
        batches, repeats = sampler.batches(0), sampler.repeats(0)
        assert len(repeats) == len(batches)
        dealt, marked = dealt + len(batches), marked + sum(repeats)
        kept += [i for b, rep in zip(batches, repeats, strict=True) if not rep for i in b]
    assert marked == dealt - len(samplers[0].global_batches(0))  # 1 of 2 and 4 ranks gets a repeat, 0 of 3
    assert sorted(kept) == list(range(len(LENGTHS)))  # every example once, none twice


# --- collation ---------------------------------------------------------------------------------------------------

def _examples(vocab: AudioVocab) -> list:
    c = vocab.num_codebooks
    rows = [{**ROW, "audio_codes": ROW["audio_codes"] * c, "prompt_codes": ROW["prompt_codes"] * c},
            {**ROW, "audio_codes": [[5, 4, 3, 2, 1, 0, 7]] * c, "prompt_codes": [[6]] * c},
            {**ROW, "text_ids": [6, 7, 8, 9], "audio_codes": [[0, 1]] * c, "prompt_codes": [[2, 3, 4]] * c}]
    layouts = ["tts", "clone", "understand", "text", "music", "edit"]
    return [build_example(rows[k % 3], layout, vocab) for k, layout in enumerate(layouts)]


def test_collate_padded_and_packed_shapes():
    ex = _examples(_vocab())
    padded = collate_padded(ex, pad_id=0)
    longest = max(len(e) for e in ex)
    assert padded["input_ids"].shape == padded["labels"].shape == padded["attention_mask"].shape == (6, longest)
    assert (padded["labels"][padded["attention_mask"] == 0] == I).all()
    packed = collate_packed(ex)
    total = sum(len(e) for e in ex)
    assert set(packed) == {"input_ids", "position_ids", "labels"}
    assert packed["input_ids"].shape == packed["position_ids"].shape == (1, total)
    assert packed["position_ids"][0].tolist() == [p for e in ex for p in range(len(e))]
    starts = np.cumsum([0] + [len(e) for e in ex[:-1]])
    assert (packed["labels"][0, starts[1:]] == I).all()

    vocab3 = _vocab(num_codebooks=3)
    ex3 = _examples(vocab3)
    padded3 = collate_padded(ex3, pad_id=0, channel_pad_id=vocab3.channel_pad_id)
    short = min(range(6), key=lambda k: len(ex3[k]))
    assert padded3["input_ids"][short, -1].tolist() == [0, 9, 9]
    assert collate_packed(ex3)["input_ids"].shape == (1, sum(len(e) for e in ex3), 3)
    with pytest.raises(ValueError, match="channel_pad_id"):
        collate_padded(ex3, pad_id=0)


def _tiny_qwen2(vocab_size: int, attn: str):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=128, vocab_size=vocab_size, attn_implementation=attn)
    return Qwen2ForCausalLM(config).eval()


def _one_by_one(model, examples) -> list[torch.Tensor]:
    """Per-token losses of each example run alone (HF shift: logits[t] predict labels[t + 1])."""
    out = []
    for e in examples:
        logits = model(input_ids=torch.as_tensor(e.input_ids, dtype=torch.long)[None], use_cache=False).logits[0]
        labels = torch.as_tensor(e.labels, dtype=torch.long)
        keep = labels[1:] != I
        out.append(F.cross_entropy(logits[:-1][keep], labels[1:][keep], reduction="none"))
    return out


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_batch_gives_the_same_per_sample_losses_as_one_by_one(attn):
    vocab = _vocab()
    examples = _examples(vocab)
    model = _tiny_qwen2(vocab.lm_vocab_size, attn)
    assert supports_packing(attn)
    with torch.no_grad():
        alone = _one_by_one(model, examples)
        batch = collate_packed(examples)
        out = model(**batch, use_cache=False)
        logits, labels = out.logits[0], batch["labels"][0]
        sample = torch.repeat_interleave(torch.arange(len(examples)), torch.tensor([len(e) for e in examples]))
        token_loss = F.cross_entropy(logits[:-1], labels[1:], reduction="none", ignore_index=I)
        keep = labels[1:] != I
        for k, expected in enumerate(alone):
            got = token_loss[keep & (sample[1:] == k)]
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
        # the model's own (shifted) loss over the packed row equals the pooled one-by-one loss
        torch.testing.assert_close(out.loss, torch.cat(alone).mean(), atol=1e-5, rtol=0)


def test_packing_needs_use_cache_false():
    """With the config's use_cache=True the model builds a cache and skips packed-sequence detection."""
    vocab = _vocab()
    examples = _examples(vocab)
    model = _tiny_qwen2(vocab.lm_vocab_size, "sdpa")
    assert model.config.use_cache
    with torch.no_grad():
        batch = collate_packed(examples)
        cached = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
        uncached = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    first = len(examples[0])
    torch.testing.assert_close(cached[:, :first], uncached[:, :first], atol=1e-5, rtol=0)
    assert not torch.allclose(cached[:, first:], uncached[:, first:], atol=1e-3)


def test_padded_batch_gives_the_same_per_sample_losses_as_one_by_one():
    vocab = _vocab()
    examples = _examples(vocab)
    model = _tiny_qwen2(vocab.lm_vocab_size, "sdpa")
    with torch.no_grad():
        alone = _one_by_one(model, examples)
        batch = collate_padded(examples, pad_id=vocab.pad_id)
        logits = model(**{k: batch[k] for k in ("input_ids", "attention_mask")}, use_cache=False).logits
        for k, expected in enumerate(alone):
            labels = batch["labels"][k]
            keep = labels[1:] != I
            got = F.cross_entropy(logits[k, :-1][keep], labels[1:][keep], reduction="none")
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_supports_packing():
    assert all(supports_packing(a) for a in ("sdpa", "eager", "flash_attention_2", "flex_attention"))
    assert not supports_packing("paged|sdpa")


@pytest.mark.parametrize("packing", [False, True])
def test_batches_weighted_by_their_target_count_give_the_pooled_token_mean(packing):
    """What validation computes: Σ batch loss × target_tokens / Σ target_tokens = the mean over every target."""
    from audiotune.config import TrainSettings
    from audiotune.train.llm_data import ExampleBatches
    from audiotune.train.objectives import llm_loss

    vocab = _vocab()
    examples = _examples(vocab)
    assert examples[3].labels[0] != I  # the text layout trains on its first token, which nothing predicts
    model = _tiny_qwen2(vocab.lm_vocab_size, "sdpa")
    model.config.use_cache = False
    source = ExampleBatches(examples, vocab, TrainSettings(batch_tokens=10_000, max_batch_size=2), seed=0, rank=0,
                            world_size=1, packing=packing, shuffle=False)
    total = count = 0.0
    with torch.no_grad():
        alone = _one_by_one(model, examples)
        for indices in source.batches(0):
            loss, metrics = llm_loss(model, source.collate(indices))
            assert metrics["target_tokens"] == sum(len(alone[i]) for i in indices)  # predicted positions only
            total, count = total + float(loss) * metrics["target_tokens"], count + metrics["target_tokens"]
    assert len(source.batches(0)) == 3
    assert total / count == pytest.approx(float(torch.cat(alone).mean()), abs=1e-5)

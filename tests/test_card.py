"""The model card labels every figure with the stage that measured it, links nothing made up, and
verification.json says what was verified and why nothing was merged."""

from __future__ import annotations

import re

from audiotune.export.card import model_card, verification_record

LLM = {"mode": "full", "preset": "tiny", "config": {}, "steps": 8,
       "vocab": {"num_codebooks": 1, "codebook_size": 64, "audio_offset": 100},
       "metrics": {"final_loss": 2.0, "val_loss": 2.5, "best_val_loss": 2.1, "tokens_per_s": 900.0}}


def test_figures_name_their_stage():
    card = model_card("m", {"audiotune_version": "0.1.0"}, LLM, None, {}, [])
    assert "| validation loss (best), llm stage | 2.1 |" in card
    assert "| validation loss (final), llm stage | 2.5 |" in card
    joint = {**LLM, "joint": {"steps": 4}, "metrics": {**LLM["metrics"], "val_loss": 2.3, "steps_joint": 4}}
    card = model_card("m", {"audiotune_version": "0.1.0"}, joint, None, {}, [])
    assert "| validation loss (final), joint stage | 2.3 |" in card
    assert "| validation loss (best), llm stage | 2.1 |" in card


def test_no_made_up_link():
    card = model_card("m", {"audiotune_version": "0.1.0"}, LLM, None, {}, [])
    assert "Fine-tuned with audiotune 0.1.0:" in card
    assert not re.search(r"https?://", card)


def test_verification_says_why_nothing_was_merged():
    full = verification_record(None, LLM, None)
    assert full["merged"] is False and "full model" in full["reason"] and full["checked"]
    flow_only = verification_record(None, None, {"preset": "tiny"})
    assert flow_only["merged"] is False and "flow only" in flow_only["reason"]
    assert "loads strictly" in flow_only["checked"][0]
    merged = verification_record({"passed": True, "reload_max_abs_diff": 0.0}, {**LLM, "mode": "lora"}, None)
    assert merged["merged"] is True and merged["merge"]["passed"]
    assert "Merge check" in model_card("m", {}, LLM, None, {}, [])

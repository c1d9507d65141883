"""A tiny ACE-Step 1.5 pipeline folder built from diffusers / transformers configs (no download)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf
import torch

SAMPLE_RATE = 1600  # the tiny VAE's rate: 50 latent frames per second (downsampling 4 x 8)
LATENT_DIM = 8


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    for special in ("<|endoftext|>", "<pad>"):
        vocab[special] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<pad>",
                                   additional_special_tokens=["<|endoftext|>"])


def build_pipeline(seed: int = 0, is_turbo: bool = True):
    """An ``AceStepPipeline`` with every component a few thousand parameters."""
    from diffusers import (
        AceStepConditionEncoder,
        AceStepPipeline,
        AceStepTransformer1DModel,
        AutoencoderOobleck,
        FlowMatchEulerDiscreteScheduler,
    )
    from transformers import Qwen3Config, Qwen3Model

    torch.manual_seed(seed)
    attn = dict(num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=16)
    transformer = AceStepTransformer1DModel(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            in_channels=3 * LATENT_DIM, audio_acoustic_hidden_dim=LATENT_DIM,
                                            is_turbo=is_turbo, **attn)
    condition = AceStepConditionEncoder(hidden_size=32, intermediate_size=64, text_hidden_dim=16,
                                        timbre_hidden_dim=LATENT_DIM, num_lyric_encoder_hidden_layers=1,
                                        num_timbre_encoder_hidden_layers=1, **attn)
    with torch.no_grad():
        condition.silence_latent.normal_(0, 0.1)
    vae = AutoencoderOobleck(encoder_hidden_size=2 * LATENT_DIM, downsampling_ratios=[4, 8], channel_multiples=[1, 2],
                             decoder_channels=8, decoder_input_channels=LATENT_DIM, audio_channels=2,
                             sampling_rate=SAMPLE_RATE)
    tokenizer = _tokenizer()
    text = Qwen3Model(Qwen3Config(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                  num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                                  max_position_embeddings=4096, pad_token_id=tokenizer.pad_token_id))
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1, shift=1.0)
    return AceStepPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, transformer=transformer,
                           condition_encoder=condition, scheduler=scheduler)


def save_pipeline(root: Path, seed: int = 0, is_turbo: bool = True) -> Path:
    build_pipeline(seed, is_turbo).save_pretrained(str(root))
    return root


def music_folder(root: Path, songs: int = 3, seconds: float = 1.0, sr: int = 8000) -> Path:
    """An ACE-Step data folder: ``NAME.wav`` + ``NAME_prompt.txt`` (+ ``NAME_lyrics.txt`` for some)."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(songs):
        t = np.arange(int(seconds * sr)) / sr
        wav = 0.3 * np.sin(2 * np.pi * (110 * (i + 1)) * t) + 0.01 * rng.standard_normal(len(t))
        sf.write(root / f"song{i}.wav", np.stack([wav, wav], axis=1).astype(np.float32), sr)
        (root / f"song{i}_prompt.txt").write_text(["pop, piano", "rock, guitar", "ambient"][i % 3])
        if i % 2 == 0:
            (root / f"song{i}_lyrics.txt").write_text(f"[verse]\nla la {i}")
    return root

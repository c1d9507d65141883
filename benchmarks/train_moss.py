"""MOSS-TTSD (AsteroidTTS) LoRA training throughput: 8 codebooks per step against one, same Qwen3 backbone.

Both variants load one AsteroidTTS checkpoint with audiotune's loader and put the seed recipe's
adapters on it (rsLoRA r16 α32 on q/k/v/o/gate/up/down, gradient checkpointing, AdamW):

(a) ``8cb``: the whole :class:`~audiotune.models.moss.MossTTSLM`: 8 summed embedding tables in,
    8 heads and their weighted cross entropies out, ids [B, T, 8];
(b) ``1cb``: its backbone alone (channel 0's table and head, a plain Qwen3 causal LM), ids [B, T].

A token is one sequence position (8 codes in (a), one in (b)). The figure is training tokens/s over
the best of alternating timed rounds after warm-up. On a GPU the checkpoint is bf16 (adapters fp32) and MFU is reported
(4·N·tokens FLOPs per step for LoRA, N the backbone's parameters without embeddings).

    python -m benchmarks.train_moss [--preset cpu-small|moss-1.7b] [--steps 8] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import tempfile
import time
from pathlib import Path

import torch

log = logging.getLogger("benchmarks.train_moss")

PRESETS = {  # Qwen3-shaped AsteroidTTS checkpoints (release: Qwen3-1.7B, 8 channels of 1024 codes + pad)
    "cpu-small": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=64, text_rows=3072, codes=1024, channels=8),
    "moss-1.7b": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                      num_key_value_heads=8, head_dim=128, text_rows=151665, codes=1024, channels=8),
}
H100_BF16_PEAK = 989e12


def write_checkpoint(path: Path, preset: str) -> Path:
    """A random AsteroidTTS folder of ``preset`` in the release layout."""
    from safetensors.torch import save_file
    from transformers import Qwen3Config, Qwen3ForCausalLM

    p = dict(PRESETS[preset])
    text_rows, codes, channels = p.pop("text_rows"), p.pop("codes"), p.pop("channels")
    vocab = text_rows + codes
    config = {"architectures": ["AsteroidTTSInstruct"], "model_type": "qwen3", "vocab_size": vocab,
              "tie_word_embeddings": False, "pad_token_id": 0, "eos_token_id": 2, "rope_theta": 1e6,
              "max_position_embeddings": 4096, "channels": channels, "speech_vocab_size": codes + 1,
              "speech_pad_token": codes, "speech_token_range": [text_rows, vocab], **p}
    torch.manual_seed(0)
    qwen = Qwen3ForCausalLM(Qwen3Config(**{k: v for k, v in config.items() if k != "architectures"}))
    tensors = {"model.language_model." + k[len("model."):]: v for k, v in qwen.state_dict().items()
               if k.startswith("model.")}
    for k in range(channels):
        rows = vocab if k == 0 else codes + 1
        tensors[f"model.embedding_list.{k}.weight"] = torch.randn(rows, p["hidden_size"]) * 0.02
        tensors[f"lm_heads.{k}.weight"] = torch.randn(rows, p["hidden_size"]) * 0.02
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(config))
    return path


def batch(spec, multi: bool, size: int, length: int, device: str, seed: int) -> dict[str, torch.Tensor]:
    """Random ids in the checkpoint's ranges (channel 0: speech ids; channels ≥ 1: codes), all targets."""
    gen = torch.Generator().manual_seed(seed)
    start, end = spec.speech_token_range
    ids = torch.randint(start, end, (size, length, 1), generator=gen)
    if multi:
        rest = torch.randint(0, spec.codebook_size, (size, length, spec.channels - 1), generator=gen)
        ids = torch.cat([ids, rest], dim=-1)
    else:
        ids = ids[..., 0]
    ids = ids.to(device)
    return {"input_ids": ids, "attention_mask": torch.ones(size, length, dtype=torch.long, device=device),
            "labels": ids.clone()}


def setup(folder: Path, multi: bool, device: str, dtype: torch.dtype, size: int, length: int, count: int):
    """The variant's model with the seed recipe's adapters, its optimizer and ``count`` batches."""
    from audiotune.config import load_config
    from audiotune.models.lm import apply_lora, count_parameters
    from audiotune.models.moss import load_moss

    lora = load_config(None, ["llm.lora.r=16", "llm.lora.alpha=32", "llm.lora.use_rslora=true",
                              "llm.lora.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]"]
                       ).llm.lora
    moss = load_moss(folder, dtype, "sdpa")
    spec = moss.spec
    n_body = sum(p.numel() for n, p in moss.backbone.model.named_parameters() if "embed_tokens" not in n)
    moss.backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = apply_lora(moss if multi else moss.backbone, lora, []).to(device)
    model.train()
    trainable, total = count_parameters(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    data = [batch(spec, multi, size, length, device, s) for s in range(count)]
    info = {"variant": "8cb" if multi else "1cb", "codebooks": spec.channels if multi else 1,
            "trainable_parameters": trainable, "total_parameters": total,
            "backbone_parameters_without_embeddings": n_body}
    return model, opt, data, info


def timed_steps(model, opt, data, device: str) -> tuple[float, list[float]]:
    """Seconds for one optimizer step per batch of ``data``, and the losses."""
    if device == "cuda":
        torch.cuda.synchronize()
    start, losses = time.perf_counter(), []
    for b in data:
        loss = model(**b).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, losses


def run(folder: Path, device: str, dtype: torch.dtype, size: int, length: int, steps: int, warmup: int,
        rounds: int) -> list[dict]:
    """Both variants, measured in alternating rounds (a busy machine slows both alike); the best round counts."""
    variants = [setup(folder, multi, device, dtype, size, length, steps) for multi in (False, True)]
    for model, opt, data, _ in variants:
        timed_steps(model, opt, data[:warmup], device)
    seconds: list[list[float]] = [[], []]
    losses: list[list[float]] = [[], []]
    for _ in range(rounds):
        for i, (model, opt, data, _) in enumerate(variants):
            took, lost = timed_steps(model, opt, data, device)
            seconds[i].append(took)
            losses[i] += lost
    results = []
    tokens = steps * size * length
    for i, (_, _, _, info) in enumerate(variants):
        best = min(seconds[i])
        result = {**info, "tokens_per_s": tokens / best, "codes_per_s": tokens * info["codebooks"] / best,
                  "step_s": best / steps, "round_seconds": seconds[i], "first_loss": losses[i][0],
                  "last_loss": losses[i][-1]}
        if device == "cuda":
            result["mfu_h100_bf16"] = 4 * info["backbone_parameters_without_embeddings"] * tokens / best \
                / H100_BF16_PEAK
            result["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
        results.append(result)
    return results


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="cpu-small", choices=sorted(PRESETS))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32  # bf16 where the hardware has it
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_checkpoint(Path(tmp) / "moss", args.preset)
        runs = run(folder, device, dtype, args.batch, args.length, args.steps, args.warmup, args.rounds)
    report = {"benchmark": "train_moss", "preset": args.preset, "device": device,
              "device_name": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
              "dtype": str(dtype).replace("torch.", ""), "threads": args.threads, "batch": args.batch,
              "length": args.length, "steps": args.steps, "rounds": args.rounds, "torch": torch.__version__,
              "runs": runs,
              "ratio_8cb_to_1cb_tokens_per_s": runs[1]["tokens_per_s"] / runs[0]["tokens_per_s"]}
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    log.info("%s", text)
    return report


if __name__ == "__main__":
    main()

"""Per-GPU memory of model states for a 3B LLM under ZeRO-2, ZeRO-3 and ZeRO-3 + offload, LoRA and full fine-tune.

The model is Qwen2.5-3B's shape (hidden 2048, 36 layers, 16 heads, 2 KV heads, FFN 11008, vocab 151936, tied
embeddings), built on the meta device so the parameters are counted, not guessed; LoRA is r=16 on every linear
layer (PEFT ``all-linear``). Each figure is computed with the 2 + 2 + 12 bytes/parameter accounting of
:mod:`audiotune.train.memory` and side by side with DeepSpeed's own estimators, and the configuration
:func:`~audiotune.train.memory.choose_zero_config` picks is given for 80, 40 and 24 GiB GPUs.

    python -m benchmarks.zero_memory [--out benchmarks/results/zero_memory.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import time
from pathlib import Path

from audiotune.train.memory import (
    ZERO2,
    ZERO2_OFFLOAD,
    ZERO3,
    ZERO3_OFFLOAD,
    ZERO3_OFFLOAD_OPTIMIZER,
    GiB,
    activation_bytes,
    choose_zero_config,
    count_parameters,
    deepspeed_state_memory,
    model_state_memory,
)

log = logging.getLogger("benchmarks.zero_memory")
QWEN25_3B = dict(hidden_size=2048, num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2,
                 intermediate_size=11008, vocab_size=151936, tie_word_embeddings=True,
                 max_position_embeddings=32768)
GPUS = (1, 8, 16)
OPTIONS = (ZERO2, ZERO3, ZERO3_OFFLOAD, ZERO2_OFFLOAD, ZERO3_OFFLOAD_OPTIMIZER)
GPU_SIZES = (80, 40, 24)


def count_models() -> dict[str, dict[str, int]]:
    """Parameters of the full model and of its LoRA version, counted on the meta device."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Qwen2Config

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(Qwen2Config(**QWEN25_3B))
    total, trainable, largest = count_parameters(model)
    full = {"n_params": total, "trainable_params": trainable, "largest_layer_params": largest}
    lora_model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    total_l, trainable_l, largest_l = count_parameters(lora_model)
    lora = {"n_params": total_l, "trainable_params": trainable_l, "largest_layer_params": largest_l}
    return {"full": full, "lora": lora}


def table(models: dict[str, dict[str, int]]) -> list[dict]:
    rows = []
    for mode, m in models.items():
        for option in OPTIONS:
            for gpus in GPUS:
                ours = model_state_memory(m["n_params"], m["trainable_params"], gpus, option,
                                          m["largest_layer_params"])
                ds = deepspeed_state_memory(m["n_params"], m["trainable_params"], gpus, option,
                                            m["largest_layer_params"])
                rows.append({"mode": mode, "config": option.name, "gpus": gpus,
                             "gpu_gib": round(ours.gpu / GiB, 2), "deepspeed_gpu_gib": round(ds.gpu / GiB, 2),
                             "cpu_gib_per_gpu": round(ours.cpu / GiB, 2),
                             "deepspeed_cpu_gib_per_gpu": round(ds.cpu / GiB, 2)})
    return rows


def choices(models: dict[str, dict[str, int]]) -> list[dict]:
    out = []
    for mode, m in models.items():
        for size in GPU_SIZES:
            for gpus in GPUS:
                choice = choose_zero_config(m["n_params"], m["trainable_params"], gpus, size,
                                            largest_layer_params=m["largest_layer_params"])
                out.append({"mode": mode, "gpu_mem_gib": size, "gpus": gpus, **choice.to_dict()})
    return out


def markdown(rows: list[dict], picks: list[dict]) -> str:
    lines = ["| mode | configuration | 1 GPU | 8 GPUs | 16 GPUs |", "|---|---|---|---|---|"]
    for mode in ("lora", "full"):
        for config in dict.fromkeys(r["config"] for r in rows):
            cells = []
            for gpus in GPUS:
                r = next(x for x in rows if (x["mode"], x["config"], x["gpus"]) == (mode, config, gpus))
                cells.append(f"{r['gpu_gib']:.2f} ({r['deepspeed_gpu_gib']:.2f})")
            lines.append(f"| {mode} | {config} | " + " | ".join(cells) + " |")
    lines += ["", "| mode | GPU | 1 GPU | 8 GPUs | 16 GPUs |", "|---|---|---|---|---|"]
    for mode in ("lora", "full"):
        for size in GPU_SIZES:
            cells = [next(p for p in picks if (p["mode"], p["gpu_mem_gib"], p["gpus"]) == (mode, size, g))
                     for g in GPUS]
            lines.append(f"| {mode} | {size} GiB | " + " | ".join(
                c["option"]["name"] + ("" if c["fits"] else " (does not fit)") for c in cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/zero_memory.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    start = time.perf_counter()
    models = count_models()
    rows, picks = table(models), choices(models)
    m = QWEN25_3B
    acts = {f"seq{s}_{'ckpt' if ckpt else 'no_ckpt'}": {
        k: round(v / GiB, 2) for k, v in activation_bytes(s, 1, m["hidden_size"], m["num_hidden_layers"],
                                                          m["intermediate_size"], 2 * 128, m["vocab_size"],
                                                          ckpt).items()}
        for s in (2048, 4096) for ckpt in (True, False)}
    result = {
        "model": {"name": "Qwen2.5-3B shape", "config": QWEN25_3B, **models},
        "lora": {"r": 16, "target_modules": "all-linear"},
        "accounting": {"bytes_per_param": {"bf16_weights": 2, "bf16_grads": 2, "fp32_master_adam": 12},
                       "deepspeed": "estimate_zero2/zero3_model_states_mem_needs (2 + 18 bytes/param)"},
        "per_gpu_model_states": rows,
        "activations_gib_micro_batch_1": acts,
        "default_choice": picks,
        "markdown": markdown(rows, picks),
        "machine": {"python": platform.python_version(), "platform": platform.platform()},
        "seconds": round(time.perf_counter() - start, 1),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    log.info("%s\n\nwritten to %s", result["markdown"], out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""LLM-stage throughput: non-padding tokens/s and peak memory, three ways, one run, same model and data.

(a) the baseline users have today: HF Trainer + PEFT, batch size 1, no packing
    (the settings of the MOSS-TTSD and Kimi-Audio fine-tuning scripts);
(b) this stage's defaults: the engine with token-budget batches and padding-free packing;
(c) a minimal hand-written PyTorch loop over the same batches as (b): the floor for engine overhead.

Sequences have a realistic length spread (uniform 70-310 tokens). On a GPU the model is
a ~0.5B Qwen2-shaped LM in bf16 and model FLOPs utilisation is reported (6·N per token
for full fine-tuning, 4·N for LoRA).

    python -m benchmarks.train_llm [--preset cpu-small|qwen2-0.5b] [--mode lora|full] [--seconds 60]
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger("benchmarks.train_llm")

PRESETS = {  # Qwen2-shaped
    "cpu-small": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=4096),
    "qwen2-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                       num_key_value_heads=2, vocab_size=151936),
}
ATTN = ["sdpa"]
H100_BF16_PEAK = 989e12  # dense bf16 tensor-core peak of an H100 SXM


def make_model(preset: str, mode: str, device: str, dtype: torch.dtype):
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(**PRESETS[preset], tie_word_embeddings=True, attn_implementation=ATTN[0])
    model = Qwen2ForCausalLM(config).to(device=device, dtype=dtype if mode == "lora" else torch.float32)
    n_params = sum(p.numel() for p in model.parameters())
    if mode == "lora":
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                                 task_type="CAUSAL_LM"))
    return model, n_params


def make_examples(n: int, vocab_size: int, seed: int = 0):
    from audiotune.train.layouts import Example

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        ids = rng.integers(10, vocab_size, size=int(rng.integers(70, 311))).astype(np.int32)
        out.append(Example(input_ids=ids, labels=ids.copy(), id=f"s{i}"))
    return out


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _reset_peak(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_mb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_hf_trainer(examples, args, device, dtype) -> dict:
    """(a) HF Trainer + PEFT, batch size 1, no packing."""
    from transformers import Trainer, TrainingArguments

    model, n_params = make_model(args.preset, args.mode, device, dtype)
    data = [{"input_ids": torch.as_tensor(e.input_ids, dtype=torch.long),
             "labels": torch.as_tensor(e.labels, dtype=torch.long)} for e in examples]
    tokens_per_step = [len(e.input_ids) for e in examples]
    timings: list[float] = []

    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):  # noqa: ARG002
            _sync(device)
            timings.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as tmp:
        targs = TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=1, max_steps=min(len(data), args.max_batches_a),
            learning_rate=1e-4, logging_steps=10_000, save_strategy="no", report_to=[],
            bf16=(dtype == torch.bfloat16), use_cpu=(device == "cpu"), dataloader_num_workers=0,
            disable_tqdm=True, remove_unused_columns=False,
        )
        _reset_peak(device)
        trainer = Trainer(model=model, args=targs, train_dataset=data, callbacks=[Clock()])
        trainer.train()
        _sync(device)
        timings.append(time.perf_counter())
    warm = args.warmup
    steps = len(timings) - 1
    elapsed = timings[-1] - timings[warm]
    tokens = sum(tokens_per_step[warm:steps])
    return _result("hf_trainer_peft_bs1", tokens, elapsed, device, n_params, args.mode)


def _batches(examples, args, device):
    """The stage's default batching for this attention kernel (packing only with a varlen kernel)."""
    from audiotune.config import TrainSettings
    from audiotune.models.vocab import AudioVocab
    from audiotune.train.llm_data import ExampleBatches, resolve_packing

    vocab = AudioVocab(text_vocab_size=PRESETS[args.preset]["vocab_size"], special_ids={}, codebook_size=0,
                       num_codebooks=1, audio_offset=PRESETS[args.preset]["vocab_size"], pad_id=0, eos_id=1)
    train = TrainSettings(batch_tokens=args.batch_tokens, packing=args.packing)
    packing = resolve_packing(args.packing, args.attn)
    return ExampleBatches(examples, vocab, train, seed=0, rank=0, world_size=1, packing=packing)


def run_engine(examples, args, device, dtype) -> dict:
    """(b) The stage's engine with its defaults (token budget, packing)."""
    from audiotune.config import TrainSettings
    from audiotune.train.engine import Engine, decay_groups, make_accelerator
    from audiotune.train.objectives import llm_loss

    model, n_params = make_model(args.preset, args.mode, device, dtype)
    data = _batches(examples, args, device)
    batches = data.batches(0)[: args.max_batches_b]
    train = TrainSettings(batch_tokens=args.batch_tokens, packing=args.packing, lr=1e-4, max_steps=len(batches),
                          log_every=10_000, eval_every=10_000, save_every=10_000, resume="never",
                          dtype="bf16" if dtype == torch.bfloat16 else "fp32")
    acc = make_accelerator(train, train.dtype)

    class Clocked:
        def __init__(self):
            self.times: list[float] = []

        def batches(self, epoch):  # noqa: ARG002
            return batches

        def collate(self, indices):
            _sync(device)
            self.times.append(time.perf_counter())
            return data.collate(indices)

    clocked = Clocked()

    class NoTracker:
        def log_metrics(self, *a, **k):
            pass

    with tempfile.TemporaryDirectory() as tmp:
        _reset_peak(device)
        engine = Engine(train=train, accelerator=acc, model=model,
                        param_groups=decay_groups(list(model.named_parameters()), 1e-4, 0.01), loss_fn=llm_loss,
                        train_data=clocked, val_data=None, output=str(Path(tmp) / "out"), tracker=NoTracker(),
                        work_dir=Path(tmp), seed=0)
        engine.save_checkpoint = lambda: None  # throughput only
        engine.fit()
        _sync(device)
        clocked.times.append(time.perf_counter())
    warm = args.warmup
    tokens = sum(len(examples[i].input_ids) for b in batches[warm:] for i in b)
    name = f"stage_engine_{'packed' if data.packing else 'padded_length_grouped'}"
    return _result(name, tokens, clocked.times[-1] - clocked.times[warm], device, n_params, args.mode)


def run_plain_loop(examples, args, device, dtype) -> dict:
    """(c) A minimal loop over the same batches as (b)."""
    model, n_params = make_model(args.preset, args.mode, device, dtype)
    data = _batches(examples, args, device)
    batches = data.batches(0)[: args.max_batches_b]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    autocast = torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)
    _reset_peak(device)
    times = []
    for b in batches:
        _sync(device)
        times.append(time.perf_counter())
        batch = {k: v.to(device) for k, v in data.collate(b).items()
                 if k in ("input_ids", "attention_mask", "position_ids", "labels")}
        with autocast:
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    _sync(device)
    times.append(time.perf_counter())
    warm = args.warmup
    tokens = sum(len(examples[i].input_ids) for b in batches[warm:] for i in b)
    return _result("plain_loop_same_batches", tokens, times[-1] - times[warm], device, n_params, args.mode)


def _result(name, tokens, elapsed, device, n_params, mode) -> dict:
    tps = tokens / elapsed
    out = {"name": name, "tokens": tokens, "seconds": round(elapsed, 3), "tokens_per_s": round(tps, 1),
           "peak_memory_mb": round(_peak_mb(device), 1)}
    if device == "cuda":
        flops_per_token = (4 if mode == "lora" else 6) * n_params
        out["mfu"] = round(tps * flops_per_token / H100_BF16_PEAK, 4)
    log.info("%s: %s", name, out)
    return out


VARIANTS = {"a": run_hf_trainer, "b": run_engine, "c": run_plain_loop}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None)
    parser.add_argument("--mode", choices=("lora", "full"), default="lora")
    parser.add_argument("--examples", type=int, default=512)
    parser.add_argument("--batch-tokens", type=int, default=4096)
    parser.add_argument("--max-batches-a", type=int, default=120, help="Trainer steps (batch size 1).")
    parser.add_argument("--max-batches-b", type=int, default=40, help="Token-budget batches for (b) and (c).")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--packing", choices=("auto", "on", "off"), default="auto")
    parser.add_argument("--attn", default=None, help="sdpa (default on CPU) or flash_attention_2")
    parser.add_argument("--out", default=None)
    parser.add_argument("--variant", choices=sorted(VARIANTS), default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    args.preset = args.preset or ("qwen2-0.5b" if device == "cuda" else "cpu-small")
    if args.attn is None:
        try:
            import flash_attn  # noqa: F401

            args.attn = "flash_attention_2" if device == "cuda" else "sdpa"
        except ImportError:
            args.attn = "sdpa"
    ATTN[0] = args.attn
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if device == "cpu":
        torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.variant:  # internal: one variant in this process, its result as the last line
        examples = make_examples(args.examples, PRESETS[args.preset]["vocab_size"])
        print(json.dumps(VARIANTS[args.variant](examples, args, device, dtype)))
        return 0
    # each variant in its own process: peak memory (max RSS on a CPU) is then each one's own
    results = []
    for variant in VARIANTS:
        cmd = [sys.executable, "-m", "benchmarks.train_llm", "--variant", variant, *sys.argv[1:]]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            sys.stderr.write(proc.stderr[-4000:])
            raise SystemExit(f"variant {variant} failed")
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    a, b, c = (r["tokens_per_s"] for r in results)
    report = {
        "benchmark": "llm stage throughput (non-padding tokens/s), lengths uniform 70-310",
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "preset": args.preset, "mode": args.mode, "dtype": str(dtype),
        "batch_tokens": args.batch_tokens, "attn_implementation": args.attn, "packing": args.packing,
        "command": "python -m benchmarks.train_llm " + " ".join(sys.argv[1:]),
        "results": results,
        "b_over_a": round(b / a, 2), "b_over_c": round(b / c, 3),
        "targets": {"gpu": "b >= 4 x a", "cpu": "b >= 0.9 x c"},
    }
    out = Path(args.out or f"benchmarks/results/train_llm_{device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The model card (``README.md``) of an Export: what it is, what it was trained on, how well, how to use it."""

from __future__ import annotations

import json
from typing import Any

METRIC_NAMES = {"final_loss": "training loss (last steps)", "val_loss": "validation loss (final)",
                "best_val_loss": "validation loss (best)", "tokens_per_s": "throughput (tokens/s)"}


def _table(rows: list[tuple[str, Any]]) -> str:
    lines = ["| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows if v is not None]
    return "\n".join(lines)


def _fmt(value: Any) -> Any:
    if isinstance(value, float):
        return f"{value:.4g}"
    return value


def model_card(name: str, manifest: dict[str, Any], llm: dict[str, Any] | None, flow: dict[str, Any] | None,
               data: dict[str, Any], samples: list[dict[str, Any]]) -> str:
    """Markdown for the package's README.md.

    Args:
        name: Registered model name or run name.
        manifest: The Export manifest being written.
        llm: The LLM artifact's manifest, or None.
        flow: The Flow artifact's manifest, or None.
        data: Data summary (Tokens / Dataset report figures).
        samples: ``{"file", "text", "seconds"}`` of every sample.
    """
    parts = [f"# {name}", "", "Fine-tuned with [audiotune](https://github.com/audiotune/audiotune): "
             + ", ".join(p for p, m in (("an audio-token LLM", llm), ("a flow-matching mel decoder", flow)) if m)
             + ".", ""]
    if llm:
        cfg = llm.get("config", {})
        parts += ["## LLM", "", _table([
            ("base model", llm.get("base_model") or f"from scratch ({llm.get('preset')})"),
            ("training", llm.get("mode")), ("layout", cfg.get("layout")),
            ("LoRA", f"r={cfg.get('lora', {}).get('r')}, alpha={cfg.get('lora', {}).get('alpha')}, "
                     f"targets={cfg.get('lora', {}).get('target_modules')}" if llm.get("mode") == "lora" else None),
            ("audio codes", f"{llm['vocab']['num_codebooks']} × {llm['vocab']['codebook_size']} at id "
                            f"{llm['vocab']['audio_offset']}"),
            ("steps", llm.get("steps")),
            *[(METRIC_NAMES[k], _fmt(v)) for k, v in (llm.get("metrics") or {}).items() if k in METRIC_NAMES],
            ("joint stage", f"{llm['joint']['steps']} steps" if llm.get("joint") else None),
            ("own code (llm.trust_remote_code)", ", ".join(
                f"`{name}` (sha256 {digest})" for name, digest in sorted(
                    ((llm.get("base_fingerprint") or {}).get("remote_code") or {}).items())) or None),
        ]), ""]
    if flow:
        parts += ["## Flow decoder", "", _table([
            ("preset", flow.get("preset")), ("started from", flow.get("base_flow") or "random init"),
            ("mel", f"{flow['mel'].get('n_mels')} bins, {flow['mel'].get('sample_rate')} Hz, hop "
                    f"{flow['mel'].get('hop_length')}"),
            ("speaker conditioning", (flow.get("speaker") or {}).get("type")),
            ("EMA", (flow.get("ema") or {}).get("enabled")), ("steps", flow.get("steps")),
            *[(METRIC_NAMES[k], _fmt(v)) for k, v in (flow.get("metrics") or {}).items()
              if k in METRIC_NAMES and k != "tokens_per_s"],
        ]), ""]
    if data:
        parts += ["## Data", "", _table([(k.replace("_", " "), _fmt(v)) for k, v in data.items()]), ""]
    verification = manifest.get("verification")
    if verification:
        parts += ["## Merge check", "", "Logits of base + adapter and of the merged model on "
                  f"{verification['probe_sequences']} validation sequences ({verification['probe_tokens']} tokens, "
                  f"{verification['dtype']}): max |Δ| = {verification['max_abs_diff']:.3g} (tolerance "
                  f"{verification['tolerance']:.3g}); reloaded from disk: max |Δ| = "
                  f"{verification.get('reload_max_abs_diff')}. No PEFT layer remains.", ""]
    if samples:
        parts += ["## Samples", ""] + [f"- [`{s['file']}`]({s['file']}) ({s['seconds']:.1f} s): {s['text']}"
                                       for s in samples] + [""]
    parts += ["## Use it", ""]
    if llm:
        parts += ["```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
                  "", 'llm = AutoModelForCausalLM.from_pretrained("llm")  # the merged LM',
                  'tokenizer = AutoTokenizer.from_pretrained("llm")', "```", ""]
    if flow:
        parts += ["```python", "from audiotune.models.flow import load_flow", "",
                  'flow = load_flow("flow")  # codes [C, T] -> mel: flow.inference(codes)', "```", ""]
    if llm and flow:
        parts += ["End to end (LLM → flow → vocoder):", "", "```",
                  'audiotune synthesize --model . --text "Hello there." --out hello.wav', "```", ""]
    if (llm or {}).get("mode") == "lora":
        parts += ["The adapter alone is in `llm-adapter/` "
                  "(`PeftModel.from_pretrained(base, \"llm-adapter\")` after resizing the base's embeddings to "
                  f"{llm.get('embedding_rows')} rows).", ""]
    import yaml

    for title, part in (("LLM", llm), ("flow", flow)):
        if part and part.get("config"):
            parts += [f"## Training config ({title})", "", "```yaml",
                      yaml.safe_dump(part["config"], sort_keys=False).rstrip(), "```", ""]
    parts += ["## Provenance", "", "```json", json.dumps({k: manifest.get(k) for k in (
        "audiotune_version", "code_version", "dataset_fingerprint", "llm", "flow", "tokens")}, indent=2), "```", ""]
    return "\n".join(parts)

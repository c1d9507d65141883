"""The model card (``README.md``) of an Export: what it is, what it was trained on, how well, how to use it."""

from __future__ import annotations

import json
from typing import Any

METRIC_NAMES = {"final_loss": "training loss (last steps)", "val_loss": "validation loss (final)",
                "best_val_loss": "validation loss (best)", "tokens_per_s": "throughput (tokens/s)"}
# the figures the joint stage writes over in the manifests it carries forward (stages/train_joint.py); the others
# stay those of the model's own stage (llm or flow)
JOINT_METRICS = ("val_loss",)


def _figures(part: dict[str, Any], stage: str, skip: tuple[str, ...] = ()) -> list[tuple[str, Any]]:
    """The manifest's figures, each labelled with the stage that measured it."""
    metrics = part.get("metrics") or {}
    rows = []
    for key, label in METRIC_NAMES.items():
        if key in metrics and key not in skip:
            source = "joint" if part.get("joint") and key in JOINT_METRICS else stage
            rows.append((f"{label}, {source} stage", _fmt(metrics[key])))
    return rows


def verification_record(verification: dict[str, Any] | None, llm: dict[str, Any] | None,
                        flow: dict[str, Any] | None) -> dict[str, Any]:
    """What export verified, for ``verification.json``: the merge check, or why nothing was merged.

    Args:
        verification: The merge check (:class:`audiotune.export.merge.Verification` as a dict), or None.
        llm: The LLM artifact's manifest, or None.
        flow: The Flow artifact's manifest, or None.
    """
    checked = []
    if flow:
        checked.append("the flow loads strictly (no missing, unexpected or mis-shaped weights) and carries no "
                       "LoRA layer")
    if verification:
        checked.append("LoRA merge: logits of base + adapter and of the merged model agree within the tolerance"
                       + ("; the merged model reloaded from disk agrees too"
                          if verification.get("reload_max_abs_diff") is not None else ""))
        return {"merged": True, "checked": checked, "merge": verification}
    if llm:
        checked.append("the LLM loads as saved")
        reason = (f"the LLM was trained as a {llm.get('mode')} model (not a LoRA adapter): its weights are "
                  "exported as trained, there is no adapter to merge")
    else:
        reason = "no LLM in this export (flow only): there is no adapter to merge"
    return {"merged": False, "reason": reason, "checked": checked}


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
    version = manifest.get("audiotune_version")
    parts = [f"# {name}", "", f"Fine-tuned with audiotune{f' {version}' if version else ''}: "
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
            *_figures(llm, "llm"),
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
            *_figures(flow, "flow", skip=("tokens_per_s",)),
        ]), ""]
    if data:
        parts += ["## Data", "", _table([(k.replace("_", " "), _fmt(v)) for k, v in data.items()]), ""]
    verification = manifest.get("verification")
    if not verification and llm:
        parts += ["## Merge check", "", verification_record(None, llm, flow)["reason"].capitalize() + ".", ""]
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

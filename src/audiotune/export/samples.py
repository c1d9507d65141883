"""Audio samples of an export: texts synthesized end to end (LLM → flow → vocoder), or, for a flow-only
export, validation codes decoded by the flow."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from audiotune.config import ExportConfig

DEFAULT_TEXTS = ["Hello, this is a sample of the fine-tuned voice.", "The quick brown fox jumps over the lazy dog."]


def sample_texts(E: ExportConfig, tokens_dir: Path | None, package: Path) -> list[str]:
    """The user's ``export.sample_texts``, else the first validation texts (by id), else two default texts."""
    if E.sample_texts:  # the user's own texts: all of them
        return list(E.sample_texts)
    texts: list[str] = []
    if tokens_dir is not None and (package / "llm").is_dir():
        import pyarrow.parquet as pq
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(package / "llm"), trust_remote_code=False)
        for split in ("val", "train"):
            for shard in sorted((tokens_dir / split).glob("part-*.parquet")):
                table = pq.read_table(shard, columns=["id", "task", "text_ids"]).to_pylist()
                for row in sorted(table, key=lambda r: r["id"]):
                    if row["task"] in ("tts", "clone", "edit") and row["text_ids"]:
                        texts.append(tokenizer.decode(row["text_ids"], skip_special_tokens=True).strip())
            if texts:
                break
    return (texts or DEFAULT_TEXTS)[: E.num_samples]


def render_samples(E: ExportConfig, package: Path, tokens_dir: Path | None) -> list[dict[str, Any]]:
    """Synthesize the sample texts end to end into ``package/samples``; a flow-only export decodes
    validation codes instead. Returns ``{"file", "text", "seconds", "frames"}`` per sample."""
    if E.num_samples == 0 or not (package / "flow").is_dir():
        return []
    from audiotune.export.synthesis import Speech, Synthesizer, write_wav

    out, samples = package / "samples", []
    if (package / "llm").is_dir():
        synth = Synthesizer(package, E.synthesis)
        texts = sample_texts(E, tokens_dir, package)
        for k, text in enumerate(texts):
            speech = synth.synthesize(text, seed=E.synthesis.seed + k)
            write_wav(out / f"sample-{k}.wav", speech)
            samples.append({"file": f"samples/sample-{k}.wav", "text": text, "seconds": round(speech.seconds, 3),
                            "frames": int(speech.codes.shape[1])})
    elif tokens_dir is not None:
        from audiotune.models.flow import load_flow
        from audiotune.models.vocoder import load_vocoder
        from audiotune.train.flow_data import load_flow_examples

        flow = load_flow(package / "flow").eval()
        manifest = json.loads((package / "flow" / "manifest.json").read_text())
        examples, _ = load_flow_examples(tokens_dir / "val", flow.config.n_mels,
                                         manifest["vocab"].get("codebooks", "all"),
                                         manifest["vocab"].get("num_codebooks"))
        vocoder = load_vocoder(E.synthesis.vocoder, manifest["mel"])
        for k in range(min(E.num_samples, len(examples))):
            batch = examples.collate([k])
            speaker = {}
            if flow.config.speaker.type == "id":
                speaker["speaker_index"] = int(batch["speaker_index"][0])
            elif flow.config.speaker.type == "embedding":
                speaker["speaker_embedding"] = batch["speaker_embedding"][0]
            n = int(batch["code_lengths"][0])
            mel = flow.inference(batch["codes"][0, :, :n], generator=torch.Generator().manual_seed(k), **speaker)
            wav = np.asarray(vocoder(mel.numpy()), dtype=np.float32).reshape(-1)
            speech = Speech(wav=wav, sample_rate=int(vocoder.sample_rate), codes=batch["codes"][0].numpy(),
                            mel=mel.numpy())
            write_wav(out / f"sample-{k}.wav", speech)
            samples.append({"file": f"samples/sample-{k}.wav", "text": f"(codes of validation row {examples.ids[k]})",
                            "seconds": round(speech.seconds, 3), "frames": n})
    if samples:
        (out / "samples.json").write_text(json.dumps(samples, indent=2) + "\n")
    return samples

"""What the tokenize stage measured: token rates, codebook usage, sequence lengths."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np


class TokenizeReport:
    """Accumulates per-row statistics of the Tokens artifact."""

    def __init__(self, num_codebooks: int, codebook_size: int | None):
        self.rows = Counter()
        self.reasons = Counter()
        self.lengths: list[int] = []
        self.audio_seconds = 0.0
        self.audio_frames = 0
        self.text_tokens = 0
        self.num_codebooks = num_codebooks
        self.codebook_size = codebook_size
        self.code_counts = [Counter() for _ in range(num_codebooks)]

    def add(self, row: dict[str, Any], split: str) -> None:
        self.rows[split] += 1
        self.text_tokens += row["num_text_tokens"]
        length = row["num_text_tokens"] + len(row.get("prompt_text_ids") or []) + len(row.get("instruction_ids") or [])
        length += row["num_audio_frames"] + (len(row["prompt_codes"][0]) if row.get("prompt_codes") else 0)
        self.lengths.append(length)
        if row.get("audio_codes") is not None:
            self.audio_seconds += row["duration_s"] or 0.0
            self.audio_frames += row["num_audio_frames"]
            for k, book in enumerate(row["audio_codes"][: self.num_codebooks]):
                self.code_counts[k].update(book)

    def codebook_usage(self) -> list[dict[str, float]]:
        usage = []
        for counts in self.code_counts:
            total = sum(counts.values())
            if not total:
                usage.append({"used_fraction": 0.0, "perplexity": 0.0, "distinct": 0})
                continue
            p = np.array(list(counts.values()), dtype=np.float64) / total
            size = self.codebook_size or len(counts)
            usage.append({
                "distinct": len(counts),
                "used_fraction": round(len(counts) / size, 4),
                "perplexity": round(float(np.exp(-(p * np.log(p)).sum())), 2),
            })
        return usage

    def to_dict(self, **extra: Any) -> dict[str, Any]:
        lengths = np.asarray(self.lengths or [0])
        return {
            "rows": {"train": self.rows["train"], "val": self.rows["val"], "quarantined": sum(self.reasons.values())},
            "quarantine_reasons": dict(self.reasons.most_common()),
            "audio_hours": round(self.audio_seconds / 3600, 6),
            "audio_tokens_per_second": round(self.audio_frames / self.audio_seconds, 3) if self.audio_seconds else None,
            "text_tokens": self.text_tokens,
            "audio_frames": self.audio_frames,
            "codebook_usage": self.codebook_usage(),
            "sequence_length_percentiles": {
                f"p{q}": int(np.percentile(lengths, q)) for q in (50, 90, 95, 99, 100)
            },
            **extra,
        }

    def write(self, directory: Path, **extra: Any) -> dict[str, Any]:
        report = self.to_dict(**extra)
        (directory / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        self.plot(directory / "length_histogram.png")
        return report

    def plot(self, path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
        if self.lengths:
            ax.hist(self.lengths, bins=30, color="#d8793b", edgecolor="white")
        ax.set_xlabel("sequence length (text tokens + audio frames)")
        ax.set_ylabel("rows")
        ax.set_title(f"{len(self.lengths)} sequences")
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)

"""Counts and durations of a conversion: ``report.json`` and a duration histogram PNG."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from audiotune.data.sources.base import BadRecord


class ConvertReport:
    """Accumulates what the convert stage kept and quarantined."""

    def __init__(self) -> None:
        self.input_rows = 0
        self.kept = Counter()
        self.seconds = defaultdict(float)
        self.durations: list[float] = []
        self.speakers: dict[str, dict[str, float]] = defaultdict(lambda: {"rows": 0, "hours": 0.0})
        self.tasks = Counter()
        self.reasons = Counter()
        self.reason_fields = Counter()

    def add_row(self, row: dict[str, Any], split: str) -> None:
        self.kept[split] += 1
        self.tasks[row["task"]] += 1
        duration = row.get("duration_s") or 0.0
        self.seconds[split] += duration
        spk = self.speakers[row.get("speaker") or "<none>"]
        spk["rows"] += 1
        spk["hours"] += duration / 3600
        if row.get("duration_s") is not None:
            self.durations.append(duration)

    def add_bad(self, bad: BadRecord) -> None:
        self.reasons[bad.reason] += 1
        self.reason_fields[f"{bad.reason}:{bad.field}"] += 1

    @property
    def quarantined(self) -> int:
        return sum(self.reasons.values())

    @property
    def bad_fraction(self) -> float:
        return self.quarantined / self.input_rows if self.input_rows else 0.0

    def histogram(self, bins: int = 20) -> dict[str, list[float]]:
        if not self.durations:
            return {"edges_s": [], "counts": []}
        counts, edges = np.histogram(np.asarray(self.durations), bins=bins)
        return {"edges_s": [round(float(e), 3) for e in edges], "counts": [int(c) for c in counts]}

    def to_dict(self, **extra: Any) -> dict[str, Any]:
        return {
            "rows": {
                "input": self.input_rows,
                "train": self.kept["train"],
                "val": self.kept["val"],
                "quarantined": self.quarantined,
            },
            "bad_fraction": round(self.bad_fraction, 6),
            "hours": {s: round(self.seconds[s] / 3600, 6) for s in ("train", "val")},
            "tasks": dict(self.tasks),
            "speakers": {
                k: {"rows": int(v["rows"]), "hours": round(v["hours"], 6)} for k, v in sorted(self.speakers.items())
            },
            "quarantine_reasons": dict(self.reasons.most_common()),
            "quarantine_reason_fields": dict(self.reason_fields.most_common()),
            "duration_histogram": self.histogram(),
            **extra,
        }

    def summary_of_reasons(self) -> str:
        return ", ".join(f"{r}: {n}" for r, n in self.reasons.most_common()) or "none"

    def write(self, directory: Path, **extra: Any) -> dict[str, Any]:
        """Write ``report.json`` and ``duration_histogram.png`` into ``directory``."""
        report = self.to_dict(**extra)
        (directory / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        self.plot(directory / "duration_histogram.png")
        return report

    def plot(self, path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
        if self.durations:
            ax.hist(self.durations, bins=30, color="#3b7dd8", edgecolor="white")
        ax.set_xlabel("duration (s)")
        ax.set_ylabel("rows")
        total_h = sum(self.seconds.values()) / 3600
        ax.set_title(f"{len(self.durations)} utterances, {total_h:.2f} h")
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)


@dataclass
class ConvertResult:
    """What a convert run produced (one task or fanned out): the Dataset's URI, its report and manifest."""

    output: str
    report: dict[str, Any]
    manifest: dict[str, Any]

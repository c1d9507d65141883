"""Reporting an evaluation: the per-utterance table (Parquet), the summary (mean and 95% bootstrap interval of
every metric, failure and gibberish rates), the card table, and plots (histograms, champion vs challenger)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

# summary names, in card order, with what a reader needs to know (↑ higher is better, ↓ lower)
LABELS = {
    "wer": "WER ↓", "cer": "CER ↓", "sim": "speaker similarity ↑", "dnsmos_ovrl": "DNSMOS OVRL ↑",
    "dnsmos_sig": "DNSMOS SIG ↑", "dnsmos_bak": "DNSMOS BAK ↑", "dnsmos_p808": "DNSMOS P.808 ↑",
    "mcd": "MCD (dB) ↓", "f0_rmse": "F0 RMSE (Hz) ↓", "voicing_error": "voicing error ↓",
    "duration_ratio": "duration / reference", "empty": "empty outputs ↓", "truncated": "truncated outputs ↓",
    "max_length": "max-length outputs ↓", "failed": "synthesis failures ↓", "bad": "empty/truncated/max-length/"
    "failed ↓", "seconds": "seconds per utterance", "frames": "code frames per utterance",
}
HIGHER_IS_BETTER = {"sim", "dnsmos_ovrl", "dnsmos_sig", "dnsmos_bak", "dnsmos_p808"}
RATES = ("empty", "truncated", "max_length", "failed", "bad")  # 0/1 per utterance: summarised as *_rate


def summary_name(column: str) -> str:
    return f"{column}_rate" if column in RATES else column


def bootstrap_mean(values: np.ndarray, resamples: int, seed: int) -> tuple[float, float, float]:
    """Mean and 95% percentile bootstrap interval of ``values`` (NaN left out); NaNs when none."""
    values = values[np.isfinite(values)]
    if not values.size:
        return math.nan, math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, (resamples, values.size))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(values.mean()), float(low), float(high)


def summarize(rows: list[dict[str, Any]], resamples: int, seed: int) -> dict[str, dict[str, float]]:
    """``{name: {"mean", "low", "high", "n"}}`` for every numeric column of the per-utterance rows."""
    columns = sorted({k for r in rows for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    out = {}
    for column in columns:
        values = np.asarray([float(r.get(column, math.nan)) if r.get(column) is not None else math.nan
                             for r in rows], dtype=np.float64)
        mean, low, high = bootstrap_mean(values, resamples, seed)
        out[summary_name(column)] = {"mean": mean, "low": low, "high": high, "n": int(np.isfinite(values).sum())}
    return out


def write_table(rows: list[dict[str, Any]], path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = sorted({k for r in rows for k in r})
    pq.write_table(pa.Table.from_pylist([{c: r.get(c) for c in columns} for r in rows]), path)


def _order(name: str) -> tuple[int, str]:
    base = name[:-5] if name.endswith("_rate") else name
    keys = list(LABELS)
    return (keys.index(base) if base in keys else len(keys), name)


def card_table(summary: dict[str, dict[str, float]], notes: dict[str, str], skipped: dict[str, str],
               fingerprint: str, count: int) -> str:
    """Markdown: the eval table of a model card."""
    lines = [f"## Evaluation ({count} utterances, eval set `{fingerprint[:12]}`)", "",
             "| metric | mean | 95% interval | n |", "|---|---|---|---|"]
    for name in sorted(summary, key=_order):
        s = summary[name]
        base = name[:-5] if name.endswith("_rate") else name
        label = LABELS.get(base, name) + (" (rate)" if name.endswith("_rate") else "")
        if s["n"] == 0:
            lines.append(f"| {label} | – | – | 0 |")
        else:
            lines.append(f"| {label} | {s['mean']:.4g} | {s['low']:.4g} – {s['high']:.4g} | {s['n']} |")
    lines.append("")
    lines += [f"- {k}: {v}" for k, v in sorted(notes.items())]
    lines += [f"- {k}: skipped ({v})" for k, v in sorted(skipped.items())]
    return "\n".join(lines) + "\n"


def plot_histograms(rows: list[dict[str, Any]], names: list[str], path: Path) -> Path | None:
    """One histogram per metric column."""
    names = [n for n in names if any(isinstance(r.get(n), float) and math.isfinite(r[n]) for r in rows)]
    if not names:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(names), figsize=(3 * len(names), 2.6), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        ax.hist([r[name] for r in rows if isinstance(r.get(name), float) and math.isfinite(r[name])], bins=15)
        ax.set_title(LABELS.get(name, name), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def plot_comparison(champion: dict[str, dict], challenger: dict[str, dict], names: list[str],
                    path: Path) -> Path | None:
    """Champion vs challenger: mean and 95% interval of each metric both have."""
    names = [n for n in names if n in champion and n in challenger]
    if not names:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(names), figsize=(2.6 * len(names), 2.6), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        for x, (who, s) in enumerate((("champion", champion[name]), ("challenger", challenger[name]))):
            err = [[s["mean"] - s.get("low", s["mean"])], [s.get("high", s["mean"]) - s["mean"]]]
            ax.errorbar([x], [s["mean"]], yerr=err, fmt="o", capsize=4, label=who)
        ax.set_xticks([0, 1], ["champion", "challenger"], fontsize=8)
        ax.set_title(LABELS.get(name, name), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path

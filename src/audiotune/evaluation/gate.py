"""The champion gate: does a challenger replace the champion, both measured on the same eval set?

The rule (:class:`~audiotune.config.GateRule`) names the summary metrics compared, how much worse than the
champion each may be, and whether one must be strictly better. A metric missing on either side (skipped for
missing weights, or not measured) makes the gate refuse to decide: the champion stays. The answer is one line.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from audiotune.evaluation.report import HIGHER_IS_BETTER

TOLERANCE = 1e-12


@dataclass
class Decision:
    """What the gate decided and why, in one line."""

    promote: bool
    reason: str


def _ok(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(float(value))


def decide(challenger: Mapping[str, float], champion: Mapping[str, float] | None, rule) -> Decision:
    """Apply ``rule`` to the challenger's and champion's summary means (``{metric: mean}``).

    Args:
        challenger: The challenger's means.
        champion: The champion's means on the same eval set, or None when there is no champion.
        rule: A :class:`~audiotune.config.GateRule`.
    """
    if champion is None:
        return Decision(True, "no champion yet")
    missing = [f"{m} ({'challenger' if not _ok(challenger.get(m)) else 'champion'})" for m in rule.metrics
               if not (_ok(challenger.get(m)) and _ok(champion.get(m)))]
    if missing:
        return Decision(False, f"cannot decide: no value of {', '.join(missing)} (metric skipped or not measured)")
    better, worse, kept = [], [], []
    for m in rule.metrics:
        new, old = float(challenger[m]), float(champion[m])
        worse_by = (old - new) if m in HIGHER_IS_BETTER else (new - old)
        allowed = float(rule.max_worse.get(m, 0.0))
        shown = f"{m} {new:.4g} vs {old:.4g}"
        if worse_by > allowed + TOLERANCE:
            worse.append(f"{shown} (worse by {worse_by:.3g}, allowed {allowed:.3g})")
        elif worse_by < -TOLERANCE:
            better.append(shown)
        else:
            kept.append(shown)
    if worse:
        return Decision(False, "worse: " + "; ".join(worse))
    if rule.require_better == "any" and not better:
        return Decision(False, "not better on any of " + ", ".join(rule.metrics) + " (" + "; ".join(kept) + ")")
    return Decision(True, "better on " + ("; ".join(better) if better else "none") +
                    ("; within bounds: " + "; ".join(kept) if kept else ""))

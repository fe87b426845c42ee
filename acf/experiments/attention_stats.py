"""The statistics and the decision rule of the attention protocol (``acf.experiments.attention``): paired
differences by seed, t intervals, the equivalence test (TOST) and the verdict."""
from __future__ import annotations

import math
import statistics
from typing import Optional

from scipy import stats

EQUIVALENCE = 0.005  # bits/dim: the margin of the decision rule and of the equivalence test (TOST)
USED_SHARE = 1e-2    # the attention share from which attention counts as used (success needs it)


def paired(rows: list[dict], stage: str, arm: str, arm_step: Optional[int], baseline: str = "baseline-wide",
           base_step: Optional[int] = None, key: str = "test_bpd") -> list[float]:
    """Per seed: ``key`` of ``arm`` at ``arm_step`` minus the baseline's at ``base_step`` (default: the
    same step); ``arm_step=None``: the arm's last checkpoint."""
    def at(name: str, step: Optional[int]) -> dict[int, float]:
        runs = [r for r in rows if r["stage"] == stage and r["arm"] == name and r.get(key) is not None]
        if step is None:
            step = max((r["step"] for r in runs if not r.get("equal_time_for")), default=None)
        return {r["seed"]: r[key] for r in runs if r["step"] == step}

    a = at(arm, arm_step)
    b = at(baseline, base_step if base_step is not None else (arm_step or last_step(rows, stage, arm)))
    return [a[s] - b[s] for s in sorted(a) if s in b]


def last_step(rows: list[dict], stage: str, arm: str) -> Optional[int]:
    """The last checkpoint of ``arm`` (not counting the equal-time extensions of the baseline)."""
    return max((r["step"] for r in rows if r["stage"] == stage and r["arm"] == arm and not r.get("equal_time_for")),
               default=None)


def last_mean(rows: list[dict], stage: str, arm: str, key: str) -> float:
    """The mean over seeds of ``key`` at the last checkpoint of ``arm`` (NaN where none was measured)."""
    step = last_step(rows, stage, arm)
    known = [r[key] for r in rows
             if r["stage"] == stage and r["arm"] == arm and r["step"] == step and r.get(key) is not None]
    return statistics.fmean(known) if known else math.nan


def equal_time_step(rows: list[dict], stage: str, arm: str) -> Optional[int]:
    """The step ``baseline-wide`` reaches in the time ``arm`` takes for its last checkpoint."""
    for r in rows:
        if r["stage"] == stage and r["arm"] == "baseline-wide" and arm in str(r.get("equal_time_for") or "").split(","):
            return r["step"]
    return None


def interval(diffs: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """Mean and the two-sided t interval at ``level`` (NaN for fewer than two values)."""
    if len(diffs) < 2:
        return (diffs[0] if diffs else math.nan), math.nan, math.nan
    mean, se = statistics.fmean(diffs), statistics.stdev(diffs) / math.sqrt(len(diffs))
    half = stats.t.ppf(0.5 + level / 2, len(diffs) - 1) * se
    return mean, mean - half, mean + half


def equivalent(diffs: list[float], margin: float = EQUIVALENCE) -> Optional[bool]:
    """TOST at the 5% level: the 90% interval of the mean difference lies inside ``(-margin, margin)``."""
    _, low, high = interval(diffs, 0.90)
    return None if math.isnan(low) else (-margin < low and high < margin)


def best_attention_arm(rows: list[dict], stage: str = "A") -> str:
    """The certified attention arm with the lowest mean paired difference at equal wall-clock, among the
    arms whose attention is used (share >= ``USED_SHARE`` at the last step; all arms if none is): an arm
    whose attention stays the identity is its baseline paying for attention, and tells stage B nothing."""
    def score(arm: str) -> float:
        diffs = paired(rows, stage, arm, None, base_step=equal_time_step(rows, stage, arm))
        return statistics.fmean(diffs) if diffs else math.inf

    arms = sorted({r["arm"] for r in rows if r["stage"] == stage and r["role"] == "attention"})
    used = [a for a in arms if last_mean(rows, stage, a, "attention_share") >= USED_SHARE]
    return min(used or arms, key=score)


def verdict(rows: list[dict]) -> dict:
    """The decision rule of the protocol, from the rows (see the module docstring)."""
    out: dict = {}
    for stage in sorted({r["stage"] for r in rows}):
        arms = sorted({r["arm"] for r in rows if r["stage"] == stage and r["role"] == "attention"})
        for arm in arms:
            diffs = paired(rows, stage, arm, None, base_step=equal_time_step(rows, stage, arm))
            _, low, high = interval(diffs)
            share = last_mean(rows, stage, arm, "attention_share")
            knock = last_mean(rows, stage, arm, "knockout_cost")
            gain = -statistics.fmean(diffs) if diffs else math.nan
            out[f"{stage}:{arm}"] = {"success": bool(high < -EQUIVALENCE and share >= USED_SHARE and knock >= gain),
                                     "equivalent": equivalent(diffs), "interval": (low, high), "share": share,
                                     "knockout": knock}
    control = paired(rows, "A", "control+gated", None, baseline="control")
    out["control"] = {"passes": bool(control and interval(control)[2] < 0), "diffs": control}
    reference = paired(rows, "A", "coupling+attention", None, baseline="coupling")
    out["reference"] = {"attention_helps": bool(reference and interval(reference)[2] < 0), "diffs": reference}
    return out

"""Sanity flags of a report: runs that rank worse than chance or predict worse than a constant.

From each run's metrics.json entity block:

* ``auc_below_chance``: the AUC is below 0.5: the scores rank clicks under non-clicks more often than not
  (inverted scores, a label or join bug, a broken checkpoint).
* ``logloss_above_base_rate``: the log loss is above that of the constant base-rate predictor on the same rows,
  ``-(p ln p + (1 - p) ln(1 - p))`` with ``p`` the rows' click rate (``calibration.click_rate``, else
  ``positives / rows``; the prediction ``p`` inside the logarithms clipped to [1e-7, 1 - 1e-7] like the model's
  scores): predicting the click rate for every row would have been better (miscalibrated or overconfident
  scores, whatever their ranking).

A model is flagged when any of its runs is; the flag lists the seeds (runs) it applies to.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

__all__ = ["CHANCE_AUC", "FLAG_TEXT", "base_rate_logloss", "click_rate_of", "run_flags", "model_flags",
           "flag_cell"]

CHANCE_AUC = 0.5
_CLIP = 1e-7  # the log loss's clip (entity_sums.py)
_RELATIVE_TOLERANCE = 1e-9  # a model scoring the base rate itself is not flagged for float rounding
FLAG_TEXT = {
    "auc_below_chance": "AUC below 0.5: ranks worse than chance",
    "logloss_above_base_rate": "log loss above the constant base-rate predictor's: worse than predicting the "
                               "click rate for every row",
}
_CELL_TEXT = {"auc_below_chance": "⚠ below chance (AUC < 0.5)",
              "logloss_above_base_rate": "⚠ worse than base rate (log loss)"}


def base_rate_logloss(click_rate: Optional[float]) -> Optional[float]:
    """Log loss of predicting ``click_rate`` for every row of rows with that click rate (None if unknown).

    >>> round(base_rate_logloss(0.5), 6)
    0.693147
    """
    if click_rate is None:
        return None
    r = float(click_rate)
    q = min(max(r, _CLIP), 1.0 - _CLIP)  # the prediction, clipped like the model's; r the rows' own rate
    return -(r * math.log(q) + (1.0 - r) * math.log(1.0 - q))


def click_rate_of(block: Mapping[str, Any]) -> Optional[float]:
    """The rows' click rate: ``calibration.click_rate``, else ``positives / rows`` (None if neither is there)."""
    rate = (block.get("calibration") or {}).get("click_rate")
    if rate is not None:
        return float(rate)
    if block.get("positives") is not None and block.get("rows"):
        return block["positives"] / block["rows"]
    return None


def run_flags(block: Optional[Mapping[str, Any]]) -> List[Dict[str, Any]]:
    """The flags of one run's entity block: ``[{"code", "text", "value", "threshold"}]`` (module docstring)."""
    if not block:
        return []
    out = []
    auc = block.get("auc")
    if auc is not None and auc < CHANCE_AUC:
        out.append({"code": "auc_below_chance", "text": FLAG_TEXT["auc_below_chance"], "value": float(auc),
                    "threshold": CHANCE_AUC})
    logloss, base = block.get("logloss"), base_rate_logloss(click_rate_of(block))
    if logloss is not None and base is not None and logloss > base * (1.0 + _RELATIVE_TOLERANCE):
        out.append({"code": "logloss_above_base_rate", "text": FLAG_TEXT["logloss_above_base_rate"],
                    "value": float(logloss), "threshold": base})
    return out


def model_flags(runs: Sequence[Tuple[Optional[int], str, Optional[Mapping[str, Any]]]]) -> List[Dict[str, Any]]:
    """A model's flags from its runs ``[(seed, run_dir, entity block)]``: one entry per flag raised by some run,
    ``{"code", "text", "all_runs", "seeds", "runs", "values", "thresholds"}`` (seeds / runs / values of the runs
    it applies to)."""
    out: Dict[str, Dict[str, Any]] = {}
    for seed, run_dir, block in runs:
        for f in run_flags(block):
            entry = out.setdefault(f["code"], {"code": f["code"], "text": f["text"], "seeds": [], "runs": [],
                                               "values": [], "thresholds": []})
            entry["seeds"].append(seed)
            entry["runs"].append(run_dir)
            entry["values"].append(f["value"])
            entry["thresholds"].append(f["threshold"])
    for entry in out.values():
        entry["all_runs"] = len(entry["runs"]) == len(runs)
    return list(out.values())


def flag_cell(flags: Sequence[Mapping[str, Any]], n_runs: int) -> str:
    """The table cell of a model's flags: ``⚠ below chance (AUC < 0.5) (seed 1)``; '' without flags."""
    parts = []
    for f in flags:
        text = _CELL_TEXT.get(f["code"], "⚠ " + f["code"])
        if not f.get("all_runs") and n_runs > 1:
            seeds = f.get("seeds") or []
            if seeds and None not in seeds:
                text += f" (seed{'s' if len(seeds) > 1 else ''} {', '.join(str(s) for s in seeds)})"
            else:
                text += f" ({len(f.get('runs') or [])} of {n_runs} runs)"
        parts.append(text)
    return "; ".join(parts)

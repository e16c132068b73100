"""How many seeds and test users a comparison needs to resolve an effect of a given size.

Reads a report's ``report.json`` (``mkt run`` / ``mkt report`` with two or more seeds) and, for a model against
the report's baseline, splits the uncertainty of the target-GAUC difference into its two sources:

* training: the per-seed paired differences' standard deviation ``sd_seed`` (``seed_level``), which an interval
  over ``n`` seeds shrinks as ``t(n-1) * sd_seed / sqrt(n)``;
* the test users: the half-width ``h_user`` of the paired user-level bootstrap (``user_level``), the same for
  any number of seeds (every seed scores the same users); it shrinks as ``1 / sqrt(users)``.

A combined half-width ``sqrt(h_seed^2 + h_user^2)`` must be at most ``--half-width``; the tool gives the seeds and
the users (as a multiple of today's) that achieve it with each source at ``half_width / sqrt(2)``, and the
detectable effect of the runs it read (their combined half-width). Both parts are estimates from the runs read:
with 3 seeds ``sd_seed`` is itself uncertain, so size from the largest run available.

    python tools/power.py out/experiment/report/report.json --model mkt --half-width 0.005

Prints one JSON object on its last line.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mkt_torchrec.evaluation.seed_intervals import t_quantile  # noqa: E402


def seeds_for(sd: float, half_width: float, confidence: float, most: int = 1000) -> int:
    """The fewest seeds n >= 2 with t(n-1) * sd / sqrt(n) <= half_width."""
    for n in range(2, most + 1):
        if t_quantile((1 + confidence) / 2, n - 1) * sd / math.sqrt(n) <= half_width:
            return n
    return most


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("report", help="a report.json of two or more seeds per model")
    p.add_argument("--model", required=True, help="the model compared with the report's baseline")
    p.add_argument("--metric", default="gauc", choices=["gauc", "auc"])
    p.add_argument("--half-width", type=float, default=0.005, help="the interval half-width wanted (default 0.005, "
                   "the MKT paper's gain over Finetune)")
    args = p.parse_args(argv)
    with open(args.report, encoding="utf-8") as f:
        report = json.load(f)
    models = {m["name"]: m for m in report["models"]}
    if args.model not in models:
        p.error(f"{args.report}: no model {args.model!r}; it has {sorted(models)}")
    m = models[args.model]
    seed, user = (m.get("seed_level") or {}).get(args.metric), m.get("user_level") or {}
    if not seed or seed.get("n", 0) < 2 or not user.get(f"{args.metric}_diff_ci"):
        p.error(f"{args.report}: {args.model} has no seed-level and user-level {args.metric} intervals against "
                f"{report['baseline']} (needs two or more paired seeds and eval.bootstrap_samples > 0)")
    confidence = float(seed.get("confidence", report.get("confidence", 0.95)))
    lo, hi = user[f"{args.metric}_diff_ci"]
    h_user = (hi - lo) / 2
    h_seed = seed["t"] * seed["sd"] / math.sqrt(seed["n"])
    each = args.half_width / math.sqrt(2)
    result = {
        "model": args.model, "baseline": report["baseline"], "metric": args.metric, "confidence": confidence,
        "seeds": seed["n"], "users": user.get("users_evaluated"), "difference": seed["mean"],
        "sd_seed": seed["sd"], "half_width_seed": h_seed, "half_width_users": h_user,
        "half_width": math.hypot(h_seed, h_user),  # the effect these runs can resolve
        "target_half_width": args.half_width,
        "seeds_needed": seeds_for(seed["sd"], each, confidence),
        "users_factor_needed": max(1.0, (h_user / each) ** 2),
    }
    result["users_needed"] = math.ceil(result["users_factor_needed"] * (user.get("users_evaluated") or 0))
    print(f"{args.model} - {report['baseline']} {args.metric}: {seed['mean']:+.4f}; half-width {result['half_width']:.4f} "
          f"(seeds {h_seed:.4f}, test users {h_user:.4f}); for +-{args.half_width}: {result['seeds_needed']} seeds and "
          f"{result['users_factor_needed']:.1f}x the users ({result['users_needed']} GAUC users)")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

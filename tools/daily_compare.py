"""Compare daily incremental training with retraining from scratch and with a model frozen after day 1.

Reads the output of ``mkt daily`` (``--daily``: incremental, and the frozen day-1 model scored on every day) and of
one ``mkt run --runs mkt`` per day on the cumulative datasets (``--retrain``: day k's trains on days 1..k, from
``mkt synth --days N --cumulative``'s ``upto-k``, and is tested on day k + 1, the rows the day-k models are tested on).
For each day and method: the target entity's GAUC, AUC and log loss (mean over seeds), and for each method against
the incremental model the seed-paired difference with its Student-t interval over seeds (the report's seed-level
interval, :mod:`mkt_torchrec.evaluation.seed_intervals`); "pooled" averages each seed's difference over days 2..N
(the days it exists) first. A cached stage 2's run (``mkt daily --set model.tem.knowledge=cache --stale-lags L``)
adds the same model scored with a cache version L days old: paired with the fresh version on the same rows. Checks that the paired runs scored the same rows. Time: each method's seconds per day (incremental: the
day's two stages, their evaluation and the frozen model's scoring; retrain: one seed's share of the day's ``mkt
run``, data preparation excluded).

Prints a markdown table, then one JSON object on its last line.

Example:
    python tools/daily_compare.py --daily out/daily --retrain out/retrain-1 out/retrain-2 out/retrain-3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from typing import Any, Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mkt_torchrec.evaluation.paired import check_same_rows  # noqa: E402
from mkt_torchrec.evaluation.seed_intervals import seed_interval  # noqa: E402

METRICS = ("gauc", "auc", "logloss")


def _metrics(run: str) -> Dict[str, Any]:
    with open(os.path.join(run, "metrics.json"), encoding="utf-8") as f:
        target = json.load(f)["target"]
    return {k: target.get(k) for k in (*METRICS, "rows")}


def _runs(daily: str, retrain: List[str], seeds: int, day: int) -> Dict[str, List[str]]:
    inc = [os.path.join(daily, f"seed{s}", f"day-{day:03d}", "tem") for s in range(seeds)]
    frozen = inc if day == 1 else [os.path.join(daily, f"seed{s}", "frozen", f"day-{day:03d}") for s in range(seeds)]
    out = {"incremental": inc, "frozen after day 1": frozen}
    if retrain:
        out["retrain from scratch"] = [os.path.join(retrain[day - 1], "runs", "mkt", f"seed{s}", "tem")
                                       for s in range(seeds)]
    for lag in sorted(int(n[len("stale-"):]) for n in os.listdir(os.path.join(daily, "seed0"))
                      if n.startswith("stale-")):
        stale = [os.path.join(daily, f"seed{s}", f"stale-{lag}", f"day-{day:03d}") for s in range(seeds)]
        if all(os.path.isfile(os.path.join(d, "metrics.json")) for d in stale):
            out[f"cache version {lag} day(s) old"] = stale
    return out


def compare(daily: str, retrain: List[str], confidence: float = 0.95) -> Dict[str, Any]:
    with open(os.path.join(daily, "summary.json"), encoding="utf-8") as f:
        summary = json.load(f)
    seeds, n_days = int(summary["seeds"]), len(summary["days"])
    if retrain and len(retrain) != n_days:
        raise SystemExit(f"--retrain: {len(retrain)} runs for {n_days} days")
    days: List[Dict[str, Any]] = []
    diffs: Dict[str, List[List[float]]] = {}  # method -> per seed, per day (days 2..N) GAUC difference
    for d in range(1, n_days + 1):
        runs = _runs(daily, retrain, seeds, d)
        row: Dict[str, Any] = {"day": d}
        for method, dirs in runs.items():
            per_seed = [_metrics(r) for r in dirs]
            row[method] = {k: statistics.fmean(m[k] for m in per_seed) for k in METRICS}
            row[method]["by_seed"] = per_seed
            if method != "incremental":
                for a, b in zip(dirs, runs["incremental"], strict=True):
                    if a != b:
                        check_same_rows(os.path.join(a, "predictions"), os.path.join(b, "predictions"), "target")
                gauc = [m["gauc"] - i["gauc"] for m, i in zip(per_seed, row["incremental"]["by_seed"], strict=True)]
                row[method]["gauc_diff"] = seed_interval(gauc, confidence)
                if d > 1:
                    for s in range(seeds):
                        diffs.setdefault(method, [[] for _ in range(seeds)])[s].append(gauc[s])
        seconds = summary["seconds_per_day"]
        row["incremental"]["seconds"] = statistics.fmean(seconds[f"seed{s}"][f"day-{d:03d}"] for s in range(seeds))
        if retrain:
            with open(os.path.join(retrain[d - 1], "summary.json"), encoding="utf-8") as f:
                rs = json.load(f)
            row["retrain from scratch"]["seconds"] = rs["seconds_per_run"]["mkt"] / int(rs["seeds"])
        days.append(row)
    pooled = {m: seed_interval([statistics.fmean(per) for per in per_seed], confidence)
              for m, per_seed in diffs.items()}
    return {"daily": daily, "retrain": retrain, "seeds": seeds, "days": days, "pooled_gauc_diff_days_2_on": pooled,
            "confidence": confidence}


def render(result: Dict[str, Any]) -> str:
    names = [m for r in result["days"] for m in r if isinstance(r[m], dict)]
    methods = [m for m in ("incremental", "retrain from scratch", "frozen after day 1") if m in names]
    methods += sorted({m for m in names if m.startswith("cache version")})

    def ci(block: Optional[Dict[str, Any]]) -> str:
        if not block or block.get("ci") is None:
            return "n/a"
        lo, hi = block["ci"]
        return f"{block['mean']:+.4f} [{lo:+.4f}, {hi:+.4f}]{'*' if block['excludes_zero'] else ''}"

    timed = [m for m in ("incremental", "retrain from scratch") if m in methods]
    head = "| day | " + " | ".join(f"{m} GAUC" for m in methods) + " | " + " | ".join(
        f"{m} - incremental" for m in methods[1:]) + " | " + " | ".join(f"{m} s/day" for m in timed) + " |"
    lines = [head, "|" + "---|" * (1 + len(methods) + len(methods) - 1 + len(timed))]
    for row in result["days"]:
        lines.append(f"| {row['day']} | " + " | ".join(f"{row[m]['gauc']:.4f}" if m in row else "n/a" for m in methods)
                     + " | " + " | ".join(ci(row[m].get("gauc_diff")) if m in row else "n/a" for m in methods[1:])
                     + " | " + " | ".join(f"{row[m].get('seconds', float('nan')):.0f}" if m in row else "n/a"
                                          for m in timed) + " |")
    lines.append("| days 2..N pooled | " + " | " * len(methods) + " | ".join(
        ci(result["pooled_gauc_diff_days_2_on"].get(m)) for m in methods[1:]) + " |" + " |" * len(timed))
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--daily", required=True, help="the --out of mkt daily")
    p.add_argument("--retrain", nargs="*", default=[], help="the --out of mkt run for each day, in order")
    p.add_argument("--confidence", type=float, default=0.95)
    args = p.parse_args()
    result = compare(args.daily, args.retrain, args.confidence)
    print(render(result))
    print(json.dumps({k: v for k, v in result.items() if k != "days"} | {"days": [
        {k: ({kk: vv for kk, vv in v.items() if kk != "by_seed"} if isinstance(v, dict) else v) for k, v in r.items()}
        for r in result["days"]]}))


if __name__ == "__main__":
    main()

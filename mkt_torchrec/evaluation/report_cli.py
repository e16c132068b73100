"""``mkt report``: compare evaluated runs side by side (report.html, report.md, report.json, PNG plots).

    mkt report runs/finetune runs/mkt runs/mkt_no_hfa --out reports/ablations --config configs/quickstart.yaml

Each RUN must have been scored by ``mkt evaluate`` (RUN/metrics.json and RUN/predictions). The baseline is
``--baseline`` (a run directory or a ``--name``), else the first run trained with ablation
``no_mem_pretrain``, else the first run. Prints where the report is and the overall table.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from mkt_torchrec.evaluation.report import ENTITIES, text_table, write_report


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``mkt report``'s own flags (``--config`` / ``--set`` come from ``mkt_torchrec.cli``)."""
    p.add_argument("runs", nargs="+", metavar="RUN", help="evaluated run directories (mkt train + mkt evaluate)")
    p.add_argument("--out", required=True,
                   help="report directory to write (report.html, report.md, report.json, *.png)")
    p.add_argument("--baseline", default=None,
                   help="run directory or --name to compare against (default: the first run with ablation "
                        "no_mem_pretrain, else the first run)")
    p.add_argument("--entity", choices=ENTITIES, default="target",
                   help="entity whose rows are compared (default: target)")
    p.add_argument("--name", dest="names", action="append", default=None, metavar="NAME",
                   help="display name of a run, once per RUN in the same order (default: directory name + ablation)")


def run(args: argparse.Namespace, cfg: Any) -> int:
    """Write the report; print its location and the overall numbers. Returns the exit code."""
    from mkt_torchrec.config import EvalConfig

    eval_cfg = cfg.eval if cfg is not None else EvalConfig()  # --config only for eval.* (bootstrap, groups)
    summary = write_report(args.runs, args.out, baseline=args.baseline, entity=args.entity, names=args.names,
                           eval_cfg=eval_cfg)
    overall = next(t for t in summary["tables"] if t["key"] == "overall")
    keep = [overall["columns"].index(c) for c in ("Run", "Rows", "AUC", "Δ AUC vs baseline", "GAUC",
                                                  "Δ GAUC vs baseline")]
    print(text_table([overall["columns"][i] for i in keep], [[row[i] for i in keep] for row in overall["rows"]]))
    print()
    print(f"report: {os.path.join(args.out, 'report.html')} (also report.md, report.json, "
          f"{len(summary['plots'])} plots) - {summary['entity']} entity, baseline {summary['baseline']}")
    return 0

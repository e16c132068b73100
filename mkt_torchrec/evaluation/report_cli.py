"""``mkt report``: compare evaluated models side by side (report.html, report.md, report.json, PNG plots).

    mkt report runs/finetune runs/mkt runs/mkt_no_hfa --out reports/ablations --config configs/quickstart.yaml
    mkt report --model MLP=runs/mlp-s0,runs/mlp-s1 --model MKT=runs/mkt-s0,runs/mkt-s1 --baseline MLP --out r

Each run must have been scored by ``mkt evaluate`` (RUN/metrics.json and RUN/predictions). Positional RUNs
are one model each, with one seed (display name ``--name``, else the directory name); ``--model NAME=RUN,RUN``
gives a model several runs, one per seed, shown as mean ± std (the two forms do not mix). The baseline is
``--baseline`` (a model name or a run directory), else the first model trained with ablation
``no_mem_pretrain``, else the first model. Families come from each run's run.json unless ``--family`` sets
them. Prints where the report is and the overall table (AUC, GAUC, log loss, their differences to the baseline
with the intervals the report shows, and the flags).
"""

from __future__ import annotations

import argparse
import os
from typing import Any, Dict, List, Optional

from mkt_torchrec.config import ENTITIES
from mkt_torchrec.registry import FAMILIES  # this module builds `mkt report --help`: nothing heavy at import


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``mkt report``'s own flags (``--config`` / ``--set`` come from ``mkt_torchrec.cli``)."""
    p.add_argument("runs", nargs="*", metavar="RUN",
                   help="evaluated run directories (mkt train + mkt evaluate), one model each")
    p.add_argument("--model", dest="models", action="append", default=None, metavar="NAME=RUN[,RUN...]",
                   help="a model and its runs, one per seed (repeat for each model, in table order); "
                        "instead of positional RUNs")
    p.add_argument("--out", required=True,
                   help="report directory to write (report.html, report.md, report.json, *.png)")
    p.add_argument("--baseline", default=None,
                   help="model name (--name / --model NAME) or run directory to compare against (default: the "
                        "first model with ablation no_mem_pretrain, else the first)")
    p.add_argument("--entity", choices=ENTITIES, default="target",
                   help="entity whose rows are compared (default: target)")
    p.add_argument("--name", dest="names", action="append", default=None, metavar="NAME",
                   help="display name of a positional RUN, once per RUN in the same order (default: directory name "
                        "+ ablation)")
    p.add_argument("--family", dest="families", action="append", default=None, metavar="NAME=FAMILY",
                   help=f"family of a model in the overall table, one of {', '.join(FAMILIES)} (default: from the "
                        "runs' run.json model.name / model.ablation)")


def _pairs(values: Optional[List[str]], flag: str) -> List[tuple]:
    out = []
    for v in values or []:
        name, sep, rest = v.partition("=")
        if not sep or not name or not rest:
            raise ValueError(f"{flag} {v!r}: expected NAME=VALUE")
        out.append((name, rest))
    return out


def run(args: argparse.Namespace, cfg: Any) -> int:
    """Write the report; print its location and the overall numbers. Returns the exit code."""
    from mkt_torchrec.config import EvalConfig

    eval_cfg = cfg.eval if cfg is not None else EvalConfig()  # --config only for eval.* (bootstrap, groups)
    models = _pairs(args.models, "--model")
    if models and (args.runs or args.names):
        raise ValueError("give either positional RUNs (with --name) or --model NAME=RUN,..., not both")
    if not models and not args.runs:
        raise ValueError("no runs: give RUN directories or --model NAME=RUN[,RUN...]")
    runs: Any = args.runs
    if models:
        runs = {}
        for name, dirs in models:
            if name in runs:
                raise ValueError(f"--model {name!r} given twice; list all its runs in one --model")
            runs[name] = [d for d in dirs.split(",") if d]
    families: Dict[str, str] = dict(_pairs(args.families, "--family"))
    from mkt_torchrec.evaluation.report import write_report
    from mkt_torchrec.evaluation.report_tables import text_table

    summary = write_report(runs, args.out, baseline=args.baseline, entity=args.entity,
                           names=None if models else args.names, eval_cfg=eval_cfg, families=families or None)
    overall = next(t for t in summary["tables"] if t["key"] == "overall")
    keep = [i for i, c in enumerate(overall["columns"])  # the metrics, their differences and intervals, flags
            if c in ("Model", "Seeds", "AUC", "GAUC (users)", "LogLoss", "Flags") or c.startswith("Δ ")]
    print(text_table([overall["columns"][i] for i in keep], [[row[i] for i in keep] for row in overall["rows"]]))
    print()
    print(f"report: {os.path.join(args.out, 'report.html')} (also report.md, report.json, "
          f"{len(summary['plots'])} plots) - {summary['entity']} entity, baseline {summary['baseline']}")
    return 0

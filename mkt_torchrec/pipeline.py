"""The main job (``mkt run``): synthetic data -> MEM -> TEM -> baseline and ablations -> evaluation -> report.

Every training and evaluation runs in one process group of ``--nproc`` local ranks (torch elastic), so the
import and start-up cost is paid once. Runs land in ``OUT/runs/<name>/{mem,tem}``; a rerun skips runs that
were already evaluated and resumes interrupted ones from their checkpoints. The report compares, for the
target entity, MKT with the paper's Table 4 ablations and the single-domain baseline (``no_mem_pretrain``):

=================  =============================================  ==========================================
name               what it trains                                 final model
=================  =============================================  ==========================================
mkt                MEM, then TEM with knowledge from the MEM      TEM + MEM target path
no_hfa             MEM without HFA, then TEM                      TEM + MEM target path
no_pdl             MEM with gamma = 0, then TEM                   TEM + MEM target path
no_mem_pretrain    TEM alone (single-domain baseline)             TEM
no_tem_finetune    (the ``mkt`` MEM)                              MEM target tower
=================  =============================================  ==========================================
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from typing import Any, Dict, List, Optional, Sequence

from mkt_torchrec.config import Config, load_config

log = logging.getLogger("mkt.run")

ABLATION_RUNS = ("mkt", "no_hfa", "no_pdl", "no_mem_pretrain", "no_tem_finetune")


def _ablation(name: str) -> str:
    return "none" if name == "mkt" else name


def _run_dirs(out: str, name: str) -> Dict[str, str]:
    """Run directories a named run needs: {"mem": ..., "tem": ...} (one of them may be absent)."""
    runs = os.path.join(out, "runs")
    if name == "no_tem_finetune":
        return {"mem": os.path.join(runs, "mkt", "mem")}  # the MEM's own target tower is the final model
    if name == "no_mem_pretrain":
        return {"tem": os.path.join(runs, name, "tem")}
    return {"mem": os.path.join(runs, name, "mem"), "tem": os.path.join(runs, name, "tem")}


def final_run_dir(out: str, name: str) -> str:
    dirs = _run_dirs(out, name)
    return dirs.get("tem", dirs.get("mem"))  # type: ignore[return-value]


def _evaluated(run_dir: str) -> bool:
    return os.path.isfile(os.path.join(run_dir, "metrics.json"))


def _train_and_evaluate(config: str, overrides: List[str], data: str, out: str, names: List[str]) -> Dict[str, Any]:
    """Per rank: train and evaluate every named run, in order, in this process group."""
    from mkt_torchrec.training import checkpoint
    from mkt_torchrec.training.distributed import init_distributed
    from mkt_torchrec.training.trainer import evaluate, train

    info = init_distributed()  # also when every run is done already: the world is left cleanly either way

    seconds: Dict[str, float] = {}
    for name in names:
        start = time.perf_counter()
        cfg = load_config(config, [*overrides, f"model.ablation={_ablation(name)}"])
        dirs = _run_dirs(out, name)
        if "mem" in dirs and not _evaluated(dirs["mem"]):
            resume = os.path.exists(os.path.join(dirs["mem"], "checkpoints", checkpoint.LATEST))
            train(cfg, "mem", data, dirs["mem"], resume=resume)
            evaluate(cfg, dirs["mem"], data)
        if "tem" in dirs and not _evaluated(dirs["tem"]):
            resume = os.path.exists(os.path.join(dirs["tem"], "checkpoints", checkpoint.LATEST))
            train(cfg, "tem", data, dirs["tem"], resume=resume, mem_run=dirs.get("mem"))
            evaluate(cfg, dirs["tem"], data)
        seconds[name] = round(time.perf_counter() - start, 1)
        if info.is_main:
            log.info("run %s done in %.0fs", name, seconds[name])
    return seconds


def run_all(cfg: Config, config_path: str, overrides: Sequence[str], out: str, nproc: int = 2,
            names: Sequence[str] = ABLATION_RUNS, overwrite: bool = False) -> Dict[str, Any]:
    """The whole pipeline; returns a summary (also written to OUT/summary.json)."""
    from mkt_torchrec.data.synth import generate
    from mkt_torchrec.evaluation.report import write_report
    from mkt_torchrec.training.distributed import launch

    unknown = [n for n in names if n not in ABLATION_RUNS]
    if unknown:
        raise ValueError(f"unknown runs {unknown}; choose from {list(ABLATION_RUNS)}")
    if overwrite and os.path.exists(out):
        from mkt_torchrec.fsutil import check_replaceable

        check_replaceable(out, ("summary.json", "runs", "data"), "the output of mkt run")
        shutil.rmtree(out)
    os.makedirs(out, exist_ok=True)
    started = time.perf_counter()
    data = os.path.join(out, "data")
    if not os.path.isfile(os.path.join(data, "manifest.json")):
        log.info("synthesising data into %s", data)
        generate(cfg, data, overwrite=True)
    _check_reuse(config_path, list(overrides), data, out, list(names))
    seconds = launch(nproc, _train_and_evaluate, config_path, list(overrides), data, out, list(names))
    from mkt_torchrec.training.export import export_run

    for name in names:  # serving exports: single-process steps, after the training world is gone
        tem = _run_dirs(out, name).get("tem")
        if tem is not None and not os.path.isfile(os.path.join(tem, "serving", "serving.json")):
            export_run(tem, data)
    run_dirs = [final_run_dir(out, n) for n in names]
    baseline = final_run_dir(out, "no_mem_pretrain") if "no_mem_pretrain" in names else None
    write_report(run_dirs, os.path.join(out, "report"), baseline=baseline, entity="target",
                          names=list(names), eval_cfg=cfg.eval)
    summary = {"out": out, "data": data, "runs": dict(zip(names, run_dirs)), "report": os.path.join(out, "report"),
               "seconds_per_run": seconds, "seconds": round(time.perf_counter() - started, 1),
               "target": {n: _target_metrics(d) for n, d in zip(names, run_dirs)}}
    with open(os.path.join(out, "summary.json.tmp"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    os.replace(os.path.join(out, "summary.json.tmp"), os.path.join(out, "summary.json"))
    return summary


def _flat(d: Any, prefix: str = "") -> Dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: Dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def _differing(a: Dict[str, Any], b: Dict[str, Any]) -> List[str]:
    fa, fb = _flat(a), _flat(b)
    return sorted(k for k in set(fa) | set(fb) if fa.get(k) != fb.get(k))


def _check_reuse(config: str, overrides: List[str], data: str, out: str, names: List[str]) -> None:
    """A rerun reuses OUT's data and runs only if they were made with the settings of this one."""
    from dataclasses import asdict

    from mkt_torchrec.training.trainer import read_run

    manifest = os.path.join(data, "manifest.json")
    if os.path.isfile(manifest):
        with open(manifest, encoding="utf-8") as f:
            made = json.load(f).get("source", {}).get("synth")
        differ = _differing(made or {}, asdict(load_config(config, overrides).synth))
        if differ:
            raise ValueError(f"{data}: was synthesised with other settings for {['synth.' + k for k in differ]}; "
                             "use another --out, or --overwrite to start over")
    for name in names:
        cfg = load_config(config, [*overrides, f"model.ablation={_ablation(name)}"]).to_dict()
        for run_dir in _run_dirs(out, name).values():
            if os.path.isfile(os.path.join(run_dir, "run.json")):
                recorded = read_run(run_dir)["config"]
                differ = [k for k in _differing(recorded, cfg) if not k.startswith("eval.")]
                if differ:
                    raise ValueError(f"{run_dir}: was made with other settings for {differ[:8]}"
                                     f"{' ...' if len(differ) > 8 else ''}; use another --out, or --overwrite")


def _target_metrics(run_dir: str) -> Optional[Dict[str, Any]]:
    with open(os.path.join(run_dir, "metrics.json"), encoding="utf-8") as f:
        m = json.load(f).get("target")
    return None if m is None else {k: m.get(k) for k in ("auc", "gauc", "auc_ci", "gauc_ci", "rows", "users")}

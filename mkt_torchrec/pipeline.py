"""The main job (``mkt run``): data -> every requested model, for several seeds -> evaluation -> report.

Every training and evaluation runs in one process group of ``--nproc`` local ranks (torch elastic), so the
import and start-up cost is paid once. The data is synthesised into ``OUT/data`` unless ``--data`` names an
existing dataset (e.g. Tenrec converted by ``mkt tenrec``). Runs land in ``OUT/runs/<name>/seed<k>/<stage>``; a
rerun skips stages already done and resumes interrupted ones from their checkpoints. Seed ``k`` trains with
``train.seed + k`` and ``data.seed + k``. Every run trains as its config says: with ``train.patience`` > 0 it
stops early on the validation split and is evaluated from its best epoch. The report compares, for the target
entity, every model (mean and standard deviation over seeds, paired intervals against the baseline):

=================  =============================================  ==========================================
name               what it trains                                 final model
=================  =============================================  ==========================================
mkt                MEM, then TEM with knowledge from the MEM      TEM + MEM target path
no_hfa             MEM without HFA, then TEM                      TEM + MEM target path
no_pdl             MEM with gamma = 0, then TEM                   TEM + MEM target path
no_mem_pretrain    TEM alone (single-domain baseline)             TEM
no_tem_finetune    (the ``mkt`` MEM)                              MEM target tower
mlp, din, fibinet  single-domain, on target rows                  the model
mmoe, ple, star,   joint training on both entities' rows          the model, scored on target rows
conet
minet, finetune,   pre-training, then fine-tuning on target rows  the fine-tuned model
ctnet
=================  =============================================  ==========================================

(see ``mkt_torchrec.models.baselines`` for each baseline's reading of its paper).
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


def baseline_runs() -> tuple:
    """The paper's Table-2 baselines (``mkt_torchrec.models.baselines``), in the registry's order."""
    from mkt_torchrec.models.baselines import MODELS

    return tuple(MODELS)


def all_runs() -> tuple:
    return ABLATION_RUNS + baseline_runs()


def _overrides_of(name: str, seed: int, base_seed: int) -> List[str]:
    """Config overrides of a named run and seed index: the model, and seed ``base + index`` for parameter
    initialisation and data order (the dataset itself stays the same)."""
    model = [f"model.ablation={'none' if name == 'mkt' else name}"] if name in ABLATION_RUNS else \
        [f"model.name={name}"]
    return [*model, f"train.seed={base_seed + seed}", f"data.seed={base_seed + seed}"]


def _made_as(name: str) -> str:
    """The run whose settings train a named run's directories: no_tem_finetune's one run dir is the MKT MEM."""
    return "mkt" if name == "no_tem_finetune" else name


def _stages(name: str) -> List[str]:
    """The stages a named run trains, in order."""
    if name in ABLATION_RUNS:
        return {"no_tem_finetune": [], "no_mem_pretrain": ["tem"]}.get(name, ["mem", "tem"])
    from mkt_torchrec.models.baselines import MODELS

    return list(MODELS[name].stages)


def _run_dirs(out: str, name: str, seed: int = 0) -> Dict[str, str]:
    """Run directories a named run needs: {"mem": ..., "tem": ...} (``OUT/runs/NAME/seedK/STAGE``)."""
    root = os.path.join(out, "runs", name, f"seed{seed}")
    if name == "no_tem_finetune":
        return {"mem": os.path.join(out, "runs", "mkt", f"seed{seed}", "mem")}  # the MEM's own target tower
    return {stage: os.path.join(root, stage) for stage in _stages(name)}


def final_run_dir(out: str, name: str, seed: int = 0) -> str:
    dirs = _run_dirs(out, name, seed)
    return dirs.get("tem", dirs.get("mem"))  # type: ignore[return-value]


def _evaluated(run_dir: str) -> bool:
    return os.path.isfile(os.path.join(run_dir, "metrics.json"))


def _train_and_evaluate(config: str, overrides: List[str], data: str, out: str, names: List[str], seeds: int
                        ) -> Dict[str, Any]:
    """Per rank: train and evaluate every named run and seed, in order, in this process group. A stage whose
    run is evaluated already is skipped, an interrupted one resumes from its checkpoint."""
    from mkt_torchrec.training import checkpoint
    from mkt_torchrec.training.distributed import init_distributed
    from mkt_torchrec.training.trainer import evaluate, train

    info = init_distributed()  # also when every run is done already: the world is left cleanly either way
    base_seed = load_config(config, overrides).train.seed
    seconds: Dict[str, float] = {}
    for name in names:
        start = time.perf_counter()
        for seed in range(seeds):
            cfg = load_config(config, [*overrides, *_overrides_of(_made_as(name), seed, base_seed)])
            dirs = _run_dirs(out, name, seed)
            final = final_run_dir(out, name, seed)
            for stage, run_dir in dirs.items():
                if _evaluated(run_dir) or os.path.isfile(os.path.join(run_dir, "DONE")):
                    continue
                resume = os.path.exists(os.path.join(run_dir, "checkpoints", checkpoint.LATEST))
                train(cfg, stage, data, run_dir, resume=resume, mem_run=dirs.get("mem") if stage == "tem" else None)
                if run_dir == final or (name == "mkt" and stage == "mem"):  # the MKT MEM is no_tem_finetune's model
                    evaluate(cfg, run_dir, data)
                elif info.is_main:  # a pre-training stage: finished, not evaluated
                    open(os.path.join(run_dir, "DONE"), "w").close()
        seconds[name] = round(time.perf_counter() - start, 1)
        if info.is_main:
            log.info("run %s done in %.0fs (%d seed%s)", name, seconds[name], seeds, "s" if seeds > 1 else "")
    return seconds


def run_all(cfg: Config, config_path: str, overrides: Sequence[str], out: str, nproc: int = 2,
            names: Sequence[str] = ABLATION_RUNS, overwrite: bool = False, data_dir: Optional[str] = None,
            seeds: int = 1, baseline: Optional[str] = None) -> Dict[str, Any]:
    """The whole pipeline; returns a summary (also written to OUT/summary.json).

    Args:
        cfg / config_path / overrides: the job's config (each run adds its model and seed overrides).
        out: output directory: ``data/`` (unless ``data_dir``), ``runs/NAME/seedK/STAGE``, ``report/``,
            ``summary.json``.
        nproc: local ranks.
        names: runs: MKT, its ablations (:data:`ABLATION_RUNS`) and any baseline (:func:`baseline_runs`).
        overwrite: delete ``out`` first.
        data_dir: an existing dataset (e.g. from ``mkt tenrec``) instead of synthesising one into ``out/data``.
        seeds: runs per model, with seeds ``train.seed + k`` (k < seeds) for initialisation and data order.
        baseline: the report's reference model (default: ``no_mem_pretrain`` if run, else the first).
    """
    from mkt_torchrec.data.synth import generate
    from mkt_torchrec.evaluation.report import write_report
    from mkt_torchrec.training.distributed import launch

    names = list(dict.fromkeys(names))
    unknown = [n for n in names if n not in all_runs()]
    if unknown:
        raise ValueError(f"unknown runs {unknown}; choose from {list(all_runs())}")
    if seeds < 1:
        raise ValueError(f"--seeds must be at least 1, got {seeds}")
    if overwrite and os.path.exists(out):
        from mkt_torchrec.fsutil import check_replaceable

        check_replaceable(out, ("summary.json", "runs", "data"), "the output of mkt run")
        shutil.rmtree(out)
    os.makedirs(out, exist_ok=True)
    started = time.perf_counter()
    if data_dir is not None:
        from mkt_torchrec.data.dataset import open_dataset

        data = os.path.abspath(data_dir)
        open_dataset(data, cfg.schema)  # a bad --data fails here, before any process starts
    else:
        data = os.path.join(out, "data")
        if not os.path.isfile(os.path.join(data, "manifest.json")):
            log.info("synthesising data into %s", data)
            generate(cfg, data, overwrite=True)
    _check_reuse(config_path, list(overrides), data, out, names, seeds, synthesised=data_dir is None)
    seconds = launch(nproc, _train_and_evaluate, config_path, list(overrides), data, out, names, seeds)
    from mkt_torchrec.training.export import export_run

    for name in names:  # serving exports: single-process steps, after the training world is gone
        for seed in range(seeds):
            final = final_run_dir(out, name, seed)
            if name != "no_tem_finetune" and os.path.basename(final) == "tem" and \
                    not os.path.isfile(os.path.join(final, "serving", "serving.json")):
                export_run(final, data)
    runs = {n: [final_run_dir(out, n, k) for k in range(seeds)] for n in names}
    if baseline is None and "no_mem_pretrain" in names:
        baseline = "no_mem_pretrain"
    write_report(runs, os.path.join(out, "report"), baseline=baseline, entity="target", eval_cfg=cfg.eval)
    summary = {"out": out, "data": data, "seeds": seeds, "runs": runs, "report": os.path.join(out, "report"),
               "seconds_per_run": seconds, "seconds": round(time.perf_counter() - started, 1),
               "target": {n: _target_metrics(d[0]) for n, d in runs.items()},
               "target_by_seed": {n: [_target_metrics(r) for r in d] for n, d in runs.items()}}
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


def _check_reuse(config: str, overrides: List[str], data: str, out: str, names: List[str], seeds: int,
                 synthesised: bool) -> None:
    """A rerun reuses OUT's data and runs only if they were made with the settings of this one."""
    from dataclasses import asdict

    from mkt_torchrec.training.trainer import read_run

    manifest = os.path.join(data, "manifest.json")
    if synthesised and os.path.isfile(manifest):
        with open(manifest, encoding="utf-8") as f:
            made = json.load(f).get("source", {}).get("synth")
        differ = _differing(made or {}, asdict(load_config(config, overrides).synth))
        if differ:
            raise ValueError(f"{data}: was synthesised with other settings for {['synth.' + k for k in differ]}; "
                             "use another --out, or --overwrite to start over")
    base_seed = load_config(config, overrides).train.seed
    for name in names:
        for seed in range(seeds):
            cfg = load_config(config, [*overrides, *_overrides_of(_made_as(name), seed, base_seed)]).to_dict()
            for run_dir in _run_dirs(out, name, seed).values():
                if os.path.isfile(os.path.join(run_dir, "run.json")):
                    run = read_run(run_dir)
                    differ = [k for k in _differing(run["config"], cfg) if not k.startswith("eval.")]
                    if run.get("data") not in (None, os.path.abspath(data)):
                        differ.append(f"data ({run.get('data')})")
                    if differ:
                        raise ValueError(f"{run_dir}: was made with other settings for {differ[:8]}"
                                         f"{' ...' if len(differ) > 8 else ''}; use another --out, or --overwrite")


def _target_metrics(run_dir: str) -> Optional[Dict[str, Any]]:
    with open(os.path.join(run_dir, "metrics.json"), encoding="utf-8") as f:
        m = json.load(f).get("target")
    return None if m is None else {k: m.get(k) for k in ("auc", "gauc", "auc_ci", "gauc_ci", "rows", "users")}

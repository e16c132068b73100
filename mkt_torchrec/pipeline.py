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

from mkt_torchrec import registry
from mkt_torchrec import storage
from mkt_torchrec.cache.knowledge import reads_cache
from mkt_torchrec.cache.pipeline import ensure_cache, run_config
from mkt_torchrec.config import Config
from mkt_torchrec.provenance import other_code
from mkt_torchrec.rundir import RunDir, read_json

log = logging.getLogger("mkt.run")

def _seed_root(out: str, name: str, seed: int) -> str:
    spec = registry.get(name)
    return storage.join(out, "runs", spec.made_as or name, f"seed{seed}")


def _run_dirs(out: str, name: str, seed: int = 0) -> Dict[str, RunDir]:
    """Run directories a named run needs: {"mem": ..., "tem": ...} (``OUT/runs/NAME/seedK/STAGE``; a run made as
    another, such as no_tem_finetune, is that one's directories)."""
    root = _seed_root(out, name, seed)
    return {stage: RunDir(storage.join(root, stage)) for stage in registry.get(name).stages}


def _run_config(cfg: Config, out: str, name: str, seed: int) -> Config:
    """The resolved config of a named run's seed (``mkt_cached``: with its own knowledge store and version)."""
    return run_config(registry.get(name).config(cfg, seed), _seed_root(out, name, seed), name, seed)


def final_run_dir(out: str, name: str, seed: int = 0) -> str:
    return _run_dirs(out, name, seed)[registry.get(name).final_stage].location


def _train_and_evaluate(cfg: Config, data: str, out: str, names: List[str], seeds: int) -> Dict[str, Any]:
    """Per rank: train and evaluate every named run and seed, in order, in this process group. A stage whose
    run is evaluated already is skipped, an interrupted one resumes from its checkpoint."""
    from mkt_torchrec.training.distributed import init_distributed
    from mkt_torchrec.training.recipe import train
    from mkt_torchrec.training.scoring import evaluate

    info = init_distributed()  # also when every run is done already: the world is left cleanly either way
    seconds: Dict[str, float] = {}
    for name in names:
        start = time.perf_counter()
        spec = registry.get(name)
        for seed in range(seeds):
            run_cfg = _run_config(cfg, out, name, seed)
            dirs = _run_dirs(out, name, seed)
            evaluated = registry.evaluated_stages(spec.made_as or name)
            for stage, run in dirs.items():
                if run.done():
                    continue
                mem_run = dirs["mem"].location if stage == "tem" and "mem" in dirs else None
                if mem_run is not None and reads_cache(run_cfg, stage):  # mkt_cached: its knowledge version first
                    ensure_cache(run_cfg, _seed_root(out, name, seed), mem_run, data)
                train(run_cfg, stage, data, run.location, resume=run.has_checkpoint(), mem_run=mem_run)
                if stage in evaluated:  # a final model (the MKT MEM is also no_tem_finetune's)
                    evaluate(run_cfg, run.location, data)
                elif info.is_main:  # a pre-training stage: finished, not evaluated
                    run.mark_done()
        seconds[name] = round(time.perf_counter() - start, 1)
        if info.is_main:
            log.info("run %s done in %.0fs (%d seed%s)", name, seconds[name], seeds, "s" if seeds > 1 else "")
    return seconds


def run_all(cfg: Config, out: str, nproc: int = 2,
            names: Sequence[str] = ("mkt",), overwrite: bool = False, data_dir: Optional[str] = None,
            seeds: int = 1, baseline: Optional[str] = None) -> Dict[str, Any]:
    """The whole pipeline; returns a summary (also written to OUT/summary.json).

    Args:
        cfg: the job's resolved config (each run sets its model and seed: ``RunSpec.config``).
        out: output directory: ``data/`` (unless ``data_dir``), ``runs/NAME/seedK/STAGE``, ``report/``,
            ``summary.json``; a path or a URI on object storage (``s3://...``: ``data_dir`` is then required).
        nproc: local ranks.
        names: runs, by their ``registry`` names (MKT, its ablations, the baselines, plugins).
        overwrite: delete ``out`` first.
        data_dir: an existing dataset (e.g. from ``mkt tenrec``) instead of synthesising one into ``out/data``.
        seeds: runs per model, with seeds ``train.seed + k`` (k < seeds) for initialisation and data order.
        baseline: the report's reference model (default: ``no_mem_pretrain`` if run, else the first).
    """
    from mkt_torchrec.data.synth import generate
    from mkt_torchrec.evaluation.report import write_report
    from mkt_torchrec.training.distributed import launch

    names = list(dict.fromkeys(names))
    unknown = [n for n in names if n not in registry.names()]
    if unknown:
        raise ValueError(f"unknown runs {unknown}; choose from {list(registry.names())}")
    if seeds < 1:
        raise ValueError(f"--seeds must be at least 1, got {seeds}")
    remote = not storage.is_local(out)
    if remote and data_dir is None:
        raise ValueError(f"--out {storage.display(out)}: a run on object storage needs --data (a dataset made by mkt "
                         "build or mkt synth, local or on the store)")
    if overwrite and remote:
        ours = {"summary.json", "runs", "report"}
        found = set(storage.listdir(out))
        if found - ours:
            raise ValueError(f"--overwrite {storage.display(out)}: holds {sorted(found - ours)[:3]}, which mkt run did "
                             "not write; refusing to delete it: choose another --out")
        storage.remove_tree(out)
    elif overwrite and os.path.exists(out):
        from mkt_torchrec.fsutil import check_replaceable

        check_replaceable(out, ("summary.json", "runs", "data"), "the output of mkt run")
        shutil.rmtree(out)
    if not remote:
        os.makedirs(out, exist_ok=True)
    started = time.perf_counter()
    if data_dir is not None:
        from mkt_torchrec.data.dataset import open_dataset

        data = storage.absolute(data_dir)
        open_dataset(data, cfg.schema)  # a bad --data fails here, before any process starts
    else:
        data = os.path.join(out, "data")
        if not os.path.isfile(os.path.join(data, "manifest.json")):
            log.info("synthesising data into %s", data)
            generate(cfg, data, overwrite=True)
    _check_reuse(cfg, data, out, names, seeds, synthesised=data_dir is None)
    seconds = launch(nproc, _train_and_evaluate, cfg, data, out, names, seeds)
    from mkt_torchrec.training.export import export_run

    for name in names:  # serving exports: single-process steps, after the training world is gone
        for seed in range(seeds):
            spec, final = registry.get(name), RunDir(final_run_dir(out, name, seed))
            if spec.made_as is None and spec.serves(spec.final_stage) and not final.exported():  # (a run made as
                # another is that one's directories: it exports nothing of its own)
                export_run(final.location, data)
    runs = {n: [final_run_dir(out, n, k) for k in range(seeds)] for n in names}
    if baseline is None and "no_mem_pretrain" in names:
        baseline = "no_mem_pretrain"
    write_report(runs, storage.join(out, "report"), baseline=baseline, entity="target", eval_cfg=cfg.eval)
    summary = {"out": out, "data": data, "seeds": seeds, "runs": runs, "report": storage.join(out, "report"),
               "seconds_per_run": seconds, "seconds": round(time.perf_counter() - started, 1),
               "target": {n: _over_seeds([_target_metrics(r) for r in d]) for n, d in runs.items()},
               "target_by_seed": {n: [_target_metrics(r) for r in d] for n, d in runs.items()}}
    storage.write_bytes_atomic(storage.join(out, "summary.json"), json.dumps(summary, indent=2).encode("utf-8"))
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


def _check_reuse(cfg: Config, data: str, out: str, names: List[str], seeds: int, synthesised: bool) -> None:
    """A rerun reuses OUT's data and runs only if they were made with the settings of this one."""
    from dataclasses import asdict

    manifest = os.path.join(data, "manifest.json")
    if synthesised and os.path.isfile(manifest):
        made = read_json(manifest, "a dataset manifest").get("source", {}).get("synth")
        differ = _differing(made or {}, asdict(cfg.synth))
        if differ:
            raise ValueError(f"{data}: was synthesised with other settings for {['synth.' + k for k in differ]}; "
                             "use another --out, or --overwrite to start over")
    for name in names:
        for seed in range(seeds):
            wanted = _run_config(cfg, out, name, seed).to_dict()
            for run in _run_dirs(out, name, seed).values():
                if run.exists():
                    record = run.record()
                    why = other_code(record)
                    if why:
                        raise ValueError(f"{run.name}: was made {why}; its results would not be this code's: use "
                                         "another --out, or --overwrite to train again")
                    differ = [k for k in _differing(record["config"], wanted) if not k.startswith("eval.")]
                    if record.get("data") not in (None, storage.absolute(data)):
                        differ.append(f"data ({record.get('data')})")
                    if differ:
                        raise ValueError(f"{run.name}: was made with other settings for {differ[:8]}"
                                         f"{' ...' if len(differ) > 8 else ''}; use another --out, or --overwrite")


def _target_metrics(run_dir: str) -> Optional[Dict[str, Any]]:
    m = RunDir(run_dir).metrics().get("target")
    return None if m is None else {k: m.get(k) for k in ("auc", "gauc", "logloss", "auc_ci", "gauc_ci", "rows",
                                                        "users")}


def _over_seeds(per_seed: List[Optional[Dict[str, Any]]]) -> Optional[Dict[str, Any]]:
    """A model's headline: AUC / GAUC / log loss, mean and standard deviation (n - 1; 0 for one seed) over its
    seeds, with the rows and users scored (the same test split for every seed). None if a seed scored no target
    rows. The per-seed intervals stay in ``target_by_seed``."""
    import statistics

    if not per_seed or any(m is None for m in per_seed):
        return None
    out: Dict[str, Any] = {"seeds": len(per_seed)}
    for key in ("auc", "gauc", "logloss"):
        values = [m[key] for m in per_seed if m.get(key) is not None]  # type: ignore[union-attr]
        if len(values) == len(per_seed):
            out[key] = statistics.fmean(values)
            out[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    out.update(rows=per_seed[0]["rows"], users=per_seed[0]["users"])  # type: ignore[index]
    return out

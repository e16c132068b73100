"""Compare evaluated models side by side: ``report.html``, ``report.md``, ``report.json`` and PNG plots.

    write_report({"MLP": ["runs/mlp-s0", "runs/mlp-s1"], "MKT": ["runs/mkt-s0", "runs/mkt-s1"]},
                 "reports/table2", baseline="MLP")
    write_report(["runs/finetune", "runs/mkt", "runs/mkt_no_hfa"], "reports/ablations")  # one run per model

A *model* is a display name with one or more evaluated runs, one per training seed. The tables follow the MKT
paper, for one entity (``target`` by default):

1. **Table 2 layout**: one row per model, grouped by family - single-domain, joint training, pre-training &
   fine-tuning, MKT and its ablations - with AUC and GAUC as mean ± standard deviation over the model's
   seeds, each GAUC with the number of users it rests on, and the improvement over a baseline model with its
   pooled paired bootstrap interval (below);
2. AUC and GAUC per user-activity group with the improvement over the baseline (paper Table 3);
3. on synthetic data, the best achievable AUC / GAUC (scoring with the true click probability) and each
   model's gap to it;
4. source and target metrics of the stage-1 (MEM) runs;
5. every run on its own: AUC and GAUC with their bootstrap intervals, log loss and calibration (ECE, mean
   predicted against observed click rate).

Figures: ROC curves and a reliability diagram (from a bounded sample of each model's first run), GAUC by
user group and the training loss curves of ``metrics.jsonl``.

Families
--------
``families`` maps display names to ``single_domain``, ``joint``, ``pretrain_finetune``, ``mkt`` or ``other``.
Without it, a model's family comes from its runs' ``run.json`` config: ``model.name`` (``mkt`` when absent) and
``model.ablation`` name an entry of ``mkt_torchrec.registry`` (e.g. ``mlp`` single-domain, ``mmoe`` joint training,
``finetune`` pre-training & fine-tuning, ``mkt`` MKT unless its ablation is ``no_mem_pretrain``, the TEM alone:
single-domain); a name no entry has is ``other``.

Too few users
-------------
A GAUC cell shows the users with both a click and a non-click that it rests on (the smallest number over the
model's seeds). Below ``eval_cfg.min_gauc_users`` it shows ``too few users (n)`` instead of a number, and its
improvement ``n/a (too few users)``; the same rule applies to every activity group.

The paired interval
-------------------
Runs of a model are paired with the baseline's runs of the same training seed (``train.seed`` in run.json)
when both models record distinct seeds and share some; otherwise run ``i`` with run ``i`` in the order given.
A pair is used only if both runs scored the same rows of the entity in the same order (equal row counts and
``(user_id, label)`` sequences, compared by a digest taken while streaming the predictions); pairs that are
not are listed in report.json and left out. For each used pair and each user resample ``b`` (Poisson(1)
counts hashed from ``(eval_cfg.seed, b, user id)``, the same for every run), the replicate difference is
``M(run, b) - M(baseline run, b)``; the pooled replicate is the mean over the pairs, and the interval its
percentile interval at ``eval_cfg.confidence`` (:func:`~mkt_torchrec.evaluation.analysis.pooled_paired_difference`).
It measures how much the mean paired difference would move with another sample of test users, not the
spread between seeds (shown by the ± columns).

Memory
------
Nothing holds every prediction. Table numbers come from each run's ``metrics.json`` (merged exact statistics
written by ``mkt evaluate``). Each run's predictions are streamed once, ``SpillLimits.batch_rows`` rows at a
time, for the row digest and a seeded uniform sample of at most ``eval_cfg.plot_sample_rows`` rows (bottom-k
of a hash of the row's position, so runs on the same rows sample the same rows) that the ROC and calibration
plots are drawn from. The paired bootstrap computes each run's replicates once
(:func:`~mkt_torchrec.evaluation.analysis.run_replicates`: spilled by user beyond ``limits.threshold_rows``
rows, ``O(users)`` arrays, ``O(samples)`` kept per run). Peak memory is therefore bounded by the spill limits,
the sample size and ``O(users)``, whatever the number of rows.

The report is built in a temporary directory next to ``out_dir`` and moved into place at the end, so a
failed report leaves no half-written files.
"""

from __future__ import annotations

import base64
import datetime
import glob
import hashlib
import html
import json
import os
import shutil
import statistics
import tempfile
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from mkt_torchrec import registry
from mkt_torchrec.evaluation import analysis
from mkt_torchrec.evaluation.analysis import _mix64
from mkt_torchrec.evaluation.report_metrics import SpillLimits, iter_entity_columns

ENTITIES = ("source", "target")
PLOT_FILES = ("roc.png", "groups.png", "calibration.png", "loss.png")
CALIBRATION_BINS = 10  # equal-count bins of the plotted sample
FAMILIES = registry.FAMILIES
_NOT_SAME_ROWS = "n/a (not the same rows)"
_TOO_FEW = "n/a (too few users)"
_SAMPLE_SALT = 0x5DEECE66D2B7E151


@dataclass
class Run:
    """One evaluated run directory: its model, identity, ``metrics.json`` and training log."""

    name: str  # the display name of its model
    run_dir: str
    stage: str
    ablation: str
    info: Dict[str, Any]  # run.json ({} if absent)
    metrics: Dict[str, Any]  # metrics.json
    history: List[Dict[str, Any]]  # metrics.jsonl
    model_name: str = "mkt"  # run.json config model.name
    seed: Optional[int] = None  # run.json config train.seed

    @property
    def pred_dir(self) -> str:
        return os.path.join(self.run_dir, "predictions")

    def entity(self, entity: str) -> Optional[Dict[str, Any]]:
        """metrics.json's block for ``entity``, or None if the run scored no such rows."""
        return self.metrics.get(entity)


@dataclass
class Model:
    """A display name, its family and its runs (one per seed)."""

    name: str
    family: str
    runs: List[Run]


@dataclass
class Table:
    """A result table, rendered to Markdown, HTML and plain text alike."""

    key: str
    title: str
    columns: List[str]
    rows: List[List[str]]
    note: str = ""
    bold_rows: set = field(default_factory=set)  # the baseline / best-achievable rows
    signed_columns: set = field(default_factory=set)  # colour +/- values


@dataclass
class Scan:
    """What one streaming pass over a run's predictions of the entity keeps: bounded, whatever the rows."""

    rows: int
    digest: str  # of the (user_id, label) sequence
    sample: Optional[Dict[str, np.ndarray]]  # label, score (+ true_prob) of at most plot_sample_rows rows


RunsArg = Union[Sequence[str], Mapping[str, Sequence[str]]]


def write_report(runs: RunsArg, out_dir: str, baseline: Optional[str] = None, entity: str = "target",
                 names: Optional[Sequence[str]] = None, eval_cfg: Any = None,
                 families: Optional[Mapping[str, str]] = None, *, spill_dir: Optional[str] = None,
                 limits: Optional[SpillLimits] = None) -> Dict[str, Any]:
    """Write the comparison report of the models in ``runs`` for ``entity`` into ``out_dir``.

    Args:
        runs: ``{display name: [run directory, ...]}``, one evaluated run (``mkt train`` + ``mkt evaluate``)
            per seed; tables list the models by family, in this order within a family. Or a plain list of
            run directories, each its own single-seed model (named by ``names``).
        out_dir: report directory (created; files of an earlier report there are replaced).
        baseline: display name of the model to compare against (a run directory of it is accepted too);
            default the first model whose runs have ablation ``no_mem_pretrain``, else the first model.
        entity: ``target`` or ``source``.
        names: with a list of run directories only: display names, one per run (default: the directory
            name, plus the ablation).
        eval_cfg: :class:`mkt_torchrec.config.EvalConfig`: bootstrap samples / confidence / seed of the paired
            intervals, ``min_gauc_users``, ``plot_sample_rows`` (default: defaults).
        families: ``{display name: family}`` for some or all models (families in :data:`FAMILIES`); the
            others' come from their run.json (module docstring).
        spill_dir: where the paired bootstrap's temporary files go (default: the system temp dir).
        limits: memory limits of the streaming passes (default: ``SpillLimits()``).

    Returns:
        The report's numbers, as written to ``report.json``, plus ``out_dir`` and the ``files`` written.

    Raises:
        FileNotFoundError: a run directory lacks ``metrics.json`` or predictions (run ``mkt evaluate``).
        ValueError: bad ``entity``, ``names``, ``baseline`` or ``families``; a model without runs or whose
            runs disagree on the family.
    """
    from mkt_torchrec.config import EvalConfig

    if entity not in ENTITIES:
        raise ValueError(f"entity must be one of {ENTITIES}, got {entity!r}")
    if not runs:
        raise ValueError("no run directories to report on")
    eval_cfg = eval_cfg if eval_cfg is not None else EvalConfig()
    limits = limits if limits is not None else SpillLimits()
    models = load_models(runs, names, families)
    base = pick_baseline(models, baseline)
    models.sort(key=lambda m: list(FAMILIES).index(m.family))  # every table in family order (stable within one)
    # One streaming pass per run: the plot sample (first run of each model) and the row digest (for pairing).
    first = {id(m.runs[0]) for m in models}
    pairing = int(eval_cfg.bootstrap_samples) > 0 and len(models) > 1
    sample_rows = int(eval_cfg.plot_sample_rows)
    scans = {id(r): scan_predictions(r, entity, sample_rows if id(r) in first else 0, int(eval_cfg.seed),
                                     limits.batch_rows)
             if pairing or (id(r) in first and sample_rows > 0) else Scan(0, "", None)
             for m in models for r in m.runs}
    cache: Dict[str, analysis.RunReplicates] = {}
    paired = {m.name: paired_difference(m, base, entity, eval_cfg, scans, cache, spill_dir, limits)
              for m in models if m is not base}
    del cache
    summary = summarise(models, base, entity, paired, eval_cfg)
    tables = [t for t in (overall_table(summary), groups_table(summary), ceiling_table(summary),
                          entity_table(models), per_run_table(summary)) if t is not None]
    summary["tables"] = [{"key": t.key, "title": t.title, "columns": t.columns, "rows": t.rows} for t in tables]

    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".report-", dir=parent)
    os.chmod(tmp, 0o755)  # mkdtemp's 0700 would otherwise become the report directory's mode
    try:
        samples = {m.name: scans[id(m.runs[0])].sample for m in models}
        figures = draw_figures(models, base, entity, samples, tmp, summary)
        summary["plots"] = {key: fig["file"] for key, fig in figures.items()}
        _write_text(os.path.join(tmp, "report.json"), json.dumps(summary, indent=2, default=_json_default))
        _write_text(os.path.join(tmp, "report.md"), render_markdown(summary, tables, figures))
        _write_text(os.path.join(tmp, "report.html"), render_html(summary, tables, figures, tmp))
        files = sorted(os.listdir(tmp))
        _publish(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {**summary, "out_dir": out_dir, "files": files}


# --------------------------------------------------------------------------------------------------------
# Reading the runs
# --------------------------------------------------------------------------------------------------------


def load_models(runs: RunsArg, names: Optional[Sequence[str]] = None,
                families: Optional[Mapping[str, str]] = None) -> List[Model]:
    """Models of ``runs`` (see :func:`write_report`) with their runs read and their families decided."""
    if isinstance(runs, Mapping):
        if names is not None:
            raise ValueError("names apply to a list of run directories; with {name: [runs]} the keys are the names")
        groups = [(str(name), list(dirs)) for name, dirs in runs.items()]
        for name, dirs in groups:
            if not dirs or isinstance(dirs, str):
                raise ValueError(f"model {name!r}: expected a non-empty list of run directories, got {dirs!r}")
        loaded = [(name, [_load_run(d, name) for d in dirs]) for name, dirs in groups]
    else:
        run_dirs = list(runs)
        if names is not None and len(names) != len(run_dirs):
            raise ValueError(f"got {len(names)} names for {len(run_dirs)} runs; give one --name per run, in order")
        if names is not None and len(set(names)) != len(names):
            raise ValueError(f"run names must be distinct, got {list(names)}")
        single = [_load_run(d, names[i] if names is not None else None) for i, d in enumerate(run_dirs)]
        if names is None:  # two runs of the same directory name: number the later ones
            seen: Dict[str, int] = {}
            for r in single:
                seen[r.name] = seen.get(r.name, 0) + 1
                if seen[r.name] > 1:
                    r.name = f"{r.name} #{seen[r.name]}"
        loaded = [(r.name, [r]) for r in single]
    families = dict(families or {})
    unknown = sorted(set(families) - {name for name, _ in loaded})
    if unknown:
        raise ValueError(f"families names models that are not in the report: {unknown}")
    bad = {k: v for k, v in families.items() if v not in FAMILIES}
    if bad:
        raise ValueError(f"unknown families {bad}; choose from {list(FAMILIES)}")
    models = []
    for name, model_runs in loaded:
        found = {family_of(r) for r in model_runs}
        if name not in families and len(found) > 1:
            raise ValueError(f"model {name!r}: its runs are of different families {sorted(found)} (by their "
                             "run.json model.name / model.ablation); pass families= to choose one")
        models.append(Model(name, families.get(name) or found.pop(), model_runs))
    return models


def _load_run(run_dir: str, name: Optional[str]) -> Run:
    """Read run.json, metrics.json and metrics.jsonl of a run; check the predictions exist."""
    metrics_path = os.path.join(run_dir, "metrics.json")
    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"{run_dir}: no such run directory")
    if not os.path.isfile(metrics_path):
        raise FileNotFoundError(f"{run_dir}: metrics.json is missing; run mkt evaluate first")
    if not glob.glob(os.path.join(run_dir, "predictions", "part-*.parquet")):
        raise FileNotFoundError(f"{run_dir}: no predictions (predictions/part-*.parquet); run mkt evaluate first")
    metrics = _read_json(metrics_path)
    run_json = os.path.join(run_dir, "run.json")
    info = _read_json(run_json) if os.path.isfile(run_json) else {}
    config = info.get("config") or {}
    model_cfg = config.get("model") or {}
    stage = metrics.get("stage") or info.get("stage") or "?"
    ablation = metrics.get("ablation") or model_cfg.get("ablation") or "none"
    seed = (config.get("train") or {}).get("seed")
    return Run(name if name is not None else default_name(run_dir, ablation), run_dir, stage, ablation, info, metrics,
               _read_history(run_dir), str(model_cfg.get("name") or "mkt"), seed if isinstance(seed, int) else None)


def family_of(run: Run) -> str:
    """The family of a run from its run.json ``model.name`` and ``model.ablation`` (its registry entry)."""
    return registry.family_of(run.model_name, run.ablation)


def default_name(run_dir: str, ablation: str) -> str:
    """``mkt_no_hfa (w/o HFA)``: the directory name plus the ablation, if any."""
    base = os.path.basename(os.path.normpath(run_dir))
    if ablation in ("none", ""):
        return base
    try:
        return f"{base} ({registry.of_config('mkt', ablation).label})"
    except ValueError:
        return f"{base} ({ablation})"


def pick_baseline(models: Sequence[Model], baseline: Optional[str]) -> Model:
    """The model named by ``baseline`` (a display name, or a run directory of one of its runs); default the first
    model whose runs are ``no_mem_pretrain``, else the first."""
    if baseline is None:
        return next((m for m in models if all(r.ablation == "no_mem_pretrain" for r in m.runs)), models[0])
    for m in models:
        if baseline == m.name:
            return m
    for m in models:
        if any(os.path.realpath(baseline) == os.path.realpath(r.run_dir) for r in m.runs):
            return m
    raise ValueError(f"baseline {baseline!r} is neither a run directory nor a model name of this report; "
                     f"models: {[m.name for m in models]}")


def scan_predictions(run: Run, entity: str, sample_rows: int, seed: int, batch_rows: int = 1 << 18) -> Scan:
    """Stream a run's predictions of ``entity`` once: row count, digest of the ``(user_id, label)`` sequence,
    and a uniform sample of at most ``sample_rows`` rows.

    The sample is the bottom-k of ``splitmix64(row position + salt(seed))`` over the entity's rows in file order:
    a fixed random subset that does not depend on ``batch_rows``, the same rows for runs scored on the same
    rows. Memory: one batch plus ``2 * sample_rows`` rows.
    """
    users, labels = hashlib.blake2b(digest_size=16), hashlib.blake2b(digest_size=16)
    salt = np.uint64(_mix64(np.array([seed], dtype=np.int64).view(np.uint64) + np.uint64(_SAMPLE_SALT))[0])
    kept: Optional[Dict[str, np.ndarray]] = None
    rows = 0
    if run.entity(entity) is None:  # metrics.json says there are none: nothing to read
        return Scan(0, "", None)
    for batch in iter_entity_columns(run.pred_dir, entity, batch_rows):
        n = batch["label"].shape[0]
        users.update(np.ascontiguousarray(batch["user_id"], dtype="<i8").tobytes())
        labels.update(np.ascontiguousarray(batch["label"], dtype=np.int8).tobytes())
        if sample_rows > 0:
            with np.errstate(over="ignore"):
                key = _mix64(np.arange(rows, rows + n, dtype=np.uint64) + salt)  # (n,) distinct keys
            cand = {"key": key, **{k: v for k, v in batch.items() if k != "user_id"}}
            if kept is not None:
                cand = {k: np.concatenate([kept[k], cand[k]]) for k in cand}
            if cand["key"].shape[0] > sample_rows:
                sel = np.argpartition(cand["key"], sample_rows - 1)[:sample_rows]
                cand = {k: v[sel] for k, v in cand.items()}
            kept = cand
        rows += n
    sample = None
    if kept is not None:
        order = np.argsort(kept["key"])  # a canonical order, whatever the batches were
        sample = {k: v[order] for k, v in kept.items() if k != "key"}
    return Scan(rows, users.hexdigest() + labels.hexdigest(), sample)


def _pairs(model: Model, base: Model) -> Tuple[List[Tuple[Run, Run]], str]:
    """``[(run, baseline run)]`` and how they were paired ("seed" or "position")."""
    seeds_m, seeds_b = [r.seed for r in model.runs], [r.seed for r in base.runs]
    by_seed = (None not in seeds_m and None not in seeds_b and len(set(seeds_m)) == len(seeds_m)
               and len(set(seeds_b)) == len(seeds_b) and set(seeds_m) & set(seeds_b))
    if by_seed:
        base_by_seed = {r.seed: r for r in base.runs}
        return [(r, base_by_seed[r.seed]) for r in model.runs if r.seed in base_by_seed], "seed"
    return list(zip(model.runs, base.runs)), "position"


def paired_difference(model: Model, base: Model, entity: str, eval_cfg: Any, scans: Dict[int, Scan],
                      cache: Dict[str, analysis.RunReplicates], spill_dir: Optional[str] = None,
                      limits: Optional[SpillLimits] = None) -> Dict[str, Any]:
    """Pooled paired bootstrap of (model - baseline) over seed pairs on the same rows, or ``{"error": ...}``.

    ``cache`` keeps each run's :class:`~mkt_torchrec.evaluation.analysis.RunReplicates` (``O(samples)``) so
    that the baseline's runs are computed once for all models.
    """
    pairs, paired_by = _pairs(model, base)
    if not any(r.entity(entity) is not None and b.entity(entity) is not None for r, b in pairs):
        return {"error": f"n/a (no {entity} rows)"}
    if int(eval_cfg.bootstrap_samples) <= 0:
        return {"error": "n/a (no bootstrap)"}
    used, left_out = [], []
    for r, b in pairs:
        sr, sb = scans[id(r)], scans[id(b)]
        if r.entity(entity) is None or b.entity(entity) is None or sr.rows == 0 or sb.rows == 0:
            left_out.append({"run": r.run_dir, "baseline_run": b.run_dir, "reason": f"no {entity} rows"})
        elif (sr.rows, sr.digest) != (sb.rows, sb.digest):
            left_out.append({"run": r.run_dir, "baseline_run": b.run_dir, "reason": _rows_differ(b, r, entity)})
        else:
            used.append((r, b))
    if not used:
        return {"error": _NOT_SAME_ROWS, "left_out": left_out, "paired_by": paired_by,
                "detail": left_out[0]["reason"] if left_out else None}

    def replicates_of(run: Run) -> analysis.RunReplicates:
        key = os.path.realpath(run.run_dir)
        if key not in cache:
            cache[key] = analysis.run_replicates(run.pred_dir, entity, eval_cfg, spill_dir, limits)
        return cache[key]

    out = analysis.pooled_paired_difference([(replicates_of(r), replicates_of(b)) for r, b in used],
                                            float(eval_cfg.confidence))
    return {**out, "paired_by": paired_by, "runs": [[r.run_dir, b.run_dir] for r, b in used],
            "left_out": left_out}


def _rows_differ(base: Run, run: Run, entity: str) -> str:
    """Why two runs' rows differ, in words (streams both once more; only called when the digests differ)."""
    try:
        analysis._check_same_rows(base.pred_dir, run.pred_dir, entity)
    except ValueError as e:
        return str(e).replace("paired_comparison: ", "")
    return "the (user_id, label) sequences differ"


def _read_history(run_dir: str) -> List[Dict[str, Any]]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a run killed mid-write leaves a partial last line
                continue
    return rows


def _read_json(path: str) -> Dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e


# --------------------------------------------------------------------------------------------------------
# Numbers
# --------------------------------------------------------------------------------------------------------


def _aggregate(values: Sequence[Optional[float]]) -> Optional[Dict[str, Any]]:
    """``{"mean", "std", "n", "values"}`` of the defined values (sample std, None with one value), or None."""
    v = [float(x) for x in values if x is not None]
    if not v:
        return None
    return {"mean": statistics.fmean(v), "std": statistics.stdev(v) if len(v) > 1 else None, "n": len(v),
            "values": [None if x is None else float(x) for x in values]}


def _min_users(blocks: Sequence[Optional[Dict[str, Any]]], key: str = "users_evaluated") -> Optional[int]:
    """Smallest ``key`` over the blocks that have it (None if none has)."""
    v = [b[key] for b in blocks if b is not None and b.get(key) is not None]
    return min(v) if v else None


def _too_few(users: Optional[int], min_users: int) -> bool:
    return users is not None and users < min_users


def summarise(models: Sequence[Model], base: Model, entity: str, paired: Dict[str, Dict[str, Any]],
              eval_cfg: Any) -> Dict[str, Any]:
    """Everything report.json holds except the tables and plots: per model the seed aggregates and the
    differences to the baseline, per run metrics.json verbatim."""
    min_users = int(eval_cfg.min_gauc_users)
    agg = {m.name: _model_numbers(m, entity) for m in models}
    b = agg[base.name]
    out_models, out_runs = [], []
    for m in models:
        a = agg[m.name]
        is_base = m is base
        delta = None
        if not is_base and a["auc"] is not None:
            too_few = _too_few(a["gauc_users"], min_users) or _too_few(b["gauc_users"], min_users)
            delta = {"auc": _difference(_mean(a["auc"]), _mean(b["auc"])), "gauc_too_few": too_few,
                     "gauc": None if too_few else _difference(_mean(a["gauc"]), _mean(b["gauc"]))}
        groups = []
        base_groups = {g["name"]: g for g in b["groups"]}
        for g in a["groups"]:
            ref = base_groups.get(g["name"])
            d = None
            if not is_base and ref is not None:
                too_few = _too_few(g["gauc_users"], min_users) or _too_few(ref["gauc_users"], min_users)
                d = {"auc": _difference(_mean(g["auc"]), _mean(ref["auc"])), "gauc_too_few": too_few,
                     "gauc": None if too_few else _difference(_mean(g["gauc"]), _mean(ref["gauc"]))}
            groups.append({**g, "delta": d})
        out_models.append({"name": m.name, "family": m.family, "family_label": FAMILIES[m.family],
                           "is_baseline": is_base, "run_dirs": [r.run_dir for r in m.runs],
                           "seeds": [r.seed for r in m.runs], **{k: v for k, v in a.items() if k != "groups"},
                           "groups": groups, "delta": delta, "paired": paired.get(m.name)})
        for r in m.runs:
            out_runs.append({
                "name": m.name, "run_dir": r.run_dir, "seed": r.seed, "stage": r.stage, "ablation": r.ablation,
                "model_name": r.model_name, "family": m.family, "is_baseline": is_base,
                "checkpoint": r.metrics.get("checkpoint"), "bootstrap": r.metrics.get("bootstrap"),
                "metrics": {e: r.metrics[e] for e in ENTITIES if e in r.metrics},
                "training": _training_summary(r.history),
            })
    bootstrap = base.runs[0].metrics.get("bootstrap") or {}
    return {
        "entity": entity, "baseline": base.name,
        "confidence": bootstrap.get("confidence"), "bootstrap_samples": bootstrap.get("samples"),
        "paired_confidence": float(eval_cfg.confidence), "paired_samples": int(eval_cfg.bootstrap_samples),
        "paired_seed": int(eval_cfg.seed), "min_gauc_users": min_users,
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
        "families": {k: FAMILIES[k] for k in FAMILIES if any(m.family == k for m in models)},
        "models": out_models, "runs": out_runs,
    }


def _model_numbers(m: Model, entity: str) -> Dict[str, Any]:
    """Seed aggregates of one model from its runs' metrics.json."""
    blocks = [r.entity(entity) for r in m.runs]
    present = [b for b in blocks if b is not None]

    def field_of(key: str) -> Optional[Dict[str, Any]]:
        return _aggregate([b.get(key) for b in present]) if present else None

    cal = [(b.get("calibration") or {}) for b in present]
    groups = []
    order: List[str] = []
    for b in present:
        order += [g["name"] for g in b.get("groups") or [] if g["name"] not in order]
    for name in order:
        gs = [next((g for g in b.get("groups") or [] if g["name"] == name), None) for b in present]
        gs = [g for g in gs if g is not None]
        groups.append({"name": name, "users": gs[0].get("users"), "rows": gs[0].get("rows"),
                       "auc": _aggregate([g.get("auc") for g in gs]), "gauc": _aggregate([g.get("gauc") for g in gs]),
                       "gauc_users": _min_users(gs)})
    ceilings = [b.get("ceiling") for b in present if b.get("ceiling")]
    return {
        "runs_with_rows": len(present),
        "rows": present[0].get("rows") if present else None,
        "users": present[0].get("users") if present else None,
        "auc": field_of("auc"), "gauc": field_of("gauc"), "gauc_users": _min_users(present),
        "logloss": field_of("logloss"), "ece": _aggregate([c.get("ece") for c in cal]) if present else None,
        "groups": groups, "ceiling": ceilings[0] if ceilings else None,
    }


def _mean(a: Optional[Dict[str, Any]]) -> Optional[float]:
    return None if a is None else a["mean"]


def _difference(value: Optional[float], ref: Optional[float]) -> Optional[Dict[str, float]]:
    """``{"abs": value - ref, "rel_pct": 100 (value - ref) / ref}``, or None if either is missing."""
    if value is None or ref is None:
        return None
    return {"abs": value - ref, "rel_pct": 100.0 * (value - ref) / ref if ref else None}


def sample_calibration(labels: np.ndarray, scores: np.ndarray, bins: int = CALIBRATION_BINS) -> Dict[str, Any]:
    """Reliability diagram data of a sample: equal-count score bins with their mean score and click rate.

    Equal-count bins, because click-through scores crowd near 0 and equal-width bins would leave most empty.
    ``ece`` is the row-weighted mean |mean score - click rate| over these bins (of the sample; the exact ECE
    over all rows, with equal-width bins, is metrics.json's ``calibration.ece``).
    """
    order = np.argsort(scores, kind="stable")
    chunks = np.array_split(order, min(bins, len(order)))
    out = []
    for idx in chunks:
        s, y = scores[idx].astype(np.float64), labels[idx]
        out.append({"rows": int(len(idx)), "score_lo": float(s.min()), "score_hi": float(s.max()),
                    "mean_score": float(s.mean()), "click_rate": float(y.mean())})
    ece = sum(c["rows"] * abs(c["mean_score"] - c["click_rate"]) for c in out) / len(scores)
    return {"bins": out, "ece": float(ece), "mean_score": float(scores.astype(np.float64).mean()),
            "click_rate": float(labels.mean())}


def _training_summary(history: List[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    if not history:
        return None
    last = history[-1]
    return {"log_steps": len(history), "last_step": last.get("step"), "last_loss": last.get("loss"),
            "last_bce": last.get("bce"), "last_pdl": last.get("pdl")}


# --------------------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------------------


def overall_table(summary: Dict[str, Any]) -> Table:
    """Paper Table 2: models by family, AUC / GAUC mean ± std over seeds, improvement with its paired CI."""
    entity, min_users = summary["entity"], summary["min_gauc_users"]
    paired = _level(summary.get("paired_confidence"))
    columns = ["Family", "Model", "Seeds", "AUC", "GAUC (users)", "Δ AUC vs baseline", f"Δ AUC paired {paired} CI",
               "Δ GAUC vs baseline", f"Δ GAUC paired {paired} CI"]
    rows, bold = [], set()
    family = None
    for m in sorted(summary["models"], key=lambda m: list(FAMILIES).index(m["family"])):
        label = m["family_label"] if m["family"] != family else ""
        family = m["family"]
        seeds = str(len(m["run_dirs"]))
        if m["auc"] is None and m["gauc"] is None:
            rows.append([label, m["name"], seeds, f"no {entity} rows"] + ["-"] * (len(columns) - 4))
            continue
        if m["is_baseline"]:
            bold.add(len(rows))
        row = [label, m["name"], seeds, _mean_std(m["auc"]), _gauc_cell(m["gauc"], m["gauc_users"], min_users)]
        if m["is_baseline"]:
            row += ["baseline", "-", "baseline", "-"]
        else:
            d, p = m["delta"] or {}, m["paired"]
            row += [_delta(d.get("auc")), _paired_ci(p, "auc", min_users),
                    _TOO_FEW if d.get("gauc_too_few") else _delta(d.get("gauc")), _paired_ci(p, "gauc", min_users)]
        rows.append(row)
    samples = summary.get("paired_samples")
    note = (f"Mean ± sample standard deviation over each model's seeds (Seeds: its runs; one seed: no ±). "
            f"GAUC (users): the users with both a click and a non-click it rests on (fewest over the seeds); under "
            f"{min_users} (eval.min_gauc_users) the GAUC reads \"too few users (n)\". Δ = model mean − baseline "
            f"mean ({summary['baseline']}), absolute and relative to the baseline. Paired CI: user-level paired "
            f"bootstrap ({samples} resamples) of the difference on the rows both runs scored, runs paired by seed "
            "(else by position) and the pairs' differences averaged per resample; it reflects the test users' "
            "sampling, not the spread between seeds. * marks an interval that excludes 0.")
    return Table("overall", f"Overall performance on the {entity} entity", columns, rows, note, bold, {5, 6, 7, 8})


def groups_table(summary: Dict[str, Any]) -> Optional[Table]:
    """Paper Table 3: AUC and GAUC per user-activity group, improvement over the baseline."""
    entity, min_users = summary["entity"], summary["min_gauc_users"]
    order: List[str] = []
    for m in summary["models"]:
        order += [g["name"] for g in m["groups"] if g["name"] not in order]
    if not order:
        return None
    columns = ["User behaviours", "Model", "Users", "Rows", "AUC", "AUC improv.", "GAUC (users)", "GAUC improv."]
    rows, bold = [], set()
    for name in order:
        first = True
        for m in summary["models"]:
            g = next((x for x in m["groups"] if x["name"] == name), None)
            if g is None:
                continue
            if m["is_baseline"]:
                bold.add(len(rows))
            d = g["delta"] or {}
            gauc_improv = "-" if m["is_baseline"] else (_TOO_FEW if d.get("gauc_too_few") else _rel(d.get("gauc")))
            rows.append([name if first else "", m["name"], _int(g.get("users")), _int(g.get("rows")),
                         _mean_std(g["auc"]), "-" if m["is_baseline"] else _rel(d.get("auc")),
                         _gauc_cell(g["gauc"], g["gauc_users"], min_users), gauc_improv])
            first = False
    note = (f"Users grouped by their number of past behaviours; improvement relative to the baseline "
            f"({summary['baseline']}) in the same group. GAUC (users): users with both a click and a non-click in "
            f"the group; under {min_users} the GAUC and its improvement are not shown.")
    return Table("groups", f"Performance by user group ({entity} entity)", columns, rows, note, bold, {5, 7})


def ceiling_table(summary: Dict[str, Any]) -> Optional[Table]:
    """Best achievable AUC / GAUC (scoring with the true probability) and each model's gap to it."""
    entity = summary["entity"]
    ceilings = [(m, m["ceiling"]) for m in summary["models"] if m.get("ceiling")]
    if not ceilings:
        return None
    ref = next((c for m, c in ceilings if m["is_baseline"]), ceilings[0][1])
    columns = ["Model", "AUC", "AUC gap to best", "GAUC", "GAUC gap to best"]
    rows = [["best achievable (true probability)", _num(ref.get("auc")), "-", _num(ref.get("gauc")), "-"]]
    for m, c in ceilings:
        rows.append([m["name"], _mean_std(m["auc"]), _delta(_difference(_mean(m["auc"]), c.get("auc"))),
                     _mean_std(m["gauc"]), _delta(_difference(_mean(m["gauc"]), c.get("gauc")))])
    note = ("Synthetic data carries each row's true click probability; scoring with it gives the best AUC / GAUC. "
            "Gaps are of the model's mean over seeds.")
    if any(c != ref for _, c in ceilings):
        note += " The models were scored on different rows, so each gap is to the model's own ceiling."
    return Table("ceiling", f"Gap to the best achievable ({entity} entity)", columns, rows, note, {0})


def entity_table(models: Sequence[Model]) -> Optional[Table]:
    """Stage-1 (MEM) runs score both entities: AUC / GAUC of each."""
    mem = [(m, r) for m in models for r in m.runs if r.stage == "mem"]
    if not mem:
        return None
    columns = ["Model", "Seed"] + [f"{e} {k}" for e in ENTITIES for k in ("rows", "AUC", "GAUC")]
    rows = []
    for m, r in mem:
        row = [m.name, _seed(r.seed)]
        for e in ENTITIES:
            x = r.entity(e) or {}
            row += [_int(x.get("rows")), _num_ci(x.get("auc"), x.get("auc_ci")),
                    _num_ci(x.get("gauc"), x.get("gauc_ci"))]
        rows.append(row)
    return Table("entities", "Stage-1 (MEM) runs on both entities", columns, rows,
                 "The multi-entity model is trained on, and scores, rows of both entities.")


def per_run_table(summary: Dict[str, Any]) -> Table:
    """Every run: AUC and GAUC with their bootstrap intervals, log loss and calibration."""
    entity, min_users = summary["entity"], summary["min_gauc_users"]
    level = _level(summary.get("confidence"))
    columns = ["Model", "Seed", "Rows", f"AUC [{level} CI]", f"GAUC [{level} CI] (users)", "LogLoss", "ECE",
               "Mean score", "Click rate"]
    rows = []
    bins = set()
    for r in summary["runs"]:
        m = r["metrics"].get(entity)
        if m is None:
            rows.append([r["name"], _seed(r["seed"]), f"no {entity} rows"] + ["-"] * (len(columns) - 3))
            continue
        cal = m.get("calibration") or {}
        if cal:
            bins.add(cal.get("bins"))
        users = m.get("users_evaluated")
        gauc = (f"too few users ({users:,})" if _too_few(users, min_users) else
                f"{_num_ci(m.get('gauc'), m.get('gauc_ci'))} ({_int(users)} users)")
        rows.append([r["name"], _seed(r["seed"]), _int(m.get("rows")), _num_ci(m.get("auc"), m.get("auc_ci")), gauc,
                     _num(m.get("logloss")), _num(cal.get("ece")), _num(cal.get("mean_score")),
                     _num(cal.get("click_rate"))])
    note = ("Intervals: user-level bootstrap of each run's metrics.json. LogLoss: mean binary cross-entropy, "
            "probabilities clipped to [1e-7, 1 - 1e-7]. ECE: expected calibration error over "
            + (f"{', '.join(str(b) for b in sorted(bins))} " if bins else "")
            + "equal-width score bins (eval.calibration_bins); mean score: mean predicted CTR; click rate: observed "
            "CTR. '-': not in this run's metrics.json (rerun mkt evaluate).")
    return Table("per_run", f"Every run ({entity} entity)", columns, rows, note)


def _level(confidence: Optional[float]) -> str:
    return f"{100 * confidence:g}%" if confidence else "95%"


def _num(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.4f}"


def _int(v: Optional[int]) -> str:
    return "-" if v is None else f"{v:,}"


def _seed(v: Optional[int]) -> str:
    return "-" if v is None else str(v)


def _mean_std(a: Optional[Dict[str, Any]]) -> str:
    """``0.7123 ± 0.0010`` over seeds, ``0.7123`` with one value, ``-`` with none."""
    if a is None:
        return "-"
    return _num(a["mean"]) if a.get("std") is None else f"{a['mean']:.4f} ± {a['std']:.4f}"


def _gauc_cell(a: Optional[Dict[str, Any]], users: Optional[int], min_users: int) -> str:
    """A GAUC with the users it rests on, or ``too few users (n)``."""
    if _too_few(users, min_users):
        return f"too few users ({users:,})"
    if a is None:
        return "-"
    return f"{_mean_std(a)} ({'?' if users is None else f'{users:,}'} users)"


def _ci(ci: Optional[Sequence[float]]) -> str:
    return "-" if not ci else f"[{ci[0]:.4f}, {ci[1]:.4f}]"


def _num_ci(v: Optional[float], ci: Optional[Sequence[float]]) -> str:
    return _num(v) if not ci else f"{_num(v)} {_ci(ci)}"


def _delta(d: Optional[Dict[str, float]]) -> str:
    if not d:
        return "-"
    return f"{d['abs']:+.4f} ({d['rel_pct']:+.2f}%)" if d.get("rel_pct") is not None else f"{d['abs']:+.4f}"


def _rel(d: Optional[Dict[str, float]]) -> str:
    return "-" if not d or d.get("rel_pct") is None else f"{d['rel_pct']:+.2f}%"


def _paired_ci(p: Optional[Dict[str, Any]], metric: str, min_users: int = 0) -> str:
    if not p:
        return "-"
    if "error" in p:
        return p["error"]
    if metric == "gauc" and _too_few(p.get("users_evaluated"), min_users):
        return _TOO_FEW
    ci = p.get(f"{metric}_diff_ci")
    if not ci:
        return "n/a (no bootstrap)"
    return f"[{ci[0]:+.4f}, {ci[1]:+.4f}]" + (" *" if ci[0] > 0 or ci[1] < 0 else "")


# --------------------------------------------------------------------------------------------------------
# Figures (matplotlib's Agg canvas directly: no pyplot, no global backend state)
# --------------------------------------------------------------------------------------------------------


def draw_figures(models: Sequence[Model], base: Model, entity: str, samples: Dict[str, Optional[Dict[str, np.ndarray]]],
                 out: str, summary: Optional[Dict[str, Any]] = None) -> Dict[str, Dict[str, str]]:
    """Draw every figure there is data for into ``out``; ``{key: {"file", "title", "caption"}}``.

    ROC and calibration come from ``samples`` (each model's first run: a bounded sample), the groups figure
    from the seed means of ``summary``, the loss curves from each model's first run's metrics.jsonl. Each
    ``_draw_*`` returns ``(figure, title, caption)``, or None when no model has the data it needs.
    """
    colors = {m.name: f"C{i % 10}" for i, m in enumerate(models)}
    figures = {}
    for key, draw in (("roc", _draw_roc), ("groups", _draw_groups), ("calibration", _draw_calibration),
                      ("loss", _draw_loss)):
        fig = draw(models, base, entity, samples, colors, summary or {})
        if fig is None:
            continue
        figure, title, caption = fig
        name = f"{key}.png"
        figure.savefig(os.path.join(out, name), dpi=110)
        figures[key] = {"file": name, "title": title, "caption": caption}
    return figures


def _figure(width: float = 6.4, height: float = 4.8, ncols: int = 1):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(1, ncols, squeeze=False)[0]


def _sample_note(samples: Dict[str, Optional[Dict[str, np.ndarray]]]) -> str:
    sizes = [s["label"].shape[0] for s in samples.values() if s is not None]
    return (f"Drawn from a seeded uniform sample of each model's first run ({min(sizes):,}"
            + (f" to {max(sizes):,}" if max(sizes) != min(sizes) else "") + " rows; eval.plot_sample_rows).")


def _draw_roc(models, base, entity, samples, colors, summary):
    from sklearn.metrics import roc_curve

    fig, (ax,) = _figure()
    drawn = False
    for m in models:
        p = samples.get(m.name)
        if p is None or p["label"].min() == p["label"].max():
            continue
        fpr, tpr = _thin(*roc_curve(p["label"], p["score"])[:2])
        auc = (m.runs[0].entity(entity) or {}).get("auc")
        label = m.name + ("" if auc is None else f" (AUC {auc:.4f})") + (" [baseline]" if m is base else "")
        ax.plot(fpr, tpr, color=colors[m.name], lw=1.6, label=label)
        drawn = True
    if not drawn:
        return None
    caption = _sample_note(samples) + " The AUC in the legend is the run's exact one (all rows)."
    truth = [m for m in [base, *models] if samples.get(m.name) is not None and "true_prob" in samples[m.name]]
    if truth:  # synthetic data: the best achievable curve (the baseline's rows if it has them)
        p = samples[truth[0].name]
        if p["label"].min() != p["label"].max():
            fpr, tpr = _thin(*roc_curve(p["label"], p["true_prob"])[:2])
            ceiling = ((truth[0].runs[0].entity(entity) or {}).get("ceiling") or {}).get("auc")
            ax.plot(fpr, tpr, color="black", ls="--", lw=1.2,
                    label="true probability" + ("" if ceiling is None else f" (AUC {ceiling:.4f})"))
            caption += " The dashed black curve scores with the true click probability (the best achievable)."
    ax.plot([0, 1], [0, 1], color="0.6", lw=0.8, ls=":")
    ax.set(xlim=(0, 1), ylim=(0, 1.005), xlabel="false positive rate", ylabel="true positive rate",
           title=f"ROC, {entity} entity")
    ax.set_aspect("equal")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return fig, f"ROC curves ({entity} entity)", caption


def _thin(fpr: np.ndarray, tpr: np.ndarray, points: int = 2000):
    """At most ~``points`` points of a curve (the end points kept)."""
    if len(fpr) <= points:
        return fpr, tpr
    idx = np.unique(np.linspace(0, len(fpr) - 1, points).round().astype(int))
    return fpr[idx], tpr[idx]


def _draw_groups(models, base, entity, samples, colors, summary):
    min_users = summary.get("min_gauc_users", 0)
    by_model = {m["name"]: {g["name"]: g for g in m["groups"]} for m in summary.get("models", [])}
    order: List[str] = []
    for m in models:
        order += [n for n in by_model.get(m.name, {}) if n not in order]
    shown = [m for m in models if by_model.get(m.name)]
    if not order or not shown:
        return None
    fig, (ax,) = _figure(max(6.4, 1.2 + 0.5 * len(order) * len(shown)), 4.4)
    width = 0.8 / len(shown)
    values = []
    for j, m in enumerate(shown):
        xs, ys = [], []
        for i, name in enumerate(order):
            g = by_model[m.name].get(name)
            if g is not None and g["gauc"] is not None and not _too_few(g["gauc_users"], min_users):
                xs.append(i - 0.4 + width * (j + 0.5))
                ys.append(g["gauc"]["mean"])
        bars = ax.bar(xs, ys, width * 0.92, color=colors[m.name], label=m.name + (" [baseline]" if m is base else ""))
        ax.bar_label(bars, fmt="%.4f", fontsize=7, rotation=90 if len(shown) > 2 else 0, padding=2)
        values += ys
    if not values:
        return None
    lo, hi = min(values), max(values)
    pad = max(hi - lo, 0.01)
    ax.set_ylim(max(0.0, lo - pad), min(1.0, hi + 0.8 * pad))  # zoomed: the differences are small
    first = by_model[shown[0].name]

    def tick(n: str) -> str:
        g = first.get(n)
        if g is None or g.get("gauc_users") is None:
            return n
        return f"{n}\n({g['gauc_users']:,} users" + (", too few)" if _too_few(g["gauc_users"], min_users) else ")")

    ax.set_xticks(range(len(order)), [tick(n) for n in order])
    ax.set(xlabel="user behaviours", ylabel="GAUC", title=f"GAUC by user group, {entity} entity")
    ax.grid(axis="y", alpha=0.3)
    fig.legend(loc="outside lower center", ncols=min(3, len(shown)), fontsize=8)  # clear of the bar labels
    return (fig, f"GAUC by user group ({entity} entity)",
            "Mean over seeds. The y axis does not start at 0. Groups resting on fewer than "
            f"{min_users} users with both labels have no bar.")


def _draw_calibration(models, base, entity, samples, colors, summary):
    fig, (ax,) = _figure()
    top = 0.0
    for m in models:
        p = samples.get(m.name)
        if p is None or p["label"].shape[0] == 0:
            continue
        cal = sample_calibration(p["label"], p["score"])
        x = [b["mean_score"] for b in cal["bins"]]
        y = [b["click_rate"] for b in cal["bins"]]
        exact = ((m.runs[0].entity(entity) or {}).get("calibration") or {}).get("ece")
        ax.plot(x, y, marker="o", ms=4, color=colors[m.name],
                label=f"{m.name} (ECE {exact if exact is not None else cal['ece']:.4f})")
        top = max(top, *x, *y)
    if top == 0.0:
        return None
    top = min(1.0, top * 1.05)
    ax.plot([0, top], [0, top], color="0.6", lw=0.8, ls=":", label="perfectly calibrated")
    ax.set(xlim=(0, top), ylim=(0, top), xlabel="mean score in bin", ylabel="observed click rate in bin",
           title=f"Calibration, {entity} entity ({CALIBRATION_BINS} equal-count score bins)")
    ax.set_aspect("equal")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    return (fig, f"Calibration ({entity} entity)",
            "Points on the diagonal are calibrated. " + _sample_note(samples) + " The ECE in the legend is the "
            "run's exact one from metrics.json (equal-width bins over all rows; the sample's own where "
            "metrics.json has none).")


def _draw_loss(models, base, entity, samples, colors, summary):
    logged = [(m, m.runs[0]) for m in models if any(h.get("loss") is not None for h in m.runs[0].history)]
    if not logged:
        return None
    with_pdl = any(h.get("pdl") for _, r in logged for h in r.history)
    panels = [("loss", "training loss")] + ([("bce", "click BCE (without the PDL term)")] if with_pdl else [])
    fig, axes = _figure(6.4 * len(panels), 4.2, len(panels))
    for ax, (key, title) in zip(axes, panels):
        for m, r in logged:
            pts = [(h["step"], h[key]) for h in r.history if h.get(key) is not None and h.get("step") is not None]
            if not pts:
                continue
            x, y = np.array(pts, dtype=np.float64).T
            label = f"{m.name} [{r.stage}]"
            if len(y) > 50:  # noisy: faint raw values, bold moving average
                k = max(2, len(y) // 20)
                ax.plot(x, y, color=colors[m.name], alpha=0.25, lw=0.8)
                smooth = np.convolve(y, np.ones(k) / k, mode="valid")  # (n - k + 1,) moving average
                ax.plot(x[k - 1:], smooth, color=colors[m.name], lw=1.6, label=label)
            else:
                ax.plot(x, y, color=colors[m.name], lw=1.6, marker="." if len(y) < 20 else None, label=label)
        ax.set(xlabel="step", ylabel=key, title=title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return (fig, "Training loss (metrics.jsonl)",
            "Each model's first run. MEM and TEM runs log their own steps; long logs are smoothed.")


# --------------------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------------------


def _header_lines(summary: Dict[str, Any]) -> List[str]:
    return [f"Entity: {summary['entity']}. Baseline: {summary['baseline']}. Models: {len(summary['models'])}, "
            f"runs: {len(summary['runs'])}. Created {summary['created']}."]


def _runs_table(summary: Dict[str, Any]) -> Table:
    rows = []
    for r in summary["runs"]:
        t = r["training"] or {}
        rows.append([r["name"], _seed(r["seed"]), r["run_dir"], r["stage"], r["model_name"], r["ablation"],
                     r.get("checkpoint") or "-", _int(t.get("last_step")), _num(t.get("last_loss"))])
    return Table("runs", "Runs", ["Model", "Seed", "Directory", "Stage", "model.name", "Ablation", "Checkpoint",
                                  "Last logged step", "Last loss"], rows)


def text_table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A fixed-width plain-text table."""
    widths = [max(len(str(x)) for x in col) for col in zip(columns, *rows)]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in [columns, *rows])


def render_markdown(summary: Dict[str, Any], tables: Sequence[Table], figures: Dict[str, Dict[str, str]]) -> str:
    """report.md: the same tables, with the figures as links to the PNG files next to it."""
    out = [f"# Run comparison: {summary['entity']} entity", "", *_header_lines(summary), ""]
    for i, t in enumerate(tables, 1):
        out += [f"## Table {i}: {t.title}", "", _md_table(t), ""] + ([t.note, ""] if t.note else [])
    for i, f in enumerate(figures.values(), 1):
        out += [f"## Figure {i}: {f['title']}", "", f"![{f['title']}]({f['file']})", ""]
        out += [f["caption"], ""] if f["caption"] else []
    out += ["## Runs", "", _md_table(_runs_table(summary)), ""]
    return "\n".join(out)


def _md_table(t: Table) -> str:
    def cell(text: str) -> str:
        return str(text).replace("|", "\\|")

    right = [i > 0 and any(_looks_numeric(row[i]) for row in t.rows) for i in range(len(t.columns))]
    lines = ["| " + " | ".join(cell(c) for c in t.columns) + " |",
             "|" + "|".join("---:" if r else "---" for r in right) + "|"]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in t.rows]
    return "\n".join(lines)


_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1200px;
       padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.15em; margin-top: 1.8em; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; }
th { background: #f2f2f2; } td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr.bold td { font-weight: 600; background: #fafae8; }
td.pos { color: #1a7f37; } td.neg { color: #b42318; }
p.note, p.caption { color: #555; font-size: 0.85em; max-width: 60em; }
div.scroll { overflow-x: auto; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
"""


def render_html(summary: Dict[str, Any], tables: Sequence[Table], figures: Dict[str, Dict[str, str]],
                png_dir: str) -> str:
    """report.html: one self-contained file (inline CSS, PNGs as data URIs; no external links)."""
    esc = html.escape
    body = [f"<h1>Run comparison: {esc(summary['entity'])} entity</h1>"]
    body += [f"<p>{esc(line)}</p>" for line in _header_lines(summary)]
    for i, t in enumerate(tables, 1):
        body += [f"<h2>Table {i}: {esc(t.title)}</h2>", _html_table(t)]
        if t.note:
            body.append(f'<p class="note">{esc(t.note)}</p>')
    for i, f in enumerate(figures.values(), 1):
        with open(os.path.join(png_dir, f["file"]), "rb") as fh:
            data = base64.b64encode(fh.read()).decode("ascii")
        body += [f"<h2>Figure {i}: {esc(f['title'])}</h2>",
                 f'<figure><img alt="{esc(f["title"])}" src="data:image/png;base64,{data}">'
                 f'<figcaption><p class="caption">{esc(f["caption"])}</p></figcaption></figure>']
    body += ["<h2>Runs</h2>", _html_table(_runs_table(summary))]
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>Run comparison: {esc(summary['entity'])} entity</title>\n<style>{_CSS}</style>\n</head>\n"
            "<body>\n" + "\n".join(body) + "\n</body>\n</html>\n")


def _html_table(t: Table) -> str:
    esc = html.escape
    out = ['<div class="scroll"><table>', "<tr>" + "".join(f"<th>{esc(c)}</th>" for c in t.columns) + "</tr>"]
    for i, row in enumerate(t.rows):
        cells = []
        for j, c in enumerate(row):
            cls = [x for x in ("num" if j > 0 and _looks_numeric(c) else "",
                               _sign_class(c) if j in t.signed_columns else "") if x]
            attr = f' class="{" ".join(cls)}"' if cls else ""
            cells.append(f"<td{attr}>{esc(c)}</td>")
        tr = '<tr class="bold">' if i in t.bold_rows else "<tr>"
        out.append(tr + "".join(cells) + "</tr>")
    out.append("</table></div>")
    return "\n".join(out)


def _sign_class(c: str) -> str:
    """Colour a difference: "+0.01 (...)" green, "-0.01 (...)" red; an interval only if it excludes 0 (*)."""
    if c.startswith("+"):
        return "pos"
    if c.startswith("-") and c != "-":
        return "neg"
    if c.startswith("[") and c.endswith("*"):
        return "pos" if c.startswith("[+") else "neg"
    return ""


def _looks_numeric(c: str) -> bool:
    return bool(c) and (c[0].isdigit() or c[0] in "+-[") and c != "-"


# --------------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------------


def _write_text(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def _publish(tmp: str, out_dir: str) -> None:
    """Move the finished report into ``out_dir``: the whole directory if it is new, else file by file (each
    replace is atomic; report.html last), dropping plots of an earlier report that this one has not drawn."""
    if not os.path.exists(out_dir):
        os.rename(tmp, out_dir)
        return
    if not os.path.isdir(out_dir):
        raise FileExistsError(f"{out_dir}: exists and is not a directory")
    new = set(os.listdir(tmp))
    for stale in set(PLOT_FILES) - new:
        if os.path.isfile(os.path.join(out_dir, stale)):
            os.remove(os.path.join(out_dir, stale))
    for name in sorted(new, key=lambda n: (n == "report.html", n)):
        os.replace(os.path.join(tmp, name), os.path.join(out_dir, name))


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, set):
        return sorted(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")

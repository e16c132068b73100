"""The runs of a report: reading evaluated run directories into models, one streaming pass over each run's
predictions (row digest and plot sample), and the differences of each model to the baseline: seed-level
Student-t intervals (:func:`seed_difference`) and the user-level paired bootstrap (:func:`paired_difference`).

A run pairs with the baseline's run of the same training seed, else by position, and is used only if both
scored the same rows (:func:`usable_pairs`; see :mod:`~mkt_torchrec.evaluation.report`, "Intervals").
"""

from __future__ import annotations

import glob
import hashlib
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from mkt_torchrec import registry
from mkt_torchrec.evaluation.bootstrap import mix64
from mkt_torchrec.evaluation.paired import RunReplicates, check_same_rows, pooled_paired_difference, run_replicates
from mkt_torchrec.evaluation.predictions import check_parts, iter_entity_columns
from mkt_torchrec.evaluation.seed_intervals import seed_paired_difference
from mkt_torchrec.evaluation.streaming import SpillLimits
from mkt_torchrec.rundir import RunDir, read_json

__all__ = ["FAMILIES", "Run", "Model", "Scan", "Pairing", "RunsArg", "load_models", "family_of", "default_name",
           "pick_baseline", "scan_predictions", "pair_runs", "usable_pairs", "paired_difference", "seed_difference"]

FAMILIES = registry.FAMILIES
_NOT_SAME_ROWS = "n/a (not the same rows)"
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
    local_dir: Optional[str] = None  # a run directory on object storage: the local copy its predictions are in

    @property
    def pred_dir(self) -> str:
        """The run's predictions directory (local)."""
        return os.path.join(self.local_dir or self.run_dir, "predictions")

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
class Scan:
    """What one streaming pass over a run's predictions of the entity keeps: bounded, whatever the rows."""

    rows: int
    digest: str  # of the (user_id, label) sequence
    sample: Optional[Dict[str, np.ndarray]]  # label, score (+ true_prob) of at most plot_sample_rows rows


RunsArg = Union[Sequence[str], Mapping[str, Sequence[str]]]


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
    """Read run.json, metrics.json and metrics.jsonl of a run; check the predictions exist (a run directory on
    object storage: its predictions are copied to its local copy first)."""
    run = RunDir(run_dir)
    if not run.remote and not os.path.isdir(run_dir):
        raise FileNotFoundError(f"{run_dir}: no such run directory")
    if not run.evaluated():
        raise FileNotFoundError(f"{run.name}: metrics.json is missing; run mkt evaluate first")
    run.pull("predictions")
    if not glob.glob(os.path.join(run.path, "predictions", "part-*.parquet")):
        raise FileNotFoundError(f"{run.name}: no predictions (predictions/part-*.parquet); run mkt evaluate first")
    metrics = run.metrics()
    check_parts(os.path.join(run.path, "predictions"), metrics)  # deleted / added part files: named here
    info = read_json(run.stored(RunDir.RUN), "a run record") if run.exists() else {}
    config = info.get("config") or {}
    model_cfg = config.get("model") or {}
    stage = metrics.get("stage") or info.get("stage") or "?"
    ablation = metrics.get("ablation") or model_cfg.get("ablation") or "none"
    seed = (config.get("train") or {}).get("seed")
    return Run(name if name is not None else default_name(run_dir, ablation), run_dir, stage, ablation, info, metrics,
               run.history(), str(model_cfg.get("name") or "mkt"), seed if isinstance(seed, int) else None,
               run.path if run.remote else None)


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
    salt = np.uint64(mix64(np.array([seed], dtype=np.int64).view(np.uint64) + np.uint64(_SAMPLE_SALT))[0])
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
                key = mix64(np.arange(rows, rows + n, dtype=np.uint64) + salt)  # (n,) distinct keys
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


def pair_runs(model: Model, base: Model) -> Tuple[List[Tuple[Run, Run]], str]:
    """``[(run, baseline run)]`` and how they were paired ("seed" or "position")."""
    seeds_m, seeds_b = [r.seed for r in model.runs], [r.seed for r in base.runs]
    by_seed = (None not in seeds_m and None not in seeds_b and len(set(seeds_m)) == len(seeds_m)
               and len(set(seeds_b)) == len(seeds_b) and set(seeds_m) & set(seeds_b))
    if by_seed:
        base_by_seed = {r.seed: r for r in base.runs}
        return [(r, base_by_seed[r.seed]) for r in model.runs if r.seed in base_by_seed], "seed"
    return list(zip(model.runs, base.runs, strict=False)), "position"


@dataclass
class Pairing:
    """A model's runs paired with the baseline's (:func:`pair_runs`) and which pairs can be compared."""

    used: List[Tuple[Run, Run]]  # (run, baseline run) on the same rows of the entity
    left_out: List[Dict[str, str]]  # {"run", "baseline_run", "reason"}
    paired_by: str  # "seed" or "position"
    any_rows: bool  # some pair has rows of the entity in both runs


def usable_pairs(model: Model, base: Model, entity: str, scans: Dict[int, Scan]) -> Pairing:
    """Pair ``model``'s runs with ``base``'s and keep the pairs scored on the same rows of ``entity``.

    Same rows: equal row counts and ``(user_id, label)`` digests of the two scans when both runs were scanned,
    else (no scan: the report streams predictions only for the paired bootstrap and the plots) equal ``rows``,
    ``users`` and ``positives`` in their metrics.json.
    """
    pairs, paired_by = pair_runs(model, base)
    used, left_out = [], []
    for r, b in pairs:
        reason = _why_not_paired(r, b, entity, scans)
        if reason is None:
            used.append((r, b))
        else:
            left_out.append({"run": r.run_dir, "baseline_run": b.run_dir, "reason": reason})
    any_rows = any(r.entity(entity) is not None and b.entity(entity) is not None for r, b in pairs)
    return Pairing(used, left_out, paired_by, any_rows)


def _why_not_paired(run: Run, base: Run, entity: str, scans: Dict[int, Scan]) -> Optional[str]:
    """Why two runs cannot be compared on the entity's rows (what differs, and what to do), or None if they can."""
    if run.entity(entity) is None or base.entity(entity) is None:
        return f"no {entity} rows"
    sr, sb = scans.get(id(run)), scans.get(id(base))
    if sr is not None and sb is not None and sr.digest and sb.digest:
        if sr.rows == 0 or sb.rows == 0:
            return f"no {entity} rows"
        if (sr.rows, sr.digest) == (sb.rows, sb.digest):
            return None
        return _counts_differ(run, base, entity) if sr.rows != sb.rows else _rows_differ(base, run, entity)
    keys = ("rows", "users", "positives")
    if [run.entity(entity).get(k) for k in keys] != [base.entity(entity).get(k) for k in keys]:
        return _counts_differ(run, base, entity)
    return None


_SCORE_ALIKE = "evaluate both runs on the same --data (the same test split) and report again"


def _short(run: Run) -> str:
    """A run directory's last component (what a table cell has room for)."""
    return os.path.basename(os.path.normpath(run.run_dir)) or run.run_dir


def _counts_differ(run: Run, base: Run, entity: str) -> str:
    """Runs scored on different rows, by metrics.json's counts: rows, users and clicks of each."""

    def counts(r: Run) -> str:
        m = r.entity(entity) or {}
        return f"{m.get('rows')} {entity} rows of {m.get('users')} users ({m.get('positives')} clicks)"

    return (f"not on the same rows: {_short(run)} was scored on {counts(run)}, {_short(base)} on {counts(base)}; "
            f"{_SCORE_ALIKE}")


def _not_paired(pairing: Pairing) -> str:
    """A table cell for a model with no usable pair: why (the first left-out pair's reason, which says what differs
    and what to do)."""
    return f"n/a ({pairing.left_out[0]['reason']})" if pairing.left_out else _NOT_SAME_ROWS


def paired_difference(pairing: Pairing, entity: str, eval_cfg: Any, cache: Dict[str, RunReplicates],
                      spill_dir: Optional[str] = None, limits: Optional[SpillLimits] = None) -> Dict[str, Any]:
    """User-level pooled paired bootstrap of (model - baseline) over the usable seed pairs, or ``{"error": ...}``.

    ``cache`` keeps each run's :class:`~mkt_torchrec.evaluation.paired.RunReplicates` (``O(samples)``) so
    that the baseline's runs are computed once for all models.
    """
    if not pairing.any_rows:
        return {"error": f"n/a (no {entity} rows)"}
    if int(eval_cfg.bootstrap_samples) <= 0:
        return {"error": "n/a (no bootstrap)"}
    if not pairing.used:
        return {"error": _not_paired(pairing), "left_out": pairing.left_out, "paired_by": pairing.paired_by,
                "detail": pairing.left_out[0]["reason"] if pairing.left_out else None}

    def replicates_of(run: Run) -> RunReplicates:
        key = os.path.realpath(run.run_dir)
        if key not in cache:
            cache[key] = run_replicates(run.pred_dir, entity, eval_cfg, spill_dir, limits)
        return cache[key]

    out = pooled_paired_difference([(replicates_of(r), replicates_of(b)) for r, b in pairing.used],
                                   float(eval_cfg.confidence))
    return {**out, "paired_by": pairing.paired_by, "runs": [[r.run_dir, b.run_dir] for r, b in pairing.used],
            "left_out": pairing.left_out}


def seed_difference(pairing: Pairing, entity: str, eval_cfg: Any) -> Dict[str, Any]:
    """Seed-level Student-t intervals of (model - baseline) for AUC, GAUC and log loss over the usable seed
    pairs, and of AUC and GAUC in each activity group both runs of a pair have
    (:func:`~mkt_torchrec.evaluation.seed_intervals.seed_paired_difference` of the runs' metrics.json blocks),
    or ``{"error": ...}`` without a usable pair. Intervals need at least two pairs."""
    if not pairing.any_rows:
        return {"error": f"n/a (no {entity} rows)", "pairs": 0}
    if not pairing.used:
        return {"error": _not_paired(pairing), "pairs": 0, "left_out": pairing.left_out, "paired_by": pairing.paired_by,
                "detail": pairing.left_out[0]["reason"] if pairing.left_out else None}
    confidence = float(eval_cfg.confidence)
    blocks = [(r.entity(entity), b.entity(entity)) for r, b in pairing.used]
    out = seed_paired_difference([a for a, _ in blocks], [b for _, b in blocks], confidence)
    groups: Dict[str, Any] = {}
    names: List[str] = []
    for a, _ in blocks:
        names += [g["name"] for g in a.get("groups") or [] if g["name"] not in names]
    for name in names:
        both = [(_group(a, name), _group(b, name)) for a, b in blocks]
        both = [(x, y) for x, y in both if x is not None and y is not None]
        groups[name] = seed_paired_difference([x for x, _ in both], [y for _, y in both], confidence,
                                              ("auc", "gauc"))
    return {**out, "groups": groups, "paired_by": pairing.paired_by, "seeds": [r.seed for r, _ in pairing.used],
            "runs": [[r.run_dir, b.run_dir] for r, b in pairing.used], "left_out": pairing.left_out}


def _group(block: Dict[str, Any], name: str) -> Optional[Dict[str, Any]]:
    return next((g for g in block.get("groups") or [] if g.get("name") == name), None)


def _rows_differ(base: Run, run: Run, entity: str) -> str:
    """Why two runs' rows differ when their counts agree, in words: the first row that differs (streams both once
    more; only called when the digests differ)."""
    try:
        check_same_rows(base.pred_dir, run.pred_dir, entity)
    except ValueError as e:
        detail = str(e).replace("paired_comparison: the runs are not on the same rows: ", "")
        return f"not on the same rows ({_short(run)} vs {_short(base)}, as many rows but other ones: {detail}); {_SCORE_ALIKE}"
    return f"not on the same rows ({_short(run)} vs {_short(base)}: the (user_id, label) sequences differ); {_SCORE_ALIKE}"

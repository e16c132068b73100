"""The numbers and tables of a report: seed aggregates and differences to the baseline (:func:`summarise`), the
result tables in the paper's layouts (:class:`Table`), and the formatting of their cells.

Every cell is a formatted string, so report.json, report.md, report.html and the plain text of ``mkt report`` show
the same values (rendering: :mod:`~mkt_torchrec.evaluation.report_render`).
"""

from __future__ import annotations

import datetime
import statistics
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

from mkt_torchrec.evaluation.predictions import ENTITIES
from mkt_torchrec.evaluation.report_flags import FLAG_TEXT, flag_cell, model_flags, run_flags
from mkt_torchrec.evaluation.report_runs import FAMILIES, Model
from mkt_torchrec.evaluation.seed_intervals import LOWER_IS_BETTER, MIN_SEEDS

__all__ = ["Table", "summarise", "is_too_few", "intervals_text", "overall_table", "groups_table", "ceiling_table",
           "entity_table", "per_run_table", "runs_table", "text_table", "ONE_SEED_LABEL"]

_TOO_FEW = "n/a (too few users)"
ONE_SEED_LABEL = "test-user sampling only (1 seed): does not include training variance"
_ONE_SEED_CELL = "(test-user sampling only, 1 seed)"


@dataclass
class Table:
    """A result table, rendered to Markdown, HTML and plain text alike."""

    key: str
    title: str
    columns: List[str]
    rows: List[List[str]]
    note: str = ""
    bold_rows: set = field(default_factory=set)  # the baseline / best-achievable rows
    signed_columns: set = field(default_factory=set)  # colour +/- values by their sign
    cell_classes: Dict[Tuple[int, int], str] = field(default_factory=dict)  # (row, column): "pos" / "neg" / ""


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


def is_too_few(users: Optional[int], min_users: int) -> bool:
    """Whether a GAUC resting on ``users`` users is below ``min_users`` (eval.min_gauc_users)."""
    return users is not None and users < min_users


def summarise(models: Sequence[Model], base: Model, entity: str, user_level: Dict[str, Dict[str, Any]],
              seed_level: Dict[str, Dict[str, Any]], eval_cfg: Any) -> Dict[str, Any]:
    """Everything report.json holds except the tables and plots: per model the seed aggregates, the differences
    to the baseline with their seed-level and user-level intervals, which of the two the tables show
    (``interval``), what excludes 0 (``significant``) and its ``flags``; per run metrics.json verbatim."""
    min_users = int(eval_cfg.min_gauc_users)
    agg = {m.name: _model_numbers(m, entity) for m in models}
    b = agg[base.name]
    out_models, out_runs = [], []
    for m in models:
        a = agg[m.name]
        is_base = m is base
        delta = None
        if not is_base and a["auc"] is not None:
            too_few = is_too_few(a["gauc_users"], min_users) or is_too_few(b["gauc_users"], min_users)
            delta = {"auc": _difference(_mean(a["auc"]), _mean(b["auc"])), "gauc_too_few": too_few,
                     "gauc": None if too_few else _difference(_mean(a["gauc"]), _mean(b["gauc"])),
                     "logloss": _difference(_mean(a["logloss"]), _mean(b["logloss"]))}
        seed = None if is_base else seed_level.get(m.name)
        shown = _shown_interval(seed)
        groups = []
        base_groups = {g["name"]: g for g in b["groups"]}
        for g in a["groups"]:
            ref = base_groups.get(g["name"])
            d = None
            if not is_base and ref is not None:
                too_few = is_too_few(g["gauc_users"], min_users) or is_too_few(ref["gauc_users"], min_users)
                gs = ((seed or {}).get("groups") or {}).get(g["name"])
                d = {"auc": _difference(_mean(g["auc"]), _mean(ref["auc"])), "gauc_too_few": too_few,
                     "gauc": None if too_few else _difference(_mean(g["gauc"]), _mean(ref["gauc"])),
                     "seed_level": gs, "significant": _significant(gs, too_few)}
            groups.append({**g, "delta": d})
        flags = model_flags([(r.seed, r.run_dir, r.entity(entity)) for r in m.runs])
        out_models.append({"name": m.name, "family": m.family, "family_label": FAMILIES[m.family],
                           "is_baseline": is_base, "run_dirs": [r.run_dir for r in m.runs],
                           "seeds": [r.seed for r in m.runs], **{k: v for k, v in a.items() if k != "groups"},
                           "groups": groups, "delta": delta, "interval": shown,
                           "interval_label": ONE_SEED_LABEL if shown == "user_level" else None,
                           "significant": (_significant(seed, bool((delta or {}).get("gauc_too_few")))
                                           if shown == "seed_level" else {}),
                           "seed_level": seed, "user_level": None if is_base else user_level.get(m.name),
                           "flags": flags})
        for r in m.runs:
            out_runs.append({
                "name": m.name, "run_dir": r.run_dir, "seed": r.seed, "stage": r.stage, "ablation": r.ablation,
                "model_name": r.model_name, "family": m.family, "is_baseline": is_base,
                "checkpoint": r.metrics.get("checkpoint"), "bootstrap": r.metrics.get("bootstrap"),
                "metrics": {e: r.metrics[e] for e in ENTITIES if e in r.metrics},
                "flags": run_flags(r.entity(entity)), "training": _training_summary(r.history),
            })
    bootstrap = base.runs[0].metrics.get("bootstrap") or {}
    out = {
        "entity": entity, "baseline": base.name,
        "confidence": bootstrap.get("confidence"), "bootstrap_samples": bootstrap.get("samples"),
        "paired_confidence": float(eval_cfg.confidence), "paired_samples": int(eval_cfg.bootstrap_samples),
        "paired_seed": int(eval_cfg.seed), "min_gauc_users": min_users,
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
        "families": {k: FAMILIES[k] for k in FAMILIES if any(m.family == k for m in models)},
        "flag_definitions": dict(FLAG_TEXT),
        "models": out_models, "runs": out_runs,
    }
    out["intervals"] = intervals_text(out)
    return out


def _shown_interval(seed: Optional[Dict[str, Any]]) -> Optional[str]:
    """Which interval the tables show: ``seed_level`` with at least MIN_SEEDS usable seed pairs, else
    ``user_level`` (test users only, never significant) when there is one pair, else None (no usable pair)."""
    if seed is None or "error" in seed:
        return None
    return "seed_level" if seed.get("pairs", 0) >= MIN_SEEDS else "user_level"


def _significant(seed: Optional[Dict[str, Any]], gauc_too_few: bool) -> Dict[str, bool]:
    """``{metric: seed-level interval excludes 0}`` (GAUC never when it rests on too few users)."""
    out = {}
    for name in ("auc", "gauc", "logloss"):
        block = (seed or {}).get(name)
        if block is not None:
            out[name] = bool(block.get("excludes_zero")) and not (name == "gauc" and gauc_too_few)
    return out


def intervals_text(summary: Dict[str, Any]) -> Dict[str, str]:
    """What the report says about its intervals and flags (report.json ``intervals``, the templates' header)."""
    level = _level(summary.get("paired_confidence"))
    return {
        "shown": "seed_level with >= 2 paired seeds, else user_level (1 seed, never significant)",
        "seed_level": (f"Δ intervals ({level}) with two or more seeds paired with the baseline's (same train.seed, "
                       "same test rows): a Student-t interval over seeds, mean(d) ± t(n−1) · sd(d) / √n of the "
                       "per-seed differences d = M(model, seed) − M(baseline, seed) of the exact metrics in "
                       "metrics.json. It includes the seed-to-seed (training) variance; only it marks a "
                       "difference as excluding 0 (*, coloured)."),
        "user_level": (f"With a single paired seed the Δ interval is the user-level paired bootstrap "
                       f"({summary.get('paired_samples')} resamples of the test users), labelled "
                       f"\"{ONE_SEED_LABEL}\": never marked significant. report.json keeps it for every model "
                       "(user_level)."),
        "flags": ("⚠ flags: " + "; ".join(FLAG_TEXT.values()) + " (base-rate log loss −(p ln p + (1−p) ln(1−p)), "
                  "p the rows' click rate)."),
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
        "mean_score": _aggregate([c.get("mean_score") for c in cal]) if present else None,
        "click_rate": _aggregate([c.get("click_rate") for c in cal]) if present else None,
        "groups": groups, "ceiling": ceilings[0] if ceilings else None,
    }


def _mean(a: Optional[Dict[str, Any]]) -> Optional[float]:
    return None if a is None else a["mean"]


def _difference(value: Optional[float], ref: Optional[float]) -> Optional[Dict[str, float]]:
    """``{"abs": value - ref, "rel_pct": 100 (value - ref) / ref}``, or None if either is missing."""
    if value is None or ref is None:
        return None
    return {"abs": value - ref, "rel_pct": 100.0 * (value - ref) / ref if ref else None}


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
    """Paper Table 2: models by family; AUC, GAUC, log loss and calibration as mean ± std over seeds; the
    improvement over the baseline in AUC, GAUC and log loss side by side, each with its interval; flags."""
    entity, min_users = summary["entity"], summary["min_gauc_users"]
    level = _level(summary.get("paired_confidence"))
    metrics = (("auc", "AUC"), ("gauc", "GAUC"), ("logloss", "LogLoss"))
    columns = ["Family", "Model", "Seeds", "AUC", "GAUC (users)", "LogLoss", "ECE", "Mean score / click rate"]
    for _, label in metrics:
        columns += [f"Δ {label} vs baseline", f"Δ {label} {level} CI"]
    columns.append("Flags")
    first_delta = columns.index("Δ AUC vs baseline")
    rows: List[List[str]] = []
    bold, classes = set(), {}
    family = None
    for m in sorted(summary["models"], key=lambda m: list(FAMILIES).index(m["family"])):
        label = m["family_label"] if m["family"] != family else ""
        family = m["family"]
        seeds = str(len(m["run_dirs"]))
        flags = flag_cell(m.get("flags") or [], len(m["run_dirs"]))
        if m["auc"] is None and m["gauc"] is None:
            rows.append([label, m["name"], seeds, f"no {entity} rows"] + ["-"] * (len(columns) - 5) + [flags])
            continue
        if m["is_baseline"]:
            bold.add(len(rows))
        row = [label, m["name"], seeds, _mean_std(m["auc"]), _gauc_cell(m["gauc"], m["gauc_users"], min_users),
               _mean_std(m.get("logloss")), _mean_std(m.get("ece")),
               _pair(m.get("mean_score"), m.get("click_rate"))]
        for i, (name, _) in enumerate(metrics):
            if m["is_baseline"]:
                row += ["baseline", "-"]
                continue
            d = m["delta"] or {}
            row += [_TOO_FEW if name == "gauc" and d.get("gauc_too_few") else _delta(d.get(name)),
                    _interval_cell(m, name, min_users)]
            colour = _colour(m, name)
            for j in (first_delta + 2 * i, first_delta + 2 * i + 1):
                classes[(len(rows), j)] = colour
        rows.append(row + [flags])
    intervals = summary.get("intervals") or intervals_text(summary)
    note = (f"Mean ± sample standard deviation over each model's seeds (Seeds: its runs; one seed: no ±). "
            f"GAUC (users): the users with both a click and a non-click it rests on (fewest over the seeds); under "
            f"{min_users} (eval.min_gauc_users) the GAUC reads \"too few users (n)\". LogLoss: mean binary "
            "cross-entropy (lower is better); ECE: expected calibration error; mean score / click rate: mean "
            f"predicted against observed CTR. Δ = model mean − baseline mean ({summary['baseline']}), absolute and "
            f"relative to the baseline; a negative Δ LogLoss is an improvement. {intervals['seed_level']} "
            f"{intervals['user_level']} No log-loss interval with one seed (the bootstrap has no log loss). "
            f"\"(k paired seeds)\": the interval rests on fewer seeds than the model has. {intervals['flags']}")
    flagged = [f"{m['name']}: {flag_cell(m['flags'], len(m['run_dirs']))}" for m in summary["models"]
               if m.get("flags")]
    if flagged:
        note += " Flagged here: " + "; ".join(flagged) + "."
    return Table("overall", f"Overall performance on the {entity} entity", columns, rows, note, bold,
                 cell_classes=classes)


def _interval_cell(m: Dict[str, Any], metric: str, min_users: int) -> str:
    """The Δ interval cell of a model: seed-level with >= 2 paired seeds, else the labelled user-level one."""
    seed, user = m.get("seed_level") or {}, m.get("user_level") or {}
    if metric == "gauc" and (m.get("delta") or {}).get("gauc_too_few"):
        return _TOO_FEW
    if "error" in seed:
        return seed["error"]
    if m.get("interval") == "seed_level":
        block = seed.get(metric) or {}
        ci = block.get("ci")
        if not ci:
            return "n/a (undefined)"
        text = f"[{ci[0]:+.4f}, {ci[1]:+.4f}]" + (" *" if block.get("excludes_zero") else "")
        if block.get("n", 0) < len(m["run_dirs"]):
            text += f" ({block['n']} paired seeds)"
        return text
    if metric == "logloss":
        return "n/a (1 seed)"
    return _user_interval_cell(user, metric, min_users)


def _user_interval_cell(p: Dict[str, Any], metric: str, min_users: int) -> str:
    """The user-level paired bootstrap interval (one seed): labelled, never marked significant."""
    if "error" in p:
        return p["error"]
    if metric == "gauc" and is_too_few(p.get("users_evaluated"), min_users):
        return _TOO_FEW
    ci = p.get(f"{metric}_diff_ci")
    if not ci:
        return "n/a (no bootstrap)"
    return f"[{ci[0]:+.4f}, {ci[1]:+.4f}] {_ONE_SEED_CELL}"


def _colour(m: Dict[str, Any], metric: str, significant: Optional[Dict[str, bool]] = None,
            seed: Optional[Dict[str, Any]] = None) -> str:
    """``pos`` (better) / ``neg`` (worse) when the seed-level interval of ``metric`` excludes 0, else ''."""
    significant = (m.get("significant") or {}) if significant is None else significant
    seed = (m.get("seed_level") or {}) if seed is None else seed
    if not significant.get(metric):
        return ""
    mean = (seed.get(metric) or {}).get("mean") or 0.0
    better = mean < 0 if metric in LOWER_IS_BETTER else mean > 0
    return "pos" if better else "neg"


def groups_table(summary: Dict[str, Any]) -> Optional[Table]:
    """Paper Table 3: AUC and GAUC per user-activity group, improvement over the baseline; * and colour where
    the group's seed-level interval (>= 2 paired seeds) excludes 0."""
    entity, min_users = summary["entity"], summary["min_gauc_users"]
    order: List[str] = []
    for m in summary["models"]:
        order += [g["name"] for g in m["groups"] if g["name"] not in order]
    if not order:
        return None
    columns = ["User behaviours", "Model", "Users", "Rows", "AUC", "AUC improv.", "GAUC (users)", "GAUC improv."]
    rows: List[List[str]] = []
    bold, classes = set(), {}
    for name in order:
        first = True
        for m in summary["models"]:
            g = next((x for x in m["groups"] if x["name"] == name), None)
            if g is None:
                continue
            if m["is_baseline"]:
                bold.add(len(rows))
            d = g["delta"] or {}
            sig, seed = d.get("significant") or {}, d.get("seed_level") or {}
            improv = {}
            for metric in ("auc", "gauc"):
                if m["is_baseline"]:
                    improv[metric] = "-"
                elif metric == "gauc" and d.get("gauc_too_few"):
                    improv[metric] = _TOO_FEW
                else:
                    improv[metric] = _rel(d.get(metric)) + (" *" if sig.get(metric) and d.get(metric) else "")
                    classes[(len(rows), 5 if metric == "auc" else 7)] = _colour(m, metric, sig, seed)
            rows.append([name if first else "", m["name"], _int(g.get("users")), _int(g.get("rows")),
                         _mean_std(g["auc"]), improv["auc"], _gauc_cell(g["gauc"], g["gauc_users"], min_users),
                         improv["gauc"]])
            first = False
    note = (f"Users grouped by their number of past behaviours; improvement relative to the baseline "
            f"({summary['baseline']}) in the same group. GAUC (users): users with both a click and a non-click in "
            f"the group; under {min_users} the GAUC and its improvement are not shown. * (and colour): the group's "
            "seed-level Student-t interval over two or more paired seeds excludes 0 (intervals in report.json, "
            "models[].groups[].delta.seed_level); with one seed no improvement is marked.")
    return Table("groups", f"Performance by user group ({entity} entity)", columns, rows, note, bold,
                 cell_classes=classes)


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
        gauc = (f"too few users ({users:,})" if is_too_few(users, min_users) else
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


def _pair(a: Optional[Dict[str, Any]], b: Optional[Dict[str, Any]]) -> str:
    """``0.2310 / 0.2290``: two seed means (``-`` if either is missing)."""
    return "-" if a is None or b is None else f"{a['mean']:.4f} / {b['mean']:.4f}"


def _gauc_cell(a: Optional[Dict[str, Any]], users: Optional[int], min_users: int) -> str:
    """A GAUC with the users it rests on, or ``too few users (n)``."""
    if is_too_few(users, min_users):
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


def runs_table(summary: Dict[str, Any]) -> Table:
    """Every run: model, seed, directory, stage, model.name, ablation, checkpoint, last logged step and loss."""
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

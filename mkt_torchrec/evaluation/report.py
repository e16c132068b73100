"""Compare evaluated runs side by side: ``report.html``, ``report.md``, ``report.json`` and PNG plots.

    write_report(["runs/finetune", "runs/mkt", "runs/mkt_no_hfa"], "reports/ablations")

The layout follows the MKT paper's result tables for one entity (``target`` by default):

1. overall AUC and GAUC with their confidence intervals and the difference to a baseline run, absolute and
   relative (paper Tables 2 and 4), plus the paired interval of that difference when both runs were scored
   on the same rows (:func:`mkt_torchrec.evaluation.analysis.paired_comparison`);
2. AUC and GAUC per user-activity group with the improvement over the baseline (paper Table 3);
3. on synthetic data, the best achievable AUC / GAUC (scoring with the true click probability) and each
   run's gap to it;
4. source and target metrics of the stage-1 (MEM) runs.

Figures: ROC curves, GAUC by user group, a reliability diagram (mean score against click rate in score
bins) and the training loss curves of ``metrics.jsonl``. Every number comes from the runs' ``metrics.json``
(written by ``mkt evaluate``), which ``report.json`` repeats unchanged; the predictions are read only for
the curves, the calibration and the paired differences.

The report is built in a temporary directory next to ``out_dir`` and moved into place at the end, so a
failed report leaves no half-written files.
"""

from __future__ import annotations

import base64
import datetime
import glob
import html
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import pyarrow.parquet as pq

ENTITIES = ("source", "target")
PLOT_FILES = ("roc.png", "groups.png", "calibration.png", "loss.png")
CALIBRATION_BINS = 10
ABLATION_LABELS = {
    "no_hfa": "w/o HFA", "no_pdl": "w/o PDL", "no_mem_pretrain": "w/o MEM pretrain",
    "no_tem_finetune": "w/o TEM finetune",
}
_NOT_SAME_ROWS = "n/a (not the same rows)"


@dataclass
class Run:
    """One evaluated run directory: its identity, ``metrics.json`` and training log."""

    name: str
    run_dir: str
    stage: str
    ablation: str
    info: Dict[str, Any]  # run.json ({} if absent)
    metrics: Dict[str, Any]  # metrics.json
    history: List[Dict[str, Any]]  # metrics.jsonl

    @property
    def pred_dir(self) -> str:
        return os.path.join(self.run_dir, "predictions")

    def entity(self, entity: str) -> Optional[Dict[str, Any]]:
        """metrics.json's block for ``entity``, or None if the run scored no such rows."""
        return self.metrics.get(entity)


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


def write_report(run_dirs: Sequence[str], out_dir: str, baseline: Optional[str] = None, entity: str = "target",
                 names: Optional[Sequence[str]] = None, eval_cfg: Any = None) -> Dict[str, Any]:
    """Write the comparison report of ``run_dirs`` for ``entity`` into ``out_dir``.

    Args:
        run_dirs: evaluated run directories (``mkt train`` + ``mkt evaluate``).
        out_dir: report directory (created; files of an earlier report there are replaced).
        baseline: run directory or run name to compare against; default the first ``no_mem_pretrain``
            run, else the first run.
        entity: ``target`` or ``source``.
        names: display names, one per run (default: the directory name, plus the ablation).
        eval_cfg: :class:`mkt_torchrec.config.EvalConfig` for the paired comparisons (default: defaults).

    Returns:
        The report's numbers, as written to ``report.json``, plus ``out_dir`` and the ``files`` written.

    Raises:
        FileNotFoundError: a run directory lacks ``metrics.json`` or predictions (run ``mkt evaluate``).
        ValueError: bad ``entity``, ``names`` or ``baseline``.
    """
    from mkt_torchrec.config import EvalConfig

    if entity not in ENTITIES:
        raise ValueError(f"entity must be one of {ENTITIES}, got {entity!r}")
    if not run_dirs:
        raise ValueError("no run directories to report on")
    eval_cfg = eval_cfg if eval_cfg is not None else EvalConfig()
    runs = load_runs(run_dirs, names)
    base = pick_baseline(runs, baseline)
    preds = {r.name: read_predictions(r, entity) for r in runs}
    paired = {r.name: paired_difference(r, base, entity, eval_cfg) for r in runs if r is not base}
    summary = summarise(runs, base, entity, preds, paired)
    summary["paired_confidence"] = float(eval_cfg.confidence)
    tables = [t for t in (overall_table(summary), groups_table(summary), ceiling_table(summary),
                          entity_table(runs)) if t is not None]
    summary["tables"] = [{"key": t.key, "title": t.title, "columns": t.columns, "rows": t.rows} for t in tables]

    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".report-", dir=parent)
    os.chmod(tmp, 0o755)  # mkdtemp's 0700 would otherwise become the report directory's mode
    try:
        figures = draw_figures(runs, base, entity, preds, tmp)
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


def load_runs(run_dirs: Sequence[str], names: Optional[Sequence[str]] = None) -> List[Run]:
    """Read run.json, metrics.json and metrics.jsonl of every run; check the predictions exist."""
    if names is not None and len(names) != len(run_dirs):
        raise ValueError(f"got {len(names)} names for {len(run_dirs)} runs; give one --name per run, in order")
    if names is not None and len(set(names)) != len(names):
        raise ValueError(f"run names must be distinct, got {list(names)}")
    runs: List[Run] = []
    for i, run_dir in enumerate(run_dirs):
        metrics_path = os.path.join(run_dir, "metrics.json")
        if not os.path.isdir(run_dir):
            raise FileNotFoundError(f"{run_dir}: no such run directory")
        if not os.path.isfile(metrics_path):
            raise FileNotFoundError(f"{run_dir}: metrics.json is missing; run mkt evaluate first")
        if not glob.glob(os.path.join(run_dir, "predictions", "part-*.parquet")):
            raise FileNotFoundError(
                f"{run_dir}: no predictions (predictions/part-*.parquet); run mkt evaluate first")
        metrics = _read_json(metrics_path)
        run_json = os.path.join(run_dir, "run.json")
        info = _read_json(run_json) if os.path.isfile(run_json) else {}
        stage = metrics.get("stage") or info.get("stage") or "?"
        ablation = metrics.get("ablation") or info.get("config", {}).get("model", {}).get("ablation") or "none"
        name = names[i] if names is not None else default_name(run_dir, ablation)
        runs.append(Run(name, run_dir, stage, ablation, info, metrics, _read_history(run_dir)))
    if names is None:  # two runs of the same directory name: number the later ones
        seen: Dict[str, int] = {}
        for r in runs:
            seen[r.name] = seen.get(r.name, 0) + 1
            if seen[r.name] > 1:
                r.name = f"{r.name} #{seen[r.name]}"
    return runs


def default_name(run_dir: str, ablation: str) -> str:
    """``mkt_no_hfa (w/o HFA)``: the directory name plus the ablation, if any."""
    base = os.path.basename(os.path.normpath(run_dir))
    return base if ablation in ("none", "") else f"{base} ({ABLATION_LABELS.get(ablation, ablation)})"


def pick_baseline(runs: Sequence[Run], baseline: Optional[str]) -> Run:
    """The run named by ``baseline`` (a directory or a name); default the first no_mem_pretrain run, else the first."""
    if baseline is None:
        return next((r for r in runs if r.ablation == "no_mem_pretrain"), runs[0])
    for r in runs:
        if baseline == r.name or os.path.realpath(baseline) == os.path.realpath(r.run_dir):
            return r
    raise ValueError(f"baseline {baseline!r} is neither a run directory nor a run name of this report; "
                     f"runs: {[r.name for r in runs]}")


def read_predictions(run: Run, entity: str) -> Optional[Dict[str, np.ndarray]]:
    """The run's prediction rows of ``entity``: ``label``, ``score`` and ``true_prob`` if present, or None."""
    labels, scores, truth = [], [], []
    for path in sorted(glob.glob(os.path.join(run.pred_dir, "part-*.parquet"))):
        names = pq.read_schema(path).names
        missing = {"entity", "label", "score"} - set(names)
        if missing:
            raise ValueError(f"{path}: predictions lack column(s) {sorted(missing)}; rerun mkt evaluate")
        cols = ["entity", "label", "score"] + (["true_prob"] if "true_prob" in names else [])
        t = pq.read_table(path, columns=cols)
        mask = t.column("entity").to_numpy(zero_copy_only=False) == entity
        labels.append(t.column("label").to_numpy()[mask])
        scores.append(t.column("score").to_numpy()[mask])
        truth.append(t.column("true_prob").to_numpy()[mask] if "true_prob" in names else None)
    y = np.concatenate(labels)
    if y.shape[0] == 0:
        return None
    out = {"label": y.astype(np.int8), "score": np.concatenate(scores).astype(np.float64)}
    if all(t is not None for t in truth):
        out["true_prob"] = np.concatenate(truth).astype(np.float64)
    return out


def paired_difference(run: Run, base: Run, entity: str, eval_cfg: Any) -> Dict[str, Any]:
    """Paired bootstrap of (run - baseline) on the same rows, or ``{"error": ...}`` saying why not."""
    if run.entity(entity) is None or base.entity(entity) is None:
        return {"error": f"n/a (no {entity} rows)"}
    try:
        from mkt_torchrec.evaluation.analysis import paired_comparison
    except ImportError:
        return {"error": "n/a (paired comparison unavailable)"}
    try:
        res = paired_comparison(base.pred_dir, run.pred_dir, entity, eval_cfg)
    except ValueError as e:
        return {"error": _NOT_SAME_ROWS, "detail": str(e)}
    out = dict(res)
    for metric in ("auc", "gauc"):  # report run - baseline whichever way the diff was taken
        a, b = res.get(f"{metric}_a"), res.get(f"{metric}_b")
        diff, ci = res.get(f"{metric}_diff"), res.get(f"{metric}_diff_ci")
        if None not in (a, b, diff) and abs((a - b) - diff) < abs((b - a) - diff):
            out[f"{metric}_diff"] = -diff
            out[f"{metric}_diff_ci"] = None if ci is None else [-ci[1], -ci[0]]
    return out


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


def summarise(runs: Sequence[Run], base: Run, entity: str, preds: Dict[str, Any],
              paired: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
    """Everything report.json holds except the tables and plots: per run, metrics.json verbatim and the
    differences to the baseline."""
    b = base.entity(entity) or {}
    bootstrap = base.metrics.get("bootstrap") or {}
    out_runs = []
    for r in runs:
        m, p = r.entity(entity), preds[r.name]
        ceiling = (m or {}).get("ceiling")
        out_runs.append({
            "name": r.name, "run_dir": r.run_dir, "stage": r.stage, "ablation": r.ablation,
            "is_baseline": r is base, "checkpoint": r.metrics.get("checkpoint"),
            "bootstrap": r.metrics.get("bootstrap"),
            "metrics": {e: r.metrics[e] for e in ENTITIES if e in r.metrics},
            "delta": None if r is base or m is None else
            {k: _difference(m.get(k), b.get(k)) for k in ("auc", "gauc")},
            "groups_delta": [] if r is base or m is None else _group_deltas(m, b),
            "paired": paired.get(r.name),
            "ceiling_gap": None if not ceiling else
            {k: _difference(m.get(k), ceiling.get(k)) for k in ("auc", "gauc")},
            "calibration": None if p is None else calibration(p["label"], p["score"]),
            "training": _training_summary(r.history),
        })
    return {
        "entity": entity, "baseline": base.name,
        "confidence": bootstrap.get("confidence"), "bootstrap_samples": bootstrap.get("samples"),
        "created": datetime.datetime.now().isoformat(timespec="seconds"), "runs": out_runs,
    }


def _difference(value: Optional[float], ref: Optional[float]) -> Optional[Dict[str, float]]:
    """``{"abs": value - ref, "rel_pct": 100 (value - ref) / ref}``, or None if either is missing."""
    if value is None or ref is None:
        return None
    return {"abs": value - ref, "rel_pct": 100.0 * (value - ref) / ref if ref else None}


def _group_deltas(m: Dict[str, Any], b: Dict[str, Any]) -> List[Dict[str, Any]]:
    base_groups = {g["name"]: g for g in b.get("groups") or []}
    out = []
    for g in m.get("groups") or []:
        ref = base_groups.get(g["name"], {})
        out.append({"name": g["name"], **{k: _difference(g.get(k), ref.get(k)) for k in ("auc", "gauc")}})
    return out


def calibration(labels: np.ndarray, scores: np.ndarray, bins: int = CALIBRATION_BINS) -> Dict[str, Any]:
    """Reliability diagram data: equal-count score bins with their mean score and click rate.

    Equal-count bins, because click-through scores crowd near 0 and equal-width bins would leave most empty.
    ``ece`` is the row-weighted mean |mean score - click rate| over bins.
    """
    order = np.argsort(scores, kind="stable")
    chunks = np.array_split(order, min(bins, len(order)))
    out = []
    for idx in chunks:
        s, y = scores[idx], labels[idx]
        out.append({"rows": int(len(idx)), "score_lo": float(s.min()), "score_hi": float(s.max()),
                    "mean_score": float(s.mean()), "click_rate": float(y.mean())})
    ece = sum(c["rows"] * abs(c["mean_score"] - c["click_rate"]) for c in out) / len(scores)
    return {"bins": out, "ece": float(ece), "mean_score": float(scores.mean()), "click_rate": float(labels.mean())}


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
    """Paper Tables 2 / 4: AUC and GAUC with CIs and the difference to the baseline."""
    entity = summary["entity"]
    level, paired = _level(summary.get("confidence")), _level(summary.get("paired_confidence"))
    columns = ["Run", "Stage", "Rows", "Users", "AUC", f"AUC {level} CI", "Δ AUC vs baseline",
               f"Δ AUC paired {paired} CI", "GAUC", f"GAUC {level} CI", "Δ GAUC vs baseline",
               f"Δ GAUC paired {paired} CI"]
    rows, bold = [], set()
    for i, r in enumerate(summary["runs"]):
        m = r["metrics"].get(entity)
        if m is None:
            rows.append([r["name"], r["stage"], f"no {entity} rows"] + ["-"] * (len(columns) - 3))
            continue
        if r["is_baseline"]:
            bold.add(i)
        row = [r["name"], r["stage"], _int(m.get("rows")), _int(m.get("users"))]
        for metric in ("auc", "gauc"):
            row += [_num(m.get(metric)), _ci(m.get(f"{metric}_ci")),
                    "baseline" if r["is_baseline"] else _delta((r["delta"] or {}).get(metric)),
                    "-" if r["is_baseline"] else _paired_ci(r["paired"], metric)]
        rows.append(row)
    has_ci = any((r["metrics"].get(entity) or {}).get("auc_ci") for r in summary["runs"])
    samples = summary.get("bootstrap_samples")
    if has_ci:
        ci_note = ("CIs of AUC / GAUC are from metrics.json (user-level bootstrap"
                   + (f", {samples} samples). " if samples else "). "))
    else:
        ci_note = "metrics.json holds no CIs (rerun mkt evaluate with eval.bootstrap_samples > 0). "
    note = (f"Δ = run − baseline ({summary['baseline']}), absolute and relative to the baseline's value. " + ci_note
            + "Paired CIs bootstrap the difference itself on the rows both runs scored; * marks an interval "
            "that excludes 0.")
    return Table("overall", f"Overall performance on the {entity} entity", columns, rows, note, bold,
                 {6, 7, 10, 11})


def groups_table(summary: Dict[str, Any]) -> Optional[Table]:
    """Paper Table 3: AUC and GAUC per user-activity group, improvement over the baseline."""
    entity = summary["entity"]
    order: List[str] = []
    by_run: Dict[str, Dict[str, Dict[str, Any]]] = {}
    for r in summary["runs"]:
        groups = (r["metrics"].get(entity) or {}).get("groups") or []
        by_run[r["name"]] = {g["name"]: g for g in groups}
        order += [g["name"] for g in groups if g["name"] not in order]
    if not order:
        return None
    columns = ["User behaviours", "Run", "Users", "Rows", "AUC", "AUC improv.", "GAUC", "GAUC improv."]
    rows, bold = [], set()
    for name in order:
        first = True
        for r in summary["runs"]:
            g = by_run[r["name"]].get(name)
            if g is None:
                continue
            d = next((x for x in r["groups_delta"] if x["name"] == name), {})
            if r["is_baseline"]:
                bold.add(len(rows))
            rows.append([name if first else "", r["name"], _int(g.get("users")), _int(g.get("rows")),
                         _num(g.get("auc")), "-" if r["is_baseline"] else _rel(d.get("auc")),
                         _num(g.get("gauc")), "-" if r["is_baseline"] else _rel(d.get("gauc"))])
            first = False
    note = (f"Users grouped by their number of past behaviours; improvement relative to the baseline "
            f"({summary['baseline']}) in the same group.")
    return Table("groups", f"Performance by user group ({entity} entity)", columns, rows, note, bold, {5, 7})


def ceiling_table(summary: Dict[str, Any]) -> Optional[Table]:
    """Best achievable AUC / GAUC (scoring with the true probability) and each run's gap to it."""
    entity = summary["entity"]
    ceilings = [(r, (r["metrics"].get(entity) or {}).get("ceiling")) for r in summary["runs"]]
    ceilings = [(r, c) for r, c in ceilings if c]
    if not ceilings:
        return None
    ref = next((c for r, c in ceilings if r["is_baseline"]), ceilings[0][1])
    columns = ["Run", "AUC", "AUC gap to best", "GAUC", "GAUC gap to best"]
    rows = [["best achievable (true probability)", _num(ref.get("auc")), "-", _num(ref.get("gauc")), "-"]]
    for r, _ in ceilings:
        m, gap = r["metrics"][entity], r["ceiling_gap"] or {}
        rows.append([r["name"], _num(m.get("auc")), _delta(gap.get("auc")),
                     _num(m.get("gauc")), _delta(gap.get("gauc"))])
    note = "Synthetic data carries each row's true click probability; scoring with it gives the best AUC / GAUC."
    if any(c != ref for _, c in ceilings):
        note += " The runs were scored on different rows, so each gap is to the run's own ceiling."
    return Table("ceiling", f"Gap to the best achievable ({entity} entity)", columns, rows, note, {0})


def entity_table(runs: Sequence[Run]) -> Optional[Table]:
    """Stage-1 (MEM) runs score both entities: AUC / GAUC of each."""
    mem = [r for r in runs if r.stage == "mem"]
    if not mem:
        return None
    columns = ["Run"] + [f"{e} {k}" for e in ENTITIES for k in ("rows", "AUC", "GAUC")]
    rows = []
    for r in mem:
        row = [r.name]
        for e in ENTITIES:
            m = r.entity(e) or {}
            row += [_int(m.get("rows")), _num_ci(m.get("auc"), m.get("auc_ci")),
                    _num_ci(m.get("gauc"), m.get("gauc_ci"))]
        rows.append(row)
    return Table("entities", "Stage-1 (MEM) runs on both entities", columns, rows,
                 "The multi-entity model is trained on, and scores, rows of both entities.")


def _level(confidence: Optional[float]) -> str:
    return f"{100 * confidence:g}%" if confidence else "95%"


def _num(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.4f}"


def _int(v: Optional[int]) -> str:
    return "-" if v is None else f"{v:,}"


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


def _paired_ci(p: Optional[Dict[str, Any]], metric: str) -> str:
    if not p:
        return "-"
    if "error" in p:
        return p["error"]
    ci = p.get(f"{metric}_diff_ci")
    if not ci:
        return "n/a (no bootstrap)"
    return f"[{ci[0]:+.4f}, {ci[1]:+.4f}]" + (" *" if ci[0] > 0 or ci[1] < 0 else "")


# --------------------------------------------------------------------------------------------------------
# Figures (matplotlib's Agg canvas directly: no pyplot, no global backend state)
# --------------------------------------------------------------------------------------------------------


def draw_figures(runs: Sequence[Run], base: Run, entity: str, preds: Dict[str, Any],
                 out: str) -> Dict[str, Dict[str, str]]:
    """Draw every figure there is data for into ``out``; ``{key: {"file", "title", "caption"}}``.

    Each ``_draw_*`` returns ``(figure, title, caption)``, or None when no run has the data it needs.
    """
    colors = {r.name: f"C{i % 10}" for i, r in enumerate(runs)}
    figures = {}
    for key, draw in (("roc", _draw_roc), ("groups", _draw_groups), ("calibration", _draw_calibration),
                      ("loss", _draw_loss)):
        fig = draw(runs, base, entity, preds, colors)
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


def _draw_roc(runs, base, entity, preds, colors):
    from sklearn.metrics import roc_curve

    fig, (ax,) = _figure()
    drawn = False
    for r in runs:
        p = preds[r.name]
        if p is None or p["label"].min() == p["label"].max():
            continue
        fpr, tpr = _thin(*roc_curve(p["label"], p["score"])[:2])
        auc = (r.entity(entity) or {}).get("auc")
        label = r.name + ("" if auc is None else f" (AUC {auc:.4f})") + (" [baseline]" if r is base else "")
        ax.plot(fpr, tpr, color=colors[r.name], lw=1.6, label=label)
        drawn = True
    if not drawn:
        return None
    caption = ""
    truth = [r for r in [base, *runs] if preds[r.name] is not None and "true_prob" in preds[r.name]]
    if truth:  # synthetic data: the best achievable curve (the baseline's rows if it has them)
        p = preds[truth[0].name]
        fpr, tpr = _thin(*roc_curve(p["label"], p["true_prob"])[:2])
        ceiling = ((truth[0].entity(entity) or {}).get("ceiling") or {}).get("auc")
        ax.plot(fpr, tpr, color="black", ls="--", lw=1.2,
                label="true probability" + ("" if ceiling is None else f" (AUC {ceiling:.4f})"))
        caption = "The dashed black curve scores with the true click probability (the best achievable)."
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


def _draw_groups(runs, base, entity, preds, colors):
    groups = {r.name: {g["name"]: g for g in (r.entity(entity) or {}).get("groups") or []} for r in runs}
    order: List[str] = []
    for r in runs:
        order += [n for n in groups[r.name] if n not in order]
    shown = [r for r in runs if groups[r.name]]
    if not order or not shown:
        return None
    fig, (ax,) = _figure(max(6.4, 1.2 + 0.5 * len(order) * len(shown)), 4.4)
    width = 0.8 / len(shown)
    values = []
    for j, r in enumerate(shown):
        xs, ys = [], []
        for i, name in enumerate(order):
            v = groups[r.name].get(name, {}).get("gauc")
            if v is not None:
                xs.append(i - 0.4 + width * (j + 0.5))
                ys.append(v)
        bars = ax.bar(xs, ys, width * 0.92, color=colors[r.name], label=r.name + (" [baseline]" if r is base else ""))
        ax.bar_label(bars, fmt="%.4f", fontsize=7, rotation=90 if len(shown) > 2 else 0, padding=2)
        values += ys
    lo, hi = min(values), max(values)
    pad = max(hi - lo, 0.01)
    ax.set_ylim(max(0.0, lo - pad), min(1.0, hi + 0.8 * pad))  # zoomed: the differences are small
    first = groups[shown[0].name]
    ax.set_xticks(range(len(order)),
                  [f"{n}\n({first[n]['users']:,} users)" if n in first and first[n].get("users") is not None else n
                   for n in order])
    ax.set(xlabel="user behaviours", ylabel="GAUC", title=f"GAUC by user group, {entity} entity")
    ax.grid(axis="y", alpha=0.3)
    fig.legend(loc="outside lower center", ncols=min(3, len(shown)), fontsize=8)  # clear of the bar labels
    return fig, f"GAUC by user group ({entity} entity)", "The y axis does not start at 0."


def _draw_calibration(runs, base, entity, preds, colors):
    fig, (ax,) = _figure()
    top = 0.0
    for r in runs:
        p = preds[r.name]
        if p is None:
            continue
        cal = calibration(p["label"], p["score"])
        x = [b["mean_score"] for b in cal["bins"]]
        y = [b["click_rate"] for b in cal["bins"]]
        ax.plot(x, y, marker="o", ms=4, color=colors[r.name], label=f"{r.name} (ECE {cal['ece']:.4f})")
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
            "Points on the diagonal are calibrated; ECE is the row-weighted mean |score − click rate|.")


def _draw_loss(runs, base, entity, preds, colors):
    logged = [r for r in runs if any(h.get("loss") is not None for h in r.history)]
    if not logged:
        return None
    with_pdl = any(h.get("pdl") for r in logged for h in r.history)
    panels = [("loss", "training loss")] + ([("bce", "click BCE (without the PDL term)")] if with_pdl else [])
    fig, axes = _figure(6.4 * len(panels), 4.2, len(panels))
    for ax, (key, title) in zip(axes, panels):
        for r in logged:
            pts = [(h["step"], h[key]) for h in r.history if h.get(key) is not None and h.get("step") is not None]
            if not pts:
                continue
            x, y = np.array(pts, dtype=np.float64).T
            label = f"{r.name} [{r.stage}]"
            if len(y) > 50:  # noisy: faint raw values, bold moving average
                k = max(2, len(y) // 20)
                ax.plot(x, y, color=colors[r.name], alpha=0.25, lw=0.8)
                smooth = np.convolve(y, np.ones(k) / k, mode="valid")  # (n - k + 1,) moving average
                ax.plot(x[k - 1:], smooth, color=colors[r.name], lw=1.6, label=label)
            else:
                ax.plot(x, y, color=colors[r.name], lw=1.6, marker="." if len(y) < 20 else None, label=label)
        ax.set(xlabel="step", ylabel=key, title=title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return fig, "Training loss (metrics.jsonl)", "MEM and TEM runs log their own steps; long logs are smoothed."


# --------------------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------------------


def _header_lines(summary: Dict[str, Any]) -> List[str]:
    return [f"Entity: {summary['entity']}. Baseline: {summary['baseline']}. Runs: {len(summary['runs'])}. "
            f"Created {summary['created']}."]


def _runs_table(summary: Dict[str, Any]) -> Table:
    rows = []
    for r in summary["runs"]:
        t = r["training"] or {}
        rows.append([r["name"], r["run_dir"], r["stage"], r["ablation"], r.get("checkpoint") or "-",
                     _int(t.get("last_step")), _num(t.get("last_loss"))])
    return Table("runs", "Runs", ["Run", "Directory", "Stage", "Ablation", "Checkpoint", "Last logged step",
                                  "Last loss"], rows)


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

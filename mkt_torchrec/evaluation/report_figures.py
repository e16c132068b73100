"""The figures of a report, drawn on matplotlib's Agg canvas directly (no pyplot, no global backend state): ROC
curves and a reliability diagram from a bounded sample of each model's first run, GAUC by user group, and the
training loss curves of ``metrics.jsonl``.
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from mkt_torchrec.evaluation.report_runs import Model
from mkt_torchrec.evaluation.report_tables import is_too_few

__all__ = ["PLOT_FILES", "CALIBRATION_BINS", "draw_figures", "sample_calibration"]

PLOT_FILES = ("roc.png", "groups.png", "calibration.png", "loss.png")
CALIBRATION_BINS = 10  # equal-count bins of the plotted sample


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
            if g is not None and g["gauc"] is not None and not is_too_few(g["gauc_users"], min_users):
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
        return f"{n}\n({g['gauc_users']:,} users" + (", too few)" if is_too_few(g["gauc_users"], min_users) else ")")

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

"""Compare evaluated models side by side: ``report.html``, ``report.md``, ``report.json`` and PNG plots.

    write_report({"MLP": ["runs/mlp-s0", "runs/mlp-s1"], "MKT": ["runs/mkt-s0", "runs/mkt-s1"]},
                 "reports/table2", baseline="MLP")
    write_report(["runs/finetune", "runs/mkt", "runs/mkt_no_hfa"], "reports/ablations")  # one run per model

A *model* is a display name with one or more evaluated runs, one per training seed. The tables follow the MKT
paper, for one entity (``target`` by default):

1. **Table 2 layout**: one row per model, grouped by family - single-domain, joint training, pre-training &
   fine-tuning, MKT and its ablations - with AUC, GAUC (with the number of users it rests on), log loss, ECE and
   mean score against click rate as mean ± standard deviation over the model's seeds; then, side by side, the
   improvement over a baseline model in AUC, GAUC and log loss, each with its interval (below), so that no
   claim on one metric hides a loss on another; then the model's flags (below);
2. AUC and GAUC per user-activity group with the improvement over the baseline (paper Table 3), starred and
   coloured where the group's seed-level interval excludes 0;
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

Intervals
---------
Runs of a model are paired with the baseline's runs of the same training seed (``train.seed`` in run.json)
when both models record distinct seeds and share some; otherwise run ``i`` with run ``i`` in the order given.
A pair is used only if both runs scored the same rows of the entity in the same order (equal row counts and
``(user_id, label)`` sequences, compared by a digest taken while streaming the predictions; runs not streamed,
with ``eval_cfg.bootstrap_samples = 0``, by their metrics.json ``rows``, ``users`` and ``positives``); pairs
that are not are listed in report.json (``left_out``) and left out
(:func:`~mkt_torchrec.evaluation.report_runs.usable_pairs`).

* **Seed level** (shown with ``n >= 2`` usable pairs): the per-seed paired differences
  ``d_k = M(model, seed k) - M(baseline, seed k)`` of the exact AUC, GAUC and log loss in each run's
  metrics.json, and the Student-t interval ``mean(d) ± t_{n-1, (1+c)/2} · sd(d) / sqrt(n)`` at
  ``c = eval_cfg.confidence`` (:func:`~mkt_torchrec.evaluation.seed_intervals.seed_paired_difference`). The
  seed is the unit: the interval includes the seed-to-seed (training) variance, which is often as large as the
  effects compared, while test-set effects shared by both runs cancel. Only this interval marks a difference
  as excluding 0 (``*``, and the colour of the Δ and interval cells: green better, red worse; for log loss
  lower is better). The same intervals, for AUC and GAUC, mark the activity-group table.
* **User level** (kept in report.json as ``user_level`` for every model; shown only with a single usable
  pair): for each pair and each user resample ``b`` (Poisson(1) counts hashed from ``(eval_cfg.seed, b, user
  id)``, the same for every run) the replicate difference ``M(run, b) - M(baseline run, b)``, the pooled
  replicate the mean over the pairs, the interval its percentile interval
  (:func:`~mkt_torchrec.evaluation.paired.pooled_paired_difference`). It measures how much the mean paired
  difference would move with another sample of test users, not with another training seed; a null difference
  between two models whose seeds vary more than the test users would be "excluded" most of the time
  (tests/evaluation/test_seed_intervals.py). So with one seed its cells read ``[lo, hi] (test-user sampling
  only, 1 seed)``: "test-user sampling only (1 seed): does not include training variance", never starred or
  coloured; the log loss has no such interval (``n/a (1 seed)``).

report.json holds per model ``seed_level`` (per metric ``diffs``, ``mean``, ``sd``, ``t``, ``ci``,
``excludes_zero``, and per activity group), ``user_level``, ``interval`` (which one the tables show:
``seed_level``, ``user_level`` or None) and ``significant`` (``{metric: excludes 0}``, seed level only).

Flags
-----
A model is flagged (a ``⚠`` in its row's Flags cell, a note under the table and a list under the report's
header; report.json ``flags`` per model with the seeds and runs it applies to, and per run) when one of its
runs has an AUC below 0.5 (ranks worse than chance) or a log loss above that of the constant base-rate
predictor on the same rows, ``-(p ln p + (1 - p) ln(1 - p))`` with ``p`` the rows' click rate
(:mod:`~mkt_torchrec.evaluation.report_flags`).

Memory
------
Nothing holds every prediction. Table numbers come from each run's ``metrics.json`` (merged exact statistics
written by ``mkt evaluate``). Each run's predictions are streamed once, ``SpillLimits.batch_rows`` rows at a
time, for the row digest and a seeded uniform sample of at most ``eval_cfg.plot_sample_rows`` rows (bottom-k
of a hash of the row's position, so runs on the same rows sample the same rows) that the ROC and calibration
plots are drawn from. The paired bootstrap computes each run's replicates once
(:func:`~mkt_torchrec.evaluation.paired.run_replicates`: spilled by user beyond ``limits.threshold_rows``
rows, ``O(users)`` arrays, ``O(samples)`` kept per run). Peak memory is therefore bounded by the spill limits,
the sample size and ``O(users)``, whatever the number of rows.

The report is built in a temporary directory next to ``out_dir`` and moved into place at the end, so a
failed report leaves no half-written files.

This module writes the report; the runs and their pairing are in :mod:`~mkt_torchrec.evaluation.report_runs`,
the seed-level intervals in :mod:`~mkt_torchrec.evaluation.seed_intervals`, the flags in
:mod:`~mkt_torchrec.evaluation.report_flags`, the numbers and tables in
:mod:`~mkt_torchrec.evaluation.report_tables`, the figures in
:mod:`~mkt_torchrec.evaluation.report_figures`, and the Markdown and HTML rendering (jinja2 templates in
``templates/``) in :mod:`~mkt_torchrec.evaluation.report_render`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any, Dict, Mapping, Optional, Sequence

import numpy as np

from mkt_torchrec import storage
from mkt_torchrec.evaluation.paired import RunReplicates
from mkt_torchrec.evaluation.predictions import ENTITIES
from mkt_torchrec.evaluation.report_figures import PLOT_FILES, draw_figures
from mkt_torchrec.evaluation.report_render import render_html, render_markdown
from mkt_torchrec.evaluation.report_runs import (
    FAMILIES,
    RunsArg,
    Scan,
    load_models,
    paired_difference,
    pick_baseline,
    scan_predictions,
    seed_difference,
    usable_pairs,
)
from mkt_torchrec.evaluation.report_tables import (
    ceiling_table,
    entity_table,
    groups_table,
    overall_table,
    per_run_table,
    summarise,
)
from mkt_torchrec.evaluation.streaming import SpillLimits

__all__ = ["write_report"]


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
        eval_cfg: :class:`mkt_torchrec.config.EvalConfig`: ``confidence`` of the seed-level and user-level
            intervals, bootstrap samples / seed of the user-level one, ``min_gauc_users``, ``plot_sample_rows``
            (default: defaults).
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
    pairings = {m.name: usable_pairs(m, base, entity, scans) for m in models if m is not base}
    seed_level = {name: seed_difference(p, entity, eval_cfg) for name, p in pairings.items()}
    cache: Dict[str, RunReplicates] = {}
    user_level = {name: paired_difference(p, entity, eval_cfg, cache, spill_dir, limits)
                  for name, p in pairings.items()}
    del cache
    summary = summarise(models, base, entity, user_level, seed_level, eval_cfg)
    tables = [t for t in (overall_table(summary), groups_table(summary), ceiling_table(summary),
                          entity_table(models), per_run_table(summary)) if t is not None]
    summary["tables"] = [{"key": t.key, "title": t.title, "columns": t.columns, "rows": t.rows} for t in tables]

    local = storage.is_local(out_dir)
    if local:
        parent = os.path.dirname(os.path.abspath(out_dir))
        os.makedirs(parent, exist_ok=True)
    else:
        storage.check_reachable(out_dir)
    tmp = tempfile.mkdtemp(prefix=".report-", dir=parent if local else None)
    os.chmod(tmp, 0o755)  # mkdtemp's 0700 would otherwise become the report directory's mode
    try:
        samples = {m.name: scans[id(m.runs[0])].sample for m in models}
        figures = draw_figures(models, base, entity, samples, tmp, summary)
        summary["plots"] = {key: fig["file"] for key, fig in figures.items()}
        _write_text(os.path.join(tmp, "report.json"), json.dumps(summary, indent=2, default=_json_default))
        _write_text(os.path.join(tmp, "report.md"), render_markdown(summary, tables, figures))
        _write_text(os.path.join(tmp, "report.html"), render_html(summary, tables, figures, tmp))
        files = sorted(os.listdir(tmp))
        _publish(tmp, out_dir) if local else _upload(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {**summary, "out_dir": out_dir, "files": files}


# --------------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------------


def _write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` as UTF-8."""
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


def _upload(tmp: str, out_dir: str) -> None:
    """Publish the finished report to an object store (``s3://...``): file by file, each one object write, report.html
    last, dropping plots of an earlier report that this one has not drawn (as :func:`_publish` does locally). A
    prefix holding files other than a report's is refused."""
    new = set(os.listdir(tmp))
    ours = set(PLOT_FILES) | {"report.html", "report.md", "report.json"}
    present = set(storage.listdir(out_dir)) if storage.exists(out_dir) else set()
    foreign = sorted(present - ours)
    if foreign:
        raise FileExistsError(f"{storage.display(out_dir)}: holds files that are not a report's ({foreign[:3]}); "
                              "refusing to write a report there: choose another --out")
    for name in sorted(new, key=lambda n: (n == "report.html", n)):
        with open(os.path.join(tmp, name), "rb") as f:
            storage.write_bytes_atomic(storage.join(out_dir, name), f.read())
    storage.remove_files(out_dir, sorted((set(PLOT_FILES) & present) - new))


def _json_default(o: Any) -> Any:
    """report.json's encoder for numpy scalars and sets."""
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, set):
        return sorted(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")

"""Offline evaluation: exact AUC and impression-weighted GAUC, bootstrap intervals, metrics of prediction files
(in one process or across ranks) and comparison reports.

Modules, by concern:

* ``metrics``: exact AUC / GAUC (paper Eq. 14) and their mergeable per-user statistics;
  ``exact``: exact sums of float64 values and Mann-Whitney statistics of score ranges.
* ``bootstrap``: user-level bootstrap replicates and intervals; ``paired``: paired comparisons of runs (user
  level); ``seed_intervals``: seed-level Student-t intervals of paired differences over training seeds.
* ``predictions``: the prediction files, their validation and streams of one entity's rows.
* ``streaming``: ``compute_metrics`` in one process, in bounded memory (spilling to disk), built on
  ``entity_sums`` (exact per-user sums, log loss, calibration, the metrics.json entry) and ``score_buckets``
  (rows in score order and the exact AUC pass).
* ``distributed_metrics``: the same metrics computed by every rank together, bit-identical; its plan
  (``distributed_plan``), exchange files (``distributed_exchange``) and per-rank work (``distributed_scan``).
* ``report``: ``write_report``, with ``report_runs``, ``report_flags``, ``report_tables``, ``report_figures``
  and ``report_render`` (jinja2 templates in ``templates/``); ``report_cli``: ``mkt report``'s arguments.
"""

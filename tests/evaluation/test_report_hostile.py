"""mkt report on careless inputs (issue 27): runs scored on other rows, predictions with part files deleted or added.

Each case must end in a message that says what differs (row counts, users, the missing file) and what to do, never
a bare ``n/a (not the same rows)`` or a comparison on the rows that happen to be left.
"""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mkt_torchrec.config import EvalConfig
from mkt_torchrec.evaluation.report import write_report

from tests.evaluation.test_report import make_run, test_rows

CFG = EvalConfig(bootstrap_samples=20, min_gauc_users=50, plot_sample_rows=200)


@pytest.fixture
def no_figures(monkeypatch):
    monkeypatch.setattr("mkt_torchrec.evaluation.report.draw_figures", lambda *args, **kw: {})


def _delta_cells(summary: dict, model: str) -> set:
    table = summary["tables"][0]
    row = next(r for r in table["rows"] if r[1] == model)
    return {row[table["columns"].index(f"Δ {k} 95% CI")] for k in ("AUC", "GAUC", "LogLoss")}


def test_runs_scored_on_other_data_say_what_differs_and_what_to_do(tmp_path, no_figures):
    base = make_run(tmp_path, "base", noise=1.0)
    other = make_run(tmp_path, "other", noise=0.4, rows=test_rows(250, seed=5))  # another test split
    s = write_report({"B": [base], "X": [other]}, str(tmp_path / "r"), eval_cfg=CFG)
    (cell,) = _delta_cells(s, "X")
    m = {}
    for r in (base, other):
        with open(os.path.join(r, "metrics.json")) as f:
            m[r] = json.load(f)["target"]
    assert cell.startswith("n/a (not on the same rows: ")
    for r, name in ((base, "base"), (other, "other")):  # each run's rows, users and clicks, by name
        assert f"{name} " in cell and f"{m[r]['rows']} target rows of {m[r]['users']} users" in cell
    assert "evaluate both runs on the same --data" in cell


def test_as_many_rows_but_other_ones_names_the_first_row_that_differs(tmp_path, no_figures):
    rows = test_rows(300, seed=0)
    shuffled = rows.assign(label=1.0 - rows.label)  # the same users and row count, other labels
    base = make_run(tmp_path, "base", noise=1.0, rows=rows)
    other = make_run(tmp_path, "flipped", noise=0.4, rows=shuffled)
    s = write_report({"B": [base], "X": [other]}, str(tmp_path / "r"), eval_cfg=CFG)
    (cell,) = _delta_cells(s, "X")
    assert "as many rows but other ones" in cell and "row 0" in cell and "(user 3, label" in cell
    assert "evaluate both runs on the same --data" in cell


def test_deleted_part_file_is_named_not_compared_on_the_rest(tmp_path, no_figures, capsys):
    from mkt_torchrec.cli import main

    base = make_run(tmp_path, "base", noise=1.0)
    run = make_run(tmp_path, "half", noise=0.4)
    os.remove(os.path.join(run, "predictions", "part-00001.parquet"))  # metrics.json: world_size 2
    with pytest.raises(FileNotFoundError, match=r"predictions/part-00001\.parquet: missing .*world_size=2.*"
                                                r"run mkt evaluate on the run again"):
        write_report({"B": [base], "X": [run]}, str(tmp_path / "r"), eval_cfg=CFG)
    assert main(["report", base, run, "--out", str(tmp_path / "r2")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "part-00001.parquet: missing" in err[0] and not os.path.exists(tmp_path / "r2")


def test_added_part_file_or_changed_rows_are_refused(tmp_path, no_figures):
    base = make_run(tmp_path, "base", noise=1.0)
    run = make_run(tmp_path, "extra", noise=0.4)
    pred = os.path.join(run, "predictions")
    extra = pq.read_table(os.path.join(pred, "part-00000.parquet"))
    pq.write_table(extra, os.path.join(pred, "part-00002.parquet"))  # a third rank file in a world of 2
    with pytest.raises(ValueError, match=r"part-00002\.parquet: not written by the mkt evaluate of metrics\.json"):
        write_report({"B": [base], "X": [run]}, str(tmp_path / "r"), eval_cfg=CFG)
    os.remove(os.path.join(pred, "part-00002.parquet"))
    pq.write_table(pa.Table.from_batches(extra.to_batches()[:1]).slice(0, 10), os.path.join(pred, "part-00000.parquet"))
    with pytest.raises(ValueError, match=r"the part files hold \d+ rows but metrics\.json counts \d+"):
        write_report({"B": [base], "X": [run]}, str(tmp_path / "r"), eval_cfg=CFG)

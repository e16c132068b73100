"""mkt report: fake evaluated run directories in, a self-contained comparison report out."""

from __future__ import annotations

import json
import os
import re
import sys
import types

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from mkt_torchrec.evaluation.report import write_report

BOUNDS = (10, 30)


def _gauc(users: np.ndarray, labels: np.ndarray, scores: np.ndarray) -> float:
    """Eq. 14 by brute force: impression-weighted per-user AUC (all positive-negative pairs, ties half) over
    users with both classes."""
    num = den = 0.0
    for u in np.unique(users):
        y, s = labels[users == u], scores[users == u]
        pos, neg = s[y == 1][:, None], s[y == 0][None, :]
        if pos.size and neg.size:
            num += len(y) * ((pos > neg).mean() + 0.5 * (pos == neg).mean())
            den += len(y)
    return num / den


def _entity_metrics(df: pd.DataFrame, with_extras: bool) -> dict:
    y, s, u = df.label.to_numpy(), df.score.to_numpy(), df.user_id.to_numpy()
    auc, gauc = roc_auc_score(y, s), _gauc(u, y, s)
    m = {"rows": len(df), "users": int(df.user_id.nunique()), "positives": int(y.sum()), "auc": auc, "gauc": gauc,
         "mean_user_auc": gauc, "users_evaluated": 0, "users_skipped_single_class": 0}
    if not with_extras:  # metrics.json of before the CI / group / ceiling keys
        return m
    groups = []
    for lo, hi, name in ((0, BOUNDS[0], "0-10"), (BOUNDS[0], BOUNDS[1], "10-30"), (BOUNDS[1], None, ">30")):
        g = df[(df.activity >= lo) & ((df.activity < hi) if hi else True)]
        groups.append({"name": name, "lo": lo, "hi": hi, "rows": len(g), "users": int(g.user_id.nunique()),
                       "auc": roc_auc_score(g.label, g.score), "gauc": _gauc(g.user_id.to_numpy(), g.label.to_numpy(),
                                                                              g.score.to_numpy())})
    m.update(auc_ci=[auc - 0.011, auc + 0.012], gauc_ci=[gauc - 0.021, gauc + 0.022], groups=groups,
             ceiling={"auc": roc_auc_score(y, df.true_prob), "gauc": _gauc(u, y, df.true_prob.to_numpy())})
    return m


def _rows(seed: int = 0, users: int = 150) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    n = rng.integers(4, 16, users)
    user = np.repeat(np.arange(users), n)
    activity = np.repeat(rng.integers(0, 60, users), n)
    logit = rng.normal(-0.5, 1.0, users)[user] + rng.normal(0, 1.2, len(user))
    p = 1 / (1 + np.exp(-logit))
    return pd.DataFrame({"user_id": user.astype(np.int64), "logit": logit,
                         "label": (rng.random(len(user)) < p).astype(np.float32),
                         "activity": activity.astype(np.int64), "true_prob": p.astype(np.float32)})


def make_run(root, name: str, stage: str, ablation: str, noise: float, with_extras: bool = True, seed: int = 0) -> str:
    """A run directory as mkt train + mkt evaluate leave it; scores are the true logit plus noise."""
    run_dir = os.path.join(root, name)
    os.makedirs(os.path.join(run_dir, "predictions"))
    base = _rows(seed)
    rng = np.random.default_rng(int.from_bytes(name.encode(), "little") % 2**32)
    parts = {"target": base}
    if stage == "mem":
        parts["source"] = _rows(seed + 1)
    frames = []
    for entity, df in parts.items():
        noisy = df.logit + rng.normal(0, noise, len(df))
        df = df.assign(entity=entity, score=(1 / (1 + np.exp(-noisy))).astype(np.float32))
        frames.append(df)
    preds = pd.concat(frames, ignore_index=True)[["user_id", "entity", "label", "score", "activity", "true_prob"]]
    half = len(preds) // 2
    preds.iloc[:half].to_parquet(os.path.join(run_dir, "predictions", "part-00000.parquet"), index=False)
    preds.iloc[half:].to_parquet(os.path.join(run_dir, "predictions", "part-00001.parquet"), index=False)
    metrics = {e: _entity_metrics(df, with_extras) for e, df in zip(parts, frames)}
    metrics.update(bootstrap={"samples": 200, "confidence": 0.95, "seed": 0}, run_dir=run_dir,
                   checkpoint="step-00000300", stage=stage, ablation=ablation)
    with open(os.path.join(run_dir, "metrics.json"), "w") as f:
        json.dump(metrics, f)
    with open(os.path.join(run_dir, "run.json"), "w") as f:
        json.dump({"stage": stage, "config": {"model": {"ablation": ablation}}, "data": "data", "mem_run": None,
                   "world_size": 1, "created": "2025-01-01T00:00:00"}, f)
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
        for step in range(10, 310, 10):
            bce = 0.7 * np.exp(-step / 150) + 0.45 + noise / 100
            f.write(json.dumps({"step": step, "epoch": 0, "loss": bce + (0.05 if stage == "mem" else 0.0), "bce": bce,
                                "pdl": 0.05 if stage == "mem" else 0.0, "rows_per_s": 1e4, "dense_lr": 1e-3,
                                "embedding_lr": 1e-2, "time": float(step)}) + "\n")
    return run_dir


ANALYSIS = "mkt_torchrec.evaluation.analysis"


@pytest.fixture(autouse=True)
def no_paired_comparison(monkeypatch):
    """Tests see "paired comparison unavailable" unless they install one (None in sys.modules: ImportError)."""
    monkeypatch.setitem(sys.modules, ANALYSIS, None)


@pytest.fixture
def no_figures(monkeypatch):
    """Tables-only reports: drawing the PNGs takes ~2 s per report and one test checks them."""
    monkeypatch.setattr("mkt_torchrec.evaluation.report.draw_figures", lambda *args: {})


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("runs"))
    return [make_run(root, "mkt", "tem", "none", 0.4), make_run(root, "finetune", "tem", "no_mem_pretrain", 1.5),
            make_run(root, "mem", "mem", "none", 0.8)]


def _metrics(run_dir: str) -> dict:
    with open(os.path.join(run_dir, "metrics.json")) as f:
        return json.load(f)


def _md_rows(md: str, table: int) -> dict:
    """Rows of Markdown table ``table`` (1-based), keyed by their first non-empty cells."""
    section = md.split(f"## Table {table}:")[1].split("\n## ")[0]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split(" | ")]
    rows = [[c.strip() for c in line.strip()[1:-1].split(" | ")] for line in lines[2:]]
    return {"header": header, "rows": rows}


def _cell(table: dict, row: list, column: str) -> str:
    return row[table["header"].index(column)]


def test_report_files_tables_and_numbers(runs, tmp_path):
    out = str(tmp_path / "report")
    summary = write_report(runs, out)
    for name in ("report.html", "report.md", "report.json", "roc.png", "groups.png", "calibration.png", "loss.png"):
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".report-")]  # the staging directory is gone

    html = open(os.path.join(out, "report.html"), encoding="utf-8").read()
    assert html.count("data:image/png;base64,") == 4
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//|[^"'#d])""", html)  # nothing fetched from outside
    assert "http" not in html and "<link" not in html and "<script" not in html

    # The default baseline is the no_mem_pretrain run, although it is not the first.
    assert summary["baseline"] == "finetune (w/o MEM pretrain)"
    base = _metrics(runs[1])["target"]
    md = open(os.path.join(out, "report.md"), encoding="utf-8").read()
    overall = _md_rows(md, 1)
    by_name = {row[0]: row for row in overall["rows"]}
    assert set(by_name) == {"mkt", "finetune (w/o MEM pretrain)", "mem"}
    for run_dir, name in zip(runs, ("mkt", "finetune (w/o MEM pretrain)", "mem")):
        m = _metrics(run_dir)["target"]
        row = by_name[name]
        assert _cell(overall, row, "AUC") == f"{m['auc']:.4f}"
        assert _cell(overall, row, "GAUC") == f"{m['gauc']:.4f}"
        assert _cell(overall, row, "AUC 95% CI") == f"[{m['auc_ci'][0]:.4f}, {m['auc_ci'][1]:.4f}]"
        assert _cell(overall, row, "Rows") == f"{m['rows']:,}"
        if name.startswith("finetune"):
            assert _cell(overall, row, "Δ AUC vs baseline") == "baseline"
            continue
        d = m["auc"] - base["auc"]
        assert _cell(overall, row, "Δ AUC vs baseline") == f"{d:+.4f} ({100 * d / base['auc']:+.2f}%)"
        d = m["gauc"] - base["gauc"]
        assert _cell(overall, row, "Δ GAUC vs baseline") == f"{d:+.4f} ({100 * d / base['gauc']:+.2f}%)"
    assert float(_cell(overall, by_name["mkt"], "Δ AUC vs baseline").split()[0]) > 0  # less noise, better AUC

    groups = _md_rows(md, 2)
    assert [r[0] for r in groups["rows"] if r[0]] == ["0-10", "10-30", ">30"]
    mkt_rows = [r for r in groups["rows"] if r[1] == "mkt"]
    for row, g, bg in zip(mkt_rows, _metrics(runs[0])["target"]["groups"], base["groups"]):
        assert _cell(groups, row, "GAUC") == f"{g['gauc']:.4f}"
        assert _cell(groups, row, "GAUC improv.") == f"{100 * (g['gauc'] - bg['gauc']) / bg['gauc']:+.2f}%"

    ceiling = _md_rows(md, 3)
    assert ceiling["rows"][0][0] == "best achievable (true probability)"
    assert ceiling["rows"][0][1] == f"{base['ceiling']['auc']:.4f}"
    m = _metrics(runs[0])["target"]
    row = next(r for r in ceiling["rows"] if r[0] == "mkt")
    assert _cell(ceiling, row, "AUC gap to best").startswith(f"{m['auc'] - m['ceiling']['auc']:+.4f}")

    entities = _md_rows(md, 4)  # only the MEM run, both entities
    assert [r[0] for r in entities["rows"]] == ["mem"]
    mem = _metrics(runs[2])
    assert _cell(entities, entities["rows"][0], "source AUC").startswith(f"{mem['source']['auc']:.4f} [")
    for png in ("roc.png", "groups.png", "calibration.png", "loss.png"):
        assert f"]({png})" in md

    # report.json repeats metrics.json unchanged.
    with open(os.path.join(out, "report.json")) as f:
        saved = json.load(f)
    for run_dir, r in zip(runs, saved["runs"]):
        assert r["run_dir"] == run_dir
        assert r["metrics"] == {e: v for e, v in _metrics(run_dir).items() if e in ("source", "target")}
    assert saved["runs"][0]["delta"]["auc"]["abs"] == pytest.approx(_metrics(runs[0])["target"]["auc"] - base["auc"])
    assert saved["runs"][1]["is_baseline"] and saved["runs"][1]["delta"] is None
    cal = saved["runs"][0]["calibration"]
    assert sum(b["rows"] for b in cal["bins"]) == _metrics(runs[0])["target"]["rows"]


def test_baseline_by_name_or_directory_and_errors(runs, tmp_path, no_figures):
    s = write_report(runs, str(tmp_path / "a"), baseline="mem", entity="source", names=None)
    assert s["baseline"] == "mem"
    s = write_report(runs, str(tmp_path / "b"), baseline=runs[0] + os.sep, names=["A", "B", "C"])
    assert s["baseline"] == "A" and s["runs"][0]["is_baseline"]
    tem_rows = [r for r in s["tables"][0]["rows"] if r[0] == "B"]
    assert tem_rows and tem_rows[0][6].startswith("-")  # B is worse than A
    with pytest.raises(ValueError, match="baseline 'nope'"):
        write_report(runs, str(tmp_path / "c"), baseline="nope")
    with pytest.raises(ValueError, match="2 names for 3 runs"):
        write_report(runs, str(tmp_path / "c"), names=["A", "B"])
    with pytest.raises(ValueError, match="entity"):
        write_report(runs, str(tmp_path / "c"), entity="item")
    assert not os.path.exists(tmp_path / "c")


def test_source_entity_marks_runs_without_rows(runs, tmp_path, no_figures):
    s = write_report(runs, str(tmp_path / "r"), entity="source")
    rows = {r[0]: r for r in s["tables"][0]["rows"]}
    assert rows["mkt"][2] == "no source rows"
    assert rows["mem"][4] == f"{_metrics(runs[2])['source']['auc']:.4f}"


def test_missing_metrics_or_predictions_names_the_run_dir(runs, tmp_path):
    fresh = str(tmp_path / "never_evaluated")
    os.makedirs(fresh)
    with pytest.raises(FileNotFoundError,
                       match=re.escape(fresh) + r": metrics.json is missing; run mkt evaluate first"):
        write_report([runs[0], fresh], str(tmp_path / "out"))
    with open(os.path.join(fresh, "metrics.json"), "w") as f:
        json.dump({"stage": "tem"}, f)
    with pytest.raises(FileNotFoundError, match=re.escape(fresh) + r": no predictions"):
        write_report([runs[0], fresh], str(tmp_path / "out"))
    assert os.listdir(tmp_path) == ["never_evaluated"]  # nothing half-written


def test_metrics_json_without_intervals_groups_or_ceiling(tmp_path):
    old = [make_run(str(tmp_path), "a", "tem", "none", 0.3, with_extras=False),
           make_run(str(tmp_path), "b", "tem", "no_hfa", 0.9, with_extras=False)]
    s = write_report(old, str(tmp_path / "out"))
    assert [t["key"] for t in s["tables"]] == ["overall"]
    assert s["baseline"] == "a" and s["tables"][0]["rows"][1][0] == "b (w/o HFA)"
    assert s["tables"][0]["rows"][0][5] == "-"  # no CI
    assert set(s["plots"]) == {"roc", "calibration", "loss"}
    # Rewriting into the same directory replaces the report and drops plots it no longer draws.
    os.makedirs(tmp_path / "out2")
    (tmp_path / "out2" / "groups.png").write_bytes(b"old")
    (tmp_path / "out2" / "notes.txt").write_text("mine")
    write_report(old, str(tmp_path / "out2"))
    assert sorted(os.listdir(tmp_path / "out2")) == ["calibration.png", "loss.png", "notes.txt", "report.html",
                                                    "report.json", "report.md", "roc.png"]


def test_paired_difference_column(runs, tmp_path, no_figures, monkeypatch):
    calls = []

    def paired_comparison(pred_a, pred_b, entity, eval_cfg):
        calls.append((pred_a, pred_b, entity))
        if os.path.basename(os.path.dirname(pred_b)) == "mem":
            raise ValueError("the runs were not scored on the same rows")
        # This fake takes the difference as a - b; the report shows run - baseline whatever the convention.
        return {"entity": entity, "rows": 10, "auc_a": 0.70, "auc_b": 0.72, "auc_diff": -0.02,
                "auc_diff_ci": [-0.03, -0.01], "gauc_a": 0.60, "gauc_b": 0.605, "gauc_diff": -0.005,
                "gauc_diff_ci": [-0.01, 0.002], "samples": 200, "confidence": 0.95}

    monkeypatch.setitem(sys.modules, ANALYSIS, types.SimpleNamespace(paired_comparison=paired_comparison))
    s = write_report(runs, str(tmp_path / "r"))
    assert sorted(c[1] for c in calls) == sorted(os.path.join(r, "predictions") for r in (runs[0], runs[2]))
    assert all(c[0] == os.path.join(runs[1], "predictions") for c in calls)  # a = the baseline
    rows = {r[0]: r for r in s["tables"][0]["rows"]}
    assert rows["mkt"][7] == "[+0.0100, +0.0300] *"
    assert rows["mkt"][11] == "[-0.0020, +0.0100]"
    assert rows["mem"][7] == rows["mem"][11] == "n/a (not the same rows)"
    assert rows["finetune (w/o MEM pretrain)"][7] == "-"


def test_paired_difference_with_the_real_analysis(runs, tmp_path, monkeypatch, no_figures):
    from mkt_torchrec.config import EvalConfig

    monkeypatch.delitem(sys.modules, ANALYSIS)
    s = write_report(runs, str(tmp_path / "r"), eval_cfg=EvalConfig(bootstrap_samples=50))
    base = _metrics(runs[1])["target"]
    for r in (s["runs"][0], s["runs"][2]):  # the MEM run scored the same target rows too
        m, p = r["metrics"]["target"], r["paired"]
        assert p["auc_diff"] == pytest.approx(m["auc"] - base["auc"], abs=1e-6)
        assert p["gauc_diff"] == pytest.approx(m["gauc"] - base["gauc"], abs=1e-6)
        assert p["auc_diff_ci"][0] <= p["auc_diff"] <= p["auc_diff_ci"][1]
    row = next(r for r in s["tables"][0]["rows"] if r[0] == "mkt")
    lo, hi = s["runs"][0]["paired"]["auc_diff_ci"]
    assert row[7] == f"[{lo:+.4f}, {hi:+.4f}]" + (" *" if lo > 0 or hi < 0 else "")
    assert lo > 0  # 0.4 vs 1.5 logit noise: clearly better


def test_cli(runs, tmp_path, capsys, no_figures):
    import argparse

    from mkt_torchrec import cli
    from mkt_torchrec.config import EvalConfig
    from mkt_torchrec.evaluation.report_cli import add_arguments, run

    assert "report" in cli._COMMANDS  # mkt report dispatches to report_cli (the full parser imports torchrec: slow)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    cfg = types.SimpleNamespace(eval=EvalConfig(bootstrap_samples=0))
    out = str(tmp_path / "r")
    args = parser.parse_args([*runs, "--out", out, "--name", "MKT", "--name", "Finetune", "--name", "MEM",
                              "--baseline", "Finetune", "--entity", "target"])
    assert run(args, cfg) == 0
    printed = capsys.readouterr().out
    assert os.path.join(out, "report.html") in printed and "baseline Finetune" in printed
    line = next(line for line in printed.splitlines() if line.startswith("MKT "))
    m, base = _metrics(runs[0])["target"], _metrics(runs[1])["target"]
    assert f"{m['auc']:.4f}" in line and f"{m['auc'] - base['auc']:+.4f}" in line
    with pytest.raises(ValueError, match="baseline 'x'"):
        run(parser.parse_args([runs[0], "--out", out, "--baseline", "x"]), cfg)


def test_report_needs_no_config(runs, tmp_path, capsys, no_figures):
    """The README's `mkt report RUN ... --out DIR` works as written (it used to require --config)."""
    from mkt_torchrec.cli import main

    out = str(tmp_path / "nocfg")
    assert main(["report", *runs, "--out", out, "--set", "eval.bootstrap_samples=0"]) == 2  # --set needs --config
    assert main(["report", *runs, "--out", out]) == 0
    assert os.path.isfile(os.path.join(out, "report.html"))
